"""The frozen prefix's activations, computed once per image and view and stored on disk (bf16).

A cache folder holds groups (e.g. the training images with all their views, the other images with the
plain view and its mirror). A group is written in chunks of CHUNK images, each an .npz file written to a
temporary name and renamed, so a killed run resumes at the first missing chunk and a finished chunk is
never read half-written. `cache.json` records what the activations depend on (network, weights, where it
is cut, preprocessing, augmentation, seed, the images); a run with other settings names the field that
changed and recomputes. Images that cannot be decoded are marked (`ok` false) and left out of training.

Storage: bf16 bit patterns as int16 (numpy has no bf16), shape (images, views, C, H, W).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from carsearch import SCHEMA_VERSION, defaults
from carsearch.embed import runtimes
from carsearch.embed.images import BadImage, load_image, safe_join
from carsearch.embed.reader import decoding_workers
from carsearch.errors import CarsearchError
from carsearch.fsutil import atomic_path, read_descriptor, remove_stale_tmp, write_json_atomic
from carsearch.models import Preprocessing
from carsearch.progress import Progress
from carsearch.train.data import augmentation
from carsearch.train.settings import MIRROR, PLAIN

log = logging.getLogger(__name__)

CACHE_KIND = "carsearch-activations"
CACHE_FILE = "cache.json"
CHUNK = 256  # images per chunk file: the granularity of resume
AUGMENTATION = "random-resized-crop 0.35-1, flip 0.5, colour jitter 0.3/0.3/0.3/0.03"  # train/data.py


@dataclass(frozen=True)
class Prefix:
    """The frozen part of a cut network and how it runs: input framing, device, bf16, decoding workers,
    images (times views) per forward pass, and the runtime (embed/runtimes.py: `auto` is OpenVINO on the
    CPU when installed; the activations of either agree as embeddings do, so they are no part of the key)."""

    module: torch.nn.Module
    prep: Preprocessing
    device: torch.device
    bf16: bool
    workers: int = 0
    batch_size: int = 64
    runtime: str = defaults.RUNTIME


@dataclass(frozen=True)
class Group:
    """A set of images and the views of each that the cache holds."""

    name: str
    paths: tuple[str, ...]  # relative to the dataset root
    views: tuple[str, ...]

    def fingerprint(self) -> str:
        h = hashlib.sha256("\n".join(self.paths).encode())
        h.update(("|".join(self.views)).encode())
        return h.hexdigest()


class _Views(torch.utils.data.Dataset):
    """uint8 (views, size, size, 3) per image, or None when it cannot be decoded."""

    def __init__(
        self, root: Path, paths: tuple[str, ...], views: tuple[str, ...], prep: Preprocessing, seed: int
    ):
        self.root, self.paths, self.views, self.prep, self.seed = root, paths, views, prep, seed
        self.augment = augmentation(prep)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray | None:
        try:
            img = load_image(safe_join(self.root, self.paths[i]), draft_size=self.prep.draft_size)
        except BadImage:
            return None
        plain = self.prep.apply(img)
        out = []
        for v, view in enumerate(self.views):
            if view == PLAIN:
                out.append(plain)
            elif view == MIRROR:
                out.append(plain[:, ::-1])
            else:
                out.append(self._augmented(img, v, i))
        return np.stack(out)

    def _augmented(self, img: Image.Image, view: int, i: int) -> np.ndarray:
        # Seeded by (seed, view, image path): the same pixels in every run, any worker, any order.
        key = hashlib.sha256(f"{self.seed}:{view}:{self.paths[i]}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(key[:8], "little") >> 1)
            return np.asarray(self.augment(img), dtype=np.uint8)


def _collate(items: list[np.ndarray | None]) -> list[np.ndarray | None]:
    return items


class ActivationCache:
    """The prefix activations of image groups under `folder`, for one network cut and preprocessing."""

    def __init__(self, folder: Path, key: dict) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.key = key

    def prepare(self) -> None:
        """Keep the cache if made with the same settings; otherwise say which field changed and clear it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.folder)
        path = self.folder / CACHE_FILE
        if path.is_file():
            old = read_descriptor(path, CACHE_KIND, "activation cache", "delete the folder.").get("key", {})
            changed = [k for k in sorted(set(old) | set(self.key)) if old.get(k) != self.key.get(k)]
            if not changed:
                return
            log.warning(
                "activation cache %s was made with another %s; computing it again.",
                self.folder,
                ", ".join(changed),
            )
            for f in self.folder.iterdir():
                if f.is_dir():
                    shutil.rmtree(f)
                else:
                    f.unlink()
        write_json_atomic(path, {"kind": CACHE_KIND, "schema_version": SCHEMA_VERSION, "key": self.key})

    def load(
        self, group: Group, root: Path, prefix: Prefix, progress: bool = True
    ) -> tuple[torch.Tensor, np.ndarray]:
        """(activations (n, views, C, H, W) bf16, ok (n,) bool) of a group, computing the missing chunks."""
        gdir = self.folder / group.name
        gdir.mkdir(exist_ok=True)
        remove_stale_tmp(gdir)
        meta = gdir / "group.json"
        fp = group.fingerprint()
        old = json.loads(meta.read_text()) if meta.is_file() else {"fingerprint": fp}
        if old.get("fingerprint") != fp:
            what = "views" if old.get("views") != list(group.views) else "images"
            log.warning(
                "activation cache %s: the %s of %s changed; computing it again.", gdir, what, group.name
            )
            shutil.rmtree(gdir)
            gdir.mkdir()
        write_json_atomic(meta, {"fingerprint": fp, "images": len(group.paths), "views": list(group.views)})
        chunks = [(s, min(s + CHUNK, len(group.paths))) for s in range(0, len(group.paths), CHUNK)]
        missing = [c for c in chunks if not _chunk_path(gdir, c[0]).is_file()]
        if missing:
            todo = sum(e - s for s, e in missing)
            prefix.module.eval()
            compiled = _compiled(prefix)
            log.info(
                "caching %s activations: %d images x %d views (%d of %d chunks already cached; %s)",
                group.name,
                todo,
                len(group.views),
                len(chunks) - len(missing),
                len(chunks),
                compiled.label if compiled is not None else "PyTorch",
            )
            with (
                decoding_workers("cached chunks are kept: run the same command again"),
                Progress(todo, f"cache {group.name}", "img", progress) as bar,
            ):
                for s, e in missing:
                    _write_chunk(gdir, group, (s, e), root, prefix, bar, compiled)
        parts, oks = [], []
        for s, _ in chunks:
            with np.load(_chunk_path(gdir, s)) as z:
                parts.append(torch.from_numpy(z["x"]).view(torch.bfloat16))
                oks.append(z["ok"])
        if not parts:
            return torch.zeros((0, len(group.views), 1, 1, 1), dtype=torch.bfloat16), np.zeros(0, bool)
        return torch.cat(parts), np.concatenate(oks)


