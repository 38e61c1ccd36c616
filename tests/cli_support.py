"""What a user sees when a command refuses bad input: shared by the CLI tests."""

from __future__ import annotations


def assert_one_line_error(result, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line, last, containing ``needles``;
    returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert errors[0] == lines[-1]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
