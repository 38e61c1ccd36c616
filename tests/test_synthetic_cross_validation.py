"""benchmarks/synthetic_cross_validation.py refuses bad arguments with one named error line
before it reads any data (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic_cross_validation.py"


@pytest.mark.parametrize(("model", "expected"), [
    ("a=/no/such/detector.pt", "error: --model /no/such/detector.pt: no such file"),
    ("a", "error: --model 'a': expected NAME=VALUE"),
])
def test_bad_model_argument_is_one_named_error(model: str, expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seed", "0", "--model", model,
         "--variant", "x=train.synthetic.feather=0"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == expected
    assert "Traceback" not in done.stderr
