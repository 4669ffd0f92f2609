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
from xmodal.tasks.records import class_labels, record_images
from xmodal.tasks.records import prompts as record_prompts

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
                       limit: int = 0, beam: int | None = None, meteor: bool = True, samples: int = 24) -> dict:
    start = time.perf_counter()
    pipe = _load(model, captioning.TASK)
    beam = pipe.options.beam_size if beam is None else beam
    records = _records(data, split, limit)
    paths = record_images(records, data)
    result = captioning.measure(pipe, records, paths, beam=beam, meteor=meteor)
    captions = result.pop("captions")
    metrics = {"model": str(model), "data": str(data), "images": len(records), "beam": beam, **result,
               "seconds": round(time.perf_counter() - start, 2)}
    shown = list(range(min(samples, len(records))))
    images = [Image.open(paths[i]).convert("RGB") for i in shown]
    labels = [[f"model: {captions[i]}", f"reference: {records[i]['captions'][0]}"] for i in shown]
    extra = _confusion_html(metrics, out, f"{model}: caption's class on {len(records)} images")
    extra += attention_html(pipe, images[:2]) + curve_html(pipe.model.source)
    return write_report(out, f"Captioner {model} on {data}", metrics, images, labels, extra)


def _confusion_html(metrics: dict, out: str | Path, title: str, key: str = "confusion") -> str:
    """The confusion matrix (when the metrics have one) as `out/confusion.png`, and its HTML."""
    if key not in metrics:
        return ""
    from xmodal.data.fashion import CLASSES
    from xmodal.metrics.classes import confusion_png
    from xmodal.sheets import png_base64

    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / "confusion.png"
    confusion_png(metrics[key], CLASSES, path, title)
    return f'<h2>Confusion matrix</h2><img src="data:image/png;base64,{png_base64(Image.open(path))}">'


def _class_prompts(records: list[dict], prompts: str) -> list[dict]:
    """Records with their first caption replaced: `canonical` keeps it; `novel` uses, per class,
    the open-vocabulary prompts (words absent from the training captions) in turn."""
    if prompts == "canonical":
        return records
    if prompts != "novel":
        raise ValueError(f"prompts {prompts!r} is not one of ('canonical', 'novel')")
    from xmodal.data.fashion import NOVEL_PROMPTS

    by_class: dict[str, list[str]] = {}
    for prompt, cls in NOVEL_PROMPTS.items():
        by_class.setdefault(cls, []).append(prompt)
    seen: dict[str, int] = {}
    out = []
    for r in records:
        k = seen[r["class"]] = seen.get(r["class"], -1) + 1
        choices = by_class[r["class"]]
        out.append({**r, "captions": [choices[k % len(choices)]]})
    return out


def _class_references(data: str | Path, train: list[dict], records: list[dict], per_class: int = 600) -> dict:
    """Two reference image sets measured like a generator: `floor`, real training images (as many
    as the test records), and `prototype`, each test record's class mean over the first
    `per_class` training images of that class (what a collapsed generator draws)."""
    floor = [np.asarray(Image.open(p).convert("RGB")) for p in record_images(train[:len(records)], data)]
    sums: dict[str, list] = {}
    for r in train:
        entry = sums.setdefault(r["class"], [np.zeros(floor[0].shape, np.float64), 0])
        if entry[1] < per_class:
            entry[0] += np.asarray(Image.open(Path(data) / r["image"]).convert("RGB"))
            entry[1] += 1
    means = {c: (total / n).round().astype(np.uint8) for c, (total, n) in sums.items()}
    references = {"floor": floor}
    if all(r["class"] in means for r in records):  # every class seen in training
        references["prototype"] = [means[r["class"]] for r in records]
    return references


def _evaluate_class_generator(pipe, model: str, data: str | Path, out: str | Path, records: list[dict],
                              captioner: str | None, seed: int, options, prompts: str, per_class: int = 8) -> dict:
    """A generator on records with classes (Fashion-MNIST): the class read back by the captioner,
    FID/KID in that captioner's feature space next to the floor and prototype references, and a
    sample grid per class."""
    from xmodal.data.fashion import CLASSES

    start = time.perf_counter()
    reader = _load(captioner or text_to_image.CLASS_READER, captioning.TASK)
    records = _class_prompts(records, prompts)
    texts = record_prompts(records)
    generated = text_to_image.draw(pipe, texts, seed, 128, options)
    real = [np.asarray(Image.open(p).convert("RGB")) for p in record_images(records, data)]
    metrics: dict = {"model": str(model), "data": str(data), "images": len(records), "prompts": prompts,
                     "reader": reader.name, "options": options.given()}
    metrics.update(text_to_image.score(generated, records, {"cycle": text_to_image.class_reader(reader)}))
    sets = {"generated": generated}
    train = [r for r in read_records(data) if r.get("split") == "train"]
    if train:  # the references need training images beside the test records
        sets.update(_class_references(data, train, records))
    metrics.update(text_to_image.encoder_statistics(sets, real, reader))
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    shown = [i for c in CLASSES for i in [k for k, r in enumerate(records) if r["class"] == c][:per_class]]
    images = [Image.fromarray(generated[i]) for i in shown]
    labels = [[f"{records[i]['class']}: {texts[i]}"] for i in shown]
    extra = _confusion_html(metrics, out, f"{model}: class read back by {reader.name}", "cycle_confusion")
    return write_report(out, f"Generator {model} on {data} ({prompts} prompts)", metrics, images, labels,
                        extra + curve_html(pipe.model.source))


def evaluate_generator(model: str, data: str | Path, out: str | Path, captioner: str | None = None,
                       clip: str = "shapes-clip", split: str | None = None, limit: int = 1000, seed: int = 0,
                       inception_weights: str | None = None, samples: int = 24,
                       options: GenerateOptions | None = None, prompts: str = "canonical") -> dict:
    """Scene accuracy and FID/KID on Shapes records; on records with classes (Fashion-MNIST)
    `_evaluate_class_generator`, with `prompts` canonical or novel."""
    from xmodal.metrics.scenes import judge_reader

    start = time.perf_counter()
    pipe = _load(model, text_to_image.TASK)
    records = _records(data, split, limit)
    options = pipe.options(options)
    if class_labels(records) is not None:
        return _evaluate_class_generator(pipe, model, data, out, records, captioner, seed, options, prompts)
    if prompts != "canonical":
        raise ValueError(f"prompts {prompts!r}: only records with Fashion-MNIST classes have other prompts; "
                         f"{data} has none")
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

