"""FFT convolutions of grid-sized images with small kernels, sharing transforms.

Every visit's warp is convolved with several kernels (its matching kernel and
its square; its PSF and the PSF squared for the Kaiser sums), and several
images with the same kernel. :class:`Convolver` pads once to a fast FFT size
(``scipy.fft.next_fast_len``, room for the whole linear convolution: no
wrap-around), uses real transforms, and lets a caller transform an image or a
kernel once and reuse it for every product. Transforms are single-threaded
(``workers=1``): the machine's cores belong to the dask workers, not to one
FFT. Single precision: the warps are stored as float32 and the transforms'
rounding (~1e-7 of the image's rms) is far below the noise.
"""

from __future__ import annotations

import numpy as np
from scipy import fft


class Convolver:
    """``same``-mode convolutions of ``shape`` images with odd kernels of side at most ``kernel_size``."""

    def __init__(self, shape, kernel_size: int, dtype=np.float32):
        self.shape = tuple(int(n) for n in shape)
        self.kernel_size = int(kernel_size)
        self.dtype = np.dtype(dtype)
        self.padded = tuple(fft.next_fast_len(n + self.kernel_size - 1, real=True) for n in self.shape)

    def image(self, a) -> np.ndarray:
        """Transform of an image (``shape``), zero-padded."""
        return fft.rfft2(np.asarray(a, self.dtype), s=self.padded, workers=1)

    def kernel(self, k) -> np.ndarray:
        """Transform of an odd kernel, placed so the product is a ``same`` convolution."""
        k = np.asarray(k, self.dtype)
        if k.shape[0] > self.kernel_size or k.shape[1] > self.kernel_size or not (k.shape[0] % 2 and k.shape[1] % 2):
            raise ValueError(f"kernel {k.shape} is not odd or larger than {self.kernel_size}")
        return fft.rfft2(k, s=self.padded, workers=1)

    def back(self, product, k_shape) -> np.ndarray:
        """The ``same`` part of the inverse transform of ``image(a) * kernel(k)`` (k of shape ``k_shape``)."""
        full = fft.irfft2(product, s=self.padded, workers=1)
        y0, x0 = (k_shape[0] - 1) // 2, (k_shape[1] - 1) // 2
        return full[y0:y0 + self.shape[0], x0:x0 + self.shape[1]]

    def convolve(self, a_hat, k) -> np.ndarray:
        """``same`` convolution of a transformed image with kernel ``k``."""
        return self.back(a_hat * self.kernel(k), np.shape(k))

    def dilate(self, a_hat, footprint) -> np.ndarray:
        """Binary dilation of a transformed 0/1 image by ``footprint`` (as ``ndimage.binary_dilation``).

        The convolution counts the set pixels under the footprint; any count
        (an integer, rounded far less than 0.5) above zero is in the dilation.
        """
        return self.convolve(a_hat, np.asarray(footprint, self.dtype)) > 0.5
