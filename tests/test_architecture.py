"""The package's shape: imports run one way (no cycle), and nothing below the trainer reaches up into it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the installed package name (hub/ installs as lora_grpo.hub)
PACKAGES = {ROOT / "lora_grpo": "lora_grpo", ROOT / "hub": "lora_grpo.hub"}


def module_name(path: Path) -> str:
    for folder, package in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join((package, *parts))
    raise ValueError(path)


def modules() -> dict[str, Path]:
    return {module_name(p): p for folder in PACKAGES for p in folder.rglob("*.py")}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Every project module `path` imports, at module level or inside functions (both count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
        for target in targets:
            # the longest project module the target names (a module, or a name inside one)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from lora_grpo.train import Trainer\n    from . import grpo\n")
    known = {"lora_grpo.train", "lora_grpo.grpo", "lora_grpo.evaluation.m"}
    assert imported(source, "lora_grpo.evaluation.m", known) == {"lora_grpo.train"}
    source.write_text("from .. import grpo\nimport lora_grpo.rollout as r\n")
    known |= {"lora_grpo.rollout"}
    assert imported(source, "lora_grpo.evaluation.m", known) == {"lora_grpo.grpo", "lora_grpo.rollout"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert "lora_grpo.train" in graph and "lora_grpo.hub.export" in graph
    assert "lora_grpo.rollout" in graph["lora_grpo.train"]
    assert find_cycle(graph) is None, find_cycle(graph)


def test_evaluation_toyworld_and_hub_never_import_the_trainer():
    graph = import_graph()
    below = [
        n for n in graph if n.startswith(("lora_grpo.evaluation", "lora_grpo.toyworld", "lora_grpo.hub"))
    ]
    assert len(below) > 15
    offenders = {n: sorted(t for t in graph[n] if t == "lora_grpo.train") for n in below}
    assert not any(offenders.values()), offenders
    # and nothing but the CLI and its commands imports the hub (the hub depends on the library, not the reverse)
    library = [n for n in graph if not n.startswith(("lora_grpo.hub", "lora_grpo.cli", "lora_grpo.commands"))]
    assert not [n for n in library if any(t.startswith("lora_grpo.hub") for t in graph[n])]


def test_the_readme_layout_lists_modules_in_import_order():
    """The README's layout says imports run from the top of its list to the bottom: check it against the code,
    so the list stays true as modules move."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    listed = [
        m.removesuffix(".py").replace("/", ".")
        for m in re.findall(r"^\s{4}lora_grpo/([\w/]+?(?:\.py)?)/?\s", layout, re.M)
    ]
    order = {f"lora_grpo.{name}": i for i, name in enumerate(listed)}
    assert len(order) > 20, listed

    def position(module: str) -> int | None:
        while module and module not in order:
            module = module.rpartition(".")[0]
        return order.get(module)

    graph = import_graph()
    upward = [
        (name, target)
        for name, targets in graph.items()
        for target in targets
        if (a := position(name)) is not None and (b := position(target)) is not None and b < a
    ]
    assert not upward, f"imports that run up the README's list: {upward}"


def test_no_function_is_longer_than_sixty_lines():
    """Small functions with one job each: a function that grows past 60 lines has parts to name."""
    long = [
        f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in modules().values()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60
    ]
    assert not long, long
