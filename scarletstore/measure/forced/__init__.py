"""Forced multi-epoch photometry: stored models taken to every visit and fitted there.

Modules
-------
render : a visit seen from the coadd grid; models rendered at the visit PSF and resampled onto its pixels
fit : joint weighted linear fit of a blend's children (and a pedestal) in one visit
kernels : numba loops of the fit (normal equations, per-source chi^2)
run : one task per visit (in-process or dask), the output table
"""
