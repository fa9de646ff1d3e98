"""Pictures: residuals in sigma, per-source stretches, layouts sized by the blend, field boxes."""

import struct

import numpy as np
import pytest
from conftest import gaussian_psf

from scarletstore.cli import main
from scarletstore.display import (BlendPicture, auto_stretch, blend_layout, combined_residual,
                                  field_boxes, footprint_edges, legend_entries, lupton_rgb,
                                  read_blend_picture, read_field, residual_sigma, rgb_bands,
                                  show_blend, source_panel)
from scarletstore.store.store import Store, copy_store

pytest.importorskip("matplotlib")


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _blob(shape, cy, cx, sy, sx):
    y, x = np.mgrid[:shape[0], :shape[1]]
    return np.exp(-0.5 * (((y - cy) / sy) ** 2 + ((x - cx) / sx) ** 2))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 3-band store of Gaussian blobs: a wide pair, a tall pair, a triple and singles, detected.

    Not a simulated galaxy field: elongated Gaussians on flat noise with a
    different noise level per band, so the tests do not lean on the fields the
    pictures were tuned on.
    """
    from scarletstore.detect.detect import detect
    from scarletstore.ingest.exposure import make_exposure

    ny, nx = 130, 170
    rng = np.random.default_rng(21)
    sed = {"wide": (3.0, 5.0, 8.0), "tall": (9.0, 6.0, 2.0), "tri": (4.0, 4.0, 4.0), "one": (6.0, 6.0, 6.0)}
    truth = np.zeros((3, ny, nx))
    blobs = [("wide", 20, 25, 2.5, 2.5), ("wide", 20, 40, 2.5, 2.5), ("wide", 21, 55, 2.5, 2.5),
             ("tall", 60, 140, 2.5, 2.5), ("tall", 78, 141, 2.5, 2.5), ("tall", 96, 140, 2.5, 2.5),
             ("tri", 95, 40, 2.2, 2.2), ("tri", 100, 50, 2.2, 2.2), ("tri", 108, 44, 2.2, 2.2),
             ("one", 60, 80, 2.0, 2.0)]
    for kind, cy, cx, sy, sx in blobs:
        for b in range(3):
            truth[b] += 60 * sed[kind][b] * _blob((ny, nx), cy, cx, sy, sx)
    sigma = np.array([1.0, 1.5, 2.5])
    image = (truth + rng.normal(0, 1, truth.shape) * sigma[:, None, None]).astype(np.float32)
    variance = np.broadcast_to((sigma**2)[:, None, None], image.shape).astype(np.float32).copy()
    psfs = [gaussian_psf(15, s) for s in (1.3, 1.4, 1.5)]
    ex = make_exposure(image, variance, None, psfs, ["g", "r", "i"])
    parents = detect(ex)
    tmp = tmp_path_factory.mktemp("display")
    path = tmp / "scene.h5"
    Store.create(path, {"exposure": ex, "parents": parents})
    return path, image, variance


@pytest.fixture(scope="module")
def deblended(scene, tmp_path_factory):
    """The scene's store with a full run and a run that skips parents of more than two peaks."""
    src, *_ = scene
    path = tmp_path_factory.mktemp("display_run") / "run.h5"
    copy_store(src, path)
    assert main(["deblend", str(path), "--run", "all"]) == 0
    assert main(["deblend", str(path), "--run", "capped", "--set", "max_number_of_peaks=2",
                 "--set", "split_large_parents=false"]) == 0
    return path


# ---------------------------------------------------------------- residual


def test_residual_sigma_is_data_minus_model_over_sigma():
    rng = np.random.default_rng(5)
    data, model = rng.normal(3, 2, (2, 4, 9, 7))
    variance = rng.uniform(0.5, 4.0, (4, 9, 7))
    variance[1, 2, 3] = 0.0
    variance[2, 0, 0] = np.nan
    bad = np.zeros((4, 9, 7), bool)
    bad[3, 5, 5] = True
    chi = residual_sigma(data, model, variance, bad)
    usable = np.isfinite(variance) & (variance > 0) & ~bad
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = (data - model) / np.sqrt(variance)
    np.testing.assert_allclose(chi[usable], expected[usable], rtol=1e-12)
    assert np.isnan(chi[~usable]).all() and (~usable).sum() == 3
    # one unit-variance map from the bands: a 1-sigma residual in all 4 bands is 2 sigma
    assert combined_residual(np.ones((4, 2, 2)))[0, 0] == pytest.approx(2.0)
    noise = combined_residual(rng.normal(0, 1, (3, 200, 200)))
    assert np.std(noise) == pytest.approx(1.0, abs=0.02)
    partial = np.full((3, 1, 1), np.nan)
    partial[0] = 1.5
    assert combined_residual(partial)[0, 0] == pytest.approx(1.5)  # only the usable band counts


