"""The networks behind `onnx:` and `torchscript:` backbones (models/file_nets.py declares them): an ONNX
graph run by ONNX Runtime, a TorchScript module, each cut where the declaration takes the embedding.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carsearch.errors import CarsearchError
from carsearch.models.preprocess import Preprocessing

_ONNX_INSTALL = "pip install 'carsearch[onnx]'"
_ONNX_TAIL_OPS = ("Softmax", "LogSoftmax", "Sigmoid", "Identity", "Reshape", "Flatten", "Squeeze", "Cast")


def probe_dim(model: nn.Module, prep: Preprocessing, name: str) -> int:
    """The embedding size, from one blank image (which also shows a wrong embedding point now)."""
    with torch.inference_mode():
        y = model.eval()(torch.zeros(1, 3, prep.size, prep.size))
    if y.ndim != 2 or y.shape[0] != 1:
        raise CarsearchError(f"{name} gives embeddings of shape {tuple(y.shape)}, not (n, d).")
    return int(y.shape[1])


def _features(y: torch.Tensor, what: str, channels_last: bool = False) -> torch.Tensor:
    """(n, d) features from an output: feature maps are averaged over space, unit dimensions dropped."""
    if y.ndim == 4:
        return y.float().mean(dim=(1, 2) if channels_last else (2, 3))
    if y.ndim > 2 and all(s == 1 for s in y.shape[2:]):
        return y.reshape(y.shape[0], -1)
    if y.ndim != 2:
        raise CarsearchError(
            f"{what} has shape {tuple(y.shape)}: declare an output or layer of shape (n, d) or (n, c, h, w)."
        )
    return y


# --- ONNX --------------------------------------------------------------------------------------------


class OnnxNet(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU, fp32, behind the nn.Module interface the encoder
    uses: normalised NCHW in, (n, d) features out. It has no parameters and cannot be traced or trained."""

    runtime = "onnxruntime"

    def __init__(self, session: Any, tensor: str, layout: str, fixed_batch: bool, what: str) -> None:
        super().__init__()
        self.session, self.tensor, self.layout, self.fixed_batch, self.what = (
            session,
            tensor,
            layout,
            fixed_batch,
            what,
        )
        self.input = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("an ONNX backbone runs in ONNX Runtime; it is not converted")
        a = x.detach().float().cpu()
        if self.layout == "nhwc":
            a = a.permute(0, 2, 3, 1)
        a = np.ascontiguousarray(a.numpy())
        chunks = [a[i : i + 1] for i in range(len(a))] if self.fixed_batch else [a]
        y = np.concatenate([self.session.run([self.tensor], {self.input: c})[0] for c in chunks])
        return _features(torch.from_numpy(y), self.what, self.layout == "nhwc").to(x.device)


def onnx_net(path: Path, declared: dict[str, Any]) -> OnnxNet:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise CarsearchError(f"ONNX backbones need onnx and ONNX Runtime: {_ONNX_INSTALL}.") from None
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's decode errors: not an ONNX file
        raise CarsearchError(f"cannot read {path} as an ONNX model ({type(e).__name__}: {e}).") from None
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise CarsearchError(f"{path} has {len(inputs)} inputs; an image backbone takes one.")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    layout = "nhwc" if len(dims) == 4 and dims[3] == 3 and dims[1] != 3 else "nchw"
    spatial = dims[1:3] if layout == "nhwc" else dims[2:4]
    size = declared["size"]
    if len(dims) != 4 or any(s not in (None, size) for s in spatial):
        raise CarsearchError(
            f"{path} takes inputs of shape {[d or '?' for d in dims]}, not {size} x {size} images: declare "
            "the size it was made for."
        )
    tensor = _onnx_tensor(graph, declared, path, weights)
    if tensor not in [o.name for o in graph.output]:
        graph.output.append(onnx.ValueInfoProto(name=tensor))  # an inner tensor, fetched as an output
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: not the optimiser's notes
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return OnnxNet(session, tensor, layout, dims[0] == 1, f"{path}'s {tensor!r}")


