"""Damaged groups inside an otherwise valid store: every command that reads the
group exits 2 with one line (no traceback) and leaves the file as it was."""

import h5py
import numpy as np
import pytest
from conftest import gaussian_psf, make_wcs_header, store_bytes

from scarletstore.cli import main
from scarletstore.errors import SchemaError
from scarletstore.ingest.exposure import make_exposure
from scarletstore.store.store import Store, copy_store, products_dir

BANDS = ["g", "r", "i"]


def _field(seed=2, ny=64, nx=90):
    """Gaussian galaxies in three bands: two pairs that blend, one isolated source."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:ny, :nx]
    centres = [(18, 20, 60), (22, 27, 40), (44, 60, 50), (40, 68, 70), (48, 15, 30)]
    image = np.zeros((3, ny, nx))
    for k, (cy, cx, amp) in enumerate(centres):
        sed = np.array([1.0, 0.7 + 0.1 * k, 0.5])
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 2.2**2))
        image += amp * sed[:, None, None] * blob
    image += rng.normal(0, 1, image.shape)
    psfs = [gaussian_psf(11, 1.2 + 0.1 * b) for b in range(3)]
    return make_exposure(image.astype(np.float32), np.ones_like(image, np.float32), None, psfs,
                         BANDS, wcs=make_wcs_header(ny, nx).tostring())


@pytest.fixture(scope="module")
def valid_store(tmp_path_factory):
    """exposure + parents + two runs (scarlet ``a``, sdss ``b``), made through the CLI."""
    path = tmp_path_factory.mktemp("damage") / "s.h5"
    Store.create(path, {"exposure": _field()})
    assert main(["detect", str(path)]) == 0
    assert main(["deblend", str(path), "--run", "a", "--set", "max_iter=10"]) == 0
    assert main(["deblend", str(path), "--run", "b", "--method", "sdss"]) == 0
    run = Store(path).read("runs/a")
    assert (run["blend_n_sources"].values >= 2).any()  # a real blend to show and measure
    assert Store(path).check() == []
    return path


def _fitted_parent(path):
    run = Store(path).read("runs/a")
    return int(run["blend_parent_id"].values[np.argmax(run["blend_n_sources"].values)])


# ------------------------------------------------------------------ damage by h5py
def _replace(g, name, data, dims):
    """Re-create variable ``name`` of group ``g`` with ``data`` on netCDF ``dims``."""
    attrs = {k: v for k, v in g[name].attrs.items()
             if k not in ("DIMENSION_LIST", "_Netcdf4Coordinates", "_Netcdf4Dimid")}
    del g[name]
    ds = g.create_dataset(name, data=data)
    for k, v in attrs.items():
        ds.attrs[k] = v
    for axis, dim in enumerate(dims):
        ds.dims[axis].attach_scale(g[dim])


def _delete(var):
    return lambda g: g.__delitem__(var)


def _retype(var, dtype):
    return lambda g: _replace(g, var, g[var][()].astype(dtype), _dims_of(g[var]))


def _bump(var, index=0, by=1):
    def damage(g):
        data = g[var][()]
        data[index] += by
        g[var][...] = data
    return damage


def _del_attr(attr):
    return lambda g: g.attrs.__delitem__(attr)


def _set_attr(attr, value):
    def damage(g):
        g.attrs[attr] = value
    return damage


def _version(v):
    def damage(g):
        g.attrs["schema_version"] = np.int64(v)
    return damage


def _dims_of(obj):
    return [obj.dims[a][0].name.rsplit("/", 1)[-1] for a in range(obj.ndim)]


def _transpose_mask(g):
    _replace(g, "mask", np.ascontiguousarray(np.swapaxes(g["mask"][()], 1, 2)), ["band", "x", "y"])


def _source_x_on_blends(g):
    _replace(g, "source_x", np.zeros(g["blend"].shape[0]), ["blend"])


DAMAGE = {
    "exposure": {
        "no psf": _delete("psf"),
        "image float64": _retype("image", np.float64),
        "mask dims (band, x, y)": _transpose_mask,
        "no schema attr": _del_attr("schema"),
        "no mask_planes attr": _del_attr("mask_planes"),
        "mask_planes not JSON": _set_attr("mask_planes", "{BAD: 0"),
        "version 99": _version(99),
    },
    "parents": {
        "no span_x1": _delete("span_x1"),
        "span_count +1": _bump("span_count"),
        "peak_count +1": _bump("peak_count"),
        "peak_count moved": lambda g: (_bump("peak_count", 0, 1)(g), _bump("peak_count", -1, -1)(g)),
        "peak_id float64": _retype("peak_id", np.float64),
        "no schema attr": _del_attr("schema"),
        "version 99": _version(99),
    },
    "runs/a": {
        "no morph": _delete("morph"),
        "no source_id": _delete("source_id"),
        "blend_n_sources +1": _bump("blend_n_sources"),
        "source_n_components +1": _bump("source_n_components", -1),
        "component_n_pixels +1": _bump("component_n_pixels"),
        "component_n_pixels moved": lambda g: (_bump("component_n_pixels", 0, 3)(g),
                                               _bump("component_n_pixels", -1, -3)(g)),
        "component_spectrum float64": _retype("component_spectrum", np.float64),
        "source_x on blend dim": _source_x_on_blends,
        "no schema attr": _del_attr("schema"),
        "no psf_source attr": _del_attr("psf_source"),
        "config not JSON": _set_attr("config", "max_iter=3"),
        "version 99": _version(99),
    },
}


COMMANDS = ["info", "detect", "deblend", "catalog", "query", "show", "diff", "migrate", "export-lsst"]
# the commands that read each group; a newer schema version is refused by every command
READERS = {
    "exposure": ["info", "detect", "deblend", "catalog", "query", "show", "migrate"],
    "parents": ["info", "deblend", "catalog", "migrate"],
    "runs/a": ["info", "deblend", "catalog", "query", "show", "diff", "migrate", "export-lsst"],
}


def _argv(command, path, tmp, parent):
    p = str(path)
    return {
        "info": ["info", "--check", p],
        "detect": ["detect", p, "--replace"],
        "deblend": ["deblend", p, "--run", "new", "--set", "max_iter=3"],
        "catalog": ["catalog", p, "--band", "r", "--run", "a", "-o", str(tmp / "cat.csv")],
        "query": ["query", p, "--run", "a"],
        "show": ["show", p, "--run", "a", "--blend", str(parent), "-o", str(tmp / "b.png")],
        "diff": ["diff", p, "a", "b"],
        "migrate": ["migrate", p],
        "export-lsst": ["export-lsst", p, "--run", "a", "-o", str(tmp / "m.json")],
    }[command]


CASES = [(g, d, c) for g in DAMAGE for d in DAMAGE[g]
         for c in (COMMANDS if d == "version 99" else READERS[g])]


def _refused(source, parent, tmp_path, capsys, group, command, damage) -> str:
    """Copy store ``source``, ``damage(path)`` it, run ``command``: exit 2, one line
    naming ``group``, no traceback, every file of the store as it was. Returns the line."""
    path = tmp_path / "s.h5"
    copy_store(source, path)
    argv = _argv(command, path, tmp_path, parent)
    damage(path)
    before = store_bytes(path)
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{group!r}" in err, err  # names the damaged group
    assert store_bytes(path) == before  # never half-written, never "repaired" behind the user
    return err


def _in_group(group, damage):
    """A damage of the group's HDF5 objects, applied through the store file."""
    def apply(path):
        with h5py.File(path, "a") as f:
            damage(f[group])
    return apply


