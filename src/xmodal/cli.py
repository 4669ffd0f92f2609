"""The `xmodal` command line: a thin shell that parses, calls the library, and prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_data(args: argparse.Namespace) -> int:
    if args.source == "shapes":
        from xmodal.data.shapes import write_shapes

        stats = write_shapes(args.out, args.split, args.count, args.seed, args.size, progress=not args.quiet)
        print(json.dumps({"out": str(args.out), "split": args.split, **{k: round(v, 3) for k, v in stats.items()}}))
        return 0
    from xmodal.data import importers as imp
    from xmodal.data.prepared import ImportReport

    report = ImportReport(args.source)
    if args.source == "coco":
        items = imp.coco_items(args.annotations, args.images, report, args.split)
    elif args.source == "karpathy":
        items = imp.karpathy_items(args.json, args.images, report)
    elif args.source == "flickr":
        items = imp.flickr_items(args.token, args.images, report, args.split)
    else:
        items = imp.folder_items(args.captions, args.images, report)
    imp.write_items(items, args.out, report, mode=args.mode, total=len(items))
    print(report.summary(), file=sys.stderr)
    print(json.dumps({"out": str(args.out), "written": report.written,
                      "problems": {k: v["count"] for k, v in report.problems.items()}}))
    return 0


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from xmodal.training.recipes import run_training

    summary = run_training(args.config, overrides, resume=args.resume)
    print(json.dumps(summary))
    return 0


DEFAULT_GENERATOR = "shapes-diffusion"
DEFAULT_CAPTIONER = "shapes-captioner"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _expand_images(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to their image files, sorted."""
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()))
        else:
            out.append(p)
    return out


def _cmd_caption(args: argparse.Namespace) -> int:
    import xmodal
    from xmodal.data.images import ImageLoadError, load_image

    pipe = xmodal.load(args.model)
    paths = _expand_images(args.images)
    if not paths:
        raise ValueError("no images to caption (folders held no image files)")
    if args.attention_map and len(paths) != 1:
        raise ValueError("--attention-map draws one image: give exactly one")
    options = {"method": "beam" if args.beam > 1 else "greedy", "beam_size": args.beam}
    if args.max_len:
        options["max_len"] = args.max_len
    if args.min_len:
        options["min_len"] = args.min_len
    from tqdm import tqdm

    failed = 0
    bar = tqdm(total=len(paths), desc="caption", unit="img", disable=not sys.stderr.isatty() or len(paths) < 64)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        images, good = [], []
        for p in chunk:
            try:
                images.append(load_image(p))
                good.append(p)
            except ImageLoadError as e:
                failed += 1
                print(f"skipped: {e}", file=sys.stderr)
        results = pipe.describe(images, return_attention=bool(args.attention_map), **options) if images else []
        for p, r in zip(good, results):
            print(json.dumps({"image": str(p), "caption": r.caption}) if args.json else f"{p}\t{r.caption}", flush=True)
        bar.update(len(chunk))
        if args.attention_map and results:
            from xmodal.viz import attention_figure

            if not results[0].words:
                raise ValueError("the caption is empty: no words to draw attention for (try --min-len)")
            if results[0].attention is None:
                raise ValueError(f"model {pipe.name} gives no attention weights")
            attention_figure(images[0], results[0].words, results[0].attention, args.attention_map)
            print(f"attention map: {args.attention_map}", file=sys.stderr)
    bar.close()
    if failed:
        print(f"{failed} of {len(paths)} images skipped (unreadable)", file=sys.stderr)
    return 1 if failed == len(paths) else 0


def _read_prompts_file(path: Path) -> tuple[list[str], int]:
    """Non-empty lines of a prompts file; returns (prompts, skipped blank/undecodable lines)."""
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


