"""OpenClipart: a messy real collection of SVG drawings with titles people wrote.

Debian's `openclipart-svg` installs 8,121 public-domain SVGs in /usr/share/openclipart/svg, in
22 category folders. Each file carries RDF metadata in `<metadata>`: a work (`cc:Work`) with a
title (`dc:title`), often keywords (`dc:subject/rdf:Bag/rdf:li`) and sometimes a description
(`dc:description`), plus the agents (creator, publisher, rights holder) who have titles of
their own. About 5,000 work titles are collection boilerplate, not descriptions.

`import_openclipart(source, out, size)` writes the prepared format (`xmodal.data.prepared`):
each drawing rendered with cairosvg onto white, aspect kept, centred and padded to a square of
`size` pixels, with a record::

    {"image": "images/food/apple_01.png", "captions": [title, description?], "split": "train",
     "category": "food", "keywords": [...], "title_raw": "...", "caption_source": "title",
     "source": "food/apple_01.svg"}

Caption rules (each one tested, see `clean_title`):

- Whitespace is collapsed and surrounding quotes and punctuation stripped.
- "Clipart by NAME - x" keeps only x; any agent's name (creator, publisher, rights holder) is
  removed from a title together with a "by" before it; a title that is only a name is empty.
- A title that names a collection, a theme, an icon set, a tool or a file format rather than
  the drawing is boilerplate (`BOILERPLATE`): "Part of the Flat Icon Collection (...)", "Lemon
  SVG theme", "gramastar", "Etiquette Icons", "AIGA_Symbol_Signs", "untitled", ...
- The word "clipart" is removed from a title ("Homes Clipart" -> "Homes").
- A file-name-like title is removed: one word with an underscore, a file extension, digits or
  two hyphens ("jigsaw_red_10", "fc23", "logo.svg", "arrow-down-red"), or the file's own name.
- The description is a second caption when it is real: its first line or sentence, at most 30
  words, no URL or e-mail address, not boilerplate and not the title again.
- Keywords are lowercased, underscores become spaces; ones under 3 letters ("en"), agents' names, file-name-like
  ones and tags that say nothing of the picture (`BORING_KEYWORDS`: "hash", "icon", "theme",
  "clipart", ...) are dropped, and duplicates merged.
- A drawing whose title cleans to nothing gets one caption from its first three keywords and
  its category ("stars, geometry, shapes") with `"caption_source": "keywords"`, or from the
  category alone (`"category"`) when it has no keyword left.

Split rule: the sha1 hex digest of the file's path relative to SRC (POSIX, UTF-8) starting
with `f` -> test, `e` -> val, otherwise train. A symlink inside SRC is a second copy of its
target: it is imported under its own name and category but split by its target's path, so a
drawing and its copies always land in the same split.

Safety and failures: nothing in SRC is followed outside it (symlinks leaving SRC are refused),
XML entities are never expanded (metadata is read with defusedxml; cairosvg reads with
defusedxml too and fetches no external file or URL, only `data:` images), a file over
`MAX_SVG_BYTES` is not parsed, and a render that runs past `RENDER_SECONDS` is stopped. Every
SVG that is not imported is counted by reason with examples in `import_report.json`; an import
never crashes on a bad file. Rendering runs in `workers` processes with a progress bar.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SOURCE = Path("/usr/share/openclipart/svg")
MAX_SVG_BYTES = 16 * 2**20  # the largest file in the package is 1.7 MB
RENDER_SECONDS = 30  # the slowest file in the package renders in about 1.5 s

# Whole titles (case-insensitive) that name a collection, theme, tool or format, not the drawing.
BOILERPLATE = tuple(re.compile(p, re.I) for p in (
    r".*\bcollection\b.*",  # "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", "SVG Gradient Collection by ..."
    r".*\b(icons|icon ?set|icon[ -]theme|theme)\b.*",  # "Etiquette Icons", "blueberry - iconset", "gold-theme"
    r".*\bsvg\b.*",  # "Lemon SVG theme", "SVG Road Signs"
    r"(various )?clip ?arts?( by .*)?",  # "Various Cliparts", "Clipart by NAME" (no title after the name)
    r"[\W\d_]*",  # no letter at all
    r"aiga[ _]symbol[ _]signs",  # the AIGA set's name on each of its 243 signs
    r".*\bs[iu]bmission\b.*",  # "R16 sibmission"
    r"gramastar",  # the star-drawing script that made 1,375 stars
    r"(untitled|drawing|image|picture|new document|layer|sketch|clip)( ?\d+)?",
))
# Keywords that say nothing about the picture (the collection's own tags).
BORING_KEYWORDS = frozenset((
    "hash", "icon", "icons", "theme", "magick", "mapsym", "appicon", "lemon theme icon", "clip art", "clipart",
    "clip-art", "image", "images", "svg", "png", "media", "unsorted", "special", "externalsource", "drawing",
    "public domain", "publicdomain", "openclipart", "ocal", "mimetypes", "mime-types", "application",
))
_FILE_EXTENSION = re.compile(r"\.(svg|svgz|png|jpe?g|gif|ai|eps|pdf)$", re.I)
_URL_OR_EMAIL = re.compile(r"(https?://|www\.|\S+@\S+\.\w+)", re.I)
_STRIP = " \t\n\"'`.,;:-_*"
MAX_DESCRIPTION_WORDS = 30


@dataclass
class Metadata:
    """What an SVG's `cc:Work` says about itself."""

    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)  # creator, publisher, rights holder, contributor names


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_SHAPES = frozenset(("path", "rect", "circle", "ellipse", "line", "polyline", "polygon", "text", "use", "image"))


