"""Model folders: `config.json` + `model.safetensors` (+ assets) + `README.md`.

One module saves and loads every model. Loading never unpickles code: the
weights are safetensors and the config is JSON; the registry name in the
config picks the class. Weights saved on GPU load on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from xmodal._version import __version__
from xmodal.models.base import Capable
from xmodal.models.folders import (  # noqa: F401 (re-exported)
    BUNDLED_DIR,
    ModelLoadError,
    bundled_models,
    read_model_meta,
    resolve_model_dir,
)
from xmodal.models.registry import get_model_class, make_config

FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16")  # what a model's config may name as its `inference_dtype`
PRECISIONS = ("auto", *DTYPES)  # how a pipeline runs its model (`autocast_for`): "auto" is the model's own


class PretrainedModel(Capable, nn.Module):
    """Base of every registered model: a typed config, save and load as a folder.

    Subclasses set `config_class`, `task` and (optionally) `capabilities`, and override
    `save_assets` / `load_assets` when they carry files besides the weights (a vocabulary,
    a tokenizer). `from_parts` / `create_model` build one complete, ready model in one call.
    """

    config_class: ClassVar[type]
    task: ClassVar[str] = "other"
    registry_name: ClassVar[str]
    parts: ClassVar[tuple[str, ...]] = ()  # keyword arguments of __init__ that take prepared objects

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.source: str | None = None  # the folder it was loaded from

    @classmethod
    def is_part(cls, name: str, value) -> bool:
        """Whether `value` given for `name` is a prepared object (else it is a config value)."""
        return value is not None and not isinstance(value, dict) and not dataclasses.is_dataclass(value)

    @classmethod
    def config_from_parts(cls, parts: dict) -> dict:
        """The config fields that the given prepared parts decide."""
        return {}

    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimizer; a group may carry its own `lr_scale` (GAN G and D)."""
        return [{"params": list(self.parameters())}]

    def on_train_step(self, step: int) -> None:
        """Called by the Trainer after optimizer step `step` (1-based): models with a schedule
        of their own (a KL warm-up, lazy regularization) read the step here, not in `loss`."""

    def packaged_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of parts whose weights an installed package holds (a frozen
        pretrained text encoder): not written into the folder, loaded by `load_assets`."""
        return ()

    # assets: files other than weights that the model needs (vocabulary, tokenizer)
    def save_assets(self, folder: Path) -> None:
        pass

    def load_assets(self, folder: Path) -> None:
        pass

    def config_for_saving(self) -> dict:
        return dataclasses.asdict(self.config)

    def save_pretrained(self, folder: str | Path, card: str | None = None, extra: dict | None = None,
                        dtype: str = "float32") -> Path:
        """Write the folder; `dtype="float16"` stores floating weights at half the size (they load
        back into the model's float32 parameters)."""
        from safetensors.torch import save_file

        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype {dtype!r} is not one of ('float32', 'float16')")

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT_VERSION,
            "model": self.registry_name,
            "task": self.task,
            "config": self.config_for_saving(),
            "xmodal_version": __version__,
            **({"weights_dtype": dtype} if dtype != "float32" else {}),
            **(extra or {}),
        }
        (folder / "config.json").write_text(json.dumps(meta, indent=2))
        packaged = self.packaged_prefixes()
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()
                 if not (packaged and k.startswith(packaged))}  # a package holds those
        if dtype == "float16":
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        save_file(_untie(state), str(folder / "model.safetensors"))
        self.save_assets(folder)
        (folder / "README.md").write_text(card or default_card(meta))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> PretrainedModel:
        model = load_model(folder, device)
        if not isinstance(model, cls):
            raise ModelLoadError(f"{folder} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def inference_dtype(self) -> torch.dtype:
        """The dtype this model runs in by default where the device computes it natively
        (`autocast_for`): float32, unless its config names bfloat16, whose numbers its card gives."""
        return torch.float32


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (a CPU with AVX512-BF16 or AMX, a GPU with bf16),
    where bf16 autocast is fast; elsewhere it is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast_dtype(model: PretrainedModel, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype a pipeline runs `model` in: bf16 for "bfloat16", and for "auto" where the
    model's default is bf16 (`inference_dtype`) and its device computes bf16 natively; else None,
    no autocast of its own ("float32" leaves a caller's, as the benchmarks' --bf16, in force)."""
    if check_precision(precision) == "bfloat16" or (precision == "auto" and model.inference_dtype() == torch.bfloat16
                                   and native_bf16(model.device)):
        return torch.bfloat16
    return None


def autocast_for(model: PretrainedModel, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The context of `autocast_dtype`: bf16 autocast on the model's device, or no change."""
    dtype = autocast_dtype(model, precision)
    return torch.autocast(model.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied weights): clone the repeats."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def default_card(meta: dict) -> str:
    config = json.dumps(meta["config"], indent=2)
    return f"# {meta['model']}\n\nTask: {meta['task']}. Saved by xmodal {meta['xmodal_version']}.\n\n```json\n{config}\n```\n"


def load_model(name_or_dir: str | Path, device: str | torch.device = "cpu") -> PretrainedModel:
    """Create the registered class from `config.json`, then load weights and assets."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_model_dir(name_or_dir)
    meta = read_model_meta(folder)
    try:
        cls = get_model_class(meta["model"])
        model = cls(make_config(cls, meta["config"]))
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{folder}/config.json: {e}") from None
    model.load_assets(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{folder}: no model.safetensors")
    try:
        state = load_file(str(weights), device="cpu")
    except SafetensorError as e:
        raise ModelLoadError(f"{weights}: unreadable weights ({e})") from None
    packaged = model.packaged_prefixes()
    if packaged:  # those weights came from their package in load_assets
        state = {**{k: v for k, v in model.state_dict().items() if k.startswith(packaged)}, **state}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{weights}: weights do not fit the config: {e}") from None
    model.source = str(folder)
    return model.to(device).eval()
