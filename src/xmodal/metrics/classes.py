"""Class read-back: accuracy, per-class accuracy and the confusion matrix of predicted classes
(a caption's garment, a generated picture read back by a captioner) against the true ones."""

from __future__ import annotations

from collections.abc import Sequence


def class_scores(truths: Sequence[str], predicted: Sequence[str | None], classes: Sequence[str]) -> dict:
    """`class_accuracy`, `class_accuracy_<class>` per class, `unreadable` (the share of predictions
    naming no class), and `confusion`: rows = true class, columns = predicted class, then a last
    column for "none"."""
    if len(truths) != len(predicted):
        raise ValueError(f"{len(truths)} true classes but {len(predicted)} predictions")
    if not truths:
        raise ValueError("no items to score")
    index = {c: i for i, c in enumerate(classes)}
    confusion = [[0] * (len(classes) + 1) for _ in classes]
    for truth, guess in zip(truths, predicted):
        if truth not in index:
            raise ValueError(f"true class {truth!r} is not one of {list(classes)}")
        confusion[index[truth]][index.get(guess, len(classes))] += 1
    out: dict = {"class_accuracy": sum(t == p for t, p in zip(truths, predicted)) / len(truths),
                 "unreadable": sum(p not in index for p in predicted) / len(truths)}
    for c, row in zip(classes, confusion):
        if sum(row):
            out[f"class_accuracy_{c}"] = row[index[c]] / sum(row)
    out["confusion"] = confusion
    return out


def confusion_png(confusion: list[list[int]], classes: Sequence[str], path, title: str = "") -> None:
    """The confusion matrix as a picture: rows true, columns predicted (share of the row), with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.array(confusion, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    columns = [*classes, "none"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(columns), 1.0 + 0.55 * len(classes)))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(columns)):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
