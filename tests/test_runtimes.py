"""Inference runtimes (embed/runtimes.py): OpenVINO's and ONNX Runtime's embeddings agree with PyTorch's
per backbone and precision on real photos; the conversion cache of each is reused, rebuilt for new weights,
refused when damaged; `auto` picks OpenVINO on the CPU; a missing runtime is one sentence naming the extra;
training's cached-prefix step runs in each, chosen by `carsearch train --runtime`."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from carsearch.embed import runtimes
from carsearch.embed.encoder import Encoder
from carsearch.embed.images import load_image
from carsearch.embed.runtimes import CONVERTERS, auto_runtime, openvino_version, resolve_runtime
from carsearch.errors import CarsearchError
from carsearch.index.settings import IndexSettings
from carsearch.models import backbone_names, load_backbone
from tests.conftest import DEV, REPO, pick

# One backbone per family runs by default (timm convolutions with real weights, torchvision, ViT);
# CARSEARCH_TEST_ALL_BACKBONES=1 runs every registered one (ViT-L converts for minutes).
FAMILIES = ("efficientnet_lite0", "resnet50", "dinov2_vits14_reg")
ALL = os.environ.get("CARSEARCH_TEST_ALL_BACKBONES") == "1"
CONVERTED = tuple(CONVERTERS)  # the runtimes that convert the torch network: openvino, onnxruntime
# (runtime, precision asked, precision it runs, plain cosine, centred cosine): ONNX Runtime runs fp32 on
# the CPU whatever is asked, so its bf16 run is held to fp32's tolerance.
RUNS = (
    ("openvino", "fp32", "fp32", 0.999, 0.999),
    ("openvino", "bf16", "bf16", 0.99, 0.95),
    ("onnxruntime", "fp32", "fp32", 0.999, 0.999),
    ("onnxruntime", "bf16", "fp32", 0.999, 0.999),
)


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
def test_runtimes_agree_with_torch(name: str, photos: list) -> None:
    if name not in FAMILIES and not ALL:
        pytest.skip("CARSEARCH_TEST_ALL_BACKBONES=1 runs every backbone")
    weights = "imagenet" if name.startswith("efficientnet") else "none"  # the weights that exist offline
    flip = name == "efficientnet_lite0"  # the mirror-image pass has its own code path in each runtime

    loaded = load_backbone(name, weights)  # built once, run by each runtime and precision

    def embed(precision: str, runtime: str, runs_at: str) -> np.ndarray:
        enc = Encoder(loaded, name, "squash", "cpu", precision, runtime=runtime)
        enc.preprocessing = enc.preprocessing.with_flip(flip)
        assert enc.runtime == runtime and enc.provenance()["runtime"] == runtime
        assert enc.precision == runs_at and enc.provenance()["precision"] == runs_at
        assert enc.provenance()["runtime_version"] == runtimes.runtime_version(runtime) != ""
        return enc.encode_images(photos)

    ref = embed("fp32", "torch", "fp32")
    for runtime, precision, runs_at, plain, centred in RUNS:
        got = embed(precision, runtime, runs_at)
        assert got.shape == ref.shape and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
        cos = (ref * got).sum(1)
        assert cos.min() >= plain, (runtime, precision, cos)
        centred_cos = _centred_cosines(ref, got)
        assert centred_cos.min() >= centred, (runtime, precision, centred_cos)


@pytest.mark.parametrize("runtime", CONVERTED)
def test_conversion_cache_reused_rebuilt_and_refused(runtime: str, tmp_path: Path, photos: list) -> None:
    """In this run's cache (conftest.py), where the lite0 test above left its conversion: one code path
    for both runtimes, each in its own folder with its own files."""
    import timm

    def load(weights: str) -> Encoder:
        return Encoder.load("efficientnet_lite0", weights, device="cpu", precision="fp32", runtime=runtime)

    def folders() -> set[Path]:
        return set((Path(os.environ["CARSEARCH_CACHE"]) / runtime).iterdir())

    enc = load("imagenet")
    first, conv, before = enc.encode_images(photos[:2]), _conversion_folder(enc), folders()
    assert conv in before and conv.parent.name == runtime
    assert sorted(p.name for p in conv.iterdir()) == sorted(["conversion.json", *CONVERTERS[runtime].files])
    model = conv / CONVERTERS[runtime].files[-1]  # the weights: model.bin, model.onnx
    stamp = model.stat().st_mtime_ns
    again = load("imagenet").encode_images(photos[:2])  # reused: not converted again, same embeddings
    assert folders() == before and model.stat().st_mtime_ns == stamp
    assert np.array_equal(first, again)
    torch.manual_seed(1)
    torch.save(timm.create_model("tf_efficientnet_lite0").state_dict(), tmp_path / "other.pth")
    other = load(str(tmp_path / "other.pth")).encode_images(photos[:2])  # new weights: a new conversion
    assert len(folders() - before) == 1 and (first * other).sum(1).max() < 0.9
    good = model.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    model.write_bytes(bytes(damaged))
    try:
        with pytest.raises(CarsearchError) as e:
            load("imagenet")
    finally:
        model.write_bytes(good)
    msg = str(e.value)
    assert f"{conv} is damaged" in msg and "delete that folder" in msg and "\n" not in msg
    assert msg.startswith(f"the {CONVERTERS[runtime].label} conversion cached in ")


def _conversion_folder(enc: Encoder) -> Path:
    key = runtimes.conversion_key(
        enc.model, enc.backbone, enc.weights.sha256, enc.dim, enc.preprocessing, enc.runtime
    )
    return runtimes.cache_folder(key)


def test_auto_picks_openvino_on_the_cpu(monkeypatch) -> None:
    monkeypatch.delenv("CARSEARCH_RUNTIME", raising=False)
    assert openvino_version(), "the default install (make venv) includes OpenVINO, which auto picks here"
    assert resolve_runtime("auto", torch.device("cpu")) == "openvino"
    assert resolve_runtime("auto", torch.device("cuda")) == "torch"
    assert auto_runtime(torch.device("cpu")) == "openvino" and auto_runtime(torch.device("cuda")) == "torch"
    assert resolve_runtime("torch", torch.device("cpu")) == "torch"
    assert resolve_runtime("onnxruntime", torch.device("cpu")) == "onnxruntime"
    monkeypatch.setenv("CARSEARCH_RUNTIME", "onnxruntime")
    assert resolve_runtime("auto", torch.device("cpu")) == "onnxruntime"
    monkeypatch.setenv("CARSEARCH_RUNTIME", "torch")
    assert resolve_runtime("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("CARSEARCH_RUNTIME", "tensorrt")
    with pytest.raises(CarsearchError, match="CARSEARCH_RUNTIME='tensorrt' is not a runtime"):
        resolve_runtime("auto", torch.device("cpu"))
    for runtime in CONVERTED:
        with pytest.raises(CarsearchError, match=f"--runtime {runtime} runs on the CPU, not cuda"):
            resolve_runtime(runtime, torch.device("cuda"))
    with pytest.raises(CarsearchError, match="unknown runtime 'onnx'"):
        resolve_runtime("onnx", torch.device("cpu"))


@pytest.mark.parametrize(
    ("runtime", "auto", "line"),
    [
        (
            "openvino",
            "torch",  # without OpenVINO, auto stays with PyTorch
            "Error: --runtime openvino needs OpenVINO, which is not installed: pip install "
            "'carsearch[openvino]' (or use --runtime torch).",
        ),
        (
            "onnxruntime",
            "openvino",  # auto never picks ONNX Runtime: its absence changes nothing
            "Error: --runtime onnxruntime needs ONNX Runtime, which is not installed: pip install "
            "'carsearch[onnxruntime]' (or use --runtime torch).",
        ),
    ],
)
def test_missing_runtime_is_one_sentence(
    runtime: str, auto: str, line: str, tmp_path: Path, small_dataset: Path
) -> None:
    """A real environment without the runtime: this venv's packages, less its, seen through links."""
    site = Path(sysconfig.get_paths()["purelib"])
    bare = tmp_path / "site"
    bare.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(runtime):
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
    env.pop("CARSEARCH_RUNTIME")  # (conftest.py pins PyTorch)
    r = subprocess.run(
        [sys.executable, "-S", "-c", script, *args, "--runtime", runtime],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    assert f"auto: {auto}" in r.stdout
    [got] = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert got == line


def test_resume_and_queries_across_runtimes(tmp_path: Path, small_dataset: Path) -> None:
    """A collection started in PyTorch and finished in OpenVINO: each shard names its runtime, the run says
    which it used, and an index over it answers OpenVINO-embedded queries with the photo itself."""
    from carsearch.embed import embed_dataset, load_embeddings, read_manifest
    from carsearch.embed.settings import EmbedJob
    from carsearch.index.build import build_index
    from carsearch.search import Searcher

    emb = tmp_path / "emb"
    kw = {"backbone": "efficientnet_lite0", "precision": "fp32", "shard_size": 12}
    first = embed_dataset(EmbedJob(small_dataset, emb, runtime="torch", limit=12, **kw), progress=False)
    rest = embed_dataset(EmbedJob(small_dataset, emb, runtime="openvino", **kw), progress=False)
    assert (first.runtime, rest.runtime, rest.resumed_shards, rest.complete) == ("torch", "openvino", 1, True)
    manifest = read_manifest(emb)
    assert [s["runtime"] for s in manifest["shards"]] == ["torch", "openvino"]
    assert manifest["provenance"]["runtime"] == "openvino"
    build_index([emb], tmp_path / "idx", IndexSettings(factory="Flat", calibrate=False))
    searcher = Searcher.open(tmp_path / "idx", device="cpu", precision="fp32", runtime="openvino")
    rows = load_embeddings(emb)
    picked = (0, 11, 12, 23)  # from both shards, so from both runtimes
    results = searcher.search([small_dataset / str(rows.paths[i]) for i in picked], k=1)
    for i, result in zip(picked, results, strict=True):
        assert result.neighbors[0].id == rows.ids[i] and result.neighbors[0].score >= 0.999
    assert searcher.encoder.runtime == "openvino"
    ort = Searcher.open(tmp_path / "idx", device="cpu", precision="fp32", runtime="onnxruntime")
    [result] = ort.search([small_dataset / str(rows.paths[12])], k=1)  # a third runtime's query
    assert result.neighbors[0].id == rows.ids[12] and result.neighbors[0].score >= 0.999
    assert ort.encoder.runtime == "onnxruntime"


def test_training_prefix_activations_agree(tmp_path: Path) -> None:
    """The cached-prefix step of training (train/activations.py) in each runtime: same activations up to
    bf16, the same images marked readable."""
    from carsearch.models.cut import cut
    from carsearch.train.activations import ActivationCache, Group, Prefix
    from carsearch.train.settings import MIRROR, PLAIN

    loaded = load_backbone("efficientnet_lite0", "imagenet")
    split = cut(loaded.model, 2)
    rows = pick([1, 50, 120], 2)
    group = Group("train", (*(r["image"] for r in rows), "images/missing.jpg"), (PLAIN, MIRROR))
    got = {}
    for runtime in ("torch", *CONVERTED):
        cache = ActivationCache(tmp_path / runtime, {"runtime test": 1})
        cache.prepare()
        prefix = Prefix(split.prefix, loaded.preprocessing, torch.device("cpu"), True, runtime=runtime)
        got[runtime] = cache.load(group, DEV, prefix, progress=False)
    a, ok_a = got["torch"]
    assert a.shape[:2] == (7, 2) and list(ok_a) == [True] * 6 + [False]
    for runtime in CONVERTED:
        b, ok_b = got[runtime]
        assert a.shape == b.shape and list(ok_a) == list(ok_b), runtime
        cos = torch.nn.functional.cosine_similarity(a[:6].float().flatten(1), b[:6].float().flatten(1), dim=1)
        assert cos.min() >= 0.99, (runtime, cos)


def test_train_runtime_reaches_the_cached_prefix(small_dataset: Path, tmp_path: Path) -> None:
    """`carsearch train --runtime onnxruntime` (a partial preset): the prefix's activations are cached by
    ONNX Runtime, and what `auto` means is as before once the command ends. `train head` has no --runtime."""
    from click.testing import CliRunner

    from carsearch.cli import cli

    args = ["train", str(small_dataset), "--out", str(tmp_path / "p"), "--epochs", "1", "--views", "0"]
    args += ["--image-size", "64", "--workers", "0", "--train-fraction", "0.8", "--device", "cpu", "--json"]
    runner = CliRunner()
    r = runner.invoke(cli, [*args, "--runtime", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert "caching train activations" in r.stderr
    assert all(ln.endswith("; ONNX Runtime)") for ln in r.stderr.splitlines() if ln.startswith("caching ")), (
        r.stderr
    )
    assert os.environ["CARSEARCH_RUNTIME"] == "torch"  # conftest.py's, restored
    head = ["train", "head", str(tmp_path), "--out", str(tmp_path / "h"), "--runtime", "openvino"]
    refused = runner.invoke(cli, head)
    assert refused.exit_code == 2 and "No such option '--runtime'" in refused.output
