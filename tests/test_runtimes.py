"""Inference runtimes (embed/runtimes.py): OpenVINO's embeddings agree with PyTorch's per backbone and
precision on real photos; the conversion cache is reused, rebuilt for new weights, refused when damaged;
`auto` picks OpenVINO on the CPU; a missing OpenVINO is one sentence naming the extra."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from carsearch.embed.encoder import Encoder
from carsearch.embed.images import load_image
from carsearch.embed.runtimes import openvino_version, resolve_runtime
from carsearch.errors import CarsearchError
from carsearch.models import backbone_names, load_backbone
from tests.conftest import DEV, REPO, pick

# One backbone per family runs by default (timm convolutions with real weights, torchvision, ViT);
# CARSEARCH_TEST_ALL_BACKBONES=1 runs every registered one (ViT-L converts for minutes).
FAMILIES = ("efficientnet_lite0", "resnet50", "dinov2_vits14_reg")
ALL = os.environ.get("CARSEARCH_TEST_ALL_BACKBONES") == "1"


@pytest.fixture(scope="module")
def photos() -> list:
    return [load_image(DEV / r["image"]) for r in pick([1, 30, 80, 120, 151, 190], 1) + pick([14], 2)]


def _centred_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosines of each row's offset from the batch mean: what tells images apart. Random-weight networks
    give nearly the same vector for every photo (cosine ~0.999 between different cars), which would let
    a wrong conversion pass a plain cosine test."""
    a, b = ref - ref.mean(0), got - ref.mean(0)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("name", backbone_names())
def test_openvino_agrees_with_torch(name: str, photos: list) -> None:
    if name not in FAMILIES and not ALL:
        pytest.skip("CARSEARCH_TEST_ALL_BACKBONES=1 runs every backbone")
    weights = "imagenet" if name.startswith("efficientnet") else "none"  # the weights that exist offline
    flip = name == "efficientnet_lite0"  # the mirror-image pass has its own code path in each runtime

    loaded = load_backbone(name, weights)  # built once, run by each runtime and precision

    def embed(precision: str, runtime: str) -> np.ndarray:
        enc = Encoder(loaded, name, "squash", "cpu", precision, runtime=runtime)
        enc.preprocessing = enc.preprocessing.with_flip(flip)
        assert enc.runtime == runtime and enc.provenance()["runtime"] == runtime
        return enc.encode_images(photos)

    ref = embed("fp32", "torch")
    for precision, plain, centred in (("fp32", 0.999, 0.999), ("bf16", 0.99, 0.95)):
        got = embed(precision, "openvino")
        assert got.shape == ref.shape and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
        cos = (ref * got).sum(1)
        assert cos.min() >= plain, (precision, cos)
        assert _centred_cosines(ref, got).min() >= centred, (precision, _centred_cosines(ref, got))


