"""Getting exposures in: FITS per band or npz into the ``exposure`` product, and mask planes."""
