"""Start-up and per-call costs of the command line, timed as whole processes.

``python benchmarks/bench_cli.py [--repeat N]``

Set-up (once, cached in ``$SCARLETSTORE_BENCH_DIR``/cli-600-7, untimed):
``scarletstore simulate DIR --size 600 --seed 7``, ``ingest`` of the six
band FITS files, ``detect``. Then a fresh, empty numba cache directory is
made for this invocation and the first one-blend ``deblend`` and the first
``catalog`` fill it: their wall minus the warm median is the compile (and
cache-write) cost, quoted apart. Every timed call runs afterwards with the
warm cache, as every later process of a user does.

Timed, alternating, ``--repeat`` times each (median quoted):

* ``scarletstore --help``;
* ``python -c "import numpy, h5py, numba"``: the third-party start-up
  every deblend and catalog pays before any package code runs, printed
  beside the fixed costs (the host's yardstick: it is not ours to cut;
  neither call imports xarray or pandas since the store's Frames);
* ``deblend --blends <one id>`` on a copy of the detected store;
* ``catalog --band r`` of a store holding one one-blend run;
* the full ``deblend`` (every parent) on a copy of the detected store.

Each deblend writes into its own fresh copy of the detected store (copied
before the clock starts), so every call pays the same write. Printed: the
fixed cost of a call (one-blend deblend, one-band catalog), the marginal cost
per blend ``(full wall - one-blend wall) / (parents - 1)``, and beside it the
fit-only figure: the recorded ``blend_runtime`` of the full run (sum, and per
blend). Wall and CPU (user + system) times are both quoted: on a shared,
loaded machine the wall swings with the load and the CPU time much less.
Last, ``python -X importtime`` of a one-blend deblend and of a
catalog, folded to the top-level modules that cost most.

``--compare TREE`` times another source tree of the package (e.g. the main
checkout) the same way, each call alternating between the two trees (A/B,
so load drifts hit both alike), and prints the figures of both and a
before/after table of medians.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE  # noqa: E402

BANDS = "ugrizy"
# what every deblend or catalog process imports before any package code runs:
# the part of a call's fixed cost that no change inside the package removes
THIRD_PARTY = "import numpy, h5py, numba"


def _env(numba_cache: Path, root: Path = ROOT) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env["NUMBA_CACHE_DIR"] = str(numba_cache)
    env["_BENCH_ROOT"] = str(root)  # the tree whose code the call runs (its cwd)
    return env


def python_call(code, env) -> float:
    """Run ``python -c CODE`` as :func:`cli` runs a command (wall returned, CPU in ``cli.cpu``)."""
    return cli([], env, extra=("-c", code), module=False)


def cli(args, env, extra=(), module=True) -> float:
    """Run ``python [extra] -m scarletstore.cli ARGS`` and return its wall time (s).

    The process's CPU time (user + system) is left in ``cli.cpu``: on a shared,
    loaded machine wall times swing by a factor 2, CPU times much less.
    """
    cmd = [sys.executable, *extra, *(("-m", "scarletstore.cli") if module else ()), *map(str, args)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # cwd: ``-m`` puts the working directory first on sys.path; run this tree's code
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          cwd=env.get("_BENCH_ROOT", ROOT))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    cli.last = proc
    cli.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall


def prepare(work: Path, env) -> tuple[Path, int, int]:
    """The detected store (cached), a typical parent id and the number of parents."""
    sim, store = work / "sim", work / "detected.h5"
    if not store.exists():
        cli(["simulate", sim, "--size", 600, "--seed", 7, "--bands", BANDS], env)
        from scarletstore.store.store import move_store, remove_store

        tmp = work / "detected.tmp.h5"
        if tmp.exists():
            remove_store(tmp)
        cli(["ingest", tmp, *[sim / f"{b}.fits" for b in BANDS], "--bands", ",".join(BANDS)], env)
        cli(["detect", tmp], env)
        move_store(tmp, store)  # a linked store is the file and its folder
    import numpy as np

    from scarletstore.store.store import Store

    parents = Store(store).read("parents")
    ids = parents["parent_id"].values
    npeak = parents["peak_count"].values
    # a genuine blend of median size among the multi-peak parents
    multi = np.flatnonzero(npeak > 1)
    order = multi[np.argsort(parents["area"].values[multi] if "area" in parents else npeak[multi],
                             kind="stable")]
    one = int(ids[order[len(order) // 2]])
    return store, one, int(ids.size)


def run_copy(base: Path, folder: Path, tag: str) -> Path:
    from scarletstore.store.store import copy_store, remove_store

    dst = folder / f"{tag}.h5"
    if dst.exists():
        remove_store(dst)
    copy_store(base, dst)
    return dst


def blend_runtimes(path: Path):
    from scarletstore.store.store import Store

    store = Store(path)
    run = store.read(f"runs/{store.runs()[-1]}")
    ok = run["blend_reason"].values == ""
    return run["blend_runtime"].values[ok]


def importtime(args, env, top=12) -> list[tuple[str, float]]:
    """Cumulative import time (s) of the top-level imports of one CLI process."""
    cli(args, env, extra=("-X", "importtime"))
    rows = []
    for line in cli.last.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(3)) <= 1:  # one space: a top-level import of the process
            rows.append((m.group(4), int(m.group(2)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def _jobs(base, calls, catalog_store, out, one, env, tag):
    return {
        "help": lambda: cli(["--help"], env),
        "floor": lambda: python_call(THIRD_PARTY, env),
        "one": lambda: cli(["deblend", run_copy(base, calls, f"one{tag}"), "--blends", one,
                            "--run", "x"], env),
        "catalog": lambda: cli(["catalog", catalog_store, "--band", "r", "-o", out], env),
        "full": lambda: cli(["deblend", run_copy(base, calls, f"full{tag}"), "--run", "x"], env),
    }


def _report(label, walls, cpus, one, nparents, rt, cold_one, cold_cat):
    """Print one tree's figures (medians of the alternating runs)."""
    med = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}

    def fmt(k):
        return (f"{med[k]:6.3f} s wall, {cpu[k]:6.3f} s CPU  "
                f"(walls: {', '.join(f'{w:.3f}' for w in walls[k])}; "
                f"CPU: {', '.join(f'{c:.2f}' for c in cpus[k])})")

    print(f"-- {label}")
    print(f"scarletstore --help            {fmt('help')}")
    print(f"third-party imports only       {fmt('floor')}")
    print(f"deblend --blends {one:<14d}{fmt('one')}")
    print(f"catalog --band r (1 blend)     {fmt('catalog')}")
    print(f"deblend (all {nparents} parents)      {fmt('full')}")
    print(f"fixed cost of a call: deblend of one blend {med['one']:.3f} s, "
          f"catalog of one band {med['catalog']:.3f} s")
    marginal = (med["full"] - med["one"]) / (nparents - 1)
    marginal_cpu = (cpu["full"] - cpu["one"]) / (nparents - 1)
    print(f"of which third-party imports (numpy, h5py, numba; no package code) "
          f"{med['floor']:.3f} s wall, {cpu['floor']:.3f} s CPU")
    print(f"CPU of a call: deblend of one blend {cpu['one']:.3f} s, "
          f"catalog of one band {cpu['catalog']:.3f} s")
    print(f"marginal cost per blend: {1e3 * marginal:.1f} ms wall, {1e3 * marginal_cpu:.1f} ms "
          f"CPU  (full - one-blend call, over the other {nparents - 1} parents)")
    print(f"fit-only: sum of recorded blend runtimes {rt.sum():.3f} s over {rt.size} fitted "
          f"blends = {1e3 * rt.sum() / (nparents - 1):.1f} ms per blend over {nparents - 1}; "
          f"median {1e3 * statistics.median(rt):.1f} ms")
    print(f"outside the fits: {med['full'] - rt.sum():.3f} s of the full run's wall")
    print(f"numba compile + cache write (first calls, empty cache): deblend "
          f"{cold_one - med['one']:.2f} s, catalog {cold_cat - med['catalog']:.2f} s")
    return med, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare", metavar="TREE",
                    help="another source tree of the package to time alternately (A/B)")
    opts = ap.parse_args(argv)

    work = CACHE / "cli-600-7"
    work.mkdir(parents=True, exist_ok=True)
    trees = [("this tree", ROOT)]
    if opts.compare:
        trees.insert(0, (f"compared tree {opts.compare}", Path(opts.compare).resolve()))
    caches = [Path(tempfile.mkdtemp(prefix="numba-", dir=work)) for _ in trees]
    envs = [_env(c, root) for c, (_, root) in zip(caches, trees)]
    try:
        base, one, nparents = prepare(work, envs[-1])
        calls = work / "calls"
        calls.mkdir(exist_ok=True)
        print(f"600x600 field, {nparents} parents; one-blend calls use parent {one}")

        runs = []
        for t, env in enumerate(envs):
            # first calls fill the empty numba cache: compile + cache write
            cold_one = cli(["deblend", run_copy(base, calls, f"one{t}"), "--blends", one,
                            "--run", "x"], env)
            catalog_store = run_copy(base, calls, f"catalog{t}")
            cli(["deblend", catalog_store, "--blends", one, "--run", "x"], env)
            out = calls / f"cat{t}.fits"
            cold_cat = cli(["catalog", catalog_store, "--band", "r", "-o", out], env)
            runs.append({"jobs": _jobs(base, calls, catalog_store, out, one, env, t),
                         "cold": (cold_one, cold_cat), "catalog": catalog_store, "out": out,
                         "walls": {}, "cpus": {}})
        for _ in range(opts.repeat):  # alternating calls and trees: load drifts hit all alike
            for key in runs[0]["jobs"]:
                for r in runs:
                    r["walls"].setdefault(key, []).append(r["jobs"][key]())
                    r["cpus"].setdefault(key, []).append(cli.cpu)
        medians = []
        for t, ((label, _), r) in enumerate(zip(trees, runs)):
            rt = blend_runtimes(calls / f"full{t}.h5")
            medians.append(_report(label, r["walls"], r["cpus"], one, nparents, rt, *r["cold"]))
        if len(trees) == 2:
            (wa, ca), (wb, cb) = medians
            print(f"-- before ({trees[0][0]}) / after (this tree), medians of {opts.repeat} "
                  "alternating runs")
            print(f"{'call':<28}{'wall before':>12}{'wall after':>12}{'CPU before':>12}"
                  f"{'CPU after':>12}{'CPU ratio':>11}")
            for key, name in (("help", "--help"), ("floor", "third-party imports"),
                              ("one", "deblend --blends (1 blend)"),
                              ("catalog", "catalog --band r"), ("full", f"deblend ({nparents})")):
                print(f"{name:<28}{wa[key]:12.3f}{wb[key]:12.3f}{ca[key]:12.3f}{cb[key]:12.3f}"
                      f"{cb[key] / ca[key]:11.2f}")
        for (label, _), env, r, t in zip(trees, envs, runs, range(len(trees))):
            for what, args in (("deblend --blends", ["deblend", run_copy(base, calls, f"imp{t}"),
                                                      "--blends", one, "--run", "x"]),
                               ("catalog", ["catalog", r["catalog"], "--band", "r", "-o", r["out"]])):
                rows = importtime(args, env)
                print(f"import time of {what} ({label}; top-level modules, cumulative):")
                for name, sec in rows:
                    print(f"  {sec:6.3f} s  {name}")
    finally:
        for c in caches:
            shutil.rmtree(c, ignore_errors=True)


if __name__ == "__main__":
    main()
