"""fedtide's size limits: no function over 60 lines, no module over 400 (issue 21: one job per part)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedtide"
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 400


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split by job: {long}"


def test_no_function_over_60_lines():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.name}"] = lines
    assert not long, f"split into named steps: {long}"


def test_at_most_six_loose_modules_and_the_readme_maps_every_module():
    """One `ls fedtide` shows the layers, and the README's module map names each module under its folder."""
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(loose) <= 6, loose
    text = (PACKAGE.parent / "README.md").read_text()
    block = text[text.index("## Layout") :]
    block = block[block.index("```\n") + 4 : block.index("\n```", block.index("```\n") + 4)]
    mapped, folder = set(), None
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        if line.startswith("fedtide/") and name.endswith("/"):
            folder = name
        elif not line.startswith(("fedtide/", "  ")):
            folder = None  # examples/, docs/, scripts/
        elif line.startswith("fedtide/"):
            mapped.add(name)
        elif line.startswith("  ") and folder and name.endswith(".py"):
            mapped.add(folder + name)
    modules = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert modules == mapped, f"missing from the map: {modules - mapped}; mapped but gone: {mapped - modules}"
