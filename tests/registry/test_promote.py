"""Promotion: the gate's truth table, alias moves and their records, racing promotions."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from mlflow_support import (
    PYTHON,
    Project,
    quiet_env,
    race_gated_promotions,
    registered_project,
    write_params,
)

from components.decisions import (
    CANDIDATE,
    PRODUCTION,
    STAGING,
    VersionFigures,
    check_transition,
    decide_promotion,
)

METRIC = "leak_free.auroc"
SAME, OTHER = "e" * 64, "f" * 64


def _fig(version: str, value: float | None, data: str | None = SAME) -> VersionFigures:
    return VersionFigures(version, {} if value is None else {METRIC: value}, data)


# --- the gate: a pure function ----------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "production", "margin", "higher", "promote", "why"),
    [
        (_fig("2", 0.80), None, 0.0, True, True, "no production version yet"),
        (_fig("2", None), None, 0.0, True, False, "has no finite"),
        (_fig("2", math.nan), None, 0.0, True, False, "has no finite"),
        # a NaN (a one-class test split) or infinite figure never passes, either direction
        (_fig("2", math.nan), _fig("1", 0.70), 0.0, True, False, "candidate version 2 has no"),
        (_fig("2", math.nan), _fig("1", 0.70), 0.0, False, False, "candidate version 2 has no"),
        (_fig("2", math.inf), _fig("1", 0.70), 0.0, True, False, "candidate version 2 has no"),
        (_fig("2", -math.inf), _fig("1", 0.70), 0.0, False, False, "candidate version 2 has no"),
        (_fig("2", 0.80), _fig("1", math.nan), 0.0, True, False, "production version 1 has no"),
        (_fig("2", 0.80), _fig("1", 0.70), 0.0, True, True, "higher by"),
        (_fig("2", 0.80), _fig("1", 0.80), 0.0, True, False, "not higher"),  # a tie never wins
        (_fig("2", 0.70), _fig("1", 0.80), 0.0, True, False, "not higher"),
        (_fig("2", 0.80), _fig("1", 0.70), 0.25, True, False, "margin 0.25"),
        (_fig("2", 0.80), _fig("1", 0.50), 0.25, True, True, "> margin 0.25"),
        (_fig("2", 0.10), _fig("1", 0.30), 0.0, False, True, "lower by"),  # e.g. an error rate
        (_fig("2", 0.30), _fig("1", 0.10), 0.0, False, False, "not lower"),
        (_fig("2", 0.90), _fig("1", 0.10, OTHER), 0.0, True, False, "different data"),
        (_fig("2", 0.90), _fig("1", 0.10, None), 0.0, True, False, "unknown"),
        (_fig("2", 0.90, None), _fig("1", 0.10), 0.0, True, False, "unknown"),
        (_fig("2", 0.90), _fig("1", None), 0.0, True, False, "production version 1 has no"),
        (_fig("1", 0.90), _fig("1", 0.90), 0.0, True, False, "already production"),
    ],
)
def test_gate_truth_table(
    candidate: VersionFigures,
    production: VersionFigures | None,
    margin: float,
    higher: bool,
    promote: bool,
    why: str,
) -> None:
    decision = decide_promotion(candidate, production, METRIC, margin, higher)
    assert decision.promote is promote
    assert why in decision.reason
    assert decision.metric == METRIC and decision.margin == margin
    if production is not None and production.version != candidate.version:
        assert decision.production_version == production.version


def test_gate_rejects_a_negative_margin() -> None:
    with pytest.raises(ValueError, match="margin"):
        decide_promotion(_fig("2", 0.8), None, METRIC, margin=-0.1)


@pytest.mark.parametrize(
    ("target", "holds", "force", "allowed"),
    [
        (STAGING, {CANDIDATE}, False, True),
        (STAGING, set(), False, False),
        (STAGING, set(), True, True),
        (PRODUCTION, {STAGING}, False, True),
        (PRODUCTION, {CANDIDATE}, False, False),
        (PRODUCTION, {CANDIDATE}, True, True),
        (PRODUCTION, {PRODUCTION}, True, False),  # already there, even forced
        ("archived", {STAGING}, True, False),
    ],
)
def test_stage_order(target: str, holds: set[str], force: bool, allowed: bool) -> None:
    assert (check_transition(target, holds, force) is None) is allowed


# --- alias moves on a real (SQLite) registry ----------------------------------------------


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Project, Any]]:
    """The session's registered project (version 1 of a real logged pyfunc model)."""
    from components.registry.client import open_registry

    with quiet_env(tmp_path_factory.mktemp("promotion")):
        project = registered_project(tmp_path_factory).project
        yield project, open_registry(project.params.registry, project.root)


def _model(reg: Any, name: str, **gate: Any) -> Any:
    """The same store with another registered model name (and gate settings)."""
    return dataclasses.replace(reg, cfg=reg.cfg.model_copy(update={"model_name": name, **gate}))


