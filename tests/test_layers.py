"""The import graph of mistral_jax/ against docs/DESIGN.md's folder table ("Layers"): every module
sits in a folder (subpackage) and is listed in its row once; a folder imports exactly the folders
its row names, all above it; a module imports only modules of those folders and the modules
listed before it in its own row; no mistral_jax import is made inside a function, and no module
of the library imports the package's lazy public names (mistral_jax/__init__.py) instead of
their modules."""

import ast
import os
import re

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "mistral_jax")


def modules_on_disk() -> dict[str, list[str]]:
    """folder -> its modules (no __init__); the package root as ""."""
    found: dict[str, list[str]] = {}
    for root, _, files in os.walk(PACKAGE):
        folder = os.path.relpath(root, PACKAGE).replace(os.sep, "/")
        if "__pycache__" in folder:
            continue
        modules = sorted(f[:-3] for f in files if f.endswith(".py") and f != "__init__.py")
        if modules or folder == ".":
            found["" if folder == "." else folder] = modules
    return found


def imports_of(folder: str, module: str) -> tuple[set[tuple[str, str]], list[str]]:
    """((folder, module) of each mistral_jax module imported, the imports made inside a function).
    The top-level package's public names count as ("", name)."""
    tree = ast.parse(open(os.path.join(PACKAGE, folder, module + ".py")).read())
    inside = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    found, local = set(), []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mistral_jax":
            parts = node.module.split(".")[1:]
            if len(parts) == 2:  # from mistral_jax.folder.module import name
                targets = [tuple(parts)]
            elif len(parts) == 1:  # from mistral_jax.folder import module
                targets = [(parts[0], alias.name) for alias in node.names]
            else:  # from mistral_jax import name
                targets = [("", alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [tuple(a.name.split(".")[1:3]) for a in node.names if a.name.startswith("mistral_jax.")]
        found.update(targets)
        if targets and id(node) in inside:
            local.append(ast.unparse(node))
    return found - {(folder, module)}, local


def documented_layers() -> list[tuple[str, list[str], set[str]]]:
    """The rows of docs/DESIGN.md's folder table, top to bottom: (folder, its modules in order,
    the folders it imports)."""
    text = open(os.path.join(REPO, "docs", "DESIGN.md")).read().split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+/`", cells[0]):
            rows.append((cells[0].strip("`/"), re.findall(r"`(\w+)`", cells[1]), set(re.findall(r"\w+", cells[3]))))
    return rows


LAYERS = documented_layers()


def test_every_module_is_in_a_folder_and_in_the_table():
    on_disk = modules_on_disk()
    assert on_disk.pop("") == [], "a module outside a subpackage"
    assert {folder: sorted(modules) for folder, modules, _ in LAYERS} == on_disk
    for folder in on_disk:
        assert os.path.isfile(os.path.join(PACKAGE, folder, "__init__.py")), folder


@pytest.mark.parametrize("row", range(len(LAYERS)), ids=[folder for folder, _, _ in LAYERS])
def test_imports_follow_the_documented_layers(row):
    folder, modules, documented = LAYERS[row]
    above = {f for f, _, _ in LAYERS[:row]}
    imported_folders = set()
    for position, module in enumerate(modules):
        imported, local = imports_of(folder, module)
        assert not local, f"{folder}/{module} imports {local} inside a function"
        for target_folder, target in imported:
            assert target_folder, f"{folder}/{module} imports mistral_jax's public name {target}: import its module"
            where = f"{folder}/{module} imports {target_folder}/{target}"
            if target_folder == folder:
                assert target in modules[:position], f"{where}, which is not before it in its row"
            else:
                assert target_folder in above, f"{where}, whose folder is not above {folder}/"
                imported_folders.add(target_folder)
    assert imported_folders == documented, folder


def test_the_public_names_import():
    """Every name mistral_jax exports resolves to its module's object (the lazy table is right)."""
    import importlib

    import mistral_jax

    for name in mistral_jax.__all__:
        assert getattr(mistral_jax, name) is getattr(importlib.import_module(
            f"mistral_jax.{mistral_jax._PUBLIC[name]}"), name)


def test_the_readme_imports():
    """Every mistral_jax import in the README's Python examples works as written."""
    readme = open(os.path.join(REPO, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    imports = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
               if re.match(r"(from|import) mistral_jax\b", line)]
    assert len(imports) >= 3
    for line in imports:
        exec(line, {})
