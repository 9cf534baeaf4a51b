"""The package's layers, enforced: each module imports only its own layer and the ones below it.

    core  <  indexer  <  retrieval  <  align  <  vqa  <  cli.py, shapes.py, serve/

`core` is the shared machinery; the four features are ordered by what they build on (an index is
searched, a search is re-ranked, questions are answered from both). docs/ARCHITECTURE.md says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vqa_search

PACKAGE = Path(vqa_search.__file__).parent
LAYERS = ["core", "indexer", "retrieval", "align", "vqa", "app"]


def _layer(module: str) -> str:
    """'vqa_search.retrieval.searcher' -> 'retrieval'; top-level modules (cli, shapes) and the server
    package (serve/) are the app."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "app"


def _imported(tree: ast.AST) -> set[str]:
    """Every vqa_search module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("vqa_search.")}


def _modules() -> dict[str, set[str]]:
    return {"vqa_search." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts): _imported(
        ast.parse(path.read_text(encoding="utf-8"))) for path in PACKAGE.rglob("*.py")}


def upward_imports(modules: dict[str, set[str]]) -> list[str]:
    rank = {layer: position for position, layer in enumerate(LAYERS)}
    return sorted(f"{module} imports {target}" for module, targets in modules.items() for target in targets
                  if target != "vqa_search.__version__" and rank[_layer(target)] > rank[_layer(module)])


def test_every_import_points_down():
    assert upward_imports(_modules()) == []


def test_the_check_sees_an_upward_import():
    assert upward_imports({"vqa_search.core.models": {"vqa_search.indexer.build.BuildConfig"}}) == [
        "vqa_search.core.models imports vqa_search.indexer.build.BuildConfig"]
    assert upward_imports({"vqa_search.retrieval.searcher": {"vqa_search.indexer.build.build_index"}}) == []


def test_the_server_is_the_app_and_only_the_cli_imports_it():
    assert _layer("vqa_search.serve.app") == "app"
    importers = sorted(module for module, targets in _modules().items()
                       if any(target.startswith("vqa_search.serve") for target in targets)
                       and not module.startswith("vqa_search.serve"))
    assert importers == ["vqa_search.cli"]
