"""Backbones from files (models/file_nets.py): networks this test exports itself (a torchvision ResNet-50
with random weights and a 3036-way head, as the VMMRdb post's model; timm's EfficientNet-Lite0 with its
real ImageNet weights) to ONNX and TorchScript, and a timm state dict, embed real photos as the registry's
own networks do; declarations missing or wrong are one sentence; the file's sha256 is the provenance."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

from carsearch.cli import cli
from carsearch.embed.encoder import Encoder
from carsearch.embed.images import load_image
from carsearch.embed.runtimes import openvino_version
from carsearch.errors import CarsearchError
from carsearch.models import Loaded, get_backbone, load_backbone
from carsearch.models.registry import declare_backbone
from carsearch.models.weights import map_in_order, random_init
from tests.conftest import DEV, pick, write_csv_dataset

RESNET_TOML = """size = 224
resize = 256
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
interpolation = "bilinear"
cut_head = true
"""
# As the registry declares efficientnet_lite0 (timm's pretrained config of tf_efficientnet_lite0).
LITE_TOML = (
    'size = 224\ncrop_pct = 0.875\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\ninterpolation = "bicubic"\n'
)
LITE_DECLARE = ["size=224", "crop_pct=0.875", "mean=0.5,0.5,0.5", "std=0.5,0.5,0.5", "interpolation=bicubic"]


def _export(
    model: nn.Module, folder: Path, stem: str, kinds: tuple[str, ...] = ("onnx", "torchscript")
) -> dict:
    """`model` saved as ONNX (stem.onnx, batch dimension free) and TorchScript (stem-ts.pt)."""
    model, x, paths = model.eval(), torch.zeros(1, 3, 224, 224), {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's and the tracer's deprecation notes
        if "onnx" in kinds:
            paths["onnx"] = folder / f"{stem}.onnx"
            torch.onnx.export(
                model, (x,), str(paths["onnx"]), dynamo=False, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
        if "torchscript" in kinds:
            paths["torchscript"] = folder / f"{stem}-ts.pt"
            torch.jit.trace(model, x, check_trace=False).save(str(paths["torchscript"]))
    return paths


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Exported once per test session (a ResNet-50 export takes seconds)."""
    folder = tmp_path_factory.mktemp("file-backbones")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None, num_classes=3036)
    torch.save(resnet.state_dict(), folder / "vmmr_resnet50.pth")
    files = {"resnet50": _export(resnet, folder, "vmmr", ("onnx",))}
    # The VMMRdb post's form for TorchScript: an nn.Sequential whose last layer is the 2048 -> 3036 Linear.
    seq = nn.Sequential(*list(resnet.children())[:-1], nn.Flatten(1), resnet.fc)
    files["resnet50"] |= _export(seq, folder, "vmmr-seq", ("torchscript",))
    for path in files["resnet50"].values():
        path.with_suffix(".toml").write_text(RESNET_TOML)
    # tf_efficientnet_lite0 whole (ImageNet classifier included), with the registry's own offline weights;
    # its declaration is given on the command line.
    spec = get_backbone("efficientnet_lite0")
    lite = random_init(spec.build)
    state, _ = spec.sources[0].fetch(None)
    lite.load_state_dict(map_in_order(lite, state, "lite0"))
    files["efficientnet_lite0"] = _export(lite, folder, "lite0")
    files["efficientnet_lite0"]["timm"] = folder / "lite0_finetune.pth"  # with its declaration beside it
    torch.save(lite.state_dict(), files["efficientnet_lite0"]["timm"])
    (folder / "lite0_finetune.toml").write_text(LITE_TOML)
    files["folder"] = folder
    return files


@pytest.fixture(scope="module")
def photos() -> list:
    return [load_image(DEV / r["image"]) for r in pick([1, 80, 151, 190], 1)]


@pytest.fixture(scope="module")
def native(exported: dict, photos: list) -> dict:
    """The registry's own networks: `resnet50 --weights FILE.pth` (its fc dropped) and efficientnet_lite0
    with its ImageNet weights; their embeddings of the photos in fp32, and their preprocessing."""
    out = {}
    for name, weights in (
        ("resnet50", str(exported["folder"] / "vmmr_resnet50.pth")),
        ("efficientnet_lite0", "imagenet"),
    ):
        enc = Encoder.load(name, weights, device="cpu", precision="fp32")
        out[name] = (enc.encode_images(photos), enc.preprocessing)
    return out


