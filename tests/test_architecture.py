"""The package's architecture (docs/architecture.md), checked from the source with ``ast``.

Every module under ``jaxconv/`` is parsed (nothing is imported), its relative
imports resolved, and each module mapped to its wing.  The checker fails on

* ``direction``: an import of a wing the importer's wing may not import
  (:data:`MAY_IMPORT`);
* ``cycle``: modules that import each other, directly or around a loop;
* ``function-level``: an import inside a function, of a jaxconv module or of
  anything but an optional extra (:data:`OPTIONAL_EXTRAS`);
* ``shadow``: a package ``__init__`` binding a name that is also one of the
  package's modules (so ``jaxconv.ops.lrn`` could be the module or the function,
  depending on import order);
* ``init``: a package ``__init__`` doing more than re-exporting (imports, a
  docstring, ``__all__``, ``__version__``);
* ``dependency``: a module-level import of a third-party package that is not a
  runtime dependency (:data:`RUNTIME_DEPENDENCIES`);
* ``unmapped``: a module in no wing.

The checker runs on a mapping ``{module name: source}``, so the self-tests feed it
synthetic packages with planted violations.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = "jaxconv"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / ROOT

#: Which wings each wing may import (besides itself).  The spine is
#: ``cli -> train -> nn -> ops -> plan -> _core``; ``verify`` and ``reference``
#: stand beside ``ops``; nothing imports ``cli`` but the ``__main__`` entry point,
#: and the package ``__init__`` (``root``) re-exports every wing but ``cli``.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "_core": frozenset(),
    "plan": frozenset({"_core"}),
    "ops": frozenset({"plan", "_core"}),
    "reference": frozenset(),
    "matrix": frozenset({"_core"}),
    "lax": frozenset({"ops", "_core"}),
    # verify registers the lax drop-ins in the conformance harness beside the ops they run.
    "verify": frozenset({"lax", "ops", "plan", "reference", "matrix", "_core"}),
    "nn": frozenset({"ops", "_core"}),
    # train forces the oneDNN forms for ``Config(onednn=True)`` through plan.forms.
    "train": frozenset({"verify", "nn", "ops", "plan", "_core"}),
    "cli": frozenset({"train", "verify", "nn", "ops", "plan", "reference", "matrix", "lax", "_core"}),
    "root": frozenset({"train", "verify", "nn", "ops", "plan", "reference", "matrix", "lax", "_core"}),
    "__main__": frozenset({"cli"}),
}

#: Packages a function may import (optional extras, imported only when used).
OPTIONAL_EXTRAS = frozenset({"matplotlib", "tqdm", "safetensors", "sklearn", "hypothesis"})

#: Function-level imports allowed in one module only: the oneDNN loader looks up the optional
#: ``onednn-cpu-gomp`` wheel's files when asked where the library is.
MODULE_EXTRAS: dict[str, frozenset[str]] = {
    "jaxconv.plan.onednn": frozenset({"importlib"}),
    # POSIX-only: imported when a run directory is locked, so ``import jaxconv`` works where fcntl is missing.
    "jaxconv.train.rundir": frozenset({"fcntl"}),
}

#: jaxconv modules that wrap an optional extra and are imported only when used: the oneDNN forms
#: load a shared library through ctypes, which importing an op must not do.
OPTIONAL_INTERNAL = frozenset({"jaxconv.plan.onednn"})

#: Third-party packages a module may import at module level (``[project] dependencies``).
RUNTIME_DEPENDENCIES = frozenset({"jax", "jaxlib", "numpy", "optax"})

#: Statements a package ``__init__`` may hold besides imports and its docstring: these assignments.
INIT_NAMES = frozenset({"__all__", "__version__"})


@dataclass(frozen=True, order=True)
class Violation:
    kind: str  # direction, cycle, function-level, shadow, init, dependency, unmapped
    module: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.module}: {self.detail}"


@dataclass(frozen=True)
class Import:
    target: str  # a module name, resolved (for jaxconv: the deepest module that exists)
    function: str | None  # the enclosing function, None at module level
    line: int


# --- reading the package ----------------------------------------------------------------------


def read_package(directory: Path = PACKAGE_DIR) -> dict[str, str]:
    """``{module name: source}`` for every ``.py`` file under ``directory`` (a package ``__init__`` under the
    package's own name)."""
    sources = {}
    for path in sorted(directory.rglob("*.py")):
        parts = (directory.name, *path.relative_to(directory).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return sources


def _packages(sources: dict[str, str]) -> set[str]:
    """The modules that have submodules (the packages)."""
    return {name.rsplit(".", 1)[0] for name in sources if "." in name}


def wing(module: str) -> str | None:
    """The wing of a jaxconv module: ``root`` for the package ``__init__``, else its second component."""
    parts = module.split(".")
    if parts == [ROOT]:
        return "root"
    return parts[1] if parts[0] == ROOT and parts[1] in MAY_IMPORT else None


def _resolve_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    keep = len(package) - (node.level - 1)
    if keep < 1:
        raise ValueError(f"{module}: line {node.lineno}: a relative import above the top-level package")
    return ".".join(package[:keep] + ([node.module] if node.module else []))


def _deepest_module(name: str, sources: dict[str, str]) -> str:
    while name not in sources and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, sources: dict[str, str]):
        self.module, self.is_package, self.sources = module, is_package, sources
        self.imports: list[Import] = []
        self.function: list[str] = []

    def _scope(self, node):
        self.function.append(node.name)
        self.generic_visit(node)
        self.function.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _scope

    def visit_Lambda(self, node):
        self.function.append("<lambda>")
        self.generic_visit(node)
        self.function.pop()

    def _add(self, target: str, line: int):
        if target.split(".")[0] == ROOT:
            target = _deepest_module(target, self.sources)
        self.imports.append(Import(target, ".".join(self.function) or None, line))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node):
        base = _resolve_base(self.module, self.is_package, node)
        for alias in node.names:
            # ``from package import name``: the submodule ``package.name`` if there is one, else ``package``.
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.sources else base, node.lineno)


