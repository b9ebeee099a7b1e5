"""Step parameters as MLflow hands them over: empty values are refused, never read as a default."""

from __future__ import annotations

import argparse

import pytest

from conftest import check, mlflow_run  # noqa: F401
from lightcycle import cli

EMPTY = ("", "  ", "''", '""')


@pytest.mark.parametrize("value", EMPTY)
def test_boolean_refuses_empty_values_with_the_text_message(value):
    with pytest.raises(argparse.ArgumentTypeError) as boolean_error:
        cli.boolean(value)
    with pytest.raises(argparse.ArgumentTypeError) as text_error:
        cli.text(value)
    assert str(boolean_error.value) == str(text_error.value)
    assert "leave the parameter out" in str(boolean_error.value)


@pytest.mark.parametrize("value, expected", [("true", True), ("Yes", True), ("1", True),
                                             ("false", False), ("N", False), ("0", False)])
def test_boolean_reads_what_it_documents(value, expected):
    assert cli.boolean(value) is expected


def test_boolean_refuses_other_words():
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false, got 'maybe'"):
        cli.boolean("maybe")


def test_mlflow_run_with_an_empty_boolean_is_refused_before_anything_runs(experiment):
    """`-P force=` through `mlflow run`, as typed: the step stops at its parser (exit 2)."""
    result = mlflow_run("main", {"force": ""}, experiment, timeout=300)
    assert result.returncode != 0
    assert "argument --force: must not be empty; leave the parameter out" in result.stderr, \
        result.stderr[-3000:]
