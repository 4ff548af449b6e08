"""calibrator: see README."""