def _centred_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosines of each row's offset from the batch mean (random-weight networks give every photo nearly
    the same vector, so a plain cosine would not tell a wrong cut or preprocessing apart)."""
    a, b = ref - ref.mean(0), got - ref.mean(0)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _agree(ref: np.ndarray, got: np.ndarray, precision: str) -> None:
    plain, centred = {"fp32": (0.999, 0.999), "bf16": (0.99, 0.95)}[precision]
    assert got.shape == ref.shape
    assert (ref * got).sum(1).min() >= plain, (precision, (ref * got).sum(1))
    assert _centred_cosines(ref, got).min() >= centred, (precision, _centred_cosines(ref, got))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


LITE_POINT = {"onnx": ["layer=classifier", "cut_head=true"], "torchscript": ["cut_head=true"], "timm": []}


@pytest.mark.parametrize(
    "net, kind",
    [
        ("resnet50", "onnx"),
        ("resnet50", "torchscript"),
        ("efficientnet_lite0", "onnx"),
        ("efficientnet_lite0", "torchscript"),
        ("efficientnet_lite0", "timm"),
    ],
)
def test_file_backbones_embed_as_the_registry_networks(
    net: str, kind: str, exported: dict, photos, native
) -> None:
    """ResNet-50 (random weights, 3036-way head) from ONNX / TorchScript with `cut_head = true` in the TOML
    beside = `resnet50 --weights FILE.pth`; tf_efficientnet_lite0 whole from ONNX / TorchScript declared on
    the command line, and `timm:tf_efficientnet_lite0 --weights FILE` = `efficientnet_lite0`: in fp32
    and bf16, with the file's sha256 as the weights' and the full name in the provenance."""
    ref, prep = native[net]
    path, weights = exported[net][kind], None
    if net == "resnet50":
        name = f"{kind}:{path}"
        assert get_backbone(name).name == f"{name}?cut_head=true"  # the embedding point, from the TOML
    elif kind == "timm":
        name, weights = "timm:tf_efficientnet_lite0", str(path)
    else:
        name = declare_backbone(f"{kind}:{path}", [*LITE_DECLARE, *LITE_POINT[kind]])
    enc = Encoder.load(name, weights, device="cpu", precision="fp32")
    assert enc.dim == ref.shape[1] and enc.preprocessing == prep  # declared as the registry declares it
    prov = enc.provenance()
    assert prov["backbone"] == get_backbone(name).name and prov["weights_sha256"] == _sha256(path)
    assert prov["runtime"] == ("onnxruntime" if kind == "onnx" else "torch")
    _agree(ref, enc.encode_images(photos), "fp32")
    same = Loaded(enc.model, enc.weights, enc.preprocessing, enc.dim)  # loaded once, run at each precision
    bf16 = Encoder(same, prov["backbone"], "squash", "cpu", "bf16")
    assert bf16.precision == ("fp32" if kind == "onnx" else "bf16")  # ONNX Runtime runs fp32 on the CPU
    _agree(ref, bf16.encode_images(photos), "bf16")
    if kind == "onnx" and openvino_version():
        with pytest.raises(CarsearchError, match="runs in onnxruntime, not openvino"):
            Encoder(same, prov["backbone"], "squash", "cpu", "fp32", runtime="openvino")
    if net == "efficientnet_lite0":  # queries of an index of these embeddings are embedded the same way
        again = Encoder.from_provenance(prov, device="cpu", precision="fp32")
        assert again.provenance() == prov


def test_file_backbones_cut_at_a_named_layer(exported: dict, photos) -> None:
    """The embedding point by name: the ONNX `classifier` node's input and the TorchScript `global_pool`
    layer's output are the same 1280-d features; without a cut the 1000 ImageNet logits come out."""
    onnx_path, ts_path = exported["efficientnet_lite0"]["onnx"], exported["efficientnet_lite0"]["torchscript"]
    by_input = load_backbone(
        declare_backbone(f"onnx:{onnx_path}", [*LITE_DECLARE, "layer=classifier", "cut_head=true"])
    )
    by_output = load_backbone(
        declare_backbone(f"torchscript:{ts_path}", [*LITE_DECLARE, "layer=global_pool"])
    )
    logits = load_backbone(declare_backbone(f"onnx:{onnx_path}", LITE_DECLARE))
    x = by_input.preprocessing.normalize(
        torch.from_numpy(np.stack([by_input.preprocessing.apply(p) for p in photos]))
    )
    with torch.inference_mode():
        a, b = by_input.model(x), by_output.model(x)
    assert a.shape == b.shape == (len(photos), 1280) and torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    assert logits.dim == 1000


