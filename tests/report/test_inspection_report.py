"""Inspection reports: the evaluation's report/index.html (sections, protocol labels, false
positives and false negatives first, every picture there), escaping, ``score --report``,
and the page in headless Chromium (no console error, every image loaded, not blank)."""

from __future__ import annotations

import io
import re
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browser_support import check_page, find_chromium
from PIL import Image, ImageStat

from components.data.splits import load_splits
from components.pipeline.stages import evaluate_stage, score_paths, train_stage
from components.report.html import render
from components.report.inspection import ScoredImages, inspection_order, write_batch_report
from components.report.page import Card, Gallery, InspectionPage, Picture, Table


class _Page(HTMLParser):
    """Section ids, h3 ids in order, img srcs, card classes and the page text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections, self.groups, self.images, self.cards, self.text = [], [], [], [], []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "h3" and "id" in attrs:
            self.groups.append(attrs["id"])
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "div" and attrs.get("class", "").startswith("card "):
            self.cards.append(attrs["class"].split()[1])
        elif tag in ("script", "iframe", "object", "embed"):
            self.scripts += 1
        elif tag == "link" and attrs.get("rel") != "icon":
            self.scripts += 1  # no stylesheet or anything else fetched

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _write_masks(source: Path) -> None:
    """A box mask per defect test image (ground_truth/square/<stem>_mask.png)."""
    folder = source / "ground_truth" / "square"
    folder.mkdir(parents=True)
    for image in sorted((source / "test" / "square").glob("*.png")):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 10:22] = 255
        Image.fromarray(mask).save(folder / f"{image.stem}_mask.png")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, synth, tiny_params):
    """A tiny industrial run with masks, trained one epoch and evaluated: (params, run)."""
    root = tmp_path_factory.mktemp("report")
    source = synth.dataset(root / "data", "industrial", n_train=16, n_test=6, n_defect=6)
    _write_masks(source)
    params = tiny_params(data={"source": str(source), "layout": "industrial"})
    splits = load_splits(params.data)
    train_stage(params, root / "run", splits=splits)
    evaluate_stage(params, root / "run", splits=splits)
    return params, root / "run"


def test_evaluation_writes_a_report_with_every_section(evaluated) -> None:
    _, run = evaluated
    index = run / "report" / "index.html"
    page = _parse(index)
    assert page.sections == ["versions", "metrics", "figures", "types", "images"]
    text = " ".join(page.text)
    for heading in ("Leak-free protocol", "Paper-compatible protocol", "Pixel metrics",
                    "Synthetic validation (no test data; not a test figure)",
                    "Per type (test split)", "model file", "data version", "code"):
        assert heading in text, heading
    # the protocol labels are those of metrics.json, beside their figures
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    for section in ("leak_free", "paper_compatible", "synthetic_validation", "pixel"):
        assert metrics[section]["protocol"] in text, section
    assert f"{metrics['leak_free']['auroc']:.4f}" in text
    assert page.scripts == 0  # static: no script, no external resource


def test_every_picture_is_a_relative_file_beside_the_page(evaluated) -> None:
    _, run = evaluated
    folder = run / "report"
    page = _parse(folder / "index.html")
    assert {"images/score_histogram.png", "images/scores_by_type.png"} <= set(page.images)
    for src in page.images:
        assert not re.match(r"^[a-z]+:", src) and not src.startswith("/"), src  # no URL
        with Image.open(folder / src) as picture:
            assert picture.width > 0 and picture.height > 0
    # 12 test images: an input and a heat-map overlay each
    assert sum(src.startswith("images/img-") for src in page.images) == 2 * 12
    assert len(page.cards) == 12


def test_false_positives_and_false_negatives_come_first(evaluated) -> None:
    import csv

    _, run = evaluated
    page = _parse(run / "report" / "index.html")
    assert page.groups == ["fp", "fn", "tp", "tn"]
    with (run / "test_scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    kinds = []
    for row in rows:
        flagged, anomalous = row["flagged"] == "1", row["is_anomaly"] == "1"
        kinds.append({(True, False): "fp", (False, True): "fn", (True, True): "tp",
                      (False, False): "tn"}[(flagged, anomalous)])
    order = {"fp": 0, "fn": 1, "tp": 2, "tn": 3}
    assert page.cards == sorted(kinds, key=order.__getitem__)  # as many of each, errors first
    # within a group, highest score first
    score = {r["path"]: float(r["score"]) for r in rows}
    names = [unescape(n) for n in re.findall(
        r'class="name" title="([^"]+)"', (run / "report" / "index.html").read_text())]
    for kind in order:
        part = [n for n, k in zip(names, page.cards, strict=True) if k == kind]
        assert [score[n] for n in part] == sorted((score[n] for n in part), reverse=True)


def test_inspection_order_puts_errors_first_highest_score_first() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.95])
    flagged = scores >= 0.5
    truth = np.array([0, 1, 1, 0, 0, 1])
    groups = dict(inspection_order(scores, flagged, truth))
    assert list(groups) == ["fp", "fn", "tp", "tn"]
    assert groups["fp"].tolist() == [0, 4]  # normal, flagged: 0.9 then 0.7
    assert groups["fn"].tolist() == [1]
    assert groups["tp"].tolist() == [5, 2]
    assert groups["tn"].tolist() == [3]
    batch = inspection_order(scores, flagged)
    assert [k for k, _ in batch] == ["flagged", "passed"]
    assert batch[0][1].tolist() == [5, 0, 2, 4] and batch[1][1].tolist() == [3, 1]


def test_odd_file_names_are_escaped_and_pictures_keep_safe_names(tmp_path) -> None:
    odd = 'test/<script>alert("x")</script> & \'q\'.png'
    images = np.zeros((2, 8, 8, 3), np.uint8)
    scored = ScoredImages(names=[odd, "plain.png"], images=images,
                          scores=np.array([0.9, 0.1]), raw_scores=np.array([2.0, 1.0]),
                          flagged=np.array([True, False]),
                          maps=lambda idx: np.zeros((len(idx), 4, 4), np.float32))
    index = write_batch_report(tmp_path / "r", scored, {"fixed 0.2": 0.2}, "fixed 0.2",
                               [("model", "<b>m</b>")])
    html = index.read_text(encoding="utf-8")
    assert "<script>" not in html and "<b>m</b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27;.png" in html
    page = _parse(index)
    assert page.scripts == 0
    assert all(re.fullmatch(r"images/[a-z0-9_-]+\.png", src) for src in page.images)
    assert " ".join(page.text).count(odd) == 1  # the name as text, once, readable


def test_picture_paths_are_percent_encoded_in_the_html() -> None:
    card = Card("a", 0.5, 1.0, True, (Picture('images/a b"&.png', "x"),))
    page = InspectionPage("t", "s", (("k", "v"),), tables=(Table("T", "", ("h",), (("1",),)),),
                          galleries=(Gallery("flagged", "F", "", (card,), 1),))
    assert 'src="images/a%20b%22%26.png"' in render(page)


def test_score_report_writes_a_page_of_the_batch(evaluated, tmp_path) -> None:
    params, run = evaluated
    source = Path(params.data.source)
    rows = score_paths(run / "model", [source / "test"], None, report_dir=tmp_path / "batch")
    index = tmp_path / "batch" / "index.html"
    page = _parse(index)
    assert page.sections == ["versions", "figures", "images"]
    assert page.groups == ["flagged", "passed"]
    flagged = sum(r["is_anomaly"] for r in rows)
    assert page.cards == ["flagged"] * flagged + ["passed"] * (len(rows) - flagged)
    text = " ".join(page.text)
    assert "No labels" in text and "sha256" in text
    for src in page.images:
        assert (tmp_path / "batch" / src).is_file(), src
    # highest score first within each group (raw scores: the normalised ones are clipped)
    raw = {r["path"]: r["score"] for r in rows}
    names = [unescape(n) for n in
             re.findall(r'class="name" title="([^"]+)"', index.read_text(encoding="utf-8"))]
    for part in (names[:flagged], names[flagged:]):
        assert [raw[n] for n in part] == sorted((raw[n] for n in part), reverse=True)


def test_score_cli_report_option(evaluated, tmp_path) -> None:
    from typer.testing import CliRunner

    from components.cli.app import app

    params, run = evaluated
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["score", str(Path(params.data.source) / "test" / "good"),
                                      "--model", str(run / "model"), "--output",
                                      str(tmp_path / "s.csv"), "--report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file() and "report" in result.output


def test_score_report_into_a_file_is_a_one_line_error(evaluated, tmp_path) -> None:
    from cli_support import assert_one_line_error
    from typer.testing import CliRunner

    from components.cli.app import app

    params, run = evaluated
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    result = CliRunner().invoke(app, ["score", str(Path(params.data.source) / "test" / "good"),
                                      "--model", str(run / "model"), "--output",
                                      str(tmp_path / "s.csv"), "--report", str(taken)])
    assert_one_line_error(result, f"{taken}: cannot write the report there")


CHROMIUM = find_chromium()


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (CI installs Debian's "
                    "chromium package in .ci/run)")
def test_the_report_opens_in_chromium(evaluated, tmp_path) -> None:
    _, run = evaluated
    index = run / "report" / "index.html"
    check = check_page(index.resolve().as_uri(), CHROMIUM)
    assert check.errors == []
    assert len(check.images) == len(_parse(index).images) > 0
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in check.images), check.images
    with Image.open(io.BytesIO(check.screenshot)) as shot:
        assert max(ImageStat.Stat(shot.convert("L")).var) > 0  # not blank

    # the checks can fail: a missing picture and a console error are both caught
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head>'
                      '<body><img src="missing.png"><script>console.error("boom")</script>'
                      "</body></html>")
    bad = check_page(broken.as_uri(), CHROMIUM)
    assert any("boom" in e for e in bad.errors)
    assert any("missing.png" in e for e in bad.errors)
    assert bad.images[0]["naturalWidth"] == 0


def test_batch_thresholds_from_a_model_file_or_an_export() -> None:
    from components.pipeline.reports import batch_thresholds

    norm = {"threshold_fixed": 0.2, "threshold_fpr": 0.7, "target_fpr": 0.05}
    fixed, fpr = "fixed 0.2", "FPR 0.05 on validation normals"
    model_file = {"norm": norm, "threshold": "fpr"}
    export = {"thresholds": {"used": "fpr", "value": 0.7, "fixed": 0.2, "fpr": 0.7,
                             "target_fpr": 0.05}}
    for meta in (model_file, export):
        assert batch_thresholds(meta, None) == ({fixed: 0.2, fpr: 0.7}, fpr)
        assert batch_thresholds(meta, "fixed")[1] == fixed