def parse(data: bytes):
    """The SVG's XML root. Raises defusedxml's EntitiesForbidden / ExternalReferenceForbidden
    (never expanding anything) or xml.etree's ParseError."""
    from defusedxml.ElementTree import fromstring

    return fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)


def has_shapes(root) -> bool:
    """Whether the file holds any element that draws (many in the package hold only metadata)."""
    return any(_local(e.tag) in _SHAPES for e in root.iter())


def read_metadata(root) -> Metadata:
    """The work's title, description, keywords and agent names; empty when there is no metadata."""
    meta = Metadata()
    work = next((e for e in root.iter() if _local(e.tag) == "Work"), None)
    if work is None:
        return meta
    for child in work:
        name = _local(child.tag)
        if name == "title":
            meta.title = (child.text or "").strip()
        elif name == "description":
            meta.description = "".join(child.itertext()).strip()
        elif name == "subject":
            meta.keywords = [(li.text or "").strip() for li in child.iter() if _local(li.tag) == "li"]
        elif name in ("creator", "publisher", "rights", "contributor"):
            meta.agents += [(t.text or "").strip() for t in child.iter() if _local(t.tag) == "title"]
    meta.agents = [a for a in meta.agents if a]
    return meta


def _tidy(text: str) -> str:
    text = " ".join(text.split()).strip(_STRIP)
    while len(text) > 1 and text[0] + text[-1] in ("()", "[]", "{}"):  # "(a fish)" -> "a fish"
        text = text[1:-1].strip(_STRIP)
    return text


def is_boilerplate(text: str) -> bool:
    return any(p.fullmatch(text) for p in BOILERPLATE)


def is_file_name_like(text: str, stem: str = "") -> bool:
    """One word with an underscore, a file extension, a digit or two hyphens ("arrow-down-red"),
    or the file's own name."""
    if stem and text.lower() == stem.lower():
        return True
    return " " not in text and ("_" in text or bool(_FILE_EXTENSION.search(text)) or text.count("-") >= 2
                                or any(c.isdigit() for c in text))


def _without_agents(text: str, agents: list[str]) -> str:
    for agent in sorted(agents, key=len, reverse=True):
        text = re.sub(r"(\bby\s+)?" + re.escape(agent), " ", text, flags=re.I)
    return _tidy(text)


def clean_title(raw: str, agents: list[str] = (), stem: str = "") -> str:
    """The title as a caption, or "" when nothing of it describes the drawing (rules above)."""
    text = _tidy(raw)
    by = re.fullmatch(r"clip ?art by .+? - (.+)", text, re.I)
    if by:
        text = _tidy(by.group(1))
    text = _without_agents(text, list(agents))
    if not is_boilerplate(text):  # "Homes Clipart" -> "Homes"
        text = _tidy(re.sub(r"\bclip ?arts?\b", " ", text, flags=re.I))
    if not text or is_boilerplate(text) or is_file_name_like(text, stem):
        return ""
    return text


