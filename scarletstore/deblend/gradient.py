"""A colour gradient shared by the one-component sources of a field (issue 20,
``DeblendConfig.shared_gradient``; docs/design.md, "Colours of faint sources").

Band b's template of such a component is ``m + alpha_b D`` with the zero-sum
outskirt shape ``D = (r^2 / <r^2> - 1) m``; each fitted blend contributes its
share of alpha's weighted least squares (:func:`gradient_sums`), the driver
(``run.deblend_exposure``) sums the shares over the field and re-solves the
blends' spectra with the field's alpha (:func:`shared_gradient_spectra`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import kernels as _k
from .config import DeblendConfig
from .scarlet import LS_BLOCK_SWEEPS, LS_BLOCK_TOL, _blend_inputs, _observed_components, _Rendered


GRADIENT_Z = 2.0    # alpha_b is shrunk by max(0, 1 - (GRADIENT_Z / z_b)^2), z_b its S/N over the field
GRADIENT_MAX = 1.0  # ... and clipped to +- this


def _gradient_components(source):
    """Components of one-component sources (no bulge): those that get the gradient."""
    source = np.asarray(source, np.int64)
    if source.size == 0:
        return source
    counts = np.bincount(source, minlength=int(source.max()) + 1)
    return np.flatnonzero(counts[source] == 1)


def _outskirt_shapes(rend, comps):
    """Per component in ``comps``: D = (r^2 / <r^2> - 1) m, r the distance from
    the morphology m's flux centroid and <r^2> its flux-weighted mean. D sums
    to zero, so m + a D moves light from the core to the outskirts (a > 0) or
    back (a < 0) and spectrum x sum(m) stays the band's flux; dividing by
    <r^2> makes a the same fraction for small and large sources. (A Gaussian
    blur of m minus m, sigma 0.8-3 px, was measured too and did less.)
    Other components: zero."""
    d = _Rendered()
    d.spec, d.source, d.box, d.off = rend.spec, rend.source, rend.box, rend.off
    d.morph = np.zeros_like(rend.morph)
    for k in comps:
        m = rend.view(k).astype(np.float64)
        ms = m.sum()
        if not ms > 0:
            continue
        yy, xx = np.mgrid[:m.shape[0], :m.shape[1]]
        r2 = (yy - (yy * m).sum() / ms) ** 2 + (xx - (xx * m).sum() / ms) ** 2
        mr2 = (r2 * m).sum() / ms
        if mr2 > 0:
            d.morph[rend.off[k]:rend.off[k] + m.size] = ((r2 / mr2 - 1) * m).ravel()
    return d


def _paste(flats, spec, comps, cbox, coff, shape):
    """sum over ``comps`` of spectrum x convolved image, on the blend grid (float64)."""
    B, H, W = shape
    out = np.zeros(shape)
    for k in comps:
        y0, x0, h, wd = cbox[k]
        out[:, y0:y0 + h, x0:x0 + wd] += spec[k][:, None, None] * flats[:, coff[k]:coff[k] + h * wd].reshape(B, h, wd)
    return out


def gradient_sums(rend, conv, data, w):
    """This blend's share of the field's one-parameter fit of the gradient:
    per band (num, den) with alpha_b = sum num / sum den over the field's
    blends. Linearised at alpha = 0 about the final spectra, each component's
    outskirt image made orthogonal (in the weights) to its own template, so
    its amplitude's re-fit is accounted for."""
    B, H, W = data.shape
    comps = _gradient_components(rend.source)
    num, den = np.zeros(B), np.zeros(B)
    if comps.size == 0:
        return np.stack([num, den])
    cbox, coff, flats = _observed_components(rend, conv, data.shape)
    _, _, dflats = _observed_components(_outskirt_shapes(rend, comps), conv, data.shape)
    spec = np.asarray(rend.spec, np.float64)
    res = np.where(w > 0, data - _paste(flats, spec, range(len(cbox)), cbox, coff, data.shape), 0.0)
    G = np.zeros(data.shape)
    for k in comps:
        y0, x0, h, wd = cbox[k]
        t = flats[:, coff[k]:coff[k] + h * wd].reshape(B, h, wd).astype(np.float64)
        dk = spec[k][:, None, None] * dflats[:, coff[k]:coff[k] + h * wd].reshape(B, h, wd)
        wk = w[:, y0:y0 + h, x0:x0 + wd]
        tt = np.einsum("bhw,bhw,bhw->b", wk, t, t)
        proj = np.where(tt > 0, np.einsum("bhw,bhw,bhw->b", wk, dk, t) / np.where(tt > 0, tt, 1.0), 0.0)
        G[:, y0:y0 + h, x0:x0 + wd] += dk - proj[:, None, None] * t
    num = np.einsum("bhw,bhw,bhw->b", w, G, res)
    den = np.einsum("bhw,bhw,bhw->b", w, G, G)
    return np.stack([num, den])


def shared_gradient_spectra(images, variance, bad, footprint, psfs, peaks, sources, alpha,
                            config: DeblendConfig):
    """Spectra of a fitted blend's ``sources`` (from :func:`deblend_scarlet`,
    blend pixels) re-solved with band b's template of every one-component
    source m + alpha_b D (:func:`_outskirt_shapes`), the morphologies
    unchanged. Returns (sources with the new spectra, the change of the
    stored model's loss: >= 0, the plain solve being that model's optimum)."""
    blend = _blend_inputs(images, variance, bad, footprint, psfs, peaks, config)
    B, H, W = blend.data.shape
    comps_of = [(i, j, c) for i, src in enumerate(sources) for j, c in enumerate(src.components)]
    if not comps_of:
        return sources, 0.0
    rend = _Rendered()
    rend.spec = np.stack([np.asarray(c.spectrum, np.float32) for _, _, c in comps_of])
    rend.source = np.array([i for i, _, _ in comps_of], np.int64)
    rend.box = np.array([(c.y0, c.x0) + c.morph.shape for _, _, c in comps_of], np.int64)
    sizes = rend.box[:, 2] * rend.box[:, 3]
    rend.off = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rend.morph = np.concatenate([np.asarray(c.morph, np.float32).ravel() for _, _, c in comps_of])
    comps = _gradient_components(rend.source)
    if comps.size == 0:
        return sources, 0.0
    cbox, coff, flats = _observed_components(rend, blend.conv, blend.data.shape)
    _, _, dflats = _observed_components(_outskirt_shapes(rend, comps), blend.conv, blend.data.shape)
    K = len(comps_of)
    tmpl = (flats + np.asarray(alpha, np.float32)[:, None] * dflats).astype(np.float32)
    A, r = _k.normal_equations(tmpl, cbox, coff, blend.data, blend.w, np.zeros(K, np.int64))
    spec0 = np.ascontiguousarray(rend.spec, np.float32)
    if len(sources) * H * W <= config.max_spectrum_cutoff:
        spec = _k.solve_spectra(A, r, np.zeros(K, np.int64))
        _k.keep_better_spectra(A, r, spec, spec0)
    else:
        spec = _k.solve_spectra_blocks(A, r, rend.source, spec0, LS_BLOCK_SWEEPS, LS_BLOCK_TOL)

    def loss(sp):
        m = _paste(flats, np.asarray(sp, np.float64), range(K), cbox, coff, blend.data.shape)
        return 0.5 * float(np.sum(blend.w * (m - blend.data) ** 2))

    dloss = loss(spec) - loss(spec0)
    for k, (i, j, c) in enumerate(comps_of):
        sources[i].components[j] = dataclasses.replace(c, spectrum=spec[k].astype(np.float32).copy())
    return sources, dloss

