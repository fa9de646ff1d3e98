"""The ``scarletstore`` command line.

Every command prints a one-line error and exits with status 2 on bad input;
no command leaves a half-written store (all writes are atomic).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import socket
import sys
import warnings
from pathlib import Path

from .errors import InputError, ScarletStoreError, StoreError
from .text import noun, plural


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _bands(text):
    if text is None:
        return None
    parts = [b.strip() for b in text.split(",") if b.strip()]
    if len(parts) == 1 and len(parts[0]) > 1 and "," not in text:
        parts = list(parts[0])  # "ugrizy" is accepted as six one-letter bands
    return parts


def _band_files(items, flag):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"{flag} expects BAND=FILE, got {item!r}")
        band, path = item.split("=", 1)
        if band.strip() in out:  # the last one would silently win
            raise InputError(f"{flag} names band {band.strip()} twice")
        out[band.strip()] = path
    return out


def _check_output(path, flag="-o", inputs=(), stores=()) -> Path:
    """Refuse an output path that cannot be written before any work is done.

    ``inputs`` are files the command reads and ``stores`` store indexes it
    reads: an output that is one of them, or lies in a store's product
    folder (``STORE.d``), would overwrite the data being measured -- a
    catalog written over its own store's index left a store that no
    longer opened, and the command reported success.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{path}: {flag} names a directory, not a file")
    if not folder.is_dir():
        raise InputError(f"{path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: the directory {folder} is not writable")
    real = os.path.realpath(path)
    for src in list(inputs) + list(stores):
        if real == os.path.realpath(src):
            raise InputError(f"{path}: {flag} names an input of this command; choose another file")
    for store in stores:
        products = os.path.realpath(store) + ".d"
        if real.startswith(products + os.sep):
            raise InputError(f"{path}: {flag} lies in the store's product folder {store}.d; "
                             "choose a file outside it")
    return path


_SCHEDULER = re.compile(r"(?:(?P<scheme>[a-z]+)://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d+)/?")
_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")


def _check_scheduler(address: str) -> str:
    """Refuse a malformed or unreachable dask scheduler address before any work.

    dask raises ValueError on a malformed address and waits for its timeout on
    an unreachable one; a direct TCP connect tells the user at once.
    """
    m = _SCHEDULER.fullmatch(address.strip())
    if m is None:
        raise InputError(f"--scheduler {address!r}: expected an address like tcp://HOST:PORT")
    scheme, host, port = m.group("scheme") or "tcp", m.group("host").strip("[]"), int(m.group("port"))
    if scheme not in _SCHEMES:
        raise InputError(f"--scheduler {address!r}: unknown scheme {scheme!r} "
                         f"(use one of {', '.join(_SCHEMES)})")
    if not 0 < port < 65536:
        raise InputError(f"--scheduler {address!r}: port must be in 1..65535")
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise InputError(f"cannot reach dask scheduler {address}: "
                         f"{exc.strerror or type(exc).__name__}") from None
    return address.strip()


def _blend_ids(text):
    """``--blends 3,7,12`` as a list of ints; an empty or garbled list is an error."""
    if text is None:
        return None
    parts = [b.strip() for b in text.split(",")]
    if not any(parts) or not all(parts):
        raise InputError(f"--blends expects comma-separated parent ids like 3,7,12, got {text!r}")
    try:
        ids = [int(b) for b in parts]
    except ValueError:
        raise InputError(f"--blends expects comma-separated parent ids, got {text!r}") from None
    if len(set(ids)) != len(ids):
        raise InputError(f"--blends lists a parent id twice: {text!r}")
    return ids


def _config_keys() -> list[str]:
    import dataclasses

    from .deblend.config import DeblendConfig

    return [f.name for f in dataclasses.fields(DeblendConfig)]


def _check_overrides(items) -> list[str]:
    """Refuse unknown keys (naming the valid ones) and NaN / infinite numbers.

    The configuration's own checks are range comparisons, which NaN passes;
    no setting means anything at NaN, and only the ``max_*`` size limits mean
    anything at infinity ("no limit").
    """
    from .deblend.config import DeblendConfig

    keys = _config_keys()
    for item in items or []:
        key = item.split("=", 1)[0].strip()
        if "=" in item and key not in keys:
            raise InputError(f"unknown configuration key {key!r}; valid keys: {', '.join(keys)}")
    DeblendConfig().with_overrides(items or [])  # its own type and range messages come first
    for item in items or []:
        key, raw = (t.strip() for t in item.split("=", 1))
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            continue
        values = value.values() if isinstance(value, dict) else \
            value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and not key.startswith("max_"))):
                raise InputError(f"{key} must be a finite number, not {raw}")
    return list(items or [])


def _announce(run: str, why: str = "newest") -> None:
    """Say on stderr which run a command picked for the user (stdout stays data).

    Commands call it once their inputs are accepted, so a refused request
    still prints only its one-line error.
    """
    sys.stderr.write(f"using run {run} ({why})\n")


def _using(asked, run) -> None:
    if asked is None:
        _announce(run)


# ---------------------------------------------------------------- commands
def cmd_ingest(args):
    from .ingest.exposure import read_inputs
    from .store.store import Store, StoreError

    exposure = read_inputs(args.inputs, bands=_bands(args.bands),
                           psf_files=_band_files(args.psf, "--psf"),
                           mask_defects=not args.no_defect_mask)
    path = Path(args.store)
    if path.exists():
        store = Store(path)
        if store.has("exposure"):
            raise StoreError(f"{path}: already holds an exposure; use a new store")
        store.write({"exposure": exposure})
    else:
        Store.create(path, {"exposure": exposure})
    ny, nx = exposure.sizes["y"], exposure.sizes["x"]
    print(f"ingested {plural(exposure.sizes['band'], 'band')} ({','.join(exposure.band.values)}) "
          f"of {ny}x{nx} pixels into {path}; {_defect_summary(exposure)}")


def _defect_summary(exposure) -> str:
    """The ingest line's account of the pixels masked CR as sharper than the PSF."""
    counts = json.loads(exposure.attrs.get("defect_pixels", "null") or "null")
    if counts is None:
        return "defect masking off"
    per_band = ", ".join(f"{b} {n}" for b, n in counts.items())
    return f"{sum(counts.values())} pixels sharper than the PSF masked CR ({per_band})"


def _config_summary(text: str, method) -> str:
    """The settings of a run that differ from the defaults (or the import record)."""
    from .deblend.config import DeblendConfig

    try:
        cfg = json.loads(text)
    except json.JSONDecodeError:
        return "unreadable"
    if method not in ("scarlet", "sdss"):
        return ", ".join(f"{k}={cfg[k]}" for k in ("imported_from", "lsst_format") if k in cfg) or "-"
    default = json.loads(DeblendConfig().to_json())
    changed = [f"{k}={v}" for k, v in sorted(cfg.items()) if default.get(k) != v]
    return ", ".join(changed) if changed else "defaults"


