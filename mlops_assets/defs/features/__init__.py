"""Feature set and the leakage-free split."""
