"""House style, checked: components never import Prefect; one module talks to MLflow
(tracking.py) and one to DVC (versioning.py); Prefect lives in flows/ only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OWNERS = {"prefect": None, "mlflow": "tracking.py", "dvc": "versioning.py"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(OWNERS))
def test_only_the_owning_component_imports_each_service(package: str) -> None:
    importers = {
        path.name
        for path in sorted((REPO / "components").glob("*.py"))
        if package in _imported_roots(path)
    }
    owner = OWNERS[package]
    assert importers == ({owner} if owner else set()), importers


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from prefect import flow\n    import mlflow.pyfunc\n")
    assert _imported_roots(module) == {"prefect", "mlflow"}


def test_flows_import_prefect() -> None:
    assert "prefect" in _imported_roots(REPO / "flows" / "training.py")
