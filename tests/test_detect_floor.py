"""bench_detect's deblended-significance floor against closed forms for two Gaussians."""

import numpy as np
import pytest

from benchmarks.bench_detect import deblended_significance

SIGMA = 2.0
SHAPE = (72, 72)


def _gauss(cy, cx):
    y, x = np.indices(SHAPE)
    g = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * SIGMA ** 2))
    return g / g.sum()


def _pair(d, f1=1000.0, f2=300.0, var=1.0):
    t1 = np.stack([f1 * _gauss(36, 24), 0.5 * f1 * _gauss(36, 24)])
    t2 = np.stack([f2 * _gauss(36, 24 + d), 2.0 * f2 * _gauss(36, 24 + d)])
    box = (0, 0) + SHAPE
    return [t1, t2], [box, box], np.full((2,) + SHAPE, var)


@pytest.mark.parametrize("d", [1.0, 2.0, 3.0, 4.0, 6.0])
def test_two_gaussians_closed_form(d):
    tmpl, boxes, var = _pair(d)
    u2 = (d / SIGMA) ** 2
    rho = np.exp(-u2 / 4)  # correlation of two unit-flux Gaussians d apart
    plain_band = np.sqrt([(t * t).sum() for t in tmpl[1]])
    # amplitudes only: each band's amplitude sigma is 1 / (S_b sqrt(1 - rho^2)); the known-SED
    # amplitude adds the bands' information
    amp = deblended_significance(tmpl, boxes, var, centres=False)
    expect = np.hypot(*plain_band) * np.sqrt(1 - rho ** 2)
    assert amp["amp_sn"][1] == pytest.approx(expect, rel=1e-3)
    assert amp["dchi2"][1] == pytest.approx(expect ** 2, rel=1e-3)
    # centres free too: removing source 2 leaves what span{T1, dT1/dx, dT1/dy} cannot absorb,
    # |T2|^2 (1 - rho^2 - rho_x^2) with rho_x = (d / sigma / sqrt 2) exp(-d^2 / 4 sigma^2)
    # (one band: a shift is shared by the bands, which couples them when the SEDs differ)
    free = deblended_significance([t[:1] for t in tmpl], boxes, var[:1])
    lr = plain_band[0] ** 2 * (1 - np.exp(-u2 / 2) * (1 + u2 / 2))
    assert free["dchi2"][1] == pytest.approx(lr, rel=2e-3)
    assert free["plain"][1] == pytest.approx(plain_band[0], rel=1e-9)
    assert free["amp_sn"][1] <= plain_band[0] * np.sqrt(1 - rho ** 2) * (1 + 1e-9)
    both = deblended_significance(tmpl, boxes, var)  # two bands: between the one-band and no-shift cases
    assert lr < both["dchi2"][1] <= amp["dchi2"][1] * (1 + 1e-9)
    assert both["z_lr"][1] < np.sqrt(both["dchi2"][1])  # the 2-band mixture costs significance


def test_significance_falls_as_they_merge_and_is_plain_when_apart():
    seps = [0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 14.0]
    res = [deblended_significance(*_pair(d)) for d in seps]
    amp = np.array([r["amp_sn"][1] for r in res])
    lr = np.array([r["dchi2"][1] for r in res])
    assert np.all(np.diff(amp) > 0) and np.all(np.diff(lr) > 0)
    far = res[-1]
    assert far["amp_sn"][1] == pytest.approx(far["plain"][1], rel=1e-6)
    assert far["dchi2"][1] == pytest.approx(far["plain"][1] ** 2, rel=1e-6)
    assert amp[0] < 0.05 * far["plain"][1]
    # noise scales every significance as 1 / sigma
    r4 = deblended_significance(*_pair(2.0, var=4.0))
    assert r4["amp_sn"][1] == pytest.approx(res[2]["amp_sn"][1] / 2, rel=1e-9)


def test_masked_pixels_and_empty_band():
    tmpl, boxes, var = _pair(20.0)
    tmpl[1][0] = 0.0  # source 2 has no light in band 0: one amplitude
    good = np.ones(var.shape, bool)
    good[1, :, 45:] = False  # band 1 masked right of source 2's centre column (x = 44)
    r = deblended_significance(tmpl, boxes, var, good)
    assert r["nbands"][1] == 1
    left = np.sqrt((tmpl[1][1][:, :45] ** 2).sum())
    assert left < 0.85 * np.sqrt((tmpl[1][1] ** 2).sum())
    assert r["plain"][1] == pytest.approx(left, rel=1e-9)
    # alone, removing it loses all its information; its own centre, now coupled to its
    # amplitude by the cut profile, costs amplitude S/N
    assert r["dchi2"][1] == pytest.approx(r["plain"][1] ** 2, rel=1e-6)
    assert r["amp_sn"][1] < 0.9 * r["plain"][1]


def test_monte_carlo_amplitude_sigma():
    """The amplitude sigma (centres free) is the scatter of the linearised least-squares fit."""
    rng = np.random.default_rng(1)
    tmpl, boxes, var = _pair(3.0, f1=200.0, f2=100.0)
    r = deblended_significance([t[:1] for t in tmpl], boxes, var[:1])
    from benchmarks.bench_detect import _shift_derivatives

    cols = []
    for t in tmpl:
        dy, dx = _shift_derivatives(t[:1])
        cols += [t[0].ravel(), dy[0].ravel(), dx[0].ravel()]
    X = np.stack(cols, 1)
    truth = X @ np.array([1.0, 0, 0, 1.0, 0, 0])
    fits = np.linalg.lstsq(X, truth[:, None] + rng.standard_normal((truth.size, 4000)), rcond=None)[0]
    assert np.std(fits[3]) == pytest.approx(1 / r["amp_sn"][1], rel=0.05)
