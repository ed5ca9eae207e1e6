"""Evaluation pieces shared by index tuning, search, bench and train: splits, the kNN vote and its
metrics, neighbour oracles (exact search, one way to drop a query's own id, Recall@K), open-set scores.

It sits below index/, search/, bench/ and train/ and imports none of them.
"""