def _chunk_path(gdir: Path, start: int) -> Path:
    return gdir / f"chunk-{start // CHUNK:05d}.npz"


def _compiled(prefix: Prefix) -> runtimes.CompiledNetwork | None:
    """The prefix converted for its runtime, OpenVINO or ONNX Runtime (None: PyTorch runs it). Converted
    once and cached like an encoder's network, keyed by the prefix's own weights and input."""
    runtime = runtimes.resolve_runtime(prefix.runtime, prefix.device)
    if runtime == "torch":
        return None
    precision = "bf16" if prefix.bf16 else "fp32"
    try:
        return runtimes.load_converted(
            runtime, prefix.module, "frozen prefix", None, 0, prefix.prep, precision
        )
    except runtimes.ConversionFailed as e:
        if prefix.runtime != "auto":
            raise CarsearchError(f"{e}; use CARSEARCH_RUNTIME=torch.") from None
        log.warning("%s; caching the activations with PyTorch instead.", e)
        return None


@torch.inference_mode()
def _write_chunk(
    gdir: Path,
    group: Group,
    span: tuple[int, int],
    root: Path,
    prefix: Prefix,
    bar: Progress,
    compiled: runtimes.CompiledNetwork | None = None,
) -> None:
    start, end = span
    prep, device = prefix.prep, prefix.device
    ds = _Views(root, group.paths[start:end], group.views, prep, _seed_of(gdir))
    loader = DataLoader(
        ds,
        batch_size=max(1, prefix.batch_size // len(group.views)),
        num_workers=prefix.workers,
        collate_fn=_collate,
    )
    xs, oks, shape = [], [], None
    for items in loader:
        good = [a for a in items if a is not None]
        if good:
            pixels = np.concatenate(good)  # (images * views, size, size, 3)
            if compiled is not None:
                y = torch.from_numpy(compiled.features(pixels))
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prefix.bf16):
                    y = prefix.module(prep.normalize(torch.from_numpy(pixels).to(device)))
            y = y.to(torch.bfloat16).contiguous().cpu()
            shape = y.shape[1:]
            y = y.view(len(good), len(group.views), *shape)
        it = iter(y if good else [])
        for a in items:
            oks.append(a is not None)
            xs.append(next(it) if a is not None else None)
        bar.update(len(items))
    if shape is None:  # no image of this chunk decodes: the shape comes from a blank input
        blank = torch.zeros((1, prep.size, prep.size, 3), dtype=torch.uint8)
        shape = prefix.module(prep.normalize(blank.to(device))).shape[1:]
    zero = torch.zeros((len(group.views), *shape), dtype=torch.bfloat16)
    x = torch.stack([v if v is not None else zero for v in xs]).view(torch.int16).numpy()
    with atomic_path(_chunk_path(gdir, start)) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=x, ok=np.array(oks, bool))


def _seed_of(gdir: Path) -> int:
    """The augmentation seed recorded in the cache key (the cache folder is the group's parent)."""
    key = json.loads((gdir.parent / CACHE_FILE).read_text())["key"]
    return int(key.get("seed", 0))


def cache_key(
    backbone: str,
    weights_sha256: str | None,
    trained: tuple[str, ...],
    prep: Preprocessing,
    seed: int,
    bf16: bool,
) -> dict:
    """What the activations depend on; a change of any field recomputes them."""
    if not weights_sha256:
        raise CarsearchError("partial fine-tuning needs starting weights with a known sha256.")
    return {
        "backbone": backbone,
        "weights_sha256": weights_sha256,
        "frozen_until": trained[0],
        "preprocessing": prep.to_dict(),
        "augmentation": AUGMENTATION,
        "seed": seed,
        "precision": "bf16" if bf16 else "fp32-stored-bf16",
        "format": 1,
    }
