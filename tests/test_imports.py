"""Imports point one way (DESIGN.md): core <- runtime <- data/models <- rollout <- trainers/annotate/eval <- pipeline
<- cli, and no module imports itself back through others. Every import counts, also those inside functions."""

import ast
from pathlib import Path

import rlhfkit

PACKAGE = Path(rlhfkit.__file__).parent

# Rank of each room: a module may import modules of its own rank or below, never above.
RANKS = {
    "errors": 0, "config": 0, "host_memory": 0,  # leaves: plain Python, no rlhfkit imports
    "core": 1,
    "runtime": 2,
    "data": 3, "models": 3, "track": 3,
    "rollout": 4,
    "trainers": 5, "annotate": 5, "eval": 5, "label": 5, "plan": 5,  # plan: shapes and bytes, no trainers
    "config_parsing": 6, "pipeline": 6,
    "cli": 7, "mlrun_functions": 7,  # MLRun handlers run stages as the CLI does
    "__main__": 8, "__init__": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rlhfkit")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("rlhfkit"):
                found.add(name)
                # `from rlhfkit.runtime import checkpoint` imports the module rlhfkit.runtime.checkpoint
                found |= {f"{name}.{a.name}" for a in node.names if (PACKAGE.parent / f"{name}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_room_has_a_rank():
    assert {room(m) for m in graph()} <= set(RANKS)


def test_imports_point_down_the_rooms():
    wrong = [f"{m} ({room(m)}) imports {d} ({room(d)})" for m, deps in graph().items() for d in deps
             if RANKS[room(d)] > RANKS[room(m)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules_or_rooms():
    modules = graph()
    rooms: dict[str, set[str]] = {}
    for m, deps in modules.items():
        rooms.setdefault(room(m), set()).update(room(d) for d in deps if room(d) != room(m))
    for edges in (modules, rooms):
        state: dict[str, int] = {}

        def visit(node, path):
            state[node] = 1
            for nxt in sorted(edges.get(node, ())):
                if state.get(nxt) == 1:
                    raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
                if nxt not in state:
                    visit(nxt, path + [nxt])
            state[node] = 2

        for start in sorted(edges):
            if start not in state:
                visit(start, [start])


def test_the_checker_sees_imports_inside_functions_and_relative_ones():
    # models/loading.py imports the tiny and embedded models inside a function, lazily
    assert {"rlhfkit.models.tiny", "rlhfkit.models.embedded"} <= graph()["rlhfkit.models.loading"]
    assert "rlhfkit.runtime.checkpoint" in graph()["rlhfkit.runtime.output_dir"]
    assert sum(len(deps) for deps in graph().values()) > 100  # the whole package was read
