"""The `xmodal` command line: a thin shell that parses, calls the library, and prints.

Each subcommand is a `_cmd_*` function set on its parser with `set_defaults(func=...)`; the
work happens in pipelines, tasks and the data package.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import warnings
from pathlib import Path

DEFAULT_GENERATOR = "shapes-diffusion-fast"  # 2 UNet passes; its 20-pass teacher is "shapes-diffusion"
DEFAULT_CAPTIONER = "shapes-captioner-transformer"  # the most accurate; the LSTM is "shapes-captioner"
DEMO_PROMPTS = [
    "a large red circle",
    "a small blue square above a large yellow triangle",
    "there is a large green cross to the left of a small purple diamond",
    "a small orange circle is below a large blue cross",
    "the image shows a small yellow diamond",
    "a large purple square to the right of a small red triangle",
    "a large green triangle",  # a colour-shape pair never seen in training (WORLD.md's novel split)
    "a small purple circle above a large orange square",  # two unseen pairs
]


def _load(name: str, task: str):
    from xmodal.pipelines import load_pipeline

    return load_pipeline(name, task)


def _options(args: argparse.Namespace):
    from xmodal.models.base import GenerateOptions

    return GenerateOptions(steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                           negative=args.negative).check()


class _NoBar:
    """The progress bar where none is shown: tqdm is not imported for it (30-90 ms of start-up)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, unit: str, quiet: bool = False):
    """A tqdm bar on a terminal's stderr, unless `quiet`; elsewhere one that shows nothing."""
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def _cmd_data(args: argparse.Namespace) -> int:
    if args.source == "shapes":
        from xmodal.data.shapes import write_shapes

        stats = write_shapes(args.out, args.split, args.count, args.seed, args.size, progress=not args.quiet,
                             overwrite=args.overwrite)
        print(json.dumps({"out": str(args.out), "split": args.split, **{k: round(v, 3) for k, v in stats.items()}}))
        return 0
    if args.source == "fashion-mnist":
        return _import_fashion(args)
    if args.source == "openclipart":
        return _import_openclipart(args)
    from xmodal.data import importers as imp
    from xmodal.data.prepared import ImportReport

    report = ImportReport(args.source)
    readers = {"coco": lambda: imp.coco_items(args.source_file, args.images, report, args.split),
               "karpathy": lambda: imp.karpathy_items(args.source_file, args.images, report),
               "flickr": lambda: imp.flickr_items(args.source_file, args.images, report, args.split),
               "folder": lambda: imp.folder_items(args.source_file, args.images, report)}
    items = readers[args.source]()
    try:
        imp.write_items(items, args.out, report, mode=args.mode, total=len(items), images=args.images,
                        overwrite=args.overwrite, follow_symlinks=args.follow_symlinks, sources=(args.source_file,))
    except imp.NothingImportedError as e:
        print(f"xmodal data {args.source}: {e}", file=sys.stderr)
        return 1
    print(report.summary(), file=sys.stderr)
    print(json.dumps({"out": str(args.out), "written": report.written,
                      "problems": {k: v["count"] for k, v in report.problems.items()}}))
    return 0