def test_blend_picture_residual_matches_exposure(deblended):
    """The residual the blend picture draws is (image - model) / sqrt(variance) in the blend box."""
    store = Store(deblended)
    ex = store.read("exposure")
    pid = int(store.read("parents")["parent_id"].values[0])
    pic = read_blend_picture(store, pid, "all")
    y0, x0, h, w = pic.bbox
    image = ex["image"].values[:, y0:y0 + h, x0:x0 + w]
    var = ex["variance"].values[:, y0:y0 + h, x0:x0 + w]
    model = pic.models.sum(axis=0)
    chi = residual_sigma(pic.data, model, pic.variance, pic.bad)
    np.testing.assert_allclose(chi, (image - model) / np.sqrt(var), rtol=1e-6, atol=1e-9)
    # a good fit leaves noise: the combined residual in the footprint has rms near 1
    c = combined_residual(chi)[pic.footprint]
    assert 0.8 < np.sqrt(np.mean(c**2)) < 1.3
    assert pic.footprint.shape == (h, w) and pic.footprint.any() and not pic.footprint.all()
    assert len(pic.positions) == len(pic.models) >= 2


# ---------------------------------------------------------------- source panels


def test_faint_and_negative_sources_are_not_black():
    shape = (30, 40)
    bright = 500 * np.stack([_blob(shape, 10, 10, 2, 2)] * 3)
    faint = 1e-4 * np.stack([_blob(shape, 20, 30, 3, 2)] * 3)
    idx = [2, 1, 0]
    # on the blend's shared stretch the faint source is black (what the pictures used to show)
    shared = auto_stretch(bright[idx] + np.random.default_rng(1).normal(0, 1, (3,) + shape))
    assert lupton_rgb(faint[idx], stretch=shared).max() == 0
    panel = source_panel(faint, idx)
    assert panel.kind == "rgb" and panel.image.max() >= 200
    assert (panel.image.max(axis=2) > 20).sum() > 20  # more than a dot: the wings show too
    # the same source scaled by 1e6 looks the same: the stretch follows the source
    np.testing.assert_array_equal(source_panel(faint * 1e6, idx).image, panel.image)
    negative = -faint
    p = source_panel(negative, idx)
    assert p.kind == "signed" and p.limit > 0 and p.image.min() < -0.5 * p.limit
    other_band = np.zeros((4,) + shape)
    other_band[3] = faint[0]  # flux only in a band that is not one of R, G, B
    p = source_panel(other_band, [2, 1, 0])
    assert p.kind == "signed" and p.image.max() == pytest.approx(faint[0].max())
    assert source_panel(np.zeros((3,) + shape), idx).kind == "empty"


# ---------------------------------------------------------------- layout and files


def test_layout_follows_blend_shape():
    wide, tall = blend_layout(20, 80, 3), blend_layout(80, 20, 3)
    assert wide.main_inches[0] / wide.main_inches[1] == pytest.approx(4.0)
    assert tall.main_inches[1] / tall.main_inches[0] == pytest.approx(4.0)
    assert wide.source_inches[0] / wide.source_inches[1] == pytest.approx(4.0)
    assert wide.figsize[0] > wide.figsize[1] and tall.figsize[1] > tall.figsize[0]
    small, big = blend_layout(30, 30, 2), blend_layout(120, 120, 2)
    assert big.main_inches[0] > 2 * small.main_inches[0]
    for lay in (wide, tall, small, big, blend_layout(40, 60, 17)):
        # panels, not white space, fill most of the figure
        covered = sum(r[2] * r[3] for r in [lay.data, lay.model, lay.residual] + lay.sources)
        assert covered > 0.45, lay
        for r in [lay.data, lay.model, lay.residual, lay.colorbar] + lay.sources:
            assert r[0] >= 0 and r[1] >= 0 and r[0] + r[2] <= 1 + 1e-9 and r[1] + r[3] <= 1 + 1e-9
    # a very wide blend stays on a screen
    assert blend_layout(30, 900, 2).figsize[0] < 16.5


