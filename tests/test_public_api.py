"""What docs/store.md shows of the top-level API exists there."""

from __future__ import annotations

import scarletstore as ss
from scarletstore.store.store import store_files


def test_store_files_is_public(tmp_path):
    # docs/store.md names ss.store_files beside ss.copy_store; it raised AttributeError
    assert ss.store_files is store_files and "store_files" in dir(ss) and "store_files" in ss.__all__
    assert ss.store_files(tmp_path / "none.h5") == [tmp_path / "none.h5"]
