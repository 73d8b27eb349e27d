"""Data sets (issue 5)."""
