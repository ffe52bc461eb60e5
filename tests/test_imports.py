"""The package's module graph, read from the source with ``ast`` (nothing is imported).

Every ``import`` and ``from … import`` in every module of ``workbench`` — at module level and inside
functions alike, so a function-level import cannot hide a circle — is an edge to the most specific module
it names: ``from pkg import name`` is an import of ``pkg.name`` when that is a submodule, else of ``pkg``
(its ``__init__``). A package's ``__init__`` importing its own submodules is therefore no cycle by itself.
Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "workbench"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Cycles known and accepted, as sorted tuples of module names; keep this empty.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (None outside it)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skipped.update(id(n) for n in ast.walk(child))
    return skipped


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``module`` that lands inside the package."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    package = module if _is_package(module) else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name)
                if target is not None:
                    out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                assert base, f"{module}:{node.lineno}: relative import beyond the top-level package"
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if _known(source) is None:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                out.append((submodule if submodule in MODULES else _known(source), node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports_of(m) if t != m} for m in MODULES}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one concrete cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)

    found = []
    for comp in components:
        start = min(comp)
        # Breadth-first from start back to start inside the component: the shortest concrete cycle.
        prev: dict[str, str] = {}
        frontier = [start]
        seen = {start}
        end = None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(g[v] & comp):
                    if w == start:
                        end = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        found.append(sorted(comp) and list(reversed(path)) + [start])
    return found


def test_the_graph_is_read():
    # Guard against a reader that silently finds nothing: known edges must be there.
    g = graph()
    assert len(MODULES) > 40
    assert "workbench.norms.base" in g["workbench.norms.layernorm"]
    assert "workbench.norms.layernorm" in g["workbench.norms"]
    assert "workbench.io" in g["workbench.zoo"]


def test_no_import_cycles():
    g = graph()
    found = [c for c in cycles(g) if tuple(sorted(set(c))) not in KNOWN_CYCLES]
    lines = []
    for c in found:
        hops = []
        for a, b in zip(c, c[1:]):
            line = min(n for t, n in imports_of(a) if t == b)
            hops.append(f"{a} (line {line}) → {b}")
        lines.append(" ; ".join(hops))
    assert not found, "import cycles:\n" + "\n".join(lines)


def test_no_module_imports_the_top_level_package():
    offenders = [
        f"{MODULES[m].relative_to(ROOT.parent)}:{line}"
        for m in MODULES
        if m != PACKAGE
        for target, line in imports_of(m)
        if target == PACKAGE
    ]
    assert not offenders, (
        "modules importing the top-level workbench package (import the submodule that defines the name): "
        + ", ".join(offenders)
    )


# --- norm-kind questions are answered by the norm -----------------------------------------------------

NORMS = ROOT / "norms"


def _norm_classes() -> set[str]:
    """Every class the norms package defines (their names must not be dispatched on elsewhere)."""
    names = set()
    for path in NORMS.glob("*.py"):
        names |= {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef)}
    return names


def _outside_norms() -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in MODULES.values() if NORMS not in p.parents]


def _is_cfg_norm(node: ast.AST) -> bool:
    # ``<anything>.norm`` where the object is a config (``cfg.norm``, ``model.cfg.norm``, ``self.cfg.norm``)
    return (isinstance(node, ast.Attribute) and node.attr == "norm" and isinstance(node.value, (ast.Name, ast.Attribute))
            and (node.value.id if isinstance(node.value, ast.Name) else node.value.attr) in ("cfg", "config", "model_cfg"))


def norm_dispatch_sites() -> list[str]:
    """Where code outside ``norms/`` asks what kind a norm is by name: ``cfg.norm ==/!=/in``, a string
    naming a norm class, ``isinstance`` against a Standardize class."""
    classes = _norm_classes()
    standardizes = {c for c in classes if c.endswith("Standardize")}
    found = []
    for path, tree in _outside_norms():
        where = path.relative_to(ROOT.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and (_is_cfg_norm(node.left) or any(map(_is_cfg_norm, node.comparators))):
                found.append(f"{where}:{node.lineno} compares cfg.norm")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in classes:
                found.append(f"{where}:{node.lineno} names the class {node.value!r}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                  and len(node.args) == 2):
                kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                hit = [k.id if isinstance(k, ast.Name) else getattr(k, "attr", "") for k in kinds]
                if set(hit) & standardizes:
                    found.append(f"{where}:{node.lineno} isinstance on {sorted(set(hit) & standardizes)}")
    return found


def test_no_norm_kind_dispatch_outside_norms():
    assert not norm_dispatch_sites(), "ask the norm or its scheme a capability instead:\n" + "\n".join(norm_dispatch_sites())


def test_the_dispatch_check_sees_a_planted_one(tmp_path, monkeypatch):
    planted = ROOT / "_planted_dispatch_probe.py"
    planted.write_text('def f(cfg, st):\n    return cfg.norm == "none" or type(st).__name__ == "CRMSStandardize" '
                       'or isinstance(st, FrozenStandardize)\n', encoding="utf-8")
    try:
        monkeypatch.setitem(MODULES, "workbench._planted_dispatch_probe", planted)
        found = norm_dispatch_sites()
    finally:
        planted.unlink()
    assert sorted(f.split(" ", 1)[1] for f in found if "_planted" in f) == [
        "compares cfg.norm", "isinstance on ['FrozenStandardize']", "names the class 'CRMSStandardize'"]
