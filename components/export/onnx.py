"""ONNX: trace the export graph with ``torch.onnx.export`` and run it with onnxruntime.

The legacy TorchScript exporter (``dynamo=False``) comes first: it handles the nested
networks, top-k and reflect padding at opset 17 in about two seconds; the dynamo exporter
is the fallback. The batch axis is dynamic.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from components.export.graph import INPUT_NAME, OUTPUT_NAMES, ExportGraph
from components.export.metadata import ExportError

OPSET = 17


def export_onnx(graph: ExportGraph, sample: torch.Tensor, path: Path) -> Path:
    """Write ``graph`` traced on ``sample`` to ``path`` (checked with ``onnx.checker``)."""
    import onnx

    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # tracer and shape-inference notices
                kwargs = ({"dynamic_axes": axes} if not dynamo else
                          {"dynamic_shapes": {INPUT_NAME: {0: torch.export.Dim("batch")}}})
                torch.onnx.export(graph, (sample,), str(path), dynamo=dynamo,
                                  input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                  opset_version=OPSET, **kwargs)
            onnx.checker.check_model(str(path))
            return path
        except Exception as exc:  # noqa: BLE001 - either exporter may fail in many ways
            errors.append(f"{'dynamo' if dynamo else 'legacy'}: {str(exc).splitlines()[0]}")
    raise ExportError(f"{path}: ONNX export failed ({'; '.join(errors)})")


def onnx_runner(path: Path, threads: int | None = None):  # noqa: ANN201 - a callable
    """A function uint8 ``(N, H, W, C)`` -> {output name: array}, running ``path`` on CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})"
                          ) from None

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        outs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images)})
        return dict(zip(OUTPUT_NAMES, outs, strict=True))

    return run