def test_keras_style_onnx_nhwc_fixed_batch_dense_head(tmp_path: Path) -> None:
    """A Keras export's shape: NHWC input, batch fixed at 1, a dense head as MatMul + Add, softmax."""

    class KerasLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=4)
            self.w, self.b = nn.Parameter(torch.randn(8, 5)), nn.Parameter(torch.randn(5))

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x.permute(0, 3, 1, 2))).mean(dim=(2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.features(x) @ self.w + self.b, dim=1)

    torch.manual_seed(0)
    model, path = KerasLike().eval(), tmp_path / "keras.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 64, 64, 3),), str(path), dynamo=False, input_names=["in"])
    path.with_suffix(".toml").write_text(
        'size = 64\nmean = [0, 0, 0]\nstd = [1, 1, 1]\ninterpolation = "bilinear"\ncut_head = true\n'
    )
    loaded = load_backbone(f"onnx:{path}")
    x = torch.rand(3, 3, 64, 64)  # the encoder's NCHW batch
    with torch.inference_mode():
        got, want = loaded.model(x), model.features(x.permute(0, 2, 3, 1))
    assert loaded.dim == 8 and torch.allclose(got, want, atol=1e-5)


def test_missing_or_wrong_declarations_are_one_sentence(exported: dict, tmp_path: Path) -> None:
    path = exported["efficientnet_lite0"]["onnx"]
    with pytest.raises(
        CarsearchError, match=r"declares no size, mean, std, interpolation: add them to .*lite0\.toml"
    ):
        get_backbone(f"onnx:{path}")
    with pytest.raises(CarsearchError, match="declares no interpolation: add it to"):
        get_backbone(f"onnx:{path}?size=224&mean=0.5,0.5,0.5&std=0.5,0.5,0.5")
    with pytest.raises(CarsearchError, match="interpolation = 'nearest' is not bilinear or bicubic"):
        declare_backbone(f"onnx:{path}", [*LITE_DECLARE, "interpolation=nearest"])
    with pytest.raises(CarsearchError, match="unknown key 'colour'"):
        declare_backbone(f"onnx:{path}", ["colour=red"])
    with pytest.raises(CarsearchError, match=r"takes inputs of shape .*299 x 299"):
        load_backbone(declare_backbone(f"onnx:{path}", [*LITE_DECLARE[1:], "size=299"]))
    with pytest.raises(CarsearchError, match="has no layer 'head'"):
        load_backbone(
            declare_backbone(
                f"torchscript:{exported['efficientnet_lite0']['torchscript']}", [*LITE_DECLARE, "layer=head"]
            )
        )
    with pytest.raises(CarsearchError, match="takes its weights from a file: add --weights FILE"):
        load_backbone(declare_backbone("timm:tf_efficientnet_lite0", LITE_DECLARE))
    with pytest.raises(CarsearchError, match="timm has no architecture 'resnet5'"):
        get_backbone("timm:resnet5")
    with pytest.raises(CarsearchError, match="does not exist"):
        get_backbone(f"torchscript:{tmp_path / 'missing.pt'}")
    with pytest.raises(CarsearchError, match="--declare is for backbones from files"):
        declare_backbone("resnet50", ["size=224"])
    not_ts = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(1)}, not_ts)
    not_ts.with_suffix(".toml").write_text(LITE_TOML)
    with pytest.raises(CarsearchError, match=r"cannot load .* as TorchScript"):
        load_backbone(f"torchscript:{not_ts}")


def test_cli_embeds_with_a_file_backbone_and_refuses_a_changed_file(exported: dict, tmp_path: Path) -> None:
    """`carsearch embed --backbone onnx:FILE --declare ...` records the file's sha256; the same command
    after the file changed is refused naming it; `carsearch backbones` lists the file kinds."""
    data = write_csv_dataset(tmp_path / "data", pick([1, 14], 2))
    model = tmp_path / "model.onnx"
    model.write_bytes(exported["efficientnet_lite0"]["onnx"].read_bytes())
    out = tmp_path / "emb"
    declare = [x for d in [*LITE_DECLARE, "cut_head=true"] for x in ("--declare", d)]
    args = ["embed", str(data), "--out", str(out), "--backbone", f"onnx:{model}", *declare, "--device", "cpu"]
    first = CliRunner().invoke(cli, [*args, "--workers", "0", "--json"])
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"]["weights_sha256"] == _sha256(model)
    assert manifest["fingerprint"]["backbone"] == f"onnx:{model}?{'&'.join(LITE_DECLARE)}&cut_head=true"
    changed = onnx.load(str(model))
    changed.doc_string = "fine-tuned again"  # another model file, the same network shape
    onnx.save(changed, str(model))
    again = CliRunner().invoke(cli, [*args, "--workers", "0"])
    assert again.exit_code == 1 and _sha256(model)[:12] in again.stderr, again.output  # refused, naming it
    with pytest.raises(CarsearchError, match="changed since these embeddings were made"):
        Encoder.from_provenance(manifest["fingerprint"], device="cpu")  # a query of their index
    listing = CliRunner().invoke(cli, ["backbones"])
    assert all(k in listing.stdout for k in ("onnx:PATH", "torchscript:PATH", "timm:NAME"))
