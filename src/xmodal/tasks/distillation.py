"""Students of a trained generator: the `text-to-image` recipe with `[model] teacher = "<name or folder>"`.

A diffusion teacher (`distilled-diffusion`, see `xmodal.models.distilled`): the student's
training set is not pictures but the teacher's sampling trajectories: one per training record
(a random one of its captions, seed 10^6 + i), recorded once with the teacher's own sampler,
steps and guidance, and kept in the run folder (`trajectories.pt`, written block by block, so a
killed recording continues where it stopped).

A GAN teacher (`dfgan`, `gan_student`): the student is the teacher's config with the recipe's
values over it (a cheaper generator), its weights where they fit; its generator learns the
teacher's picture for each batch's texts, true boxes and z (`DFGAN.distillation_loss`).

The evaluation is the task's own: the student's pictures measured like any generator's.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from xmodal.tasks.data import TrainData
from xmodal.training.config import ConfigError

SEED_OFFSET = 10 ** 6  # trajectory i starts from the noise of seed SEED_OFFSET + i
BLOCK = 256  # trajectories recorded (and saved) at a time


class Trajectories(Dataset):
    """Item i: (prompt, the teacher's latents at each student timestep and its result
    (K + 1, C, 16, 16), the layout map it drew (M, 16, 16) or None)."""

    def __init__(self, texts: list[str], states: torch.Tensor, layout_maps: torch.Tensor | None):
        self.texts, self.states, self.layout_maps = texts, states, layout_maps

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int):
        return self.texts[i], self.states[i], None if self.layout_maps is None else self.layout_maps[i]


def collate(items) -> dict:
    texts, states, maps = zip(*items)
    return {"texts": list(texts), "states": torch.stack(states),
            "layout_map": None if maps[0] is None else torch.stack(maps)}


def build_student(name: str, values: dict, data: TrainData, seed: int, teacher: str):
    """The student of a latent-diffusion teacher: the teacher's config and weights, its UNet to
    train; and its training set, the teacher's trajectories (which replace `data.train`). A dfgan
    teacher of a dfgan student: `gan_student` (the training set stays the records)."""
    from dataclasses import asdict

    from xmodal.models.dfgan import DFGAN
    from xmodal.models.diffusion import LatentDiffusion
    from xmodal.models.hub import load_model
    from xmodal.models.registry import create_model

    try:
        source = load_model(teacher)
    except (OSError, ValueError) as e:
        raise ConfigError(f"[model] teacher {teacher!r}: {e}") from None
    if isinstance(source, DFGAN) and name == source.registry_name:
        return gan_student(name, values, source, teacher)
    if type(source) is not LatentDiffusion:
        raise ConfigError(f"[model] teacher {teacher!r} is a {source.registry_name}; a student learns from a "
                          f"latent-diffusion model, or a dfgan student from a dfgan")
    inherited = {k: v for k, v in asdict(source.config).items() if k not in ("text_encoder", "autoencoder")}
    try:
        student = create_model(name, **{**inherited, **values, "teacher": str(teacher),
                                        "teacher_steps": source.config.steps},
                               text_encoder=source.text_encoder, autoencoder=source.autoencoder)
    except ValueError as e:
        raise ConfigError(f"[model]: {e}") from None
    student.load_state_dict(source.state_dict())
    student.requires_grad_(False).unet.requires_grad_(True)  # text encoder, layout, autoencoder: the teacher's
    data.train = record(source, student, data, seed)
    return student


def gan_student(name: str, values: dict, source, teacher: str):
    """A GAN student: the teacher GAN's config with `values` over it (e.g. a cheaper generator),
    its weights where they fit (the parts it drops named), its text encoder and layout stage,
    frozen: only the generator trains, on the teacher's pictures (`DFGAN.learn_from`)."""
    import copy
    from dataclasses import asdict

    from xmodal.models.registry import create_model

    if "text_encoder" in values:
        raise ConfigError("[model] text_encoder: a GAN student reads with its teacher's text encoder; leave it out")
    inherited = {k: v for k, v in asdict(source.config).items() if k != "text_encoder"}
    try:
        student = create_model(name, **{**inherited, **values, "teacher": str(teacher)},
                               text_encoder=copy.deepcopy(source.text_encoder))
    except ValueError as e:
        raise ConfigError(f"[model]: {e}") from None
    copy_weights(student, source, f"teacher {teacher}")
    student.requires_grad_(False).generator.requires_grad_(True)
    try:
        student.learn_from(source)
    except ValueError as e:
        raise ConfigError(f"[model] teacher {teacher!r}: {e}") from None
    return student


