"""The import graph of mistral_jax/ against the table in docs/DESIGN.md ("Layers"): each module
imports only modules above it, no cycle, and no mistral_jax import inside a function."""

import ast
import os
import re

from conftest import REPO

PACKAGE = os.path.join(REPO, "mistral_jax")


def imports_of(module: str) -> tuple[set[str], list[str]]:
    """(the mistral_jax modules a module imports, those of its imports made inside a function)."""
    tree = ast.parse(open(os.path.join(PACKAGE, module + ".py")).read())
    inside = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    found, local = set(), []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "mistral_jax":
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mistral_jax."):
            names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("mistral_jax.")]
        found.update(names)
        if names and id(node) in inside:
            local.append(ast.unparse(node))
    return found - {module}, local


def documented_layers() -> list[tuple[list[str], set[str]]]:
    """The rows of docs/DESIGN.md's layer table, top to bottom: (modules, what they import)."""
    text = open(os.path.join(REPO, "docs", "DESIGN.md")).read().split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows.append((re.findall(r"`(\w+)`", cells[0]), set(re.findall(r"\w+", cells[1]))))
    return rows


def test_imports_follow_the_documented_layers():
    modules = {f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py") and f != "__init__.py"}
    rows = documented_layers()
    assert sorted(m for names, _ in rows for m in names) == sorted(modules)  # every module, once
    above: set[str] = set()
    for names, documented in rows:
        for module in names:
            imported, local = imports_of(module)
            assert imported == documented, module
            assert imported <= above, f"{module} imports {imported - above}, which are not above it"
            assert not local, f"{module} imports {local} inside a function"
        above.update(names)
