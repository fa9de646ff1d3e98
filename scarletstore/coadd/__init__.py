"""From calibrated visits to coadds: warping, PSF warping and stacking.

Modules
-------
kernels : numba Lanczos-3 resampling loop (no I/O)
warp : pixel mapping between two WCSs and the warp of one visit onto a grid
psf : a visit PSF warped onto the grid through the local Jacobian
visits : reading and validating visit FITS files and the grid file
stack : the direct (inverse-variance) coadd, streamed visit by visit
"""
