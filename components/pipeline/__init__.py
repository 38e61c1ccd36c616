"""Project orchestration without Prefect: the stage functions every ``nestad`` command,
DVC stage and flow runs (``stages``), and the project-level steps the flows wire
(``workflow``: run one DVC stage, read the validation verdict, the data and model states).

May import data, detector, registry, decisions and config/errors; not the cli (the flows
pass the CLI's in-process stage runner in).
"""
