"""HTTP API and one web page over a Searcher (a thin adapter: no search logic lives here)."""
