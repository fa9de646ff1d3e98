"""Progress bars that show on a terminal and stay quiet when piped."""

from __future__ import annotations

import sys


def progress(iterable=None, total=None, desc=None, enabled=True, **kwargs):
    """A tqdm bar, disabled unless ``enabled`` and stderr is a terminal."""
    from tqdm.auto import tqdm  # tqdm.auto probes for notebooks: paid only when a bar is made

    show = enabled and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not show, leave=False,
                file=sys.stderr, **kwargs)
