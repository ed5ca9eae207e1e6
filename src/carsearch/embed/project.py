"""Applying a head-only checkpoint to embedding shards, without running the CNN again.

A head trained on cached embeddings (`carsearch train head`) maps each stored vector v to
normalize(W v + b). The projected shards record the checkpoint as their weights, so queries and later
images are embedded through it (`Encoder.from_provenance`) into the same space: a test checks that
re-embedding with the checkpoint equals projecting the stored vectors.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from carsearch import SCHEMA_VERSION
from carsearch.embed.shards import ShardRows, write_shard
from carsearch.embed.store import FAILURES, MANIFEST, read_listed_shard, read_manifest
from carsearch.errors import CarsearchError
from carsearch.fsutil import (
    exclusive_lock,
    read_descriptor,
    remove_stale_tmp,
    sha256_file,
    write_json_atomic,
)
from carsearch.models import files as ckpt_files
from carsearch.provenance import library_versions

log = logging.getLogger(__name__)


def head_of(checkpoint: Path, source_prov: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(W, b, provenance of the projected shards) of a head-only checkpoint, after checking that it was
    trained on embeddings like `source_prov` (same backbone, weights and preprocessing)."""
    checkpoint = checkpoint.expanduser().resolve()
    info_path = checkpoint / ckpt_files.INFO_FILE
    info = read_descriptor(
        info_path,
        ckpt_files.KIND,
        "checkpoint description",
        "train it again.",
        missing=f"{checkpoint} is not a carsearch checkpoint (no readable {info_path.name}).",
    )
    if info.get("mode") != "head-only" or info.get("head_input") != "normalized":
        raise CarsearchError(
            f"{checkpoint} is not a head trained on cached embeddings (`carsearch train head`): "
            "re-embed the images with it instead (carsearch embed --weights CKPT_DIR)."
        )
    base = info.get("base_weights", {})
    for what, theirs, ours in (
        ("backbone", info.get("backbone"), source_prov.get("backbone")),
        ("weights", base.get("sha256"), source_prov.get("weights_sha256")),
        ("preprocessing", info.get("preprocessing"), source_prov.get("preprocessing")),
    ):
        if theirs != ours:
            raise CarsearchError(
                f"{checkpoint} was trained on embeddings of another {what} than these ({theirs!r} vs "
                f"{ours!r}); project the embeddings it was trained on, or train a head on these."
            )
    name = ckpt_files.BEST_FILE if (checkpoint / ckpt_files.BEST_FILE).is_file() else ckpt_files.MODEL_FILE
    path = checkpoint / name
    digest = sha256_file(path)
    if info.get("files", {}).get(name) not in (None, digest):
        raise CarsearchError(
            f"{path} does not match the sha256 in {info_path.name}; it was changed or damaged."
        )
    state = load_file(str(path))
    w, b = state["head.weight"].astype(np.float32), state["head.bias"].astype(np.float32)
    prov = {
        **source_prov,
        "weights": str(checkpoint),
        "weights_sha256": digest,
        "weights_source": str(path),
        "dim": int(w.shape[0]),
    }
    return w, b, prov


def project(vectors: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """normalize(W v + b) for each row (the head applied to stored, normalised embeddings)."""
    y = vectors.astype(np.float32) @ w.T + b
    return (y / np.linalg.norm(y, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)


def project_embeddings(emb_dir: str | Path, checkpoint: str | Path, out: str | Path) -> dict:
    """Write the shards of `emb_dir` projected by a head-only checkpoint to `out`; returns its manifest."""
    src = Path(emb_dir).expanduser().resolve()
    w, b, prov = head_of(Path(checkpoint), read_manifest(src)["provenance"])
    return derive_embeddings(src, out, prov, lambda rows: project(rows.vectors, w, b))


def derive_embeddings(
    emb_dir: str | Path, out: str | Path, prov: dict, transform: Callable[[ShardRows], np.ndarray]
) -> dict:
    """Write `emb_dir`'s shards to `out` with each shard's vectors replaced by `transform(rows)` (n, d)
    float32 and the provenance `prov` (the network the new vectors come from); returns the new manifest.
    Used by a head's projection and by a partial fine-tune's embeddings computed from cached activations."""
    src, out = Path(emb_dir).expanduser().resolve(), Path(out).expanduser().resolve()
    if out == src:
        raise CarsearchError("--out must be another folder than the embeddings it projects.")
    manifest = read_manifest(src)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out):
        remove_stale_tmp(out)
        for old in out.glob("shard-*.h5"):
            old.unlink()
        shards = []
        for entry in manifest["shards"]:
            rows, attrs = read_listed_shard(src, entry)
            rows.vectors = np.ascontiguousarray(transform(rows), dtype=np.float32)
            attrs = {**attrs, **{k: v for k, v in prov.items() if k != "weights_source"}}
            digest = write_shard(out / entry["file"], rows, attrs)
            shards.append({**entry, "sha256": digest})
        if (src / FAILURES).is_file():
            shutil.copyfile(src / FAILURES, out / FAILURES)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        body = {
            **manifest,
            "provenance": prov,
            "fingerprint": {
                **manifest["fingerprint"],
                "weights": prov["weights"],
                "weights_sha256": prov["weights_sha256"],
            },
            "shards": shards,
            "projected_from": {"embeddings": str(src), "manifest_sha256": sha256_file(src / MANIFEST)},
            "schema_version": SCHEMA_VERSION,
            "versions": library_versions(),
            "created": now,
            "updated": now,
        }
        write_json_atomic(out / MANIFEST, body)
    log.info("derived %d embeddings of %s into %s (%d-d)", body["rows"], src, out, prov["dim"])
    return body
