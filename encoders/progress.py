"""Progress bars that show on a terminal and stay quiet in logs, pipes and with --quiet."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, disabled unless `enabled` and stderr is a terminal."""
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), **kwargs)
