"""The coadd's spill files hold the warps on disk, not mapped between accesses."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from scarletstore.coadd.pipeline import _Spill


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_spilled_arrays_round_trip_and_are_not_left_mapped(tmp_path):
    spill = _Spill(tmp_path, 3, (50, 40))
    a = spill.array("image", np.float32)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 50, 40)).astype(np.float32)
    for i in range(3):
        a[i] = x[i]
    np.testing.assert_array_equal(a[[2, 0]], x[[2, 0]])
    a[1, :10] = 0
    assert a[1][:10].sum() == 0 and a[1][10:].sum() == x[1, 10:].sum()
    b = spill.array("rejected", bool)
    b[[0, 2]] = np.ones((2, 50, 40), bool)
    assert b[0].all() and not b[1].any()
    # Nothing of the spill folder stays mapped: a kept map counts every touched page as resident.
    with open("/proc/self/maps") as maps:
        assert str(tmp_path) not in maps.read()
