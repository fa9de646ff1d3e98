"""Read and write the Rubin science pipelines' persisted scarlet models (JSON).

Two layouts are read:

* **legacy** (unversioned, e.g. pipelines v29 ``deepCoadd_scarletModelData``):
  top-level ``psfShape`` + ``psf`` (the model-frame PSF, flattened) and
  ``blends`` keyed by the 64-bit blend id. Each blend has ``origin`` [y0, x0],
  ``shape`` [h, w], ``bands`` (alphabetical), ``psf`` (observed PSF per band,
  flattened) with ``psf_shape`` [B, h, w], ``psf_center`` [x, y], and
  ``sources`` keyed by the 64-bit source id. A source has ``peak_id``, a
  ``factorized`` list (``origin``, ``shape``, ``peak`` [y, x], ``spectrum``,
  ``morph`` flattened h*w) and a ``components`` list of cube components
  (``origin``, ``shape`` [B, h, w], ``peak``, ``model`` flattened).
* **versioned 1.0.x**: ``version``, ``model_type`` (``scarlet_model`` or
  ``lsst``), ``metadata`` and ``blends``. Arrays inside a ``metadata`` dict are
  either a flat list with ``<key>_shape`` (and optional ``<key>_dtype``, the
  keys listed in ``array_keys``), or a dict ``{"shape", "data", "dtype"}``
  (the image-PSF form). The model PSF is ``metadata.model_psf``; the observed
  PSF, bands and PSF centre of a blend sit in the blend's ``metadata``
  (``psf``, ``bands``, ``psf_center``) or, failing that, in an enclosing
  hierarchical blend's or the model's ``metadata``. Each blend carries
  ``blend_type``: ``blend`` (``origin``, ``shape``, ``sources``) or
  ``hierarchical`` (also ``hierarchical_blend`` / ``lsst_hierarchical``:
  ``children`` blends keyed by id). Each source carries ``source_type``:
  ``source`` (``components`` list, ``metadata`` with ``id`` and ``peak_id``)
  or ``isolated`` (``origin``, ``shape``, ``peak`` and ``span_array``, the
  0/1 footprint mask: Rubin rebuilds its model as image x mask). Components
  carry ``component_type``: ``factorized`` or ``cube`` (also the legacy name
  ``component``). An ``lsst`` model may hold further isolated sources in a
  model-level ``isolated`` dict keyed by source id.

Mapping to a run (schema ``run`` v2):

* Each leaf blend is one run blend with ``blend_parent_id`` = its 64-bit id and
  bbox from ``origin``/``shape``. Hierarchical blends are flattened to their
  leaves (ids must be unique); the chain of enclosing hierarchical ids of every
  leaf is kept in the ``config`` attribute (``"hierarchy": {leaf: [top, ...]}``)
  so that export rebuilds the same nesting.
* Each source keeps its 64-bit id (``source_id``) and ``peak_id``; its peak
  (``source_y``/``source_x``) is that of its first component.
* Factorized components keep spectrum and morphology exactly (float32); cube
  components become (band, h, w) cubes whose ``component_spectrum`` is the
  per-band sum (or the stored ``spectrum``, when the file carries one).
* Isolated sources get the source flag ``isolated`` and one cube component:
  their own pixels when the file has a ``model`` cube, otherwise the footprint
  mask repeated in every band. Such a mask is a *template*: redistribute mode
  then gives Rubin's image x mask, while model mode only gives the mask.
  Model-level isolated sources become single-source blends whose parent id is
  the source id (Rubin's isolated parents are their own catalog record).
* Observed PSFs are kept per blend (``blend_psf``), zero-padded to a common odd
  size and normalised to unit sum per band; the run ``psf`` is the first
  blend's. ``psf_center`` values are kept in ``config``.

:func:`write_lsst_models` writes the versioned 1.0.0 layout (``model_type``
``scarlet_model``), readable by :func:`read_lsst_models`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import InputError
from .store.components import Component, SourceResult
from .store.runs import SOURCE_ISOLATED, BlendRecord, RunIndex, build_run, read_blend
from .text import plural

FORMAT_VERSION = "1.0.0"
_SUPPORTED_MAJOR = 1
_MODEL_TYPES = ("scarlet_model", "lsst")
_HIERARCHICAL = ("hierarchical", "hierarchical_blend", "lsst_hierarchical")
_CUBE_TYPES = ("cube", "component")
# extra per-source key written by export so that scarletstore's own source
# flags survive a round trip (Rubin's readers ignore unknown metadata)
_FLAGS_KEY = "scarletstore_flags"
# likewise the source position, written only when it is not the first component's peak
_PEAK_KEY = "scarletstore_peak"


class _Fail(Exception):
    """Internal: a format problem; turned into a one-line InputError naming the file."""


# ----------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------

def _load(path_or_dict):
    if isinstance(path_or_dict, dict):
        return path_or_dict, "<dict>"
    path = Path(path_or_dict)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not valid JSON: {msg}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a scarlet model file (top level is not a JSON object)")
    return data, path.name


def _get(d, key, where):
    if not isinstance(d, dict):
        raise _Fail(f"{where} is not a JSON object")
    if key not in d:
        raise _Fail(f"{where} has no '{key}'")
    return d[key]


# geometry limits: every box a file declares is allocated when a catalog is
# rebuilt, so a crafted shape must not be able to ask for gigabytes
MAX_SIDE = 1 << 14  # pixels along one axis of any box (a Rubin patch is ~4200)
MAX_BOX_PIXELS = 1 << 25  # pixels of one box (128 MiB per float32 plane)
MAX_COORD = 1 << 30  # |origin| (stored as int32)
# a catalog renders every source of a blend over the whole box at once
MAX_BOX_TIMES_SOURCES = 1 << 28  # 1 GiB per float32 stack


def _ints(value, n, what):
    """``n`` integers; floats must be integral and finite (no silent truncation)."""
    if not isinstance(value, (list, tuple)):
        raise _Fail(f"{what} is not a list of integers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Fail(f"{what} is not a list of integers")
        if isinstance(v, float) and not (math.isfinite(v) and v == int(v)):
            raise _Fail(f"{what} has a non-integer value {v!r}")
        out.append(int(v))
    if len(out) != n:
        raise _Fail(f"{what} has {len(out)} values, expected {n}")
    return out


def _origin(value, what):
    out = _ints(value, 2, what)
    if any(abs(v) > MAX_COORD for v in out):
        raise _Fail(f"{what} {out} is beyond +-{MAX_COORD} pixels")
    return out


def _shape(value, n, what):
    """A box shape: ``n`` positive integers within :data:`MAX_SIDE` / :data:`MAX_BOX_PIXELS`."""
    if isinstance(value, (list, tuple)) and len(value) != n:
        raise _Fail(f"{what} has {len(value)} values, expected {n}")
    out = _ints(value, n, what)
    if any(v <= 0 for v in out):
        raise _Fail(f"{what} {out} must be positive")
    if any(v > MAX_SIDE for v in out[-2:]) or math.prod(out[-2:]) > MAX_BOX_PIXELS:
        raise _Fail(f"{what} {out} is larger than {MAX_SIDE} pixels a side "
                    f"or {MAX_BOX_PIXELS} pixels")
    return out


def _floats(value, what, dtype=np.float32):
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _Fail(f"{what} is not a list of numbers") from None
    return arr.astype(dtype)


def _shaped(data, shape, what, dtype=np.float32):
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 4:
        raise _Fail(f"{what} shape {shape!r} is not a list of 1 to 4 integers")
    shape = tuple(_ints(shape, len(shape), f"{what} shape"))
    if any(s <= 0 for s in shape):
        raise _Fail(f"{what} shape {list(shape)} must be positive")
    arr = _floats(data, what, dtype).ravel()
    if arr.size != math.prod(shape):
        raise _Fail(f"{what} has {arr.size} values, shape {list(shape)} needs {math.prod(shape)}")
    return arr.reshape(shape)


def _overlaps(origin, shape, box_origin, box_shape) -> bool:
    return all(o < bo + bs and bo < o + s
               for o, s, bo, bs in zip(origin, shape, box_origin, box_shape))


def _meta_array(container, key, where):
    """An array stored under ``key`` of a metadata-like dict (None when absent)."""
    if not isinstance(container, dict) or container.get(key) is None:
        return None
    value = container[key]
    if isinstance(value, dict):  # image-PSF data form
        if value.get("psf_type", "image") != "image":
            raise _Fail(f"{where}: unsupported {key} type {value.get('psf_type')!r}")
        shape = _get(value, "shape", f"{where} {key}")
        return _shaped(_get(value, "data", f"{where} {key}"), shape, f"{where} {key}")
    shape = container.get(f"{key}_shape", container.get(f"{key}Shape"))
    if shape is None:
        raise _Fail(f"{where} has '{key}' but no '{key}_shape'")
    return _shaped(value, shape, f"{where} {key}")


def _meta_bands(container):
    if isinstance(container, dict):
        bands = container.get("bands")
        if bands is None and isinstance(container.get("psf"), dict):
            bands = container["psf"].get("bands") or None
        if bands is not None:
            return [str(b) for b in bands]
    return None


def _parse_version(data, name):
    version = data.get("version")
    if version is None:
        return "legacy"
    try:
        parts = [int(p) for p in str(version).split(".")]
    except ValueError:
        raise InputError(f"{name}: unrecognised model version {version!r}") from None
    if parts and parts[0] == 0 and all(p == 0 for p in parts):
        return "legacy"  # Rubin's pre-schema marker "0.0.0"
    if parts[0] != _SUPPORTED_MAJOR:
        raise InputError(f"{name}: model version {version} is not supported "
                         f"(this reader knows {_SUPPORTED_MAJOR}.x; upgrade scarletstore)")
    model_type = data.get("model_type", "scarlet_model")
    if model_type not in _MODEL_TYPES:
        raise InputError(f"{name}: unknown model_type {model_type!r} "
                         f"(expected {' or '.join(_MODEL_TYPES)})")
    return str(version)


class _Leaf:
    """One leaf blend gathered from the file before the run is assembled."""

    def __init__(self, blend_id, origin, shape, bands, psf, psf_center, path):
        self.blend_id = blend_id
        self.origin = origin
        self.shape = shape
        self.bands = bands
        self.psf = psf
        self.psf_center = psf_center
        self.path = path  # enclosing hierarchical ids, outermost first
        self.sources = []  # (source_id, peak_id, peak (y, x) global, flags, [components])


def _component(c, nb, where):
    """(kind, spectrum, array, origin, peak) of one component dict (global pixels)."""
    kind = c.get("component_type", "factorized")
    origin = _origin(_get(c, "origin", where), f"{where} origin")
    peak = c.get("peak")
    if peak is None:
        peak = (math.nan, math.nan)
    else:
        peak = _floats(peak, f"{where} peak", np.float64).ravel()
        if peak.size < 2:
            raise _Fail(f"{where} peak has {peak.size} values, expected 2")
        peak = (float(peak[0]), float(peak[1]))
    if kind == "factorized":
        shape = _shape(_get(c, "shape", where), 2, f"{where} shape")
        morph = _shaped(_get(c, "morph", where), shape, f"{where} morph")
        spectrum = _floats(_get(c, "spectrum", where), f"{where} spectrum").ravel()
        if spectrum.size != nb:
            raise _Fail(f"{where} spectrum has {plural(spectrum.size, 'value')} for {plural(nb, 'band')}")
        return spectrum, morph, origin, peak
    if kind in _CUBE_TYPES:
        shape = _get(c, "shape", where)
        shape = _shape(shape, len(shape) if isinstance(shape, list) else 3, f"{where} shape")
        if len(shape) == 2:
            shape = [nb] + shape
        if len(shape) != 3 or shape[0] != nb:
            raise _Fail(f"{where} cube shape {shape} does not match {plural(nb, 'band')}")
        cube = _shaped(_get(c, "model", where), shape, f"{where} model")
        if c.get("spectrum") is not None:
            spectrum = _floats(c["spectrum"], f"{where} spectrum").ravel()
            if spectrum.size != nb:
                raise _Fail(f"{where} spectrum has {plural(spectrum.size, 'value')} for {plural(nb, 'band')}")
        else:
            spectrum = cube.sum(axis=(1, 2), dtype=np.float32)
        return spectrum, cube, origin, peak
    raise _Fail(f"{where}: unknown component_type {kind!r}")


def _isolated(src, nb, where):
    """Components and peak of an isolated source (pixels, or its footprint mask)."""
    origin = _origin(_get(src, "origin", where), f"{where} origin")
    shape = _get(src, "shape", where)
    shape = _shape(shape, len(shape) if isinstance(shape, list) and len(shape) == 3 else 2,
                   f"{where} shape")
    peak = tuple(_floats(_get(src, "peak", where), f"{where} peak", np.float64).ravel()[:2])
    if src.get("model") is not None:
        cube_shape = shape if len(shape) == 3 else [nb] + shape[-2:]
        cube = _shaped(src["model"], cube_shape, f"{where} model")
    else:
        mask = _shaped(_get(src, "span_array", where), shape[-2:], f"{where} span_array")
        cube = np.repeat(mask[None], nb, axis=0)
    if cube.shape[0] != nb:
        raise _Fail(f"{where} model has {plural(cube.shape[0], 'band')}, expected {nb}")
    if src.get("spectrum") is not None:
        spectrum = _floats(src["spectrum"], f"{where} spectrum").ravel()
    else:
        spectrum = cube.sum(axis=(1, 2), dtype=np.float32)
    return [(spectrum, cube, origin, peak)], peak


def _source_ids(key, src, where):
    meta = src.get("metadata") if isinstance(src.get("metadata"), dict) else {}
    try:
        sid = int(key)
    except (TypeError, ValueError):
        if "id" not in meta:
            raise _Fail(f"{where}: source key {key!r} is not an integer id") from None
        sid = int(meta["id"])
    peak_id = src.get("peak_id", meta.get("peak_id", -1))
    return sid, int(-1 if peak_id is None else peak_id), meta


def _add_source(leaf, key, src, nb, where, legacy):
    if not isinstance(src, dict):
        raise _Fail(f"{where} is not a JSON object")
    sid, peak_id, meta = _source_ids(key, src, where)
    stype = src.get("source_type", "source")
    flags = int(meta.get(_FLAGS_KEY, 0))
    if stype == "isolated":
        comps, peak = _isolated(src, nb, where)
        flags |= SOURCE_ISOLATED
    elif stype == "source":
        raw = []
        if legacy or "factorized" in src:
            raw += [dict(c, component_type="factorized") for c in src.get("factorized") or []]
            raw += [dict(c, component_type="cube") for c in src.get("components") or []]
        else:
            raw = list(_get(src, "components", where))
        comps = [_component(c, nb, f"{where} component {k}") for k, c in enumerate(raw)]
        peak = comps[0][3] if comps else (math.nan, math.nan)
        if meta.get(_PEAK_KEY) is not None:
            peak = tuple(float(v) for v in meta[_PEAK_KEY][:2])
    else:
        raise _Fail(f"{where}: unknown source_type {stype!r}")
    leaf.sources.append((sid, peak_id, peak, flags, comps))


def _walk(blend_id, blend, ctx, path, leaves, where, legacy):
    """Collect the leaf blends below ``blend`` (depth first, file order)."""
    if not isinstance(blend, dict):
        raise _Fail(f"{where} is not a JSON object")
    meta = blend.get("metadata") if isinstance(blend.get("metadata"), dict) else {}
    btype = blend.get("blend_type", "blend")
    # observed PSF, bands and PSF centre: the blend's own, else the enclosing ones
    psf = _meta_array(meta, "psf", where)
    if psf is None:
        psf = _meta_array(blend, "psf", where)  # legacy: directly in the blend
    bands = _meta_bands(meta) or _meta_bands(blend)
    center = meta.get("psf_center", blend.get("psf_center"))
    ctx = {"psf": psf if psf is not None else ctx["psf"],
           "bands": bands if bands is not None else ctx["bands"],
           "psf_center": center if center is not None else ctx["psf_center"]}
    if btype in _HIERARCHICAL:
        children = _get(blend, "children", where)
        if not isinstance(children, dict):
            raise _Fail(f"{where} children is not a JSON object")
        for cid, child in children.items():
            _walk(_blend_id(cid, where), child, ctx, path + [blend_id], leaves,
                  f"{where} child {cid}", legacy)
        return
    if btype != "blend":
        raise _Fail(f"{where}: unknown blend_type {btype!r}")
    if ctx["bands"] is None:
        raise _Fail(f"{where} has no 'bands'")
    if ctx["psf"] is None:
        raise _Fail(f"{where} has no observed 'psf'")
    origin = _origin(_get(blend, "origin", where), f"{where} origin")
    shape = _shape(_get(blend, "shape", where), 2, f"{where} shape")
    leaf = _Leaf(blend_id, origin, shape, ctx["bands"], ctx["psf"], ctx["psf_center"], path)
    sources = _get(blend, "sources", where)
    if not isinstance(sources, dict):
        raise _Fail(f"{where} sources is not a JSON object")
    nb = len(leaf.bands)
    for key, src in sources.items():
        _add_source(leaf, key, src, nb, f"{where} source {key}", legacy)
    leaves.append(leaf)


def _blend_id(key, where):
    try:
        return int(key)
    except (TypeError, ValueError):
        raise _Fail(f"{where}: blend key {key!r} is not an integer id") from None


def _pad_psfs(psfs):
    """Zero-pad (B, h, w) PSFs centred to one common odd size; unit sum per band."""
    size_y = max(p.shape[1] for p in psfs)
    size_x = max(p.shape[2] for p in psfs)
    size_y += 1 - size_y % 2
    size_x += 1 - size_x % 2
    out = np.zeros((len(psfs), psfs[0].shape[0], size_y, size_x), np.float32)
    for i, p in enumerate(psfs):
        h, w = p.shape[1:]
        oy, ox = (size_y - h) // 2, (size_x - w) // 2
        out[i, :, oy:oy + h, ox:ox + w] = _unit_sum(p)
    return out


def _unit_sum(p):
    """Normalise each plane of a (B, h, w) PSF to unit sum.

    Left bit-exact when every sum is already 1 to 1e-6, so that re-importing an
    export does not perturb the values.
    """
    p = np.asarray(p, np.float32)
    sums = p.reshape(p.shape[0], -1).sum(axis=1, dtype=np.float64)
    if np.all(np.abs(sums - 1.0) <= 1e-6) or np.any(sums == 0) or not np.all(np.isfinite(sums)):
        return p
    return (p.astype(np.float64) / sums[:, None, None]).astype(np.float32)


def read_lsst_models(path_or_dict, name: str = "imported") -> xr.Dataset:
    """Read a Rubin scarlet model file (legacy or versioned 1.0.x) into a run Dataset.

    ``path_or_dict`` is a path to the JSON file or the already decoded object.
    Raises :class:`~scarletstore.errors.InputError` (naming the file) when it is
    unreadable, not valid JSON, of a newer major version, or misses keys.
    """
    data, fname = _load(path_or_dict)
    fmt = _parse_version(data, fname)
    try:
        return _read(data, fname, fmt, name)
    except _Fail as exc:
        raise InputError(f"{fname}: {exc}") from None


def _read(data, fname, fmt, name):
    legacy = fmt == "legacy"
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    if legacy and "psfShape" in data:
        model_psf = _shaped(_get(data, "psf", "model"), data["psfShape"], "model psf")
    else:
        model_psf = _meta_array(meta, "model_psf", "model metadata")
    if model_psf is None:
        raise _Fail("no model-frame PSF (top-level 'psf'/'psfShape' or metadata 'model_psf')")
    model_psf = np.asarray(model_psf, np.float32)
    while model_psf.ndim > 2 and model_psf.shape[0] == 1:
        model_psf = model_psf[0]
    if model_psf.ndim != 2:
        raise _Fail(f"model PSF has shape {list(model_psf.shape)}, expected 2-D")
    model_psf = _unit_sum(model_psf[None])[0]

    blends = _get(data, "blends", "model")
    if not isinstance(blends, dict):
        raise _Fail("'blends' is not a JSON object")
    ctx = {"psf": _meta_array(meta, "psf", "model metadata"), "bands": _meta_bands(meta),
           "psf_center": None}
    leaves: list[_Leaf] = []
    for key, blend in blends.items():
        _walk(_blend_id(key, f"blend {key}"), blend, ctx, [], leaves, f"blend {key}", legacy)
    isolated = data.get("isolated") or {}
    if not isinstance(isolated, dict):
        raise _Fail("'isolated' is not a JSON object")
    for key, src in isolated.items():
        where = f"isolated source {key}"
        if ctx["bands"] is None or ctx["psf"] is None:
            raise _Fail(f"{where}: the model metadata has no 'bands' or observed 'psf'")
        sid, _, smeta = _source_ids(key, src, where)
        origin = _origin(_get(src, "origin", where), f"{where} origin")
        shape = _get(src, "shape", where)
        shape = _shape(shape, len(shape) if isinstance(shape, list) and len(shape) == 3 else 2,
                       f"{where} shape")[-2:]
        leaf = _Leaf(int(smeta.get("parent_id", sid)), origin, shape, ctx["bands"], ctx["psf"],
                     smeta.get("psf_center"), [])
        _add_source(leaf, key, dict(src, source_type="isolated"), len(ctx["bands"]), where, False)
        leaves.append(leaf)
    if not leaves:
        raise _Fail("no blends")
    return _assemble(leaves, model_psf, fname, fmt, data, meta, name)


def _assemble(leaves, model_psf, fname, fmt, data, meta, name):
    bands = list(leaves[0].bands)
    seen = set()
    records, source_ids, psfs = [], [], []
    hierarchy, centers = {}, {}
    for i, leaf in enumerate(leaves):
        if leaf.blend_id in seen:
            raise _Fail(f"blend id {leaf.blend_id} appears twice")
        seen.add(leaf.blend_id)
        if sorted(leaf.bands) != sorted(bands) or len(leaf.bands) != len(bands):
            raise _Fail(f"blend {leaf.blend_id} has bands {','.join(leaf.bands)}, "
                        f"other blends {','.join(bands)}")
        order = [leaf.bands.index(b) for b in bands]  # same set: reorder to the run's bands
        psf = np.asarray(leaf.psf, np.float32)
        if psf.ndim != 3 or psf.shape[0] != len(bands):
            raise _Fail(f"blend {leaf.blend_id} psf has shape {list(psf.shape)}, "
                        f"expected [{len(bands)}, h, w]")
        psfs.append(psf[order])
        y0, x0 = leaf.origin
        if leaf.shape[0] * leaf.shape[1] * max(len(leaf.sources), 1) > MAX_BOX_TIMES_SOURCES:
            raise _Fail(f"blend {leaf.blend_id}: {len(leaf.sources)} sources on a {leaf.shape[0]} x "
                        f"{leaf.shape[1]} box exceed {MAX_BOX_TIMES_SOURCES} source pixels")
        sources, peaks, peak_ids = [], [], []
        for k, (sid, peak_id, peak, flags, comps) in enumerate(leaf.sources):
            out = []
            for spectrum, morph, (cy, cx), (py, px) in comps:
                if not _overlaps((cy, cx), morph.shape[-2:], leaf.origin, leaf.shape):
                    raise _Fail(f"blend {leaf.blend_id} source {sid}: component box at {[cy, cx]} "
                                f"of shape {list(morph.shape[-2:])} lies outside the blend box")
                spectrum = spectrum[order]
                if morph.ndim == 3:
                    morph = morph[order]
                out.append(Component(spectrum=spectrum, morph=morph, y0=cy - y0, x0=cx - x0,
                                     peak=(py - y0, px - x0)))
            sources.append(SourceResult(peak_index=k, components=out, flags=flags))
            peaks.append(peak)
            peak_ids.append(peak_id)
            source_ids.append(sid)
        records.append(BlendRecord(
            index=i, parent_id=leaf.blend_id, bbox=(y0, x0, leaf.shape[0], leaf.shape[1]),
            peak_ids=np.asarray(peak_ids, np.int64),
            peaks=np.asarray(peaks, np.float64).reshape(len(peaks), 2),
            sources=sources, converged=True, iterations=0,
            log_likelihood=np.nan, chi2=np.nan))
        if leaf.path:
            hierarchy[str(leaf.blend_id)] = [str(p) for p in leaf.path]
        if leaf.psf_center is not None:
            centers[str(leaf.blend_id)] = [float(v) for v in leaf.psf_center]
    blend_psf = _pad_psfs(psfs)
    residual = {k: v for k, v in meta.items() if not _is_array_meta(k, meta)}
    config = {"imported_from": fname, "lsst_format": fmt,
              "model_type": data.get("model_type", "legacy" if fmt == "legacy" else "scarlet_model"),
              "metadata": residual, "hierarchy": hierarchy, "psf_center": centers}
    try:
        config_json = json.dumps(config, allow_nan=True, default=str)
    except (TypeError, ValueError):
        config_json = json.dumps({k: v for k, v in config.items() if k != "metadata"})
    from . import __version__  # looked up only when a run is built (importlib.metadata)

    return build_run(records, bands, blend_psf[0], model_psf, name=name, method="lsst",
                     config_json=config_json, package_version=__version__,
                     exposure_checksum="", parents_checksum="", from_run="",
                     blend_psf=blend_psf, source_ids=source_ids)


_FRAME_VARS = (("blend_y0", "blend_x0"), ("component_y0", "component_x0"),
               ("component_peak_y", "component_peak_x"), ("source_y", "source_x"))


def _shifted(run: xr.Dataset, dy: int, dx: int) -> xr.Dataset:
    """``run`` with every position moved by (dy, dx) pixels."""
    run = run.copy()
    for vy, vx in _FRAME_VARS:
        run[vy] = run[vy] + np.asarray(dy).astype(run[vy].dtype)
        run[vx] = run[vx] + np.asarray(dx).astype(run[vx].dtype)
    return run


def place_on_exposure(run: xr.Dataset, exposure: xr.Dataset) -> xr.Dataset:
    """Put imported models on a store exposure's pixel grid, or refuse them.

    Catalogs cut the exposure at each blend's box, so every box must lie inside
    the exposure. Models in the exposure's own array pixels are kept as they
    are; models in global pixels (Rubin writes tract coordinates) are moved by
    the exposure's ``origin_y``/``origin_x`` when that puts them inside, and the
    offset is kept in the run's config (``pixel_offset``) so that export writes
    the original coordinates back. Raises InputError when neither frame holds
    every blend (models of another patch, or cut by the exposure's edge).
    """
    height, width = int(exposure.sizes["y"]), int(exposure.sizes["x"])
    oy, ox = int(exposure.attrs.get("origin_y", 0)), int(exposure.attrs.get("origin_x", 0))
    y0 = np.asarray(run["blend_y0"].values, np.int64)
    x0 = np.asarray(run["blend_x0"].values, np.int64)
    h = np.asarray(run["blend_height"].values, np.int64)
    w = np.asarray(run["blend_width"].values, np.int64)

    def outside(dy, dx):
        return ~((y0 - dy >= 0) & (x0 - dx >= 0) & (y0 - dy + h <= height) & (x0 - dx + w <= width))

    out = outside(0, 0)
    if not out.any():
        return run
    if (oy, ox) != (0, 0) and not outside(oy, ox).any():
        run = _shifted(run, -oy, -ox)
        config = json.loads(run.attrs.get("config") or "{}")
        config["pixel_offset"] = [oy, ox]
        run.attrs["config"] = json.dumps(config, allow_nan=True, default=str)
        return run
    k = int(np.flatnonzero(out)[0])
    raise InputError(
        f"{int(out.sum())} of {out.size} blends lie outside the store's exposure "
        f"({height} x {width} pixels, origin {[oy, ox]}), e.g. blend {int(run['blend_parent_id'].values[k])} "
        f"at {[int(y0[k]), int(x0[k])]} of shape {[int(h[k]), int(w[k])]}: "
        "these models belong to another image")


_ARRAY_META = ("psf", "model_psf", "bands", "array_keys")


def _is_array_meta(key, meta):
    keys = set(_ARRAY_META) | set(meta.get("array_keys") or [])
    base = key
    for suffix in ("_shape", "_dtype", "Shape"):
        if key.endswith(suffix):
            base = key[: -len(suffix)]
    return key in keys or base in keys


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------

def _flat(arr) -> list:
    """Flattened float32 values as Python floats (their repr round-trips float32 exactly)."""
    return np.asarray(arr, np.float32).ravel().astype(np.float64).tolist()


def _num(v: float):
    v = float(v)
    return int(v) if math.isfinite(v) and v == int(v) else v


def _psf_meta(psf, bands, center):
    psf = np.asarray(psf, np.float32)
    meta = {"psf": _flat(psf), "psf_shape": list(psf.shape), "psf_dtype": "float32",
            "bands": list(bands), "array_keys": ["psf"]}
    if center is not None:
        meta["psf_center"] = center
    return meta


def _component_dict(c: Component) -> dict:
    peak = [_num(c.peak[0]), _num(c.peak[1])]
    if c.morph.ndim == 3:
        return {"component_type": "cube", "version": FORMAT_VERSION, "origin": [c.y0, c.x0],
                "shape": list(c.morph.shape), "peak": peak, "model": _flat(c.morph),
                "spectrum": _flat(c.spectrum)}
    return {"component_type": "factorized", "version": FORMAT_VERSION, "origin": [c.y0, c.x0],
            "shape": list(c.morph.shape), "peak": peak, "spectrum": _flat(c.spectrum),
            "morph": _flat(c.morph)}


def _is_mask_template(src: SourceResult) -> bool:
    """An isolated source imported without pixels: one cube = the same 0/1 mask in every band."""
    if not src.flags & SOURCE_ISOLATED or len(src.components) != 1:
        return False
    cube = src.components[0].morph
    if cube.ndim != 3:
        return False
    return bool(np.all((cube == 0) | (cube == 1)) and np.all(cube == cube[:1]))


def _source_dict(sid, peak_id, src: SourceResult, position) -> dict:
    meta = {"id": int(sid), "peak_id": int(peak_id)}
    first = src.components[0].peak if src.components else (math.nan, math.nan)
    if not all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(first, position)):
        meta[_PEAK_KEY] = [_num(position[0]), _num(position[1])]
    extra = src.flags & ~SOURCE_ISOLATED if _is_mask_template(src) else src.flags
    if extra:
        meta[_FLAGS_KEY] = int(extra)
    if _is_mask_template(src):
        c = src.components[0]
        return {"source_type": "isolated", "version": FORMAT_VERSION, "origin": [c.y0, c.x0],
                "shape": list(c.morph.shape[1:]), "peak": [_num(c.peak[0]), _num(c.peak[1])],
                "span_array": _flat(c.morph[0]), "metadata": meta}
    return {"source_type": "source", "version": FORMAT_VERSION,
            "components": [_component_dict(c) for c in src.components], "metadata": meta}


def lsst_models_dict(run: xr.Dataset) -> dict:
    """The versioned 1.0.0 JSON object of a run (see :func:`write_lsst_models`)."""
    bands = [str(b) for b in run["band"].values]
    per_blend = run.attrs.get("psf_source", "run") == "blend" and "blend_psf" in run
    run_psf = None if per_blend else np.asarray(run["psf"].values, np.float32)
    try:
        config = json.loads(run.attrs.get("config", "{}") or "{}")
    except ValueError:
        config = {}
    if not isinstance(config, dict) or config.get("imported_from") is None:
        config = {}
    offset = config.get("pixel_offset")
    if offset:  # placed on a store exposure: write the file's own (global) pixels back
        run = _shifted(run, int(offset[0]), int(offset[1]))
    index = RunIndex(run)
    hierarchy = config.get("hierarchy") or {}
    centers = config.get("psf_center") or {}
    peak_ids = np.asarray(run["source_peak_id"].values)
    pos_y = np.asarray(run["source_y"].values, np.float64)
    pos_x = np.asarray(run["source_x"].values, np.float64)
    model_psf = np.asarray(run["model_psf"].values, np.float32)
    meta = dict(config.get("metadata") or {})
    meta.update({"model_psf": _flat(model_psf), "model_psf_shape": list(model_psf.shape),
                 "model_psf_dtype": "float32", "bands": bands, "array_keys": ["model_psf"]})
    top: dict = {}
    for b in range(len(index.parent_ids)):
        blend = read_blend(index, b)
        y0, x0, h, w = blend.bbox
        psf = np.asarray(run["blend_psf"].isel(blend=b).values) if per_blend else run_psf
        s0 = index.source_off[b]
        sources = {}
        for j, (sid, src) in enumerate(zip(blend.source_ids, blend.sources)):
            sources[str(int(sid))] = _source_dict(sid, peak_ids[s0 + j], src,
                                                  (float(pos_y[s0 + j]), float(pos_x[s0 + j])))
        key = str(int(blend.parent_id))
        entry = {"blend_type": "blend", "version": FORMAT_VERSION, "origin": [y0, x0],
                 "shape": [h, w], "metadata": _psf_meta(psf, bands, centers.get(key)),
                 "sources": sources}
        container = top
        for hid in hierarchy.get(key, []):
            node = container.setdefault(str(hid), {"blend_type": "hierarchical",
                                                   "version": FORMAT_VERSION, "children": {}})
            container = node["children"]
        container[key] = entry
    return {"model_type": "scarlet_model", "version": FORMAT_VERSION, "metadata": meta,
            "blends": top}


def write_lsst_models(run: xr.Dataset, path) -> Path:
    """Write ``run`` as Rubin's versioned 1.0.0 scarlet model JSON.

    Factorized components keep ``spectrum`` x ``morph``; observed-frame cubes
    (SDSS children, isolated sources with pixels) are written as cube
    components; isolated sources imported without pixels go back to
    ``source_type`` ``isolated`` with their ``span_array``. Each blend carries
    its observed PSF (the run's ``blend_psf`` when present, else the run
    ``psf``) and bands in its ``metadata``. Floats are written with Python's
    shortest round-trip repr, so float32 values read back bit-exact.
    """
    path = Path(path)
    doc = lsst_models_dict(run)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path
