"""Detection: background, detection images, footprints, peaks, known positions."""
