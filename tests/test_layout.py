"""The package layout DESIGN.md draws: each top-level folder is one room. A stage (data_prep, train, eval, export)
imports only itself and the core (distill); the core imports only itself; nothing imports the launcher (cli); conf/
holds no Python. And no two modules import each other, however indirectly. A small AST walk over every import
statement (function-level ones included) finds the edges."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("distill", "data_prep", "train", "eval", "export", "cli")
STAGES = ("data_prep", "train", "eval", "export")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "specdistill." + ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every specdistill module `path` imports (a `from package import name` counts as package.name when that is a
    module of ours, else as package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("specdistill.")}


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {imported for imported in imported_modules(path) if imported in modules and imported != name}
    return graph


def room(module: str) -> str:
    return module.split(".")[1]


def allowed(source: str, target: str) -> bool:
    """May a module in room `source` import one in room `target`?"""
    if target == "cli":
        return source == "cli"
    if source == "cli":
        return True
    return target in (source, "distill")


def test_the_rule_itself():
    assert allowed("train", "distill") and allowed("cli", "train") and allowed("eval", "eval")
    assert not allowed("train", "eval") and not allowed("distill", "train") and not allowed("export", "cli")


def test_no_stage_imports_another_stage_and_nothing_imports_cli():
    wrong = [f"{module} → {imported}" for module, imports in package_graph().items() for imported in imports
             if not allowed(room(module), room(imported))]
    assert not wrong, "wrong-way imports (DESIGN.md: Layout):\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = package_graph()
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" → ".join(stack[stack.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, stack + [imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_conf_holds_no_python():
    assert not list((ROOT / "conf").rglob("*.py"))