def cmd_info(args):
    from .errors import SchemaError, StoreError
    from .store.store import Store

    store = Store(args.store)
    if args.check:
        problems = store.check(deep=True)
        if len(problems) == 1:
            raise SchemaError(problems[0])
        if problems:
            raise SchemaError(f"{len(problems)} problems: " + "; ".join(problems))
        print(f"{store.path}: {len(store.groups())} groups checked, no problems")
        return
    groups = store.groups()
    # two different sizes: the files' bytes (compressed) here, each group's decoded arrays below
    print(f"store {store.path} ({store.disk_bytes() / 1e6:.2f} MB on disk, {store.layout})")
    damaged = 0
    for name, g in groups.items():
        dims = ", ".join(f"{k}={v}" for k, v in sorted(g["dims"].items()))
        print(f"  {name:<24} {g['schema']} v{g['schema_version']}  {dims}  "
              f"{g['nbytes'] / 1e6:.2f} MB in memory")
        try:
            store.validate(name)
        except (SchemaError, StoreError) as exc:  # list the rest; --check exits 2 on it
            damaged += 1
            print(f"    DAMAGED: {str(exc).split(': ', 1)[-1]}")
            continue
        attrs = g["attrs"]
        if g["schema"] == "exposure":
            ex = store.read(name)
            print(f"    bands: {','.join(ex.band.values)}; wcs: {'yes' if attrs.get('wcs') else 'no'}; "
                  f"sources: {', '.join(json.loads(attrs.get('sources', '[]')))}")
        if g["schema"] == "run":
            print(f"    method {attrs.get('method')}; created {attrs.get('created')}; "
                  f"scarletstore {attrs.get('package_version')}; from run: {attrs.get('from_run') or '-'}")
            print(f"    inputs: exposure sha256 {str(attrs.get('exposure_checksum') or '-')[:12]}, "
                  f"parents sha256 {str(attrs.get('parents_checksum') or '-')[:12]}")
            print(f"    config: {_config_summary(attrs.get('config', '{}'), attrs.get('method'))}")
    runs = store.runs()
    print(f"  runs: {', '.join(runs) if runs else 'none'}")
    if damaged:
        print(f"  {damaged} damaged group(s): 'scarletstore info --check' lists every problem")


def cmd_simulate(args):
    from .simulate.field import simulate_field

    if args.size < 16:
        raise InputError("--size must be at least 16 pixels")
    if not args.density > 0 or math.isinf(args.density):
        raise InputError(f"--density must be a positive number, got {args.density:g}")
    out_dir = Path(args.out_dir)
    if out_dir.is_file() or (out_dir.exists() and not out_dir.is_dir()):
        raise InputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # visits too: a stale visit_*.fits beside new ones would be coadded with them
        raise InputError(f"{out_dir}: directory is not empty; simulate into a new or empty one")
    if not out_dir.parent.is_dir():
        raise InputError(f"{out_dir}: the directory {out_dir.parent} does not exist")
    field_opts = {"bright_stars": args.bright_stars, "saturation": args.saturation,
                  "cosmic_rays": args.cosmic_rays, "bad_columns": args.bad_columns}
    if args.psf_beta is not None:
        field_opts["psf_beta"] = args.psf_beta
    if args.visits is not None:
        from .simulate.visits import simulate_visits

        asked = [f"--{k.replace('_', '-')}" for k, v in field_opts.items()
                 if v not in (0, None) and k != "bright_stars"]
        if asked:
            raise InputError(f"{', '.join(asked)}: options of a simulated coadd, not of --visits")
        if args.bright_stars is not None and args.bright_stars < 0:
            raise InputError(f"--bright-stars must not be negative, got {args.bright_stars}")

        # its bar draws on a terminal only, like every other (quiet when piped)
        out = simulate_visits(args.out_dir, n_visits=args.visits, size=args.size, seed=args.seed,
                              bands=_bands(args.bands), density=args.density,
                              n_stars=int(args.bright_stars or 0), progress=sys.stderr.isatty())
        print(f"simulated {plural(len(out['visits']), 'visit')} of a {args.size}x{args.size} grid in "
              f"{args.out_dir}; grid {out['grid']}; truth in {out['truth']}")
        return
    out = simulate_field(args.out_dir, size=args.size, seed=args.seed, bands=_bands(args.bands),
                         density=args.density, progress=True, **field_opts)
    print(f"simulated {args.size}x{args.size} field in {plural(len(out['bands']), 'band')}: "
          f"{' '.join(str(p) for p in out['bands'].values())}; truth in {out['truth']}")


def cmd_coadd(args):
    import tempfile

    from .coadd.pipeline import coadd
    from .coadd.stack import record_relative_paths
    from .coadd.visits import read_grid, read_visits
    from .store.store import Store, StoreError

    path = Path(args.store)
    if path.exists():
        raise StoreError(f"{path}: already exists; coadd creates a new store")
    grid = read_grid(args.grid)
    visits = read_visits(args.visits, grid, bands=_bands(args.bands))
    scheduler = _check_scheduler(args.scheduler) if args.scheduler is not None else None
    # Each finished band goes to a scratch file and is streamed from it into the
    # store: memory holds one band's coadd, not all of them.
    with tempfile.TemporaryDirectory(prefix="scarletstore-coadd-bands-") as scratch:
        groups = coadd(visits, grid, kernel=args.kernel, workers=args.workers, scheduler=scheduler,
                       reject=not args.no_reject, target_fwhm=args.psf_matched_fwhm, scratch=scratch)
        record_relative_paths(groups["visits"], path)
        Store.create(path, groups)
        for ds in groups.values():
            ds.close()
    exposure, table = groups["exposure"], groups["visits"]
    ny, nx = grid.shape
    print(f"coadded {plural(len(visits), 'visit')} in {plural(exposure.sizes['band'], 'band')} "
          f"({','.join(exposure.band.values)}) onto {ny}x{nx} pixels at zero point "
          f"{exposure.attrs['zeropoint']:g} into {path}; "
          f"{plural(int(table['n_rejected'].values.sum()), 'artifact pixel')} rejected, "
          f"{plural(int((~table['psf_matched'].values).sum()), 'visit')} left out "
          f"of the PSF-matched coadd")
    for line in _coadd_warnings(exposure.attrs, table, not args.no_reject):
        sys.stderr.write(f"scarletstore coadd: warning: {line}\n")


def _coadd_warnings(attrs, table, reject) -> list[str]:
    """What a coadd did not do although asked, band by band: rejection needs 3
    PSF-matched visits, background matching 2, and a PSF-matched coadd 1."""
    import numpy as np

    out = []
    bands = np.asarray(table["band"].values).astype(str)
    matched = np.asarray(table["psf_matched"].values, bool)
    done = {k: json.loads(attrs.get(f"{k}_bands") or "{}") for k in ("artifact_rejection",
                                                                     "background_matching")}
    for b in dict.fromkeys(bands):
        n = int(matched[bands == b].sum())
        if n == 0:
            out.append(f"band {b}: no visit is narrower than the PSF-matched target; its "
                       "PSF-matched coadd is empty")
        if reject and not done["artifact_rejection"].get(b, True):
            out.append(f"band {b}: artifact rejection needs 3 PSF-matched visits, has {n}: not done")
        if reject and not done["background_matching"].get(b, True):
            out.append(f"band {b}: background matching needs 2 PSF-matched visits, has {n}: not done")
    return out


