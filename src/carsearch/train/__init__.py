"""Training: metric-learning fine-tunes whose checkpoints load through the model registry.

settings (TrainSettings, presets) · data (splits, balanced batches, augmentation) · losses · loop (the
epoch loop every mode runs) · state (resume, refusals) · validation (Recall@1 through the Encoder) ·
full (backbone + head on images) · head (projection head on cached embeddings) · activations (the frozen
prefix's cached activations) · partial (the last stages on cached activations) · tuned (index build --tune).
Exports load on first use, so the CLI reads presets without importing torch.
"""

from __future__ import annotations

from carsearch.lazy import lazy_exports

_EXPORTS = {
    "train_model": "carsearch.train.full",
    "train_head": "carsearch.train.head",
    "train_partial": "carsearch.train.partial",
    "TrainResult": "carsearch.train.state",
    "TrainSettings": "carsearch.train.settings",
    "PRESETS": "carsearch.train.settings",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
