"""What the routes ask of the index, in one object: uploads decoded within the decode slots and framed to
the network's input, embedded in forward passes shared with concurrent queries, classified under the live
index's read lock, and indexed photos (files, thumbnails, content digests) found by id.

The routes (serve/app.py, serve/writes.py) speak HTTP; this is the only place in the server that reaches
into the Searcher's encoder and bundle.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import Future
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
from fastapi import HTTPException

from carsearch import defaults
from carsearch.datasets import attributes
from carsearch.embed.images import BadImage, load_image
from carsearch.errors import CarsearchError
from carsearch.index.store import is_image_id
from carsearch.search import Searcher
from carsearch.search.filters import Filter
from carsearch.serve import memory
from carsearch.serve.batcher import Batcher
from carsearch.serve.live import LiveIndex
from carsearch.serve.observe import Metrics
from carsearch.serve.settings import ServeSettings

BIG_DECODE = 4_000_000  # pixels: after such a decode, hand freed memory back to the OS
SUGGESTIONS_MAX = 500  # values of one field the page offers


def _distinct(values: np.ndarray) -> list[str]:
    return sorted({str(v) for v in values if v})[:SUGGESTIONS_MAX]


class Queries:
    """The server's one view of a Searcher (shared by every request), its live index and its limits."""

    def __init__(self, searcher: Searcher, live: LiveIndex, cfg: ServeSettings, metrics: Metrics) -> None:
        self.s, self.live, self.metrics = searcher, live, metrics
        self.decode_slots = threading.BoundedSemaphore(cfg.max_decodes)
        self.batcher = (
            Batcher(searcher.embed_arrays, cfg.batch_size, cfg.batch_wait_ms / 1000, metrics.batch)
            if cfg.batch_size > 1
            else None
        )
        # An id may name another photo after a reload: the cache empties with every change.
        self.thumbnail = lru_cache(maxsize=512)(self._thumbnail)
        live.on_change.append(self.thumbnail.cache_clear)
        metrics.images.set_function(self.ntotal)

    # --- the collection -------------------------------------------------------------------------------

    def ntotal(self) -> int:
        return int(self.s.bundle.index.ntotal)

    def described(self) -> dict:
        """What /api/info says of the index: size, type, network, open-set threshold, which filter fields
        some indexed photo has (the page hides the others) and its makes."""
        i, g = self.s.info, self.s.bundle.gallery
        # The index's own values of the fields the page suggests; "makes" (as before) is the make's.
        suggestions = {f.name: _distinct(getattr(g, f.name)) for f in attributes.FILTER_FIELDS if f.suggest}
        return {
            "images": i["ntotal"],
            "factory": i["factory"],
            "search_params": i["search_params"],
            "dim": i["dim"],
            "backbone": i["provenance"]["backbone"],
            "weights": i["provenance"]["weights"],
            "crop": i["provenance"]["preprocessing"]["crop"],
            "runtime": self.s.encoder.runtime,
            "recall@10": (i.get("recall") or {}).get("measured"),
            "openset": i.get("openset"),
            "labelled": bool(any(g.labels)),
            "fields": {f.name: bool(any(getattr(g, f.name))) for f in attributes.FILTER_FIELDS},
            "suggestions": suggestions,
            "makes": suggestions["make"] if "make" in suggestions else _distinct(g.make),
        }

    def sha256_of(self, image_id: int) -> str:
        """The indexed file's sha256 ("" for rows without one): the photo's identity across reloads."""
        if not is_image_id(image_id):
            return ""  # not an id at all: the route answers 404 for it
        g = self.s.bundle.gallery
        row = int(g.rows(np.array([image_id], np.int64))[0])
        return str(g.sha256[row]) if row >= 0 else ""

    def image_url(self, image_id: int) -> str:
        # The URL names the content too: after a rebuild and reload an id may name another photo, and a
        # cached copy under the old URL must not stand in for it.
        digest = self.sha256_of(image_id)
        return f"/images/{image_id}?v={digest[:16]}" if digest else f"/images/{image_id}"

    def path_of(self, image_id: int) -> Path:
        """The file of an indexed image, by id only (the Searcher checks it lies under its dataset root);
        404 for an id the index does not hold."""
        try:
            return self.s.path_of(image_id)
        except CarsearchError as e:
            raise HTTPException(404, str(e)) from None

    def _thumbnail(self, image_id: int, size: int) -> bytes:
        path = self.path_of(image_id)
        # An indexed image passed the batch limit, not the upload one; JPEGs decode near `size`.
        with self.decode_slots:
            try:
                img = load_image(path, defaults.MAX_PIXELS, draft_size=size)
            except BadImage:
                raise HTTPException(404, f"image {image_id} cannot be read") from None
            img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    # --- queries --------------------------------------------------------------------------------------

    def frame(self, data: bytes) -> np.ndarray:
        """Decode an upload (inside a decode slot) and frame it to the network's input: a small array."""
        preprocessing = self.s.encoder.preprocessing
        with self.decode_slots:
            try:
                image = load_image(data, self.s.max_pixels, preprocessing.draft_size)
            except BadImage as e:
                raise HTTPException(400, f"not a usable image ({e.reason}): {e.detail}") from None
            big = image.width * image.height >= BIG_DECODE
            array = preprocessing.apply(image)
            del image
        if big:
            memory.release()
        return array

    def embed_async(self, data: bytes) -> Future:
        """The upload's embedding, computed in a batch with other queries (or at once, batching off)."""
        if self.batcher is None:
            done: Future = Future()
            done.set_result(self.s.embed_arrays(self.frame(data)[None])[0])
            self.metrics.batch(1, 0.0)
            return done
        with self.batcher.arriving():
            return self.batcher.submit(self.frame(data))

    def embed_one(self, data: bytes) -> np.ndarray:
        return self.embed_async(data).result()

    def answer(self, vector: np.ndarray, name: str, k: int, level: str, where: Filter | None) -> dict:
        """One photo's answer (the API's result object), its neighbours' URLs from the same version of the
        index; a `note` says why a list came back unvoted."""
        with self.live.lock.read():
            result = self.s.classify(vector[None], k=k, level=level, where=where)[0]
            urls = [self.image_url(n.id) for n in result.neighbors]
            unvoted = result.label is None and bool(result.neighbors)
            labelled = not unvoted or bool(any(self.s.bundle.gallery.labels))
        body = asdict(result)
        body["query"] = name
        for n, url in zip(body["neighbors"], urls, strict=True):
            n["image_url"] = url
        if unvoted:
            why = (
                f"none of these {len(result.neighbors)} cars has a {'' if level == 'class' else level + ' '}"
                "label, so none is voted."
                if labelled
                else "the index has no labels: these are the most similar photos, with no make or model vote."
            )
            body["note"] = f"{why.rstrip('.')}; {body['note']}" if body["note"] else why  # and any shortfall
        return body

    def classify_many(
        self, files: list[tuple[bytes, str]], k: int, level: str, where: Filter | None
    ) -> list[dict]:
        """Each (upload bytes, name) answered, or {"query", "error"} for one that cannot be used."""
        # All submitted before any is awaited: a request's images share forward passes too.
        pending: list[Future | str] = []
        for data, _ in files:
            try:
                pending.append(self.embed_async(data))
            except HTTPException as e:
                pending.append(str(e.detail))
        out = []
        for (_, name), p in zip(files, pending, strict=True):
            if isinstance(p, str):
                out.append({"query": name, "error": p})
            else:
                out.append(self.answer(p.result(), name, k, level, where))
        return out
