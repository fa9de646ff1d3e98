"""The deblend benchmark's fresh noise draws (``field_draws``): the same scene, new noise."""

import numpy as np
import xarray as xr

from benchmarks.bench_deblend import _redraw


def _scene(rng):
    nb, ny, nx = 3, 80, 90
    stamps = {}
    truth = np.zeros((nb, ny, nx))
    for sid, (y0, x0, h, w) in enumerate([(5, 7, 21, 21), (40, 50, 25, 31), (50, 60, 15, 15)], 1):
        y, x = np.indices((h, w))
        prof = np.exp(-((y - h // 2) ** 2 + (x - w // 2) ** 2) / 18.0)
        stamp = np.stack([(100 + 50 * b) * sid * prof / prof.sum() for b in range(nb)]).astype(np.float32)
        stamps[sid] = ((y0, x0, h, w), stamp)
        truth[:, y0:y0 + h, x0:x0 + w] += stamp
    var = (0.5 + rng.uniform(0, 1, (nb, ny, nx))).astype(np.float32)
    mask = np.zeros((nb, ny, nx), np.int32)
    mask[:, 10:12, 30:60] = 1
    image = truth + rng.standard_normal(truth.shape) * np.sqrt(var)
    image[mask != 0] = 0.0
    ex = xr.Dataset({"image": (("band", "y", "x"), image.astype(np.float32)),
                     "variance": (("band", "y", "x"), var), "mask": (("band", "y", "x"), mask)})
    return ex, stamps, truth


def test_redraw_keeps_the_scene_and_draws_new_noise_of_the_variance_plane():
    ex, stamps, truth = _scene(np.random.default_rng(3))
    original = ex["image"].values.copy()
    assert _redraw(ex, stamps, 7, 0) is ex
    a, a2, b = _redraw(ex, stamps, 7, 1), _redraw(ex, stamps, 7, 1), _redraw(ex, stamps, 7, 2)
    np.testing.assert_array_equal(a["image"].values, a2["image"].values)  # reproducible
    masked = ex["mask"].values != 0
    np.testing.assert_array_equal(a["image"].values[masked], 0.0)  # bad pixels keep their value
    np.testing.assert_array_equal(a["variance"].values, ex["variance"].values)
    sd = np.sqrt(ex["variance"].values.astype(np.float64))
    z_new = ((a["image"].values - truth) / sd)[~masked]
    z_old = ((ex["image"].values - truth) / sd)[~masked]
    z_b = ((b["image"].values - truth) / sd)[~masked]
    assert abs(z_new.mean()) < 0.02 and abs(z_new.std() - 1) < 0.02  # noise of the variance plane
    assert abs(np.corrcoef(z_new, z_old)[0, 1]) < 0.03  # not the simulated noise again
    assert abs(np.corrcoef(z_new, z_b)[0, 1]) < 0.03  # draws differ from each other
    np.testing.assert_array_equal(ex["image"].values, original)  # the input is not changed