def cmd_tract(args):
    from .tract.run import failed_patches, plan_resume, plan_tract, run_tract

    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    scheduler = _check_scheduler(args.scheduler) if args.scheduler is not None else None
    required = (("VISIT", args.visits), ("--grid", args.grid), ("--patches", args.patches),
                ("--overlap", args.overlap))
    settings = (("--bands", args.bands), ("--threshold", args.threshold), ("--set", args.set))
    given = [flag for flag, value in required + settings if value not in (None, [])]
    if args.resume:
        if given:
            raise InputError(f"--resume takes the grid, visits and settings from OUT_DIR/tract.json; "
                             f"drop {', '.join(given)}")
        plan, index = plan_resume(args.out_dir)
    else:
        missing = [flag for flag, value in required if value in (None, [])]
        if missing:
            raise InputError(f"the following arguments are required: {', '.join(missing)}")
        plan, index = plan_tract(args.out_dir, args.visits, args.grid, args.patches, args.overlap,
                                 bands=_bands(args.bands),
                                 threshold=5.0 if args.threshold is None else args.threshold,
                                 overrides=_check_overrides(args.set)), None
    n_run = len(plan.jobs)
    index = run_tract(plan, workers=args.workers, scheduler=scheduler, show_progress=True, index=index)
    done = [e for e in index["patches"] if e["status"] == "done"]
    total = len(index["patches"])
    this_run = f", {n_run} in this run" if args.resume else ""
    print(f"tract {plan.out_dir}: {len(done)} of {plural(total, 'patch', 'patches')} done{this_run} "
          f"({plan.shape[0]}x{plan.shape[1]}, overlap {plan.overlap} px), "
          f"{sum(e['n_sources'] for e in done)} sources; index {plan.out_dir / 'tract.json'}")
    dropped = {}
    for e in done:
        for name in e.get("visits_dropped") or []:
            dropped.setdefault(name, []).append(e["name"])
    if dropped:  # no usable pixel on those patches: left out there, not failed
        sys.stderr.write("scarletstore tract: warning: visits left out of patches where they have "
                         "no usable pixel: " + "; ".join(f"{v} ({', '.join(p)})"
                                                         for v, p in dropped.items()) + "\n")
    bad = failed_patches(index)
    if bad:
        sys.stderr.write(f"scarletstore tract: error: {len(bad)} of {plural(total, 'patch', 'patches')} failed after "
                         f"{plural(bad[0]['attempts'], 'attempt')} ({bad[0]['name']}: {bad[0]['error']}"
                         f"{'; ...' if len(bad) > 1 else ''}); recorded in tract.json; "
                         f"'scarletstore tract {args.out_dir} --resume' runs them again\n")
        return 1
    return 0


def _tract_inputs(out_dir) -> list[str]:
    """The grid and visit files a tract's index names (none when it has no index)."""
    try:
        index = json.loads((Path(out_dir) / "tract.json").read_text())
    except (OSError, ValueError):
        return []  # merge itself says what is wrong with the folder
    if not isinstance(index, dict):
        return []
    grid = index.get("grid")
    files = [grid.get("path") if isinstance(grid, dict) else grid] + list(index.get("visits") or [])
    return [f for f in files if isinstance(f, str)]


def cmd_merge(args):
    from .measure.catalog import write_columns
    from .tract.merge import tract_catalog

    out = Path(args.output)
    if out.suffix.lower() not in (".fits", ".csv", ".h5"):
        raise InputError(f"{out}: output must end in .fits, .csv or .h5")
    _check_output(out, inputs=[Path(args.out_dir) / "tract.json", *_tract_inputs(args.out_dir)])
    inside = os.path.relpath(os.path.realpath(out), os.path.realpath(args.out_dir)).split(os.sep)
    if len(inside) > 1 and inside[0].startswith("patch_"):
        raise InputError(f"{out}: -o lies in the patch folder {inside[0]} of {args.out_dir}, "
                         "whose store merge reads; choose a file outside it")
    columns, attrs, missing = tract_catalog(args.out_dir, args.band)
    write_columns(columns, attrs, out)
    print(f"wrote {len(columns['is_primary'])} rows ({int(columns['is_primary'].sum())} primary) of "
          f"band {args.band} from {plural(len(json.loads(attrs['run'])), 'patch', 'patches')} to {out}")
    if missing:
        sys.stderr.write(f"scarletstore merge: warning: {plural(len(missing), 'patch', 'patches')} not done "
                         "and left out "
                         f"({', '.join(missing)}): no primaries in their inner regions\n")


def cmd_detect(args):
    from .detect.detect import detect
    from .detect.known import read_peaks_table
    from .store.store import Store

    if args.threshold <= 0:
        raise InputError(f"--threshold must be positive, got {args.threshold:g}")
    store = Store(args.store)
    if not store.has("exposure"):
        raise InputError(f"{store.path}: no exposure group; run 'scarletstore ingest' first")
    if store.has("parents") and not args.replace:
        raise InputError(f"{store.path}: already has parents; pass --replace to detect again")
    exposure = store.read("exposure")
    known = read_peaks_table(args.peaks, exposure.attrs["wcs"]) if args.peaks else None
    extra = {} if args.bad_planes is None else {"bad_mask_planes": args.bad_planes}
    if args.image == "likelihood":
        extra["significance"] = _likelihood_significance(store, exposure)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parents = detect(exposure, threshold=args.threshold, min_area=args.min_area, known=known,
                         bands=_bands(args.bands), progress=True, **extra)
    for w in caught:  # one line each (e.g. known positions outside the image)
        sys.stderr.write(f"scarletstore detect: warning: {w.message}\n")
    store.write({"parents": parents}, replace=args.replace)
    if args.replace:
        from .store.runs import stale_runs

        stale = stale_runs(store)
        if stale:  # their catalogs are refused from now on (store.runs.check_run_parents)
            sys.stderr.write(f"scarletstore detect: warning: {noun(len(stale), 'run')} "
                             f"{', '.join(stale)} {noun(len(stale), 'was', 'were')} deblended "
                             "from the replaced parents; deblend again to measure them\n")
    n_ext = int(((parents["peak_flags"].values & 1) != 0).sum())
    print(f"detected {plural(parents.sizes['parent'], 'parent')} with "
          f"{plural(parents.sizes['peak'], 'peak')} "
          f"({n_ext} external) in {store.path}")


def _likelihood_significance(store, exposure):
    """The store's Kaiser significance (band, y, x) in the exposure's band order."""
    if not store.has("coadds/likelihood"):
        raise InputError(f"{store.path}: no coadds/likelihood group; make the store with "
                         "'scarletstore coadd' to detect on the likelihood coadd")
    like = store.read("coadds/likelihood")
    bands = [str(b) for b in like["band"].values]
    missing = [str(b) for b in exposure["band"].values if str(b) not in bands]
    if missing:
        raise InputError(f"{store.path}: coadds/likelihood has no band(s) {', '.join(missing)}")
    if not int(like.attrs.get("sky_subtracted", 0)):
        raise InputError(f"{store.path}: its likelihood coadd keeps the sky (made before the sky "
                         "was subtracted from it); coadd the visits again")
    return like["significance"].sel(band=exposure["band"].values).values


