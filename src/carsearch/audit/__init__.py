"""Audit of an embedded collection: duplicates, leakage, label conflicts, mislabelled photos, outliers."""