def _onnx_tensor(graph: Any, declared: dict[str, Any], path: Path, weights: set[str]) -> str:
    """The name of the tensor the embedding is taken from."""
    outputs = [o.name for o in graph.output]
    produced = {o: n for n in graph.node for o in n.output}
    if "output" in declared:
        name = declared["output"]
        if name not in produced and name not in outputs:
            raise CarsearchError(
                f"{path} has no tensor named {name!r}; its outputs are {', '.join(outputs)}."
            )
        return name
    if "layer" in declared:
        layer = declared["layer"]
        nodes = [n for n in graph.node if n.name == layer or f"/{layer}/" in f"/{n.name}/"]
        if not nodes:
            raise CarsearchError(
                f"{path} has no node named {layer!r} (nor nodes under /{layer}/); name one of its nodes, "
                "or declare output = NAME."
            )
        if not declared.get("cut_head"):
            return nodes[-1].output[0]
        inside = {o for n in nodes for o in n.output}
        return next(i for n in nodes for i in n.input if i and i not in weights and i not in inside)
    if len(outputs) != 1:
        raise CarsearchError(
            f"{path} has outputs {', '.join(outputs)}: declare which is the embedding (output = NAME)."
        )
    if not declared.get("cut_head"):
        return outputs[0]
    node = produced.get(outputs[0])
    while node is not None and node.op_type in _ONNX_TAIL_OPS:
        node = produced.get(node.input[0])
    if node is not None and node.op_type == "Add":  # MatMul + Add: a dense layer (Keras, TensorFlow)
        node = next((produced[i] for i in node.input if i in produced), None)
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise CarsearchError(
            f"cannot find the final classifier of {path} (its output comes from "
            f"{node.op_type if node is not None else 'no'} node): declare layer = NAME of the classifier "
            "with cut_head = true, or output = NAME of the tensor to take."
        )
    return next(i for i in node.input if i not in weights)


# --- TorchScript -------------------------------------------------------------------------------------


class TorchScriptNet(nn.Module):
    """A TorchScript network, cut where declared, with its output as (n, d) features."""

    def __init__(self, net: nn.Module, output: str | None, what: str) -> None:
        super().__init__()
        self.net, self.output, self.what = net, output, what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if self.output is not None:
            if isinstance(y, dict) and self.output in y:
                y = y[self.output]
            elif isinstance(y, list | tuple) and self.output.isdigit() and int(self.output) < len(y):
                y = y[int(self.output)]
            else:
                raise CarsearchError(
                    f"{self.what} has no output {self.output!r} (it returns {type(y).__name__})."
                )
        return _features(y, self.what)


def torchscript_net(path: Path, declared: dict[str, Any]) -> TorchScriptNet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "TorchScript is deprecated"
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # not a TorchScript archive (a state dict, a pickle, a damaged zip)
            raise CarsearchError(
                f"cannot load {path} as TorchScript ({type(e).__name__}); a state dict goes with "
                "--backbone timm:NAME --weights FILE or a registered backbone."
            ) from None
    layer = declared.get("layer")
    if layer is None and declared.get("cut_head"):
        linears = [n for n, m in net.named_modules() if n and getattr(m, "original_name", "") == "Linear"]
        if not linears:
            raise CarsearchError(f"{path} has no Linear layer to cut: declare layer = NAME or output = NAME.")
        layer = linears[-1]
    if layer is not None:
        _cut(net, layer, bool(declared.get("cut_head")), path)
    return TorchScriptNet(net, declared.get("output"), str(path))


def _cut(net: Any, layer: str, cut_head: bool, path: Path) -> None:
    """Rewrite the graphs that call `layer`: with `cut_head` the layer becomes the identity (its input
    goes where its output went), else each module on the way up returns what `layer` returned."""
    modules = dict(net.named_modules())  # (ScriptModules have no get_submodule)
    if layer not in modules:
        names = [n for n in modules if n]
        raise CarsearchError(f"{path} has no layer {layer!r}; its last layers are {', '.join(names[-5:])}.")
    parts = layer.split(".")
    for depth in range(len(parts), 0, -1):
        parent = modules[".".join(parts[: depth - 1])]
        if _type_shared(net, parent):
            raise CarsearchError(
                f"cannot cut {path} at {layer!r}: the module that calls it shares its code with others "
                "(save a traced network, or declare output = NAME)."
            )
        graph = parent.graph
        node = _call_site(graph, parts[depth - 1], path, layer)
        if cut_head:
            node.output().replaceAllUsesWith(node.inputsAt(1))
            node.destroy()
            torch._C._jit_pass_dce(graph)
            return
        ret = graph.return_node()
        if ret.inputsAt(0).type().kind() != "TensorType":
            raise CarsearchError(
                f"cannot take the output of {layer!r} from {path}: a module on the way returns more than a "
                "tensor; declare output = NAME."
            )
        ret.replaceInput(0, node.output())
        torch._C._jit_pass_dce(graph)


def _type_shared(net: Any, module: Any) -> bool:
    name = module._c._type().qualified_name()
    return sum(m._c._type().qualified_name() == name for m in net.modules()) > 1


def _call_site(graph: Any, attr: str, path: Path, layer: str) -> Any:
    this = next(graph.inputs()).unique()
    calls = [
        n
        for n in graph.nodes()
        if n.kind() == "prim::CallMethod"
        and n.s("name") == "forward"
        and n.inputsAt(0).node().kind() == "prim::GetAttr"
        and n.inputsAt(0).node().s("name") == attr
        and n.inputsAt(0).node().inputsAt(0).unique() == this
    ]
    if len(calls) != 1:
        raise CarsearchError(
            f"cannot cut {path} at {layer!r}: its parent calls it {len(calls)} times (a frozen or inlined "
            "TorchScript file?); declare output = NAME, or save the network without freezing it."
        )
    return calls[0]


# --- timm --------------------------------------------------------------------------------------------