def _blend_pixels(store, parents, blend_ids):
    """``(exposure, checksum)`` for a deblend of ``blend_ids``: only their boxes are read
    (zero elsewhere) when the store recorded the exposure's checksum at ingest,
    else the whole exposure is read and hashed."""
    import numpy as np

    ids = set(blend_ids)  # python ints: any id, however large, is only compared
    pid = parents["parent_id"].values.tolist()
    wanted = np.fromiter((p in ids for p in pid), bool, len(pid))
    boxes = np.stack([parents[v].values[wanted] for v in
                      ("bbox_y0", "bbox_x0", "bbox_height", "bbox_width")], axis=1)
    part = store.read_boxes("exposure", boxes, frame=True)
    return part if part is not None else store.read_with_checksum("exposure", frame=True)


def cmd_deblend(args):
    from .deblend.config import DeblendConfig
    from .deblend.run import deblend_exposure
    from .store.store import Store, check_run_name, run_group

    # arguments first: nothing is read or computed for a request that will be refused
    if args.run is not None:
        check_run_name(args.run)
    overrides = _check_overrides(args.set)
    blend_ids = _blend_ids(args.blends)
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    scheduler = _check_scheduler(args.scheduler) if args.scheduler is not None else None
    store = Store(args.store)
    for group, hint in (("exposure", "ingest"), ("parents", "detect")):
        if not store.has(group):
            raise InputError(f"{store.path}: no {group} group; run 'scarletstore {hint}' first")
    runs = store.runs()
    first_id = store.max_source_id() + 1  # checks every run now, not after the fit
    init, base = None, DeblendConfig()
    if args.from_run:
        from .deblend.run import init_from_run

        if args.from_run not in runs:
            raise InputError(f"{store.path}: no run {args.from_run!r} to start from (runs: {', '.join(runs) or 'none'})")
        source_run = store.read(run_group(args.from_run))
        if source_run.attrs["method"] != "scarlet" and args.method == "scarlet":
            raise InputError(f"run {args.from_run!r} was made by {source_run.attrs['method']}; "
                             "a scarlet warm start needs scarlet models")
        base = DeblendConfig.from_json(source_run.attrs["config"])  # start from its settings
        init = init_from_run(source_run)
    config = base.with_overrides(overrides)
    if args.run in runs:
        raise InputError(f"{store.path}: run {args.run!r} already exists (runs are never overwritten)")
    if blend_ids is None:
        # one read of each, as Frames: the call never needs xarray (store/frame.py)
        exposure, exposure_checksum = store.read_with_checksum("exposure", frame=True)
        parents, parents_checksum = store.read_with_checksum("parents", frame=True)
    else:
        # no fit uses the parents' background planes (6 x H x W, compressed: 0.05 s of a
        # one-blend call): read none of them when the checksum recorded at detect stands in
        parents, parents_checksum = (store.read_boxes("parents", [], frame=True)
                                     or store.read_with_checksum("parents", frame=True))
        exposure, exposure_checksum = _blend_pixels(store, parents, blend_ids)
    run = deblend_exposure(
        exposure, parents, config, args.method, blend_ids=blend_ids,
        workers=args.workers, scheduler=scheduler, name=args.run or args.method, show_progress=True,
        first_source_id=first_id, exposure_checksum=exposure_checksum,
        parents_checksum=parents_checksum, init=init, from_run=args.from_run or "", as_frame=True)
    if parents_checksum and store.recorded_checksum("parents") not in (None, parents_checksum):
        # a 'detect --replace' finished while this deblend ran: its run would
        # record parents the store no longer has
        raise StoreError(f"{store.path}: the parents were replaced while deblending; run deblend again")
    # name and source ids are final only at commit, inside the writer lock
    name = store.add_run(run, name=args.run, prefix=args.method)
    print(_deblend_summary(name, run))


def _deblend_summary(name, run) -> str:
    """The line ``deblend`` ends with: how many parents were fitted, failed, kept as
    isolated sources and skipped (with the reasons), and what the run holds."""
    import numpy as np

    reasons = np.asarray(run["blend_reason"].values).astype(str)
    fitted = reasons == ""
    failed = int(np.char.startswith(reasons, "failed").sum())
    isolated = int((reasons == "isolated").sum())
    # a skipped parent (parent_too_big, masked, ...) has no model in the run: the line
    # said nothing of them, so a run missing parents looked complete
    skipped = {}
    for r in reasons[~fitted & (reasons != "isolated") & ~np.char.startswith(reasons, "failed")]:
        skipped[r] = skipped.get(r, 0) + 1
    why = f" ({', '.join(f'{r}: {n}' for r, n in sorted(skipped.items()))})" if skipped else ""
    conv = int(run["blend_converged"].values[fitted].sum())
    rt = run["blend_runtime"].values[fitted]
    return (f"run {name}: {plural(run.sizes['blend'], 'parent')}, {int(fitted.sum())} fitted "
            f"({conv} converged, {failed} failed), {isolated} isolated, "
            f"{sum(skipped.values())} skipped{why}, {plural(run.sizes['source'], 'source')}, "
            f"{plural(run.sizes['component'], 'component')}; "
            f"median {1e3 * (float(np.median(rt)) if rt.size else 0):.1f} ms per blend")


def _open_run_store(path, run):
    """The store and the run to use: ``run`` when given, else the newest."""
    from .store.store import Store

    store = Store(path)
    runs = store.runs()
    if not runs:
        raise InputError(f"{store.path}: no runs; run 'scarletstore deblend' first")
    if run is not None and run not in runs:
        raise InputError(f"{store.path}: no run {run!r} (runs: {', '.join(runs)})")
    return store, run or runs[-1]


def _reprocessed_image(store, path, band):
    """One band of a reprocessed image (ingest FITS layout) checked against the store's grid."""
    from .ingest.exposure import read_fits_bands

    # no PSF, so nothing to judge sharpness by; the image is not detected on
    ex = read_fits_bands([path], bands=[band], psf_files=None, require_psf=False, mask_defects=False)
    if store.has("exposure"):
        ref = store.open("exposure")
        shape = (ref.sizes["y"], ref.sizes["x"])
        ref.close()
        if (ex.sizes["y"], ex.sizes["x"]) != shape:
            raise InputError(f"{path}: image is {ex.sizes['y']}x{ex.sizes['x']}, the store's grid is "
                             f"{shape[0]}x{shape[1]}")
        why = _image_grid_mismatch(ref.attrs.get("wcs") or "", ex.attrs.get("wcs") or "", shape)
        if why:  # another field of the same size would be measured as this one
            raise InputError(f"{path}: {why}")
    return {"image": ex["image"].values[0], "variance": ex["variance"].values[0],
            "mask": ex["mask"].values[0], "mask_planes": json.loads(ex.attrs["mask_planes"])}


