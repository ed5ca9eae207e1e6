"""Embedding stage: backbones, safe image loading, resumable sharded embedding, loading shards back."""

from carsearch.embed.backbones import backbone_names, get_backbone, load_backbone
from carsearch.embed.encoder import Encoder
from carsearch.embed.job import EmbedResult, embed_dataset
from carsearch.embed.store import EmbeddingSet, load_embeddings, read_manifest

__all__ = [
    "EmbedResult",
    "EmbeddingSet",
    "Encoder",
    "backbone_names",
    "embed_dataset",
    "get_backbone",
    "load_backbone",
    "load_embeddings",
    "read_manifest",
]
