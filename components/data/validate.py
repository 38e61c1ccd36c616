"""Dataset validation with Great Expectations: the gate before any training.

One expectation suite runs over the manifest of an ingested dataset plus per-image checks
done here (file present and matching its sha256; full decode). Ingestion already decoded
every image once and recorded it (``ingest.json``); when that record matches the current
manifest, an image whose bytes still hash to its manifest sha256 decodes too, so only
re-hashing is needed. Otherwise every image is decoded here.

Each run writes ``validation.json`` (the GX result), ``summary.json`` (this module's
report) and, if enabled, Data Docs HTML (``data_docs/index.html``) into one folder.
This is the only module that imports ``great_expectations``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from components.config import DataConfig, ValidateConfig
from components.data.duplicates import manifest_findings
from components.data.images import SOURCE_BANDS, ImageRules, sha256_hex
from components.data.manifest import (
    MANIFEST_NAME,
    NORMAL_LABEL,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SPLITS,
    manifest_decoded,
)
from components.data.probing import probe_images
from components.errors import DataError, ValidationFailed

log = logging.getLogger(__name__)

CLASH_RULE = "no_identical_copy_in_two_splits_or_labels"
UNSAFE_PATH = r"^(?:/|\\)|(?:^|[/\\])\.\.(?:[/\\]|$)"  # absolute, or a ".." part


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's verdict, with the first offending files when it failed."""

    name: str
    description: str
    success: bool
    unexpected_count: int | None = None
    examples: tuple[str, ...] = ()
    observed: Any = None
    error: str | None = None

    def describe(self) -> str:
        """One line: what failed, how often and where."""
        if self.success:
            return f"{self.name}: passed"
        if self.error:
            return f"{self.name}: {self.description} -- could not be evaluated ({self.error})"
        if self.unexpected_count is not None:
            where = f"; first: {', '.join(self.examples)}" if self.examples else ""
            rows = "row" if self.unexpected_count == 1 else "rows"
            return (
                f"{self.name}: {self.description} -- {self.unexpected_count:,} offending "
                f"{rows}{where}"
            )
        observed = f"{self.observed:,}" if isinstance(self.observed, int) else self.observed
        return f"{self.name}: {self.description} -- observed {observed}"


@dataclass(frozen=True)
class ValidationReport:
    """The suite's verdict on one dataset and where its reports were written."""

    dataset: Path
    success: bool
    images: int
    counts: dict[str, dict[str, int]]  # split -> {"normal": n, "anomalous": m}
    outcomes: tuple[ExpectationOutcome, ...]
    report_dir: Path
    data_docs: Path | None
    seconds: float
    warnings: tuple[str, ...] = ()  # identical copies: repeats (all under duplicates=warn)

    @property
    def failures(self) -> tuple[ExpectationOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.success)

    def raise_for_failures(self) -> None:
        """Raise ``ValidationFailed`` naming every failed expectation, if any failed."""
        if self.success:
            return
        lines = "\n".join(f"  - {o.describe()}" for o in self.failures)
        raise ValidationFailed(
            f"{self.dataset}: {len(self.failures)} of {len(self.outcomes)} "
            f"expectations failed (report: {self.report_dir}):\n{lines}"
        )


# ----------------------------------------------------------------------------------------
# The manifest and per-image facts, as one table
# ----------------------------------------------------------------------------------------


