"""Measurement: heavy footprints from stored models, the band catalog, photometry, forced photometry."""
