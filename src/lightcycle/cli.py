"""What every step script shares: argparse value types and the run_step error boundary."""

from __future__ import annotations

import argparse
import gc
import sys

from lightcycle.errors import UserError


def boolean(value: str) -> bool:
    """`-P force=` is a mistake like `-P name=`: refused with text()'s message, never read as false."""
    lowered = text(value).lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def run_step(main, argv: list[str] | None = None) -> None:
    """Run a step's main(); user errors become one clear line on stderr and exit code 2."""
    from lightcycle.lifecycle import connection, tracking

    connection.use_bounded_retries()
    tracking.quiet_mlflow_console()
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        # The interpreter's shutdown collects garbage over every object torch, MLflow and
        # Lightning created at import: 2-4 s per step process here. Frozen objects are skipped
        # by those collections (nothing else changes: atexit handlers, flushes and thread joins
        # still run), so a step exits in about 1 s.
        gc.freeze()


def text(value: str) -> str:
    """A string parameter that must say something: `-P name=` and `''` are mistakes."""
    stripped = str(value).strip()
    if stripped in ("", "''", '""'):
        raise argparse.ArgumentTypeError(
            "must not be empty; leave the parameter out to get its default (MLproject and "
            "`python steps/<step>.py --help` list them)")
    return stripped


def integer(value: str) -> int:
    """MLproject's float parameters arrive as "5" or "5.0"."""
    return int(float(value))


def dataclass_parser(config_class, description: str) -> argparse.ArgumentParser:
    """One --option per field of `config_class`, typed by its default."""
    import dataclasses

    parser = argparse.ArgumentParser(description=description)
    defaults = config_class()
    for field in dataclasses.fields(config_class):
        default = getattr(defaults, field.name)
        kind = {bool: boolean, int: integer, float: float}.get(type(default), text)
        parser.add_argument(f"--{field.name}", type=kind, default=default)
    return parser
