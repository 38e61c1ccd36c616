"""The model card of a registered version: plain data in, Markdown out (no MLflow here).

``versions.register_run`` gathers the facts (``CardFacts``) from the run folder, the data
and code versions and the params, renders the card with ``render_model_card``, logs it as
``model_card/MODEL_CARD.md`` and sets it as the version's description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DESCRIPTION_LIMIT = 5000  # characters MLflow's SQL stores keep in a version description


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states, as plain data (``metrics`` is ``metrics.json``)."""

    model_name: str
    version: str
    run_id: str
    data: dict[str, Any]  # params.data dumped
    data_version: str | None
    data_counts: dict[str, dict[str, int]]  # split -> normal/anomalous (manifest)
    used_counts: dict[str, int]  # train, val, val_normal, test_normal, test_anomalous
    metrics: dict[str, Any]
    model: dict[str, Any]  # params.model dumped
    train: dict[str, Any]  # params.train dumped
    evaluate: dict[str, Any]  # params.evaluate dumped
    code: dict[str, Any]  # git_commit, git_dirty, dvc_lock_sha256
    history: dict[str, Any] = field(default_factory=dict)  # best_epoch, device, precision


def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _intended_use(facts: CardFacts) -> str:
    d = facts.data
    if d.get("layout") == "classes":
        normal = f"images of the classes other than {d.get('anomalous_class')!r}"
    else:
        normal = "images of good parts (the normal training images)"
    return (f"Flags images that differ from {normal}: an image anomaly detector trained on "
            "normal images only (no labelled defect is needed). It returns a raw score, a "
            "score normalised on validation normals and a flag at the chosen threshold (and "
            "an anomaly map). Meant for images like its training data (same camera, framing, "
            "lighting); check incoming batches with `nestad monitor`. A flag is a request "
            "for inspection, not a verdict.")


def _counts(facts: CardFacts) -> list[str]:
    lines = ["| split | normal | anomalous |", "| --- | --- | --- |"]
    for split, c in sorted(facts.data_counts.items()):
        lines.append(f"| {split} (dataset) | {c.get('normal', 0)} | {c.get('anomalous', 0)} |")
    u = facts.used_counts
    lines += [f"| train (used) | {u.get('train', '-')} | 0 |",
              f"| val (used) | {u.get('val', u.get('val_normal', '-'))} | 0 |",
              f"| test (used) | {u.get('test_normal', '-')} | {u.get('test_anomalous', '-')} |"]
    return lines