def _image_grid_mismatch(store_wcs: str, image_wcs: str, shape) -> str:
    """Why an image's WCS header puts pixels elsewhere on the sky than the store's
    ('' when they agree, or when either has none: a WCS-less store has nothing to
    compare with, and one WCS-less image is the user's word)."""
    if not store_wcs or not image_wcs:
        return ""
    from astropy.io import fits

    from .ingest.exposure import _celestial_wcs, _grid_mismatch

    first, other = (_celestial_wcs(fits.Header.fromstring(t)) for t in (store_wcs, image_wcs))
    return _grid_mismatch(first, other, shape, reference="the store exposure")


def _radii(text):
    """Aperture radii from ``--apertures 3,6,12`` (None: the defaults)."""
    if text is None:
        return None
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise InputError(f"--apertures: expected comma-separated radii in pixels, got {text!r}") from None


def _write_child_catalog(store, band, out, asked_run, kwargs) -> int:
    """Measure the children's catalog into plain arrays and write it; return the row count.

    No lazy Dataset on the way: xarray (0.5-0.6 s to import) is only imported
    by the writer of an .h5 table.
    """
    from .measure.catalog import catalog_spec, write_columns

    spec = catalog_spec(store, band, **kwargs)
    try:
        _using(asked_run, kwargs["run"])
        write_columns(spec.columns(show_progress=True), spec.attrs, out)
    finally:
        spec.measurer.close()
    return spec.n_rows


def cmd_catalog(args):
    out = Path(args.output)
    if out.suffix.lower() not in (".fits", ".csv", ".h5"):
        raise InputError(f"{out}: output must end in .fits, .csv or .h5")
    psf_files, image_files = _band_files(args.psf, "--psf"), _band_files(args.image, "--image")
    _check_output(out, inputs=list(psf_files.values()) + list(image_files.values()), stores=[args.store])
    store, run = _open_run_store(args.store, args.run)
    for flag, files in (("--psf", psf_files), ("--image", image_files)):
        other = [b for b in files if b != args.band]
        if other:
            raise InputError(f"{flag} names band {other[0]} but the catalog is for band {args.band}")
    psf_override = image_override = None
    if args.band in psf_files:
        from .ingest.exposure import check_psf, read_psf_file
        psf_override = check_psf(read_psf_file(psf_files[args.band]), psf_files[args.band])
    if args.band in image_files:
        image_override = _reprocessed_image(store, image_files[args.band], args.band)
    kwargs = dict(run=run, redistribute=args.redistribute, image_override=image_override,
                  psf_override=psf_override, apertures=_radii(args.apertures))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.parents:
            from .measure.catalog import export_catalog
            from .measure.parents import parent_catalog

            cat = parent_catalog(store, args.band, **kwargs)
            _using(args.run, run)
            n = export_catalog(cat, out, show_progress=True)
        else:
            n = _write_child_catalog(store, args.band, out, args.run, kwargs)
    for message in dict.fromkeys(str(w.message) for w in caught):  # one line each, once
        sys.stderr.write(f"scarletstore catalog: warning: {message}\n")
    what = "parent rows" if args.parents else "rows"
    print(f"wrote {n} {what} of band {args.band} "
          f"(run {run}{', redistributed' if args.redistribute else ''}) to {out}")


def cmd_apcorr(args):
    import numpy as np

    from .measure.apcorr import measure_apcorr

    store, run = _open_run_store(args.store, args.run)
    if not np.isfinite(args.min_snr) or args.min_snr <= 0:
        raise InputError(f"--min-snr must be a positive number, got {args.min_snr}")
    ds = measure_apcorr(store, args.band, run=run, min_snr=args.min_snr, apertures=_radii(args.apertures))
    _using(args.run, run)
    group = f"apcorr/{args.band}"
    replaced = store.has(group)
    store.write({group: ds}, replace=True)
    print(f"{'replaced' if replaced else 'wrote'} {group} (run {run}): {_apcorr_summary(ds)}")


def _apcorr_summary(ds) -> str:
    """The PSF flux's stars, order and correction over the patch (a 9 x 9 grid) with its
    largest error; the stars and orders of all flux types; stars set aside."""
    import numpy as np

    from .measure.photometry.apcorr import ApertureCorrection

    corr = ApertureCorrection(ds)
    name = "psf_flux" if "psf_flux" in corr.names else corr.names[0]
    gx, gy = np.meshgrid(np.linspace(0, corr.width - 1, 9), np.linspace(0, corr.height - 1, 9))
    c, ce = corr.evaluate(name, gx.ravel(), gy.ravel())
    k = corr.names.index(name)
    used, cand = ds["n_stars"].values, ds["n_candidates"].values
    order = ds["fit_order"].values

    def span(a):  # "n" or "lo-hi" over the flux types
        return f"{a.min()}" if a.min() == a.max() else f"{a.min()}-{a.max()}"

    text = (f"{name} {used[k]} of {cand[k]} stars (order {order[k]}) x{c.min():.4f}-{c.max():.4f} "
            f"+- {ce.max():.4f}; {len(corr.names)} flux types to {ds.attrs['reference']} "
            f"({corr.reference_radius:g} px), each from {span(used)} of {span(cand)} stars, "
            f"order {span(order)} of {json.loads(ds.attrs['config'])['order']} asked")
    n_rejected = int(ds.attrs.get("n_rejected", 0))
    if n_rejected:
        text += (f"; {plural(n_rejected, 'star')} set aside (reference aperture "
                 "off the image or on masked pixels)")
    return text


def cmd_forced(args):
    import numpy as np

    from .measure.forced.run import default_visits, forced_photometry, write_table

    out = Path(args.output)
    if out.suffix.lower() not in (".fits", ".csv", ".h5"):
        raise InputError(f"{out}: output must end in .fits, .csv or .h5")
    _check_output(out, inputs=args.visits or (), stores=[args.store])
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    scheduler = _check_scheduler(args.scheduler) if args.scheduler is not None else None
    store, run = _open_run_store(args.store, args.run)
    visits = args.visits or default_visits(store)
    if not args.visits:  # the coadd's own visits are inputs too
        _check_output(out, inputs=visits)
    table = forced_photometry(store, run, visits, workers=args.workers, scheduler=scheduler,
                              background=not args.no_background, show_progress=True,
                              redistribute=args.redistribute)
    _using(args.run, run)
    n = write_table(table, out)
    measured = int(np.isfinite(table["flux"].values).sum())
    print(f"wrote {n} rows ({measured} measured) of run {run} on {plural(len(visits), 'visit')} to {out}")


def cmd_query(args):
    from .store.query import blend_table, select

    if args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    store, run = _open_run_store(args.store, args.run)
    table = blend_table(store, run)
    table = select(table, blend=args.blend, region=args.region, where=args.where,
                   wcs=store.read("exposure").attrs["wcs"] if store.has("exposure") else "")
    _using(args.run, run)
    if table.empty:
        print(f"no blends of run {run} match")
        return
    import pandas as pd

    with pd.option_context("display.max_rows", args.limit, "display.width", 200,
                           "display.max_columns", 20):
        print(table.head(args.limit).to_string(index=False))
    if len(table) > args.limit:
        print(f"... {len(table) - args.limit} more (raise --limit)")


