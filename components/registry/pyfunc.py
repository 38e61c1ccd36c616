"""The served model: an MLflow pyfunc logged *from code* (nothing pickled) whose one
artefact is ``detector.pt`` (state dicts + normalisation statistics + thresholds, loaded
with ``weights_only=True``), with a signature, an input example, pinned requirements and
the ``components`` package as code. Checked file by file before it is registered."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from components.registry.client import Registry, RegistryError, _errors, _mlflow

MODEL_NAME_IN_RUN = "model"  # the logged model's name within its run
DETECTOR_ARTIFACT = "detector"  # key of detector.pt in the pyfunc's artifacts
# Packages the served model imports; pinned to the versions installed here.
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "pyyaml",
    "scikit-learn",
)


def build_pyfunc_model() -> Any:
    """The MLflow ``PythonModel`` serving a ``detector.pt`` (see ``components.registry.serve``).

    Defined inside a function so that importing this module does not import mlflow. The
    logged model's code file calls this and ``set_model``: nothing is pickled.
    """
    mlflow = _mlflow()
    from components.detector.package import load_detector
    from components.errors import DataError
    from components.registry.rest import rest_error
    from components.registry.serve import score_request

    class NestadDetectorModel(mlflow.pyfunc.PythonModel):
        """Scores a table of images (``path`` or ``image_b64`` per row)."""

        def load_context(self, context: Any) -> None:
            self.detector, self.meta = load_detector(Path(context.artifacts[DETECTOR_ARTIFACT]))

        # A DataFrame hint tells MLflow not to derive a second signature from hints.
        def predict(
            self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
        ) -> pd.DataFrame:
            params = params or {}
            try:
                return score_request(
                    self.detector, self.meta, model_input,
                    threshold=params.get("threshold") or None, maps=bool(params.get("maps")),
                    limits=getattr(self, "limits", None),  # nestad serve sets serve.*
                )
            except DataError as exc:  # a 4xx JSON answer naming the row, not a traceback
                raise rest_error(exc) from None

    return NestadDetectorModel()


_MODEL_CODE = '''"""MLflow models-from-code entry point of a nestad detector (nothing pickled)."""
from mlflow.models import set_model

from components.registry.pyfunc import build_pyfunc_model

set_model(build_pyfunc_model())
'''


def _public_version(dist: str) -> str:
    return metadata.version(dist).split("+", 1)[0]  # torch 2.13.0+cpu -> 2.13.0


def serving_requirements() -> list[str]:
    """Pinned pip requirements of the served model (the versions installed here)."""
    return [f"{dist}=={_public_version(dist)}" for dist in SERVING_REQUIREMENTS]


def _signature(threshold: str) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from components.registry.serve import INPUT_COLUMNS, MAP_COLUMN

    # MLflow passes predict only the params its ParamSchema declares (others are dropped
    # with a warning), so every request parameter is declared here.
    return ModelSignature(
        inputs=Schema([ColSpec("string", c, required=False) for c in INPUT_COLUMNS]),
        outputs=Schema(
            [
                ColSpec("double", "score"),
                ColSpec("double", "normalised_score"),
                ColSpec("boolean", "is_anomaly"),
                ColSpec("string", MAP_COLUMN, required=False),  # only with maps=true
            ]
        ),
        params=ParamSchema(
            [ParamSpec("threshold", "string", threshold), ParamSpec("maps", "boolean", False)]
        ),
    )


def log_pyfunc(reg: Registry, run_id: str, detector_file: Path,
               exports: dict[str, Path] | None = None) -> tuple[str, str]:
    """Log ``detector_file`` as the run's pyfunc model, with the verified ``exports``
    (backend -> folder) under ``artifacts/export/``; return (model URI, model id).

    The logged files are checked (MLmodel, requirements, code, the detector's size)
    before this returns, so a registered version is never missing an artefact.
    """
    from components.detector.package import load_detector
    from components.registry.exports import EXPORT_ARTIFACT, export_files, stage_exports
    from components.registry.serve import example_request

    mlflow = _mlflow(reg.cfg)
    _, meta = load_detector(detector_file)
    package = Path(__file__).resolve().parents[1]  # the whole components package
    with tempfile.TemporaryDirectory(prefix="nestad-pyfunc-") as tmp:
        code_dir = Path(tmp) / "components"
        code_dir.mkdir()
        for file in sorted(package.rglob("*.py")):  # sources only, no caches
            dest = code_dir / file.relative_to(package)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, dest)
        model_code = Path(tmp) / "nestad_model.py"
        model_code.write_text(_MODEL_CODE)
        artifacts = {DETECTOR_ARTIFACT: str(detector_file)}
        if exports:
            artifacts[EXPORT_ARTIFACT] = str(stage_exports(exports, Path(tmp)))
        with _errors(reg, f"logging the model of run {run_id}"):
            with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch "+cpu" label, integer-schema hints
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME_IN_RUN,
                    python_model=str(model_code),
                    artifacts=artifacts,
                    code_paths=[str(code_dir)],
                    signature=_signature(meta["threshold"]),
                    input_example=example_request(meta["image_size"], meta["channels"]),
                    pip_requirements=serving_requirements(),
                    metadata={
                        "nestad_format": meta["format"],
                        "image_size": meta["image_size"],
                        "channels": meta["channels"],
                        "threshold": meta["threshold"],
                        "generator": meta["model"]["name"],
                        "exports": sorted(exports or {}),
                    },
                )
            _verify_model(
                reg,
                info.model_id,
                detector_file,
                [f"code/components/{f.relative_to(code_dir).as_posix()}"
                 for f in code_dir.rglob("*.py")],
                export_files(exports or {}),
            )
    return info.model_uri, info.model_id


def _verify_model(reg: Registry, model_id: str, detector_file: Path, code_files: list[str],
                  sized: dict[str, int] | None = None) -> None:
    """Raise unless the logged model is READY and holds every file it needs (those in
    ``sized`` with that many bytes)."""
    model = reg.client.get_logged_model(model_id)
    if str(model.status).upper().split(".")[-1] != "READY":
        raise RegistryError(f"logged model {model_id} is {model.status}, not READY")
    found: dict[str, int | None] = {}
    pending = [""]
    while pending:
        for info in reg.client.list_logged_model_artifacts(model_id, pending.pop() or None):
            if info.is_dir:
                pending.append(info.path)
            else:
                found[info.path] = info.file_size
    expected = {
        "MLmodel": None,
        "requirements.txt": None,
        f"artifacts/{detector_file.name}": detector_file.stat().st_size,
        **dict.fromkeys(code_files),
        **(sized or {}),
    }
    missing = [p for p in expected if p not in found]
    if missing:
        raise RegistryError(f"logged model {model_id} lacks {', '.join(sorted(missing))}")
    wrong = [p for p, size in (sized or {}).items() if found[p] not in (None, size)]
    if wrong:
        raise RegistryError(f"logged model {model_id}: {', '.join(sorted(wrong))} "
                            "differ in size from the files logged")
    detector_path = f"artifacts/{detector_file.name}"
    if found[detector_path] not in (None, expected[detector_path]):
        raise RegistryError(
            f"logged model {model_id}: {detector_path} has "
            f"{found[detector_path]} bytes, expected {expected[detector_path]}"
        )
