"""Simulated fields and visits with truth (galsim), for tests, demos and benchmarks."""
