"""Why ``import kernels`` never finds this repository's ``kernels/`` (docs/design.md, "Layout").

The folders ``engine/``, ``kernels/``, ``bindings/`` and ``bench/`` are the packages
``forvalue.engine`` and so on. When the repository root is first on ``sys.path`` (``python -m``
or ``python -c`` run from a clone, pytest, Ray workers started from one), Python's path finder
would also offer them under their bare names, and a regular package found first wins: the
bare name ``kernels`` is Hugging Face's ``kernels``, which transformers imports. Each folder's
``__init__.py`` therefore checks the name it runs under and, when it is the bare one, hands
the name to the installed module of that name with this file (loaded by path, so that nothing
of the folder is imported under the wrong name).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def yield_name(name: str, init_file: str) -> None:
    """Put the installed module ``name``, found on ``sys.path`` without the repository root
    that holds ``init_file``, in ``sys.modules[name]`` in place of the folder being imported
    (the import system returns what ``sys.modules`` holds once the ``__init__`` has run)."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r} (the folder {name}/ of the forvalue "
                                  f"repository is forvalue.{name}, never {name})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if spec.loader is not None:  # None: a namespace package, complete as made
        spec.loader.exec_module(module)
