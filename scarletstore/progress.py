"""Progress bars that show on a terminal and stay quiet when piped."""

from __future__ import annotations

import sys


class _Quiet:
    """What a hidden bar does (iterate, count, close) without importing tqdm."""

    def __init__(self, iterable=None):
        self.iterable = iterable
        self.n = 0

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self):
        return len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress(iterable=None, total=None, desc=None, enabled=True, **kwargs):
    """A tqdm bar, disabled unless ``enabled`` and stderr is a terminal.

    A hidden bar is a stand-in with the same iterate / ``update`` / ``close``
    use: tqdm.auto probes for notebook widgets at import, which a piped or
    scripted call (every call of a pipeline) should not pay.
    """
    if not (enabled and sys.stderr.isatty()):
        return _Quiet(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, **kwargs)
