"""Model zoo (issue 4)."""