def _metrics(m: dict[str, Any]) -> list[str]:
    lines = ["| protocol | AUROC | AUPRC | F1 | precision | recall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label in (("leak_free", "leak-free"), ("paper_compatible", "paper-compatible")):
        row = m.get(key) or {}
        lines.append(f"| {label} | " + " | ".join(
            _f(row.get(k)) for k in ("auroc", "auprc", "f1", "precision", "recall")) + " |")
    extra = []
    if m.get("pixel"):
        extra.append(f"- pixel (test masks, leak-free): AUROC {_f(m['pixel'].get('auroc'))}, "
                     f"AUPRO {_f(m['pixel'].get('aupro'))}")
    if m.get("synthetic_validation"):
        sv = m["synthetic_validation"]
        extra.append(f"- synthetic validation ({sv.get('protocol')}): image AUROC "
                     f"{_f(sv.get('image_auroc'))}, pixel AUROC {_f(sv.get('pixel_auroc'))}")
    labels = [f"- **{label}**: {(m.get(key) or {}).get('protocol', '-')}"
              for key, label in (("leak_free", "leak-free"), ("paper_compatible",
                                                               "paper-compatible"))]
    return lines + [""] + labels + extra


def _thresholds(m: dict[str, Any]) -> list[str]:
    table = m.get("thresholds") or {}
    lf = m.get("leak_free") or {}
    test_fpr = {"fixed": (lf.get("at_fixed_threshold") or {}).get("fpr"),
                "fpr": (lf.get("at_target_fpr") or {}).get("fpr")}
    names = {"fixed": "fixed (the paper's 0.2)", "fpr": "target FPR on validation normals"}
    lines = ["| threshold | value (normalised score) | FPR on validation normals | FPR on "
             "test normals | applied |", "| --- | --- | --- | --- | --- |"]
    for which in ("fixed", "fpr"):
        t = table.get(which) or {}
        lines.append(f"| {names[which]} | {_f(t.get('value'))} | "
                     f"{_f(t.get('validation_normal_fpr'), 3)} | {_f(test_fpr[which], 3)} | "
                     f"{'yes' if table.get('used', lf.get('threshold_used')) == which else ''} |")
    return lines


def _training(facts: CardFacts) -> list[str]:
    mdl, tr, ev, d, h = facts.model, facts.train, facts.evaluate, facts.data, facts.history
    schedule = f"{tr.get('steps')} steps" if tr.get("steps") else f"{tr.get('epochs')} epochs"
    return [
        f"- model: `{mdl.get('name')}`, base width {mdl.get('base_width')}, depth "
        f"{mdl.get('depth')}, discriminator width {mdl.get('disc_width')}",
        f"- input: {d.get('image_size')} px, {d.get('channels')} channel(s); validation share "
        f"{d.get('val_fraction')}, split seed {d.get('seed')}",
        f"- schedule: {schedule}, batch {tr.get('batch_size')}, lr {tr.get('lr')}, seed "
        f"{tr.get('seed')}; checkpoint rule `{tr.get('select_on')}`, kept epoch "
        f"{facts.metrics.get('checkpoint_epoch', h.get('best_epoch'))}",
        f"- scoring: weight {ev.get('score_weight')}, target FPR {ev.get('target_fpr')}, map "
        f"sigma {(facts.metrics.get('map_settings') or {}).get('sigma', ev.get('map_sigma'))}"
        f"; trained on {h.get('device', '-')} in {h.get('precision', '-')}",
    ]


def _limits(facts: CardFacts) -> list[str]:
    d, m = facts.data, facts.metrics
    size = int(d.get("image_size") or 0)
    settings = m.get("map_settings") or {}
    sigma = float(settings.get("sigma", facts.evaluate.get("map_sigma") or 0) or 0)
    smallest = max(1.0, 2.0 * sigma)  # px at the model input: narrower is smoothed away
    share = smallest / size if size else float("nan")
    channels = "grey (1 channel): colour is not seen" if d.get("channels") == 1 else \
        "RGB (3 channels): grey images are replicated to three channels"
    if facts.model.get("name") == "nested_restore":
        top_k = float(settings.get("top_k", facts.evaluate.get("map_top_k") or 0.01) or 0.01)
        dilution = (f"the image score is the mean of the map's top {top_k:.1%} pixels "
                    f"({top_k * size * size:.0f} px): a defect smaller than that is averaged "
                    "with normal pixels")
    else:
        dilution = ("the image score averages the residual over the whole image: a defect "
                    "covering a share a of the image moves it by about a times its residual, "
                    "so small defects are diluted")
    return [
        f"- resolution: every image is resized to {size} x {size} px (aspect not kept); "
        f"{channels}",
        f"- smallest defect: one model-input pixel is {1 / size:.1%} of the image side "
        f"({1000 / size:.0f} px of a 1000 px source); smaller ones are lost in the resize. "
        f"The anomaly map shows a defect about {smallest:g} px across or larger (Gaussian "
        f"smoothing sigma {sigma:g} px), i.e. {share:.1%} of the side ({share * 1000:.0f} px "
        f"of a 1000 px source); {dilution}",
        f"- it knows only the normal variation of its {facts.used_counts.get('train', '?')} "
        "training images; new lighting, cameras or product variants raise false alarms "
        "(`nestad monitor` exits 3 past its limits)",
        f"- test figures come from {facts.used_counts.get('test_normal', '?')} normal and "
        f"{facts.used_counts.get('test_anomalous', '?')} anomalous test images",
    ]


def render_model_card(facts: CardFacts) -> str:
    """The card as Markdown: intended use, data version and counts, protocol, metrics with
    their protocol labels, thresholds with their validation-normal FPR, training
    configuration, code version, known limits."""
    c = facts.code
    dirty = " (uncommitted changes)" if c.get("git_dirty") == "true" else ""
    parts = [
        f"# Model card: {facts.model_name} version {facts.version}",
        "",
        "## Intended use",
        _intended_use(facts),
        "",
        "## Data",
        f"- source: `{facts.data.get('source')}` (layout {facts.data.get('layout')})",
        f"- data version: `{facts.data_version or 'unversioned'}`",
        "",
        *_counts(facts),
        "",
        "## Protocol and metrics",
        *_metrics(facts.metrics),
        "",
        "## Thresholds",
        *_thresholds(facts.metrics),
        "",
        "## Training configuration",
        *_training(facts),
        "",
        "## Code version",
        f"- git commit: `{c.get('git_commit') or 'unknown'}`{dirty}",
        f"- dvc.lock sha256: `{c.get('dvc_lock_sha256') or '-'}`",
        f"- MLflow run: `{facts.run_id}`",
        "",
        "## Known limits",
        *_limits(facts),
        "",
    ]
    return "\n".join(parts)


def card_description(card: str, run_id: str) -> str:
    """The card as a version description, cut at a section to fit ``DESCRIPTION_LIMIT``
    (the whole card stays in the run's ``model_card/MODEL_CARD.md``)."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    note = f"\n\n(cut to fit; the full card is model_card/MODEL_CARD.md of run {run_id})\n"
    cut = card[: DESCRIPTION_LIMIT - len(note)]
    section = cut.rfind("\n## ")
    return (cut[:section] if section > 0 else cut) + note
