"""What one `embed` run is asked to do: one frozen object that the CLI, the API and the tests pass whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carsearch import defaults
from carsearch.errors import CarsearchError


@dataclass(frozen=True)
class EmbedJob:
    """Embed every image of `data_dir` into shards under `out` (embed/job.py: `embed_dataset`).

    What the shards hold (their fingerprint; None: the setting `out` was made with when it holds an earlier
    run, else the default in embed/resume.py's SETTING_DEFAULTS): how the dataset is read (format,
    labels_file, split, bbox_crop), the network (backbone, weights, its expected weights_sha256, crop,
    flip: each image averaged with its mirror image, precision) and the shard layout (shard_size, id_start,
    max_pixels). A given setting that differs from the folder's is refused, naming it.

    How this run goes (no part of the fingerprint): batch_size images a forward pass, workers decoding
    processes (None: defaults.default_workers()), device, runtime (PyTorch, OpenVINO or ONNX Runtime:
    their embeddings agree, so a run may go on from another runtime's shards), limit (only the first
    `limit` records; a later run without it goes on from there), overwrite (start the folder again),
    retry_failed (embed again the finished shards that skipped images), verify (re-hash the images of
    finished shards and embed again those whose files changed), save_every (seconds between saves of the
    shard in progress, which is also saved when the run is interrupted).

    Raises CarsearchError for a batch or shard size under 1, a limit under 1 or a negative save_every.
    """

    data_dir: str | Path
    out: str | Path
    format: str | None = None
    labels_file: str | Path | None = None
    split: str | None = None
    bbox_crop: bool | None = None
    backbone: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    crop: str | None = None
    flip: bool | None = None
    precision: str | None = None
    shard_size: int | None = None
    id_start: int | None = None
    max_pixels: int | None = None
    batch_size: int = defaults.BATCH_SIZE
    workers: int | None = None
    device: str = defaults.DEVICE
    runtime: str = defaults.RUNTIME
    limit: int | None = None
    overwrite: bool = False
    retry_failed: bool = False
    verify: bool = False
    save_every: float = defaults.SAVE_EVERY

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.shard_size is not None and self.shard_size < 1):
            raise CarsearchError("--batch-size and --shard-size must be at least 1.")
        if self.limit is not None and self.limit < 1:
            raise CarsearchError("--limit must be at least 1.")
        if self.save_every < 0:
            raise CarsearchError("--save-every must be 0 seconds or more.")

    def given(self, names: list[str]) -> dict:
        """The fingerprinted settings `names` as given (None: not given); labels_file as an absolute path."""
        out = {name: getattr(self, name) for name in names}
        if out.get("labels_file"):
            out["labels_file"] = str(Path(out["labels_file"]).expanduser().resolve())
        return out
