"""nestad's components: everything the workflow does, without Prefect.

One folder per concern, read bottom-up: ``config``/``errors``/``decisions`` (imported by
all, import nothing of nestad but each other), ``data/``, ``runtime`` (device, precision,
threads; shared by training and scoring), ``detector/`` (may import data and runtime),
``registry/`` (may import data and detector; the only package importing
MLflow), ``pipeline/`` (stage functions and project steps over all of these) and ``cli/``
(the ``nestad`` commands, the top: nothing else in components imports it).
"""
