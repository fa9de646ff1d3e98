"""Exception types. Every user mistake raises a subclass of ScarletStoreError,
whose message is one line fit to print (the CLI prints it and exits 2)."""


class ScarletStoreError(Exception):
    """Base class of errors caused by the user's input or request."""


class InputError(ScarletStoreError):
    """An input file or argument is unreadable or inconsistent."""


class SchemaError(ScarletStoreError):
    """A Dataset does not follow its declared schema."""


class StoreError(ScarletStoreError):
    """A store cannot be opened, or a group is missing or already present."""
