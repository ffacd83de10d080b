"""Verification: numeric and interface checks, per-layer comparison, error metrics, verified export, plots."""
