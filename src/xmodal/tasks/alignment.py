"""Image-text alignment: a dual encoder trained contrastively, measured by retrieval.

`measure` is recall@k both ways among a set of (image, text) pairs; `measure_pools` averages
it over pools of a fixed size (the field's "R@1 among 100 candidates"), optionally pools of
distinct scenes, where exactly one candidate is right. Training-time evaluation,
`xmodal evaluate retrieval` and `benchmarks/clip_retrieval.py` call these.
"""

from __future__ import annotations

from collections.abc import Sequence

from xmodal.metrics.retrieval import recall_at_k, recall_with_relevance
from xmodal.tasks.data import TrainData, stored_images
from xmodal.tasks.records import prompts as record_prompts
from xmodal.tasks.records import scene_specs
from xmodal.tasks.text_to_image import build as _build_with_text_encoder

TASK = "image-text-alignment"
RECIPE_KEYS: dict[str, object] = {"init_from": None}  # a trained dual encoder to continue from (fine-tuning)
DATA_DEFAULTS = {"captions": "random"}


def build(name: str, values: dict, data: TrainData, seed: int, init_from: str | None = None):
    """A complete dual encoder: its text tower prepared on the training captions (as a generator's);
    with `init_from`, every weight copied from that trained dual encoder (same shapes), so that a
    recipe can tune it further (e.g. unfreeze a pretrained text tower)."""
    from xmodal.training.config import ConfigError

    model = _build_with_text_encoder(name, values, data, seed)
    if init_from is not None:
        from xmodal.models.hub import load_model

        source = load_model(init_from)
        try:
            model.load_state_dict(source.state_dict())
        except RuntimeError as err:
            raise ConfigError(f"[model] init_from {init_from!r}: its weights do not fit this config "
                              f"({str(err).splitlines()[0]})") from None
    return model


def collate(model, data: TrainData):
    """-> {"images", "texts"}: one of each image's captions (`[data] captions`)."""
    from xmodal.data.collate import GenerationCollate

    return GenerationCollate(data.config.captions)


def measure(pipeline, records: Sequence[dict], images: Sequence, k: int = 1) -> dict:
    """Recall@k both ways among all (image, first reference) pairs: pair i matches pair i."""
    return recall_at_k(pipeline(list(images), record_prompts(records)), k=k)


def measure_collection(pipeline, records: Sequence[dict], images: Sequence, ks: tuple[int, ...] = (1, 10),
                       queries: Sequence[str] | None = None) -> dict:
    """Text -> image search over a whole collection: each query (default: every distinct first
    caption) ranks all the images, and a hit is any image whose first caption equals the query
    (a collection such as OpenClipart holds many drawings per title). Recall@k with chance."""
    import torch

    captions = record_prompts(records)
    queries = list(dict.fromkeys(captions)) if queries is None else list(queries)
    scores = pipeline.embed_texts(queries) @ pipeline.embed_images(list(images)).t()  # (Q, N)
    relevant = torch.tensor([[c == q for c in captions] for q in queries])
    return {**recall_with_relevance(scores.float().cpu(), relevant, ks), "queries": len(queries), "pool": len(captions)}


def pool_keys(records: Sequence[dict]) -> list:
    """What makes two pairs the same answer: their Shapes scene, else their first reference."""
    return scene_specs(records) or record_prompts(records)


def pools(records: Sequence[dict], size: int, count: int, distinct: bool, keys: list | None = None) -> list[list[int]]:
    """Up to `count` pools of `size` record indices: consecutive records, or (`distinct`) records
    whose keys (`pool_keys`) differ within the pool, a repeat skipped."""
    keys = keys if keys is not None else pool_keys(records)
    out, pool, seen = [], [], set()
    for i, key in enumerate(keys):
        if distinct and key in seen:
            continue
        pool.append(i)
        seen.add(key)
        if len(pool) == size:
            out.append(pool)
            pool, seen = [], set()
            if len(out) == count:
                break
    return out


def measure_pools(pipeline, records: Sequence[dict], images: Sequence, size: int = 100, count: int = 5,
                  distinct: bool = False, k: int = 1) -> dict:
    """`measure` averaged over `pools`; `ceiling` is the best recall@1 any model can reach there
    (the mean over queries of 1 / copies of its scene in the pool: below 1 where scenes repeat)."""
    keys = pool_keys(records)
    groups = pools(records, size, count, distinct, keys)
    if not groups:
        raise ValueError(f"{len(records)} records make no pool of {size}")
    scores = [measure(pipeline, [records[i] for i in idx], [images[i] for i in idx], k) for idx in groups]
    ceilings = [sum(1 / sum(keys[j] == keys[i] for j in idx) for i in idx) / len(idx) for idx in groups]
    result = {name: sum(s[name] for s in scores) / len(scores) for name in scores[0]}
    return {**result, "ceiling": sum(ceilings) / len(ceilings), "pools": len(groups)}


def evaluator(data: TrainData):
    if data.evaluation is None:
        return None
    from xmodal.pipelines import pipeline_for

    records, images = data.evaluation.records, stored_images(data.evaluation)
    return lambda model: measure(pipeline_for(model), records, images)
