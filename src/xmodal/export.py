"""`xmodal export onnx MODEL OUT`: a captioner as ONNX files that run without PyTorch.

Exported to `MODEL/onnx`, the export travels with the model, and `xmodal caption` uses it by
itself (`--runtime auto`, the default) when the decoding asked for is greedy and the export
was made from these very weights (`weights_sha256`): start-up without importing torch.

A captioner is two graphs, as `xmodal.models.decoding` drives it:

- `start.onnx`: images (B, 3, H, W), preprocessed -> the decoding state (the model's
  `init_state(encode_images(images))`: for the transformer, the cross-attention keys and values
  of every layer and an empty self-attention cache; for the LSTM, the features and h, c);
- `step.onnx`: the previous words (B,) and the state -> log-probabilities of the next word (B, V)
  and the state after it (the transformer's key/value cache one position longer).

`onnx.json` names the state tensors in order, the preprocessing preset and the decoding
limits; `vocab.json` holds the words. `xmodal.runtime` decodes with onnxruntime and numpy
alone. The export checks itself: both graphs are run on Shapes images beside PyTorch and the
largest difference is written in `onnx.json` (`check`), which must be under `TOLERANCE`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from xmodal.data.text import Vocabulary

OPSET = 17
TOLERANCE = 1e-3  # largest |log-probability difference| from PyTorch over a greedy decoding, for the export to pass
FORMAT = 1


class _Start(nn.Module):
    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, images):
        state = self.model.init_state(self.model.encode_images(images))
        return tuple(state[k] for k in self.names)


class _Step(nn.Module):
    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, tokens, *state):
        log_probs, new, _ = self.model.step(dict(zip(self.names, state)), tokens)
        return (log_probs, *[new[k] for k in self.names])


def export_onnx(name_or_dir: str | Path, out: str | Path) -> dict:
    """Export a captioner (a bundled name or a model folder) to the folder `out` (made; an existing
    export there is replaced, any other non-empty folder is refused). Returns onnx.json's content."""
    from xmodal.models.hub import load_model

    model = load_model(name_or_dir).eval().requires_grad_(False)
    if model.task != "image-to-text":
        raise ValueError(f"{name_or_dir} is a {model.task} model; xmodal export onnx exports captioners")
    out = _prepare(Path(out))
    images = _sample_images(model.config.image_preset, 3)
    with torch.no_grad():
        state = model.init_state(model.encode_images(images))
    names = sorted(state)
    growing = [k for k in names if state[k].dim() == 4 and state[k].size(2) == 0]  # the self-attention cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python ints it keeps
        torch.onnx.export(_Start(model, names).eval(), (images,), out / "start.onnx", input_names=["images"],
                          output_names=names, dynamic_axes={"images": {0: "batch"}, **{k: {0: "batch"} for k in names}},
                          opset_version=OPSET, dynamo=False)
        tokens = torch.full((len(images),), Vocabulary.start_id, dtype=torch.long)
        with torch.no_grad():
            _, first, _ = model.step(state, tokens)  # a cache one position long: its length is traced as a variable
        axes = {k: {0: "batch", 2: "length"} if k in growing else {0: "batch"} for k in names}
        next_axes = {f"next_{k}": {0: "batch", 2: "next_length"} if k in growing else {0: "batch"} for k in names}
        torch.onnx.export(_Step(model, names).eval(), (tokens, *[first[k] for k in names]), out / "step.onnx",
                          input_names=["tokens", *names], output_names=["log_probs", *next_axes],
                          dynamic_axes={"tokens": {0: "batch"}, "log_probs": {0: "batch"}, **axes, **next_axes},
                          opset_version=OPSET, dynamo=False)
    (out / "vocab.json").write_text(json.dumps(model.vocab.words))
    from xmodal.models.folders import resolve_model_dir
    from xmodal.runtime import weights_digest

    meta = {"format": FORMAT, "task": "image-to-text", "source": str(name_or_dir), "model": model.registry_name,
            "preset": model.config.image_preset, "state": names, "max_len": model.config.max_len,
            "opset": OPSET, "decoding": "greedy", "weights_sha256": weights_digest(resolve_model_dir(name_or_dir))}
    meta["check"] = {"images": len(images), "max_abs_log_prob_diff": _check(model, out, images, names)}
    if meta["check"]["max_abs_log_prob_diff"] > TOLERANCE:
        raise RuntimeError(f"the ONNX graphs differ from PyTorch by {meta['check']['max_abs_log_prob_diff']:.2e} "
                           f"(tolerance {TOLERANCE}): not exported")
    (out / "onnx.json").write_text(json.dumps(meta, indent=2))
    return meta


def _prepare(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "onnx.json").is_file():
            raise ValueError(f"{out} is a folder with other files in it; give a new or empty folder")
        shutil.rmtree(out)  # an earlier export: replaced
    out.mkdir(parents=True, exist_ok=True)
    return out


def _sample_images(preset: str, count: int) -> torch.Tensor:
    """`count` Shapes pictures, preprocessed as the model's preset does."""
    from PIL import Image

    from xmodal.data.images import make_transform
    from xmodal.data.shapes import ShapesDataset

    data = ShapesDataset("test", count, seed=5)
    transform = make_transform(preset)
    return torch.stack([transform(Image.fromarray(data.item(i)[1])) for i in range(count)])


def _check(model, out: Path, images: torch.Tensor, names: list[str]) -> float:
    """The largest difference of the log-probabilities over a greedy decoding, ONNX vs PyTorch."""
    from xmodal.runtime import OnnxCaptioner

    runtime = OnnxCaptioner(out, meta={"state": names, "preset": model.config.image_preset})
    state = runtime.start(images.numpy())
    with torch.no_grad():
        reference = model.init_state(model.encode_images(images))
    tokens = torch.full((len(images),), Vocabulary.start_id, dtype=torch.long)
    worst = 0.0
    for _ in range(model.config.max_len):
        log_probs, state = runtime.step(tokens.numpy(), state)
        with torch.no_grad():
            expected, reference, _ = model.step(reference, tokens)
        worst = max(worst, float((torch.from_numpy(log_probs) - expected).abs().max()))
        tokens = expected.argmax(-1)
    return worst