def _picture(h, w, n=2):
    rng = np.random.default_rng(0)
    models = np.stack([10 * np.stack([_blob((h, w), h / 2, w * (k + 1) / (n + 1), 2, 2)] * 3)
                       for k in range(n)])
    data = models.sum(0) + rng.normal(0, 1, (3, h, w))
    return BlendPicture(parent_id=1, run="r", bands=["g", "r", "i"], bbox=(0, 0, h, w), models=models,
                        source_ids=np.arange(1, n + 1), positions=np.array([[h / 2, w * (k + 1) / (n + 1)]
                                                                             for k in range(n)]),
                        data=data, variance=np.ones((3, h, w)), bad=np.zeros((3, h, w), bool),
                        footprint=np.ones((h, w), bool), summary="test")


def test_show_blend_png_size_follows_blend(tmp_path):
    sizes = {}
    for h, w in ((20, 100), (100, 20), (30, 30), (130, 130)):
        out = tmp_path / f"b{h}x{w}.png"
        returned = show_blend(_picture(h, w), out)
        sizes[h, w] = png_size(out)
        assert sizes[h, w] == tuple(returned)
    assert sizes[20, 100][0] > 1.5 * sizes[20, 100][1]  # wide blend: wide picture
    assert sizes[100, 20][1] > 1.2 * sizes[100, 20][0]  # tall blend: tall picture
    assert sizes[130, 130][0] > 1.5 * sizes[30, 30][0]  # larger blend: larger picture


def test_show_cli_blend_picture_shapes(deblended, tmp_path, capsys):
    store = Store(deblended)
    p = store.read("parents")
    shapes = {int(i): (int(h), int(w)) for i, h, w in
              zip(p["parent_id"].values, p["bbox_height"].values, p["bbox_width"].values)}
    wide = max(shapes, key=lambda k: shapes[k][1] / shapes[k][0])
    tall = max(shapes, key=lambda k: shapes[k][0] / shapes[k][1])
    assert shapes[wide][1] > 1.5 * shapes[wide][0] and shapes[tall][0] > 1.5 * shapes[tall][1]
    for pid in (wide, tall):
        out = tmp_path / f"p{pid}.png"
        assert main(["show", str(deblended), "--blend", str(pid), "--run", "all", "-o", str(out)]) == 0
        assert f"blend {pid}" in capsys.readouterr().out
    (ww, wh), (tw, th) = png_size(tmp_path / f"p{wide}.png"), png_size(tmp_path / f"p{tall}.png")
    assert ww / wh > 1.3 * tw / th


def test_footprint_edges_trace_the_boundary():
    mask = np.zeros((5, 6), bool)
    mask[1:3, 1:4] = True  # 2 x 3 rectangle: perimeter 10 pixel edges
    segs = footprint_edges(mask)
    assert segs.shape == (10, 2, 2)
    assert np.allclose(np.linalg.norm(segs[:, 1] - segs[:, 0], axis=1), 1.0)
    assert segs[..., 0].min() == 0.5 and segs[..., 0].max() == 3.5
    assert segs[..., 1].min() == 0.5 and segs[..., 1].max() == 2.5
    mask[3, 1] = True  # L shape: +2 edges
    assert len(footprint_edges(mask)) == 12
    assert len(footprint_edges(np.ones((3, 3), bool))) == 12  # the mask border closes the outline


# ---------------------------------------------------------------- field


def test_field_boxes_mark_run_status():
    ids = [1, 2, 3, 4, 5]
    bboxes = [(0, 0, 5, 5), (10, 0, 6, 4), (0, 20, 3, 3), (30, 30, 8, 9), (50, 50, 2, 2)]
    plain = field_boxes(ids, bboxes)
    assert [b.status for b in plain] == ["parent"] * 5
    assert len({b.colour for b in plain}) == 1
    boxes = field_boxes(ids, bboxes, run_parent_ids=[1, 2, 3, 4],
                        run_reasons=["", "isolated", "too_many_peaks", "failed: ValueError: nan"])
    assert [b.status for b in boxes] == ["deblended", "deblended", "skipped", "failed", "absent"]
    assert (boxes[3].y0, boxes[3].x0, boxes[3].height, boxes[3].width) == (30, 30, 8, 9)
    colours = {b.status: b.colour for b in boxes}
    assert len(set(colours.values())) == 4  # skipped, failed and absent each stand out
    legend = {status: text for status, _, text in legend_entries(boxes)}
    assert legend["deblended"] == "deblended: 2"
    assert legend["skipped"] == "skipped: 1 (too_many_peaks 1)"
    assert legend["failed"] == "failed: 1 (ValueError 1)"