@pytest.mark.parametrize("group,damage,command", CASES, ids=[f"{g}-{d}-{c}" for g, d, c in CASES])
def test_damaged_group_one_line_exit_2(valid_store, tmp_path, capsys, group, damage, command):
    assert Store(valid_store).layout == "linked"
    err = _refused(valid_store, _fitted_parent(valid_store), tmp_path, capsys, group, command,
                   _in_group(group, DAMAGE[group][damage]))
    if damage == "version 99":
        assert "upgrade scarletstore" in err


@pytest.fixture(scope="module")
def valid_single_store(valid_store, tmp_path_factory):
    """The same groups as ``valid_store`` in one file (``SCARLETSTORE_LAYOUT=single``)."""
    source = Store(valid_store)
    path = tmp_path_factory.mktemp("damage_single") / "s.h5"
    Store.create(path, {g: source.read(g, upgrade=False) for g in source.groups()}, layout="single")
    return path


# the single-file layout (still read and written): two damages of each group, every reader
SINGLE_CASES = [(g, d, c) for g in DAMAGE for d in list(DAMAGE[g])[:2] + ["version 99"]
                for c in READERS[g]]


@pytest.mark.parametrize("group,damage,command", SINGLE_CASES,
                         ids=[f"{g}-{d}-{c}" for g, d, c in SINGLE_CASES])
def test_damaged_single_file_store_one_line_exit_2(valid_single_store, valid_store, tmp_path, capsys,
                                                   group, damage, command):
    assert Store(valid_single_store).layout == "single"
    _refused(valid_single_store, _fitted_parent(valid_store), tmp_path, capsys, group, command,
             _in_group(group, DAMAGE[group][damage]))
    assert not products_dir(tmp_path / "s.h5").exists()


