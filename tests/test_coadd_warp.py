"""Lanczos-3 warp of a visit onto the coadd grid, and warped PSFs."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from scarletstore.coadd import kernels
from scarletstore.coadd.psf import moments, warp_psf
from scarletstore.coadd.warp import _exact_mapping, pixel_mapping, warp_arrays, warp_image


def tan_wcs(shape, scale_arcsec=0.2, rot_deg=0.0, crval=(150.1, 2.2), shift=(0.0, 0.0)):
    """TAN WCS centred on the image, rotated by rot_deg, with the reference pixel shifted by (dx, dy)."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [(nx + 1) / 2 + shift[0], (ny + 1) / 2 + shift[1]]
    t = np.radians(rot_deg)
    s = scale_arcsec / 3600.0
    w.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    return w


def gaussian(shape, xc, yc, sigma_x, sigma_y=None, theta=0.0, flux=1.0):
    """Analytic elliptical Gaussian sampled at pixel centres."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = x - xc, y - yc
    a = c * dx + s * dy
    b = -s * dx + c * dy
    g = np.exp(-0.5 * (a**2 / sigma_x**2 + b**2 / sigma_y**2))
    return flux * g / (2 * np.pi * sigma_x * sigma_y)


GRID = (96, 100)


def test_interpolated_mapping_matches_exact_transform():
    w_out = tan_wcs(GRID)
    w_in = tan_wcs((120, 110), scale_arcsec=0.17, rot_deg=37.0, shift=(4.3, -6.1))
    u, v, area = pixel_mapping(w_out, GRID, w_in)
    ue, ve, ae = _exact_mapping(w_out, GRID, w_in)
    assert np.max(np.abs(u - ue)) < 1e-4 and np.max(np.abs(v - ve)) < 1e-4
    assert np.allclose(area, (0.2 / 0.17) ** 2, rtol=1e-4)
    assert np.max(np.abs(area - ae)) < 1e-4


def test_band_limited_image_matches_analytic_shift_and_rotation():
    """A band-limited image warped by a rotation + sub-pixel shift equals the analytic pattern."""
    shape_in = (130, 130)
    w_in = tan_wcs(shape_in, rot_deg=23.0, shift=(3.37, -2.71))
    w_out = tan_wcs(GRID)
    y, x = np.mgrid[0:shape_in[0], 0:shape_in[1]].astype(float)
    waves = [(0.07, 0.03, 0.4), (-0.05, 0.11, 1.3), (0.12, -0.02, 2.0)]  # cycles/pixel, phase

    def pattern(u, v):
        return 10.0 + sum(np.cos(2 * np.pi * (kx * u + ky * v) + ph) for kx, ky, ph in waves)

    image = pattern(x, y)
    var = np.ones(shape_in)
    mask = np.zeros(shape_in, np.int32)
    warp = warp_image(image, var, mask, 1, w_in, w_out, GRID)
    ue, ve, _ = _exact_mapping(w_out, GRID, w_in)
    truth = pattern(ue, ve)  # pixel areas are equal (same scale)
    good = warp.good
    assert good.mean() > 0.9
    err = np.abs(warp.image[good] - truth[good])
    # Lanczos-3 is not exact for non-zero frequencies: about 0.3 % of each
    # wave's amplitude (rms) at these frequencies (< 0.13 cycles per pixel).
    assert err.max() < 0.025  # of three waves of amplitude 1 around 10
    assert np.sqrt(np.mean(err**2)) < 0.008
    # A wrong rotation sense or shift would be wrong by the waves' amplitude.
    assert np.abs(warp.image[good] - pattern(ve, ue)[good]).mean() > 0.5


def test_flux_conserved_across_pixel_scales():
    """A source keeps its total flux when the visit's pixels are larger and rotated."""
    shape_in = (80, 80)
    w_in = tan_wcs(shape_in, scale_arcsec=0.25, rot_deg=61.0, shift=(0.4, 0.3))
    w_out = tan_wcs(GRID)
    image = gaussian(shape_in, 41.3, 38.6, 2.2, 1.6, 0.5, flux=1000.0)
    warp = warp_image(image, np.ones(shape_in), np.zeros(shape_in, np.int32), 1, w_in, w_out, GRID)
    assert np.all(warp.good[20:-20, 20:-20])
    total = np.nansum(warp.image)
    assert total == pytest.approx(1000.0, rel=2e-3)
    # Without the area factor the total would be off by (0.25/0.2)^2 = 1.56.
    u, v, area = pixel_mapping(w_out, GRID, w_in)
    assert np.median(area) == pytest.approx(0.64, rel=1e-4)