def cmd_show(args):
    from .store.runs import check_run_parents
    from .store.store import Store

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise InputError(f"{out}: output must be a .png file")
    _check_output(out, stores=[args.store])
    if args.field:
        from .display import read_field, show_field

        store = Store(args.store)
        runs = store.runs()
        if args.run is not None and args.run not in runs:
            raise InputError(f"{store.path}: no run {args.run!r} (runs: {', '.join(runs) or 'none'})")
        run = args.run or (runs[-1] if runs else None)
        if run is not None:
            check_run_parents(store, run)  # the boxes are the parents'
            _using(args.run, run)
        bands, idx, image, boxes = read_field(store, run)
        title = f"{store.path.name}: {len(boxes)} parents, " + (f"run {run}" if run else "no run")
        size = show_field(bands, idx, image, boxes, out, title=title)
        marked = sum(b.status in ("skipped", "failed") for b in boxes)
        print(f"wrote {out} ({size[0]}x{size[1]} px): {len(boxes)} parent boxes"
              + (f", {marked} skipped or failed in run {run}" if run else ""))
        return
    from .display import read_blend_picture, show_blend

    store, run = _open_run_store(args.store, args.run)
    check_run_parents(store, run)  # the picture's footprint is the parents'
    pic = read_blend_picture(store, args.blend, run)
    _using(args.run, run)
    size = show_blend(pic, out)
    what = (f"{len(pic.models)} sources" if len(pic.models) else
            f"data and {len(pic.source_ids)} peaks (not deblended in run {run})")
    print(f"wrote {out} ({size[0]}x{size[1]} px): blend {args.blend} of run {run} with {what}")


def cmd_migrate(args):
    from .store.migrate import migrate_store
    from .store.store import Store, default_layout

    store = Store(args.store)
    before = store.layout
    # single-file stores become linked (the default layout) unless told to stay;
    # only an explicit --layout single asks for the conversion that does not exist
    layout = args.layout or ("linked" if default_layout() == "linked" else None)
    changed = migrate_store(store, layout=layout)
    if store.layout != before:
        print(f"{store.path}: converted from the {before} to the {store.layout} store layout")
    if not changed:
        if store.layout == before:
            print(f"{store.path}: every group is at its latest schema version; nothing to do")
        return
    for group, (old, new) in changed.items():
        print(f"  {group}: v{old} -> v{new}")
    print(f"migrated {len(changed)} group(s) of {store.path}")


def cmd_diff(args):
    from .measure.compare import diff_runs
    from .store.store import run_group

    if args.top < 0:
        raise InputError(f"--top must be 0 or more, got {args.top}")
    store, _ = _open_run_store(args.store, args.run_a)
    runs = store.runs()
    if args.run_b is None:  # default: compare with the newest (the two newest when none is named)
        if args.run_a is None:
            if len(runs) < 2:
                raise InputError(f"{store.path}: diff needs two runs, the store has {len(runs)}")
            args.run_a, args.run_b = runs[-2], runs[-1]
            sys.stderr.write(f"using runs {args.run_a} and {args.run_b} (the two newest)\n")
        else:
            if args.run_a == runs[-1]:
                raise InputError(f"{store.path}: run {args.run_a!r} is the newest; name the run to "
                                 "compare it with")
            args.run_b = runs[-1]
            _announce(args.run_b, "newest, to compare with")
    else:
        _open_run_store(args.store, args.run_b)
    table, summary = diff_runs(store.read(run_group(args.run_a)), store.read(run_group(args.run_b)))
    print(f"{args.run_a} -> {args.run_b}: {summary['matched']} sources matched by (parent, peak); "
          f"{summary['only_a']} only in {args.run_a}, {summary['only_b']} only in {args.run_b}")
    for band, s in summary["bands"].items():
        print(f"  {band}: median |dflux/flux| {s['median_abs_rel']:.4f}, 90th percentile {s['p90_abs_rel']:.4f}")
    it_a, it_b = summary["median_iterations"]
    print(f"  convergence: {summary['newly_converged']} sources newly converged, "
          f"{summary['no_longer_converged']} no longer; median iterations {it_a:g} -> {it_b:g}")
    if args.top and len(table):
        cols = [c for c in table.columns if c.startswith("dflux_")]
        worst = table.assign(worst=table[cols].abs().max(axis=1)).nlargest(args.top, "worst")
        print(worst[["parent", "peak", "source_id_a", "source_id_b", *cols]].to_string(index=False))


def cmd_import_lsst(args):
    from .lsst import place_on_exposure, read_lsst_models
    from .store.store import Store, check_run_name, run_group

    path = Path(args.store)
    if args.run is not None:
        check_run_name(args.run)
    store = Store(path) if path.exists() else None
    run = read_lsst_models(args.models, name=args.run or "lsst")
    if store is not None and store.has("exposure"):
        with store.open("exposure") as exposure:
            run = place_on_exposure(run, exposure)
    if store is None:
        name = args.run or "lsst-1"
        run.attrs["name"] = name
        Store.create(path, {run_group(name): run})
    else:  # the survey's source ids are kept (refused if already stored)
        name = store.add_run(run, name=args.run, prefix="lsst", keep_ids=True)
    print(f"imported {run.sizes['blend']} blends, {run.sizes['source']} sources, "
          f"{run.sizes['component']} components from {args.models} into run {name} of {path}")


def cmd_export_lsst(args):
    from .lsst import write_lsst_models
    from .store.store import run_group

    out = _check_output(args.output, stores=[args.store])
    if out.suffix.lower() != ".json":  # the models are JSON, whatever the name
        raise InputError(f"{out}: output must end in .json")
    store, run = _open_run_store(args.store, args.run)
    ds = store.read(run_group(run))
    if ds.sizes["blend"] == 0:  # a file import-lsst (and Rubin's reader) could not take back
        raise InputError(f"{store.path}: run {run!r} has no blends; nothing to export")
    _using(args.run, run)
    write_lsst_models(ds, out)
    print(f"wrote run {run} ({ds.sizes['blend']} blends, {ds.sizes['source']} sources) to {args.output}")