# ------------------------------------------------------------------ damage to a linked store's files
def _product(path, group):
    with h5py.File(path, "r") as f:
        return path.parent / f.get(group, getlink=True).filename


def _relink(target):
    """Point the index's link for the group at ``target(path, group) -> (file, object)``."""
    def damage(path, group):
        file, obj = target(path, group)
        with h5py.File(path, "a") as f:
            del f[group]
            f[group] = h5py.ExternalLink(file, obj)
    return damage


def _truncate(path, group):
    file = _product(path, group)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


LINK_DAMAGE = {
    "product file missing": lambda path, group: _product(path, group).unlink(),
    "product file garbled": lambda path, group: _product(path, group).write_bytes(b"not HDF5 " * 500),
    "product file truncated": _truncate,
    "link to a missing file": _relink(lambda path, group: (f"{path.name}.d/{'0' * 32}.h5", "/" + group)),
    "link to a missing object": _relink(lambda path, group: (
        str(_product(path, group).relative_to(path.parent)), "/no/such/group")),
}
LINK_CASES = [(g, d, c) for g in READERS for d in LINK_DAMAGE for c in READERS[g]]


@pytest.mark.parametrize("group,damage,command", LINK_CASES, ids=[f"{g}-{d}-{c}" for g, d, c in LINK_CASES])
def test_damaged_product_file_one_line_exit_2(valid_store, tmp_path, capsys, group, damage, command):
    _refused(valid_store, _fitted_parent(valid_store), tmp_path, capsys, group, command,
             lambda path: LINK_DAMAGE[damage](path, group))


@pytest.mark.parametrize("command", COMMANDS)
def test_garbled_index_one_line_exit_2(valid_store, tmp_path, capsys, command):
    path = tmp_path / "s.h5"
    copy_store(valid_store, path)
    argv = _argv(command, path, tmp_path, _fitted_parent(valid_store))
    index = path.read_bytes()
    path.write_bytes(index[:8] + bytes(len(index) - 8))  # the HDF5 signature, then zeros
    before = store_bytes(path)
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err, err
    assert store_bytes(path) == before


def test_undamaged_copy_passes_every_command(valid_store, tmp_path, capsys):
    """The same commands succeed on the undamaged store (the failures above are the damage)."""
    path = tmp_path / "s.h5"
    copy_store(valid_store, path)
    parent = _fitted_parent(valid_store)
    for command in COMMANDS:
        assert main(_argv(command, path, tmp_path, parent)) == 0, (command, capsys.readouterr().err)


def test_damaged_parents_can_be_replaced(valid_store, tmp_path):
    """detect --replace rewrites a damaged parents group (the repair), but never a newer one."""
    path = tmp_path / "s.h5"
    copy_store(valid_store, path)
    with h5py.File(path, "a") as f:
        _bump("span_count")(f["parents"])
    assert main(["info", "--check", str(path)]) == 2
    assert main(["detect", str(path), "--replace"]) == 0
    assert Store(path).check() == []


def test_info_lists_damaged_group(valid_store, tmp_path, capsys):
    path = tmp_path / "s.h5"
    copy_store(valid_store, path)
    with h5py.File(path, "a") as f:
        _bump("component_n_pixels")(f["runs/a"])
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "component_n_pixels" in out and "1 damaged group" in out


def test_write_over_newer_group_refused(valid_store, tmp_path):
    path = tmp_path / "s.h5"
    copy_store(valid_store, path)
    store = Store(path)
    parents = store.read("parents")
    with h5py.File(path, "a") as f:
        _version(99)(f["parents"])
    before = store_bytes(path)
    with pytest.raises(SchemaError, match="newer"):
        store.write({"parents": parents}, replace=True)
    with pytest.raises(SchemaError, match="upgrade scarletstore"):
        Store(path)
    assert store_bytes(path) == before


def test_check_finds_shared_source_ids(valid_store, tmp_path):
    """Deep check: ids repeated across runs (what concurrent writers used to do)."""
    path = tmp_path / "s.h5"
    copy_store(valid_store, path)
    with h5py.File(path, "a") as f:
        a = f["runs/a/source_id"][()]
        b = f["runs/b/source_id"][()]
        b[0] = a[0]
        f["runs/b/source_id"][...] = b
    problems = Store(path).check()
    assert len(problems) == 1 and f"source id {a[0]}" in problems[0]
    assert Store(path).check(deep=False) == []  # the cheap checks do not read ids
