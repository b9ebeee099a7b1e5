"""Small argparse helpers shared by the step scripts."""

from __future__ import annotations

import argparse


def boolean(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
