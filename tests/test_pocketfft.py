"""scarletstore.pocketfft against scipy.fft: the same transforms, bit for bit, without the import."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.fft as sfft

from scarletstore import pocketfft as pf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)  # bit for bit (NaN-free inputs)


def _inputs(rng):
    for shape in [(1, 1), (2, 3), (7, 5), (16, 16), (31, 40), (3, 41, 41), (2, 3, 25, 18), (97, 64)]:
        for dtype in (np.float64, np.float32, np.complex128, np.complex64, np.int32, np.float16):
            x = rng.normal(size=shape) * 100
            if np.dtype(dtype).kind == "c":
                x = x + 1j * rng.normal(size=shape)
            yield x.astype(dtype)
    x = rng.normal(size=(20, 30))
    yield x[::2, ::3]  # strided
    yield x.T  # Fortran order
    yield x.astype(">f8")  # big-endian
    yield [[1.0, 2.0], [3.0, 4.0]]  # a list


@pytest.mark.parametrize("seed", [0, 1])
def test_transforms_are_scipy_fft_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    for x in _inputs(rng):
        h, w = np.shape(x)[-2:]
        sizes = [None, (h, w), (h + 3, w + 5), (max(1, h - 1), w), (2 * h + 1, 2 * w), (-1, w + 2)]
        for s in sizes:
            for workers in (None, 1, 2):
                _same(pf.fft2(x, s, workers=workers), sfft.fft2(x, s, workers=workers))
                _same(pf.ifft2(x, s, workers=workers), sfft.ifft2(x, s, workers=workers))
                if np.asarray(x).dtype.kind != "c":
                    _same(pf.rfft2(x, s, workers=workers), sfft.rfft2(x, s, workers=workers))
                _same(pf.irfft2(x, s, workers=workers), sfft.irfft2(x, s, workers=workers))
        _same(pf.fftshift(np.asarray(x)), sfft.fftshift(np.asarray(x)))
        _same(pf.ifftshift(np.asarray(x)), sfft.ifftshift(np.asarray(x)))
        f = sfft.rfft2(np.real(np.asarray(x, np.complex128)))
        _same(pf.irfft2(f, (h, w)), sfft.irfft2(f, (h, w)))  # the round trip the fits make


def test_next_fast_len_and_errors():
    for n in list(range(1, 300)) + [1021, 4093, 93059]:
        for real in (False, True):
            assert pf.next_fast_len(n, real=real) == sfft.next_fast_len(n, real=real)
    with pytest.raises(TypeError):
        pf.rfft2(np.ones((3, 3), complex))
    with pytest.raises(ValueError):
        pf.fft2(np.ones(4))
    with pytest.raises(ValueError):
        pf.fft2(np.ones((3, 3)), (0, 3))


def test_package_kernels_match_scipy_fft(monkeypatch):
    # difference kernels and the model convolution, with this module and with scipy.fft
    from scarletstore.deblend import psf
    from scarletstore.measure import reconstruct

    rng = np.random.default_rng(7)
    y, x = np.mgrid[-12:13, -12:13]
    psfs = np.stack([np.exp(-(x ** 2 + (1.1 * y) ** 2) / (2 * s ** 2)) for s in (1.6, 2.1, 2.7)])
    psfs /= psfs.sum(axis=(1, 2), keepdims=True)
    model = psf.gaussian_psf(0.8, 11)
    stack = rng.random((4, 37, 29)).astype(np.float32)
    ours = psf.difference_kernels(psfs, model), reconstruct.convolve_stack(stack, psfs[1])
    monkeypatch.setattr(psf, "sfft", sfft)
    monkeypatch.setattr(reconstruct, "sfft", sfft)
    theirs = psf.difference_kernels(psfs, model), reconstruct.convolve_stack(stack, psfs[1])
    for a, b in zip((*ours[0], ours[1]), (*theirs[0], theirs[1])):
        _same(a, b)


def test_catalog_modules_do_not_import_scipy_fft():
    code = ("import sys\n"
            "import scarletstore.measure.catalog, scarletstore.deblend.psf\n"
            "import scarletstore.measure.reconstruct as r, numpy as np\n"
            "k = r.band_kernel(np.pad([[1.0]], 10), np.pad([[1.0]], 12))\n"
            "m = scarletstore.deblend.psf.gaussian_psf(0.8)  # a deblend's model PSF: no scipy.special\n"
            "print(sorted(m for m in sys.modules if m.startswith(('scipy.fft', 'scipy.special'))))\n"
            # scipy.fft imported afterwards works, on the very same compiled module
            "import scipy.fft, scarletstore.pocketfft as pf\n"
            "assert scipy.fft._pocketfft.basic.pfft is pf.compiled\n"
            "x = np.random.default_rng(0).random((5, 6))\n"
            "assert np.array_equal(scipy.fft.irfft2(scipy.fft.rfft2(x), (5, 6)), pf.irfft2(pf.rfft2(x), (5, 6)))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == ["['scipy.fft._pocketfft.pypocketfft']"]