def copy_weights(model, trained, label: str) -> None:
    """Every weight of `trained` into `model`, which may add parts of its own or leave some of
    that model's out (named on stderr); a weight of another shape is an error."""
    source, mine = trained.state_dict(), model.state_dict()
    misfit = [k for k, v in source.items() if k in mine and mine[k].shape != v.shape]
    if misfit or not set(source) & set(mine):
        raise ConfigError(f"[model] {label}: its weights do not fit this config (e.g. "
                          f"{(misfit or list(source))[0]}): give the model settings it was trained with")
    left_out = sorted({_first_missing(k, mine) for k in source if k not in mine})
    if left_out:
        print(f"{label}: this config has no place for {', '.join(left_out)}; left out", file=sys.stderr)
    model.load_state_dict({**mine, **{k: v.to(mine[k].dtype) for k, v in source.items() if k in mine}})


def _first_missing(key: str, names: dict) -> str:
    """The shortest dotted prefix of `key` that begins no name in `names` (the part a model lacks)."""
    parts = key.split(".")
    return next(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                if not any(n == p or n.startswith(p + ".") for n in names))


def teacher_steps(teacher, student) -> list[int]:
    """The numbers of teacher steps after which its latents are at each student timestep, then
    its result: the student's timesteps must lie on the teacher's sampling grid."""
    from xmodal.models.diffusion import make_scheduler

    c = teacher.config
    scheduler = make_scheduler(c.sampler, c)
    scheduler.set_timesteps(c.steps)
    grid = [int(t) for t in scheduler.timesteps]
    missing = [t for t in student.times[:-1] if t not in grid]
    if missing:
        raise ConfigError(f"[model] student_timesteps {missing} are not on the teacher's {c.steps}-step "
                          f"{c.sampler} grid {grid}")
    return [grid.index(t) for t in student.times[:-1]] + [c.steps]


def _load(path: Path) -> dict | None:
    """The trajectories recorded so far, or None (none yet, or a damaged file: recorded again)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict) or not {"key", "states", "maps"} <= saved.keys():
            raise ValueError("not a trajectories file")
        return saved
    except Exception as e:  # torch.load raises many kinds (EOFError, IndexError, UnpicklingError ...) on a damaged file
        print(f"{path} is unreadable ({type(e).__name__}: {str(e)[:100]}): recording again", file=sys.stderr)
        return None


def record(teacher, student, data: TrainData, seed: int) -> Trajectories:
    """The teacher's trajectories for every training record, recorded (or continued) in the run folder."""
    steps = teacher_steps(teacher, student)
    rng = random.Random(seed)
    texts = [rng.choice(r["captions"]) for r in data.train.records]
    path = Path(data.work_dir or ".") / "trajectories.pt"
    key = {"teacher": student.config.teacher, "steps": steps, "texts": texts}
    saved = _load(path)
    if saved is not None and saved["key"] != key:
        print(f"{path} was recorded for another teacher, grid or data: recording again", file=sys.stderr)
        saved = None
    states, maps = (saved["states"], saved["maps"]) if saved else ([], [])
    done = sum(len(s) for s in states)
    for start in range(done, len(texts), BLOCK):
        block = texts[start:start + BLOCK]
        seeds = [SEED_OFFSET + i for i in range(start, start + len(block))]
        _, trace = teacher.denoise(block, seeds, record=steps)
        states.append(trace["states"].cpu())
        maps.append(trace["layout_map"].cpu() if trace["layout_map"] is not None else torch.zeros(len(block), 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"key": key, "states": states, "maps": maps}, partial)
        partial.replace(path)
        print(f"teacher trajectories: {start + len(block)} / {len(texts)}", file=sys.stderr)
    maps_all = torch.cat(maps)
    return Trajectories(texts, torch.cat(states), maps_all if maps_all.dim() == 4 else None)
