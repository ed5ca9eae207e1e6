"""Searcher: open an index folder, embed query images the way the collection was embedded, search, vote."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from carsearch import defaults
from carsearch.datasets import attributes
from carsearch.datasets.attributes import attribute_fields
from carsearch.datasets.levels import level_name
from carsearch.datasets.records import display_name
from carsearch.datasets.scan import image_files, left_out_files
from carsearch.embed.images import BadImage, load_image, safe_join
from carsearch.errors import CarsearchError
from carsearch.eval.class_cosine import ClassCosine
from carsearch.eval.vote import ranked_votes
from carsearch.index.store import IndexBundle, is_image_id, open_bundle
from carsearch.search.filters import Filter, filtered_search
from carsearch.search.verdict import judge

MAX_K = defaults.MAX_K

Query = str | Path | bytes | Image.Image


@dataclass
@attribute_fields("str", after="label")  # make, model, year (datasets/attributes.ATTRIBUTES)
class Neighbor:
    id: int
    path: str
    label: str
    score: float  # cosine similarity
    display: str = ""  # the class as a person reads it ("Land Rover Range Rover 2012"); "" when unlabelled


@dataclass
class SearchResult:
    query: str
    neighbors: list[Neighbor] = field(default_factory=list)
    error: str | None = None
    note: str | None = None  # why fewer neighbours than asked for came back

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Vote:
    label: str
    share: float
    display: str | None = None  # the voted class as a person reads it (`label` is the raw class)


@dataclass
@attribute_fields("str | None", after="note", default=None)  # the winning label's make, model, year
class Classification:
    query: str
    label: str | None  # the winning label (the best guess even when `unknown`)
    confidence: float  # its vote share
    top5: list[Vote]
    unknown: bool  # the query looks like no indexed model (open-set rejection)
    openset_score: float | None  # similarity to the k-th neighbour used for rejection
    threshold: float | None
    level: str
    neighbors: list[Neighbor] = field(default_factory=list)
    error: str | None = None
    note: str | None = None  # why fewer neighbours than asked for voted
    # The winning label's parts as the collection stores them (make, model, year: attribute_fields above),
    # and a name to show ("Land Rover Range Rover 2012"); `label` is the raw class
    # ("land rover_range rover_2012") at --level class.
    display: str | None = None
    # A (not rejected) answer whose vote share is below the share threshold calibrated on held-out images
    # (index.json openset.uncertain; class level only): 95% of right held-out answers had a larger share.
    uncertain: bool = False
    reason: str | None = None  # why the answer is unknown or uncertain: the score against its threshold

    def to_json(self) -> dict:
        return asdict(self)


def expand_queries(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders replaced by the images they hold (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [p / rel for rel in image_files(p, p)]
            if not found:
                other = left_out_files(p)
                raise CarsearchError(
                    f"query folder {p} holds no images"
                    + (f" (left out: {_counts(other)}, not image types Pillow reads)." if other else ".")
                )
            out.extend(found)
        else:
            out.append(p)
    return out


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {ext}" for ext, n in counts.items())


def _name(q: Query, i: int) -> str:
    if isinstance(q, str | Path):
        return str(q)
    return f"<query {i}>"


class Searcher:
    """Similar-car search and kNN classification over one index folder. Safe to share between threads."""

    def __init__(
        self,
        bundle: IndexBundle,
        device: str = defaults.DEVICE,
        precision: str = defaults.PRECISION,
        max_pixels: int = defaults.MAX_PIXELS,
        batch_size: int = defaults.BATCH_SIZE,
        runtime: str = defaults.RUNTIME,
    ) -> None:
        self.bundle = bundle
        self._device, self._precision, self.max_pixels = device, precision, max_pixels
        self._runtime = runtime  # queries may run in another runtime than the collection: they agree
        self.batch_size = batch_size
        self._encoder = None
        self._lock = threading.Lock()  # one forward pass at a time; faiss search itself is read-only
        self._allowed: dict[Filter, np.ndarray] = {}
        self._class_cosine: tuple[IndexBundle | None, ClassCosine | None] = (None, None)

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        device: str = defaults.DEVICE,
        precision: str = defaults.PRECISION,
        verify: bool = True,
        max_pixels: int = defaults.MAX_PIXELS,
        runtime: str = defaults.RUNTIME,
    ) -> Searcher:
        return cls(open_bundle(index_dir, verify=verify), device, precision, max_pixels, runtime=runtime)

    @property
    def info(self) -> dict:
        return self.bundle.info

    @property
    def encoder(self):  # carsearch.embed.Encoder, built on first use (vector-only callers never pay for it)
        if self._encoder is None:
            from carsearch.embed.encoder import Encoder

            self._encoder = Encoder.from_provenance(
                self.bundle.provenance, self._device, self._precision, self._runtime
            )
        return self._encoder

    # --- embedding queries ---------------------------------------------------------------------------

    def embed(self, queries: Sequence[Query]) -> tuple[np.ndarray, list[str | None]]:
        """Embed query images; returns (vectors of the good ones, per-query error or None).

        Images are decoded one batch at a time, so a large query folder is never held in memory whole."""
        errors: list[str | None] = []
        parts: list[np.ndarray] = []
        for start in range(0, len(queries), self.batch_size):
            images: list[Image.Image] = []
            for q in queries[start : start + self.batch_size]:
                try:
                    img = (
                        (q if q.mode == "RGB" else q.convert("RGB"))  # no copy of a decoded upload
                        if isinstance(q, Image.Image)
                        # JPEGs decode at the reduced scale the collection's were embedded at.
                        else load_image(q, self.max_pixels, self.encoder.preprocessing.draft_size)
                    )
                    images.append(img)
                    errors.append(None)
                except BadImage as e:
                    errors.append(f"{e.reason}: {e.detail}" if e.detail else e.reason)
            if images:
                with self._lock:
                    parts.append(self.encoder.encode_images(images, self.batch_size))
        if not parts:
            return np.zeros((0, self.bundle.index.d), np.float32), errors
        return np.concatenate(parts), errors

    def path_of(self, image_id: int) -> Path:
        """The file of an indexed image, by id; it must lie under its dataset root and exist.

        Raises CarsearchError (the server answers 404 with its message)."""
        if not is_image_id(image_id):
            raise CarsearchError(f"no image with id {image_id} in this index")
        rows = self.bundle.gallery.rows([image_id])
        if rows[0] < 0:
            raise CarsearchError(f"no image with id {image_id} in this index")
        row = int(rows[0])
        try:
            path = safe_join(self.bundle.root_of(row), str(self.bundle.gallery.paths[row]))
        except BadImage:
            raise CarsearchError(f"image {image_id} lies outside its dataset folder") from None
        if not path.is_file():
            raise CarsearchError(f"the file of image {image_id} is missing")
        return path

    # --- search ----------------------------------------------------------------------------------------

    def forget_filters(self) -> None:
        """Drop the cached filter results (after the index changed)."""
        self._allowed = {}

    def embed_arrays(self, arrays: np.ndarray) -> np.ndarray:
        """Embed framed uint8 images (n, size, size, 3) in one forward pass (the server's batches)."""
        with self._lock:
            return self.encoder.encode_arrays(np.ascontiguousarray(arrays), batch_size=max(1, len(arrays)))

    def allowed_ids(self, where: Filter) -> np.ndarray:
        """Ids of the indexed images that pass `where` (cached per filter)."""
        if where not in self._allowed:
            g = self.bundle.gallery
            if len(self._allowed) > 256:
                self._allowed.clear()
            columns = {f.name: getattr(g, f.name) for f in attributes.FILTER_FIELDS}
            self._allowed[where] = np.sort(g.ids[where.mask(columns)])
        return self._allowed[where]

    def search_vectors(
        self, vectors: np.ndarray, k: int, where: Filter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw faiss search: (similarities, ids), -1 ids where fewer than k were found; with `where`, only
        images passing the filter (k of them whenever k pass)."""
        if not 1 <= k <= MAX_K:
            raise CarsearchError(f"k must be between 1 and {MAX_K}, not {k}.")
        x = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if x.shape[1] != self.bundle.index.d:
            raise CarsearchError(
                f"query vectors have {x.shape[1]} dimensions; this index holds {self.bundle.index.d}."
            )
        if where:
            return filtered_search(self.bundle.index, x, k, self.allowed_ids(where))
        return self.bundle.index.search(x, min(k, max(1, self.bundle.index.ntotal)))

    def neighbors(self, sims: np.ndarray, ids: np.ndarray) -> list[Neighbor]:
        g = self.bundle.gallery
        out = []
        for sim, row in zip(sims, g.rows(ids), strict=True):
            if row < 0:
                continue
            label, parts = str(g.labels[row]), {f: str(getattr(g, f)[row]) for f in attributes.ATTRIBUTES}
            found = {"id": int(g.ids[row]), "path": str(g.paths[row]), "label": label, **parts}
            out.append(Neighbor(**found, score=round(float(sim), 6), display=display_name(**parts) or label))
        return out

    def _run(
        self, queries: Sequence[Query] | np.ndarray, k: int, where: Filter | None = None
    ) -> tuple[list[str], list[str | None], np.ndarray, np.ndarray, np.ndarray]:
        if isinstance(queries, np.ndarray):
            vectors, errors = np.atleast_2d(queries), [None] * len(np.atleast_2d(queries))
            names = [f"<vector {i}>" for i in range(len(vectors))]
        else:
            names = [_name(q, i) for i, q in enumerate(queries)]
            vectors, errors = self.embed(queries)
        sims, ids = (
            self.search_vectors(vectors, k, where)
            if len(vectors)
            else (np.zeros((0, k)), np.zeros((0, k), int))
        )
        return names, errors, sims, ids, vectors

    def search(
        self, queries: Sequence[Query] | np.ndarray, k: int = defaults.K_SEARCH, where: Filter | None = None
    ) -> list[SearchResult]:
        """The k most similar indexed images of each query (image files, bytes, PIL images or vectors),
        among those passing `where` (make / model / year) when given."""
        names, errors, sims, ids, _ = self._run(queries, k, where)
        out, j = [], 0
        for name, err in zip(names, errors, strict=True):
            if err is not None:
                out.append(SearchResult(name, [], err))
                continue
            found = self.neighbors(sims[j], ids[j])
            out.append(SearchResult(name, found, note=self.shortfall(len(found), k, where)))
            j += 1
        return out

    def _parts(self, level: str, label: str | None) -> dict:
        """make / model / year / display of a winning label at `level` (from a gallery row that has it)."""
        if label is None:
            return {}
        g = self.bundle.gallery
        rows = np.flatnonzero(g.level(level) == label)
        if len(rows) == 0:
            return {"display": label}
        r = rows[0]
        make = str(g.make[r])
        model, year = (str(g.model[r]), str(g.year[r])) if level == "class" else ("", "")
        if level == "year":
            make, year = "", str(g.year[r])
        return {
            "make": make or None,
            "model": model or None,
            "year": year or None,
            "display": display_name(make, model, year) or label,
        }

    def shortfall(self, found: int, k: int, where: Filter | None) -> str | None:
        """Why a query got fewer than k neighbours: only that many images exist (or pass the filter)."""
        if found >= k:
            return None
        if where:
            if not found:
                return f"no indexed car passes the filter ({where.describe()}): widen or clear it."
            return f"only {found} indexed {_images(found)} pass the filter (asked for {k})."
        return f"the index holds only {found} {_images(found)} (asked for {k})."

    # --- classification --------------------------------------------------------------------------------

    @property
    def openset(self) -> dict | None:
        return self.bundle.info.get("openset")

    @property
    def class_cosine(self) -> ClassCosine | None:
        """The tuned network's class weights as the unknown-model score, while they cover every labelled
        class of the index (eval/class_cosine.py; photos of a new model added live end that); else None (the
        neighbour score). Decided once per version of the index."""
        bundle = self.bundle
        if self._class_cosine[0] is not bundle:
            cc = ClassCosine.from_openset(bundle.info.get("openset"), bundle.provenance.get("weights"))
            self._class_cosine = (bundle, cc if cc is not None and cc.covers(bundle.gallery.labels) else None)
        return self._class_cosine[1]

    def classify(
        self,
        queries: Sequence[Query] | np.ndarray,
        k: int = defaults.K_VOTE,
        level: str = defaults.LEVEL,
        temperature: float = defaults.TEMPERATURE,
        reject: bool = True,
        where: Filter | None = None,
    ) -> list[Classification]:
        """Label each query by the weighted vote of its k nearest indexed images, or say "unknown".

        A query is unknown when its unknown-model score is below the calibrated threshold (search/verdict.py:
        the similarity to its openset_k-th neighbour, or with a tuned network's class weights its largest
        cosine to them); `reject=False` never says unknown. With `where`, the vote (and the neighbour
        score) runs over the neighbours that pass the filter.
        """
        level = level_name(level)  # an unknown level fails here, before any search; "model" is "class"
        labels = self.bundle.gallery.level(level)
        if temperature <= 0:
            raise CarsearchError("the temperature must be positive.")
        cal = self.openset
        openset_k = int(cal["k"]) if cal else 0
        names, errors, sims, ids, vectors = self._run(queries, max(k, openset_k), where)
        out, j = [], 0
        for name, err in zip(names, errors, strict=True):
            if err is not None:
                out.append(Classification(name, None, 0.0, [], False, None, None, level, [], err))
                continue
            rows = self.bundle.gallery.rows(ids[j])
            ranked = ranked_votes(labels, sims[j], rows, k, temperature)
            top = ranked[0] if ranked else (None, 0.0)
            v = judge(cal, self.class_cosine, vectors[j], sims[j], int((rows >= 0).sum()), top, level, reject)
            parts = self._parts(level, top[0])
            found = self.neighbors(sims[j][:k], ids[j][:k])  # the voters name the classes they voted for
            shown = {n.label: n.display for n in found} if level == "class" else {}
            shown.update({n.make: display_name(n.make, "", "") for n in found} if level == "make" else {})
            out.append(
                Classification(
                    query=name,
                    label=top[0],
                    confidence=round(top[1], 6),
                    top5=[Vote(lab, round(share, 6), shown.get(lab, lab)) for lab, share in ranked[:5]],
                    unknown=v.unknown,
                    openset_score=None if v.score is None else round(v.score, 6),
                    threshold=v.threshold,
                    level=level,
                    neighbors=found,
                    note=self.shortfall(len(found), k, where),
                    uncertain=v.uncertain,
                    reason=v.reason,
                    **parts,
                )
            )
            j += 1
        return out


def _images(n: int) -> str:
    return "image" + ("" if n == 1 else "s")