class _Version(argparse.Action):
    """``--version``: the installed version is looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        print(f"scarletstore {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from .store.blend_columns import BLEND_COLUMNS, WHERE_GRAMMAR

    BLEND_COLUMN_NAMES = list(BLEND_COLUMNS.values())

    p = _Parser(prog="scarletstore", description=__doc__.splitlines()[0])
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("ingest", help="read FITS per band or an npz into a new store")
    s.add_argument("store")
    s.add_argument("inputs", nargs="+", help="one FITS file per band, or one .npz")
    s.add_argument("--bands", help="band names in input order, e.g. g,r,i")
    s.add_argument("--psf", action="append", metavar="BAND=FILE", help="PSF image for a band")
    s.add_argument("--no-defect-mask", action="store_true",
                   help="do not set the CR plane on pixels sharper than the PSF allows "
                        "(unflagged hot columns, hot pixels, cosmic rays)")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("info", help="list a store's groups, schemas, bands and runs")
    s.add_argument("store")
    s.add_argument("--check", action="store_true",
                   help="validate every group and array; exit 2 with the problems found")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("simulate", help="simulate a multi-band field (needs galsim)")
    s.add_argument("out_dir", help="new (or empty) directory for the FITS files and the truth")
    s.add_argument("--size", type=int, default=512, help="side of the square field in pixels "
                   "(0.2 arcsec; at least 16, 32 with --visits; default 512)")
    s.add_argument("--seed", type=int, default=1, help="random seed: the same seed gives the "
                   "same field (default 1)")
    s.add_argument("--bands", default="ugrizy", help="LSST bands to draw, e.g. gri or g,r,i "
                   "(default ugrizy)")
    s.add_argument("--density", type=float, default=90.0,
                   help="sources per square arcminute (default 90)")
    s.add_argument("--visits", type=int, default=None,
                   help="write N calibrated visits per band (and grid.fits) instead of a coadd")
    # fields unlike the defaults, where the bugs were (not for --visits)
    s.add_argument("--psf-beta", type=float, default=None,
                   help="Moffat beta of the PSF (default 3.5; 2.5-3 gives strong wings)")
    s.add_argument("--bright-stars", type=int, default=0, help="extra stars with i in [14.5, 18]")
    s.add_argument("--saturation", type=float, default=None,
                   help="clip pixels above this level (nJy per pixel) and flag them SAT")
    s.add_argument("--cosmic-rays", type=int, default=0,
                   help="raw cosmic-ray tracks per band, kept in the image and flagged CR")
    s.add_argument("--bad-columns", type=int, default=0,
                   help="hot bad columns per band, kept at their raw value and flagged BAD")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("coadd", help="warp visits onto a grid and stack them into a new store")
    s.add_argument("store")
    s.add_argument("visits", nargs="+", help="one FITS file per visit")
    s.add_argument("--grid", required=True, help="FITS file whose IMAGE WCS and shape define the grid")
    s.add_argument("--bands", help="bands to coadd, in this order (default: all, in input order)")
    s.add_argument("--kernel", choices=["lanczos3"], default="lanczos3")
    s.add_argument("--workers", type=int, default=1,
                   help="visits warped at once, as processes on a local dask cluster")
    s.add_argument("--scheduler", help="address of an existing dask scheduler to warp visits on")
    s.add_argument("--no-reject", action="store_true",
                   help="keep artifacts (no CompareWarp-style rejection; the PSF-matched warps it "
                        "compares are not made, so backgrounds are not matched either)")
    s.add_argument("--psf-matched-fwhm", type=float, default=None, metavar="ARCSEC",
                   help="target FWHM of the PSF-matched coadd (default 1.1 x the widest visit)")
    s.set_defaults(func=cmd_coadd)

    s = sub.add_parser("tract", help="cut a grid into overlapping patches and run coadd, detect "
                                      "and deblend on each (dask tasks) into its own store")
    s.add_argument("out_dir", help="new (or empty) directory: patch_<i>_<j>/store.h5 and tract.json; "
                   "with --resume, a tract's directory")
    s.add_argument("visits", nargs="*", metavar="VISIT", help="one FITS file per visit")
    s.add_argument("--grid", help="FITS file whose IMAGE WCS and shape define the tract (required)")
    s.add_argument("--patches", metavar="NxM",
                   help="patches along x and along y, e.g. 2x2 (required)")
    s.add_argument("--overlap", type=int, metavar="PIXELS",
                   help="pixels shared by the outer boxes of neighbouring patches (required)")
    s.add_argument("--bands", help="bands to coadd, in this order (default: all, in input order)")
    s.add_argument("--threshold", type=float, help="detection threshold in sigma (default 5)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="deblend configuration override")
    s.add_argument("--resume", action="store_true",
                   help="take up an interrupted or partly failed tract in OUT_DIR: run the patches "
                   "that are not done, with the grid, visits and settings of its tract.json")
    s.add_argument("--workers", type=int, default=1, help="patches at once, as processes on a local "
                   "dask cluster (1: in this process)")
    s.add_argument("--scheduler", help="address of an existing dask scheduler (its workers must "
                   "see the visits and OUT_DIR)")
    s.set_defaults(func=cmd_tract)

    s = sub.add_parser("merge", help="the tract catalog of a band: every patch's sources, each "
                                      "once is_primary")
    s.add_argument("out_dir", help="a tract directory made by 'scarletstore tract'")
    s.add_argument("--band", required=True)
    s.add_argument("-o", "--output", required=True, help="OUT.fits, OUT.csv or OUT.h5")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("detect", help="find parent footprints and peaks")
    s.add_argument("store")
    s.add_argument("--threshold", type=float, default=5.0, help="detection threshold in sigma")
    s.add_argument("--min-area", type=int, default=None, help="minimum footprint area (pixels)")
    s.add_argument("--peaks", help="FITS or CSV table of known positions (ra/dec or x/y)")
    s.add_argument("--bands", help="bands to detect in (default: all)")
    s.add_argument("--bad-planes", metavar="PLANES",
                   help="comma-separated mask planes to ignore (default: "
                        "BAD,CR,NO_DATA,SAT,SUSPECT,EDGE plus those the exposure records)")
    s.add_argument("--replace", action="store_true", help="replace existing parents")
    s.add_argument("--image", choices=["direct", "likelihood"], default="direct",
                   help="footprints from the direct coadd's PSF-matched filter (default) or "
                        "from the likelihood coadd's significance (stores made by coadd)")
    s.set_defaults(func=cmd_detect)

    s = sub.add_parser("deblend", help="deblend every parent into a new run")
    s.add_argument("store")
    s.add_argument("--method", choices=["scarlet", "sdss"], default="scarlet")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="configuration override (repeatable); values are JSON, e.g. max_iter=100, "
                        f"symmetric=false; keys: {', '.join(_config_keys())}")
    s.add_argument("--blends", help="comma-separated parent ids to deblend (default: all)")
    s.add_argument("--run", help="name of the new run (default METHOD-N)")
    s.add_argument("--workers", type=int, default=1, help="processes on a local dask cluster")
    s.add_argument("--scheduler", help="address of an existing dask scheduler")
    s.add_argument("--from-run", help="warm-start from this run's stored models")
    s.set_defaults(func=cmd_deblend)

    s = sub.add_parser("catalog", help="per-band catalog with heavy-footprint measurements")
    s.add_argument("store")
    s.add_argument("--band", required=True)
    s.add_argument("--run", help="run name (default: the newest)")
    s.add_argument("--redistribute", action="store_true", help="re-apportion the image among children")
    s.add_argument("-o", "--output", required=True, help="OUT.fits, OUT.csv or OUT.h5")
    s.add_argument("--psf", action="append", metavar="BAND=FILE",
                   help="rebuild the band with a new PSF (no refit)")
    s.add_argument("--image", action="append", metavar="BAND=FILE.fits",
                   help="redistribute a reprocessed image (IMAGE/MASK/VARIANCE HDUs)")
    s.add_argument("--apertures", metavar="R1,R2,...",
                   help="radii (pixels) of the circular aperture fluxes (default 3,6,12)")
    s.add_argument("--parents", action="store_true", help="one row per parent, measured as a whole")
    s.set_defaults(func=cmd_catalog)

    s = sub.add_parser("forced", help="forced photometry of every stored source on each visit")
    s.add_argument("store")
    s.add_argument("visits", nargs="*", help="visit FITS files (default: the coadd's own visits)")
    s.add_argument("-o", "--output", required=True, help="OUT.fits, OUT.csv or OUT.h5")
    s.add_argument("--run", help="run name (default: the newest)")
    s.add_argument("--workers", type=int, default=1, help="processes on a local dask cluster")
    s.add_argument("--scheduler", help="address of an existing dask scheduler")
    s.add_argument("--no-background", action="store_true",
                   help="do not fit a constant sky pedestal per blend")
    s.add_argument("--redistribute", action="store_true",
                   help="fluxes of per-visit heavy footprints: the visit image shared in "
                        "proportion to the fitted models")
    s.set_defaults(func=cmd_forced)

    s = sub.add_parser("apcorr", help="fit and store a band's aperture corrections from its stars")
    s.add_argument("store")
    s.add_argument("--band", required=True)
    s.add_argument("--run", help="run name (default: the newest)")
    s.add_argument("--min-snr", type=float, default=50.0, help="reference-aperture S/N of the stars (default 50)")
    s.add_argument("--apertures", metavar="R1,R2,...",
                   help="aperture radii (pixels); the largest is the reference (default 3,6,12)")
    s.set_defaults(func=cmd_apcorr)

    s = sub.add_parser("query", help="list blends of a run")
    s.add_argument("store")
    s.add_argument("--blend", type=int, help="parent id")
    s.add_argument("--region", nargs=3, type=float, metavar=("RA", "DEC", "RADIUS_ARCSEC"))
    s.add_argument("--where", help="condition on the columns, e.g. \"n_sources > 3 and not converged\" "
                   f"or \"reason in ['isolated', 'masked']\"; allowed: {WHERE_GRAMMAR}; columns: "
                   f"{', '.join(BLEND_COLUMN_NAMES)}")
    s.add_argument("--run", help="run name (default: the newest)")
    s.add_argument("--limit", type=int, default=50, help="rows to print (default 50)")
    s.set_defaults(func=cmd_query)

    s = sub.add_parser("show", help="asinh RGB picture of a blend (data, model, residual, sources) "
                                     "or of the whole field with every parent's box")
    s.add_argument("store")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--blend", type=int, help="parent id")
    what.add_argument("--field", action="store_true",
                      help="the whole exposure with parent boxes (skipped/failed ones marked)")
    s.add_argument("--run", help="run name (default: the newest)")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("migrate", help="upgrade every group to its latest schema version and a "
                       "single-file store to the linked layout (atomic)")
    s.add_argument("store")
    s.add_argument("--layout", choices=["single", "linked"],
                   help="also convert to this store layout (default: linked, or keep the "
                        "layout when SCARLETSTORE_LAYOUT=single)")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("diff", help="per-source flux and convergence changes between two runs")
    s.add_argument("store")
    s.add_argument("run_a", nargs="?", help="the earlier run (default: the second newest)")
    s.add_argument("run_b", nargs="?", help="the later run (default: the newest)")
    s.add_argument("--top", type=int, default=10,
                   help="list the N sources that changed most (0: none; default 10)")
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser("import-lsst", help="import Rubin persisted scarlet models (JSON) as a run")
    s.add_argument("models")
    s.add_argument("store", help="store to add the run to (created when missing)")
    s.add_argument("--run", help="name of the new run (default lsst-N)")
    s.set_defaults(func=cmd_import_lsst)

    s = sub.add_parser("export-lsst", help="export a run in Rubin's versioned scarlet model JSON")
    s.add_argument("store")
    s.add_argument("--run", help="run name (default: the newest)")
    s.add_argument("-o", "--output", required=True, help="OUT.json")
    s.set_defaults(func=cmd_export_lsst)
    return p


# a store's temporary copy (.NAME.PID-HOST.XXXXXXXX.tmp) and an export's (.NAME.tmp)
_TEMPORARY = re.compile(r"\.(?P<name>.+?)(?:\.\d+-[^/]*?)?(?:\.[A-Za-z0-9_]{8})?\.tmp")


# a linked store's product file: NAME.d/<group>-<32 hex>.h5
_PRODUCT = re.compile(r"[A-Za-z0-9._-]+-[0-9a-f]{32}\.h5")


def _user_path(filename) -> str:
    """The path the user named for an OS error's file: a temporary copy, or a
    linked store's product file, is reported as the store or output it stands for."""
    path = Path(os.fsdecode(filename))
    if _PRODUCT.fullmatch(path.name) and path.parent.name.endswith(".d"):
        return str(path.parent.with_name(path.parent.name[:-2]))
    m = _TEMPORARY.fullmatch(path.name)
    return str(path.with_name(m.group("name")) if m else path)


