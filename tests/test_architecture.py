"""The shape of the kit's code: one direction of imports, imports at the top, small modules.

Walks `kit/` with `ast`: builds the graph of module-level imports between kit modules
(imports under `if TYPE_CHECKING:` are not runtime imports and are left out) and fails on
any cycle, on any import of a kit module inside a function or class body, and on modules
that grow too long.
"""

from __future__ import annotations

import ast
from pathlib import Path

KIT = Path(__file__).resolve().parent.parent / "kit"
# NOTE: the standard is ~400 lines per module; the check lists every module over 400 and
# fails only above 450, so that a module a few lines over is reported without blocking
SOFT_LIMIT, HARD_LIMIT = 400, 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(KIT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(KIT.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The kit modules an import statement loads (`from kit.x import y` loads kit.x, or kit.x.y if a module)."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = _resolve(node, module, is_pkg)
        if base is None:
            return out
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    for name in names:
        if name.split(".")[0] != "kit":
            continue
        # the package chain runs too: `import kit.a.b` executes kit/__init__, kit/a/__init__, kit/a/b
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != "kit":
            out.add(name)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: top level, and inside top-level if/try (not TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                stack.extend(node.body)
            stack.extend(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                stack.extend(block)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _module_level_imports(tree):
            deps |= _targets(node, name, is_pkg, known)
        # NOTE: a package's __init__ importing its own submodules is how packages are built, not a cycle
        graph[name] = {d for d in deps if d != name and not (is_pkg and d.startswith(name + "."))}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def local_kit_imports() -> list[str]:
    """`file:line module` of every kit import inside a function or class body."""
    out = []
    mods = _modules()
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for scope in ast.walk(tree):
            if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(scope):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and _targets(node, name, is_pkg, set(mods)):
                    out.append(f"{path.relative_to(KIT.parent)}:{node.lineno} "
                               f"{', '.join(sorted(_targets(node, name, is_pkg, set(mods))))}")
    return sorted(set(out))


def long_modules(limit: int) -> list[str]:
    return [f"{p.relative_to(KIT.parent)}: {n} lines" for p in sorted(KIT.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > limit]


# ------------------------------------------------------------------------------ tests
def test_the_graph_sees_kit_imports():
    graph = import_graph()
    assert "kit.builder" in graph["kit.llm"] and "kit.engine" in graph["kit.builder"]
    assert "kit.builder" not in graph["kit.engine"]  # the engine does not know how it was built


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among kit modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_function_local_kit_import():
    found = local_kit_imports()
    assert not found, "kit modules imported inside functions (import them at the top):\n" + "\n".join(found)


def test_modules_are_short():
    over = long_modules(SOFT_LIMIT)
    if over:
        print("modules over ~400 lines:\n" + "\n".join(over))
    too_long = long_modules(HARD_LIMIT)
    assert not too_long, f"modules over {HARD_LIMIT} lines (split them):\n" + "\n".join(too_long)
