"""Layout rules, read from the source: which subpackage may import which (kernels <- engine <-
bindings, bench on top), kernel ops that share helpers through common modules rather than
import each other, a client SDK without the engine, and design notes cited where they live
(docs/design.md)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("engine", "kernels", "bindings", "bench")
# What each subpackage must not import.
FORBIDDEN = {"kernels": {"engine", "bindings", "bench"}, "engine": {"bindings", "bench"},
             "bindings": {"bench"}, "bench": set()}
# (file, module) imported inside a function: the eval subcommand's options and handler, loaded
# only for `forvalue eval`.
LAZY_EXCEPTIONS = {("bindings/cli.py", "forvalue.bench.eval")}
OPS = ("vocab_logsumexp", "reference_score", "error_outer", "error_gram", "error_sketch")
# The client SDK (it must install and import without torch) and what of forvalue it may import.
SDK = ("client.py", "replicas.py", "wire.py")
SDK_MODULES = {"client", "replicas", "wire", "forvalue_pb2", "forvalue_pb2_grpc"}
OLD_NOTES = "DESIGN" + ".md"  # spelled apart so that this file does not cite it
UNTRACKED = {"__pycache__", "build", "dist"}  # generated folders (.gitignore), not the repository's


def source_files():
    return sorted(path for name in SUBPACKAGES for path in (ROOT / name).rglob("*.py"))


def imported_modules(path):
    """(line, module, inside a function) for every import of ``path``; for ``from M import N``
    both M and M.N, since N may be a module."""
    package = "forvalue." + ".".join(path.parent.relative_to(ROOT).parts)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
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
                  for line, module, _ in imported_modules(ROOT / "bindings" / name)
                  if not sdk_may_import(module)]
    assert not violations, "\n".join(violations)


def sdk_may_import(module):
    parts = module.split(".")
    if parts[0] != "forvalue":
        return parts[0] != "torch"
    return parts[:2] == ["forvalue", "bindings"] and (len(parts) == 2 or parts[2] in SDK_MODULES)


def test_resolving_relative_imports():
    assert resolve("forvalue.bindings", 1, "server") == "forvalue.bindings.server"
    assert resolve("forvalue.bindings", 1, None) == "forvalue.bindings"
    assert resolve("forvalue.bindings", 2, "engine.samples") == "forvalue.engine.samples"
    assert subpackage("forvalue.engine.config") == "engine" and subpackage("numpy") is None
    assert sdk_may_import("forvalue.bindings.wire.Result") and sdk_may_import("grpc")
    assert not sdk_may_import("forvalue.bindings.batch") and not sdk_may_import("forvalue.engine")


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
