"""The MLflow side: tracking runs, the pyfunc model, registering versions, promotion
under a lock, lineage queries, and the served model's request handling.

The only package that imports ``mlflow`` (inside functions: nothing at import time). May
import ``components.data``, ``components.detector``, ``components.decisions`` and
config/errors; never the pipeline or the cli.
"""