def clean_description(raw: str, title: str, agents: list[str] = ()) -> str:
    """The description's first line or sentence as a caption, or "" when it is not a real one."""
    first = re.split(r"\n|(?<=[.!?])\s", raw.strip(), maxsplit=1)[0]
    text = _without_agents(_tidy(first), list(agents))
    if not text or _URL_OR_EMAIL.search(text) or is_boilerplate(text) or is_file_name_like(text) \
            or len(text.split()) > MAX_DESCRIPTION_WORDS or re.match(r"(eps )?converted from", text, re.I):
        return ""
    if re.sub(r"\W+", "", text.lower()) == re.sub(r"\W+", "", title.lower()):
        return ""
    return text


def clean_keywords(raw: list[str], agents: list[str] = ()) -> list[str]:
    names = {a.lower() for a in agents}
    out: list[str] = []
    for keyword in raw:
        word = " ".join(keyword.replace("_", " ").lower().split()).strip(_STRIP)
        if len(word) >= 3 and word not in BORING_KEYWORDS and word not in names and word not in out \
                and not is_file_name_like(keyword.strip()) and not _URL_OR_EMAIL.search(word):
            out.append(word)
    return out


def captions_for(meta: Metadata, category: str, stem: str = "") -> tuple[list[str], str, list[str]]:
    """(captions, caption_source, cleaned keywords) of a drawing."""
    keywords = clean_keywords(meta.keywords, meta.agents)
    title = clean_title(meta.title, meta.agents, stem)
    if title:
        description = clean_description(meta.description, title, meta.agents)
        return [title] + ([description] if description else []), "title", keywords
    category_words = category.replace("_", " ")
    picked = [k for k in keywords if k != category_words][:3]
    if picked:
        return [", ".join(picked + [category_words])], "keywords", keywords
    return [category_words], "category", keywords


def split_of(relative: str) -> str:
    """The stated split rule: sha1 of the POSIX relative path, `f...` test, `e...` val, else train."""
    digest = hashlib.sha1(relative.encode("utf-8")).hexdigest()
    return {"f": "test", "e": "val"}.get(digest[0], "train")


# SVG 2 writes opacities as percentages ("100%"), and some files end a number attribute with a
# semicolon; cairosvg reads neither, so both are rewritten to plain numbers before drawing.
_PERCENT_OPACITY = re.compile(rb'(opacity\s*(?:=\s*["\']|:)\s*)(\d+(?:\.\d+)?)%')
_TRAILING_SEMICOLON = re.compile(rb'(\s[a-z-]+=")(-?\d+(?:\.\d+)?);(")')


def _normalize(data: bytes) -> bytes:
    data = _PERCENT_OPACITY.sub(lambda m: m.group(1) + str(float(m.group(2)) / 100).encode(), data)
    return _TRAILING_SEMICOLON.sub(rb"\1\2\3", data)


class BlankDrawing(ValueError):
    """The SVG draws nothing: no ink on its page or off it."""


