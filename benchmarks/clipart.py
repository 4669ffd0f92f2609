"""OpenClipart benchmarks (issue: real words): import, search, captions, text -> image.

    python benchmarks/clipart.py import [--source /usr/share/openclipart/svg] [--out /tmp/clipart-bench]
    python benchmarks/clipart.py clip [--models clipart-clip runs/clipart-clip-learned/best] [--data data/openclipart]
    python benchmarks/clipart.py captioner [--model clipart-captioner] [--beam N] [--data data/openclipart]
    python benchmarks/clipart.py generator --model M [--clip clipart-clip] [--data data/openclipart]
    python benchmarks/clipart.py sheet [--out out/clipart-results.png]     (the README's results sheet)

`import`: the whole package rendered at 64 px with both cores: SVGs, share rendered, failures
by reason, seconds.

`clip`: text -> image search over the test split (every test drawing in the pool). Queries are
the distinct first captions of the test drawings; a hit is any drawing whose first caption
equals the query (`alignment.measure_collection`), with the chance level of a random ranking.
`rare` is the same over the test titles holding a word found in fewer than 3 training titles
(where a pretrained text tower should beat one learned on the titles). Also the index: seconds
to build it, and milliseconds per query answered from it.

Every number printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import xmodal
from xmodal.data.prepared import CaptionDataset
from xmodal.data.text import tokenize
from xmodal.tasks import alignment
from xmodal.tasks.data import stored_images


def bench_import(args) -> dict:
    from xmodal.data.openclipart import import_openclipart

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    stats = import_openclipart(out, args.source, size=64, workers=args.workers, progress=False)
    drawings = stats["svgs"] - stats["problems"].get("holds no drawing (no shape element in the file)", 0)
    return {**stats, "rendered_of_files_with_a_drawing": round(stats["written"] / drawings, 4)}


def rare_queries(data: Path) -> list[str]:
    """Distinct test titles with a word that fewer than 3 training titles use."""
    train = CaptionDataset(data, "train").records
    frequency = Counter(w for r in train if r.get("caption_source") == "title"
                        for w in set(tokenize(r["captions"][0])))
    test = CaptionDataset(data, "test").records
    titles = dict.fromkeys(r["captions"][0] for r in test if r.get("caption_source") == "title")
    return [t for t in titles if any(frequency[w] < 3 for w in tokenize(t) if w.isalpha())]


def bench_clip(args) -> dict:
    from xmodal.search import load_index, query

    data = Path(args.data)
    test = CaptionDataset(data, "test")
    images = stored_images(test)
    rare = rare_queries(data)
    result: dict = {"data": str(data), "test_drawings": len(test), "rare_queries": len(rare), "models": {}}
    for model in args.models:
        pipe = xmodal.load(model)
        entry = {k: round(v, 4) if isinstance(v, float) else v
                 for k, v in alignment.measure_collection(pipe, test.records, images).items()}
        entry["rare"] = {k: round(v, 4) if isinstance(v, float) else v
                         for k, v in alignment.measure_collection(pipe, test.records, images, queries=rare).items()}
        result["models"][model] = entry
    if args.no_index:
        return result
    model = args.models[0]
    with tempfile.TemporaryDirectory() as tmp:  # the index of the whole collection, built and queried
        copy = Path(tmp) / "data"
        shutil.copytree(data, copy, symlinks=True)
        start = time.perf_counter()
        index, pipe = load_index(model, copy)
        built = time.perf_counter() - start
        queries = [r["captions"][0] for r in test.records[:100]]
        start = time.perf_counter()
        for q in queries:
            query(index, pipe, copy, text=q, top=10)
        per_query = (time.perf_counter() - start) / len(queries)
        start = time.perf_counter()
        load_index(model, copy, pipe=pipe)
        reload = time.perf_counter() - start
    result["index"] = {"model": model, "images": len(index.paths), "captions": len(index.captions),
                       "build_s": round(built, 2), "reload_s": round(reload, 3), "query_ms": round(1000 * per_query, 2)}
    return result


def bench_captioner(args) -> dict:
    from xmodal.tasks import captioning

    data = Path(args.data)
    train, test = CaptionDataset(data, "train"), CaptionDataset(data, "test")
    pipe = xmodal.load(args.model)
    args.beam = args.beam or pipe.options.beam_size  # the model's own decoding unless told
    start = time.perf_counter()
    measured = captioning.measure(pipe, test.records, stored_images(test), beam=args.beam, meteor=True)
    seconds = time.perf_counter() - start
    captions = measured.pop("captions")
    rows = {"captioner": measured,
            "category_most_common_title": captioning.score(
                captioning.category_baseline(train.records, test.records), test.records, meteor=True),
            "nearest_neighbour_title": captioning.score(captioning.nearest_neighbour_captions(
                pipe, stored_images(train), train.records, stored_images(test)), test.records, meteor=True)}
    keep = ("cider_d", "bleu4", "meteor", "rouge_l")
    result = {"model": args.model, "beam": args.beam, "test_drawings": len(test),
              **{name: {k: round(v, 4) for k, v in m.items() if k in keep} for name, m in rows.items()},
              "captions_per_s": round(len(test) / seconds, 1),
              "examples": [{"reference": r["captions"][0], "caption": c} for r, c in zip(test.records[:12], captions)]}
    return result


def bench_generator(args) -> dict:
    import numpy as np

    from xmodal.data.images import load_image
    from xmodal.tasks import text_to_image

    data = Path(args.data)
    test = CaptionDataset(data, "test")
    first = {}
    for i, r in enumerate(test.records):  # one drawing per distinct caption: R-precision needs distinct texts
        first.setdefault(r["captions"][0], i)
    prompts = list(first)
    real = [np.asarray(load_image(path)) for path in stored_images(test)]
    pipe, clip = xmodal.load(args.model), xmodal.load(args.clip)
    start = time.perf_counter()
    images = text_to_image.draw(pipe, prompts, seed=0)
    seconds = time.perf_counter() - start
    stats = text_to_image.image_statistics(images, real, prompts, clip)
    floor = text_to_image.image_statistics([real[i] for i in first.values()], real, prompts, clip)
    result = {"model": args.model, "clip": args.clip, "prompts": len(prompts),
              **{k: round(v, 4) for k, v in stats.items()}, "images_per_s": round(len(prompts) / seconds, 1),
              "real_drawings": {k: round(v, 4) for k, v in floor.items()}}
    if args.grid:
        from PIL import Image

        from xmodal.sheets import picture_sheet

        picked = prompts[:: max(1, len(prompts) // 16)][:16]
        drawn = text_to_image.draw(pipe, picked, seed=0)
        picture_sheet([Image.fromarray(im) for im in drawn], [[p] for p in picked], args.grid, columns=8, scale=2)
        result["grid"] = args.grid
    return result


def results_sheet(args) -> dict:
    """One picture sheet: the top 5 drawings for a few text queries (clipart-clip, from the index),
    then test drawings with their human title and what clipart-captioner writes."""
    from xmodal.data.images import load_image
    from xmodal.search import open_index, query
    from xmodal.sheets import picture_sheet

    data = Path(args.data)
    index, pipe = open_index(args.clip, data)
    images, labels = [], []
    for text in args.queries:
        for rank, hit in enumerate(query(index, pipe, data, text=text, top=5)):
            images.append(load_image(hit["image"]))
            labels.append(([f"search: {text}"] if rank == 0 else [""]) + [f"{rank + 1}. {hit.get('caption', '')}"])
    test = CaptionDataset(data, "test")
    picked = list(range(0, len(test), max(1, len(test) // args.drawings)))[: args.drawings]
    captioner = xmodal.load(args.captioner)
    paths = [test.image(i) for i in picked]
    written = captioner(paths)  # the model's own decoding
    for i, path, caption in zip(picked, paths, written):
        images.append(load_image(path))
        labels.append([f"title: {test.records[i]['captions'][0]}", f"says: {caption}"])
    picture_sheet(images, labels, args.out, columns=5, scale=2)
    return {"sheet": args.out, "queries": args.queries, "drawings": len(picked)}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    imp = sub.add_parser("import")
    imp.add_argument("--source", default="/usr/share/openclipart/svg")
    imp.add_argument("--out", default="/tmp/clipart-bench")
    imp.add_argument("--workers", type=int, default=2)
    clip = sub.add_parser("clip")
    clip.add_argument("--models", nargs="+", default=["clipart-clip"])
    clip.add_argument("--data", default="data/openclipart")
    clip.add_argument("--no-index", action="store_true", help="skip timing the index (build and queries)")
    cap = sub.add_parser("captioner")
    cap.add_argument("--model", default="clipart-captioner")
    cap.add_argument("--data", default="data/openclipart")
    cap.add_argument("--beam", type=int, help="beam size (default: the model's own decoding)")
    gen = sub.add_parser("generator")
    gen.add_argument("--model", required=True)
    gen.add_argument("--clip", default="clipart-clip")
    gen.add_argument("--data", default="data/openclipart")
    gen.add_argument("--grid", help="also draw 16 test prompts into this PNG")
    sheet = sub.add_parser("sheet")
    sheet.add_argument("--out", default="out/clipart-results.png")
    sheet.add_argument("--data", default="data/openclipart")
    sheet.add_argument("--clip", default="clipart-clip")
    sheet.add_argument("--captioner", default="clipart-captioner")
    sheet.add_argument("--queries", nargs="+", default=["a red apple", "an airplane", "a house", "a smiling face"])
    sheet.add_argument("--drawings", type=int, default=10)
    args = parser.parse_args()
    run = {"sheet": results_sheet, "import": bench_import, "clip": bench_clip, "captioner": bench_captioner, "generator": bench_generator}[args.what]
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
