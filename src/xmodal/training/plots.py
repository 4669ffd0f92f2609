"""Training curves from a metrics JSONL log (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(log: str | Path, out: str | Path) -> Path:
    """Loss against step, and each `eval/...` metric on a second panel when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    train = [e for e in entries if "loss" in e]
    evals = sorted({k for e in entries for k in e if k.startswith("eval/")})
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([e["step"] for e in train], [e["loss"] for e in train], lw=1)
        ax.set_yscale("log" if min(e["loss"] for e in train) > 0 else "linear")
    ax.set(xlabel="step", ylabel="training loss", title="loss")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][1]
        for key in evals:
            points = [(e["step"], e[key]) for e in entries if key in e]
            ax.plot(*zip(*points), marker="o", ms=3, label=key[5:])
        ax.set(xlabel="step", title="evaluation")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
