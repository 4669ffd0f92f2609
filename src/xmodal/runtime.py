"""Captioning and generation with onnxruntime and numpy alone: what `xmodal caption` and
`xmodal generate` run with `--runtime onnx`.

The folder is what `xmodal export onnx` wrote (`xmodal.export`). Nothing here imports torch:
this is the start-up path of a deployment without PyTorch.

- Captions: preprocessing is the model's evaluation preset (`xmodal.data.images.Preprocess`,
  Pillow and numpy); decoding is greedy, with the rules of `xmodal.models.decoding`: `<pad>`,
  `<start>` and `<unk>` are never written, a word never follows itself, `<end>` waits for
  `min_len` words and is forced after `max_len`.
- Pictures: prompts are split into words as the model's text encoder splits them, encoded in
  groups of one length, and drawn in one batch; the layout's boxes are drawn by the same loop
  as in PyTorch (`xmodal.models.layout_draws`). Noise and boxes come from numpy generators
  seeded by the image's seed alone (its own stream for each): the same seed gives the same
  picture here, though not the picture PyTorch draws for it.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from xmodal.data.files import read_batches
from xmodal.data.images import GeneratedImage, Preprocess, stream_images
from xmodal.data.parts import even_parts, ordered_map, worker_pool
from xmodal.data.text import Vocabulary, word_ids
from xmodal.models.layout_draws import LayoutConfig, check_length, sample_boxes

EXPORT_SUBFOLDER = "onnx"  # an export inside a model folder, made from its weights
NOT_EXPORTABLE = ("retrieval-captioner",)  # its choice among retrieved captions is not in the graphs (xmodal.export)


class OnnxExportError(ValueError):
    """A folder that is not a usable ONNX export, named in the message."""


def weights_digest(model_folder: Path) -> str:
    """sha256 of a model folder's weights: an export names the weights it was made from."""
    import hashlib

    return hashlib.sha256((Path(model_folder) / "model.safetensors").read_bytes()).hexdigest()


def find_export(model: str, beam: int | None, require: bool) -> Path | None:
    """The ONNX export to caption with for `--model model`: the folder itself when it is an
    export, else MODEL/onnx when it was made from MODEL's weights, as long as the decoding is
    greedy (`beam` 1, or None and the model's own decoding greedy). None where the PyTorch path
    must run; with `require` (`--runtime onnx`), the reason is raised instead."""
    from xmodal.models.folders import read_model_meta

    greedy = "--runtime onnx decodes greedily: give --beam 1"
    export, reason = _locate(model, "image-to-text")
    if export is not None:
        if beam is None and export != Path(model):  # the model's own decoding
            beam = read_model_meta(export.parent)["config"].get("beam_size", 3)
        if beam not in (None, 1):
            export, reason = None, greedy
    return _found_or_why(model, export, reason, require)


def find_generator_export(model: str, options_given: bool, require: bool) -> Path | None:
    """The ONNX export to generate with for `--model model` (found as `find_export` finds a
    captioner's), as long as no sampler option is given (an export draws as it was exported)."""
    export, reason = _locate(model, "text-to-image")
    if export is not None and options_given:
        export, reason = None, ("--runtime onnx draws as the model was exported: drop --steps, --guidance, --sampler "
                                "and --negative")
    return _found_or_why(model, export, reason, require)


def _found_or_why(model: str, export: Path | None, reason: str, require: bool) -> Path | None:
    """The export, or None for the PyTorch path; the reason is raised with `require`, and for an
    export folder given as the model, which has no PyTorch model to fall back to."""
    if export is None and (require or Path(model, "onnx.json").is_file()):
        raise OnnxExportError(reason)
    return export


def _locate(model: str, task: str) -> tuple[Path | None, str]:
    """(the export, "") or (None, why there is none) for `--model model` and a task."""
    from xmodal.models.folders import read_model_meta, resolve_model_dir

    if Path(model, "onnx.json").is_file():  # an export folder: there is no PyTorch model to fall back to
        _read_meta(Path(model), task)
        return Path(model), ""
    folder = resolve_model_dir(model)
    export = folder / EXPORT_SUBFOLDER
    kind = read_model_meta(folder)["model"]
    if kind in NOT_EXPORTABLE:
        return None, f"{model} is a {kind}: it has no ONNX export (caption with PyTorch)"
    if not (export / "onnx.json").is_file():
        return None, (f"{model} has no ONNX export: run `xmodal export onnx {model} OUT` and give OUT as the model, "
                      f"or export to {export}")
    if _read_meta(export, task).get("weights_sha256") != weights_digest(folder):
        return None, f"{export} was exported from other weights than {folder}'s: export again"
    return export, ""