def _cmd_generate(args: argparse.Namespace) -> int:
    import warnings

    import xmodal
    from xmodal.models.text_encoders import UnknownWordsError

    prompts = list(args.prompts)
    skipped = 0
    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise ValueError(f"{args.prompts_file}: no such prompts file")
        more, skipped = _read_prompts_file(args.prompts_file)
        prompts += more
    if not prompts:
        raise ValueError("no prompts: give PROMPT arguments or --prompts-file FILE")
    pipe = xmodal.load(args.model)
    options = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance), ("sampler", args.sampler),
                                 ("negative", args.negative)) if v is not None}
    if options and not getattr(pipe.model, "supports_sampler_options", False):
        raise ValueError(f"{', '.join('--' + k for k in options)}: model {pipe.name} ({pipe.model.registry_name}) "
                         "takes no sampler options")
    args.out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    bar = tqdm(total=len(prompts) * args.n, desc="generate", unit="img", disable=not sys.stderr.isatty())
    k, failed = 0, 0
    for index, prompt in enumerate(prompts):  # one prompt at a time so a bad one is skipped, not fatal
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results = pipe.generate([prompt], n=args.n, seed=args.seed + k, batch_size=args.batch_size,
                                        strict=args.strict, **options)
            for w in caught:
                print(f"warning: prompt {index + 1}: {w.message}", file=sys.stderr)
        except (UnknownWordsError, ValueError, TypeError) as e:
            print(f"skipped: prompt {index + 1} {prompt!r}: {e}", file=sys.stderr)
            failed += 1
            k += args.n
            bar.update(args.n)
            continue
        for j, r in enumerate(results):
            path = args.out / f"{index:04d}-{j:02d}-seed{r.seed}.png"
            r.image.save(path)
            if args.json:
                print(json.dumps({"prompt": r.prompt, "file": str(path), "seed": r.seed}), flush=True)
            else:
                print(f"{path}\t{r.prompt}", flush=True)
        k += args.n
        bar.update(args.n)
    bar.close()
    if failed or skipped:
        print(f"{failed} of {len(prompts)} prompts failed, {skipped} unreadable lines skipped", file=sys.stderr)
    return 1 if failed == len(prompts) else 0


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


