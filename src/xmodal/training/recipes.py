"""Recipes: from a TOML config to data, model, trainer and a saved, measured model folder.

The `[model]` section names a registered model (`name = "sat-captioner"`) and sets
its config fields; the model's task picks the recipe, which builds the data from
`[data]` and runs the one `Trainer` with `[train]`.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from xmodal.training.config import ConfigError, build_dataclass, load_config
from xmodal.training.loop import TrainConfig, Trainer


@dataclass
class CaptionDataConfig:
    kind: Literal["shapes", "prepared"] = "shapes"
    path: str = ""  # prepared: the data-set folder
    split: str = "train"
    eval_split: str = "val"  # prepared: records used for evaluation during training (if present)
    count: int = 20_000  # shapes: training scenes, rendered once into memory
    seed: int = 0  # shapes: base seed (image i has seed offset(split) + seed * 10^6 + i)
    size: int = 64  # shapes: image side
    eval_count: int = 300  # evaluation images (shapes: fresh `test` scenes; prepared: first of eval_split)
    captions: Literal["first", "random"] = "first"  # which reference to train on per image
    min_freq: int = 1  # vocabulary: words seen fewer times become <unk>
    max_len: int = 20  # words per training caption (longer are cut)


def _caption_data(data: CaptionDataConfig, preset: str):
    from xmodal.data.prepared import CaptionDataset, read_records
    from xmodal.data.shapes import ShapesDataset

    if data.kind == "shapes":
        train = ShapesDataset("train", data.count, data.seed, data.size, cache=True, progress=True)
        evaluation = ShapesDataset("test", data.eval_count, data.seed + 1000, data.size, cache=True)
        return train, evaluation
    if data.kind == "prepared":
        if not data.path:
            raise ConfigError("[data]: kind = 'prepared' needs path = '<prepared data-set folder>'")
        from xmodal.data.images import make_transform

        transform = make_transform(preset)
        train = CaptionDataset(data.path, data.split, transform)
        records = [r for r in read_records(data.path) if r.get("split") == data.eval_split][: data.eval_count]
        evaluation = CaptionDataset(data.path, transform=transform, records=records) if records else None
        return train, evaluation
    raise ConfigError(f"[data]: kind {data.kind!r} is not one of ('shapes', 'prepared')")


def caption_quality(model, dataset, batch_size: int = 128, beam_size: int = 1, meteor: bool = False) -> dict:
    """Exact match (when records carry Shapes scenes), BLEU-4 and CIDEr-D on a data set."""
    from xmodal.metrics.captions import caption_scores, exact_match
    from xmodal.models.decoding import DecodeOptions, decode
    from xmodal.worlds.shapes import Scene

    options = DecodeOptions(method="beam" if beam_size > 1 else "greedy", beam_size=beam_size,
                            max_len=model.config.max_len)
    candidates, references, scenes = [], [], []
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([it[0] for it in items]).to(device)
        for d, (_, captions, record) in zip(decode(model, images, options), items):
            candidates.append(model.vocab.decode(d.tokens))
            references.append(captions)
            if "scene" in record:
                scenes.append(Scene.from_dict(record["scene"]).spec)
    scores = caption_scores(candidates, references, meteor=meteor)
    result = {"bleu4": scores["bleu4"], "cider_d": scores["cider_d"]}
    if len(scenes) == len(candidates):
        result["exact_match"] = exact_match(candidates, scenes)
    return result


def _card(name: str, config_path: Path, overrides: list[str], data: CaptionDataConfig, train: TrainConfig,
          model, quality: dict, seconds: float) -> str:
    command = " ".join(["xmodal train", str(config_path), *map(shlex.quote, overrides)])
    return (
        f"# {name}\n\n"
        f"A `{model.registry_name}` ({model.num_parameters():,} parameters), task `{model.task}`.\n\n"
        f"- Data: {json.dumps(asdict(data))}\n"
        f"- Training command: `{command}`\n"
        f"- Training: {train.steps} steps, batch {train.batch_size}, {seconds / 60:.1f} minutes on "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'} ({torch.get_num_threads()} threads)\n"
        f"- Quality on the evaluation set at the end of training:\n\n"
        f"quality: {json.dumps({k: round(v, 4) for k, v in quality.items()})}\n"
    )


def _train_captioner(config: dict, config_path: Path, overrides: list[str], resume: bool, model_cls) -> dict:
    from xmodal.data.text import Vocabulary
    from xmodal.models.captioning import CaptionCollate
    from xmodal.models.registry import make_config

    data = build_dataclass(CaptionDataConfig, config.get("data", {}), "data")
    train_cfg = build_dataclass(TrainConfig, config.get("train", {}), "train")
    model_values = {k: v for k, v in config["model"].items() if k != "name"}
    preset = model_values.get("image_preset", "shapes64")
    train_set, eval_set = _caption_data(data, preset)
    records = train_set._records if hasattr(train_set, "_records") and train_set._records else train_set.records
    captions = [c for r in records for c in (r["captions"][:1] if data.captions == "first" else r["captions"])]
    vocab = Vocabulary.build(captions, min_freq=data.min_freq)
    torch.manual_seed(train_cfg.seed)  # same initial weights on every run of this config
    model = model_cls(make_config(model_cls, {**model_values, "vocab_size": len(vocab), "max_len": data.max_len}))
    model.vocab = vocab
    evaluate = (lambda m: caption_quality(m, eval_set)) if eval_set is not None else None
    trainer = Trainer(model, train_set, train_cfg, collate_fn=CaptionCollate(vocab, data.max_len, data.captions),
                      evaluate=evaluate)
    return _run(trainer, resume, evaluate, config_path, overrides, data)


def _run(trainer: Trainer, resume: bool, evaluate, config_path: Path, overrides: list[str],
         data: CaptionDataConfig) -> dict:
    """Train, then measure the exported model and write its card (main process only)."""
    _prepare_out_dir(trainer, resume)
    start = time.perf_counter()
    summary = trainer.train()
    seconds = time.perf_counter() - start
    if trainer.dist.main and evaluate is not None:
        from xmodal.models.hub import load_model

        final = load_model(summary["model_dir"])
        quality = evaluate(final)
        summary["quality"] = quality
        shown = {"judge_scene_accuracy": quality["scene_accuracy"]} if "scene_accuracy" in quality else quality
        card = _card(Path(trainer.config.out_dir).name, config_path, overrides, data, trainer.config, final,
                     shown, seconds)
        (Path(summary["model_dir"]) / "README.md").write_text(card)
    return summary


def _prepare_out_dir(trainer: Trainer, resume: bool) -> None:
    if resume:
        if trainer.resume():
            print(f"resuming from {trainer.checkpoint_path} at step {trainer.step}", file=sys.stderr)
        else:
            print(f"no checkpoint at {trainer.checkpoint_path}: starting from step 0", file=sys.stderr)
    elif trainer.checkpoint_path.exists():
        raise ConfigError(f"{trainer.checkpoint_path} exists: pass --resume to continue that run, "
                          f"or set --train.out_dir=<another folder>")


def generator_quality(model, prompts: list[str], truths: list, reader=None, seed: int = 0, batch_size: int = 128) -> dict:
    """Scene accuracy of one image per prompt, read by the pixel judge (default) or another reader."""
    import numpy as np

    from xmodal.metrics.scenes import judge_reader, scene_accuracy
    from xmodal.pipelines.text_to_image import TextToImagePipeline

    images = TextToImagePipeline(model)(prompts, n=1, seed=seed, batch_size=batch_size)
    reads = (reader or judge_reader)([np.asarray(im) for im in images])
    return scene_accuracy(truths, reads)


def retrieval_quality(model, dataset, batch_size: int = 256) -> dict:
    """Recall@1 both ways among all pairs of `dataset` (first caption of each image)."""
    from xmodal.metrics.retrieval import recall_at_k

    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    texts = [dataset[i][1][0] for i in range(len(dataset))]
    with torch.no_grad():
        image_emb = torch.cat([model.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        text_emb = torch.cat([model.encode_text(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
    return recall_at_k(image_emb @ text_emb.t(), k=1)


def _eval_prompts(data: CaptionDataConfig, eval_set) -> tuple[list[str], list]:
    from xmodal.worlds.shapes import Scene

    if data.kind != "shapes" or eval_set is None:
        return [], []
    records = [eval_set.item(i)[0] for i in range(len(eval_set))]
    return [r["captions"][0] for r in records], [Scene.from_dict(r["scene"]).spec for r in records]


def _first_stage(path: str, train_set, count: int = 1000):
    """Load a trained autoencoder and measure the std of its latents (to scale them to unit variance)."""
    import dataclasses

    autoencoder = _load_autoencoder(path, "autoencoder_path")
    images = torch.stack([train_set[i][0] for i in range(min(count, len(train_set)))])
    with torch.no_grad():
        scale = float(autoencoder.encode(images).std())
    return autoencoder, {"autoencoder": dataclasses.asdict(autoencoder.config), "latent_scale": scale}


def _load_autoencoder(path: str, key: str):
    """The trained autoencoder that `[model] key` names, or a ConfigError saying why not."""
    from xmodal.models.hub import load_model

    try:
        autoencoder = load_model(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"[model] {key} {path!r}: {err}") from err
    if autoencoder.registry_name != "autoencoder":
        raise ConfigError(f"[model] {key} {path!r} holds a {autoencoder.registry_name}, not an autoencoder")
    return autoencoder


def _init_autoencoder(model, path: str) -> None:
    """Copy a trained autoencoder's weights into `model`: the encoder always (a second stage keeps
    the latent space), the decoder where its layers have the same shapes."""
    source = _load_autoencoder(path, "init_from")
    try:
        model.encoder.load_state_dict(source.encoder.state_dict())
    except RuntimeError as err:
        raise ConfigError(f"[model] init_from {path!r}: its encoder differs from this config's "
                          f"(latent_channels and channels must match)") from err
    mine = model.decoder.state_dict()
    mine.update({k: v for k, v in source.decoder.state_dict().items() if k in mine and mine[k].shape == v.shape})
    model.decoder.load_state_dict(mine)


def _train_autoencoder(config: dict, config_path: Path, overrides: list[str], resume: bool, model_cls) -> dict:
    from xmodal.models.generation import GenerationCollate
    from xmodal.models.registry import make_config

    data = build_dataclass(CaptionDataConfig, config.get("data", {}), "data")
    train_cfg = build_dataclass(TrainConfig, config.get("train", {}), "train")
    train_set, eval_set = _caption_data(data, "shapes64")
    values = {k: v for k, v in config["model"].items() if k != "name"}
    init_from = values.pop("init_from", None)  # a trained autoencoder to start from (a second stage)
    torch.manual_seed(train_cfg.seed)
    model = model_cls(make_config(model_cls, values))
    if init_from is not None:
        _init_autoencoder(model, init_from)

    def evaluate(m):
        images = torch.stack([eval_set[i][0] for i in range(len(eval_set))])
        with torch.no_grad():
            return {"psnr": float(10 * torch.log10(4.0 / ((m.decode(m.encode(images)) - images) ** 2).mean()))}

    trainer = Trainer(model, train_set, train_cfg, collate_fn=GenerationCollate("first"),
                      evaluate=evaluate if eval_set is not None else None)
    _prepare_out_dir(trainer, resume)
    summary = trainer.train()
    if trainer.dist.main and eval_set is not None:
        from xmodal.models.hub import load_model

        summary["quality"] = evaluate(load_model(summary["model_dir"]))
    return summary


def _train_generator(config: dict, config_path: Path, overrides: list[str], resume: bool, model_cls) -> dict:
    from xmodal.models.generation import GenerationCollate
    from xmodal.models.registry import make_config
    from xmodal.models.text_encoders import prepare_text_encoder

    data = build_dataclass(CaptionDataConfig, {"captions": "random", **config.get("data", {})}, "data")
    train_cfg = build_dataclass(TrainConfig, config.get("train", {}), "train")
    model_values = {k: v for k, v in config["model"].items() if k != "name"}
    train_set, eval_set = _caption_data(data, "shapes64")
    records = train_set._records if getattr(train_set, "_records", None) else train_set.records
    captions = [c for r in records for c in r["captions"]]
    spec = model_values.pop("text_encoder", model_cls.config_class().text_encoder)
    text_encoder, spec = prepare_text_encoder(spec, captions, seed=train_cfg.seed,
                                              log=lambda m: print(m, file=sys.stderr))
    first_stage = None
    if "autoencoder_path" in model_values:  # latent diffusion: a trained first stage, frozen
        first_stage, first_values = _first_stage(model_values.pop("autoencoder_path"), train_set)
        model_values.update(first_values)
    torch.manual_seed(train_cfg.seed)
    model = model_cls(make_config(model_cls, {**model_values, "text_encoder": spec}))
    model.text_encoder.load_state_dict(text_encoder.state_dict())
    if first_stage is not None:
        model.autoencoder.load_state_dict(first_stage.state_dict())
    if hasattr(text_encoder, "tokenizer"):
        model.text_encoder.tokenizer = text_encoder.tokenizer
    prompts, truths = _eval_prompts(data, eval_set)
    if model_cls.task == "image-text-alignment":
        evaluate = (lambda m: retrieval_quality(m, eval_set)) if eval_set is not None else None
    else:
        evaluate = (lambda m: generator_quality(m, prompts, truths)) if prompts else None
    collate = GenerationCollate(data.captions, layout_slots=getattr(model, "layout_slots", 0),
                                layout_labels=getattr(model, "layout_labels", {}))
    trainer = Trainer(model, train_set, train_cfg, collate_fn=collate, evaluate=evaluate)
    return _run(trainer, resume, evaluate, config_path, overrides, data)


RECIPES = {"image-to-text": _train_captioner, "text-to-image": _train_generator,
           "image-text-alignment": _train_generator, "image-autoencoder": _train_autoencoder}


def run_training(config_path: str | Path, overrides: list[str] | None = None, resume: bool = False) -> dict:
    from xmodal.models.registry import get_model_class

    config_path = Path(config_path)
    overrides = list(overrides or [])
    config = load_config(config_path, overrides)
    if "name" not in config.get("model", {}):
        raise ConfigError(f"{config_path}: [model] needs name = '<registered model>'")
    model_cls = get_model_class(config["model"]["name"])
    recipe = RECIPES.get(model_cls.task)
    if recipe is None:
        raise ConfigError(f"no training recipe for task {model_cls.task!r}; recipes: {sorted(RECIPES)}")
    return recipe(config, config_path, overrides, resume, model_cls)
