"""Where models are: the bundled ones and model folders, found without importing torch (the
ONNX runtime's start-up path reads them too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"

# A task's default on a data set, by a stable name that stands for the bundled model measured best
# there (`fashion-generator`: the GAN beats the CVAE on every measure, README "Real data").
ALIASES = {"fashion-generator": "fashion-gan"}


class ModelLoadError(ValueError):
    """A model name or folder that cannot be loaded; the message says why."""


def bundled_models() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def bundled_names() -> list[str]:
    """Every name a bundled model answers to: its folder's, and the aliases."""
    models = bundled_models()  # one scan of the folder (this is on every model's loading path)
    return sorted(models + [alias for alias, target in ALIASES.items() if target in models])


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """The bundled model of that name (or alias), or a model folder. A bare name (no `/`) that a
    bundled model has is always the bundled one, even where a folder of that name exists in the working
    directory (a warning says how to reach the folder: `./name`)."""
    text = str(name_or_dir)
    if isinstance(name_or_dir, str) and text in bundled_names():
        if Path(text).is_dir():
            import warnings

            warnings.warn(f"{text!r} is a bundled model and also a folder here; loading the bundled one "
                          f"(give ./{text} for the folder)", stacklevel=3)
        return BUNDLED_DIR / ALIASES.get(text, text)
    path = Path(name_or_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a model folder (no config.json)")
        return path
    raise ModelLoadError(f"no model folder or bundled model named {str(name_or_dir)!r}; "
                         f"bundled: {', '.join(bundled_names()) or '(none)'}")


def read_model_meta(folder: str | Path) -> dict[str, Any]:
    folder = resolve_model_dir(folder)
    try:
        meta = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{folder}/config.json: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or "model" not in meta or "config" not in meta:
        raise ModelLoadError(f"{folder}/config.json: needs 'model' and 'config'")
    return meta
