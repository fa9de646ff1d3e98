"""scarletstore: multi-band deblending with a versioned HDF5 model store.

>>> import scarletstore as ss
>>> store = ss.open("field.h5")            # an existing store
>>> store = ss.Store.create("new.h5", {"exposure": exposure})

``import scarletstore`` stays cheap: the store (h5py, xarray) is imported on
first use of ``open`` or ``Store``.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("scarletstore")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from .errors import InputError, SchemaError, ScarletStoreError, StoreError  # noqa: E402

__all__ = ["__version__", "open", "Store", "ScarletStoreError", "InputError", "SchemaError",
           "StoreError"]


def open(path):  # noqa: A001 - ss.open(path) mirrors xarray.open_dataset / h5py.File
    """Open an existing store.

    Parameters
    ----------
    path : str or os.PathLike
        The store file.

    Returns
    -------
    scarletstore.store.Store

    Raises
    ------
    StoreError
        When ``path`` does not exist or is not a scarletstore store.
    """
    from .store import Store

    return Store(path)


def __getattr__(name):
    # module-level lazy attribute (PEP 562): the heavy store module loads on first use
    if name == "Store":
        from .store import Store

        return Store
    raise AttributeError(f"module 'scarletstore' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"Store"})
