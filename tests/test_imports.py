"""Layout rules, read from the source: which subpackage and which room may import which
(kernels <- engine <- bindings, bench on top; inside each, the rooms of docs/design.md,
"Layout"), no import cycle, kernel ops that share helpers through common modules, a client SDK
without the engine, modules under 400 lines, every option and constant declared once, and
design notes cited where they live."""

import argparse
import ast
import dataclasses
from pathlib import Path

from forvalue import kernels
from forvalue.bindings.cli.commands import COMMANDS
from forvalue.engine import config

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("engine", "kernels", "bindings", "bench")
# What each subpackage must not import.
FORBIDDEN = {"kernels": {"engine", "bindings", "bench"}, "engine": {"bindings", "bench"},
             "bindings": {"bench"}, "bench": set()}
# The rooms of each subpackage and the rooms each may import ("": the subpackage's own top-level
# modules: shared ones such as engine/config.py, and engine's offline front ends).
SHARED = {"engine": {"config", "version", "atomic", "outputs", "__init__"},
          "bindings": {"wire", "protos", "forvalue_pb2", "forvalue_pb2_grpc", "__init__"},
          "bench": {"common", "__init__"}}
ROOMS = {
    "engine": {"inputs": set(), "model": {"inputs"}, "valuation": {"inputs", "model"},
               "core": {"inputs", "model", "valuation"},
               "serving": {"inputs", "model", "valuation", "core"},
               "index": {"inputs", "model", "valuation"},  # and the Valuator it runs samples with
               "": {"inputs", "model", "valuation", "core"}},  # valuator.py, warmup.py
    "bindings": {"client": set(), "server": set(), "jobs": set(), "ray_jobs": set(),
                 "cli": {"client", "server", "jobs", "ray_jobs"}},
    "bench": {"evals": set(), "perf": set()},
}
# (file, module) imported inside a function: the eval subcommand's options and handler, loaded
# only for `forvalue eval`; the clients, loaded by `from forvalue.bindings import Client`.
LAZY_EXCEPTIONS = {("bindings/cli/commands.py", "forvalue.bench.evals.eval"),
                   ("bindings/__init__.py", "forvalue.bindings.client")}
OPS = ("vocab_logsumexp", "reference_score", "error_outer", "error_gram", "error_sketch")
# The client SDK (it must install and import without torch) and what of forvalue it may import.
SDK = ("client/__init__.py", "client/clients.py", "client/errors.py", "client/replicas.py", "wire.py")
MAX_LINES = 400
GENERATED = {"forvalue_pb2.py", "forvalue_pb2_grpc.py"}
# Flags named like a valuation option that are not one: eval's --loss-on picks the label rule of
# its exact methods, by default the task's own (the paper's protocol).
OWN_FLAGS = {("eval", "--loss-on"): "bench/evals/eval.py"}
OLD_NOTES = "DESIGN" + ".md"  # spelled apart so that this file does not cite it
UNTRACKED = {"__pycache__", "build", "dist"}  # generated folders (.gitignore), not the repository's


