"""lightcycle: a Lightning FashionMNIST classifier taken through its MLflow lifecycle.

This package root stays import-free on purpose: the registry and promotion steps must
start without paying for torch or Lightning, and logged models ship this package as code.
"""

__version__ = "0.1.0"