def _cmd_demo(args: argparse.Namespace) -> int:
    import html as html_lib

    import xmodal
    from xmodal.sheets import html_sheet, picture_sheet
    from xmodal.worlds.shapes import parse

    generator, captioner = xmodal.load(args.generator), xmodal.load(args.captioner)
    print(f"generator: {generator.name} ({generator.model.registry_name}); "
          f"captioner: {captioner.name} ({captioner.model.registry_name})")
    results = generator.generate(DEMO_PROMPTS, n=1, seed=args.seed)
    images = [r.image for r in results]
    captions = captioner(images)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, matches = [], 0
    width = max(len(p) for p in DEMO_PROMPTS)
    print(f"\n{'prompt':<{width}}  {'caption of the generated image':<62} match")
    for prompt, caption in zip(DEMO_PROMPTS, captions):
        ok = parse(caption) is not None and parse(caption) == parse(prompt)
        matches += ok
        print(f"{prompt:<{width}}  {caption:<62} {'yes' if ok else 'no'}")
        rows.append(f"<tr><td>{html_lib.escape(prompt)}</td><td>{html_lib.escape(caption)}</td><td>{'yes' if ok else 'no'}</td></tr>")
    for i, im in enumerate(images):
        im.save(args.out / f"{i:02d}.png")
    labels = [[f"prompt: {p}", f"caption: {c}"] for p, c in zip(DEMO_PROMPTS, captions)]
    png = picture_sheet(images, labels, args.out / "sheet.png")
    table = "<table><tr><th>prompt</th><th>caption</th><th>match</th></tr>" + "".join(rows) + "</table>"
    page = html_sheet(images, labels, args.out / "sheet.html", "xmodal demo: text -> image -> text",
                      f"{matches} of {len(DEMO_PROMPTS)} round trips match (scene parsed from the caption equals the "
                      f"prompt's). Generator {generator.name}, captioner {captioner.name}, seed {args.seed}.", table)
    print(f"\n{matches}/{len(DEMO_PROMPTS)} round trips match. Picture sheet: {png} and {page}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from xmodal import evaluation

    options = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance), ("sampler", args.sampler))
               if v is not None}
    common = {"split": args.split, "limit": args.limit}
    if args.what == "captioner":
        metrics = evaluation.evaluate_captioner(args.model or DEFAULT_CAPTIONER, args.data, args.out, beam=args.beam,
                                                meteor=not args.no_meteor, **common)
    elif args.what == "generator":
        metrics = evaluation.evaluate_generator(args.model or DEFAULT_GENERATOR, args.data, args.out,
                                                captioner=args.captioner, clip=args.clip, seed=args.seed,
                                                inception_weights=args.inception_weights, **common, **options)
    else:
        metrics = evaluation.evaluate_cycle(args.generator, args.captioner or DEFAULT_CAPTIONER, args.data, args.out,
                                            seed=args.seed, **common, **options)
    print(json.dumps(metrics))
    print(f"report: {args.out / 'report.html'}", file=sys.stderr)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from xmodal.evaluation import search

    for hit in search(args.model, args.folder, text=args.text, image=args.image, top=args.top):
        print(json.dumps(hit))
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
        print(f"{m['name']:<22} {m['task']:<15} {m['model']:<20} {quality}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from xmodal import __version__

    parser = argparse.ArgumentParser(prog="xmodal", description="Cross-modal generation: text -> image, image -> text.")
    parser.add_argument("--version", action="version", version=f"xmodal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build or import a data set into the prepared format")
    dsub = data.add_subparsers(dest="source", required=True)
    shapes = dsub.add_parser("shapes", help="render a Shapes data set (WORLD.md)")
    shapes.add_argument("out", type=Path)
    shapes.add_argument("--split", choices=["train", "test", "novel"], default="train")
    shapes.add_argument("--count", type=int, default=1000)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=int, default=64)
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, help_text in (("coco", "COCO captions JSON"), ("karpathy", "Karpathy split JSON"),
                            ("flickr", "Flickr .token file"), ("folder", "a folder of images + JSONL/CSV captions")):
        p = dsub.add_parser(name, help=f"import {help_text}")
        if name == "coco":
            p.add_argument("--annotations", type=Path, required=True, help="captions_*.json")
        elif name == "karpathy":
            p.add_argument("--json", type=Path, required=True, help="dataset_coco.json / dataset_flickr30k.json")
        elif name == "flickr":
            p.add_argument("--token", type=Path, required=True, help="results_20130124.token / Flickr8k.token.txt")
        else:
            p.add_argument("--captions", type=Path, required=True, help=".jsonl, .csv or .tsv with image and caption columns")
        p.add_argument("--images", type=Path, required=True, help="folder the image paths are relative to")
        p.add_argument("out", type=Path)
        if name in ("coco", "flickr"):
            p.add_argument("--split", default="train", help="split recorded for every image")
        p.add_argument("--mode", choices=["copy", "symlink"], default="copy", help="copy images, or link to them")

    train = sub.add_parser("train", help="train a model from a TOML config (extra --section.key=value override it)")
    train.add_argument("config", type=Path)
    train.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")

    caption = sub.add_parser("caption", help="describe images")
    caption.add_argument("images", nargs="+", type=Path, help="image files or folders")
    caption.add_argument("--model", default=DEFAULT_CAPTIONER, help="bundled model name or model folder")
    caption.add_argument("--beam", type=int, default=3, help="beam size (1 = greedy)")
    caption.add_argument("--max-len", type=int, default=0, help="words at most (default: the model's)")
    caption.add_argument("--min-len", type=int, default=0, help="words before the caption may end")
    caption.add_argument("--batch-size", type=int, default=64)
    caption.add_argument("--json", action="store_true", help='one line per image: {"image": ..., "caption": ...}')
    caption.add_argument("--attention-map", type=Path, help="PNG drawing each word's attention (one image)")

    gen = sub.add_parser("generate", help="generate images from text prompts")
    gen.add_argument("prompts", nargs="*", help="text prompts")
    gen.add_argument("--prompts-file", type=Path, help="one prompt per line")
    gen.add_argument("--model", default=DEFAULT_GENERATOR,
                     help="bundled model name or model folder")
    gen.add_argument("-n", type=int, default=1, help="images per prompt")
    gen.add_argument("--seed", type=int, default=0, help="image k of the run uses seed + k")
    gen.add_argument("--out", "-o", type=Path, default=Path("out"), help="folder for the PNGs")
    gen.add_argument("--batch-size", type=int, default=64)
    gen.add_argument("--json", action="store_true", help='one line per image: {"prompt", "file", "seed"}')
    gen.add_argument("--strict", action="store_true", help="unknown words are an error, not a warning")
    gen.add_argument("--steps", type=int, help="sampler steps (diffusion models)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (diffusion models)")
    gen.add_argument("--sampler", help="ddpm | ddim | dpm (diffusion models)")
    gen.add_argument("--negative", help="negative prompt (diffusion models)")

    demo = sub.add_parser("demo", help="generate pictures from sample prompts and caption them back")
    demo.add_argument("--generator", default=DEFAULT_GENERATOR)
    demo.add_argument("--captioner", default=DEFAULT_CAPTIONER)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", "-o", type=Path, default=Path("out/demo"))

    srv = sub.add_parser("serve", help="HTTP server with a web page (FastAPI)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--generator", default=DEFAULT_GENERATOR)
    srv.add_argument("--captioner", default=DEFAULT_CAPTIONER)

    ev = sub.add_parser("evaluate", help="measure a model; writes metrics.json and report.html")
    ev.add_argument("what", choices=["captioner", "generator", "cycle"])
    ev.add_argument("--model", help="the model to evaluate (captioner or generator)")
    ev.add_argument("--generator", default=DEFAULT_GENERATOR, help="cycle: the generator")
    ev.add_argument("--captioner", help=f"cycle: the captioner ({DEFAULT_CAPTIONER}); generator: what reads the "
                    "images back for scene accuracy (shapes-captioner-transformer)")
    ev.add_argument("--clip", default="shapes-clip", help="dual encoder for FID/KID features, CLIPScore, R-precision")
    ev.add_argument("--data", type=Path, required=True, help="a prepared data set")
    ev.add_argument("--split", help="only records of this split")
    ev.add_argument("--limit", type=int, default=1000, help="at most this many images (0: all)")
    ev.add_argument("--out", type=Path, default=Path("out/evaluation"))
    ev.add_argument("--beam", type=int, default=3)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java)")
    ev.add_argument("--inception-weights", help="Inception v3 weights file for FID/KID instead of our own features")
    ev.add_argument("--steps", type=int)
    ev.add_argument("--guidance", type=float)
    ev.add_argument("--sampler")

    se = sub.add_parser("search", help="retrieval with a dual encoder: text -> images, or image -> captions")
    se.add_argument("folder", type=Path, help="images (text query) or a prepared data set (image query)")
    se.add_argument("--text")
    se.add_argument("--image", type=Path)
    se.add_argument("--model", default="shapes-clip")
    se.add_argument("--top", type=int, default=5)

    models = sub.add_parser("models", help="list the bundled models")
    models.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "data":
            return _cmd_data(args)
        if args.command == "train":
            return _cmd_train(args, rest)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "search":
            return _cmd_search(args)
        if args.command == "serve":
            from xmodal.server import serve

            serve(args.host, args.port, args.generator, args.captioner)
            return 0
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "caption":
            return _cmd_caption(args)
        if args.command == "models":
            return _cmd_models(args)
    except (ValueError, OSError) as e:
        print(f"xmodal {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xmodal {args.command}: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