def test_conversion_cache_reused_rebuilt_and_refused(tmp_path: Path, photos: list) -> None:
    """In this run's cache (conftest.py), where the lite0 test above left its conversion."""
    import timm

    def load(weights: str) -> Encoder:
        return Encoder.load("efficientnet_lite0", weights, device="cpu", precision="fp32", runtime="openvino")

    def folders() -> set[Path]:
        return set((Path(os.environ["CARSEARCH_CACHE"]) / "openvino").iterdir())

    enc = load("imagenet")
    first, conv, before = enc.encode_images(photos[:2]), _conversion_folder(enc), folders()
    assert conv in before
    assert sorted(p.name for p in conv.iterdir()) == ["conversion.json", "model.bin", "model.xml"]
    stamp = (conv / "model.bin").stat().st_mtime_ns
    again = load("imagenet").encode_images(photos[:2])  # reused: not converted again, same embeddings
    assert folders() == before and (conv / "model.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(first, again)
    torch.manual_seed(1)
    torch.save(timm.create_model("tf_efficientnet_lite0").state_dict(), tmp_path / "other.pth")
    other = load(str(tmp_path / "other.pth")).encode_images(photos[:2])  # new weights: a new conversion
    assert len(folders() - before) == 1 and (first * other).sum(1).max() < 0.9
    good = (conv / "model.bin").read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    (conv / "model.bin").write_bytes(bytes(damaged))
    try:
        with pytest.raises(CarsearchError) as e:
            load("imagenet")
    finally:
        (conv / "model.bin").write_bytes(good)
    msg = str(e.value)
    assert f"{conv} is damaged" in msg and "delete that folder" in msg and "\n" not in msg


def _conversion_folder(enc: Encoder) -> Path:
    from carsearch.embed import runtimes

    key = runtimes.conversion_key(enc.model, enc.backbone, enc.weights.sha256, enc.dim, enc.preprocessing)
    return runtimes.cache_folder(key)


def test_auto_picks_openvino_on_the_cpu(monkeypatch) -> None:
    monkeypatch.delenv("CARSEARCH_RUNTIME", raising=False)
    assert openvino_version(), "the default install (make venv) includes OpenVINO, which auto picks here"
    assert resolve_runtime("auto", torch.device("cpu")) == "openvino"
    assert resolve_runtime("auto", torch.device("cuda")) == "torch"
    assert resolve_runtime("torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv("CARSEARCH_RUNTIME", "torch")
    assert resolve_runtime("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("CARSEARCH_RUNTIME", "tensorrt")
    with pytest.raises(CarsearchError, match="CARSEARCH_RUNTIME='tensorrt' is not a runtime"):
        resolve_runtime("auto", torch.device("cpu"))
    with pytest.raises(CarsearchError, match="runs on the CPU, not cuda"):
        resolve_runtime("openvino", torch.device("cuda"))
    with pytest.raises(CarsearchError, match="unknown runtime 'onnx'"):
        resolve_runtime("onnx", torch.device("cpu"))


def test_missing_openvino_is_one_sentence(tmp_path: Path, small_dataset: Path) -> None:
    """A real environment without OpenVINO: this venv's packages, less openvino's, seen through links."""
    site = Path(sysconfig.get_paths()["purelib"])
    bare = tmp_path / "site"
    bare.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith("openvino"):
            (bare / entry.name).symlink_to(entry)
    script = (
        "import torch\n"
        "from carsearch.embed.runtimes import resolve_runtime\n"
        "print('auto:', resolve_runtime('auto', torch.device('cpu')), flush=True)\n"
        "from carsearch.cli import main\n"
        "main()\n"
    )
    args = ["embed", str(small_dataset), "--out", str(tmp_path / "emb"), "--backbone", "efficientnet_lite0"]
    env = {**os.environ, "PYTHONPATH": f"{bare}{os.pathsep}{REPO / 'src'}"}
    r = subprocess.run(
        [sys.executable, "-S", "-c", script, *args, "--runtime", "openvino"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    assert "auto: torch" in r.stdout  # without OpenVINO, auto stays with PyTorch
    [line] = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line == (
        "Error: --runtime openvino needs OpenVINO, which is not installed: pip install "
        "'carsearch[openvino]' (or use --runtime torch)."
    )


def test_resume_and_queries_across_runtimes(tmp_path: Path, small_dataset: Path) -> None:
    """A collection started in PyTorch and finished in OpenVINO: each shard names its runtime, the run says
    which it used, and an index over it answers OpenVINO-embedded queries with the photo itself."""
    from carsearch.embed import embed_dataset, load_embeddings, read_manifest
    from carsearch.index.build import build_index
    from carsearch.search import Searcher

    emb = tmp_path / "emb"
    kw = {"backbone": "efficientnet_lite0", "precision": "fp32", "shard_size": 12, "progress": False}
    first = embed_dataset(small_dataset, emb, runtime="torch", limit=12, **kw)
    rest = embed_dataset(small_dataset, emb, runtime="openvino", **kw)
    assert (first.runtime, rest.runtime, rest.resumed_shards, rest.complete) == ("torch", "openvino", 1, True)
    manifest = read_manifest(emb)
    assert [s["runtime"] for s in manifest["shards"]] == ["torch", "openvino"]
    assert manifest["provenance"]["runtime"] == "openvino"
    build_index([emb], tmp_path / "idx", factory="Flat", calibrate=False)
    searcher = Searcher.open(tmp_path / "idx", device="cpu", precision="fp32", runtime="openvino")
    rows = load_embeddings(emb)
    picked = (0, 11, 12, 23)  # from both shards, so from both runtimes
    results = searcher.search([small_dataset / str(rows.paths[i]) for i in picked], k=1)
    for i, result in zip(picked, results, strict=True):
        assert result.neighbors[0].id == rows.ids[i] and result.neighbors[0].score >= 0.999
    assert searcher.encoder.runtime == "openvino"


def test_training_prefix_activations_agree(tmp_path: Path) -> None:
    """The cached-prefix step of training (train/activations.py) in either runtime: same activations up to
    bf16, the same images marked readable."""
    from carsearch.models.cut import cut
    from carsearch.train.activations import ActivationCache, Group, Prefix
    from carsearch.train.settings import MIRROR, PLAIN

    loaded = load_backbone("efficientnet_lite0", "imagenet")
    split = cut(loaded.model, 2)
    rows = pick([1, 50, 120], 2)
    group = Group("train", (*(r["image"] for r in rows), "images/missing.jpg"), (PLAIN, MIRROR))
    got = {}
    for runtime in ("torch", "openvino"):
        cache = ActivationCache(tmp_path / runtime, {"runtime test": 1})
        cache.prepare()
        prefix = Prefix(split.prefix, loaded.preprocessing, torch.device("cpu"), True, runtime=runtime)
        got[runtime] = cache.load(group, DEV, prefix, progress=False)
    (a, ok_a), (b, ok_b) = got["torch"], got["openvino"]
    assert a.shape == b.shape and a.shape[:2] == (7, 2) and list(ok_a) == list(ok_b) == [True] * 6 + [False]
    a, b = a[:6].float().flatten(1), b[:6].float().flatten(1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cos.min() >= 0.99, cos
