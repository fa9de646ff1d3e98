"""Mask-plane conventions shared by every stage (no heavy imports: the CLI's
argument checks and the deblend configuration read these at start-up)."""

# LSST mask-plane convention, used when an input does not name its planes.
LSST_MASK_PLANES = {
    "BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5,
    "DETECTED_NEGATIVE": 6, "SUSPECT": 7, "NO_DATA": 8,
}

#: Mask planes whose pixels are never used (detect, deblend, catalogs): the
#: default bad mask of Rubin's deblender (its ``badMask``), one definition for all.
DEFAULT_BAD_PLANES = ["BAD", "CR", "NO_DATA", "SAT", "SUSPECT", "EDGE"]