def _load_manifest(dataset: Path) -> pd.DataFrame:
    path = dataset / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest (run `nestad ingest` first)")
    try:
        frame = pd.read_csv(
            path,
            dtype={
                "path": str,
                "sha256": str,
                "label": str,
                "split": str,
                "source": str,
                "mask": str,
                "is_normal": str,
            },
        )
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV manifest ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing columns {', '.join(missing)}")
    for column, default in OPTIONAL_COLUMNS.items():
        frame[column] = frame[column].fillna(default) if column in frame else default
    flags = frame["is_normal"].str.strip().str.lower()
    frame["is_normal"] = flags.map({"true": True, "1": True, "false": False, "0": False})
    for column in ("width", "height", "channels"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _read_files(dataset: Path, frame: pd.DataFrame) -> list[bytes | None]:
    """Each row's file bytes; ``None`` when missing, unreadable, not a regular file, or
    outside the dataset (an absolute path, a ``..`` part or a symbolic link)."""
    root = str(dataset)
    safe = ~frame["path"].fillna("/").str.contains(UNSAFE_PATH, regex=True)

    def read(rel: Any, ok: bool) -> bytes | None:
        if not ok:
            return None
        try:
            fd = os.open(os.path.join(root, rel), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return fh.read()
        except OSError:
            return None
        finally:
            os.close(fd)

    rows = list(zip(frame["path"], safe, strict=True))
    chunks = [rows[i : i + 1024] for i in range(0, len(rows), 1024)]
    with ThreadPoolExecutor(4) as pool:  # file reads release the GIL
        return [
            blob
            for chunk in pool.map(lambda c: [read(*row) for row in c], chunks)
            for blob in chunk
        ]


def _image_facts(
    dataset: Path, frame: pd.DataFrame, verify_files: bool, workers: int,
    rules: ImageRules | None = None,
) -> pd.DataFrame:
    """Add ``file_ok`` and ``decodes``; decode here only what ingestion did not vouch for,
    by ``rules`` (then width/height/channels are the decoded image's own; an image refused
    for its size keeps the size its header gives)."""
    frame = frame.copy()
    vouched = manifest_decoded(dataset)
    frame.attrs["files_checked"] = not (vouched and not verify_files)
    if not frame.attrs["files_checked"]:
        frame["file_ok"] = True
        frame["decodes"] = True
        return frame
    blobs = _read_files(dataset, frame)
    frame["file_ok"] = [
        b is not None and isinstance(s, str) and sha256_hex(b) == s
        for b, s in zip(blobs, frame["sha256"], strict=True)
    ]
    # Bytes that ingestion decoded need no second decode; any others are decoded here.
    decodes = list(frame["file_ok"]) if vouched else [False] * len(frame)
    readable = [(i, b) for i, b in enumerate(blobs) if b is not None and not decodes[i]]
    if readable:
        log.info("%s: decoding %d images not decoded at ingestion", dataset, len(readable))
    sizes = frame[["width", "height", "channels"]].to_numpy(dtype=float, copy=True)
    for i, probe in probe_images(readable, workers=workers, expected=len(readable),
                                 rules=rules):
        decodes[i] = probe.error is None
        if probe.error is None or probe.width:
            sizes[i] = (probe.width, probe.height, probe.channels or sizes[i][2])
    frame["decodes"] = decodes
    frame[["width", "height", "channels"]] = sizes
    return frame


def _derive(frame: pd.DataFrame, data_cfg: DataConfig) -> pd.DataFrame:
    """Columns the expectations test: per-row facts derived from the whole table."""
    frame = frame.copy()
    frame["kind"] = frame["is_normal"].map({True: "normal", False: "anomalous"})
    pool = frame["split"].map({"train": "train_val", "val": "train_val", "test": "test"})
    pool = pool.fillna(frame["split"].fillna("none"))
    frame["count_group"] = pool + "/" + frame["kind"].fillna("unknown")
    frame["n_splits_for_sha"] = frame.groupby("sha256", dropna=False)["split"].transform("nunique")
    frame["path_safe"] = ~frame["path"].fillna("/").str.contains(UNSAFE_PATH, regex=True)
    frame["pixels"] = frame["width"] * frame["height"]
    if data_cfg.layout == "classes":
        expected_normal = frame["label"] != data_cfg.anomalous_class
    else:
        expected_normal = frame["label"] == NORMAL_LABEL
    frame["label_agrees"] = frame["is_normal"] == expected_normal
    # Examples name the file as the user gave it (the manifest's source), not images/ab/....
    given = frame["source"].where(frame["source"].fillna("").astype(str) != "", frame["path"])
    frame["file"] = given.fillna("").astype(str)
    findings = manifest_findings(frame)
    frame.attrs["duplicates"] = findings
    frame["copy_clash"] = frame.index.isin([at for at, f in findings if f.is_error])
    return frame


def _counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts = frame.groupby(["split", "kind"]).size()
    return {
        split: {kind: int(counts.get((split, kind), 0)) for kind in ("normal", "anomalous")}
        for split in SPLITS
    }


# ----------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------


def _rule(name: str, description: str, expectation: Any) -> Any:
    """Name an expectation (``meta.rule``) and say in words what it requires."""
    expectation.meta = {"rule": name}
    expectation.description = description
    return expectation


def _suite(frame: pd.DataFrame, cfg: ValidateConfig, data_cfg: DataConfig) -> list[Any]:
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    e = gx.expectations
    split, group = Column("split"), Column("count_group")
    # The sizes and band counts training accepts (components.data.images), unless
    # validation.min_size asks for more.
    min_size = cfg.min_size or data_cfg.min_image_size
    size_rule = "validation.min_size" if cfg.min_size else "data.min_image_size"

    def in_set(column: str, values: list[Any], where: Any = None) -> Any:
        return e.ExpectColumnValuesToBeInSet(column=column, value_set=values, row_condition=where)

    def at_least_one(where: Any = None) -> Any:
        return e.ExpectTableRowCountToBeBetween(min_value=1, row_condition=where)

    rules = [
        _rule("dataset_not_empty", "the manifest lists at least one image", at_least_one()),
        *(
            _rule(
                f"{col}_present",
                f"every row has a {col}",
                e.ExpectColumnValuesToNotBeNull(column=col),
            )
            for col in ("path", "sha256", "label", "split", "is_normal")
        ),
        _rule(
            "paths_unique", "no path is listed twice", e.ExpectColumnValuesToBeUnique(column="path")
        ),
        _rule(
            "paths_inside_dataset",
            "paths are relative and stay inside the dataset folder",
            in_set("path_safe", [True]),
        ),
        _rule(
            "sha256_well_formed",
            "sha256 is 64 lowercase hex digits",
            e.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
        ),
        _rule("split_known", f"split is one of {', '.join(SPLITS)}", in_set("split", list(SPLITS))),
        *(
            _rule(
                f"{name}_only_normal",
                f"{name} holds only normal images",
                in_set("is_normal", [True], split == name),
            )
            for name in ("train", "val")
        ),
        *(
            _rule(
                f"{name}_not_empty", f"{name} holds at least one image", at_least_one(split == name)
            )
            for name in ("train", "val")
        ),
        *(
            _rule(
                f"test_has_{kind}",
                f"test holds {kind} images",
                at_least_one(group == f"test/{kind}"),
            )
            for kind in ("normal", "anomalous")
        ),
        # GX's compound-unique misses a sha256 in two splits: test a per-hash split count.
        _rule(
            "no_sha256_in_two_splits",
            "no image (sha256) appears in two splits",
            in_set("n_splits_for_sha", [1]),
        ),
        _rule(
            "no_sha256_twice_in_train",
            "no image (sha256) appears twice in train",
            e.ExpectColumnValuesToBeUnique(column="sha256", row_condition=split == "train"),
        ),
        *(
            [_rule(
                CLASH_RULE,
                "no image has an identical copy in another split or under another label "
                "(manifest rows and the copies ingestion recorded; data.duplicates: fail)",
                in_set("copy_clash", [False]),
            )]
            if data_cfg.duplicates == "fail" else []
        ),
        _rule("every_image_decodes", "every image decodes fully", in_set("decodes", [True])),
        _rule(
            "channels_convertible",
            f"every image is grey, grey + alpha, RGB or RGBA/CMYK ({len(SOURCE_BANDS)} or "
            f"fewer bands), which training converts to data.channels={data_cfg.channels}",
            in_set("channels", list(SOURCE_BANDS)),
        ),
        *(
            _rule(
                f"{side}_at_least_min",
                f"{side} is at least {min_size} ({size_rule})",
                e.ExpectColumnValuesToBeBetween(column=side, min_value=min_size),
            )
            for side in ("width", "height")
        ),
        _rule(
            "pixels_at_most_max",
            f"width x height is at most {data_cfg.max_image_pixels:,} (data.max_image_pixels)",
            e.ExpectColumnValuesToBeBetween(column="pixels", max_value=data_cfg.max_image_pixels),
        ),
    ]
    if frame.attrs.get("files_checked", True):
        rules.append(
            _rule(
                "files_match_sha256",
                "every file exists and hashes to its manifest sha256",
                in_set("file_ok", [True]),
            )
        )
    flag_rule = {
        "classes": f"is_normal is False exactly for class {data_cfg.anomalous_class!r}",
        "industrial": f"is_normal is True exactly for label {NORMAL_LABEL!r}",
    }.get(data_cfg.layout)
    if flag_rule:
        rules.append(_rule("normal_flag_matches_label", flag_rule, in_set("label_agrees", [True])))
    if cfg.labels is not None:
        rules.append(
            _rule(
                "labels_declared",
                f"label is one of {', '.join(cfg.labels)}",
                in_set("label", list(cfg.labels)),
            )
        )
    for key, value in cfg.expected_counts.model_dump().items():
        if value is not None:
            where = key.replace("train_val_", "train_val/").replace("test_", "test/")
            rules.append(
                _rule(
                    f"count_{key}",
                    f"{where} holds exactly {value:,} images",
                    e.ExpectTableRowCountToEqual(value=value, row_condition=group == where),
                )
            )
    return rules


def _run_suite(
    frame: pd.DataFrame, expectations: list[Any], cfg: ValidateConfig, report_dir: Path
) -> Any:
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        ctx.data_sources.add_pandas("nestad")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole")
    )
    # Built whole: add_expectation() round-trips the store once per expectation (~50 ms).
    suite = ctx.suites.add(gx.ExpectationSuite(name="nestad_dataset", expectations=expectations))
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="nestad_dataset", data=batch, suite=suite)
    )
    actions = []
    if cfg.data_docs:
        ctx.add_data_docs_site(
            site_name="nestad",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(report_dir / "data_docs"),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=["nestad"]))
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name="nestad_dataset",
            validation_definitions=[definition],
            actions=actions,
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": ["path", "file"],
                "partial_unexpected_count": cfg.examples,
            },
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


