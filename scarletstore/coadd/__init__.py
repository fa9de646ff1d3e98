"""From calibrated visits to coadds: warping, PSF warping and stacking.

Modules
-------
kernels : numba Lanczos-3 resampling loop and clipped-mean kernel (no I/O)
warp : pixel mapping between two WCSs and the warp of one visit onto a grid
psf : a visit PSF warped onto the grid through the local Jacobian
visits : reading and validating visit FITS files and the grid file
stack : the direct (inverse-variance) coadd, streamed visit by visit
likelihood : the Kaiser point-source likelihood coadd and the chi^2 image
match : PSF-matching kernels fitted in Fourier space
fourier : FFT convolutions sharing transforms (single precision, one thread)
cells : medians and sums over a coarse mesh of cells
reject : sigma-clipped PSF-matched stack, artifact detection, smooth differences
pipeline : the full coadd (spilled warps, PSF-matched stack, background
    matching, rejection, then direct and likelihood stacks); what the CLI runs
"""
