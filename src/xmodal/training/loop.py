"""One training loop for every model.

A model plugs in with `loss(batch) -> (loss, {name: value})` (`xmodal.models.base`), plus
`param_groups()` and `on_train_step(step)`, which `PretrainedModel` provides.
The loop brings: CPU or CUDA, bf16 autocast, gradient clipping, EMA weights,
atomic checkpoints every N steps, exact resume (step, optimizer, EMA and RNG
state; the data order is a function of the step), a progress bar, a JSONL
metrics log and a loss-curve PNG, early stopping on a validation metric, and
data-parallel training under `torchrun` (DDP; gloo on CPU, nccl on CUDA).

The data order is derived, not stored: the batch of step `s` is slice
`s mod E` of the permutation drawn from `seed + s div E` (E batches per epoch),
so a resumed run reads exactly the batches the uninterrupted one would have.
With DDP each rank takes every `world`-th sample of the same global batch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from xmodal.training import checkpoints
from xmodal.training.checkpoints import CHECKPOINT

METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    out_dir: str = "runs/model"  # checkpoint, metrics log, loss curve and the saved model folder
    steps: int = 1000  # optimizer steps in total
    batch_size: int = 32  # global batch; split across processes under torchrun
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine decays to 10% of lr
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    bf16: bool = False  # bf16 autocast (fast on CPUs with avx512_bf16, and on recent GPUs)
    ema: float = 0.0  # EMA decay of the weights (e.g. 0.999); 0 disables; the saved model uses EMA weights
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 500  # steps; 0 saves only at the end
    keep_checkpoints: int = 3  # the newest K checkpoints are kept, each with a SHA-256
    save_dtype: Literal["float32", "float16"] = "float32"  # weights of the exported model folder (checkpoints stay fp32)
    log_every: int = 10
    eval_every: int = 0  # steps; 0 disables evaluation (and early stopping)
    early_stop_metric: str = ""  # a key of the evaluation dict; empty: no early stopping
    early_stop_mode: Literal["max", "min"] = "max"
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    num_workers: int = 0  # DataLoader workers
    progress: bool = True
    # parameter-name prefixes that train, the rest frozen (a later stage of a trained model, e.g.
    # ["layout.word_labels."]); empty: every parameter the model leaves trainable
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule {self.lr_schedule!r} is not one of ('constant', 'cosine')")
        if self.save_dtype not in ("float32", "float16"):
            raise ValueError(f"train.save_dtype {self.save_dtype!r} is not one of ('float32', 'float16')")
        if self.early_stop_mode not in ("max", "min"):
            raise ValueError(f"train.early_stop_mode {self.early_stop_mode!r} is not one of ('max', 'min')")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"train.ema must be in [0, 1), got {self.ema}")
        self.betas = tuple(self.betas)


def freeze_all_but(model: nn.Module, prefixes: list[str]) -> None:
    """Only the parameters whose names start with one of `prefixes` train (none given: no change);
    a prefix that names no parameter is an error, never a silent run that trains nothing."""
    if not prefixes:
        return
    names = [name for name, _ in model.named_parameters()]
    unmatched = [x for x in prefixes if not any(n.startswith(x) for n in names)]
    if unmatched:
        raise ValueError(f"train.trainable {unmatched} names no parameter of this model (e.g. {names[0]!r})")
    for name, param in model.named_parameters():
        param.requires_grad_(param.requires_grad and any(name.startswith(x) for x in prefixes))


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use 'cpu' or 'auto'")
        if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    elif name != "cpu":
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return torch.device(name)


# ----------------------------------------------------------------------------- data order


class StepBatchSampler(Sampler[list[int]]):
    """Yields the indices of steps start..total-1; the batch of a step depends only on the step."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int, dist_info: DistInfo):
        if n < batch_size:
            raise ValueError(f"the data set has {n} items, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.total, self.dist = start, total, dist_info
        self.per_epoch = n // batch_size  # the incomplete last batch is dropped

    def __len__(self) -> int:
        return self.total - self.start

    def batch(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        indices = order[offset * self.batch_size:(offset + 1) * self.batch_size].tolist()
        return indices[self.dist.rank::self.dist.world]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield self.batch(step)


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


class _LossModule(nn.Module):
    """Makes `model.loss` the forward of a module, so DDP's hooks see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


# ----------------------------------------------------------------------------- checkpoint


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- trainer


class EarlyStopped(Exception):
    pass


def _stop_on_sigterm():
    """SIGTERM (kill, a scheduler's stop) checkpoints and exits like Ctrl-C; main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """Trains `model` (anything with `.loss(batch)`) on `dataset` batched by `collate_fn`.

    `evaluate(model) -> {metric: value}` runs every `eval_every` steps on the main process.
    `save_model(model, folder)` exports the trained model (default: `model.save_pretrained`).
    """

    def __init__(self, model: nn.Module, dataset: Dataset, config: TrainConfig,
                 collate_fn: Callable | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 save_model: Callable[[nn.Module, Path], Any] | None = None,
                 on_step: Callable[[int], None] | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device)
        self.model = model.to(self.device)
        self.dataset, self.collate_fn = dataset, collate_fn
        self.evaluate_fn, self.on_step = evaluate, on_step
        self.save_model_fn = save_model or (lambda m, folder: m.save_pretrained(folder, dtype=config.save_dtype))
        self.out_dir = Path(config.out_dir)
        # a model may split its parameters into groups with their own `lr_scale` (e.g. GAN G and D)
        freeze_all_but(model, config.trainable)
        groups = model.param_groups()
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("the model has no trainable parameters")
        # foreach: one kernel per step for all tensors (a CPU otherwise loops over them); the same numbers
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay, foreach=True)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if config.ema > 0 else None
        self.step = 0
        self.resumed_from: Path | None = None  # the checkpoint resume() loaded
        self.best: float | None = None
        self.evals_without_improvement = 0

    # -- schedule
    def lr_at(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.lr
        progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    # -- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": _rng_state(),
            "best": self.best,
            "evals_without_improvement": self.evals_without_improvement,
            "config": {k: v for k, v in asdict(self.config).items() if k != "progress"},
        }

    def has_checkpoint(self) -> bool:
        return any(p.is_file() for p in checkpoints.slots(self.out_dir, self.config.keep_checkpoints))

    def save_checkpoint(self) -> None:
        if self.dist.main:
            checkpoints.save(self.state_dict(), self.out_dir, self.config.keep_checkpoints)
            self._write_curve()

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the newest intact checkpoint of the run (or the file `path`, verified); False when
        there is none. Damaged ones are skipped, saying so (`xmodal.training.checkpoints`)."""
        if path is not None:
            path = Path(path)
            if not path.is_file():
                return False
            problem = checkpoints.check(path)
            if problem is not None:
                raise ValueError(f"{path}: {problem}")
            state = checkpoints.load_checkpoint(path)
        else:
            found = checkpoints.latest_intact(self.out_dir, self.config.keep_checkpoints,
                                              log=lambda m: print(m, file=sys.stderr))
            if found is None:
                return False
            path, state = found
        self.resumed_from = path
        if state["config"].get("batch_size") != self.config.batch_size or state["config"].get("seed") != self.config.seed:
            raise ValueError(f"{path}: was written with batch_size={state['config'].get('batch_size')}, "
                             f"seed={state['config'].get('seed')}; resuming with other values would not continue the same run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.best = state["best"]
        self.evals_without_improvement = int(state["evals_without_improvement"])
        _set_rng_state(state["rng"])
        self._trim_metrics_log()
        return True

    # -- logging
    def _log(self, entry: dict) -> None:
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with (self.out_dir / METRICS).open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def _trim_metrics_log(self) -> None:
        """On resume, drop log lines from steps the checkpoint does not include."""
        path = self.out_dir / METRICS
        if self.dist.main and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))

    def _write_curve(self) -> None:
        path = self.out_dir / METRICS
        if path.is_file():
            from xmodal.training.plots import plot_metrics
            plot_metrics(path, self.out_dir / "loss_curve.png")

    # -- the loop
    def _update_ema(self) -> None:
        decay = self.config.ema
        with torch.no_grad():
            for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
                ema_p.lerp_(p.detach(), 1 - decay)
            for ema_b, b in zip(self.ema.buffers(), self.model.buffers()):
                ema_b.copy_(b)

    @property
    def trained_model(self) -> nn.Module:
        """The weights to use: EMA when enabled."""
        return self.ema if self.ema is not None else self.model

    def _maybe_evaluate(self) -> None:
        c = self.config
        if not (self.evaluate_fn and c.eval_every and self.step % c.eval_every == 0):
            return
        stop = torch.zeros(1)
        if self.dist.main:
            model = self.trained_model
            was_training = model.training
            model.eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in self.evaluate_fn(model).items()}
            model.train(was_training)
            self._log({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
            if c.early_stop_metric:
                if c.early_stop_metric not in metrics:
                    raise ValueError(f"early_stop_metric {c.early_stop_metric!r} is not among the evaluation's "
                                     f"metrics {sorted(metrics)}")
                value = metrics[c.early_stop_metric]
                better = self.best is None or (value > self.best if c.early_stop_mode == "max" else value < self.best)
                if better:
                    self.best, self.evals_without_improvement = value, 0
                    self.save_model_fn(model, self.out_dir / "best")
                else:
                    self.evals_without_improvement += 1
                    stop[0] = float(c.patience > 0 and self.evals_without_improvement >= c.patience)
        if self.dist.world > 1:
            dist.broadcast(stop, 0)
        if stop.item():
            raise EarlyStopped

    def _data_parallel(self) -> nn.Module:
        module = _LossModule(self.model)
        if self.dist.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        return module

    def _loader(self) -> DataLoader:
        c = self.config
        from xmodal.data.shards import ShardDataset, StepBatches

        if c.batch_size % self.dist.world:
            raise ValueError(f"batch_size {c.batch_size} must divide evenly across {self.dist.world} processes")
        if isinstance(self.dataset, ShardDataset):  # streamed shards: their order is also a function of the step
            stream = StepBatches(self.dataset, c.batch_size, c.seed, self.step, c.steps, self.dist.rank, self.dist.world)
            return DataLoader(stream, batch_size=None, collate_fn=self.collate_fn, num_workers=min(c.num_workers, 1),
                              generator=torch.Generator().manual_seed(c.seed + self.step))  # not the global RNG
        sampler = StepBatchSampler(len(self.dataset), c.batch_size, c.seed, self.step, c.steps, self.dist)
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                          num_workers=c.num_workers, persistent_workers=False,
                          # its own generator: creating the iterator must not draw from the global RNG
                          generator=torch.Generator().manual_seed(c.seed + self.step))

    def _optimizer_step(self, module: nn.Module, batch) -> tuple[float, torch.Tensor, dict]:
        """One step on one batch: (lr, loss, logged terms)."""
        c = self.config
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batch = move_to(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
            out = module(batch)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise TypeError(f"{type(self.model).__name__}.loss must return (loss, logs dict); got {type(out).__name__}")
        loss, metrics = out
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; lower train.lr or enable grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.model.on_train_step(self.step + 1)
        if self.ema is not None:
            self._update_ema()
        self.step += 1
        return lr, loss, metrics

    def _log_running(self, running: dict[str, float], lr: float, start_time: float, bar) -> None:
        c = self.config
        n = c.log_every if self.step % c.log_every == 0 else (self.step % c.log_every)
        entry = {"step": self.step, "lr": lr, "elapsed_s": round(time.perf_counter() - start_time, 3),
                 **{k: v / n for k, v in running.items()}}
        running.clear()
        self._log(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}")

    def train(self) -> dict:
        c = self.config
        if self.step == 0:
            torch.manual_seed(c.seed + self.dist.rank)
            np.random.seed(c.seed + self.dist.rank)
            random.seed(c.seed + self.dist.rank)
        module = self._data_parallel()
        loader = self._loader()
        self.model.train()
        start_time, start_step = time.perf_counter(), self.step
        bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step",
                   disable=not (c.progress and self.dist.main), dynamic_ncols=True)
        stopped_early = False
        running: dict[str, float] = {}
        previous = _stop_on_sigterm()
        try:
            for batch in loader:
                lr, loss, metrics = self._optimizer_step(module, batch)
                for k, v in {"loss": loss.detach(), **metrics}.items():
                    running[k] = running.get(k, 0.0) + float(v)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    self._log_running(running, lr, start_time, bar)
                bar.update(1)
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < c.steps:
                    self.save_checkpoint()
                self._maybe_evaluate()
                if self.on_step is not None:
                    self.on_step(self.step)
        except EarlyStopped:
            stopped_early = True
        except KeyboardInterrupt:
            self.save_checkpoint()  # never lose work: resume continues from here
            bar.close()
            raise
        finally:
            _restore_sigterm(previous)
        bar.close()
        self.save_checkpoint()
        return self._finish(stopped_early, start_time, start_step)

    def _finish(self, stopped_early: bool, start_time: float, start_step: int) -> dict:
        """The run's summary; the main process exports the model folder (the best one, with early stopping)."""
        c = self.config
        seconds = max(time.perf_counter() - start_time, 1e-9)
        summary = {"steps": self.step, "stopped_early": stopped_early, "seconds": round(seconds, 2),
                   "steps_per_s": round((self.step - start_step) / seconds, 3)}
        if self.dist.main:
            final, best = self.out_dir / "model", self.out_dir / "best"
            if c.early_stop_metric and best.is_dir():  # the exported model is the best evaluated one
                shutil.rmtree(final, ignore_errors=True)
                shutil.copytree(best, final)
                summary["best"] = {c.early_stop_metric: self.best}
            else:
                self.save_model_fn(self.trained_model, final)
            summary["model_dir"] = str(final)
        if self.dist.world > 1:
            dist.barrier()
        return summary
