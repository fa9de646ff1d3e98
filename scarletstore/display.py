"""Pictures: asinh colour composites after Lupton et al. (2004, PASP 116, 133).

The stretch acts on the total intensity I = (r + g + b) / 3 and every channel
is scaled by the same factor asinh(Q I / stretch) / (Q I), so colours are kept
even where bright cores saturate; a pixel whose largest channel exceeds 1 is
scaled down as a whole rather than clipped per channel.
"""

from __future__ import annotations

import numpy as np


def lupton_rgb(rgb, stretch: float = 0.5, q: float = 8.0, minimum=0.0) -> np.ndarray:
    """(3, H, W) red, green, blue images -> (H, W, 3) uint8 asinh composite.

    Parameters
    ----------
    rgb : (3, H, W) array, channels ordered red, green, blue
    stretch : linear range of the stretch (in image units)
    q : asinh softening; large q is closer to logarithmic
    minimum : black level, per channel or scalar
    """
    img = np.asarray(rgb, dtype=np.float64) - np.reshape(np.broadcast_to(minimum, (3,)), (3, 1, 1))
    img = np.clip(img, 0, None)
    intensity = img.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(intensity > 0, np.arcsinh(q * intensity / stretch) / (q * intensity), 0.0)
    out = img * scale[None]
    peak = out.max(axis=0)
    over = peak > 1
    out[:, over] /= peak[over]
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def rgb_bands(bands) -> list[int]:
    """Indices of three bands (reddest first) used as R, G, B."""
    bands = list(bands)
    n = len(bands)
    if n >= 3:
        order = [n - 1, n // 2, 0] if n < 5 else [n - 2, n // 2, 1]  # skip the noisiest u/y ends
        return order
    return [n - 1] * 3 if n == 1 else [1, 0, 0]


def auto_stretch(images: np.ndarray) -> float:
    """A stretch about five times the robust noise of the composite."""
    mean = np.mean(images, axis=0)
    mad = np.median(np.abs(mean - np.median(mean)))
    # the floor keeps noise-free images from stretching float round-off into view
    return float(max(5 * 1.4826 * mad, 1e-3 * np.abs(mean).max(), 1e-12))


def show_blend(data, models, bands, path, title: str = "", source_ids=None) -> None:
    """Write a PNG: data, model, residual, then each source's model (asinh RGB).

    Parameters
    ----------
    data : (B, h, w) observed image or None
    models : (n, B, h, w) per-source observed-frame models
    bands : band names (three are picked for R, G, B)
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import InputError
        raise InputError("pictures need matplotlib: pip install 'scarletstore[plot]'") from None
    idx = rgb_bands(bands)
    model = models.sum(axis=0)
    panels = []
    if data is not None:
        panels += [("data", data), ("model", model), ("residual", data - model)]
    else:
        panels += [("model", model)]
    for i, m in enumerate(models):
        sid = source_ids[i] if source_ids is not None else i
        panels.append((f"source {sid}", m))
    stretch = auto_stretch((data if data is not None else model)[idx]) if data is not None else \
        float(max(model.max() / 20, 1e-6))
    ncol = min(len(panels), 5)
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.6 * nrow + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (label, img) in zip(axes.ravel(), panels):
        rgb = img[idx]
        # residuals show on the same stretch as the data; negatives clip to black
        ax.imshow(lupton_rgb(rgb, stretch=stretch, q=8), origin="lower", interpolation="nearest")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{title}  (R,G,B = {','.join(bands[i] for i in idx)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
