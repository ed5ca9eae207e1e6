"""Embedding stage: safe image loading, batching, the shard writer, the resumable job, loading shards back.

Networks come from `carsearch.models`; this stage only asks it for one (through the Encoder). Exports
are loaded on first use, so reading shards (`index`, `bench`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Encoder": "carsearch.embed.encoder",
    "EmbedResult": "carsearch.embed.job",
    "embed_dataset": "carsearch.embed.job",
    "EmbeddingSet": "carsearch.embed.store",
    "load_embeddings": "carsearch.embed.store",
    "read_manifest": "carsearch.embed.store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'carsearch.embed' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
