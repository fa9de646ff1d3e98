"""End-to-end demo: visits -> coadd -> detect -> deblend -> apcorr -> catalog -> forced -> pictures.

Run with ``make demo``. Everything goes through the ``scarletstore`` command
line, exactly as a user would type it; the outputs land in ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from scarletstore.cli import main as cli


def step(title, argv):
    t0 = time.perf_counter()
    print(f"\n$ scarletstore {' '.join(str(a) for a in argv)}", flush=True)
    code = cli([str(a) for a in argv])
    if code != 0:
        sys.exit(f"demo: step '{title}' failed with status {code}")
    print(f"  ({title}: {time.perf_counter() - t0:.1f} s)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_output")
    ap.add_argument("--size", type=int, default=300, help="side of the coadd grid in pixels")
    ap.add_argument("--visits", type=int, default=4, help="visits per band")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    store = out / "field.h5"
    sim = out / "visits"

    step("simulate visits", ["simulate", sim, "--visits", args.visits, "--size", args.size,
                             "--seed", args.seed, "--bands", "gri", "--bright-stars", 9])
    visits = sorted(sim.glob("visit_*.fits"))
    step("coadd", ["coadd", store, *visits, "--grid", sim / "grid.fits", "--bands", "g,r,i"])
    step("detect", ["detect", store])
    step("deblend", ["deblend", store, "--run", "scarlet"])
    step("baseline", ["deblend", store, "--method", "sdss", "--run", "sdss"])
    step("aperture correction", ["apcorr", store, "--band", "r", "--run", "scarlet"])
    step("catalog", ["catalog", store, "--band", "r", "--run", "scarlet", "-o", out / "catalog_r.fits"])
    step("forced", ["forced", store, *visits, "--run", "scarlet", "-o", out / "forced.fits"])

    import scarletstore as ss
    from scarletstore.store.query import blend_table

    table = blend_table(ss.open(store), "scarlet")
    fitted = table[(table["reason"] == "") & (table["n_sources"] > 1)]
    if fitted.empty:
        sys.exit("demo: no multi-source blend was fitted")
    pick = int(fitted.sort_values("n_sources", ascending=False)["parent"].iloc[0])
    step("show", ["show", store, "--blend", pick, "--run", "scarlet", "-o", out / f"blend_{pick}.png"])
    step("show field", ["show", store, "--field", "--run", "scarlet", "-o", out / "field.png"])
    step("info", ["info", store])

    from astropy.table import Table
    cat = Table.read(out / "catalog_r.fits")
    forced = Table.read(out / "forced.fits")
    good = np.asarray(forced["flags"]) == 0
    chi2 = np.asarray(forced["chi2"], np.float64)
    print("\nsummary")
    print(f"  visits:   {len(visits)} ({args.visits} per band, g r i) coadded onto a "
          f"{args.size}x{args.size} grid")
    print(f"  store:    {store}")
    print(f"  catalog:  {out / 'catalog_r.fits'} ({len(cat)} children in r, "
          f"median blendedness {np.nanmedian(np.ma.filled(cat['blendedness'], np.nan)):.3f}, "
          f"aperture-corrected: {'yes' if cat.meta.get('APCORR') else 'no'})")
    print(f"  forced:   {out / 'forced.fits'} ({len(forced)} source-visit rows, "
          f"{int(good.sum())} unflagged, median chi2/dof {np.nanmedian(chi2[good]):.2f})")
    print(f"  pictures: {out / f'blend_{pick}.png'} (blend {pick}), {out / 'field.png'} "
          f"({len(fitted)} multi-source blends fitted)")
    multi = table["reason"] == ""  # fitted as blends; isolated parents are one-source fits
    print(f"  scarlet:  {len(table)} parents: {int(multi.sum())} blends fitted "
          f"({int(table['converged'][multi].sum())} converged, median {np.median(table['iterations'][multi]):.0f} "
          f"iterations), {int((table['reason'] == 'isolated').sum())} isolated")


if __name__ == "__main__":
    main()
