"""The layout the README describes: every grpo/ module listed in its package docstring, no import cycles, no
function in train.py or grpo/ longer than 80 lines, and train.py's loop near the top (README, "Layout")."""
import ast
from pathlib import Path

import grpo

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("grpo", "rewards", "data", "bench") for p in sorted((ROOT / d).glob("*.py"))] + \
    [ROOT / "train.py", ROOT / "eval.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[1:] if parts[0] == "bench" else parts          # bench scripts import each other by bare name
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_import_cycles():
    modules = {module_name(p): p for p in SOURCES}
    graph = {m: {d for d in imports(p) if d in modules and d != m} for m, p in modules.items()}

    def reaches(start, target, seen):
        return any(d == target or (d not in seen and not seen.add(d) and reaches(d, target, seen))
                   for d in graph[start])
    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_every_grpo_module_is_listed_in_the_package_docstring():
    listed = {line.split()[0] for line in grpo.__doc__.splitlines() if line.startswith("    ")}
    modules = {p.name for p in (ROOT / "grpo").glob("*.py") if p.name != "__init__.py"}
    assert modules <= listed, f"not in grpo/__init__.py's docstring: {sorted(modules - listed)}"


def test_no_long_functions_and_the_loop_near_the_top():
    for path in [ROOT / "train.py", *sorted((ROOT / "grpo").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 80, f"{path.name}: {node.name} is longer than 80 lines"
    tree = ast.parse((ROOT / "train.py").read_text())
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.For))
    assert loop.lineno < 200 and loop.end_lineno - loop.lineno + 1 <= 60
