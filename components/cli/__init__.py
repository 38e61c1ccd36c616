"""The ``nestad`` command groups: train/evaluate/score (``app``), data (``data``) and
registry (``registry``) commands, and the in-process stage runner.

The top of ``components``: it may import every other package; nothing else in
``components`` imports it (``flows`` may).
"""
