"""Rate-distortion evaluation: the eval job, baselines, RD statistics and reports."""