def render(data: bytes, size: int, margin: float = 0.04):
    """The drawing as a size x size RGB image: drawn onto white, aspect kept, centred, its ink
    (not its page) scaled to fill the square less `margin` on each side. Many files put a small
    drawing on a large Inkscape page; fitting the ink frames them all alike. The page is drawn at
    4x the size and cropped to its ink; a drawing that lies wholly off its page is drawn again
    without the page's clip (`_render_off_page`). Raises BlankDrawing when nothing is drawn, or
    what cairosvg raises on a file it cannot draw."""
    import cairosvg
    from PIL import Image, ImageChops

    data = _normalize(data)
    side = 4 * size
    png = cairosvg.svg2png(bytestring=data, output_width=side, output_height=side, background_color="white",
                           unsafe=False)  # defusedxml: no entity expanded; only data: URLs fetched
    page = Image.open(io.BytesIO(png)).convert("RGB")
    box = ImageChops.difference(page, Image.new("RGB", page.size, "white")).convert("L").point(
        lambda v: 255 if v > 8 else 0).getbbox()
    if box is None:
        return _render_off_page(data, size, margin)
    ink = page.crop(box)
    inner = max(1, round(size * (1 - 2 * margin)))
    scale = inner / max(ink.size)
    ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.LANCZOS)
    image = Image.new("RGB", (size, size), "white")
    image.paste(ink, ((size - ink.width) // 2, (size - ink.height) // 2))
    return image


def _render_off_page(data: bytes, size: int, margin: float):
    """Draw into an unbounded cairo recording (no clip to the page) and fit its ink extents."""
    import math

    import cairocffi as cairo
    from cairosvg.parser import Tree
    from cairosvg.surface import PNGSurface
    from PIL import Image

    class Recording(PNGSurface):
        def _create_surface(self, width, height):
            return cairo.RecordingSurface(cairo.CONTENT_COLOR_ALPHA, None), width, height

    tree = Tree(bytestring=data, unsafe=False)
    tree["overflow"] = "visible"
    recording = Recording(tree, None, 96).cairo
    x, y, width, height = recording.ink_extents()
    if not (width > 0 and height > 0 and all(math.isfinite(v) for v in (x, y, width, height))):
        raise BlankDrawing("no ink")
    surface = cairo.ImageSurface(cairo.FORMAT_ARGB32, size, size)
    context = cairo.Context(surface)
    context.set_source_rgb(1, 1, 1)
    context.paint()
    scale = size * (1 - 2 * margin) / max(width, height)
    context.translate(size / 2, size / 2)
    context.scale(scale, scale)
    context.translate(-(x + width / 2), -(y + height / 2))
    context.set_source_surface(recording, 0, 0)
    context.paint()
    surface.flush()
    pixels = bytes(surface.get_data())  # premultiplied BGRA; opaque everywhere (white below)
    return Image.frombuffer("RGBA", (size, size), pixels, "raw", "BGRA", surface.get_stride(), 1).convert("RGB")


# ------------------------------------------------------------------------- the import


@dataclass
class Job:
    relative: str  # path under SRC, POSIX
    path: str  # the file to read (a symlink's target, inside SRC)
    split_key: str  # the relative path the split is decided by (the target's, for a symlink)


class _RenderTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _RenderTimeout


def _failure(reason: str, detail: str = "") -> dict:
    return {"failed": reason, "detail": detail}


def process(job: Job, size: int) -> dict:
    """One SVG: {"record", "png"} or {"failed": reason, "detail"}; never raises on a bad file."""
    from xml.etree.ElementTree import ParseError

    from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden

    try:
        if os.path.getsize(job.path) > MAX_SVG_BYTES:
            return _failure(f"file over {MAX_SVG_BYTES // 2**20} MB (not parsed)")
        with open(job.path, "rb") as f:
            data = f.read(MAX_SVG_BYTES + 1)
    except OSError as e:
        return _failure("unreadable file", e.strerror or str(e))
    try:
        root = parse(data)
        meta = read_metadata(root)
    except (EntitiesForbidden, DTDForbidden, ExternalReferenceForbidden):
        return _failure("XML entity declarations (refused, never expanded)")
    except ParseError as e:
        return _failure("not well-formed XML", str(e))
    use_alarm = os.name == "posix"  # SIGALRM
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(RENDER_SECONDS)
    try:
        image = render(data, size)
    except _RenderTimeout:
        return _failure(f"render over {RENDER_SECONDS} s (stopped)")
    except MemoryError:
        return _failure("render ran out of memory")
    except BlankDrawing:
        if not has_shapes(root):
            return _failure("holds no drawing (no shape element in the file)")
        return _failure("draws nothing (external images are not fetched, or nothing visible)")
    except Exception as e:  # cairosvg raises many kinds on bad geometry; each is counted, none crashes the import
        return _failure(f"cairosvg cannot draw it ({type(e).__name__})", str(e)[:120])
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    if min(image.convert("L").getextrema()) >= 250:
        return _failure("draws nothing visible on white (blank, or white on transparent)")
    parts = job.relative.split("/")
    category = parts[0] if len(parts) > 1 else "uncategorized"
    stem = Path(parts[-1]).stem
    captions, source, keywords = captions_for(meta, category, stem)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    record = {"image": "images/" + str(Path(job.relative).with_suffix(".png").as_posix()), "captions": captions,
              "split": split_of(job.split_key), "category": category, "keywords": keywords,
              "title_raw": meta.title, "caption_source": source, "source": job.relative}
    return {"record": record, "png": buffer.getvalue()}


WORKER_MEMORY = 4 * 2**30  # address space a rendering process may add; a file that needs more fails alone
_CHUNK = 16
_CRASHED = "renderer crashed (out of memory or a fault in cairo)"


def _limit_memory() -> None:
    import resource

    import cairosvg  # noqa: F401  (imported before the limit: libraries reserve address space when loaded)

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:  # what the process already maps (a forked parent's libraries) plus the allowance
        in_use = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return
    limit = in_use + WORKER_MEMORY if hard == resource.RLIM_INFINITY else min(in_use + WORKER_MEMORY, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _process_chunk(jobs: list[Job], size: int) -> list[dict]:
    return [process(job, size) for job in jobs]


def render_all(jobs: list[Job], size: int, workers: int):
    """(job, result) for every job, in `workers` processes of limited memory. A file that kills
    its process (the kernel's OOM killer, a segfault in cairo) is found by running what was in
    flight again alone, and is reported as crashed; it never hangs or ends the import."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    context = get_context("fork" if os.name == "posix" else "spawn")
    chunks = [jobs[i:i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    suspects: list[Job] = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_limit_memory) as pool:
        futures = {pool.submit(_process_chunk, chunk, size): chunk for chunk in chunks}
        for future in as_completed(futures):
            try:
                yield from zip(futures[future], future.result())
            except BrokenProcessPool:
                suspects += futures[future]
    for job in suspects:  # one at a time, each in a fresh process
        with ProcessPoolExecutor(1, mp_context=context, initializer=_limit_memory) as pool:
            try:
                yield job, pool.submit(_process_chunk, [job], size).result()[0]
            except BrokenProcessPool:
                yield job, _failure(_CRASHED)


def find_svgs(source: Path, report) -> list[Job]:
    """Every *.svg under `source` (sorted), symlinks resolved inside it; what is refused is counted."""
    root = source.resolve()
    jobs = []
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        for d in dirs:
            if os.path.islink(os.path.join(folder, d)):
                report.add("symlinked folder (not followed)", os.path.relpath(os.path.join(folder, d), source),
                           "skipped")
        for name in sorted(files):
            if not name.lower().endswith(".svg"):
                continue
            path = Path(folder) / name
            relative = path.relative_to(source).as_posix()
            target = path.resolve()
            if not target.is_relative_to(root):
                report.add("symlink leaving the source folder", relative, "skipped (never opened)")
                continue
            if not target.is_file():
                report.add("broken symlink", relative, "skipped")
                continue
            jobs.append(Job(relative, str(target), target.relative_to(root).as_posix()))
    return jobs


def import_openclipart(out: str | Path, source: str | Path = DEFAULT_SOURCE, size: int = 64, workers: int = 2,
                       overwrite: bool = False, progress: bool = True) -> dict:
    """Render and caption every SVG under `source` into the prepared data set `out`; returns
    counts per split, per caption source and per failure reason, and the seconds it took."""
    from tqdm import tqdm

    from xmodal.data.importers import NothingImportedError
    from xmodal.data.prepared import ImportReport, RecordWriter, staged_folder

    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"{source}: no such folder (the OpenClipart SVGs; apt-get install openclipart-svg, "
                         f"which puts them in {DEFAULT_SOURCE})")
    if not 8 <= size <= 1024:
        raise ValueError(f"size {size} is out of range; give 8..1024 pixels")
    if workers < 1:
        raise ValueError(f"workers {workers} must be at least 1")
    start = time.perf_counter()
    report = ImportReport(str(source))
    jobs = find_svgs(source, report)
    if not jobs:
        raise NothingImportedError(f"{source}: no .svg files found\n" + report.summary())
    results: list[dict] = []
    with staged_folder(out, overwrite, keep_out=(source,)) as folder:
        bar = tqdm(total=len(jobs), desc="openclipart render", unit="svg", disable=not progress, mininterval=1.0)
        try:
            for job, result in render_all(jobs, size, workers):
                bar.update(1)
                if "failed" in result:
                    example = job.relative + (f": {result['detail']}" if result["detail"] else "")
                    report.add(result["failed"], example, "skipped")
                    continue
                target = folder / result["record"]["image"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(result["png"])
                results.append(result["record"])
        finally:
            bar.close()
        if not results:
            raise NothingImportedError(f"no SVG could be rendered ({len(jobs)} in {source}); nothing written\n"
                                       + report.summary())
        results.sort(key=lambda record: record["source"])
        with RecordWriter(folder) as writer:
            for record in results:
                writer.write(record)
        report.written = len(results)
        report.save(folder)
    counts: dict[str, dict[str, int]] = {"split": {}, "caption_source": {}}
    for record in results:
        for key in counts:
            counts[key][record[key]] = counts[key].get(record[key], 0) + 1
    failed = sum(e["count"] for e in report.problems.values())
    return {"out": str(out), "svgs": len(jobs), "written": len(results),
            "rendered_fraction": round(len(results) / len(jobs), 4), **counts,
            "problems": {k: v["count"] for k, v in report.problems.items()}, "failed": failed,
            "seconds": round(time.perf_counter() - start, 1)}
