"""A colour gradient shared by a field's one-component sources (issue 20;
DeblendConfig.shared_gradient), on galaxies built with one: a red compact
core in a blue extended disk."""

from __future__ import annotations

import json

import numpy as np
from conftest import gaussian_psf

from scarletstore.deblend import DeblendConfig


def _gradient_field(seed=0, n_side=5, step=36):
    """A grid of n_side^2 faint galaxies (core sigma 1.2 px, red; disk sigma
    3.5 px, blue) in g, r, i with unit noise; their positions and true g - i."""
    from scarletstore.ingest.exposure import make_exposure

    rng = np.random.default_rng(seed)
    size = n_side * step
    yy, xx = np.mgrid[:size, :size]
    core_sed, disk_sed = np.array([0.4, 1.0, 1.6]), np.array([1.6, 1.0, 0.6])
    image = np.zeros((3, size, size))
    ys, xs, gi = [], [], []
    psf = gaussian_psf(15, 1.5)
    for i in range(n_side):
        for j in range(n_side):
            cy, cx = step / 2 + i * step + rng.uniform(-1, 1), step / 2 + j * step + rng.uniform(-1, 1)
            flux = rng.uniform(300, 600)
            fc, fd = 0.4 * flux, 0.6 * flux
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            # observed profiles: intrinsic Gaussians convolved with the PSF (sigma 1.5)
            sc2, sd2 = 1.2 ** 2 + 1.5 ** 2, 3.5 ** 2 + 1.5 ** 2
            core = np.exp(-r2 / (2 * sc2)) / (2 * np.pi * sc2)
            disk = np.exp(-r2 / (2 * sd2)) / (2 * np.pi * sd2)
            image += fc * core_sed[:, None, None] * core + fd * disk_sed[:, None, None] * disk
            ys.append(cy)
            xs.append(cx)
            tot = fc * core_sed + fd * disk_sed
            gi.append(-2.5 * np.log10(tot[0] / tot[2]))
    image += rng.normal(0, 1, image.shape)
    exposure = make_exposure(image, np.ones_like(image), None, [psf] * 3, ["g", "r", "i"])
    return exposure, np.array(ys), np.array(xs), np.array(gi)


def test_shared_gradient_removes_the_red_bias_of_faint_colours():
    # One morphology per source weights its colour toward the (red) core: the
    # g - i of these galaxies comes out too red. With the shared gradient the
    # field's alpha is fitted (g outskirts brighter: alpha_g > 0 > alpha_i) and
    # the mean colour bias at least halves. Measured: bias +0.406 -> -0.033 mag
    # (alpha g / r / i +0.415 / 0 / -0.271, z 37.6 / 1.0 / -31.8).
    from scarletstore.deblend.run import deblend_exposure
    from scarletstore.detect.detect import detect
    from scarletstore.measure.compare import source_fluxes
    from scarletstore.simulate.truth import match_positions

    exposure, ys, xs, gi = _gradient_field()
    parents = detect(exposure, known=(ys, xs))
    bias = {}
    for on in (False, True):
        run = deblend_exposure(exposure, parents, DeblendConfig(shared_gradient=on))
        flux = source_fluxes(run)
        _, to_truth = match_positions(ys, xs, run["source_y"].values, run["source_x"].values, 1.5)
        rows = np.flatnonzero(to_truth >= 0)
        assert rows.size == ys.size
        assert (np.asarray(run["source_n_components"].values)[rows] == 1).all()
        col = -2.5 * np.log10(flux[rows, 0] / flux[rows, 2])
        bias[on] = float(np.mean(col - gi[to_truth[rows]]))
        if on:
            alpha = json.loads(run.attrs["shared_gradient"])
            print("alpha", alpha, "z", run.attrs["shared_gradient_z"])
            assert alpha[0] > 0 > alpha[2]
        else:
            assert "shared_gradient" not in run.attrs
    print("bias off / on", bias)
    assert bias[False] > 0.03
    assert abs(bias[True]) < 0.5 * bias[False]
