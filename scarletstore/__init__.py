"""scarletstore: multi-band deblending with a versioned HDF5 model store."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("scarletstore")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from .errors import InputError, SchemaError, ScarletStoreError, StoreError  # noqa: E402

__all__ = ["__version__", "ScarletStoreError", "InputError", "SchemaError", "StoreError"]
