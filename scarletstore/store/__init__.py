"""The store under every stage: the versioned HDF5 file, schemas, migrations, stored runs."""
