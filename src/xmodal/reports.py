"""Evaluation reports: `metrics.json` and a self-contained `report.html` (sample grid with the
prompt or caption under each image, a metric table, attention maps, the training curve)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from PIL import Image

from xmodal.sheets import html_sheet, png_base64, table_html


def metric_table(metrics: dict) -> str:
    rows = [[k, f"{v:.4f}" if isinstance(v, float) else json.dumps(v)] for k, v in metrics.items()]
    return table_html(["metric", "value"], rows)


def write_report(out: str | Path, title: str, metrics: dict, images: list[Image.Image], labels: list[list[str]],
                 extra_html: str = "") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    html_sheet(images, labels, out / "report.html", title, f"{len(images)} samples shown.",
               metric_table({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}) + extra_html)
    return metrics


def curve_html(model_dir: str | Path) -> str:
    """The training curve of a model whose folder sits in a run folder (runs/NAME/model)."""
    log = Path(model_dir).parent / "metrics.jsonl"
    if not log.is_file():
        return ""
    from xmodal.training.plots import plot_metrics

    with tempfile.TemporaryDirectory() as tmp:
        png = plot_metrics(log, Path(tmp) / "curve.png")
        data = png_base64(Image.open(png))
    return f'<h2>Training curve</h2><img src="data:image/png;base64,{data}">'


def attention_html(pipe, images: list[Image.Image]) -> str:
    """Each word's attention over the first images, for captioners that attend to regions."""
    from xmodal.viz import attention_figure

    parts = []
    for result, image in zip(pipe.describe(images, return_attention=True, method="greedy"), images):
        if result.attention is None or not result.words:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            png = attention_figure(image, result.words, result.attention, Path(tmp) / "a.png")
            parts.append(f'<img src="data:image/png;base64,{png_base64(Image.open(png))}">')
    return ("<h2>Attention maps</h2>" + "".join(parts)) if parts else ""
