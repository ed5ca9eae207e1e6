"""The encoder with real ImageNet weights on real car photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carsearch.embed.encoder import Encoder, resolve_precision
from carsearch.embed.images import load_image
from carsearch.errors import CarsearchError
from tests.conftest import DEV, pick

CLASSES = [1, 14, 30, 50, 80, 120, 151, 190]


@pytest.fixture(scope="module")
def photos() -> tuple[list, np.ndarray]:
    rows = pick(CLASSES, 5)
    return [load_image(DEV / r["image"]) for r in rows], np.array([int(r["class_id"]) for r in rows])


def _separation(x: np.ndarray, classes: np.ndarray) -> tuple[float, float, float, float]:
    """(mean same-class cosine, mean other-class cosine, share of images whose own class is nearer on
    average, 1-NN accuracy)."""
    sim = x @ x.T
    same = classes[:, None] == classes[None, :]
    off_diag = ~np.eye(len(x), dtype=bool)
    per_image = [sim[i, same[i] & off_diag[i]].mean() > sim[i, ~same[i]].mean() for i in range(len(x))]
    nn = np.where(off_diag, sim, -np.inf).argmax(1)
    return (
        sim[same & off_diag].mean(),
        sim[~same].mean(),
        float(np.mean(per_image)),
        float(np.mean(classes[nn] == classes)),
    )


def test_same_class_is_nearer_than_other_classes(photos) -> None:
    images, classes = photos
    enc = Encoder.load("efficientnet_lite0", "imagenet", precision="fp32", device="cpu")
    x = enc.encode_images(images)
    assert x.shape == (len(images), 1280) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    intra, inter, per_image, nn1 = _separation(x, classes)
    assert intra > inter + 0.1, (intra, inter)
    # Against the same network with random weights (the oracle for "the weights carry car knowledge"):
    rand = Encoder.load("efficientnet_lite0", "none", precision="fp32", device="cpu").encode_images(images)
    _, _, per_image_rand, nn1_rand = _separation(rand, classes)
    assert per_image >= per_image_rand + 0.25, (per_image, per_image_rand)
    assert nn1 >= 0.4 and nn1 >= 3 * nn1_rand, (nn1, nn1_rand)  # chance is 4/39


def test_bf16_agrees_with_fp32(photos) -> None:
    images, _ = photos
    fp32 = Encoder.load("efficientnet_lite0", precision="fp32", device="cpu").encode_images(images[:8])
    bf16 = Encoder.load("efficientnet_lite0", precision="bf16", device="cpu").encode_images(images[:8])
    assert (np.sum(fp32 * bf16, axis=1) > 0.99).all()


def test_provenance_round_trip(photos) -> None:
    images, _ = photos
    enc = Encoder.load("efficientnet_lite0", crop="pad", precision="fp32", device="cpu")
    again = Encoder.from_provenance(enc.provenance(), device="cpu", precision="fp32")
    assert again.preprocessing == enc.preprocessing and again.weights == enc.weights
    assert np.array_equal(enc.encode_images(images[:2]), again.encode_images(images[:2]))


def test_empty_batch_and_bad_settings() -> None:
    enc = Encoder.load("efficientnet_lite0", "none", device="cpu")
    assert enc.encode(torch.zeros((0, 224, 224, 3), dtype=torch.uint8)).shape == (0, 1280)
    with pytest.raises(CarsearchError, match="unknown crop mode"):
        Encoder.load("efficientnet_lite0", "none", crop="zoom")
    with pytest.raises(CarsearchError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(CarsearchError, match="no CUDA GPU"):
            Encoder.load("efficientnet_lite0", "none", device="cuda")


def test_flip_averaging_is_symmetric_and_followed_by_queries() -> None:
    from PIL import ImageOps

    from carsearch.models import Preprocessing

    img = load_image(DEV / "images" / "00005.jpg")
    enc = Encoder.load("efficientnet_lite0", "imagenet", precision="fp32", device="cpu", flip=True)
    a, b = enc.encode_images([img, ImageOps.mirror(img)])
    assert np.abs(a - b).max() < 1e-6  # an image and its mirror image: the same embedding
    plain = Encoder.load("efficientnet_lite0", "imagenet", precision="fp32", device="cpu")
    p, q = plain.encode_images([img, ImageOps.mirror(img)])
    assert np.abs(p - q).max() > 1e-3  # without flip they differ, so the check above can fail
    prov = enc.provenance()
    assert prov["preprocessing"]["flip"] is True and "flip" not in plain.provenance()["preprocessing"]
    again = Encoder.from_provenance(prov, device="cpu", precision="fp32")
    assert again.preprocessing.flip and np.allclose(again.encode_images([img])[0], a, atol=1e-6)
    assert Preprocessing.from_dict(plain.provenance()["preprocessing"]).flip is False
