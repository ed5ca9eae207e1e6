"""Preprocessing: geometry on the PIL image (in the loader workers), normalisation on the batch tensor.

Workers return uint8 HWC arrays; stacking them gives NHWC, whose NCHW view is already channels-last,
the memory format oneDNN and cuDNN convolutions run fastest in, at no copy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image

from carsearch import defaults

CROP_MODES = defaults.CROP_MODES
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a decoded image into the network's input; recorded in every artifact."""

    size: int  # side of the square network input
    resize: int  # `center`: the shorter side is resized to this, then the centre `size` square is cut
    crop: str = "center"  # center | squash (resize to a square) | pad (letterbox on the mean colour)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    exif_transpose: bool = True
    jpeg_draft: bool = True  # JPEGs decode at a power-of-two reduced scale that still covers `draft_size`
    flip: bool = False  # test-time flip: the embedding averages the image's and its mirror image's

    @classmethod
    def from_crop_pct(cls, size: int, crop_pct: float, **kw: object) -> Preprocessing:
        return cls(size=size, resize=math.floor(size / crop_pct), **kw)  # timm's rule

    def with_crop(self, crop: str) -> Preprocessing:
        return replace(self, crop=crop)

    def with_flip(self, flip: bool) -> Preprocessing:
        return replace(self, flip=flip)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if not self.flip:
            del d["flip"]  # artifacts made without flip read (and hash) as they did before it existed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    @property
    def draft_size(self) -> int | None:
        if not self.jpeg_draft:
            return None
        return self.resize if self.crop == "center" else self.size

    def apply(self, img: Image.Image) -> np.ndarray:
        """An RGB image -> uint8 array (size, size, 3)."""
        s, resample = self.size, _RESAMPLE[self.interpolation]
        w, h = img.size
        if self.crop == "center":
            # As torchvision's Resize(int) + CenterCrop: shorter side to `resize`, centre square cut.
            if w <= h:
                nw, nh = self.resize, int(self.resize * h / w)
            else:
                nw, nh = int(self.resize * w / h), self.resize
            img = img.resize((nw, nh), resample)
            left, top = round((nw - s) / 2.0), round((nh - s) / 2.0)
            img = img.crop((left, top, left + s, top + s))
        elif self.crop == "squash":
            img = img.resize((s, s), resample)
        elif self.crop == "pad":
            scale = s / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            fill = tuple(round(m * 255) for m in self.mean)  # normalises to 0: the padding carries no signal
            canvas = Image.new("RGB", (s, s), fill)
            canvas.paste(img.resize((nw, nh), resample), ((s - nw) // 2, (s - nh) // 2))
            img = canvas
        else:
            raise ValueError(f"unknown crop mode {self.crop!r}")
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 NHWC batch -> normalised float NCHW in channels-last memory format."""
        x = pixels.permute(0, 3, 1, 2).to(dtype)
        mean = torch.tensor([m * 255 for m in self.mean], dtype=dtype, device=x.device).view(1, 3, 1, 1)
        inv_std = torch.tensor([1 / (v * 255) for v in self.std], dtype=dtype, device=x.device).view(
            1, 3, 1, 1
        )
        return ((x - mean) * inv_std).contiguous(memory_format=torch.channels_last)
