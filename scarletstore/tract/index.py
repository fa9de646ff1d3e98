"""The tract index ``OUT_DIR/tract.json``: grid, patches, their status and stores.

Written whole to a temporary file and renamed over the index (atomic on
POSIX), so a reader (or a tract run killed at any moment) always sees a
complete index in which each patch is ``pending``, ``done`` or ``failed``.
:class:`IndexWriter` rewrites it after every patch that finishes unless the
last rewrite took more than a tenth of the time since: an index of 10,000
patches (about 15 MB) is then rewritten every few seconds, not 10,000
times, and its writing stays under a tenth of the driver's time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import InputError
from .patches import Box, Patch

INDEX = "tract.json"
FORMAT = "scarletstore-tract"
VERSION = 1
STATUSES = ("pending", "done", "failed")


def patch_entry(patch: Patch) -> dict:
    """The index entry of a patch before it is run."""
    return {"name": patch.name, "i": patch.i, "j": patch.j, "outer": patch.outer.to_dict(),
            "inner": patch.inner.to_dict(), "store": f"{patch.name}/store.h5",
            "status": "pending", "attempts": 0, "error": ""}


def write_index(out_dir, index: dict) -> Path:
    """Write ``index`` as ``out_dir/tract.json`` atomically; returns the path."""
    out_dir = Path(out_dir)
    path = out_dir / INDEX
    tmp = out_dir / f".{INDEX}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(index, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


class IndexWriter:
    """Keeps ``out_dir/tract.json`` up to date with ``index`` at a bounded cost."""

    def __init__(self, out_dir, index: dict, share: float = 0.1):
        self.out_dir, self.index, self.share = Path(out_dir), index, share
        self.writes, self.seconds, self._last, self._cost = 0, 0.0, -float("inf"), 0.0

    def write(self) -> None:
        t = time.perf_counter()
        write_index(self.out_dir, self.index)
        self._last = time.perf_counter()
        self._cost = self._last - t
        self.writes += 1
        self.seconds += self._cost

    def update(self) -> None:
        """Write unless the last write was recent relative to what it cost."""
        if time.perf_counter() - self._last >= self._cost / self.share:
            self.write()


def read_index(out_dir) -> dict:
    """The tract index of ``out_dir``; InputError (one line) when absent or malformed."""
    path = Path(out_dir) / INDEX
    if not path.is_file():
        raise InputError(f"{out_dir}: no {INDEX}; make the tract with 'scarletstore tract' first")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable tract index ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise InputError(f"{path}: not a scarletstore tract index")
    if int(index.get("version", 0)) > VERSION:
        raise InputError(f"{path}: tract index version {index['version']} is newer than this "
                         f"scarletstore supports ({VERSION}); upgrade scarletstore")
    for p in index.get("patches", []):
        if p.get("status") not in STATUSES:
            raise InputError(f"{path}: patch {p.get('name')!r} has unknown status {p.get('status')!r}")
    return index


def patch_of(entry: dict) -> Patch:
    """The :class:`Patch` an index entry describes."""
    return Patch(int(entry["i"]), int(entry["j"]), Box(**entry["outer"]), Box(**entry["inner"]))