def _quiet_stdout() -> None:
    """After a closed pipe (``| head``): point stdout at /dev/null so the
    interpreter's flush at exit does not report the same broken pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stdout (tests) has no descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .startup import first_run_notice, preload_cython_blas

    preload_cython_blas()  # numba's set-up then skips importing scipy.linalg (~0.15 s)
    first_run_notice(args.command)
    try:
        status = args.func(args) or 0  # non-zero: the work ran but part of it failed (tract)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # the shell's status for a pipe reader that went away (128 + SIGPIPE)
    except ScarletStoreError as exc:
        sys.stderr.write(f"scarletstore {args.command}: error: {exc}\n")
        return 2
    except OSError as exc:  # missing paths, permissions, full disks: the user's environment
        where = f"{_user_path(exc.filename)}: " if exc.filename else ""
        what = exc.strerror or str(exc) or type(exc).__name__
        sys.stderr.write(f"scarletstore {args.command}: error: {where}{what}\n".replace("\n", " ")
                         .rstrip() + "\n")
        return 2
    except KeyboardInterrupt:
        hint = f"; 'scarletstore tract {args.out_dir} --resume' takes it up" \
            if args.command == "tract" else ""
        sys.stderr.write(f"scarletstore {args.command}: interrupted{hint}\n")
        return 130
    return status


def run() -> int:
    """The ``scarletstore`` command (and ``python -m scarletstore.cli``): :func:`main`,
    then an exit without the interpreter's teardown.

    Once the command has returned, its output is flushed and every exit
    handler has run, the process ends at once (``os._exit`` with the
    command's status) instead of clearing every module and running a last
    garbage collection over numba's and xarray's objects: 0.3-0.5 s of a
    one-blend ``deblend`` on this machine, a quarter of the call, spent
    freeing memory the operating system frees anyway. Every file a command
    writes is closed (and synced) before it returns, so nothing is lost. A
    command that ends in an unexpected exception (a traceback) exits as
    Python always does; :func:`main` itself, as the tests call it, is unchanged.
    """
    status = []
    # registered before anything the command imports registers its own handlers:
    # exit handlers run last-registered first, so this one runs after all of them
    atexit.register(_exit_now, status)
    code = main()
    status.append(code)
    return code


def _exit_now(status: list) -> None:
    if not status:  # main() did not return: leave the exit to Python
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to write
            pass
    os._exit(status[0])


if __name__ == "__main__":
    sys.exit(run())
