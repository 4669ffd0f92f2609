"""Tasks: what each task trains on and how it is measured, in one module per task.

| task | module | measured by |
| --- | --- | --- |
| `image-to-text` | `captioning` | BLEU, ROUGE-L, CIDEr-D (METEOR), Shapes exact match |
| `text-to-image` | `text_to_image` | Shapes scene accuracy by readers (judge, cycle), FID/KID, CLIPScore |
| `image-text-alignment` | `alignment` | recall@k both ways |
| `image-autoencoder` | `autoencoding` | PSNR of the round trip |

Each module offers `build(name, values, data, seed, **recipe_keys)` (a complete model from the
`[model]` section and the loaded data), `collate(model, data)`, `measure(...)` (the one
definition of quality) and `evaluator(data)` (training-time evaluation through `measure`),
plus `RECIPE_KEYS` (`[model]` keys the recipe reads besides the model's config) and
optionally `DATA_DEFAULTS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {"image-to-text": "xmodal.tasks.captioning", "text-to-image": "xmodal.tasks.text_to_image",
         "image-text-alignment": "xmodal.tasks.alignment", "image-autoencoder": "xmodal.tasks.autoencoding"}


def task_module(task: str) -> ModuleType:
    if task not in TASKS:
        raise ValueError(f"no task {task!r}; tasks: {sorted(TASKS)}")
    return importlib.import_module(TASKS[task])
