"""Parametric (exponential + de Vaucouleurs) templates for faint uncontested sources."""

import numpy as np
import pytest

from scarletstore.deblend import DeblendConfig
from scarletstore.deblend import cmodel
from scarletstore.deblend.scarlet import deblend_scarlet

galsim = pytest.importorskip("galsim")


def _truncated_sersic(n, hlr, trunc):
    """A unit-flux Sersic profile cut at ``trunc`` x its nominal half-light radius (as the simulator)."""
    scale = galsim.Sersic(n, half_light_radius=hlr).scale_radius
    return galsim.Sersic(n, scale_radius=scale, trunc=trunc * hlr, flux=1.0)


def _flux(gal, config, size=61):
    psfs, images = [], []
    for fwhm in (0.8, 0.9):
        psf = galsim.Moffat(beta=3.5, fwhm=fwhm, trunc=4.0)
        psfs.append(psf.drawImage(nx=41, ny=41, scale=0.2).array)
        images.append(galsim.Convolve(gal, psf).drawImage(nx=size, ny=size, scale=0.2).array)
    images = np.array(images, np.float32)
    var = np.full(images.shape, 1e-4, np.float32)
    res = deblend_scarlet(images, var, None, None, np.array(psfs), np.array([[size // 2, size // 2]]), config)
    flux = sum(c.spectrum * c.morph.sum() for c in res.sources[0].components)
    return flux / images.sum(axis=(1, 2)) - 1


def test_mixtures_have_unit_flux():
    assert cmodel.EXP_AMP.sum() == pytest.approx(1.0)
    assert cmodel.DEV_AMP.sum() == pytest.approx(1.0)
    t = cmodel.render(np.array([0.2, -0.1, np.log(2.0), 0.3, -0.2, 0.5]), (81, 81), (0, 0), (40.0, 40.0), 0.64)
    assert t.sum() == pytest.approx(1.0, abs=0.01)  # 0.9 % of the de Vaucouleurs half lies past 8 r_e


@pytest.mark.parametrize("n, hlr, trunc, tol", [(1, 0.6, 4.5, 0.005), (4, 0.3, 8.0, 0.012)])
def test_noise_free_galaxy_flux(n, hlr, trunc, tol):
    gal = _truncated_sersic(n, hlr, trunc).shear(e1=0.1, e2=-0.2)
    free = _flux(gal, DeblendConfig())
    param = _flux(gal, DeblendConfig(cmodel_snr=1e30))
    # the free morphology loses its wings below the sparsity threshold ...
    assert np.all(free < -0.03)
    # ... which the template's profile restores (its total, past the box)
    assert np.all(np.abs(param) < tol), param