def _add_version(reg: Any, base: Any, value: float, data: str = SAME) -> str:
    """A new version of ``reg.name`` reusing ``base``'s logged model, with its own run
    holding ``METRIC = value`` and evaluation-data version ``data``; it becomes candidate."""
    from mlflow.entities import Metric

    client = reg.client
    run = client.create_run(client.get_run(base.run_id).info.experiment_id)
    client.log_batch(run.info.run_id, metrics=[Metric(METRIC, value, 0, 0)])
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name='{reg.name}'"):
        client.create_registered_model(reg.name)
    mv = client.create_model_version(
        reg.name, base.source, run_id=run.info.run_id, tags={"nestad.eval_data_version": data}
    )
    client.set_registered_model_alias(reg.name, CANDIDATE, mv.version)
    return str(mv.version)


def _transitions(reg: Any, version: str) -> list[dict[str, Any]]:
    tags = reg.client.get_model_version(reg.name, version).tags
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith("nestad.transition.")]


def _holders(reg: Any, alias: str) -> list[str]:
    """Every version whose own record lists ``alias`` (must be at most one)."""
    versions = reg.client.search_model_versions(f"name='{reg.name}'")
    return [
        str(v.version)
        for v in versions
        if alias in reg.client.get_model_version(reg.name, v.version).aliases
    ]


def test_registered_version_is_candidate(registered: tuple[Project, Any]) -> None:
    _, reg = registered
    mv = reg.client.get_model_version_by_alias(reg.name, CANDIDATE)
    first = _transitions(reg, mv.version)[0]
    assert first["to"] == CANDIDATE and first["from"] is None
    assert first["by"] and first["at"] and "registered from run" in first["why"]


def test_aliases_move_through_stages_and_every_move_is_recorded(
    registered: tuple[Project, Any],
) -> None:
    from components.registry.client import RegistryError
    from components.registry.promote import promote, promote_auto

    _, base_reg = registered
    base = base_reg.client.get_model_version_by_alias(base_reg.name, CANDIDATE)
    reg = _model(base_reg, "stages", gate_margin=0.05)
    v1 = _add_version(reg, base, 0.70)
    with pytest.raises(RegistryError, match="must be staging before production"):
        promote(reg, PRODUCTION, v1)
    assert promote(reg, STAGING).version == v1  # default: the candidate
    assert promote(reg, PRODUCTION).promoted  # default: the staging version; first one
    assert _holders(reg, PRODUCTION) == [v1] and not _holders(reg, STAGING)

    v2 = _add_version(reg, base, 0.80)  # better by 0.10 > margin 0.05
    steps = promote_auto(reg, reason="nightly gate")
    assert [(s.target, s.promoted) for s in steps] == [(STAGING, True), (PRODUCTION, True)]
    assert steps[1].replaced == v1 and steps[1].decision.production_value == 0.70
    assert _holders(reg, PRODUCTION) == [v2] and not _holders(reg, CANDIDATE)
    moves = _transitions(reg, v2)
    assert [(m["from"], m["to"]) for m in moves] == [(CANDIDATE, STAGING), (STAGING, PRODUCTION)]
    assert moves[1]["why"].startswith("nightly gate")
    assert moves[1]["gate"]["candidate_value"] == 0.80 and moves[1]["replaced"] == v1
    last = _transitions(reg, v1)[-1]
    assert (last["from"], last["to"], last["why"]) == (
        PRODUCTION,
        None,
        f"replaced by version {v2}",
    )

    v3 = _add_version(reg, base, 0.83)  # better, but not by more than the margin
    steps = promote_auto(reg)
    assert steps[-1].promoted is False and "margin 0.05" in steps[-1].reason
    assert _holders(reg, PRODUCTION) == [v2] and _holders(reg, STAGING) == [v3]
    assert _transitions(reg, v3)[-1]["refused"] == PRODUCTION

    forced = promote(reg, PRODUCTION, v3, force=True, reason="hotfix")
    assert forced.promoted and "forced past the gate" in forced.reason
    assert _holders(reg, PRODUCTION) == [v3]
    assert _transitions(reg, v3)[-1]["forced"] is True


def test_gate_refuses_figures_from_other_evaluation_data(registered: tuple[Project, Any]) -> None:
    from components.registry.promote import promote, promote_auto

    _, base_reg = registered
    base = base_reg.client.get_model_version_by_alias(base_reg.name, CANDIDATE)
    reg = _model(base_reg, "other-data")
    v1 = _add_version(reg, base, 0.60)
    promote(reg, PRODUCTION, v1, force=True)
    _add_version(reg, base, 0.99, data=OTHER)
    steps = promote_auto(reg)
    assert not steps[-1].promoted and "different data" in steps[-1].reason
    assert _holders(reg, PRODUCTION) == [v1]


