"""Schema migrations: upgrade a product one version at a time.

Each step is a pure function Dataset -> Dataset registered for (schema,
from_version); :func:`upgrade` applies steps until the latest version.
A store is migrated in place by rewriting its groups in one atomic write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import xarray as xr

from ..errors import SchemaError
from . import schema as _schema

MIGRATIONS: dict[tuple[str, int], Callable[[xr.Dataset], xr.Dataset]] = {}


def migration(name: str, from_version: int):
    """Register ``fn`` as the step from ``from_version`` to ``from_version + 1``."""
    def register(fn):
        MIGRATIONS[(name, from_version)] = fn
        return fn
    return register


@migration("run", 1)
def _run_1_to_2(ds: xr.Dataset) -> xr.Dataset:
    # v1 runs always reconstruct with the run-level PSF
    ds = ds.copy()
    ds.attrs["psf_source"] = "run"
    return ds


def needs_upgrade(ds: xr.Dataset) -> bool:
    name = ds.attrs.get("schema")
    return int(ds.attrs.get("schema_version", 0)) < _schema.latest_version(name)


def upgrade(ds: xr.Dataset) -> xr.Dataset:
    """Return ``ds`` upgraded to the latest version of its schema (validated at each step)."""
    name = ds.attrs.get("schema")
    if name is None:
        raise SchemaError("dataset has no 'schema' attribute")
    version = int(ds.attrs["schema_version"])
    latest = _schema.latest_version(name)
    if version > latest:
        raise SchemaError(f"{name}: schema version {version} is newer than this scarletstore "
                          f"knows (latest {latest}); upgrade scarletstore")
    _schema.validate(ds, name, version)
    while version < latest:
        step = MIGRATIONS.get((name, version))
        if step is None:
            raise SchemaError(f"{name}: no migration from version {version} to {version + 1}")
        ds = step(ds)
        version += 1
        ds.attrs["schema_version"] = version
        _schema.validate(ds, name, version)
    return ds


def migrate_store(store, layout: str | None = None) -> dict[str, tuple[int, int]]:
    """Upgrade every group of ``store`` to its latest schema in one atomic write.

    With ``layout`` ("linked") a single-file store is also converted, in the
    same commit, to the linked store format (an index of links to one file per
    product; see docs/store.md). Returns ``{group: (old_version, new_version)}``
    for the groups whose schema changed; running it again changes nothing
    (idempotent).
    """
    changed, new = {}, {}
    for group in _product_groups(store):
        ds = store.read(group, upgrade=False)
        if needs_upgrade(ds):
            old = int(ds.attrs["schema_version"])
            up = upgrade(ds)
            new[group] = up
            changed[group] = (old, int(up.attrs["schema_version"]))
    if layout is not None and layout != store.layout:
        store.convert(layout, new)
    elif new:
        store.write(new, replace=True)
    return changed


def _product_groups(store) -> list[str]:
    """Every product group, including those inside folder groups (``apcorr/<band>``,
    ``coadds/likelihood``, as ``runs/<name>``): :meth:`Store.groups` expands folders.
    A damaged group (e.g. one that lost its ``schema`` attribute) is listed too,
    so reading it reports the damage instead of skipping it."""
    return list(store.groups())
