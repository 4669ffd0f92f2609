"""`xmodal evaluate captioner|generator|cycle|retrieval`: one command per question, each measured by its
task's `measure` (`xmodal.tasks`) and written as `metrics.json` and `report.html` into `--out DIR`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from xmodal.data.prepared import read_records
from xmodal.models.base import GenerateOptions
from xmodal.reports import attention_html, curve_html, write_report
from xmodal.tasks import alignment, captioning, text_to_image
from xmodal.tasks.records import prompts as record_prompts
from xmodal.tasks.records import record_images

# What reads generated images back when a generator is measured: the captioner that reads real
# images best (exact match 100% test, 99.8% novel, against the LSTM's 99.5% / 90.6%).
SCENE_READER = "shapes-captioner-transformer"


def _records(data: str | Path, split: str | None, limit: int) -> list[dict]:
    records = read_records(data, split)
    return records[:limit] if limit else records


def _load(name: str, task: str):
    from xmodal.pipelines import load_pipeline

    return load_pipeline(name, task)


def evaluate_captioner(model: str, data: str | Path, out: str | Path, split: str | None = None,
                       limit: int = 0, beam: int = 3, meteor: bool = True, samples: int = 24) -> dict:
    start = time.perf_counter()
    pipe = _load(model, captioning.TASK)
    records = _records(data, split, limit)
    paths = record_images(records, data)
    result = captioning.measure(pipe, records, paths, beam=beam, meteor=meteor)
    captions = result.pop("captions")
    metrics = {"model": str(model), "data": str(data), "images": len(records), "beam": beam, **result,
               "seconds": round(time.perf_counter() - start, 2)}
    shown = list(range(min(samples, len(records))))
    images = [Image.open(paths[i]).convert("RGB") for i in shown]
    labels = [[f"model: {captions[i]}", f"reference: {records[i]['captions'][0]}"] for i in shown]
    extra = attention_html(pipe, images[:2]) + curve_html(pipe.model.source)
    return write_report(out, f"Captioner {model} on {data}", metrics, images, labels, extra)


def evaluate_generator(model: str, data: str | Path, out: str | Path, captioner: str | None = None,
                       clip: str = "shapes-clip", split: str | None = None, limit: int = 1000, seed: int = 0,
                       inception_weights: str | None = None, samples: int = 24,
                       options: GenerateOptions | None = None) -> dict:
    from xmodal.metrics.scenes import judge_reader

    start = time.perf_counter()
    pipe = _load(model, text_to_image.TASK)
    records = _records(data, split, limit)
    options = pipe.options(options)
    prompts = record_prompts(records)
    generated = text_to_image.draw(pipe, prompts, seed, 128, options)
    size = generated[0].shape[:2][::-1]
    real = [np.asarray(Image.open(p).convert("RGB").resize(size)) for p in record_images(records, data)]
    metrics: dict = {"model": str(model), "data": str(data), "images": len(records), "options": options.given()}
    metrics.update(text_to_image.image_statistics(generated, real, prompts, _load(clip, "image-text-alignment"),
                                                  inception_weights, seed))
    readers = {"cycle": text_to_image.reader(_load(captioner or SCENE_READER, captioning.TASK)), "judge": judge_reader}
    metrics.update(text_to_image.score(generated, records, readers))
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    shown = list(range(min(samples, len(records))))
    images = [Image.fromarray(generated[i]) for i in shown]
    labels = [[f"prompt: {prompts[i]}"] for i in shown]
    return write_report(out, f"Generator {model} on {data}", metrics, images, labels, curve_html(pipe.model.source))


def evaluate_cycle(generator: str, captioner: str, data: str | Path, out: str | Path, split: str | None = None,
                   limit: int = 1000, seed: int = 0, samples: int = 24, options: GenerateOptions | None = None) -> dict:
    start = time.perf_counter()
    gen, cap = _load(generator, text_to_image.TASK), _load(captioner, captioning.TASK)
    records = _records(data, split, limit)
    options = gen.options(options)
    result = text_to_image.cycle(gen, cap, records, seed, 128, options)
    images, captions = result.pop("images"), result.pop("captions")
    result.pop("match")
    metrics: dict = {"generator": str(generator), "captioner": str(captioner), "data": str(data),
                     "images": len(records), "options": options.given(), **result,
                     "seconds": round(time.perf_counter() - start, 2)}
    prompts = record_prompts(records)
    shown = list(range(min(samples, len(records))))
    labels = [[f"prompt: {prompts[i]}", f"caption: {captions[i]}"] for i in shown]
    return write_report(out, f"Cycle {generator} -> {captioner} on {data}", metrics,
                        [Image.fromarray(images[i]) for i in shown], labels)


def evaluate_retrieval(model: str, data: str | Path, out: str | Path, split: str | None = None, limit: int = 0,
                       pool: int = 100, pools: int = 5, distinct: bool = False, samples: int = 24) -> dict:
    """Recall@1 both ways among pools of `pool` (image, first caption) pairs, averaged over `pools`."""
    start = time.perf_counter()
    pipe = _load(model, alignment.TASK)
    records = _records(data, split, limit)
    paths = record_images(records, data)
    metrics = {"model": str(model), "data": str(data), "images": len(records), "pool": pool, "distinct": distinct,
               **alignment.measure_pools(pipe, records, paths, pool, pools, distinct),
               "seconds": round(time.perf_counter() - start, 2)}
    shown = alignment.pools(records, pool, 1, distinct)[0][:samples]
    texts = record_prompts([records[i] for i in shown])
    best = pipe([paths[i] for i in shown], texts).argmax(dim=1).tolist()
    images = [Image.open(paths[i]).convert("RGB") for i in shown]
    labels = [[f"caption: {texts[k]}", f"best text in the pool: {texts[b]}"] for k, b in enumerate(best)]
    return write_report(out, f"Retrieval {model} on {data}", metrics, images, labels)

