"""PSF matching: kernels that take a visit's warped PSF to a common target.

The target is a circular Gaussian wider than every visit it is used for;
the kernel K with P * K = T is fitted in Fourier space,

    K^ = T^ conj(P^) / (|P^|^2 + lambda max|P^|^2),

a Wiener-regularised division: where the visit PSF carries no power the
(wider) target carries even less, and lambda keeps the division finite.
"""

from __future__ import annotations

import numpy as np

REGULARISATION = 1e-7
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def gaussian_target(fwhm_pixels: float, size: int) -> np.ndarray:
    """Circular Gaussian of FWHM ``fwhm_pixels`` on an odd ``size`` image, unit sum."""
    sigma = fwhm_pixels / FWHM_PER_SIGMA
    c = (size - 1) / 2.0
    y, x = np.mgrid[0:size, 0:size] - c
    g = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return g / g.sum()


def _pad(img, size):
    out = np.zeros((size, size))
    dy, dx = (size - img.shape[0]) // 2, (size - img.shape[1]) // 2
    out[dy:dy + img.shape[0], dx:dx + img.shape[1]] = img
    return out


def matching_kernel(psf, target, regularisation: float = REGULARISATION) -> np.ndarray:
    """Kernel K (odd, same size as the larger input, unit sum) with psf * K = target."""
    size = max(psf.shape[0], target.shape[0])
    n = 2 * size - 1  # room for the full convolution: no wrap-around
    p = np.fft.fft2(np.fft.ifftshift(_pad(psf, n)))
    t = np.fft.fft2(np.fft.ifftshift(_pad(target, n)))
    power = np.abs(p) ** 2
    k = t * np.conj(p) / (power + regularisation * power.max())
    kern = np.fft.fftshift(np.real(np.fft.ifft2(k)))
    c = n // 2
    h = size // 2
    kern = kern[c - h:c + h + 1, c - h:c + h + 1]
    return kern / kern.sum()