def _outcome(result: Any, examples: int) -> ExpectationOutcome:
    config = result.expectation_config
    detail = result.result or {}
    info = result.exception_info or {}
    error = info.get("exception_message") if info.get("raised_exception") else None
    paths = tuple(
        str(row.get("file") or row.get("path"))
        for row in detail.get("partial_unexpected_index_list") or []
        if isinstance(row, dict)
    )[:examples]
    return ExpectationOutcome(
        name=(config.meta or {}).get("rule", config.type),
        description=config.description or "",
        success=bool(result.success),
        unexpected_count=detail.get("unexpected_count"),
        examples=paths,
        observed=detail.get("observed_value"),
        error=error,
    )


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------


def validate_dataset(
    dataset: Path,
    cfg: ValidateConfig,
    data_cfg: DataConfig,
    *,
    report_dir: Path | None = None,
    workers: int = 2,
) -> ValidationReport:
    """Run the suite over ``dataset``; write the JSON result (and Data Docs) to
    ``report_dir`` (default ``cfg.report_dir``). Failed expectations do not raise: see
    ``ValidationReport.raise_for_failures``. An unreadable manifest raises ``DataError``."""
    started = time.perf_counter()
    dataset = Path(dataset).absolute()
    report_dir = Path(report_dir if report_dir is not None else cfg.report_dir).absolute()
    # Sizes are expectations of their own (below); the decode itself bounds memory.
    rules = ImageRules(min_size=1, max_pixels=data_cfg.max_image_pixels)
    frame = _image_facts(dataset, _load_manifest(dataset), cfg.verify_files, workers, rules)
    frame = _derive(frame, data_cfg)
    report_dir.mkdir(parents=True, exist_ok=True)
    expectations = _suite(frame, cfg, data_cfg)
    names = [expectation.meta["rule"] for expectation in expectations]
    result = _run_suite(frame, expectations, cfg, report_dir)
    outcomes = tuple(
        sorted(
            (_outcome(r, cfg.examples) for r in result.results),
            key=lambda o: names.index(o.name) if o.name in names else len(names),
        )
    )
    findings = [f for _, f in frame.attrs["duplicates"]]
    pairs = tuple(f.describe() for f in findings if f.is_error)[: cfg.examples]
    outcomes = tuple(  # name both files of each clash, not only the kept one
        replace(o, examples=pairs) if o.name == CLASH_RULE and not o.success else o
        for o in outcomes
    )
    errors_fail = data_cfg.duplicates == "fail"
    warnings = tuple(f.describe() for f in findings if not (f.is_error and errors_fail))
    (report_dir / "validation.json").write_text(
        json.dumps(result.to_json_dict(), indent=1, default=str) + "\n"
    )
    docs = report_dir / "data_docs" / "index.html"
    report = ValidationReport(
        dataset=dataset,
        success=bool(result.success) and all(o.success for o in outcomes),
        images=len(frame),
        counts=_counts(frame),
        outcomes=outcomes,
        report_dir=report_dir,
        data_docs=docs if cfg.data_docs and docs.is_file() else None,
        seconds=time.perf_counter() - started,
        warnings=warnings,
    )
    # summary.json is what training and registration depend on (dvc.yaml): it holds the
    # verdict and nothing run-specific (no timing), so validating unchanged data again
    # leaves it byte for byte the same and retrains nothing.
    summary = {k: v for k, v in asdict(report).items() if k != "seconds"} | {
        "dataset": str(dataset),
        "report_dir": str(report_dir),
        "data_docs": str(report.data_docs) if report.data_docs else None,
    }
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    log.info("validated %s: %s", dataset, "passed" if report.success else "FAILED")
    return report
