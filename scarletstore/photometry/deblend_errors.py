"""The template part of a deblended child's flux error.

A child's model flux is its share ``s_i = T_i / sum_j T_j`` of the blend's
light. The noise part of its error is the catalog's ``sum s_i^2 var``; the
deblend adds the uncertainty of the templates themselves: how the light of
contested pixels is split is only as good as the ratio of the neighbours'
templates there. If the log of that ratio is uncertain by ``kappa`` (the
same sign over the child's overlap: a template too wide or too bright is so
everywhere it overlaps), each share moves by ``kappa s_i (1 - s_i)`` (the
logistic derivative) and the flux by

    sigma_model = kappa * sum_p s_i (1 - s_i) M_p,   M = sum_j T_j,

the child's *contested flux* times ``kappa``. It is zero for an isolated
child and largest for an equal split. ``kappa`` is one number for a run's
deblender, measured from simulations (``benchmarks/bench_measure.py
errors``); it is not a per-source fit.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def contested_flux(templates, footprint):
    """``sum_p T_i (1 - T_i / sum_j T_j)`` over the footprint for every child (positive parts)."""
    n, h, w = templates.shape
    out = np.zeros(n)
    for y in range(h):
        for x in range(w):
            if not footprint[y, x]:
                continue
            total = 0.0
            for i in range(n):
                t = templates[i, y, x]
                if t > 0:
                    total += t
            if total <= 0:
                continue
            for i in range(n):
                t = templates[i, y, x]
                if t > 0:
                    out[i] += t * (1.0 - t / total)
    return out
