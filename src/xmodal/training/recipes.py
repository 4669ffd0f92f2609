"""Recipes: from a TOML config to data, model, trainer and a saved, measured model folder.

The `[model]` section names a registered model (`name = "sat-captioner"`) and sets its
config fields; the model's task (`xmodal.tasks`) builds the model from the loaded `[data]`,
collates its batches and measures it; the one `Trainer` runs `[train]`. The card of the
saved model carries the numbers of the task's `measure` on the evaluation set.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from xmodal.tasks import task_module
from xmodal.tasks.data import DataConfig, TrainData, load_data
from xmodal.training.config import ConfigError, build_dataclass, load_config
from xmodal.training.loop import TrainConfig, Trainer


def model_section(config: dict, config_path: Path, task) -> tuple[str, dict, dict]:
    """(registered name, the model's config values, the task's recipe keys) of `[model]`."""
    values = dict(config.get("model", {}))
    name = values.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{config_path}: [model] needs name = '<registered model>'")
    recipe = {key: values.pop(key, default) for key, default in task.RECIPE_KEYS.items()}
    return name, values, recipe


def card(name: str, config_path: Path, overrides: list[str], data: DataConfig, train: TrainConfig,
         model, quality: dict, seconds: float) -> str:
    command = " ".join(["xmodal train", str(config_path), *map(shlex.quote, overrides)])
    return (
        f"# {name}\n\n"
        f"A `{model.registry_name}` ({model.num_parameters():,} parameters), task `{model.task}`.\n\n"
        f"- Data: {json.dumps(asdict(data))}\n"
        f"- Training command: `{command}`\n"
        f"- Training: {train.steps} steps, batch {train.batch_size}, {seconds / 60:.1f} minutes on "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'} ({torch.get_num_threads()} threads)\n"
        f"- Quality on the evaluation set at the end of training (`xmodal.tasks.{model.task}` measure):\n\n"
        f"quality: {json.dumps({k: round(v, 4) for k, v in quality.items()})}\n"
    )


def _prepare_out_dir(trainer: Trainer, resume: bool) -> None:
    if resume:
        if trainer.resume():
            print(f"resuming from {trainer.resumed_from} at step {trainer.step}", file=sys.stderr)
        else:
            print(f"no checkpoint at {trainer.checkpoint_path}: starting from step 0", file=sys.stderr)
    elif trainer.has_checkpoint():
        raise ConfigError(f"{trainer.checkpoint_path} exists: pass --resume to continue that run, "
                          f"or set --train.out_dir=<another folder>")


def _train_and_report(trainer: Trainer, resume: bool, evaluate, config_path: Path, overrides: list[str],
                      data: DataConfig) -> dict:
    """Train, then measure the exported model and write its card (main process only)."""
    _prepare_out_dir(trainer, resume)
    start = time.perf_counter()
    summary = trainer.train()
    seconds = time.perf_counter() - start
    if trainer.dist.main and evaluate is not None:
        from xmodal.models.hub import load_model

        final = load_model(summary["model_dir"])
        quality = evaluate(final)
        summary["quality"] = quality
        text = card(Path(trainer.config.out_dir).name, config_path, overrides, data, trainer.config, final,
                    quality, seconds)
        (Path(summary["model_dir"]) / "README.md").write_text(text)
    return summary


def run_training(config_path: str | Path, overrides: list[str] | None = None, resume: bool = False) -> dict:
    from xmodal.models.registry import get_model_class

    config_path = Path(config_path)
    overrides = list(overrides or [])
    config = load_config(config_path, overrides)
    name = config.get("model", {}).get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{config_path}: [model] needs name = '<registered model>'")
    try:
        task = task_module(get_model_class(name).task)
    except ValueError as e:
        raise ConfigError(f"{config_path}: [model] name {name!r}: {e}") from None
    name, values, recipe = model_section(config, config_path, task)
    data_cfg = build_dataclass(DataConfig, {**task.DATA_DEFAULTS, **config.get("data", {})}, "data")
    train_cfg = build_dataclass(TrainConfig, config.get("train", {}), "train")
    preset = values.get("image_preset", get_model_class(name).config_class.image_preset)
    data = load_data(data_cfg, preset)
    data.work_dir = Path(train_cfg.out_dir)
    model = task.build(name, values, data, train_cfg.seed, **recipe)
    evaluate = task.evaluator(data)
    trainer = Trainer(model, data.train, train_cfg, collate_fn=task.collate(model, data), evaluate=evaluate)
    return _train_and_report(trainer, resume, evaluate, config_path, overrides, data_cfg)


__all__ = ["run_training", "TrainData"]
