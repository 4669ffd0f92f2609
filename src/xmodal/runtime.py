"""Captioning with onnxruntime and numpy alone: what `xmodal caption --runtime onnx` runs.

The folder is what `xmodal export onnx` wrote (`xmodal.export`). Preprocessing is the model's
evaluation preset (`xmodal.data.images.Preprocess`, Pillow and numpy); decoding is greedy, with
the rules of `xmodal.models.decoding`: `<pad>`, `<start>` and `<unk>` are never written, a word
never follows itself, `<end>` waits for `min_len` words and is forced after `max_len`. Nothing
here imports torch: this is the start-up path of a deployment without PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from xmodal.data.files import read_batches
from xmodal.data.images import Preprocess
from xmodal.data.text import Vocabulary

EXPORT_SUBFOLDER = "onnx"  # an export inside a model folder, made from its weights


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
    from xmodal.models.folders import read_model_meta, resolve_model_dir

    greedy = "--runtime onnx decodes greedily: give --beam 1"
    if Path(model, "onnx.json").is_file():  # an export folder: there is no PyTorch model to fall back to
        if beam not in (None, 1):
            raise OnnxExportError(greedy)
        return Path(model)
    folder = resolve_model_dir(model)
    export = folder / EXPORT_SUBFOLDER
    if not (export / "onnx.json").is_file():
        reason = (f"{model} has no ONNX export: run `xmodal export onnx {model} OUT` and give --model OUT, "
                  f"or export to {export}")
    elif (beam if beam is not None else read_model_meta(folder)["config"].get("beam_size", 3)) != 1:
        reason = greedy
    elif _read_meta(export).get("weights_sha256") != weights_digest(folder):
        reason = f"{export} was exported from other weights than {folder}'s: export again"
    else:
        return export
    if require:
        raise OnnxExportError(reason)
    return None


class OnnxCaptioner:
    def __init__(self, folder: str | Path, meta: dict | None = None, threads: int = 0):
        try:
            import onnxruntime
        except ImportError:
            raise OnnxExportError("--runtime onnx needs onnxruntime: pip install onnxruntime") from None
        folder = Path(folder)
        if meta is None:
            meta = _read_meta(folder)
        self.meta, self.names = meta, list(meta["state"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the graphs' shape notes are not the user's concern
        try:
            self._start, self._step = (onnxruntime.InferenceSession(str(folder / f), options,
                                                                    providers=["CPUExecutionProvider"])
                                       for f in ("start.onnx", "step.onnx"))
            self.words = json.loads((folder / "vocab.json").read_text())
        except Exception as e:  # onnxruntime raises its own classes for missing and corrupt files
            raise OnnxExportError(f"{folder}: not a loadable ONNX export ({type(e).__name__}: {str(e)[:200]})") from None
        self._preprocess = Preprocess(meta["preset"])

    def start(self, images: np.ndarray) -> list[np.ndarray]:
        return self._run(self._start, {"images": images.astype(np.float32, copy=False)})

    def step(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self._run(self._step, {"tokens": tokens.astype(np.int64, copy=False), **dict(zip(self.names, state))})
        return out[0], out[1:]

    def _run(self, session, feeds: dict) -> list[np.ndarray]:
        try:
            return session.run(None, feeds)
        except Exception as e:  # onnxruntime's own error classes: a graph that does not fit its onnx.json
            raise OnnxExportError(f"the ONNX graphs do not run as onnx.json describes them ({type(e).__name__}: "
                                  f"{str(e)[:200]}); export again") from None

    def decode(self, images: np.ndarray, max_len: int = 0, min_len: int = 0) -> list[list[int]]:
        """Greedy word ids for a batch of preprocessed images (B, 3, H, W)."""
        max_len = max_len or self.meta["max_len"]
        b = len(images)
        state = self.start(images)
        tokens = np.full(b, Vocabulary.start_id, dtype=np.int64)
        words: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, dtype=bool)
        for t in range(max_len + 1):
            log_probs, state = self.step(tokens, state)
            log_probs = log_probs.astype(np.float32)
            log_probs[:, [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]] = -np.inf
            if t < min_len:
                log_probs[:, Vocabulary.end_id] = -np.inf
            if t:
                log_probs[np.arange(b), tokens] = -np.inf  # never the same word twice in a row
            choice = np.full(b, Vocabulary.end_id) if t == max_len else log_probs.argmax(-1)
            for i in np.flatnonzero(~done):
                if choice[i] == Vocabulary.end_id:
                    done[i] = True
                else:
                    words[i].append(int(choice[i]))
            if done.all():
                break
            tokens = choice.astype(np.int64)
        return words

    def preprocess(self, image) -> np.ndarray:
        """A PIL image as the model's evaluation preset makes it: (3, H, W) float32."""
        return self._preprocess.array(image)

    def caption_arrays(self, arrays: Sequence[np.ndarray], **limits) -> list[str]:
        """Captions for preprocessed images, one batch."""
        return [" ".join(self.words[i] for i in ids) for ids in self.decode(np.stack(arrays), **limits)]

    def describe_files(self, paths: Sequence[Path], batch_size: int = 64, on_skip=None,
                       **limits) -> Iterator[tuple[Path, str]]:
        """(path, caption) for each readable image file, as `ImageToTextPipeline.describe_files`
        gives them: an unreadable file goes to `on_skip` and is skipped alone."""
        for good, arrays, errors in read_batches(list(paths), batch_size, self.preprocess):
            for path, error in errors:
                if on_skip is not None:
                    on_skip(path, error)
            if arrays:
                yield from zip(good, self.caption_arrays(arrays, **limits))

    def __call__(self, images: Sequence, batch_size: int = 64, **limits) -> list[str]:
        """Captions for PIL images."""
        out = []
        for start in range(0, len(images), batch_size):
            out += self.caption_arrays([self.preprocess(im) for im in images[start:start + batch_size]], **limits)
        return out


def _read_meta(folder: Path) -> dict:
    path = folder / "onnx.json"
    if not path.is_file():
        raise OnnxExportError(f"{folder}: no onnx.json; --runtime onnx takes a folder written by "
                              f"`xmodal export onnx MODEL OUT`")
    try:
        meta = json.loads(path.read_text())
        if meta.get("task") != "image-to-text" or not isinstance(meta.get("state"), list):
            raise ValueError("not a captioner export")
    except (ValueError, UnicodeDecodeError) as e:
        raise OnnxExportError(f"{path}: unreadable ({e})") from None
    return meta