def test_variance_matches_scatter_of_warped_noise():
    """Propagated variance (squared kernel weights) equals the measured per-pixel scatter."""
    rng = np.random.default_rng(11)
    shape_in = (140, 140)
    w_in = tan_wcs(shape_in, rot_deg=17.0, shift=(0.37, 0.81))
    w_out = tan_wcs(GRID)
    sigma2 = 4.0
    u, v, area = pixel_mapping(w_out, GRID, w_in)
    z = []
    out_var = None
    for _ in range(40):
        noise = rng.normal(0.0, np.sqrt(sigma2), shape_in)
        warp = warp_arrays(noise, np.full(shape_in, sigma2), np.zeros(shape_in, np.int32), 1,
                           u, v, area)
        z.append(warp.image[warp.good])
        out_var = warp.variance[warp.good]
    z = np.array(z)
    measured = z.var(axis=0)  # per-pixel scatter over realisations
    ratio = measured.mean() / out_var.mean()
    assert 0.97 < ratio < 1.03
    # The warped variance is below the input's: the kernel averages neighbours.
    assert out_var.mean() < 0.8 * sigma2
    # Pixel by pixel too: the phase-dependent variance tracks the scatter.
    hi = out_var > np.median(out_var)
    assert measured[hi].mean() / out_var[hi].mean() == pytest.approx(1, abs=0.04)
    assert measured[~hi].mean() / out_var[~hi].mean() == pytest.approx(1, abs=0.04)


def test_bad_input_masks_the_pixels_its_kernel_touches():
    shape_in = (40, 40)
    image = np.ones(shape_in)
    var = np.ones(shape_in)
    mask = np.zeros(shape_in, np.int32)
    mask[20, 20] = 1 << 3  # CR, a bad bit here
    mask[10, 30] = 1 << 5  # DETECTED: informational, not bad
    var[30, 10] = 0.0
    image[10, 10] = np.nan
    # Output pixel (y, x) samples input (y + 0.5, x + 0.5): every output pixel uses 6x6 inputs.
    Y, X = np.mgrid[0:40, 0:40].astype(float)
    warp = warp_arrays(image, var, mask, 1 << 3, X + 0.5, Y + 0.5, np.ones((40, 40)))
    bad = warp.status == kernels.BAD_INPUT
    # Input pixel 20 is touched by outputs whose taps floor(p+.5)-2..+3 hold 20: p in 17..22.
    for yc, xc in ((20, 20), (30, 10), (10, 10)):
        assert bad[yc - 3:yc + 3, xc - 3:xc + 3].all()
        assert not bad[yc - 4, xc - 4] and not bad[yc + 3, xc + 3]
    assert bad.sum() == 3 * 36
    assert warp.status[10, 30] == kernels.GOOD and warp.mask[10, 30] & (1 << 5)
    assert warp.mask[20, 20] & (1 << 3)
    # Kernel support leaving the visit: NO_DATA; interior good pixels are exact.
    nodata = warp.status == kernels.NO_DATA
    assert nodata[:, :2].all() and nodata[:, -3:].all() and not nodata[5:-5, 5:-5].any()
    assert np.allclose(warp.image[warp.good], 1.0)


