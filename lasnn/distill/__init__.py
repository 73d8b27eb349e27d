"""LaSNN distillation trainer (issue 5)."""
