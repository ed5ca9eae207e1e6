"""Embedding stage: safe image loading, batching, the shard writer, the resumable job, loading shards back.

Networks come from `carsearch.models`; this stage only asks it for one (through the Encoder). Exports
are loaded on first use, so reading shards (`index`, `bench`) does not import torch.
"""

from __future__ import annotations

from carsearch.lazy import lazy_exports

_EXPORTS = {
    "Encoder": "carsearch.embed.encoder",
    "EmbedResult": "carsearch.embed.job",
    "EmbedJob": "carsearch.embed.settings",
    "Engine": "carsearch.embed.engines",
    "embed_dataset": "carsearch.embed.job",
    "EmbeddingSet": "carsearch.embed.store",
    "load_embeddings": "carsearch.embed.store",
    "read_manifest": "carsearch.embed.store",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
