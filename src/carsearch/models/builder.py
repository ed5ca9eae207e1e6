"""Building a backbone with its weights: the registry says what, this module makes it (timm's
`_builder.py`). The only place that turns a --weights choice into a network."""

from __future__ import annotations

from pathlib import Path

from carsearch.errors import CarsearchError
from carsearch.models.checkpoint import load_checkpoint
from carsearch.models.registry import Loaded, get_backbone, resolve_weights
from carsearch.models.weights import WeightsInfo, random_init, read_state_dict, strict_load


def load_backbone(name: str, weights: str | None = None, weights_sha256: str | None = None) -> Loaded:
    """Build backbone `name` with `weights`: a named choice (None: its pretrained weights), a weights file
    or a train checkpoint folder."""
    spec = get_backbone(name)
    source = resolve_weights(spec, weights)
    if source.kind == "checkpoint":
        loaded = load_checkpoint(Path(source.value), expected_backbone=name)
        if weights_sha256 and loaded.weights.sha256 != weights_sha256:
            raise CarsearchError(
                f"the checkpoint {weights} changed since these embeddings were made (sha256 "
                f"{loaded.weights.sha256[:12]}..., expected {weights_sha256[:12]}...); re-embed with it."
            )
        return loaded
    if spec.load is not None:  # a network file that carries its weights (ONNX, TorchScript)
        return spec.load(source, weights_sha256)
    model = random_init(spec.build)
    if source.kind == "file":
        path = Path(source.value)
        prep = spec.declared(source) if spec.declared else spec.file_preprocessing
        state, digest = read_state_dict(path, weights_sha256)
        info, what = WeightsInfo(str(path), digest, str(path)), str(path)
    else:
        named = spec.source(source.value)
        prep = named.preprocessing
        if named.fetch is None:
            spec.make_headless(model)
            return Loaded(model, WeightsInfo("none", None, "random init, seed 0"), prep, spec.dim)
        state, fetched = named.fetch(weights_sha256)
        info, what = WeightsInfo(named.name, fetched.sha256, fetched.source), fetched.source
    state = spec.fit_state(model, state, what)
    spec.make_headless(model)
    strict_load(model, state, what)
    return Loaded(model, info, prep, spec.dim)