def test_show_field_cli(deblended, scene, tmp_path, capsys):
    norun, image, _ = scene
    store = Store(deblended)
    n_parents = store.read("parents").sizes["parent"]
    bands, idx, img, boxes = read_field(Store(norun), None)
    assert len(boxes) == n_parents and {b.status for b in boxes} == {"parent"}
    np.testing.assert_array_equal(img, image[rgb_bands(bands)])
    out = tmp_path / "f0.png"
    assert main(["show", str(norun), "--field", "-o", str(out)]) == 0
    assert f"{n_parents} parent boxes" in capsys.readouterr().out
    w0, h0 = png_size(out)
    assert w0 > h0  # the 130 x 170 field is wider than tall
    # the capped run skips every parent of more than two peaks; the newest run is the default
    run = store.read("runs/capped")
    n_skip = int(sum(str(r) == "too_many_peaks" for r in run["blend_reason"].values))
    assert n_skip >= 2
    _, _, _, boxes = read_field(store, "capped")
    assert sum(b.status == "skipped" for b in boxes) == n_skip
    assert main(["show", str(deblended), "--field", "-o", str(tmp_path / "f1.png")]) == 0
    assert f"{n_skip} skipped or failed in run capped" in capsys.readouterr().out
    assert main(["show", str(deblended), "--field", "--run", "all", "-o", str(tmp_path / "f2.png")]) == 0
    assert "0 skipped or failed in run all" in capsys.readouterr().out


