"""Metric-learning fine-tune of a backbone (or of a projection head on cached embeddings)."""