def _import_fashion(args: argparse.Namespace) -> int:
    from xmodal.data.fashion import IdxFormatError, import_fashion_mnist

    try:
        stats = import_fashion_mnist(args.out, args.source_dir, args.split, args.format, args.shard_size,
                                     overwrite=args.overwrite, progress=not args.quiet)
    except IdxFormatError as e:
        print(f"xmodal data fashion-mnist: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


def _import_openclipart(args: argparse.Namespace) -> int:
    from xmodal.data.importers import NothingImportedError
    from xmodal.data.openclipart import import_openclipart

    try:
        stats = import_openclipart(args.out, args.svg_dir, args.size, args.workers, overwrite=args.overwrite,
                                   progress=not args.quiet)
    except NothingImportedError as e:
        print(f"xmodal data openclipart: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from xmodal.training.recipes import run_training

    print(json.dumps(run_training(args.config, args.overrides, resume=args.resume)))
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    from xmodal.data.files import expand_images

    paths = expand_images(args.images)
    if not paths:
        raise ValueError("no images to caption (folders held no image files)")
    if args.attention_map and len(paths) != 1:
        raise ValueError("--attention-map draws one image: give exactly one")
    if args.runtime == "onnx" and args.attention_map:
        raise ValueError("--runtime onnx draws no attention maps: drop --attention-map (or use --runtime torch)")
    limits = {k: v for k, v in (("max_len", args.max_len), ("min_len", args.min_len)) if v}
    skipped = []
    bar = _bar(len(paths), "caption", "img", quiet=len(paths) < 64)

    def on_skip(path: Path, error: Exception) -> None:
        skipped.append(path)
        print(f"skipped: {error}", file=sys.stderr)
        bar.update(1)

    export = None
    if args.runtime != "torch" and not args.attention_map:
        from xmodal.runtime import find_export

        export = find_export(args.model, args.beam, require=args.runtime == "onnx")
    if export is not None:  # onnxruntime and numpy, no torch import (xmodal.runtime)
        from xmodal.runtime import OnnxCaptioner

        captions = OnnxCaptioner(export).describe_files(paths, args.batch_size, on_skip, **limits)
    else:
        captions = _torch_captions(args, paths, on_skip, limits)
    for path, caption in captions:
        print(json.dumps({"image": str(path), "caption": caption}) if args.json else f"{path}\t{caption}", flush=True)
        bar.update(1)
    bar.close()
    if skipped:
        print(f"{len(skipped)} of {len(paths)} images skipped (unreadable)", file=sys.stderr)
    return 1 if len(skipped) == len(paths) else 0


def _torch_captions(args: argparse.Namespace, paths: list[Path], on_skip, limits: dict):
    """(path, caption) from the PyTorch pipeline; each attention map drawn once its caption is out."""
    pipe = _load(args.model, "image-to-text")
    options = {} if args.beam is None else {"method": "beam" if args.beam > 1 else "greedy", "beam_size": args.beam}
    for path, result in pipe.describe_files(paths, args.batch_size, on_skip, return_attention=bool(args.attention_map),
                                            **options, **limits):
        yield path, result.caption
        if args.attention_map:
            _attention_map(pipe, path, result, args.attention_map)


def _cmd_export(args: argparse.Namespace) -> int:
    from xmodal.export import export_onnx

    meta = export_onnx(args.model, args.out)
    print(json.dumps({"out": str(args.out), **meta}))
    return 0


def _attention_map(pipe, path: Path, result, out: Path) -> None:
    from xmodal.data.images import load_image
    from xmodal.viz import attention_figure

    if not result.words:
        raise ValueError("the caption is empty: no words to draw attention for (try --min-len)")
    if result.attention is None:
        raise ValueError(f"model {pipe.name} gives no attention weights")
    attention_figure(load_image(path), result.words, result.attention, out)
    print(f"attention map: {out}", file=sys.stderr)


def _read_prompts_file(path: Path) -> tuple[list[str], int]:
    """Non-empty lines of a prompts file; returns (prompts, skipped blank/undecodable lines)."""
    if not path.is_file():
        raise ValueError(f"{path}: no such prompts file")
    prompts, skipped = [], 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                print(f"skipped: {path}:{line_no}: not UTF-8 text", file=sys.stderr)
                skipped += 1
                continue
            if line:
                prompts.append(line)
    return prompts, skipped


def _checked_prompts(pipe, prompts: list[str], strict: bool) -> list[int]:
    """Indices of the prompts that can be drawn; the others are reported and skipped alone."""
    from xmodal.data.text import UnknownWordsError

    good = []
    for start in range(0, len(prompts), CHECK_CHUNK):
        chunk = range(start, min(start + CHECK_CHUNK, len(prompts)))
        try:  # a clean chunk is checked in one encoder call (one call per prompt took 1-2 s for 1,000)
            if not pipe.check_prompts([prompts[i] for i in chunk], strict=strict):
                good.extend(chunk)
                continue
        except (UnknownWordsError, ValueError, TypeError):
            pass
        for index in chunk:  # a warning or an error: each prompt alone, so that it is named
            try:
                for message in pipe.check_prompts([prompts[index]], strict=strict):
                    print(f"warning: prompt {index + 1}: {message}", file=sys.stderr)
                good.append(index)
            except (UnknownWordsError, ValueError, TypeError) as e:
                print(f"skipped: prompt {index + 1} {prompts[index]!r}: {e}", file=sys.stderr)
    return good


CHECK_CHUNK = 64


MAX_IMAGES_PER_PROMPT = 100_000


def _save_png(image, path: Path) -> None:
    """Write then rename: a killed run leaves whole files only (so --skip-existing can trust them)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        image.save(tmp, format="PNG", compress_level=1)  # 0.25 ms a picture against 0.7 at level 6; files a third larger
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _InOrder:
    """Runs jobs on one thread, in the order given, beside the caller: the PNG encoding and the
    file writes of `generate` overlap the drawing of the next batch (zlib and onnxruntime both
    leave Python's lock while they work). After a job fails no later one runs; its error is raised
    in the caller, at its next `submit` or at the end of the `with` block."""

    LIMIT = 256  # jobs waiting at most (each holds a picture)

    def __enter__(self) -> _InOrder:
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.pending = ThreadPoolExecutor(1, thread_name_prefix="xmodal-writer"), collections.deque()
        self.failed = False
        return self

    def _run(self, fn, args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except BaseException:
            self.failed = True
            raise

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(self._run, fn, args))
        while self.pending and (self.pending[0].done() or len(self.pending) > self.LIMIT):
            self.pending.popleft().result()

    def __exit__(self, kind, error, trace) -> None:
        try:
            while self.pending and kind is None:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    prompts, unreadable = list(args.prompts), 0
    if args.prompts_file:
        more, unreadable = _read_prompts_file(args.prompts_file)
        prompts += more
    if not prompts:
        raise ValueError("no prompts: give PROMPT arguments or --prompts-file FILE")
    if not 1 <= args.n <= MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"-n must be in 1..{MAX_IMAGES_PER_PROMPT}, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not -2**62 <= args.seed <= 2**62 - len(prompts) * args.n:  # every image's seed, and the layout's 2 s + 7919
        raise ValueError(f"--seed must be within -2^62 .. 2^62 (less the images to draw), got {args.seed}")
    pipe, options = _generator(args)
    good = _checked_prompts(pipe, prompts, args.strict)
    args.out.mkdir(parents=True, exist_ok=True)
    seed_of = lambda i, j: args.seed + i * args.n + j  # noqa: E731 - whatever else is skipped
    path = lambda i, j: args.out / f"{i:04d}-{j:02d}-seed{seed_of(i, j)}.png"  # noqa: E731
    handed = collections.deque()  # (i, j) of the jobs the pipeline has read, in order

    def jobs():  # made lazily: -n 100000 costs no memory up front
        for i in good:
            for j in range(args.n):
                if not (args.skip_existing and path(i, j).is_file()):
                    handed.append((i, j))
                    yield prompts[i], seed_of(i, j)

    def save(r, target: Path) -> None:
        _save_png(r.image, target)
        print(json.dumps({"prompt": r.prompt, "file": str(target), "seed": r.seed}) if args.json
              else f"{target}\t{r.prompt}", flush=True)

    bar = _bar(len(good) * args.n, "generate", "img")
    with warnings.catch_warnings(), _InOrder() as writer:
        warnings.simplefilter("ignore")  # reported per prompt above
        for r in pipe.stream(jobs(), args.batch_size, options, bar.update):
            writer.submit(save, r, path(*handed.popleft()))  # each image as soon as it exists
    bar.close()
    failed = len(prompts) - len(good)
    if failed or unreadable:
        print(f"{failed} of {len(prompts)} prompts failed, {unreadable} unreadable lines skipped", file=sys.stderr)
    return 1 if not good else 0


def _generator(args: argparse.Namespace):
    """The generator and its checked sampler options: the ONNX runtime (no torch import) where
    `--runtime` allows and the model has an export of its weights, else the PyTorch pipeline."""
    given = any(v is not None for v in (args.steps, args.guidance, args.sampler, args.negative))
    export = None
    if args.runtime == "onnx" and args.precision == "bfloat16":
        raise ValueError("--runtime onnx draws in float32: drop --precision bfloat16 (or use --runtime torch)")
    if args.runtime != "torch" and args.precision != "bfloat16":  # (auto: bf16 is PyTorch's)
        from xmodal.runtime import find_generator_export

        export = find_generator_export(args.model, given, require=args.runtime == "onnx")
    if export is not None:
        from xmodal.runtime import OnnxGenerator

        return OnnxGenerator(export), None
    pipe = _load(args.model, "text-to-image")
    pipe.precision = args.precision
    return pipe, pipe.options(_options(args))


def _cmd_demo(args: argparse.Namespace) -> int:
    from xmodal.sheets import html_sheet, picture_sheet, table_html
    from xmodal.tasks.text_to_image import cycle

    generator, captioner = _load(args.generator, "text-to-image"), _load(args.captioner, "image-to-text")
    print(f"generator: {generator.name} ({generator.model.registry_name}); "
          f"captioner: {captioner.name} ({captioner.model.registry_name})")
    result = cycle(generator, captioner, [{"captions": [p]} for p in DEMO_PROMPTS], seed=args.seed)
    rows = [[p, c, "yes" if ok else "no"] for p, c, ok in zip(DEMO_PROMPTS, result["captions"], result["match"])]
    width = max(len(p) for p in DEMO_PROMPTS)
    print(f"\n{'prompt':<{width}}  {'caption of the generated image':<62} match")
    for prompt, caption, ok in rows:
        print(f"{prompt:<{width}}  {caption:<62} {ok}")
    from PIL import Image

    images = [Image.fromarray(a) for a in result["images"]]
    args.out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(args.out / f"{i:02d}.png")
    labels = [[f"prompt: {p}", f"caption: {c}"] for p, c, _ in rows]
    matches = sum(result["match"])
    png = picture_sheet(images, labels, args.out / "sheet.png")
    page = html_sheet(images, labels, args.out / "sheet.html", "xmodal demo: text -> image -> text",
                      f"{matches} of {len(DEMO_PROMPTS)} round trips match (scene parsed from the caption equals the "
                      f"prompt's). Generator {generator.name}, captioner {captioner.name}, seed {args.seed}.",
                      table_html(["prompt", "caption", "match"], rows))
    print(f"\n{matches}/{len(DEMO_PROMPTS)} round trips match. Picture sheet: {png} and {page}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
        metrics = _evaluate(args)
    print(json.dumps(metrics))
    print(f"report: {args.out / 'report.html'}", file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> dict:
    from xmodal import evaluation

    common = {"split": args.split, "limit": args.limit}
    if args.what == "retrieval":
        return evaluation.evaluate_retrieval(args.model or "shapes-clip", args.data, args.out, pool=args.pool,
                                             pools=args.pools, distinct=args.distinct, **common)
    if args.what == "captioner":
        return evaluation.evaluate_captioner(args.model or DEFAULT_CAPTIONER, args.data, args.out, beam=args.beam,
                                                meteor=not args.no_meteor, **common)
    elif args.what == "generator":
        return evaluation.evaluate_generator(args.model or DEFAULT_GENERATOR, args.data, args.out,
                                                captioner=args.captioner, clip=args.clip, seed=args.seed,
                                                inception_weights=args.inception_weights, options=_options(args),
                                                prompts=args.prompts, **common)
    return evaluation.evaluate_cycle(args.generator, args.captioner or DEFAULT_CAPTIONER, args.data, args.out,
                                     seed=args.seed, options=_options(args), **common)


def _cmd_index(args: argparse.Namespace) -> int:
    import time

    from xmodal.search import index_path, load_index

    start = time.perf_counter()
    index, _ = load_index(args.model, args.data, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"index": str(index_path(args.data, Path(index.model))), "images": len(index.paths),
                      "captions": len(index.captions), "seconds": round(time.perf_counter() - start, 2)}))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from xmodal.search import open_index, query, read_queries

    given = [args.text is not None, args.image is not None, args.queries_file is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one of --text, --image or --queries-file")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    queries = read_queries(args.queries_file) if args.queries_file is not None else None  # checked first
    index, pipe = open_index(args.model, args.folder)
    if queries is None:
        hits = query(index, pipe, args.folder, text=args.text, image=args.image, top=args.top)
        for hit in hits:
            print(json.dumps(hit))
        if args.sheet:
            _hits_sheet(hits, args.text or f"like {args.image}", args.sheet)
        return 0
    failed = 0
    for item in queries:
        out = {k: item[k] for k in ("line", "id", "text", "image") if k in item}
        if "error" not in item:
            try:
                out["hits"] = query(index, pipe, args.folder, text=item.get("text"), image=item.get("image"),
                                    top=args.top)
            except (ValueError, OSError) as e:
                item["error"] = str(e)
        if "error" in item:
            out["error"] = item["error"]
            failed += 1
        print(json.dumps(out, ensure_ascii=False), flush=True)
    return 1 if failed else 0


def _hits_sheet(hits: list[dict], title: str, out: Path) -> None:
    from xmodal.data.images import load_image
    from xmodal.sheets import picture_sheet

    images = [load_image(h["image"]) for h in hits]
    side = max(im.width for im in images)
    images = [im.resize((side, side)) for im in images]
    labels = [[f"{i + 1}. {h.get('caption') or Path(h['image']).stem}", f"score {h['score']:.3f}"]
              for i, h in enumerate(hits)]
    picture_sheet(images, [[f"query: {title}"] + labels[0], *labels[1:]], out, columns=min(5, len(images)),
                  scale=max(1, 128 // side))
    print(f"sheet: {out}", file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> int:
    from xmodal.server import serve

    serve(args.host, args.port, args.generator, args.captioner, api_key=args.api_key, cors_origin=args.cors_origin,
          docs=not args.no_docs, runtime=args.runtime)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from xmodal.api import list_models

    models = list_models()
    if args.json:
        for m in models:
            print(json.dumps(m))
        return 0
    if not models:
        print("no bundled models")
    for m in models:
        quality = ", ".join(f"{k}={v}" for k, v in m.get("quality", {}).items()) or "-"
        name = f"{m['name']} (= {m['alias_of']})" if "alias_of" in m else m["name"]
        print(f"{name:<34} {m['task']:<21} {m['model']:<22} {quality}")
    return 0


# ----------------------------------------------------------------------------- parsers


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="build or import a data set into the prepared format")
    data.set_defaults(func=_cmd_data)
    dsub = data.add_subparsers(dest="source", required=True)
    shapes = dsub.add_parser("shapes", help="render a Shapes data set (WORLD.md)")
    shapes.add_argument("out", type=Path)
    shapes.add_argument("--split", choices=["train", "test", "novel"], default="train")
    shapes.add_argument("--count", type=int, default=1000)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=int, default=64)
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    shapes.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    fashion = dsub.add_parser("fashion-mnist", help="import Fashion-MNIST from its idx files (28x28 real photos)")
    fashion.add_argument("out", type=Path)
    fashion.add_argument("--source", dest="source_dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                         help="folder of the idx files, gzip or not (default: where Debian's dataset-fashion-mnist puts them)")
    fashion.add_argument("--split", choices=["train", "val", "test", "all"], default="all",
                         help="train: first 55,000 training images; val: last 5,000; test: the 10,000 t10k images")
    fashion.add_argument("--format", choices=["folder", "webdataset"], default="folder",
                         help="a prepared folder, or WebDataset tar shards OUT/SPLIT-000000.tar ...")
    fashion.add_argument("--shard-size", type=int, default=5000, help="records per shard (webdataset)")
    fashion.add_argument("--quiet", action="store_true", help="no progress bar")
    fashion.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    clipart = dsub.add_parser("openclipart", help="render and caption OpenClipart SVG drawings (real human titles)")
    clipart.add_argument("svg_dir", type=Path, metavar="SRC",
                         help="a tree of SVGs: /usr/share/openclipart/svg after apt-get install openclipart-svg")
    clipart.add_argument("out", type=Path)
    clipart.add_argument("--size", type=int, default=64, help="square image side in pixels (default 64)")
    clipart.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
    clipart.add_argument("--quiet", action="store_true", help="no progress bar")
    clipart.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    sources = {"coco": ("COCO captions JSON", "--annotations", "captions_*.json"),
               "karpathy": ("Karpathy split JSON", "--json", "dataset_coco.json / dataset_flickr30k.json"),
               "flickr": ("Flickr .token file", "--token", "results_20130124.token / Flickr8k.token.txt"),
               "folder": ("a folder of images + JSONL/CSV captions", "--captions",
                          ".jsonl, .csv or .tsv with image and caption columns")}
    for name, (what, flag, file_help) in sources.items():
        p = dsub.add_parser(name, help=f"import {what}")
        p.add_argument(flag, dest="source_file", type=Path, required=True, help=file_help)
        p.add_argument("--images", type=Path, required=True, help="folder the image paths are relative to")
        p.add_argument("out", type=Path)
        if name in ("coco", "flickr"):
            p.add_argument("--split", default="train", help="split recorded for every image")
        p.add_argument("--mode", choices=["copy", "symlink"], default="copy", help="copy images, or link to them")
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
        p.add_argument("--follow-symlinks", action="store_true",
                       help="accept symlinks inside --images that point outside it")


def _add_sampler_options(p) -> None:
    p.add_argument("--steps", type=int, help="sampler steps (diffusion models)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (diffusion models)")
    p.add_argument("--sampler", help="ddpm | ddim | dpm (diffusion models)")
    p.add_argument("--negative", help="negative prompt (diffusion models)")


def _add_use(sub) -> None:
    caption = sub.add_parser("caption", help="describe images")
    caption.set_defaults(func=_cmd_caption)
    caption.add_argument("images", nargs="+", type=Path, help="image files or folders")
    caption.add_argument("--model", default=DEFAULT_CAPTIONER, help="bundled model name or model folder")
    caption.add_argument("--beam", type=int, help="beam size (1 = greedy; default: the model's)")
    caption.add_argument("--max-len", type=int, default=0, help="words at most (default: the model's)")
    caption.add_argument("--min-len", type=int, default=0, help="words before the caption may end")
    caption.add_argument("--batch-size", type=int, default=64)
    caption.add_argument("--json", action="store_true", help='one line per image: {"image": ..., "caption": ...}')
    caption.add_argument("--attention-map", type=Path, help="PNG drawing each word's attention (one image)")
    caption.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto",
                         help="onnx: onnxruntime, no PyTorch (--model is an export, or a model with one in MODEL/onnx); "
                              "auto: onnx where the model has an export of its weights and decoding is greedy")

    export = sub.add_parser("export", help="export a model to run without PyTorch")
    export.set_defaults(func=_cmd_export)
    export.add_argument("format", choices=("onnx",))
    export.add_argument("model", help="bundled captioner or one-pass generator (name or model folder)")
    export.add_argument("out", type=Path, help="the folder to write (new, empty, or an earlier export)")

    gen = sub.add_parser("generate", help="generate images from text prompts")
    gen.set_defaults(func=_cmd_generate)
    gen.add_argument("prompts", nargs="*", help="text prompts")
    gen.add_argument("--prompts-file", type=Path, help="one prompt per line")
    gen.add_argument("--model", default=DEFAULT_GENERATOR, help="bundled model name or model folder")
    gen.add_argument("-n", type=int, default=1, help="images per prompt")
    gen.add_argument("--seed", type=int, default=0, help="image j of prompt i uses seed + i * n + j")
    gen.add_argument("--out", "-o", type=Path, default=Path("out"), help="folder for the PNGs")
    gen.add_argument("--batch-size", type=int, default=64)
    gen.add_argument("--json", action="store_true", help='one line per image: {"prompt", "file", "seed"}')
    gen.add_argument("--strict", action="store_true", help="unknown words are an error, not a warning")
    gen.add_argument("--skip-existing", action="store_true", help="keep images already in --out (continue a killed run)")
    gen.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto",
                     help="onnx: onnxruntime, no PyTorch (--model is an export, or a model with one in MODEL/onnx; "
                          "its own seeds: not the pictures torch draws); auto: onnx where the model has an export "
                          "of its weights and no sampler option is given")
    gen.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",  # hub.PRECISIONS (no torch here)
                     help="PyTorch runtime: auto draws in the model's default dtype (bf16 for shapes-gan) where this "
                          "machine computes it natively, else float32")
    _add_sampler_options(gen)


def _add_show(sub) -> None:
    demo = sub.add_parser("demo", help="generate pictures from sample prompts and caption them back")
    demo.set_defaults(func=_cmd_demo)
    demo.add_argument("--generator", default=DEFAULT_GENERATOR)
    demo.add_argument("--captioner", default=DEFAULT_CAPTIONER)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", "-o", type=Path, default=Path("out/demo"))

    srv = sub.add_parser("serve", help="HTTP server with a web page (FastAPI)")
    srv.set_defaults(func=_cmd_serve)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--generator", default=DEFAULT_GENERATOR)
    srv.add_argument("--captioner", default=DEFAULT_CAPTIONER)
    srv.add_argument("--api-key", help="require this key (X-API-Key header) on /v1 routes (default: $XMODAL_API_KEY)")
    srv.add_argument("--cors-origin", help="allow browser requests from this origin")
    srv.add_argument("--no-docs", action="store_true", help="no /docs page or OpenAPI schema")
    srv.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto",
                     help="the captioner's: auto uses the model's ONNX export (onnxruntime) where it has one for its "
                          "own decoding, as xmodal caption does; torch always PyTorch")


def _add_measure(sub) -> None:
    ev = sub.add_parser("evaluate", help="measure a model; writes metrics.json and report.html")
    ev.set_defaults(func=_cmd_evaluate)
    ev.add_argument("what", choices=["captioner", "generator", "cycle", "retrieval"])
    ev.add_argument("--model", help="the model to evaluate (captioner, generator, or dual encoder for retrieval)")
    ev.add_argument("--generator", default=DEFAULT_GENERATOR, help="cycle: the generator")
    ev.add_argument("--captioner", help=f"cycle: the captioner ({DEFAULT_CAPTIONER}); generator: what reads the "
                    "images back (shapes-captioner-transformer; fashion-captioner on Fashion-MNIST, whose "
                    "image encoder also gives the FID/KID features there)")
    ev.add_argument("--clip", default="shapes-clip", help="dual encoder for FID/KID features, CLIPScore, R-precision")
    ev.add_argument("--data", type=Path, required=True, help="a prepared data set")
    ev.add_argument("--split", help="only records of this split")
    ev.add_argument("--limit", type=int, default=1000, help="at most this many images (0: all)")
    ev.add_argument("--out", type=Path, default=Path("out/evaluation"))
    ev.add_argument("--beam", type=int, help="beam size (1 = greedy; default: the model's)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java)")
    ev.add_argument("--inception-weights", help="Inception v3 weights file for FID/KID instead of our own features")
    ev.add_argument("--bf16", action="store_true", help="bf16 autocast (as the benchmarks' --bf16)")
    ev.add_argument("--prompts", choices=["canonical", "novel"], default="canonical",
                    help="generator on Fashion-MNIST records: each record's canonical caption, or open-vocabulary "
                         "prompts of its class in words absent from the training captions")
    ev.add_argument("--pool", type=int, default=100, help="retrieval: candidates per pool")
    ev.add_argument("--pools", type=int, default=5, help="retrieval: pools averaged")
    ev.add_argument("--distinct", action="store_true", help="retrieval: pools of distinct scenes (one right answer)")
    _add_sampler_options(ev)

    ix = sub.add_parser("index", help="embed a collection's images and captions once, for fast search")
    ix.set_defaults(func=_cmd_index)
    ix.add_argument("data", type=Path, help="a prepared data set or a folder of images")
    ix.add_argument("--model", default="shapes-clip", help="a dual encoder (bundled name or folder)")

    se = sub.add_parser("search", help="retrieval with a dual encoder: text -> images, or image -> captions "
                                       "(through the collection's index, built or refreshed as needed)")
    se.set_defaults(func=_cmd_search)
    se.add_argument("folder", type=Path, help="images (text query) or a prepared data set (image query)")
    se.add_argument("--text")
    se.add_argument("--image", type=Path)
    se.add_argument("--queries-file", type=Path,
                    help='many queries: one JSON object per line, {"text": ...} or {"image": ...}; '
                         "prints one JSON line per query with its ranked hits")
    se.add_argument("--model", default="shapes-clip")
    se.add_argument("--top", type=int, default=5)
    se.add_argument("--sheet", type=Path, help="also draw the hits into this PNG picture sheet")

    models = sub.add_parser("models", help="list the bundled models")
    models.set_defaults(func=_cmd_models)
    models.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from xmodal import __version__

    parser = argparse.ArgumentParser(prog="xmodal", description="Cross-modal generation: text -> image, image -> text.")
    parser.add_argument("--version", action="version", version=f"xmodal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    train = sub.add_parser("train", help="train a model from a TOML config (extra --section.key=value override it)")
    train.set_defaults(func=_cmd_train)
    train.add_argument("config", type=Path)
    train.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    _add_use(sub)
    _add_show(sub)
    _add_measure(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"xmodal {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xmodal {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
