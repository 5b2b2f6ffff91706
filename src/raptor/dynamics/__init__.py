"""Dynamical interpretability (issue 10): depth as discrete time, token directions on the unit sphere."""
