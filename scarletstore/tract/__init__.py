"""Tracts: a grid cut into overlapping patches, each processed into its own store.

A tract is one coadd grid too large (or too slow) to process at once. It is
cut into NX x NY patches whose inner regions tile the grid exactly and whose
outer boxes overlap their neighbours; each patch is coadded, detected and
deblended on its own outer box, as one task on dask.distributed, into the
store ``OUT_DIR/patch_<i>_<j>/store.h5``. The tract index ``OUT_DIR/tract.json``
records the grid, every patch's boxes, status and store. The tract catalog
keeps each source once as primary: from the patch whose inner region holds
its centre.

Modules
-------
patches : patch boxes (outer and inner) of a grid, and the ``NxM`` argument
index : the tract index (``tract.json``), written atomically
run : one patch's coadd -> detect -> deblend (the task), and the tract run
    (tasks on dask, one retry, progress, the index kept up to date)
merge : the tract catalog of one band with ``is_primary``
"""
