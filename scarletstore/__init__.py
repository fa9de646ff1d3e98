"""scarletstore: multi-band deblending with a versioned HDF5 model store.

>>> import scarletstore as ss
>>> store = ss.open("field.h5")            # an existing store
>>> store = ss.Store.create("new.h5", {"exposure": exposure})
>>> ss.copy_store("new.h5", "copy.h5")    # new.h5 is a file plus its folder new.h5.d
>>> ss.store_files("copy.h5")             # every file of it: the index and its products

``import scarletstore`` stays cheap: the store (h5py, xarray) is imported on
first use of ``open`` or ``Store``.
"""

from .errors import InputError, ScarletStoreError, SchemaError, StoreError

__all__ = ["__version__", "open", "Store", "copy_store", "move_store", "remove_store",
           "store_files", "ScarletStoreError", "InputError", "SchemaError", "StoreError"]
_STORE_FUNCTIONS = ("Store", "copy_store", "move_store", "remove_store", "store_files")


def open(path):  # noqa: A001 - ss.open(path) mirrors xarray.open_dataset / h5py.File
    """Open an existing store.

    Parameters
    ----------
    path : str or os.PathLike
        The store file.

    Returns
    -------
    scarletstore.store.store.Store

    Raises
    ------
    StoreError
        When ``path`` does not exist or is not a scarletstore store.
    InputError
        When ``path`` is not a str or os.PathLike.
    """
    from .store.store import Store

    return Store(path)


def __getattr__(name):
    # module-level lazy attributes (PEP 562): the heavy store module loads on first
    # use, and the installed version is looked up on first use only (importlib.metadata
    # scans every path entry, which a CLI call that records no version should not pay)
    if name in _STORE_FUNCTIONS:
        from .store import store

        return getattr(store, name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("scarletstore")
        except PackageNotFoundError:  # running from a source tree without install
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'scarletstore' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_STORE_FUNCTIONS))