def source_files():
    return sorted(path for name in SUBPACKAGES for path in (ROOT / name).rglob("*.py")
                  if "experiments" not in path.parts and "__pycache__" not in path.parts)


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return "forvalue." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, *, type_checking=False):
    """(line, module, inside a function) for every import of ``path``; for ``from M import N``
    both M and M.N, since N may be a module. Imports under ``if TYPE_CHECKING:`` (annotations,
    never run) only with ``type_checking``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test) and not type_checking:
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(package, child.level, child.module)
                found.append((child.lineno, base, nested))
                found.extend((child.lineno, f"{base}.{alias.name}", nested) for alias in child.names)
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return found


def resolve(package, level, module):
    if level == 0:
        return module
    parts = package.split(".")
    base = ".".join(parts[:len(parts) - level + 1])
    return f"{base}.{module}" if module else base


def subpackage(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "forvalue" else None


def room(module):
    """("engine", "core") for forvalue.engine.core.runner; ("engine", "") for a top-level module."""
    parts = module.split(".")
    top = subpackage(module)
    if top not in ROOMS:
        return None
    return top, parts[2] if len(parts) > 2 and parts[2] in ROOMS[top] else ""


def test_subpackages_import_only_downwards():
    violations = []
    for path in source_files():
        name = path.relative_to(ROOT).as_posix()
        for line, module, in_function in imported_modules(path):
            if subpackage(module) not in FORBIDDEN[path.relative_to(ROOT).parts[0]]:
                continue
            if in_function and (name, module) in LAZY_EXCEPTIONS:
                continue
            violations.append(f"{name}:{line} imports {module}")
    assert not violations, "imports against the layout:\n" + "\n".join(violations)


def test_rooms_import_only_the_rooms_below_them():
    violations = []
    for path in source_files():
        name, own = path.relative_to(ROOT).as_posix(), room(module_name(path))
        if own is None:
            continue
        top, own_room = own
        shared = own_room == "" and path.stem in SHARED[top]
        for line, module, in_function in imported_modules(path):
            target = room(module)
            if target is None or target[0] != top or target[1] in ("", own_room):
                continue
            if (name, module) in LAZY_EXCEPTIONS and in_function:
                continue
            if shared or target[1] not in ROOMS[top][own_room]:
                violations.append(f"{name}:{line} ({top}/{own_room or 'top'}) imports {module}")
    assert not violations, "imports against the rooms:\n" + "\n".join(sorted(set(violations)))


def test_no_import_cycles():
    """Module-level imports (those that run when a module is first imported) form no cycle."""
    modules = {module_name(path): path for path in source_files()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for _, module, in_function in imported_modules(path):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name and not in_function:
                targets.add(module)
        graph[name] = targets - {parent for parent in modules if name.startswith(parent + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_kernel_ops_do_not_import_each_other():
    violations = []
    for op in OPS:
        path = ROOT / "kernels" / f"{op}.py"
        for line, module, _ in imported_modules(path):
            other = module.removeprefix("forvalue.kernels.").split(".")[0]
            if module.startswith("forvalue.kernels.") and other in OPS and other != op:
                violations.append(f"kernels/{op}.py:{line} imports kernels/{other}.py")
    assert not violations, "share helpers through a common module:\n" + "\n".join(sorted(set(violations)))


def test_the_client_sdk_needs_neither_torch_nor_the_engine_nor_the_jobs():
    violations = [f"bindings/{name}:{line} imports {module}" for name in SDK
                  for line, module, _ in imported_modules(ROOT / "bindings" / name, type_checking=True)
                  if not sdk_may_import(module)]
    assert not violations, "\n".join(violations)


def sdk_may_import(module):
    parts = module.split(".")
    if parts[0] != "forvalue":
        return parts[0] != "torch"
    return parts[:2] == ["forvalue", "bindings"] and (len(parts) == 2 or room(module) in {
        ("bindings", "client"), ("bindings", "")}) and (len(parts) < 3 or parts[2] != "__init__")


def test_resolving_relative_imports():
    assert resolve("forvalue.bindings.client", 2, "wire") == "forvalue.bindings.wire"
    assert resolve("forvalue.bindings", 1, None) == "forvalue.bindings"
    assert room("forvalue.engine.core.runner.ModelRunner") == ("engine", "core")
    assert room("forvalue.engine.config") == ("engine", "") and room("numpy") is None
    assert sdk_may_import("forvalue.bindings.wire.Result") and sdk_may_import("grpc")
    assert not sdk_may_import("forvalue.bindings.jobs.batch") and not sdk_may_import("forvalue.engine")


def test_every_hand_written_module_is_short():
    sizes = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in source_files()
             if path.name not in GENERATED}
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path, n in sizes.items() if n >= MAX_LINES]
    assert not long, f"split modules of {MAX_LINES} lines or more:\n" + "\n".join(long)


def test_the_configs_constants_are_declared_only_there():
    """Except the kernels' own ``BACKENDS`` (the kernels know nothing of the engine, and the
    config loads without torch): the two must be equal."""
    names = {name for name, value in vars(config).items() if name.isupper() and isinstance(value, tuple)}
    assert {"LOSS_ON", "ATTENTION_MODES", "POLICIES", "NORMALIZATIONS"} <= names
    assert config.BACKENDS == kernels.BACKENDS
    again = []
    for path in source_files():
        if path == ROOT / "engine" / "config.py" or path.parts[-2] == "kernels":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            again += [f"{path.relative_to(ROOT)}:{node.lineno} {t.id}" for t in targets
                      if isinstance(t, ast.Name) and t.id in names]
    assert not again, "import these from forvalue.engine.config:\n" + "\n".join(again)


def test_every_valuation_flag_comes_from_the_config_with_its_commands_default():
    """Each command's flags for ValuationConfig fields are built from the field (one name, one
    default, one check), never declared by hand."""
    flags = {}
    for field in dataclasses.fields(config.ValuationConfig):
        suffix, per_unit = field.metadata["flag_unit"] or ("", 1)
        flags[field.name] = ("--" + field.name.replace("_", "-") + (f"-{suffix}" if suffix else ""), per_unit)
    for command in COMMANDS:
        parser = argparse.ArgumentParser()
        command.function(command.add_arguments)(parser)
        defaults = config.ValuationConfig.for_command(command.name)
        for action in parser._actions:
            for name, (flag, per_unit) in flags.items():
                if flag not in action.option_strings or (command.name, flag) in OWN_FLAGS:
                    continue
                assert action.dest == name, (command.name, flag)
                expected = getattr(defaults, name)
                shown = None if expected is None else (expected * per_unit if per_unit != 1 else expected)
                assert action.default in (shown, "none" if shown is None else shown), (command.name, flag)
    own = {(path, flag) for (_, flag), path in OWN_FLAGS.items()}
    valuation_flags = {flag for flag, _ in flags.values()}
    literal = []
    modules = {ROOT / (c.module.removeprefix("forvalue.").replace(".", "/") + ".py") for c in COMMANDS}
    for path in sorted(modules):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
                flag = getattr(node.args[0], "value", None)
                if flag in valuation_flags and (path.relative_to(ROOT).as_posix(), flag) not in own:
                    literal.append(f"{path.relative_to(ROOT)}:{node.lineno} {flag}")
    assert not literal, "declare valuation flags in ValuationConfig:\n" + "\n".join(literal)


def test_design_notes_are_cited_where_they_live():
    citing = []
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if not path.is_file() or any(part.startswith(".") or part.endswith(".egg-info")
                                     or part in UNTRACKED for part in relative.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # binary files cite nothing
            continue
        citing += [f"{relative}:{n}" for n, line in enumerate(text.splitlines(), 1) if OLD_NOTES in line]
    assert not citing, f"cite docs/design.md instead of {OLD_NOTES}:\n" + "\n".join(citing)
