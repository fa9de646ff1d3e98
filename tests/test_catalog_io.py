"""The catalog's own FITS table writer and TAN(-SIP) sky transform, checked against astropy."""

import glob
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from scarletstore.measure.catalog import _sky, write_columns
from scarletstore.measure.fits_table import fits_writable, write_fits_table
from scarletstore.measure.tan_sky import tan_pixel_to_sky

fits = pytest.importorskip("astropy.io.fits")
from astropy.table import Table  # noqa: E402
from astropy.wcs import WCS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stored(header) -> str:
    """The WCS text ingest stores for a header (astropy's normalised celestial WCS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(header).to_header(relax=True).tostring()


def _astropy_sky(text, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(fits.Header.fromstring(text)).all_pix2world(x, y, 0)


def _max_sky_error(text, x, y):
    ours = tan_pixel_to_sky(text, x, y)
    assert ours is not None
    ra, dec = _astropy_sky(text, x, y)
    dra = np.abs((ours[0] - ra + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(dec))
    assert np.all((ours[0] >= 0) & (ours[0] < 360))
    return max(dra.max(), np.abs(ours[1] - dec).max())


def test_tan_sky_matches_astropy_on_real_instrument_headers():
    # real headers (Spitzer IRAC, HST, ...) shipped with astropy's own tests
    folder = os.path.join(os.path.dirname(fits.__file__), "..", "..", "wcs", "tests", "data")
    files = sorted(glob.glob(os.path.join(folder, "*.hdr")) + glob.glob(os.path.join(folder, "*.fits")))
    if not files:
        pytest.skip("astropy's WCS test headers are not installed")
    rng = np.random.default_rng(3)
    checked = sip = 0
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = (open(f, "rb").read().decode("latin1") if f.endswith(".hdr")
                          else fits.getheader(f))
                if not WCS(header).has_celestial:
                    continue
            text = _stored(header)
        except Exception:  # broken on purpose (astropy tests its error paths with them)
            continue
        x, y = rng.uniform(-200, 4300, 2000), rng.uniform(-200, 4300, 2000)
        if tan_pixel_to_sky(text, x, y) is None:
            continue
        assert _max_sky_error(text, x, y) < 1e-9, f
        checked += 1
        sip += "-SIP" in text
    assert checked >= 6 and sip >= 4, (checked, sip)


def _sim_header(rng, ra, dec, form, sip_order, lonpole=None):
    scale = rng.uniform(0.1, 1.0) / 3600
    rot = rng.uniform(0, 2 * np.pi)
    flip = rng.choice([-1, 1])
    cd = scale * np.array([[flip * np.cos(rot), -np.sin(rot)], [flip * np.sin(rot), np.cos(rot)]])
    h = fits.Header()
    sfx = "-SIP" if sip_order else ""
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN" + sfx, "DEC--TAN" + sfx
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CRPIX1"], h["CRPIX2"] = rng.uniform(-2000, 6000), rng.uniform(-2000, 6000)
    if form == "cd":
        for i in range(2):
            for j in range(2):
                h[f"CD{i + 1}_{j + 1}"] = cd[i, j]
    else:
        h["CDELT1"], h["CDELT2"] = -scale, scale
        pc = cd / np.array([-scale, scale])[:, None]
        for i in range(2):
            for j in range(2):
                h[f"PC{i + 1}_{j + 1}"] = pc[i, j]
    if lonpole is not None:
        h["LONPOLE"] = lonpole
    if sip_order:
        h["A_ORDER"] = h["B_ORDER"] = sip_order
        for p in range(sip_order + 1):
            for q in range(sip_order + 1 - p):
                if p + q >= 2:
                    h[f"A_{p}_{q}"] = rng.normal(0, 3e-5) / 2000 ** (p + q - 2)
                    h[f"B_{p}_{q}"] = rng.normal(0, 3e-5) / 2000 ** (p + q - 2)
    return h


@pytest.mark.parametrize("seed", range(6))
def test_tan_sky_matches_astropy_on_simulated_headers(seed):
    rng = np.random.default_rng(100 + seed)
    # near RA 0 (wrapping), near the poles, ordinary fields; PC and CD forms; SIP orders 2-5
    for ra, dec in ((0.002, 0.0), (359.99, -30.0), (150.1, 2.2), (rng.uniform(0, 360), 89.8),
                    (rng.uniform(0, 360), -89.9), (rng.uniform(0, 360), rng.uniform(-80, 80))):
        for form in ("pc", "cd"):
            for order in (0, 2, 3, 5):
                lonpole = rng.choice([None, 180.0, 175.0])
                h = _sim_header(rng, ra, dec, form, order, lonpole)
                x, y = rng.uniform(-500, 4500, 500), rng.uniform(-500, 4500, 500)
                for text in (h.tostring(), _stored(h)):  # the raw header, and as ingest stores it
                    assert _max_sky_error(text, x, y) < 1e-9, (ra, dec, form, order, lonpole)


def test_tan_sky_the_simulator_field_header():
    from scarletstore.simulate.field import _make_wcs

    text = _make_wcs(600).to_header(relax=True).tostring()
    g = np.mgrid[-10:610:31, -10:610:31].reshape(2, -1).astype(float)
    assert _max_sky_error(text, g[1], g[0]) < 1e-9


def _other_header(kind):
    h = fits.Header()
    h["CRVAL1"], h["CRVAL2"], h["CRPIX1"], h["CRPIX2"] = 150.0, 2.0, 300.0, 300.0
    h["CDELT1"], h["CDELT2"] = -5e-5, 5e-5
    if kind == "zpn":
        h["CTYPE1"], h["CTYPE2"] = "RA---ZPN", "DEC--ZPN"
        h["PV2_1"], h["PV2_3"] = 1.0, 30.0
    elif kind == "car":
        h["CTYPE1"], h["CTYPE2"] = "RA---CAR", "DEC--CAR"
    elif kind == "tpv":
        h["CTYPE1"], h["CTYPE2"] = "RA---TPV", "DEC--TPV"
        h["PV1_1"], h["PV2_1"], h["PV1_4"] = 1.0, 1.0, 0.003
    elif kind == "arcsec":
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
        h["CUNIT1"] = h["CUNIT2"] = "arcsec"
        h["CDELT1"], h["CDELT2"] = -0.18, 0.18
    elif kind == "galactic":
        h["CTYPE1"], h["CTYPE2"] = "GLON-TAN", "GLAT-TAN"
    return h


@pytest.mark.parametrize("kind", ["zpn", "car", "tpv", "arcsec", "galactic"])
def test_other_projections_are_left_to_astropy(kind):
    # tan_pixel_to_sky declines them, and the catalog's sky columns are astropy's
    text = _other_header(kind).tostring()
    x, y = np.linspace(-50, 650, 40), np.linspace(700, -20, 40)
    assert tan_pixel_to_sky(text, x, y) is None
    exposure = type("E", (), {"attrs": {"wcs": text}})()
    ra, dec = _sky(exposure, x, y)
    ra0, dec0 = _astropy_sky(text, x, y)
    np.testing.assert_array_equal(ra, ra0)
    np.testing.assert_array_equal(dec, dec0)


def _columns(rng, n):
    return {"id": np.arange(n, dtype=np.int64) + 2 ** 40, "x": rng.normal(size=n) * 1e3,
            "f32": rng.normal(size=n).astype(np.float32), "i16": (np.arange(n) - 3).astype(np.int16),
            "i32": (np.arange(n) * -100003).astype(np.int32), "ok": rng.random(n) > 0.5,
            "odd": np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-300, 1e300] * (n // 7 + 1))[:n]}


def _header(rng):
    text = "".join(rng.choice(list("ab' \"{}:,&x"), size=int(rng.integers(0, 400))))
    return {"BAND": "r", "RUN": "o'neil", "REDISTRI": 1, "SCALE": 0.1, "TINY": -1.5e-300,
            "FLAG": True, "OFF": False, "EMPTY": "", "UNITS": json.dumps({"flux": "counts"} | {
                f"col_{i}": "pixel^2" for i in range(20)}), "TEXT": text, "NEG": -(2 ** 62)}


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_fits_table_reads_back_as_astropy_writes_it(tmp_path, n):
    rng = np.random.default_rng(n)
    cols, header = _columns(rng, n), _header(rng)
    ours, theirs = tmp_path / "ours.fits", tmp_path / "astropy.fits"
    write_fits_table(cols, header, ours)
    t = Table(cols)
    t.meta.update(header)
    t.write(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fix-up warnings: the file is standard FITS
        with fits.open(ours) as a, fits.open(theirs) as b:
            a.verify("exception")
            assert len(a) == len(b) == 2
            assert list(a[1].header) == list(b[1].header)  # same keys, same order
            for k in b[1].header:
                assert a[1].header[k] == b[1].header[k], k
                assert type(a[1].header[k]) is type(b[1].header[k]), k
            assert repr(a[0].header) == repr(b[0].header)
            assert a[1].data.dtype == b[1].data.dtype
            for c in cols:
                np.testing.assert_array_equal(a[1].data[c], cols[c])
        read = Table.read(ours)
    assert read.colnames == list(cols)
    # as astropy reads its own file (FITS drops a string's trailing blanks, and a final '&'
    # reads as a continuation mark)
    assert dict(read.meta) == dict(Table.read(theirs).meta)
    assert {k: v for k, v in read.meta.items() if k != "TEXT"} == {k: v for k, v in header.items()
                                                                     if k != "TEXT"}
    # the data bytes are astropy's, to the byte
    assert ours.stat().st_size == theirs.stat().st_size
    width = sum(np.asarray(c).dtype.itemsize for c in cols.values())
    size = 2880 * ((n * width + 2879) // 2880)
    if size:
        assert ours.read_bytes()[-size:] == theirs.read_bytes()[-size:]


def test_long_strings_with_quotes_split_over_continue_cards(tmp_path):
    rng = np.random.default_rng(5)
    for length in list(range(60, 150)) + [400, 1000]:
        value = "".join(rng.choice(list("a'b &"), size=length)) + "'z"
        path = tmp_path / f"s{length}.fits"
        write_fits_table({"a": np.zeros(2)}, {"LONG": value, "AFTER": 3}, path)
        with fits.open(path) as h:
            assert h[1].header["LONG"] == value
            assert h[1].header["AFTER"] == 3
            raw = h[1].header.tostring()
        assert len(raw) % 80 == 0


def test_fits_writable_leaves_other_tables_to_astropy(tmp_path):
    num = {"a": np.arange(3.0)}
    assert fits_writable(num, {"BAND": "r"})
    assert not fits_writable({"s": np.array(["ab", "c", "d"])}, {})
    assert not fits_writable({"u": np.arange(3, dtype=np.uint32)}, {})
    assert not fits_writable({"m": np.zeros((3, 2))}, {})
    assert not fits_writable({"a": np.zeros(3), "b": np.zeros(4)}, {})
    assert not fits_writable(num, {"NAXIS": 3})
    assert not fits_writable(num, {"TTYPE1": "x"})
    assert not fits_writable(num, {"band": "r"})
    assert not fits_writable(num, {"BAND": "é"})
    assert not fits_writable(num, {"BAND": None})
    assert not fits_writable(num, {"X": float("nan")})
    # write_columns still writes those through astropy: string and unsigned columns read back
    cols = {"patch": np.array(["1,2", "3,4"]), "n": np.array([1, 2], np.uint16),
            "is_primary": np.array([True, False])}
    write_columns(cols, {"band": "i", "flag_bits": "{}"}, tmp_path / "m.fits")
    t = Table.read(tmp_path / "m.fits")
    assert list(t["patch"]) == ["1,2", "3,4"] and t["n"].dtype == np.uint16
    assert t.meta["BAND"] == "i" and t.meta["FLAGBITS"] == "{}"


def test_catalog_fits_and_sky_columns_do_not_import_astropy(tmp_path):
    # the point of both: a one-band catalog call no longer pays astropy's import
    code = (
        "import sys, numpy as np\n"
        "from scarletstore.measure.catalog import _sky, write_columns\n"
        f"text = {_stored(_sim_header(np.random.default_rng(1), 150.0, 2.0, 'pc', 3))!r}\n"
        "e = type('E', (), {'attrs': {'wcs': text}})()\n"
        "ra, dec = _sky(e, np.arange(5.0), np.arange(5.0))\n"
        "assert np.isfinite(ra).all() and np.isfinite(dec).all()\n"
        f"write_columns({{'id': np.arange(5), 'ra': ra, 'f': np.ones(5, bool)}}, "
        f"{{'band': 'r', 'flag_bits': '{{}}'}}, {str(tmp_path / 'c.fits')!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'astropy'))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert len(Table.read(tmp_path / "c.fits")) == 5
