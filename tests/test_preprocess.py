"""Crop modes and normalisation, checked against torchvision's own transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from carsearch.models import Preprocessing
from tests.conftest import DEV

PREP = Preprocessing(size=224, resize=256, interpolation="bilinear")


def _photo() -> Image.Image:
    return Image.open(DEV / "images" / "00002.jpg").convert("RGB")


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_center_matches_torchvision_resize_centercrop(interp: str) -> None:
    img = _photo()
    prep = Preprocessing(size=224, resize=256, interpolation=interp)
    mode = T.InterpolationMode.BILINEAR if interp == "bilinear" else T.InterpolationMode.BICUBIC
    ref = T.Compose([T.Resize(256, interpolation=mode), T.CenterCrop(224)])(img)
    assert np.array_equal(prep.apply(img), np.asarray(ref))


def test_squash_keeps_whole_car() -> None:
    img = _photo()
    out = PREP.with_crop("squash").apply(img)
    assert out.shape == (224, 224, 3)
    ref = np.asarray(img.resize((224, 224), Image.Resampling.BILINEAR))
    assert np.array_equal(out, ref)


def test_pad_letterboxes_with_mean_colour() -> None:
    img = _photo()  # wider than tall
    w, h = img.size
    assert w > h
    out = PREP.with_crop("pad").apply(img)
    assert out.shape == (224, 224, 3)
    fill = np.array([round(m * 255) for m in PREP.mean])
    band = (224 - round(h * 224 / w)) // 2
    assert band > 5
    assert (out[: band - 1] == fill).all() and (out[-band + 1 :] == fill).all()
    assert not (out[112] == fill).all()  # the middle row is car, not padding


def test_normalize_matches_torchvision_and_is_channels_last() -> None:
    arrays = np.stack([PREP.apply(_photo()), PREP.with_crop("squash").apply(_photo())])
    x = PREP.normalize(torch.from_numpy(arrays))
    assert x.shape == (2, 3, 224, 224)
    assert x.is_contiguous(memory_format=torch.channels_last)
    ref = T.Normalize(PREP.mean, PREP.std)(torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(x, ref, atol=1e-5)


def test_round_trip_dict() -> None:
    assert Preprocessing.from_dict(PREP.to_dict()) == PREP
    assert Preprocessing.from_crop_pct(224, 0.875).resize == 256
