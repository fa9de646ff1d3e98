"""The command line: one-line errors with exit status 2, first-contact help, run reporting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_wcs_header
from scarletstore.cli import main
from scarletstore.deblend.psf import gaussian_psf
from scarletstore.deblend.result import Component, SourceResult
from scarletstore.ingest import make_exposure
from scarletstore.models import BlendRecord, build_run
from scarletstore.store import Store

ROOT = Path(__file__).resolve().parent.parent
H = W = 64
BANDS = ["g", "r", "i"]


def _blob(cy, cx, sigma):
    y, x = np.mgrid[:H, :W]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def _records(scale):
    """Two blends of two sources (the first converged) and one isolated parent."""
    morph = (_blob(6, 6, 2.0)[:13, :13] / _blob(6, 6, 2.0).max()).astype(np.float32)
    out = []
    for i, (bbox, peaks) in enumerate([((4, 4, 26, 26), [(12, 12), (20, 18)]),
                                       ((34, 30, 26, 28), [(42, 40), (50, 48)])]):
        sources = [SourceResult(j, [Component(np.array([3.0, 5.0, 4.0], np.float32) * scale, morph,
                                              py - bbox[0] - 6, px - bbox[1] - 6,
                                              (py - bbox[0], px - bbox[1]))])
                   for j, (py, px) in enumerate(peaks)]
        out.append(BlendRecord(index=i, parent_id=i + 1, bbox=bbox, peak_ids=np.arange(2) + 10 * i,
                               peaks=np.array(peaks, float), sources=sources, iterations=20 + 5 * i,
                               log_likelihood=-100.0 * (i + 1), chi2=1.1, converged=i == 0,
                               runtime=0.01))
    out.append(BlendRecord(index=2, parent_id=3, bbox=(40, 4, 10, 10), peak_ids=np.array([30]),
                           peaks=np.array([[45.0, 9.0]]), reason="isolated"))
    return out


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """A store with a WCS exposure and two runs, ``a`` then ``b`` (the newest)."""
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(7)
    scene = 40 * (_blob(12, 12, 2) + _blob(20, 18, 2) + _blob(42, 40, 2.5) + _blob(50, 48, 2))
    image = np.array([scene * s + rng.normal(0, 1, (H, W)) for s in (0.6, 1.0, 0.8)], np.float32)
    psfs = [gaussian_psf(1.4 + 0.1 * b, 15) for b in range(3)]
    ex = make_exposure(image, np.ones_like(image), np.zeros(image.shape, np.int32), psfs, BANDS,
                       wcs=make_wcs_header(H, W).tostring())
    path = tmp / "s.h5"
    runs = {}
    for name, scale in (("a", 1.0), ("b", 1.2)):
        runs[f"runs/{name}"] = build_run(_records(scale), BANDS, ex["psf"].values, gaussian_psf(0.8),
                                         name=name, method="scarlet", config_json="{}",
                                         package_version="test")
    Store.create(path, {"exposure": ex, "runs/a": runs["runs/a"]})
    Store(path).write({"runs/b": runs["runs/b"]})  # written second: the newest
    return path


def _fails(argv, capsys, *expect):
    """Run the CLI expecting exit status 2 and one stderr line containing every ``expect``."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expect:
        assert text in err, (argv, err)
    return err
