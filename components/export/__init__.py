"""Exported detectors: one ONNX or OpenVINO graph from uint8 images to scores and maps,
checked against the PyTorch path before anything is written, with its metadata beside it.

Sits on the detector (it traces ``AnomalyDetector``) and under the registry, which logs
the files, and the pipeline, which scores with them.
"""
