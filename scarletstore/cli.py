"""The ``scarletstore`` command line.

Every command prints a one-line error and exits with status 2 on bad input;
no command leaves a half-written store (all writes are atomic).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from pathlib import Path

from .errors import InputError, ScarletStoreError


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
        out[band.strip()] = path
    return out


# ---------------------------------------------------------------- commands
def cmd_ingest(args):
    from .ingest import read_inputs
    from .store import Store, StoreError

    exposure = read_inputs(args.inputs, bands=_bands(args.bands),
                           psf_files=_band_files(args.psf, "--psf"))
    path = Path(args.store)
    if path.exists():
        store = Store(path)
        if store.has("exposure"):
            raise StoreError(f"{path}: already holds an exposure; use a new store")
        store.write({"exposure": exposure})
    else:
        Store.create(path, {"exposure": exposure})
    ny, nx = exposure.sizes["y"], exposure.sizes["x"]
    print(f"ingested {exposure.sizes['band']} bands ({','.join(exposure.band.values)}) "
          f"of {ny}x{nx} pixels into {path}")


def cmd_info(args):
    from .store import Store

    store = Store(args.store)
    groups = store.groups()
    print(f"store {store.path} ({store.path.stat().st_size / 1e6:.2f} MB)")
    for name, g in groups.items():
        dims = ", ".join(f"{k}={v}" for k, v in sorted(g["dims"].items()))
        print(f"  {name:<24} {g['schema']} v{g['schema_version']}  {dims}  "
              f"{g['nbytes'] / 1e6:.2f} MB")
        attrs = g["attrs"]
        if g["schema"] == "exposure":
            ex = store.read(name, validate=False)
            print(f"    bands: {','.join(ex.band.values)}; wcs: {'yes' if attrs.get('wcs') else 'no'}; "
                  f"sources: {', '.join(json.loads(attrs.get('sources', '[]')))}")
        if g["schema"] == "run":
            print(f"    method {attrs.get('method')}; created {attrs.get('created')}; "
                  f"scarletstore {attrs.get('package_version')}; from run: {attrs.get('from_run') or '-'}")
    runs = store.runs()
    print(f"  runs: {', '.join(runs) if runs else 'none'}")


def cmd_simulate(args):
    from .simulate import simulate_field

    if args.size < 16:
        raise InputError("--size must be at least 16 pixels")
    if args.density <= 0:
        raise InputError("--density must be positive")
    out = simulate_field(args.out_dir, size=args.size, seed=args.seed, bands=_bands(args.bands),
                         density=args.density, progress=True)
    print(f"simulated {args.size}x{args.size} field in {len(out['bands'])} bands: "
          f"{' '.join(str(p) for p in out['bands'].values())}; truth in {out['truth']}")


def cmd_detect(args):
    from .detect import detect, read_peaks_table
    from .store import Store

    if args.threshold <= 0:
        raise InputError(f"--threshold must be positive, got {args.threshold:g}")
    store = Store(args.store)
    if not store.has("exposure"):
        raise InputError(f"{store.path}: no exposure group; run 'scarletstore ingest' first")
    if store.has("parents") and not args.replace:
        raise InputError(f"{store.path}: already has parents; pass --replace to detect again")
    exposure = store.read("exposure")
    known = read_peaks_table(args.peaks, exposure.attrs["wcs"]) if args.peaks else None
    parents = detect(exposure, threshold=args.threshold, min_area=args.min_area, known=known,
                     bands=_bands(args.bands), progress=True)
    store.write({"parents": parents}, replace=args.replace)
    n_ext = int(((parents["peak_flags"].values & 1) != 0).sum())
    print(f"detected {parents.sizes['parent']} parents with {parents.sizes['peak']} peaks "
          f"({n_ext} external) in {store.path}")


def cmd_deblend(args):
    from .deblend.config import DeblendConfig
    from .deblend.run import deblend_exposure
    from .store import Store, run_group

    store = Store(args.store)
    for group, hint in (("exposure", "ingest"), ("parents", "detect")):
        if not store.has(group):
            raise InputError(f"{store.path}: no {group} group; run 'scarletstore {hint}' first")
    config = DeblendConfig().with_overrides(args.set or [])
    runs = store.runs()
    name = args.run or next(f"{args.method}-{k}" for k in range(1, 10**6) if f"{args.method}-{k}" not in runs)
    if name in runs:
        raise InputError(f"{store.path}: run {name!r} already exists (runs are never overwritten)")
    if "/" in name or not name.strip():
        raise InputError(f"invalid run name {name!r}")
    blend_ids = None
    if args.blends:
        try:
            blend_ids = [int(b) for b in args.blends.split(",") if b.strip()]
        except ValueError:
            raise InputError(f"--blends expects comma-separated parent ids, got {args.blends!r}") from None
    run = deblend_exposure(
        store.read("exposure"), store.read("parents"), config, args.method, blend_ids=blend_ids,
        workers=args.workers, scheduler=args.scheduler, name=name, show_progress=True,
        first_source_id=store.max_source_id() + 1, exposure_checksum=store.checksum("exposure"),
        parents_checksum=store.checksum("parents"))
    store.write({run_group(name): run})
    nb = run.sizes["blend"]
    fitted = int((run["blend_reason"].values == "").sum())
    failed = int(sum(str(r).startswith("failed") for r in run["blend_reason"].values))
    conv = int(run["blend_converged"].values[run["blend_reason"].values == ""].sum())
    rt = run["blend_runtime"].values[run["blend_reason"].values == ""]
    print(f"run {name}: {nb} parents, {fitted} fitted ({conv} converged, {failed} failed), "
          f"{run.sizes['source']} sources, {run.sizes['component']} components; "
          f"median {1e3 * (float(np.median(rt)) if rt.size else 0):.1f} ms per blend")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scarletstore", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("ingest", help="read FITS per band or an npz into a new store")
    s.add_argument("store")
    s.add_argument("inputs", nargs="+", help="one FITS file per band, or one .npz")
    s.add_argument("--bands", help="band names in input order, e.g. g,r,i")
    s.add_argument("--psf", action="append", metavar="BAND=FILE", help="PSF image for a band")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("info", help="list a store's groups, schemas, bands and runs")
    s.add_argument("store")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("simulate", help="simulate a multi-band field (needs galsim)")
    s.add_argument("out_dir")
    s.add_argument("--size", type=int, default=512)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--bands", default="ugrizy")
    s.add_argument("--density", type=float, default=90.0, help="sources per square arcminute")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("detect", help="find parent footprints and peaks")
    s.add_argument("store")
    s.add_argument("--threshold", type=float, default=5.0, help="detection threshold in sigma")
    s.add_argument("--min-area", type=int, default=None, help="minimum footprint area (pixels)")
    s.add_argument("--peaks", help="FITS or CSV table of known positions (ra/dec or x/y)")
    s.add_argument("--bands", help="bands to detect in (default: all)")
    s.add_argument("--replace", action="store_true", help="replace existing parents")
    s.set_defaults(func=cmd_detect)

    s = sub.add_parser("deblend", help="deblend every parent into a new run")
    s.add_argument("store")
    s.add_argument("--method", choices=["scarlet", "sdss"], default="scarlet")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="configuration override")
    s.add_argument("--blends", help="comma-separated parent ids to deblend (default: all)")
    s.add_argument("--run", help="name of the new run (default METHOD-N)")
    s.add_argument("--workers", type=int, default=1, help="processes on a local dask cluster")
    s.add_argument("--scheduler", help="address of an existing dask scheduler")
    s.set_defaults(func=cmd_deblend)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ScarletStoreError as exc:
        sys.stderr.write(f"scarletstore {args.command}: error: {exc}\n")
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        sys.stderr.write(f"scarletstore {args.command}: error: {exc.filename}: {exc.strerror}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"scarletstore {args.command}: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
