"""The real-injection benchmark's floor: its exact variances match noise draws."""

import numpy as np

from benchmarks.foreign_sets import injection_floor

BANDS = ["g", "r", "i"]


def _gauss(shape, cy, cx, s):
    y, x = np.indices(shape)
    g = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
    return g / g.sum()


def test_injection_floor_matches_monte_carlo():
    rng = np.random.default_rng(0)
    shape = (3, 24, 24)
    host = np.stack([f * _gauss(shape[1:], 11, 10, 2.0) for f in (300, 500, 700)])
    donor = np.stack([f * _gauss(shape[1:], 13, 14, 1.6) for f in (400, 300, 250)])
    host_var = np.full(shape, 1.0)
    # the donor's real stamp carries its own noise where it is bright
    inside = donor > 0.02 * donor.max(axis=(1, 2), keepdims=True)
    stamp_var = np.where(inside, 0.6, 0.0)
    comp_var = host_var + stamp_var
    F_truth = (donor * inside).sum(axis=(1, 2))
    templates = np.stack([host, donor * inside])
    sig = injection_floor(host_var, comp_var, stamp_var, templates, host[None], F_truth, BANDS)

    errs = []
    for _ in range(3000):
        n_host = rng.standard_normal(shape) * np.sqrt(host_var)
        n_stamp = rng.standard_normal(shape) * np.sqrt(stamp_var)
        row = []
        for b in (1, 2, 0):  # r, i, g as the floor orders them
            X = templates[:, b].reshape(2, -1)
            w2 = 1 / comp_var[b].ravel()
            d_alone = (host[b] + n_host[b]).ravel()
            stamp = (donor[b] * inside[b] + n_stamp[b]).ravel()
            a = np.linalg.solve((X * w2) @ X.T, (X * w2) @ (d_alone + stamp))
            alone = (host[b].ravel() / 1) @ d_alone / (host[b].ravel() @ host[b].ravel())
            # the host against its alone estimate, the donor against its stamp's sum
            row.append([a[0] - alone, a[1] * F_truth[b] / stamp.sum() - 1])
        errs.append(row)
    errs = np.array(errs)  # draws, band (r, i, g), source
    mc = errs.std(axis=0).T  # source, band
    np.testing.assert_allclose(sig, mc, rtol=0.08)
    # the cut-out's noise, shared with the truth, mostly cancels: the host's
    # floor is well below its own noise (1 / its optimal S/N)
    alone_sigma = 1 / np.sqrt((host[1] ** 2 / host_var[1]).sum())
    assert sig[0, 0] < 0.8 * alone_sigma
