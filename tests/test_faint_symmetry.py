"""Whole-box symmetry for sources started as the PSF (contested symmetry's
faint rule), measured on simulated fields not used to choose it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import truth_blendedness_snr

from scarletstore.deblend import DeblendConfig
from scarletstore.deblend import scarlet as S


def _blended_truth(out, exposure, band):
    """Truth table and which rows are blended (r blendedness > 0.1, SNR > 10)."""
    table, blend, snr = truth_blendedness_snr(out, exposure, band)
    return table, (blend > 0.1) & (snr > 10)


def _true_peak_errors(exposure, parents, table, sel):
    """|flux / truth - 1| in r and i of the blended truth sources (true peaks)."""
    from scarletstore.deblend.run import deblend_exposure
    from scarletstore.measure.compare import source_fluxes
    from scarletstore.simulate.truth import match_positions

    run = deblend_exposure(exposure, parents, DeblendConfig())
    flux = source_fluxes(run)
    _, to_truth = match_positions(np.asarray(table["y"]), np.asarray(table["x"]),
                                  run["source_y"].values, run["source_x"].values, 1.0)
    rows = np.flatnonzero(to_truth >= 0)
    keep = sel[to_truth[rows]]
    rows, t = rows[keep], to_truth[rows][keep]
    bands = [str(b) for b in exposure.band.values]
    return np.concatenate([np.abs(flux[rows, bands.index(b)] / np.asarray(table[f"flux_{b}"])[t] - 1)
                           for b in "ri"])


def test_faint_sources_symmetric_over_their_box_measure_better(tmp_path, monkeypatch):
    # Three 300 x 300 gri fields (seeds and density unlike the benchmark's
    # 600 x 600 ugrizy seeds 3/5/7/11), true positions as known peaks:
    # pooled r and i flux errors of the blended sources with the faint rule
    # against contested symmetry for every source. Measured: median 11.0 %
    # against 12.3 % (n = 150), mean 16.8 % against 17.2 %; since faint
    # sources keep an extrapolated wing below the sparsity threshold (which
    # helps both, and the plain fit more), median 9.3 % against 9.6 %, mean
    # 13.7 % against 15.2 %.
    pytest.importorskip("galsim")
    from scarletstore.detect.detect import detect
    from scarletstore.ingest.exposure import read_fits_bands
    from scarletstore.simulate.field import simulate_field

    errors = {True: [], False: []}
    for seed in (21, 23, 25):
        out = tmp_path / f"sim{seed}"
        simulate_field(out, size=300, seed=seed, bands="gri", density=150.0)
        exposure = read_fits_bands([out / f"{b}.fits" for b in "gri"])
        table, sel = _blended_truth(out, exposure, "r")
        parents = detect(exposure, known=(np.asarray(table["y"]), np.asarray(table["x"])))
        for faint_rule in (True, False):
            monkeypatch.setattr(S, "FAINT_SYMMETRIC_ALL", faint_rule)
            errors[faint_rule].append(_true_peak_errors(exposure, parents, table, sel))
    on, off = np.concatenate(errors[True]), np.concatenate(errors[False])
    print(f"faint rule: median {np.median(on):.4f} mean {on.mean():.4f}; "
          f"off: median {np.median(off):.4f} mean {off.mean():.4f}; n={on.size}")
    assert on.size == off.size >= 100
    assert np.median(on) < np.median(off)
    assert on.mean() < 0.95 * off.mean()
