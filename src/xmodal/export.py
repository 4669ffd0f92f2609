"""`xmodal export onnx MODEL OUT`: a captioner or a generator as ONNX files that run without PyTorch.

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

A generator that draws in one pass (`DRAW`: the distilled diffusion, DF-GAN) with a word-level
text encoder (`learned`, `word2vec`) is up to four graphs, as `generate_by_draw` runs it:

- `text.onnx`: word ids (B, T) of prompts of one length -> tokens (B, T, D) and the pooled
  vector (B, D);
- `slots.onnx` (layout stage only): tokens padded to the stage's `max_len` and their mask -> its
  slots (B, K, D) and presence probabilities (B, K); with `word_labels`, also the word ids padded
  alike -> the objects' labels (B, K, keys), which `draw.onnx` then takes;
- `radius.onnx` and `centre.onnx` (layout stage only): one slot's context given the boxes placed
  so far, and the probabilities of its half-extent bins; then of its centre bins given the drawn
  half-extent (`xmodal.models.layout_draws.sample_boxes` draws from them);
- `draw.onnx`: noise, tokens, mask, pooled (and slots, boxes, presence, labels) -> pictures in [-1, 1],
  and the same as 8-bit levels (B, H, W, C), which the runtime fetches.

Prompts of different lengths are encoded apart (the LSTM's packing is not in the graph) and
padded for `draw`. The runtime draws its noise and boxes with numpy from the seed, so a seed
gives another picture than under PyTorch, from the same distribution; the check runs each graph
on the same inputs as PyTorch. Weights that float16 holds exactly (those of models saved as
float16) are stored as float16 and cast back when the graph loads: half the file, the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from xmodal.data.text import Vocabulary

OPSET = 17
TOLERANCE = 1e-3  # largest |log-probability difference| from PyTorch over a greedy decoding, for the export to pass
IMAGE_TOLERANCE = 2e-3  # largest |pixel difference| from PyTorch, in [-1, 1] (a level of 255 is 7.8e-3)
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
    if model.task == "text-to-image":
        return _export_generator(model, name_or_dir, Path(out))
    if model.task != "image-to-text":
        raise ValueError(f"{name_or_dir} is a {model.task} model; xmodal export onnx exports captioners and generators")
    if model.retrieves:
        raise ValueError(f"{name_or_dir} is a retrieval captioner: its choice between the decoded caption and the "
                         "retrieved ones is not in the ONNX graphs; caption with PyTorch")
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
    for graph in ("start.onnx", "step.onnx"):
        _fold(out / graph)
    (out / "vocab.json").write_text(json.dumps(model.vocab.words))
    meta = {**_export_meta(model, name_or_dir), "preset": model.config.image_preset, "state": names,
            "max_len": model.config.max_len, "decoding": "greedy"}
    meta["check"] = {"images": len(images), "max_abs_log_prob_diff": _check(model, out, images, names)}
    if meta["check"]["max_abs_log_prob_diff"] > TOLERANCE:
        raise RuntimeError(f"the ONNX graphs differ from PyTorch by {meta['check']['max_abs_log_prob_diff']:.2e} "
                           f"(tolerance {TOLERANCE}): not exported")
    (out / "onnx.json").write_text(json.dumps(meta, indent=2))
    return meta


def _export_meta(model, name_or_dir) -> dict:
    from xmodal.models.folders import resolve_model_dir
    from xmodal.runtime import weights_digest

    return {"format": FORMAT, "task": model.task, "source": str(name_or_dir), "model": model.registry_name,
            "opset": OPSET, "weights_sha256": weights_digest(resolve_model_dir(name_or_dir))}


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


# ----------------------------------------------------------------------------- generators


class _Text(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model.text_encoder.embed_ids(ids)


class _Slots(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.layout = layout

    def forward(self, tokens, mask, *ids):  # tokens padded to the layout's max_len: its attention's lengths are fixed
        slots = self.layout.read(tokens, mask)
        p_present = torch.sigmoid(self.layout.presence(slots).squeeze(-1))
        if not ids:
            return slots, p_present
        return slots, p_present, self.layout.predict_labels(slots, (ids[0], mask))  # word_labels: from the word ids


class _Radius(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.layout = layout

    def forward(self, slot, boxes, present):  # the boxes not placed yet are absent (present 0)
        context = self.layout.placed_context(slot, boxes, present)
        return context, self.layout.radius_probs(context)


class _Centre(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.layout = layout

    def forward(self, context, r_bin):
        return self.layout.centre_probs(context, r_bin)


class _Draw(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, noise, tokens, mask, pooled, *layout):  # slots, boxes, present (and labels with word_labels)
        labels = layout[3] if len(layout) > 3 else None  # else predicted from the slots in this graph
        sampled = (layout[0], layout[1], layout[2] > 0.5, labels) if layout else None
        images = self.model.draw(noise, tokens, mask, pooled, sampled)
        # and as 8-bit levels (B, H, W, C), rounded half to even as `to_pil` rounds: no numpy pass per batch
        levels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        return images, levels


def _export_generator(model, name_or_dir, out: Path) -> dict:
    """The graphs of a DRAW generator with a word-level text encoder (see the module's docstring)."""
    from xmodal.models.base import DRAW, supports

    if not supports(model, DRAW):
        raise ValueError(f"{name_or_dir} ({model.registry_name}) does not draw in one pass; xmodal export onnx exports "
                         f"generators that do (distilled-diffusion, dfgan): distil a diffusion model first")
    kind = model.text_encoder.spec.kind
    if kind not in ("learned", "word2vec"):
        raise ValueError(f"{name_or_dir} reads prompts with a {kind} text encoder; the ONNX export takes word-level "
                         f"encoders (learned, word2vec), whose tokenizer needs no PyTorch")
    out = _prepare(out)
    inputs = _generator_inputs(model)
    graphs = _generator_graphs(model, inputs)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the layout's fused attention kernel has no ONNX form
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python ints it keeps
            for name, (module, args, in_names, out_names, axes) in graphs.items():
                torch.onnx.export(module.eval(), args, out / f"{name}.onnx", input_names=in_names,
                                  output_names=out_names, dynamic_axes=axes, opset_version=OPSET, dynamo=False)
                _fold(out / f"{name}.onnx")
                _store_half(out / f"{name}.onnx")
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    layout = dataclasses.asdict(model.layout.config) if model.layout is not None else None
    meta = {**_export_meta(model, name_or_dir), "words": model.text_encoder.vocab.words,
            "noise_shape": list(model.noise_shape), "layout": layout, "graphs": sorted(graphs),
            "draw_rows": model.draw_rows}
    meta["check"] = _check_generator(out, meta, graphs, inputs)
    worst = max(meta["check"].values())
    if worst > IMAGE_TOLERANCE:
        raise RuntimeError(f"the ONNX graphs differ from PyTorch by {worst:.2e} (tolerance {IMAGE_TOLERANCE}): "
                           f"not exported ({meta['check']})")
    (out / "onnx.json").write_text(json.dumps(meta, indent=2))
    return meta


def _generator_inputs(model) -> dict:
    """Three prompts of five words of the model's own vocabulary, their seeds, noise and a drawn layout."""
    import random

    from xmodal.data.text import SPECIALS

    words = model.text_encoder.vocab.words[len(SPECIALS):]
    rng = random.Random(5)
    ids = torch.tensor([[model.text_encoder.vocab.index[rng.choice(words)] for _ in range(5)] for _ in range(3)])
    texts = [" ".join(model.text_encoder.vocab.words[i] for i in row) for row in ids.tolist()]
    with torch.no_grad():
        tokens, mask, pooled = model.encode_text(texts)
        layout = (model.sample_layout(tokens, mask.bool(), [0, 1, 2], words=model.layout_words(texts))
                  if model.layout is not None else None)
    noise = model.noise([0, 1, 2], model.noise_shape, "cpu")
    return {"ids": ids, "texts": texts, "tokens": tokens, "mask": mask.bool(), "pooled": pooled, "layout": layout,
            "noise": noise}


def _generator_graphs(model, x: dict) -> dict:
    """name -> (module, example inputs, input names, output names, dynamic axes)."""
    batch = {0: "batch"}
    words = {0: "batch", 1: "length"}
    graphs = {"text": (_Text(model), (x["ids"],), ["ids"], ["tokens", "pooled"],
                       {"ids": words, "tokens": words, "pooled": batch})}
    layout_in = []
    if model.layout is not None:
        t, length = x["tokens"].size(1), model.layout.config.max_len
        padded = (torch.cat([x["tokens"], x["tokens"].new_zeros(3, length - t, x["tokens"].size(2))], 1),
                  torch.cat([x["mask"], x["mask"].new_zeros(3, length - t)], 1))
        slots_in, slots_out = ["tokens", "mask"], ["slots", "p_present"]
        if model.layout.word_labels is not None:  # the labels read from the word ids, padded as the tokens
            padded += (torch.cat([x["ids"], x["ids"].new_zeros(3, length - t)], 1),)
            slots_in, slots_out = slots_in + ["ids"], slots_out + ["labels"]
        graphs["slots"] = (_Slots(model.layout), padded, slots_in, slots_out, {k: batch for k in slots_in + slots_out})
        slots, boxes, present, labels = x["layout"]
        present = present.float()
        with torch.no_grad():
            context = model.layout.placed_context(slots[:, 1], boxes, present)
        graphs["radius"] = (_Radius(model.layout), (slots[:, 1], boxes, present), ["slot", "boxes", "present"],
                            ["context", "r_probs"], {k: batch for k in ("slot", "boxes", "present", "context", "r_probs")})
        graphs["centre"] = (_Centre(model.layout), (context, torch.zeros(3, dtype=torch.long)), ["context", "r_bin"],
                            ["xy_probs"], {k: batch for k in ("context", "r_bin", "xy_probs")})
        layout_in = [slots, boxes, present] + ([labels] if model.layout.word_labels is not None else [])
    draw_in = ["noise", "tokens", "mask", "pooled"] + ["slots", "boxes", "present", "labels"][:len(layout_in)]
    graphs["draw"] = (_Draw(model), (x["noise"], x["tokens"], x["mask"], x["pooled"], *layout_in), draw_in,
                      ["images", "levels"],
                      {**{k: batch for k in draw_in}, "tokens": words, "mask": words, "images": batch, "levels": batch})
    return graphs


def _check_generator(out: Path, meta: dict, graphs: dict, x: dict) -> dict:
    """Each graph beside PyTorch on the same inputs: the largest difference of its outputs (the
    text graph against the model's own text encoder, which packs the LSTM)."""
    import numpy as np

    from xmodal.runtime import OnnxGenerator

    runtime = OnnxGenerator(out, meta=meta)
    check = {}
    with torch.no_grad():
        for name, (module, args, in_names, _, _) in graphs.items():
            expected = module(*args)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = runtime.run(name, {k: a.numpy() for k, a in zip(in_names, args)})
            pairs = [(g, e.numpy()) for g, e in zip(got, expected)]
            check[f"max_abs_diff_{name}"] = max(float(np.abs(g - e).max()) for g, e in pairs if e.dtype != np.uint8)
            for g, e in pairs:
                if e.dtype == np.uint8 and np.abs(g.astype(int) - e.astype(int)).max() > 1:
                    raise RuntimeError("the ONNX graph's 8-bit pictures differ from PyTorch's by more than one level")
        tokens, _ = runtime.run("text", {"ids": x["ids"].numpy()})[:2]
        check["max_abs_diff_text_vs_encoder"] = float(np.abs(tokens - x["tokens"].numpy()).max())
    return check


def _fold(path: Path) -> None:
    """Rewrite a graph as onnxruntime's basic optimizations leave it: constants folded, the
    tracer's shape arithmetic and redundant nodes gone. Those rewrites are the same on every
    machine and keep to standard ONNX operators (checked: a graph with any other is left as it
    was); each start-up then skips them (the default generator's draw graph: 3,550 nodes -> 1,492,
    its session made in 0.13-0.18 s instead of 0.26-0.41)."""
    import onnx
    import onnxruntime

    folded = path.with_name(path.name + ".folded")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if all(node.domain in ("", "ai.onnx") for node in onnx.load(str(folded)).graph.node):
        folded.replace(path)
    else:
        folded.unlink()


def _store_half(path: Path) -> None:
    """Store the float32 weights that float16 holds exactly (1,024 values or more) as float16, each
    cast back to float32 by a node at the graph's start (folded when onnxruntime loads it)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx.load(str(path))
    kept, casts = [], []
    for init in graph.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size >= 1024 and np.array_equal(array.astype(np.float16).astype(np.float32), array):
            kept.append(numpy_helper.from_array(array.astype(np.float16), init.name + "__half"))
            casts.append(helper.make_node("Cast", [init.name + "__half"], [init.name], to=TensorProto.FLOAT))
        else:
            kept.append(init)
    if not casts:
        return
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    nodes = casts + list(graph.graph.node)
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    onnx.save(graph, str(path))