def test_racing_alias_writes_leave_exactly_one_holder(registered: tuple[Project, Any]) -> None:
    """MLflow itself: an alias is unique per model, even under concurrent writers."""
    from components.registry.client import _retry

    _, base_reg = registered
    base = base_reg.client.get_model_version_by_alias(base_reg.name, CANDIDATE)
    reg = _model(base_reg, "raw-race")
    versions = [_add_version(reg, base, 0.5) for _ in range(4)]
    barrier = threading.Barrier(len(versions))

    def write(version: str) -> None:
        barrier.wait()
        for _ in range(5):
            _retry(lambda: reg.client.set_registered_model_alias(reg.name, PRODUCTION, version))

    threads = [threading.Thread(target=write, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(_holders(reg, PRODUCTION)) == 1
    assert list(reg.client.get_registered_model(reg.name).aliases).count(PRODUCTION) == 1


def test_racing_gated_promotions_keep_one_production_and_the_best(
    registered: tuple[Project, Any],
) -> None:
    """Pipelines racing to register a candidate and run the gate: under the lock every
    gate sees the production it replaces, so the best version ends up in production
    whatever the order, and no production version is replaced twice."""
    from components.registry.client import _retry
    from components.registry.promote import promote

    _, base_reg = registered
    base = base_reg.client.get_model_version_by_alias(base_reg.name, CANDIDATE)
    reg = _model(base_reg, "gated-race")
    first = _add_version(reg, base, 0.50)
    promote(reg, PRODUCTION, first, force=True)
    values = {_add_version(reg, base, v): v for v in (0.61, 0.93, 0.72, 0.85)}
    results = race_gated_promotions(
        reg, list(values),
        lambda version: _retry(
            lambda: reg.client.set_registered_model_alias(reg.name, CANDIDATE, version)))
    assert sorted(r.version for r in results if r.target == PRODUCTION) == sorted(values)
    best = max(values, key=values.get)
    assert _holders(reg, PRODUCTION) == [best]
    replaced = [r.replaced for r in results if r.target == PRODUCTION and r.promoted]
    assert len(replaced) == len(set(replaced))
    assert reg.client.search_registered_models(f"name='{reg.name}.promotion-lock'") == []


def test_racing_processes_never_leave_zero_or_two_production_versions(
    registered: tuple[Project, Any],
) -> None:
    project, base_reg = registered
    base = base_reg.client.get_model_version_by_alias(base_reg.name, CANDIDATE)
    reg = _model(base_reg, "process-race")
    versions = [_add_version(reg, base, 0.5) for _ in range(4)]  # two per process
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from components.registry.client import open_registry
        from components.registry.promote import promote
        from components.config import RegistryConfig
        cfg = RegistryConfig(model_name="process-race", lock_timeout_s=120)
        reg = open_registry(cfg, Path({str(project.root)!r}))
        for version in sys.argv[1:]:
            promote(reg, "production", version, force=True)
    """)
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", script, *versions[i::2]],
            cwd=project.root,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
    holders = _holders(reg, PRODUCTION)
    assert len(holders) == 1 and holders[0] in versions
    replaced = [
        t["replaced"] for v in versions for t in _transitions(reg, v) if t["to"] == PRODUCTION
    ]
    assert len(replaced) == 4 and len({r for r in replaced if r}) == 3  # a chain, no fork


def test_a_stale_lock_is_taken_over_and_a_held_one_times_out(
    registered: tuple[Project, Any],
) -> None:
    import time

    from components.registry.client import RegistryError
    from components.registry.promote import promotion_lock

    _, base_reg = registered
    reg = _model(base_reg, "locked", lock_timeout_s=0.5, lock_ttl_s=60)
    lock = "locked.promotion-lock"
    reg.client.create_registered_model(
        lock, tags={"token": "x", "holder": "crashed@host", "acquired_at": str(time.time())}
    )
    with pytest.raises(RegistryError, match="holds the lock"), promotion_lock(reg):
        pass
    reg.client.set_registered_model_tag(lock, "acquired_at", str(time.time() - 3600))
    with promotion_lock(reg):  # abandoned an hour ago: taken over
        assert reg.client.get_registered_model(lock).tags["token"] != "x"
    assert reg.client.search_registered_models(f"name='{lock}'") == []


def test_promote_command(registered: tuple[Project, Any]) -> None:
    from typer.testing import CliRunner

    from components.cli.app import get_app

    project, base_reg = registered
    base = base_reg.client.get_model_version_by_alias(base_reg.name, CANDIDATE)
    reg = _model(base_reg, "cli-model")
    _add_version(reg, base, 0.7)
    params = write_params(project, "cli-params.yaml", model_name="cli-model")
    runner = CliRunner()
    done = runner.invoke(get_app(), ["promote", "--auto", "-p", str(params)])
    assert done.exit_code == 0, done.output
    assert "-> production" in done.output
    _add_version(reg, base, 0.6)
    done = runner.invoke(get_app(), ["promote", "--auto", "-p", str(params)])
    assert done.exit_code == 1 and "not promoted to production" in done.output
    done = runner.invoke(get_app(), ["promote", "--to", "archive", "-p", str(params)])
    assert done.exit_code == 2 and "expected staging or production" in done.output