def _exit_code(argv):
    """main's status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, message", [
    (["--blend", "1", "--field"], "not allowed with argument"),
    ([], "one of the arguments --blend --field is required"),
    (["--field", "--run", "nope"], "no run 'nope'"),
    (["--field", "-o", "x.jpg"], "must be a .png"),
])
def test_show_bad_arguments_exit_2(deblended, tmp_path, capsys, argv, message):
    if "-o" not in argv:
        argv = argv + ["-o", str(tmp_path / "x.png")]
    assert _exit_code(["show", str(deblended)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_show_field_needs_parents(tmp_path, capsys):
    from scarletstore.ingest.exposure import make_exposure

    ex = make_exposure(np.zeros((1, 8, 8)), np.ones((1, 8, 8)), None, [gaussian_psf(5, 1.0)], ["r"])
    path = tmp_path / "bare.h5"
    Store.create(path, {"exposure": ex})
    assert main(["show", str(path), "--field", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no parents" in err and err.count("\n") == 1


def test_cli_and_display_import_without_matplotlib():
    """matplotlib loads only when a picture is drawn, so every other command starts fast."""
    import subprocess
    import sys

    code = ("import sys, scarletstore.cli, scarletstore.display; "
            "from scarletstore.cli import build_parser; build_parser(); "
            "print(any(m.split('.')[0] == 'matplotlib' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_only_picture(tmp_path):
    """Without an exposure the picture is the model and the sources, still sized by the blend."""
    pic = _picture(30, 60, n=3)
    pic.data = pic.variance = pic.bad = None
    lay = blend_layout(30, 60, 3, with_data=False)
    assert lay.data is None and lay.residual is None and lay.colorbar is None
    w, h = show_blend(pic, tmp_path / "m.png")
    assert png_size(tmp_path / "m.png") == (w, h) and w > h


def test_large_field_is_binned_for_display(tmp_path):
    from scarletstore.display import bin_image, show_field

    img = np.arange(2 * 4 * 6, dtype=float).reshape(2, 4, 6)
    binned = bin_image(img, 2)
    assert binned.shape == (2, 2, 3)
    assert binned[1, 0, 0] == pytest.approx(img[1, :2, :2].mean())
    assert bin_image(img[:, :3, :5], 2).shape == (2, 1, 2)  # ragged edges dropped
    rng = np.random.default_rng(2)
    field = rng.normal(0, 1, (3, 300, 2300))
    boxes = field_boxes([1, 2], [(10, 10, 20, 30), (200, 2200, 40, 90)], [1, 2], ["", "masked"])
    size = show_field(["g", "r", "i"], [2, 1, 0], field, boxes, tmp_path / "big.png", title="big")
    assert png_size(tmp_path / "big.png") == tuple(size)
    assert size[0] > 4 * size[1]  # a 300 x 2300 strip stays a strip


def test_labels_avoid_each_other_and_the_edges():
    from scarletstore.display import place_labels

    def box(p, s, sign, pad=1.0):
        (y, x), (th, tw), (sx, sy) = p, s, sign
        x0 = x + pad if sx > 0 else x - pad - tw
        y0 = y + pad if sy > 0 else y - pad - th
        return x0, y0, x0 + tw, y0 + th

    # three peaks in a row, closer than a label is long (what the model panel used to overprint)
    pos = [(20.0, 20.0), (20.0, 26.0), (20.0, 32.0)]
    sizes = [(3.0, 10.0)] * 3
    signs = place_labels(pos, sizes, (40, 60))
    boxes = [box(p, s, g) for p, s, g in zip(pos, sizes, signs)]
    for i in range(3):
        for j in range(i + 1, 3):
            a, b = boxes[i], boxes[j]
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (a, b)
    # near the top-right corner the label turns down and left, inside the panel
    assert place_labels([(38.0, 58.0)], [(3.0, 10.0)], (40, 60)) == [(-1, -1)]
    assert place_labels([(5.0, 5.0)], [(3.0, 10.0)], (40, 60)) == [(1, 1)]


def test_skipped_parent_shows_its_data_and_peaks(deblended, tmp_path, capsys):
    """A parent the run skipped is still worth a look: its data, footprint and peaks."""
    store = Store(deblended)
    run = store.read("runs/capped")
    reasons = [str(r) for r in run["blend_reason"].values]
    pid = int(run["blend_parent_id"].values[reasons.index("too_many_peaks")])
    parents = store.read("parents")
    n_peaks = int((parents["peak_parent"].values == pid).sum())
    pic = read_blend_picture(store, pid, "capped")
    assert pic.models.shape[0] == 0 and len(pic.positions) == n_peaks > 2
    y0, x0, h, w = pic.bbox
    np.testing.assert_array_equal(pic.data, store.read("exposure")["image"].values[:, y0:y0 + h, x0:x0 + w])
    out = tmp_path / "skipped.png"
    assert main(["show", str(deblended), "--blend", str(pid), "--run", "capped", "-o", str(out)]) == 0
    assert f"{n_peaks} peaks (not deblended in run capped)" in capsys.readouterr().out
    width, height = png_size(out)
    assert (height > width) == (h > w)
    assert main(["show", str(deblended), "--blend", "9999", "-o", str(out)]) == 2
    assert "no blend for parent 9999" in capsys.readouterr().err


def test_rgb_bands_follow_wavelength():
    # stores list bands blue to red: the choice is unchanged
    assert rgb_bands(list("ugrizy")) == [4, 3, 1]  # z, i, g
    assert rgb_bands(list("grizy")) == [3, 2, 1]  # z, i, r
    assert rgb_bands(list("gri")) == [2, 1, 0]
    # Rubin's persisted models list bands alphabetically: still z, i, r as R, G, B
    alpha = ["g", "i", "r", "y", "z"]
    assert [alpha[k] for k in rgb_bands(alpha)] == ["z", "i", "r"]
    hsc = ["HSC-R", "HSC-G", "HSC-I"]
    assert [hsc[k] for k in rgb_bands(hsc)] == ["HSC-I", "HSC-R", "HSC-G"]
    assert rgb_bands(["a", "b", "c"]) == [2, 1, 0]  # unknown names: the given order
    assert rgb_bands(["r", "g"]) == [0, 1, 1]
    assert rgb_bands(["x"]) == [0, 0, 0]


def test_titles_wrap_to_the_picture():
    from scarletstore.display import fit_lines

    text = "blend 3495976385350991873 (run lsst-1): 1 sources, 14x18 px, 0 iterations, converged\nnote"
    lines = fit_lines(text, 2.0, fontsize=8)
    assert len(lines) > 2 and lines[-1] == "note"
    assert max(len(t) for t in lines) <= int(2.0 * 72 / (0.55 * 8))
    assert fit_lines(text, 20.0) == text.splitlines()
    assert len(fit_lines("word " * 200, 1.0, max_lines=3)) == 3
    tall, wide = blend_layout(100, 20, 2, title_lines=5), blend_layout(100, 20, 2, title_lines=2)
    assert tall.figsize[1] == pytest.approx(wide.figsize[1] + 3 * 0.16)


def test_many_sources_keep_the_figure_bounded():
    few, many = blend_layout(150, 150, 4), blend_layout(150, 150, 60)
    assert few.main_inches[0] / 2 <= few.source_inches[0] <= few.main_inches[0]  # grown to fill one row
    assert len({r[1] for r in few.sources}) == 1
    assert many.source_inches[0] == pytest.approx(1.4, rel=0.15)  # small panels, not 15 rows of 3"
    assert many.figsize[1] < 20
    wide = blend_layout(30, 900, 3)  # the main row was shrunk to fit: sources follow it
    assert wide.source_inches[0] <= wide.main_inches[0] + 1e-9
