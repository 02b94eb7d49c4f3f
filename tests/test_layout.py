"""The layering of docs/architecture.md, checked on the source: no private name imported across files,
no import cycle among the package's modules (imports inside functions, kept for optional extras, aside)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sf_dist"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports():
    """(importing module, imported module, names, top level?) for every sf_dist-internal import."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                if target.split(".")[0] == "sf_dist":
                    yield name, target, [a.name for a in node.names], id(node) in top, modules


def test_no_private_name_is_imported_across_files():
    crossing = [f"{src} imports {n} from {dst}" for src, dst, names, _, _ in _imports()
                for n in names if n.startswith("_") and not n.startswith("__") and dst != src]
    assert not crossing, crossing


def test_top_level_imports_have_no_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst, names, top, modules in _imports():
        if not top:
            continue
        targets = {f"{dst}.{n}" if f"{dst}.{n}" in modules else dst for n in names}
        graph.setdefault(src, set()).update(t for t in targets if t != src and t in modules)
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodules is how packages are built
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in sorted(graph):
        visit(node)