def imports_of(sources: dict[str, str]) -> dict[str, list[Import]]:
    """Every import statement of every module, resolved, with the function it sits in."""
    packages = _packages(sources)
    result = {}
    for module, source in sources.items():
        collector = _ImportCollector(module, module in packages, sources)
        collector.visit(ast.parse(source, filename=module))
        result[module] = collector.imports
    return result


# --- the checks -------------------------------------------------------------------------------


def _top(name: str) -> str:
    return name.split(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def _shadowing(module: str, source: str, sources: dict[str, str]) -> list[Violation]:
    """Names a package ``__init__`` binds that are also its submodules' names, other than by ``from . import m``."""
    submodules = {name.rsplit(".", 1)[1] for name in sources if name.rsplit(".", 1)[0] == module and "." in name}
    out = []
    for node in ast.parse(source).body:
        bound: list[str] = []
        if isinstance(node, ast.ImportFrom):
            from_self = node.level == 1 and not node.module  # ``from . import m`` binds the submodule itself
            bound = [a.asname or a.name for a in node.names if not (from_self and a.asname in (None, a.name))]
        elif isinstance(node, ast.Import):
            bound = [a.asname or a.name.split(".")[0] for a in node.names]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        for name in bound:
            if name in submodules:
                out.append(Violation("shadow", module, f"binds {name!r}, also the module {module}.{name}"))
    return out


def _init_statements(module: str, source: str) -> list[Violation]:
    out = []
    for i, node in enumerate(ast.parse(source).body):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if all(isinstance(t, ast.Name) and t.id in INIT_NAMES for t in targets):
                continue
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            continue  # a lazy submodule (PEP 562): jaxconv.plan.onednn, loaded only when asked for
        out.append(Violation("init", module, f"line {node.lineno}: {type(node).__name__}, not a re-export"))
    return out


def check(sources: dict[str, str]) -> list[Violation]:
    """Every violation of the architecture in the package ``sources`` (``{module name: source}``)."""
    imports = imports_of(sources)
    packages = _packages(sources)
    stdlib = set(sys.stdlib_module_names)
    violations: set[Violation] = set()
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, found in imports.items():
        here = wing(module)
        if here is None:
            violations.add(Violation("unmapped", module, "in no wing: add it to MAY_IMPORT and docs/architecture.md"))
        for imp in found:
            internal = _top(imp.target) == ROOT
            if internal:
                graph[module].add(imp.target)
                there = wing(imp.target)
                if here is not None and there is not None and there != here and there not in MAY_IMPORT[here]:
                    violations.add(Violation("direction", module, f"imports {imp.target} ({here} -> {there})"))
            if imp.function is not None:
                allowed = (
                    imp.target in OPTIONAL_INTERNAL
                    or not internal
                    and (_top(imp.target) in OPTIONAL_EXTRAS or _top(imp.target) in MODULE_EXTRAS.get(module, ()))
                )
                if not allowed:
                    violations.add(Violation("function-level", module, f"{imp.function} imports {imp.target}"))
            elif not internal and _top(imp.target) not in stdlib | RUNTIME_DEPENDENCIES | {"__future__"}:
                violations.add(Violation("dependency", module, f"imports {imp.target} at module level"))
    for component in _cycles(graph):
        violations.add(Violation("cycle", component[0], " <-> ".join(component)))
    for module in packages & set(sources):
        violations.update(_shadowing(module, sources[module], sources))
        violations.update(_init_statements(module, sources[module]))
    return sorted(violations)


# --- the package itself -----------------------------------------------------------------------

#: Violations in today's tree, each to be fixed (then removed here): the test fails on any other
#: violation, and on an entry here that no longer occurs (so the list only shrinks).
KNOWN: frozenset[Violation] = frozenset({})


@pytest.fixture(scope="module")
def violations():
    return check(read_package())


def test_every_module_is_read():
    sources = read_package()
    assert {"jaxconv", "jaxconv.nn.layers", "jaxconv.ops.conv", "jaxconv._core.window", "jaxconv.cli.commands"} <= set(
        sources
    )
    assert len(sources) == len(list(PACKAGE_DIR.rglob("*.py")))


def test_no_new_violations(violations):
    new = [str(v) for v in violations if v not in KNOWN]
    assert not new, "architecture violations (docs/architecture.md):\n" + "\n".join(new)


def test_known_violations_still_exist(violations):
    fixed = [str(v) for v in sorted(KNOWN) if v not in violations]
    assert not fixed, "fixed, so remove from KNOWN in tests/test_architecture.py:\n" + "\n".join(fixed)


def test_every_wing_is_documented():
    text = (PACKAGE_DIR.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name in MAY_IMPORT:
        if name not in ("root", "__main__"):
            assert f"`{name}`" in text or f"{name}/" in text, name


# --- the checker catches what it should (synthetic packages) ------------------------------------


def _package(**modules: str) -> dict[str, str]:
    """A synthetic jaxconv: ``_package(ops__conv="...")`` is ``{"jaxconv.ops.conv": "..."}``; empty packages added."""
    sources = {"jaxconv": '"""doc"""\n'}
    for key, source in modules.items():
        name = "jaxconv." + key.replace("__", ".")
        sources[name] = source
    for name in list(sources):
        parts = name.split(".")
        for i in range(1, len(parts)):
            sources.setdefault(".".join(parts[:i]), "")
    return sources


def _kinds(violations) -> list[tuple[str, str]]:
    return sorted((v.kind, v.module) for v in violations)


def test_a_clean_synthetic_package_passes():
    sources = _package(
        _core__window="import math\nimport numpy as np\n",
        plan__planner="from .._core import window\n",
        ops__conv="from .. import plan\nfrom .._core.window import patches\nimport jax\n",
        ops__layers="from .conv import conv2d\n",
        nn__layers="from .. import ops\nfrom ..ops import conv\n",
        train__plots="def plot():\n    import matplotlib.pyplot as plt\n    from hypothesis import strategies\n",
        plan__onednn="def where():\n    from importlib import metadata\n",
        cli__commands="from .. import train, nn\n",
    )
    sources["jaxconv.__main__"] = "from .cli import main\n"
    sources["jaxconv"] = '"""doc"""\nfrom . import nn, ops\nfrom .ops.conv import conv2d\n__all__ = ["conv2d"]\n'
    sources["jaxconv.ops"] = "from . import conv\nfrom .conv import conv2d\n"
    assert check(sources) == []


@pytest.mark.parametrize(
    "modules,expected",
    [
        # (a) a forbidden direction: ops imports nn, plan imports ops, reference imports _core, nn imports train
        (dict(ops__conv="from ..nn import layers\n", nn__layers=""), [("direction", "jaxconv.ops.conv")]),
        (dict(plan__planner="import jaxconv.ops.conv\n", ops__conv=""), [("direction", "jaxconv.plan.planner")]),
        (dict(reference="from ._core import window\n", _core__window=""), [("direction", "jaxconv.reference")]),
        (dict(train__step="from ..cli import commands\n", cli__commands=""), [("direction", "jaxconv.train.step")]),
        (dict(nn__layers="from jaxconv import conv2d\n"), [("direction", "jaxconv.nn.layers")]),
        # (b) cycles: two modules of one wing, and a loop of three
        (dict(ops__a="from . import b\n", ops__b="from .a import f\n"), [("cycle", "jaxconv.ops.a")]),
        (
            dict(nn__a="from .b import x\n", nn__b="from .c import x\n", nn__c="from . import a\n"),
            [("cycle", "jaxconv.nn.a")],
        ),
        (dict(ops__a="from . import a\n"), [("cycle", "jaxconv.ops.a")]),
        # (c) function-level imports of jaxconv, of a runtime dependency, of an extra outside its module
        (
            dict(train__data="def f():\n    from . import step\n", train__step=""),
            [("function-level", "jaxconv.train.data")],
        ),
        (dict(nn__layers="def f():\n    import jax.numpy as jnp\n"), [("function-level", "jaxconv.nn.layers")]),
        (dict(ops__conv="def f():\n    from importlib import metadata\n"), [("function-level", "jaxconv.ops.conv")]),
        (
            dict(ops__conv="class A:\n    def m(self):\n        import torch\n"),
            [("function-level", "jaxconv.ops.conv")],
        ),
        # (d) a module named like what its package exports: the lrn trap, and a function defined in the __init__
        (dict(ops__lrn="def lrn(x): ...\n", ops="from .lrn import lrn\n"), [("shadow", "jaxconv.ops")]),
        (dict(plan__forms="", plan="from .planner import forms\n", plan__planner=""), [("shadow", "jaxconv.plan")]),
        (
            dict(ops__norm="", ops="from . import norm as norm_module\nnorm = 1\n"),
            [("init", "jaxconv.ops"), ("shadow", "jaxconv.ops")],
        ),
        # an __init__ that computes, a non-runtime dependency at module level, a module in no wing
        (dict(nn="from .layers import Conv\ndef helper():\n    pass\n", nn__layers=""), [("init", "jaxconv.nn")]),
        (dict(nn__layers="import flax\n"), [("dependency", "jaxconv.nn.layers")]),
        (dict(extras__thing=""), [("unmapped", "jaxconv.extras"), ("unmapped", "jaxconv.extras.thing")]),
    ],
)
def test_the_checker_catches_a_planted_violation(modules, expected):
    assert _kinds(check(_package(**modules))) == sorted(expected)


def test_cycle_report_names_every_module_of_the_loop():
    found = check(_package(nn__a="from .b import x\n", nn__b="from .c import x\n", nn__c="from . import a\n"))
    assert [str(v) for v in found] == ["cycle: jaxconv.nn.a: jaxconv.nn.a <-> jaxconv.nn.b <-> jaxconv.nn.c"]


def test_relative_imports_resolve_like_python():
    sources = _package(train__step="", nn__layers="", ops__conv="")
    sources["jaxconv.train.data"] = (
        "from . import step\nfrom .. import nn\nfrom ..ops.conv import f\nfrom ..ops import x\n"
    )
    sources["jaxconv.train"] = "from .data import load\n"
    found = imports_of(sources)
    assert [i.target for i in found["jaxconv.train.data"]] == [
        "jaxconv.train.step",
        "jaxconv.nn",
        "jaxconv.ops.conv",
        "jaxconv.ops",
    ]
    assert [i.target for i in found["jaxconv.train"]] == ["jaxconv.train.data"]
    with pytest.raises(ValueError, match="above the top-level package"):
        imports_of({"jaxconv": "from .. import x\n"})


@pytest.mark.parametrize(
    "module,line,expected",
    [
        ("jaxconv.ops.conv", "from ..nn import layers as _nn\n", "direction"),
        ("jaxconv._core.window", "from ..ops import conv as _conv\n", "direction"),
        ("jaxconv.plan.planner", "from ..ops import conv as _conv\n", "cycle"),
        ("jaxconv.nn.layers", "def _late():\n    from . import models\n", "function-level"),
        ("jaxconv.ops", "from .pool import max_pool2d as pool\n", "shadow"),
    ],
)
def test_a_violation_planted_in_the_real_tree_is_caught(module, line, expected):
    sources = read_package()
    sources[module] += "\n" + line
    new = [v for v in check(sources) if v not in KNOWN]
    assert expected in {v.kind for v in new}, new
