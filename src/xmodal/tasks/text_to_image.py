"""Text -> image: what a generator trains on and how its pictures are measured.

`measure` is the one definition of generator quality (training-time evaluation, model cards,
`xmodal evaluate generator`, `benchmarks/generator.py` and `benchmarks/diffusion_grid.py`):
one image per prompt, read back by each reader (the pixel judge, or a captioner whose caption
is parsed: the cycle measure) and scored against the records' Shapes scenes, or against their
Fashion-MNIST classes (read back by a captioner: the class its caption names). `cycle` is the
one definition of a round trip text -> image -> text (`xmodal evaluate cycle`, `xmodal demo`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xmodal.data.boxes import has_boxes
from xmodal.data.collate import GenerationCollate
from xmodal.metrics.scenes import judge_reader, scene_accuracy
from xmodal.models.base import LAYOUT, GenerateOptions, supports
from xmodal.tasks.data import TrainData
from xmodal.tasks.records import class_labels, scene_specs
from xmodal.tasks.records import prompts as record_prompts
from xmodal.training.config import ConfigError
from xmodal.worlds.shapes import parse

TASK = "text-to-image"
# latent diffusion: a trained first stage; a few-step student: the diffusion model it distils
RECIPE_KEYS: dict[str, object] = {"autoencoder_path": None, "teacher": None, "init_from": None}
DATA_DEFAULTS = {"captions": "random"}  # learn every paraphrase
Reader = Callable[[Sequence[np.ndarray]], list]
# What reads generated garments back: the bundled Fashion-MNIST captioner (the class its caption names)
CLASS_READER = "fashion-captioner"


def build(name: str, values: dict, data: TrainData, seed: int, autoencoder_path: str | None = None,
          teacher: str | None = None, init_from: str | None = None):
    """A complete generator: its text encoder prepared on the training captions and, for latent
    diffusion, the trained first stage (`autoencoder_path`) with the std of its latents; or, with
    `teacher`, a student of that diffusion model (`xmodal.tasks.distillation`). With `init_from`,
    every weight of that trained generator copied in (a later stage, e.g. one that trains a part
    this config adds, with `[train] trainable`)."""
    import sys

    if teacher is not None:
        from xmodal.tasks.distillation import build_student

        return build_student(name, values, data, seed, teacher)

    from xmodal.models.registry import create_model, get_model_class
    from xmodal.tasks.text_encoders import prepare_text_encoder

    spec = values.pop("text_encoder", get_model_class(name).config_class().text_encoder)
    try:
        encoder, _ = prepare_text_encoder(spec, data.captions("random"), seed=seed,
                                          log=lambda m: print(m, file=sys.stderr),
                                          work_dir=data.work_dir / "text_encoder" if data.work_dir else None)
    except ValueError as e:
        raise ConfigError(f"[model] text_encoder: {e}") from None
    parts = {"text_encoder": encoder}
    if autoencoder_path is not None:
        from xmodal.tasks.autoencoding import latent_scale, load_autoencoder

        parts["autoencoder"] = load_autoencoder(autoencoder_path, "autoencoder_path")
        values["latent_scale"] = latent_scale(parts["autoencoder"], data.train)
    torch.manual_seed(seed)  # same initial weights on every run of this config
    try:
        model = create_model(name, **values, **parts)
    except ValueError as e:
        raise ConfigError(f"[model]: {e}") from None
    if supports(model, LAYOUT) and model.layout is not None and not has_boxes(data.train.records[:100], data.config.boxes):
        raise ConfigError(f"[model] layout: a layout stage trains on object boxes, and the training records have "
                          f"none at [data] boxes = {data.config.boxes!r}; drop the layout or point boxes at them")
    if init_from is not None:
        _init_from(model, init_from)
    return model


def _init_from(model, init_from: str) -> None:
    """Every weight of the trained generator `init_from` into `model` (`distillation.copy_weights`:
    the parts either has alone named, a weight of another shape an error), the same vocabulary."""
    from xmodal.models.hub import load_model
    from xmodal.tasks.distillation import copy_weights

    try:
        trained = load_model(init_from)
    except (ValueError, OSError) as e:
        raise ConfigError(f"[model] init_from {init_from!r}: {e}") from None
    if trained.config.text_encoder.words != model.config.text_encoder.words:  # the same ids for the same words
        raise ConfigError(f"[model] init_from {init_from!r}: its text encoder's vocabulary is not the one these "
                          f"training captions give")
    copy_weights(model, trained, f"init_from {init_from}")


def collate(model, data: TrainData):
    from xmodal.tasks import distillation

    if isinstance(data.train, distillation.Trajectories):
        return distillation.collate
    return GenerationCollate(data.config.captions, layout_slots=model.layout_slots,
                             layout_labels=model.layout_labels, boxes=data.config.boxes)


def draw(pipeline, prompts: Sequence[str], seed: int = 0, batch_size: int = 128,
         options: GenerateOptions | None = None) -> list[np.ndarray]:
    """One (H, W, 3) uint8 image per prompt; image i uses seed `seed + i`."""
    return [np.asarray(im) for im in pipeline(list(prompts), n=1, seed=seed, batch_size=batch_size,
                                              options=options)]


def score(images: Sequence[np.ndarray], records: Sequence[dict], readers: dict[str, Reader]) -> dict:
    """Each reader's reading scored as `{reader}_{metric}`: scene accuracy (and per-attribute
    rates) where the records carry Shapes scenes, class accuracy (per class, and the confusion
    matrix) where they carry Fashion-MNIST classes; empty otherwise."""
    truths = scene_specs(records)
    classes = class_labels(records) if truths is None else None
    out: dict = {}
    for name, read in readers.items():
        if truths is not None:
            out.update({f"{name}_{k}": v for k, v in scene_accuracy(truths, read(images)).items()})
        elif classes is not None:
            from xmodal.data.fashion import CLASSES
            from xmodal.metrics.classes import class_scores

            out.update({f"{name}_{k}": v for k, v in class_scores(classes, read(images), CLASSES).items()})
    return out


def default_readers(records: Sequence[dict]) -> dict[str, Reader]:
    """The pixel judge for Shapes records; the bundled Fashion-MNIST captioner for class records."""
    if scene_specs(records) is None and class_labels(records) is not None:
        from xmodal.pipelines import load_pipeline

        return {"cycle": class_reader(load_pipeline(CLASS_READER, "image-to-text"))}
    return {"judge": judge_reader}


def measure(pipeline, records: Sequence[dict], readers: dict[str, Reader] | None = None, pick: int = 0,
            seed: int = 0, batch_size: int = 128, options: GenerateOptions | None = None) -> dict:
    """Draw one image per record from its reference `pick` and score it (`score`); by default
    read by `default_readers`. Returns the metrics and the images (`"images"`)."""
    images = draw(pipeline, record_prompts(records, pick), seed, batch_size, options)
    return {**score(images, records, readers or default_readers(records)), "images": images}


def reader(captioner) -> Reader:
    """A reader from an image-to-text pipeline: caption, then parse by the Shapes grammar."""
    return lambda images: [parse(c) for c in captioner(list(images), batch_size=256)]


def class_reader(captioner) -> Reader:
    """A reader from an image-to-text pipeline: caption, then the class the caption names."""
    from xmodal.data.fashion import class_of

    return lambda images: [class_of(c) for c in captioner(list(images), batch_size=256)]


def cycle(generator, captioner, records: Sequence[dict], seed: int = 0, batch_size: int = 128,
          options: GenerateOptions | None = None) -> dict:
    """Round trips: draw each record's first reference, caption the picture, compare. Scores the
    captions against the prompts (BLEU etc.), and where the prompt's scene is known (the records'
    scenes, else the prompt parsed) `match` per round trip and scene accuracy of the parsed captions."""
    from xmodal.metrics.captions import caption_scores

    prompts = record_prompts(records)
    images = draw(generator, prompts, seed, batch_size, options)
    captions = captioner(images, batch_size=batch_size)
    metrics = {f"text_{k}": v for k, v in caption_scores(captions, [[p] for p in prompts], meteor=False).items()}
    truths = scene_specs(records) or [parse(p) for p in prompts]
    reads = [parse(c) for c in captions]
    match = [t is not None and r == t for t, r in zip(truths, reads)]
    if all(t is not None for t in truths):
        metrics.update({f"cycle_{k}": v for k, v in scene_accuracy(truths, reads).items()})
    return {**metrics, "images": images, "captions": captions, "match": match}


def image_statistics(images: Sequence[np.ndarray], real: Sequence[np.ndarray], prompts: Sequence[str], clip,
                     inception_weights: str | None = None, seed: int = 0) -> dict:
    """FID / KID against real images (features of the dual encoder `clip`, an AlignmentPipeline, or
    Inception with `inception_weights`), CLIPScore and R-precision of the images with their prompts."""
    from xmodal.metrics.images import EmbeddingFeatures, fid_kid
    from xmodal.metrics.retrieval import clip_score, r_precision

    metrics = fid_kid(list(real), list(images), EmbeddingFeatures(clip.model), inception_weights)
    image_emb, text_emb = clip.embed_images(list(images)), clip.embed_texts(list(prompts))
    metrics["clip_score"] = clip_score(image_emb, text_emb)
    if len(images) >= 100:
        metrics["r_precision"] = r_precision(image_emb, text_emb, candidates=100, seed=seed)
    return metrics


def encoder_statistics(sets: dict[str, Sequence[np.ndarray]], real: Sequence[np.ndarray], captioner) -> dict:
    """FID / KID of each image set against `real`, in the feature space of the captioner's image
    encoder (pooled features, after the captioner's own preprocessing): `{set}_fid`, `{set}_kid`."""
    from xmodal.metrics.images import EncoderFeatures, fid_kid

    def prepared(images):
        return [((captioner.transform(Image.fromarray(im)).permute(1, 2, 0).numpy() + 1) * 127.5).round()
                .clip(0, 255).astype(np.uint8) for im in images]

    extractor = EncoderFeatures(captioner.model.image_encoder)
    reals = prepared(real)
    out = {}
    for name, images in sets.items():
        metrics = fid_kid(reals, prepared(images), extractor, input_size=reals[0].shape[0])
        out.update({f"{name}_{k}": v for k, v in metrics.items()})
    return out


def layout_accuracy(model, prompts: Sequence[str], truths: Sequence, seed: int = 5000) -> dict | None:
    """Fraction of drawn layouts with the right object count, sizes (r < 9.5 px is small) and
    relation; None for a model without a layout stage."""
    from xmodal.models.layout import layout_generators

    if not supports(model, LAYOUT) or model.layout is None:
        return None
    with torch.no_grad():
        tokens, mask, _ = model.encode_text(list(prompts))
        boxes, present = model.layout.sample(model.layout.read(tokens, mask),
                                             layout_generators(range(seed, seed + len(prompts))))
    hits = {"count": 0, "size": 0, "relation": 0, "all": 0}
    for b, p, truth in zip(boxes.tolist(), present.tolist(), truths):
        count = sum(p) == len(truth.objects)
        size = count and all(("small" if b[k][2] < 9.5 else "large") == o.size for k, o in enumerate(truth.objects))
        relation = count and (len(truth.objects) != 2 or _relation_right(b, truth.relation))
        for key, ok in (("count", count), ("size", size), ("relation", relation), ("all", size and relation)):
            hits[key] += bool(ok)
    return {k: v / len(prompts) for k, v in hits.items()}


def _relation_right(boxes: list, relation: str) -> bool:
    dx, dy = boxes[1][0] - boxes[0][0], boxes[1][1] - boxes[0][1]
    return (relation == "left" and dx > 0 and abs(dx) >= abs(dy)) or (relation == "above" and dy > 0 and abs(dy) > abs(dx))


def evaluator(data: TrainData):
    """Training-time evaluation: the judge's scene accuracy on the evaluation records' first
    references (Shapes), or the class read back by `CLASS_READER` (Fashion-MNIST); None where the
    records carry neither."""
    if data.evaluation is None:
        return None
    records = data.evaluation.records
    if scene_specs(records) is None and class_labels(records) is None:
        return None
    from xmodal.pipelines import pipeline_for

    readers = default_readers(records)
    prompts = list(dict.fromkeys(r["captions"][0] for r in records))[:10]

    def evaluate(model) -> dict:
        pipe = pipeline_for(model)
        metrics = measure(pipe, records, readers)
        if data.work_dir is not None:  # what training looks like: the same prompts and seeds every time
            sample_grid(pipe, prompts, data.work_dir / "samples")
        return {k: v for k, v in metrics.items() if k != "images" and isinstance(v, float)}

    return evaluate


def sample_grid(pipe, prompts: Sequence[str], folder: Path, seeds: int = 8) -> Path:
    """A grid, one row per prompt and one column per seed (0..seeds-1), written as the next
    `eval-NNN.png` in `folder`, so that a run's grids show its training in order."""
    from xmodal.sheets import seed_grid

    folder.mkdir(parents=True, exist_ok=True)
    images = pipe.render([p for p in prompts for _ in range(seeds)], list(range(seeds)) * len(prompts))  # one batch
    rows = [(p, images[i * seeds:(i + 1) * seeds]) for i, p in enumerate(prompts)]
    number = len(list(folder.glob("eval-*.png"))) + 1
    return seed_grid(rows, folder / f"eval-{number:03d}.png")
