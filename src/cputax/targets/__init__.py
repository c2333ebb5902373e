"""Servers to measure: the embedded local target, the calibration stub, metrics scraping."""