CACHE_ENV = "XMODAL_CACHE_DIR"  # where optimized graphs are kept; "off" keeps none


def _session(path: Path):
    """An onnxruntime session on one CPU thread (`Parts` runs one part of a batch per core beside
    the others); a missing or corrupt file is an OnnxExportError. The graph onnxruntime optimized
    for this machine the first time is kept (`_optimized_copy`) and loaded as it is afterwards:
    session creation was 0.18-0.25 s of the default generator's 0.65 s start-up, 0.05-0.08 s
    from the kept graphs."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxExportError("--runtime onnx needs onnxruntime: pip install onnxruntime") from None
    kept = _optimized_copy(path, onnxruntime.__version__)
    if kept is not None and kept.is_file():
        try:
            return _new_session(onnxruntime, kept, optimize=False)
        except Exception:  # a graph kept by another version, damaged, or not this machine's: made again
            kept.unlink(missing_ok=True)
    if kept is not None:
        try:
            return _new_session(onnxruntime, path, keep=kept)
        except Exception:  # the cache folder unwritable, or the graph itself broken: named below
            pass
    try:
        return _new_session(onnxruntime, path)
    except Exception as e:  # onnxruntime raises its own classes for missing and corrupt files
        raise OnnxExportError(f"{path.parent}: not a loadable ONNX export ({type(e).__name__}: {str(e)[:200]})") from None


def _new_session(onnxruntime, path: Path, optimize: bool = True, keep: Path | None = None):
    """A one-thread CPU session of `path`, its graph optimized (unless it was kept optimized);
    with `keep`, the optimized graph is written there (whole or not at all: renamed into place)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the graphs' shape notes are not the user's concern
    if not optimize:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    partial = keep.with_name(f"{keep.name}.{os.getpid()}.tmp") if keep is not None else None
    if partial is not None:
        _drop_stale_partials(keep)
        options.optimized_model_filepath = str(partial)
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if partial is not None:
            os.replace(partial, keep)
        return session
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


