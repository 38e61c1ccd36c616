"""Registry writes that lose a race are retried; other errors are not."""

from __future__ import annotations

import pytest

from components.registry.client import _retry


@pytest.mark.parametrize("message", [
    "sqlite3.OperationalError: database is locked",
    "UNIQUE constraint failed: registered_model_aliases.name",
    "BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique "
    "constraint \"registered_model_alias_pk\"",  # PostgreSQL, two alias writes at once
])
def test_a_lost_write_race_is_retried(message: str) -> None:
    calls = []

    def write() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError(message)
        return "done"

    assert _retry(write) == "done" and len(calls) == 3


def test_other_errors_are_raised_at_once() -> None:
    calls = []

    def write() -> None:
        calls.append(1)
        raise RuntimeError("RESOURCE_DOES_NOT_EXIST: registered model not found")

    with pytest.raises(RuntimeError, match="RESOURCE_DOES_NOT_EXIST"):
        _retry(write)
    assert len(calls) == 1
