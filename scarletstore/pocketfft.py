"""scipy.fft's 2-d transforms of numpy arrays, without importing scipy.fft.

``import scipy.fft`` costs ~0.18 s CPU (it imports scipy.special and scipy's
array-API layer), a tenth of a one-band ``catalog`` call, which needs a
handful of small transforms (difference kernels, model convolution). The
transforms themselves are scipy's compiled pocketfft module
(``scipy.fft._pocketfft.pypocketfft``, a few ms to load on its own).

The functions here make the calls scipy.fft's numpy backend makes for the
same arguments (the same dtype conversion, zero padding or cropping,
normalisation code and default worker count, see
``scipy/fft/_pocketfft/basic.py``), so their results are scipy.fft's bit for
bit (tests/test_pocketfft.py compares them). Only what the package uses is
here: 2-d transforms over the last two axes with the default ("backward")
normalisation, ``next_fast_len`` and the shifts. When the compiled module
cannot be loaded on its own, every name is scipy.fft's own function.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys

import numpy as np

_NAME = "scipy.fft._pocketfft.pypocketfft"


def _load_compiled():
    """scipy's pypocketfft extension module (shared with scipy.fft), or None."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    try:
        spec = importlib.util.find_spec("scipy")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(spec.submodule_search_locations[0], "fft", "_pocketfft")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "pypocketfft" + suffix)
        if os.path.isfile(path):
            break
    else:
        return None
    module_spec = importlib.util.spec_from_file_location(_NAME, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[_NAME] = module  # a later import of scipy.fft uses this same module
    try:
        module_spec.loader.exec_module(module)
    except Exception:  # an unusual build: scipy.fft itself then
        del sys.modules[_NAME]
        return None
    return module


compiled = _load_compiled()

fftshift = np.fft.fftshift  # what scipy.fft's shifts call for numpy arrays
ifftshift = np.fft.ifftshift


def _asfarray(x) -> np.ndarray:
    """scipy.fft's input conversion: float or complex, native byte order, aligned."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        return np.asarray(x, np.float32)
    if x.dtype.kind not in "fc":
        return np.asarray(x, np.float64)
    return np.array(x, dtype=x.dtype.newbyteorder("="), copy=True if not x.flags["ALIGNED"] else None)


def _shape_axes(x: np.ndarray, s) -> tuple[list[int], list[int]]:
    """Transform lengths and (non-negative) axes of a transform over the last two axes."""
    if x.ndim < 2:
        raise ValueError("2-d transforms need at least two axes")
    axes = [x.ndim - 2, x.ndim - 1]
    shape = [x.shape[a] for a in axes] if s is None else [
        x.shape[a] if int(n) == -1 else int(n) for n, a in zip(s, axes, strict=True)]
    if any(n < 1 for n in shape):
        raise ValueError(f"invalid number of data points ({shape}) specified")
    return shape, axes


def _fix_shape(x: np.ndarray, shape, axes) -> tuple[np.ndarray, bool]:
    """``x`` cropped or zero-padded to ``shape`` along ``axes`` (and whether it was copied)."""
    index = [slice(None)] * x.ndim
    pad = False
    for n, ax in zip(shape, axes):
        index[ax] = slice(0, min(n, x.shape[ax]))
        pad |= x.shape[ax] < n
    index = tuple(index)
    if not pad:
        return x[index], False
    full = list(x.shape)
    for n, ax in zip(shape, axes):
        full[ax] = n
    z = np.zeros(full, x.dtype)
    z[index] = x[index]
    return z, True


def _workers(workers) -> int:
    if workers is None:
        return 1  # scipy.fft's default outside a set_workers() context
    if workers < 1:
        raise ValueError("workers must be a positive number here")
    return int(workers)


def _c2c(forward: bool, x, s=None, workers=None):
    x = np.asarray(x)
    tmp = _asfarray(x)
    shape, axes = _shape_axes(tmp, s)
    copied = tmp is not x and tmp.base is None  # a private copy may be transformed in place
    tmp, padded = _fix_shape(tmp, shape, axes)
    out = tmp if (copied or padded) and tmp.dtype.kind == "c" else None
    return compiled.c2c(tmp, axes, forward, 0 if forward else 2, out, _workers(workers))


def fft2(x, s=None, workers=None):
    """``scipy.fft.fft2(x, s, workers=workers)``."""
    return _c2c(True, x, s, workers)


def ifft2(x, s=None, workers=None):
    """``scipy.fft.ifft2(x, s, workers=workers)``."""
    return _c2c(False, x, s, workers)


def rfft2(x, s=None, workers=None):
    """``scipy.fft.rfft2(x, s, workers=workers)``."""
    tmp = _asfarray(x)
    if not np.isrealobj(tmp):
        raise TypeError("x must be a real sequence")
    shape, axes = _shape_axes(tmp, s)
    tmp, _ = _fix_shape(tmp, shape, axes)
    return compiled.r2c(tmp, axes, True, 0, None, _workers(workers))


def irfft2(x, s=None, workers=None):
    """``scipy.fft.irfft2(x, s, workers=workers)``."""
    tmp = _asfarray(x)
    if np.isrealobj(tmp):
        tmp = tmp + 0.0j
    shape, axes = _shape_axes(tmp, s)
    if s is None:
        shape[-1] = (tmp.shape[axes[-1]] - 1) * 2
    last = shape[-1]
    shape[-1] = last // 2 + 1
    tmp, _ = _fix_shape(tmp, shape, axes)
    return compiled.c2r(tmp, axes, last, False, 2, None, _workers(workers))


@functools.lru_cache
def next_fast_len(target: int, real: bool = False) -> int:
    """``scipy.fft.next_fast_len``: the smallest fast transform length >= ``target``."""
    return compiled.good_size(target, real)


if compiled is None:  # pragma: no cover - depends on the scipy build
    from scipy.fft import fft2, ifft2, irfft2, next_fast_len, rfft2  # noqa: F811
