"""Captioning (image -> text): what a captioner trains on and how it is measured.

`measure` is the one definition of caption quality: training-time evaluation, model cards,
`xmodal evaluate captioner` and `benchmarks/captioner.py` all call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xmodal.data.collate import CaptionCollate
from xmodal.data.text import Vocabulary
from xmodal.metrics.captions import caption_scores, exact_match
from xmodal.tasks.data import TrainData, stored_images
from xmodal.tasks.records import class_labels, scene_specs
from xmodal.training.config import ConfigError

TASK = "image-to-text"
RECIPE_KEYS: dict[str, object] = {}  # [model] keys a recipe reads besides the model's config
DATA_DEFAULTS: dict[str, object] = {}  # [data] defaults of this task


def build(name: str, values: dict, data: TrainData, seed: int):
    """A complete captioner: its vocabulary from the training captions, `max_len` from `[data]`."""
    from xmodal.models.registry import create_model, get_model_class

    given = values.get("max_len")
    if given is not None and given != data.config.max_len:
        raise ConfigError(f"[model] max_len={given} differs from [data] max_len={data.config.max_len}: "
                          "the captioner decodes as many words as it trains on; set [data] max_len only")
    vocab = Vocabulary.build(data.captions(), min_freq=data.config.min_freq)
    torch.manual_seed(seed)  # same initial weights on every run of this config
    retrieves = get_model_class(name).retrieves
    if retrieves:
        values = {**values, "memory_size": len(data.train.records)}
    try:
        model = create_model(name, **{**values, "max_len": data.config.max_len}, vocab=vocab)
    except ValueError as e:
        raise ConfigError(f"[model]: {e}") from None
    if retrieves:
        _fill_memory(model, data)
    return model


def _fill_memory(model, data: TrainData) -> None:
    """A retrieval captioner's memory: its (copied, frozen) image encoder's features of every
    training picture, as evaluation preprocesses it, beside the picture's first caption."""
    from xmodal.models.hub import ModelLoadError, load_model
    from xmodal.pipelines import pipeline_for

    source = model.config.encoder_from
    if source is None:
        raise ConfigError("[model] retrieval-captioner needs encoder_from = '<trained captioner>': its image "
                          "encoder is frozen, so it must come trained")
    try:
        encoder = load_model(source).image_encoder.state_dict()
        model.image_encoder.load_state_dict(encoder)
    except (ModelLoadError, ValueError, RuntimeError) as e:
        raise ConfigError(f"[model] encoder_from {source!r}: {e}") from None
    keys = pipeline_for(model).image_features(stored_images(data.train))  # as the nearest-neighbour baseline sees them
    model.fill_memory(keys, [r["captions"][0] for r in data.train.records])


def collate(model, data: TrainData) -> CaptionCollate:
    rows = {r["image"]: i for i, r in enumerate(data.train.records)} if model.retrieves else None
    return CaptionCollate(model.vocab, data.config.max_len, data.config.captions, memory_rows=rows)


def measure(pipeline, records: Sequence[dict], images: Sequence, beam: int = 1, meteor: bool = False,
            batch_size: int = 128) -> dict:
    """Caption each image (greedy, or beam search with `beam` > 1) and score the captions against
    the records' references: BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR), plus exact match of the
    parsed scene when the records carry Shapes scenes, and the class the caption names (accuracy,
    per class, confusion matrix) when they carry Fashion-MNIST classes. Returns the metrics and
    the captions."""
    options = {"method": "beam" if beam > 1 else "greedy", "beam_size": beam}
    captions = pipeline(list(images), batch_size=batch_size, **options)
    return {**score(captions, records, meteor), "captions": captions}


def score(captions: Sequence[str], records: Sequence[dict], meteor: bool = False) -> dict:
    """Captions scored against the records' references (the metrics `measure` gives); also how
    baselines are scored, so that they are measured exactly as a captioner is."""
    metrics = caption_scores(captions, [r["captions"] for r in records], meteor=meteor)
    scenes = scene_specs(records)
    if scenes is not None:
        metrics["exact_match"] = exact_match(captions, scenes)
    classes = class_labels(records)
    if classes is not None:
        from xmodal.data.fashion import CLASSES, class_of
        from xmodal.metrics.classes import class_scores

        metrics.update(class_scores(classes, [class_of(c) for c in captions], CLASSES))
    return metrics


def category_baseline(train: Sequence[dict], test: Sequence[dict], field: str = "category") -> list[str]:
    """For each test record, the most common first caption of the training records of its
    category (ties: the first met); a category unseen in training gets the overall most common."""
    from collections import Counter

    by_category: dict = {}
    for r in train:
        by_category.setdefault(r.get(field), Counter())[r["captions"][0]] += 1
    overall = Counter(r["captions"][0] for r in train).most_common(1)[0][0]
    return [by_category[r.get(field)].most_common(1)[0][0] if r.get(field) in by_category else overall for r in test]


def nearest_neighbour_captions(pipeline, train_images: Sequence, train: Sequence[dict], test_images: Sequence,
                               batch_size: int = 256) -> list[str]:
    """The first caption of the most similar training image (cosine of the captioner's own pooled
    image features), per test image: the nearest-neighbour baseline of Devlin et al. 2015
    (https://arxiv.org/abs/1505.04467), with one neighbour instead of a consensus over k."""
    test_features = pipeline.image_features(list(test_images), batch_size)  # (N_test, D)
    nearest = (test_features @ pipeline.image_features(list(train_images), batch_size).t()).argmax(1)  # (N_test,)
    return [train[i]["captions"][0] for i in nearest.tolist()]


def evaluator(data: TrainData):
    """Training-time evaluation: `measure` on the evaluation set (greedy), or None without one."""
    if data.evaluation is None:
        return None
    from xmodal.pipelines import pipeline_for

    records, images = data.evaluation.records, stored_images(data.evaluation)

    def evaluate(model) -> dict:
        metrics = measure(pipeline_for(model), records, images)
        return {k: metrics[k] for k in ("bleu4", "cider_d", "exact_match", "class_accuracy") if k in metrics}

    return evaluate