def test_grid_outside_the_visit_is_no_data():
    # Reference pixel 60 columns right of the visit centre: the visit covers grid columns -35..14.
    w_in = tan_wcs((50, 50), shift=(60.0, 0.0))
    w_out = tan_wcs(GRID)
    warp = warp_image(np.ones((50, 50)), np.ones((50, 50)), np.zeros((50, 50), np.int32), 1,
                      w_in, w_out, GRID)
    nodata = warp.status == kernels.NO_DATA
    assert nodata[:, 15:].all() and nodata[:20].all() and nodata[76:].all()
    assert warp.good[27:69, 0:10].all()
    assert np.isnan(warp.image[nodata]).all()


def test_warped_psf_of_rotated_visit_matches_a_star_drawn_in_it():
    """A star in a rotated, rescaled visit, warped to the grid, has the warped PSF's shape."""
    shape_in = (90, 90)
    rot, scale_in = 50.0, 0.18
    w_in = tan_wcs(shape_in, scale_arcsec=scale_in, rot_deg=rot, shift=(0.3, -0.2))
    w_out = tan_wcs(GRID)
    sx, sy, th = 2.6, 1.5, 0.3  # elliptical PSF in visit pixels
    psf = gaussian((31, 31), 15, 15, sx, sy, th)
    psf /= psf.sum()
    # The star: the same profile at a sub-pixel position of the visit.
    star_xy_in = (44.37, 46.81)
    star = gaussian(shape_in, *star_xy_in, sx, sy, th, flux=500.0)
    warp = warp_image(star, np.ones(shape_in), np.zeros(shape_in, np.int32), 1, w_in, w_out, GRID)
    gpsf = warp_psf(psf, w_in, w_out, GRID)
    assert gpsf.shape[0] % 2 == 1 and gpsf.sum() == pytest.approx(1.0)
    ra, dec = w_in.pixel_to_world_values(*star_xy_in)
    xs, ys = w_out.world_to_pixel_values(ra, dec)
    ix, iy = int(round(float(xs))), int(round(float(ys)))
    h = gpsf.shape[0] // 2
    cut = warp.image[iy - h:iy + h + 1, ix - h:ix + h + 1]
    assert np.isfinite(cut).all()
    _, _, sxx, syy, sxy = moments(cut)
    pxc, pyc, pxx, pyy, pxy = moments(gpsf)
    assert pxc == pytest.approx(h, abs=1e-3) and pyc == pytest.approx(h, abs=1e-3)
    for a, b in ((sxx, pxx), (syy, pyy)):
        assert a == pytest.approx(b, rel=0.005)
    assert sxy == pytest.approx(pxy, abs=0.005 * (pxx + pyy))
    # The unwarped visit PSF (the peer's choice) is off by far more.
    _, _, qxx, qyy, qxy = moments(psf)
    assert abs(qxx - sxx) / sxx > 0.1 or abs(qxy - sxy) > 0.1 * (sxx + syy)


def test_fast_lanczos_weights_equal_the_direct_formula():
    w = np.empty(6)
    for pos in (3.0, 3.25, 7.5, -1.7, 10.999, 0.5):
        i0 = kernels._weights(pos, w)
        ref = np.array([kernels.lanczos3(pos - (i0 + k)) for k in range(6)])
        assert i0 == int(np.floor(pos)) - 2
        np.testing.assert_allclose(w, ref / ref.sum(), atol=1e-14)


def test_tabulated_lanczos_weights_match_the_kernel():
    """The image warp's interpolated weight table is within 1e-7 of the exact
    normalised weights at any phase, and sums to one (a constant stays constant)."""
    w, t = np.empty(6), np.empty(6)
    rng = np.random.default_rng(2)
    worst = 0.0
    for pos in np.r_[rng.uniform(-5, 50, 2000), 3.0, 7.5, 10.999999, 4.0 + 1e-9]:
        i0 = kernels._weights(pos, w)
        assert kernels._table_weights(pos, t) == i0
        worst = max(worst, np.abs(t - w).max())
        assert abs(t.sum() - 1.0) < 1e-12
    assert worst < 1e-7
