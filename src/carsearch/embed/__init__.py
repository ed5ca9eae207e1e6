"""Embedding stage: safe image loading, batching, the shard writer, the resumable job, loading shards back.

Networks come from `carsearch.models`; this stage only asks it for one (through the Encoder).
"""

from carsearch.embed.encoder import Encoder
from carsearch.embed.job import EmbedResult, embed_dataset
from carsearch.embed.store import EmbeddingSet, load_embeddings, read_manifest

__all__ = ["EmbedResult", "EmbeddingSet", "Encoder", "embed_dataset", "load_embeddings", "read_manifest"]
