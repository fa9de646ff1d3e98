"""scarletstore: multi-band deblending with a versioned HDF5 model store."""

from .errors import InputError, SchemaError, ScarletStoreError, StoreError

__all__ = ["__version__", "ScarletStoreError", "InputError", "SchemaError", "StoreError"]


def __getattr__(name):
    # The installed version is looked up on first use only: importlib.metadata
    # scans every path entry for distributions, which a CLI call that never
    # records a version should not pay at start-up.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("scarletstore")
        except PackageNotFoundError:  # running from a source tree without install
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
