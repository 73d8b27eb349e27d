"""ANN-to-SNN conversion baseline (issue 6)."""