def _drop_stale_partials(keep: Path, age_s: float = 600.0) -> None:
    """Partial copies of `keep` that a killed process left over ten minutes ago (a live one renames
    its own within seconds), removed so that kill -9 does not fill the cache."""
    import time

    for stale in keep.parent.glob(f"{keep.name}.*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > age_s:
                stale.unlink()
        except OSError:  # gone already, or another's
            pass


def _optimized_copy(path: Path, version: str) -> Path | None:
    """Where the graph of `path` is kept as onnxruntime optimized it on this machine: named by
    the file's sha256, the onnxruntime version and the CPU's model and features (an optimized
    graph may use this CPU's kernels), in $XMODAL_CACHE_DIR, else $XDG_CACHE_HOME/xmodal/onnx or
    ~/.cache/xmodal/onnx. None when the cache is off, cannot be made, or `path` cannot be read."""
    import hashlib

    root = os.environ.get(CACHE_ENV)
    if root == "off":
        return None
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xmodal" / "onnx"
    try:
        digest = hashlib.sha256(Path(path).read_bytes())
        digest.update(f"{version}|{_cpu_signature()}".encode())
        Path(root).mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # RuntimeError: no home folder to find
        return None
    return Path(root) / f"{digest.hexdigest()[:32]}.onnx"


@functools.cache
def _cpu_signature() -> str:
    """This CPU's model name and feature flags (Linux), else its platform description; read once
    a process (a generator opens five graphs)."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = sorted({line.strip() for line in lines if line.startswith(("model name", "flags"))})
    return "|".join(fields) or f"{platform.machine()} {platform.processor()}"


class Parts:
    """A batch's rows cut in one part per worker (each of `least` rows or more), run side by side
    on threads: onnxruntime leaves Python's lock while a graph runs, and a small CPU runs a few
    pictures' small layers faster on one thread each than split across all its threads, which
    meet after every layer (the default generator: 136-167 images/s at batch 64 against 108-129
    with one session on both threads; the same pictures: each row is computed alone)."""

    def __init__(self, workers: int = 0, least: int = 16):
        self.workers = workers or _cores()
        self.least = least
        self.used = False  # whether a batch has been cut

    def run(self, fn: Callable[[slice], list], count: int) -> list:
        """fn(rows) for each part's slice of range(count), its results concatenated in order."""
        rows = even_parts(count, self.workers, self.least)
        if len(rows) < 2:
            return fn(rows[0])
        self.used = True
        return [item for part in worker_pool("xmodal-onnx", len(rows)).map(fn, rows) for item in part]

    def map_ordered(self, fn: Callable[[list], list], batches: Iterable[list]) -> Iterator:
        """fn(part) for each part of each batch (`run`'s cut), on the workers side by side, in order:
        a worker that ends its part first starts the next batch's instead of waiting for the other
        part (`ordered_map`)."""
        return ordered_map(worker_pool("xmodal-onnx", self.workers), fn, self._cut(batches), 2 * self.workers)

    def _cut(self, batches: Iterable[list]) -> Iterator[list]:
        for batch in batches:
            rows = even_parts(len(batch), self.workers, self.least)
            self.used = self.used or len(rows) > 1
            yield from (batch[r] for r in rows)


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run(session, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    try:
        return session.run(outputs, feeds)
    except Exception as e:  # onnxruntime's own error classes: a graph that does not fit its onnx.json
        raise OnnxExportError(f"the ONNX graphs do not run as onnx.json describes them ({type(e).__name__}: "
                              f"{str(e)[:200]}); export again") from None


class OnnxCaptioner:
    def __init__(self, folder: str | Path, meta: dict | None = None, threads: int = 0):
        folder = Path(folder)
        if meta is None:
            meta = _read_meta(folder, "image-to-text")
        self.meta, self.names = meta, list(meta["state"])
        self._start, self._step = (_session(folder / f) for f in ("start.onnx", "step.onnx"))
        self.parts = Parts(threads)
        try:
            self.words = json.loads((folder / "vocab.json").read_text())
        except (OSError, ValueError) as e:
            raise OnnxExportError(f"{folder}: not a loadable ONNX export ({type(e).__name__}: {str(e)[:200]})") from None
        self._preprocess = Preprocess(meta["preset"])

    def start(self, images: np.ndarray) -> list[np.ndarray]:
        return _run(self._start, {"images": images.astype(np.float32, copy=False)})

    def step(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        out = _run(self._step, {"tokens": tokens.astype(np.int64, copy=False), **dict(zip(self.names, state))})
        return out[0], out[1:]

    def decode(self, images: np.ndarray, max_len: int = 0, min_len: int = 0) -> list[list[int]]:
        """Greedy word ids for a batch of preprocessed images (B, 3, H, W). Rows that have ended
        leave the state once a quarter of them have, as in `xmodal.models.decoding`."""
        max_len = max_len or self.meta["max_len"]
        b = len(images)
        state = self.start(images)
        tokens = np.full(b, Vocabulary.start_id, dtype=np.int64)
        words: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, dtype=bool)
        rows = np.arange(b)  # the caption of each row of the state
        for t in range(max_len + 1):
            log_probs, state = self.step(tokens, state)
            log_probs = log_probs.astype(np.float32)
            log_probs[:, [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]] = -np.inf
            if t < min_len:
                log_probs[:, Vocabulary.end_id] = -np.inf
            if t:
                log_probs[np.arange(len(rows)), tokens] = -np.inf  # never the same word twice in a row
            choice = np.full(len(rows), Vocabulary.end_id) if t == max_len else log_probs.argmax(-1)
            for i in np.flatnonzero(~done[rows]):
                if choice[i] == Vocabulary.end_id:
                    done[rows[i]] = True
                else:
                    words[rows[i]].append(int(choice[i]))
            if done.all():
                break
            tokens = choice.astype(np.int64)
            live = np.flatnonzero(~done[rows])
            if len(live) <= 0.75 * len(rows):
                state, tokens, rows = [s[live] for s in state], tokens[live], rows[live]
        return words

    def caption_batch(self, batch: np.ndarray, **limits) -> list[str]:
        """Captions for a batch of preprocessed images (B, 3, H, W), in one part per core side by side."""
        return self.parts.run(lambda rows: [" ".join(self.words[i] for i in ids)
                                            for ids in self.decode(batch[rows], **limits)], len(batch))

    def describe_files(self, paths: Sequence[Path], batch_size: int = 64, on_skip=None,
                       **limits) -> Iterator[tuple[Path, str]]:
        """(path, caption) for each readable image file, as `ImageToTextPipeline.describe_files`
        gives them: an unreadable file goes to `on_skip` and is skipped alone."""
        for good, pixels, errors in read_batches(list(paths), batch_size, self._preprocess.load):
            for path, error in errors:
                if on_skip is not None:
                    on_skip(path, error)
            if pixels:
                yield from zip(good, self.caption_batch(self._preprocess.stack(pixels), **limits))

    def __call__(self, images: Sequence, batch_size: int = 64, **limits) -> list[str]:
        """Captions for PIL images."""
        out = []
        for start in range(0, len(images), batch_size):
            out += self.caption_batch(self._preprocess.batch(images[start:start + batch_size]), **limits)
        return out


class OnnxGenerator:
    """Pictures from prompts with an exported generator; `stream` and `check_prompts` as the
    PyTorch `TextToImagePipeline` offers them, so the command line drives either."""

    def __init__(self, folder: str | Path, meta: dict | None = None, threads: int = 0):
        folder = Path(folder)
        self.meta = _read_meta(folder, "text-to-image") if meta is None else meta
        self.name = str(self.meta.get("source", folder))
        try:
            self.vocab = Vocabulary(self.meta["words"])
            self.layout = LayoutConfig(**self.meta["layout"]) if self.meta["layout"] else None
        except (TypeError, ValueError) as e:
            raise OnnxExportError(f"{folder / 'onnx.json'}: unreadable ({e})") from None
        graphs = ("text", "slots", "radius", "centre", "draw") if self.layout is not None else ("text", "draw")
        if sorted(self.meta["graphs"]) != sorted(graphs):
            raise OnnxExportError(f"{folder / 'onnx.json'}: names the graphs {self.meta['graphs']}; "
                                  f"this generator needs {list(graphs)}")
        self._sessions = {name: _session(folder / f"{name}.onnx") for name in graphs}
        self.parts = Parts(threads)
        self._inputs = {name: {i.name for i in s.get_inputs()} for name, s in self._sessions.items()}
        noise = [i.shape[1:] for i in self._sessions["draw"].get_inputs() if i.name == "noise"]
        if not noise or list(noise[0]) != self.meta["noise_shape"]:
            raise OnnxExportError(f"{folder / 'onnx.json'}: noise_shape {self.meta['noise_shape']} is not the draw "
                                  f"graph's ({noise[0] if noise else 'no noise input'}); export again")
        self.noise_shape = tuple(self.meta["noise_shape"])

    def run(self, graph: str, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
        """One graph's outputs (all, or those named); feeds it does not take (an input the export
        found unused) are left out."""
        return _run(self._sessions[graph], {k: v for k, v in feeds.items() if k in self._inputs[graph]}, outputs)

    def check_prompts(self, prompts: Sequence[str] | str, strict: bool = False) -> list[str]:
        """The warnings (unknown words) the prompts would give; raises when one cannot be drawn."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = word_ids(prompts, self.vocab, strict)
        if self.layout is not None:
            check_length(self.layout, max(len(r) for r in rows))
        return [str(w.message) for w in caught]

    def encode(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Prompts -> the text graph's outputs, rows of one length encoded together, padded to the
        longest, with the mask (B, T) of real words."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown words are reported by check_prompts
            rows = word_ids(prompts, self.vocab)
        t_max = max(len(r) for r in rows)
        out: dict[str, np.ndarray] = {}
        for length, group in itertools.groupby(sorted(range(len(rows)), key=lambda i: len(rows[i])),
                                               key=lambda i: len(rows[i])):
            group = list(group)
            tokens, pooled = self.run("text", {"ids": np.array([rows[i] for i in group], dtype=np.int64)})
            if not out:
                out = {"tokens": np.zeros((len(rows), t_max, tokens.shape[2]), np.float32),
                       "mask": np.zeros((len(rows), t_max), dtype=bool), "pooled": np.zeros((len(rows), pooled.shape[1]), np.float32)}
            out["tokens"][group, :length], out["pooled"][group] = tokens, pooled
            out["mask"][group, :length] = True
        if self.layout is not None:
            check_length(self.layout, t_max)
            pad = ((0, 0), (0, self.layout.max_len - t_max))
            feeds = {"tokens": np.pad(out["tokens"], (*pad, (0, 0))), "mask": np.pad(out["mask"], pad)}
            if "ids" in self._inputs["slots"]:  # a layout with word_labels reads the word ids, padded alike
                feeds["ids"] = np.zeros((len(rows), self.layout.max_len), np.int64)
                for i, r in enumerate(rows):
                    feeds["ids"][i, :len(r)] = r
            layout = self.run("slots", feeds)
            out.update(zip(("slots", "p_present", "labels"), layout))  # labels: with word_labels only
        return out

    def sample_layout(self, slots: np.ndarray, p_present: np.ndarray, seeds: Sequence[int]) -> tuple[np.ndarray, ...]:
        """One layout per seed -> boxes (B, K, 3), present (B, K) as float32."""
        rngs = [_generator(seed, stream=1) for seed in seeds]

        def radius(k, boxes, present):
            return self.run("radius", {"slot": slots[:, k], "boxes": boxes, "present": present.astype(np.float32)})

        def centre(context, r_bin):
            return self.run("centre", {"context": context, "r_bin": r_bin})[0]

        def pick(probs):  # each row's bin by the inverse of its cumulative distribution (weights need not sum to 1)
            cumulative = np.cumsum(probs, axis=1, dtype=np.float64)
            target = np.array([rng.random() for rng in rngs]) * cumulative[:, -1]
            return np.minimum((cumulative <= target[:, None]).sum(1), probs.shape[1] - 1)

        boxes, present = sample_boxes(self.layout, p_present, radius, centre, pick,
                                      lambda: np.stack([rng.random(4) for rng in rngs]))
        return boxes, present.astype(np.float32)

    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> list:
        """One PIL image per (prompt, seed) pair, in one part per core side by side; prompts already checked."""
        prompts, seeds = list(prompts), list(seeds)
        return self.parts.run(lambda rows: self._render(prompts[rows], seeds[rows]), len(prompts))

    def _render(self, prompts: Sequence[str], seeds: Sequence[int]) -> list:
        text = self.encode(prompts)
        feeds = {"noise": np.stack([_generator(s, stream=0).standard_normal(self.noise_shape, dtype=np.float32)
                                    for s in seeds]), **text}
        if self.layout is not None:
            feeds["boxes"], feeds["present"] = self.sample_layout(text["slots"], text["p_present"], seeds)
        rows = self.meta.get("draw_rows") or len(seeds)
        levels = np.concatenate([self.run("draw", {k: v[start:start + rows] for k, v in feeds.items()}, ["levels"])[0]
                                 for start in range(0, len(seeds), rows)])  # (B, H, W, C) uint8
        return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in levels]

    def stream(self, jobs: Iterable[tuple[str, int]], batch_size: int = 64, options=None,
               progress: Callable[[int], None] | None = None) -> Iterator[GeneratedImage]:
        """Images for (prompt, seed) jobs as they are made, `batch_size` at a time (`options`:
        none can be given to an export; the argument mirrors the PyTorch pipeline's)."""
        if options is not None and options.given():
            raise OnnxExportError("--runtime onnx draws as the model was exported: it takes no sampler options")
        return stream_images(self._render, jobs, batch_size, progress, self.parts.map_ordered)

    def __call__(self, prompts: Sequence[str] | str, n: int = 1, seed: int = 0, batch_size: int = 64,
                 options=None) -> list:
        """`n` images per prompt (PIL), image k (overall) from seed `seed + k`, as the PyTorch pipeline's."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        jobs = ((p, seed + i * n + j) for i, p in enumerate(prompts) for j in range(n))
        return [g.image for g in self.stream(jobs, batch_size, options)]


def _generator(seed: int, stream: int) -> np.random.Generator:
    """numpy's generator for one image's seed; stream 0 draws its noise, 1 its boxes."""
    return np.random.default_rng([stream, int(seed) % 2**64])


_REQUIRED = {"image-to-text": ("state", "preset", "max_len"), "text-to-image": ("words", "noise_shape", "graphs", "layout")}


def _read_meta(folder: Path, task: str) -> dict:
    path = folder / "onnx.json"
    if not path.is_file():
        raise OnnxExportError(f"{folder}: no onnx.json; --runtime onnx takes a folder written by "
                              f"`xmodal export onnx MODEL OUT`")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or meta.get("task") not in _REQUIRED:
            raise ValueError("not an export of xmodal")
    except (ValueError, UnicodeDecodeError) as e:
        raise OnnxExportError(f"{path}: unreadable ({e})") from None
    if meta["task"] != task:
        raise OnnxExportError(f"{folder} holds an export for {meta['task']}; this command needs one for {task}")
    missing = [key for key in _REQUIRED[task] if key not in meta]
    if missing:
        raise OnnxExportError(f"{path}: unreadable (no {', '.join(missing)})")
    return meta
