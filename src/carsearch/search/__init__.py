"""Search stage: similar-car search, weighted kNN vote, open-set rejection."""

from carsearch.search.searcher import Classification, Neighbor, Searcher, SearchResult, Vote, expand_queries

__all__ = ["Classification", "Neighbor", "SearchResult", "Searcher", "Vote", "expand_queries"]
