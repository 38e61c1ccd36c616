"""OpenVINO IR (``model.xml`` + ``model.bin``): converted from the ONNX graph, weights
kept fp32, run on CPU with fp32 inference precision.

OpenVINO picks bf16 by itself on CPUs with bf16 units; the check and the scorer ask for
f32 (``INFERENCE_PRECISION_HINT``), so the verified graph is the one that runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.export.graph import INPUT_NAME, OUTPUT_NAMES
from components.export.metadata import ExportError


def export_openvino(onnx_path: Path, path: Path) -> Path:
    """Convert ``onnx_path`` to ``path`` (.xml, with its .bin beside it), names kept."""
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
        for port, name in zip(model.outputs, OUTPUT_NAMES, strict=True):
            port.get_tensor().set_names({name})  # ONNX output names can be lost on fusion
        model.inputs[0].get_tensor().set_names({INPUT_NAME})
        ov.save_model(model, str(path), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001 - conversion raises many types
        raise ExportError(f"{path}: OpenVINO conversion failed ({str(exc).splitlines()[0]})"
                          ) from None
    return path


def openvino_runner(path: Path, threads: int | None = None):  # noqa: ANN201 - a callable
    """A function uint8 ``(N, H, W, C)`` -> {output name: array}, running ``path`` on CPU."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{path}: OpenVINO cannot load it ({str(exc).splitlines()[0]})"
                          ) from None
    ports = [compiled.output(name) for name in OUTPUT_NAMES]
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        result = request.infer({INPUT_NAME: np.ascontiguousarray(images)})
        return {name: np.asarray(result[port]).copy() for name, port in
                zip(OUTPUT_NAMES, ports, strict=True)}

    return run
