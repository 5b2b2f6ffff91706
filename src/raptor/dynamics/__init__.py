"""Dynamical interpretability (docs/method.md §9): depth as discrete time, token directions on the unit sphere."""
