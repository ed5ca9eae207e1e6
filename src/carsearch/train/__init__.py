"""Training: metric-learning fine-tunes whose checkpoints load through the model registry.

data (splits, balanced batches, augmentation) · losses · loop (the epoch loop both modes run) ·
state (resume, refusals) · validation (Recall@1 through the Encoder) · full (backbone + head on images) ·
head (projection head on cached embeddings).
"""

from carsearch.train.full import train_model
from carsearch.train.head import train_head
from carsearch.train.state import TrainResult

__all__ = ["TrainResult", "train_head", "train_model"]
