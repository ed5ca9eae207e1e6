"""carsearch: reverse image search and open-set kNN classification for car photos."""

__version__ = "0.1.0"

SCHEMA_VERSION = 1
