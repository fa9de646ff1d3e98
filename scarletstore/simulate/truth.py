"""Scoring against simulation truth: one-to-one position matching."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def match_positions(ay, ax, by, bx, radius: float):
    """One-to-one matching of two position lists, closest pairs first.

    Returns
    -------
    ma : (len(ay),) int, index into b of each a's match, -1 when unmatched
    mb : (len(by),) int, index into a of each b's match, -1 when unmatched
    """
    ma = np.full(len(ay), -1)
    mb = np.full(len(by), -1)
    if len(ay) == 0 or len(by) == 0:
        return ma, mb
    sdm = cKDTree(np.c_[ay, ax]).sparse_distance_matrix(cKDTree(np.c_[by, bx]), radius,
                                                         output_type="ndarray")
    for k in np.argsort(sdm["v"], kind="stable"):
        i, j = sdm["i"][k], sdm["j"][k]
        if ma[i] < 0 and mb[j] < 0:
            ma[i], mb[j] = j, i
    return ma, mb
