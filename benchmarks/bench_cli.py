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


def _env(numba_cache: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["NUMBA_CACHE_DIR"] = str(numba_cache)
    return env


def cli(args, env, extra=()) -> float:
    """Run ``python [extra] -m scarletstore.cli ARGS`` and return its wall time (s).

    The process's CPU time (user + system) is left in ``cli.cpu``: on a shared,
    loaded machine wall times swing by a factor 2, CPU times much less.
    """
    cmd = [sys.executable, *extra, "-m", "scarletstore.cli", *map(str, args)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # cwd: ``-m`` puts the working directory first on sys.path; run this tree's code
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
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
        from scarletstore.store import move_store, remove_store

        tmp = work / "detected.tmp.h5"
        if tmp.exists():
            remove_store(tmp)
        cli(["ingest", tmp, *[sim / f"{b}.fits" for b in BANDS], "--bands", ",".join(BANDS)], env)
        cli(["detect", tmp], env)
        move_store(tmp, store)  # a linked store is the file and its folder
    import numpy as np
    from scarletstore.store import Store

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
    from scarletstore.store import copy_store, remove_store

    dst = folder / f"{tag}.h5"
    if dst.exists():
        remove_store(dst)
    copy_store(base, dst)
    return dst


def blend_runtimes(path: Path):
    from scarletstore.store import Store

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    opts = ap.parse_args(argv)

    work = CACHE / "cli-600-7"
    work.mkdir(parents=True, exist_ok=True)
    numba_cache = Path(tempfile.mkdtemp(prefix="numba-", dir=work))
    env = _env(numba_cache)
    try:
        base, one, nparents = prepare(work, env)
        calls = work / "calls"
        calls.mkdir(exist_ok=True)
        print(f"600x600 field, {nparents} parents; one-blend calls use parent {one}")

        # first calls fill the empty numba cache: compile + cache write
        cold_one = cli(["deblend", run_copy(base, calls, "one"), "--blends", one, "--run", "x"], env)
        catalog_store = run_copy(base, calls, "catalog")
        cli(["deblend", catalog_store, "--blends", one, "--run", "x"], env)
        out = calls / "cat.fits"
        cold_cat = cli(["catalog", catalog_store, "--band", "r", "-o", out], env)

        jobs = {
            "help": lambda: cli(["--help"], env),
            "one": lambda: cli(["deblend", run_copy(base, calls, "one"), "--blends", one,
                                "--run", "x"], env),
            "catalog": lambda: cli(["catalog", catalog_store, "--band", "r", "-o", out], env),
            "full": lambda: cli(["deblend", run_copy(base, calls, "full"), "--run", "x"], env),
        }
        walls = {k: [] for k in jobs}
        cpus = {k: [] for k in jobs}
        for _ in range(opts.repeat):  # alternating, so load drifts hit every call alike
            for key, job in jobs.items():
                walls[key].append(job())
                cpus[key].append(cli.cpu)
        med = {k: statistics.median(v) for k, v in walls.items()}
        cpu = {k: statistics.median(v) for k, v in cpus.items()}
        rt = blend_runtimes(calls / "full.h5")

        def fmt(k):
            return (f"{med[k]:6.3f} s wall, {cpu[k]:6.3f} s CPU  "
                    f"(walls: {', '.join(f'{w:.3f}' for w in walls[k])})")

        print(f"scarletstore --help            {fmt('help')}")
        print(f"deblend --blends {one:<14d}{fmt('one')}")
        print(f"catalog --band r (1 blend)     {fmt('catalog')}")
        print(f"deblend (all {nparents} parents)      {fmt('full')}")
        print(f"fixed cost of a call: deblend of one blend {med['one']:.3f} s, "
              f"catalog of one band {med['catalog']:.3f} s")
        marginal = (med["full"] - med["one"]) / (nparents - 1)
        marginal_cpu = (cpu["full"] - cpu["one"]) / (nparents - 1)
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
        for label, args in (("deblend --blends", ["deblend", run_copy(base, calls, "imp"),
                                                   "--blends", one, "--run", "x"]),
                            ("catalog", ["catalog", catalog_store, "--band", "r", "-o", out])):
            rows = importtime(args, env)
            print(f"import time of {label} (top-level modules, cumulative):")
            for name, sec in rows:
                print(f"  {sec:6.3f} s  {name}")
    finally:
        shutil.rmtree(numba_cache, ignore_errors=True)


if __name__ == "__main__":
    main()
