"""Public names of a package imported on first use (PEP 562), so `--help` costs no torch import."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`: `table` maps a public name to the module defining it
    (absolute, or relative to `package` when it starts with '.'). A name is imported when first read,
    then kept in the package's namespace."""

    def __getattr__(name: str) -> Any:  # noqa: N807
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # later reads skip this function
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
