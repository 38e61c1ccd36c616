"""House style, checked on packages: only ``components/registry/`` imports MLflow, only
``components/data/version.py`` imports DVC, nothing in ``components/`` imports Prefect
(``flows/`` does), and the packages import downwards only: nothing below ``components/cli/``
imports it, the registry never imports the pipeline, the detector never the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "components"
# service -> the files (relative to components/, a folder ending in "/") that may import it
OWNERS = {"prefect": (), "mlflow": ("registry/",), "dvc": ("data/version.py",)}
# The layers, lowest first: each may import only itself and those below it. Modules
# directly in components/ (config, errors, decisions) are the base; runtime (device,
# precision, threads) sits on data (it prepares image batches) and under the detector;
# report (inspection pages) draws the detector's overlays and is used by the pipeline;
# export (ONNX/OpenVINO graphs) traces the detector; the registry logs its files.
LAYERS = ["base", "data", "runtime", "detector", "report", "export", "registry", "pipeline",
          "cli"]


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def _imported_modules(path: Path) -> set[str]:
    """Every absolute ``components``/``flows`` module a file imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in ("components", "flows")}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "base"


def _component_files() -> list[Path]:
    return sorted(COMPONENTS.rglob("*.py"))


@pytest.mark.parametrize("package", sorted(OWNERS))
def test_only_the_owning_component_imports_each_service(package: str) -> None:
    importers = {
        path.relative_to(COMPONENTS).as_posix()
        for path in _component_files()
        if package in _imported_roots(path)
    }
    allowed = {
        rel
        for rel in importers
        for owner in OWNERS[package]
        if rel == owner or (owner.endswith("/") and rel.startswith(owner))
    }
    assert importers == allowed, sorted(importers - allowed)


def test_mlflow_and_dvc_have_their_owners() -> None:
    """The rules above are not vacuous: the owners do import their services."""
    registry = {p for p in (COMPONENTS / "registry").glob("*.py") if "mlflow" in _imported_roots(p)}
    assert registry
    assert "dvc" in _imported_roots(COMPONENTS / "data" / "version.py")


def test_packages_import_downwards_only() -> None:
    """A package imports only packages below it in LAYERS (and itself); in particular
    nothing below components/cli/ imports components/cli/."""
    upward = []
    for path in _component_files():
        mine = _layer(".".join(path.relative_to(REPO).with_suffix("").parts))
        for module in _imported_modules(path):
            theirs = _layer(module)
            if theirs == "flows" or LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{path.relative_to(REPO)} ({mine}) imports {module} ({theirs})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from prefect import flow\n    import mlflow.pyfunc\n")
    assert _imported_roots(module) == {"prefect", "mlflow"}


def test_flows_import_prefect() -> None:
    assert "prefect" in _imported_roots(REPO / "flows" / "training.py")
