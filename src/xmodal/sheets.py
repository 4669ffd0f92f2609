"""Picture sheets: a grid of images with text under each, as PNG and as self-contained HTML."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def picture_sheet(images: Sequence[Image.Image], captions: Sequence[Sequence[str]], out_png: str | Path,
                  columns: int = 4, scale: int = 3) -> Path:
    """Each image enlarged `scale` times (nearest), with its caption lines underneath."""
    font = ImageFont.load_default()
    side = images[0].width * scale
    chars = max(12, side // 6)
    wrapped = [[w for line in lines for w in _wrap(line, chars)] for lines in captions]
    text_h = 12 * max(len(w) for w in wrapped) + 6
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (side + 10) + 10, rows * (side + text_h + 10) + 10), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x = 10 + (i % columns) * (side + 10)
        y = 10 + (i // columns) * (side + text_h + 10)
        sheet.paste(image.resize((side, side), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + side + 3 + 12 * j), line, fill="black", font=font)
    sheet.save(out_png)
    return Path(out_png)


def seed_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], out_png: str | Path, scale: int = 2) -> Path:
    """One row per prompt, one column per seed; the prompt under the row's first picture."""
    columns = max(len(images) for _, images in rows)
    return picture_sheet([im for _, images in rows for im in images],
                         [[prompt] if i == 0 else [] for prompt, images in rows for i in range(len(images))],
                         out_png, columns=columns, scale=scale)


def html_sheet(images: Sequence[Image.Image], captions: Sequence[Sequence[str]], out_html: str | Path,
               title: str, intro: str = "", table: str = "") -> Path:
    cells = "\n".join(
        f'<figure><img src="data:image/png;base64,{png_base64(im)}" width="{im.width * 3}" '
        f'style="image-rendering:pixelated"><figcaption>{"<br>".join(html.escape(c) for c in lines)}</figcaption></figure>'
        for im, lines in zip(images, captions))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} .grid{{display:flex;flex-wrap:wrap;gap:14px}}
figure{{margin:0;width:200px}} figcaption{{font-size:13px;margin-top:4px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>{table}<div class="grid">{cells}</div></body></html>"""
    Path(out_html).write_text(page, encoding="utf-8")
    return Path(out_html)


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table, every cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
