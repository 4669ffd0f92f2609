"""The OpenClipart importer: caption rules, the split rule, safe XML, and an import of a small
tree of SVGs written here (good, boilerplate, hostile, broken and empty files)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmodal.cli import main
from xmodal.data import openclipart as oc
from xmodal.data.openclipart import (
    Metadata,
    captions_for,
    clean_description,
    clean_keywords,
    clean_title,
    split_of,
)

SOURCE = Path("/usr/share/openclipart/svg")


def svg(title: str = "", keywords: tuple[str, ...] = (), description: str = "", creator: str = "",
        body: str = '<rect x="10" y="20" width="80" height="40" fill="#d00"/>', width: int = 100, height: int = 100,
        prolog: str = "") -> str:
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return (f'{prolog}<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
            f'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
            f'width="{width}" height="{height}"><metadata><rdf:RDF><cc:Work rdf:about="">'
            f"<dc:title>{title}</dc:title><dc:description>{description}</dc:description>"
            f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
            f"<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>"
            f"</cc:Work></rdf:RDF></metadata>{body}</svg>")


@pytest.mark.parametrize("raw, agents, stem, expected", [
    ("Marshmallow on a Stick", (), "", "Marshmallow on a Stick"),
    ("  wedding   couple ", (), "", "wedding couple"),
    ("Poltrona ufficio", (), "", "Poltrona ufficio"),  # another language is kept
    ("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", (), "", ""),
    ("Lemon SVG theme", (), "", ""),
    ("gramastar", (), "", ""),
    ("Etiquette Icons", (), "", ""),
    ("AIGA_Symbol_Signs", (), "", ""),
    ("SVG Gradient Collection by Alan Horkan, 2004.", (), "", ""),
    ("Clipart by Nicu Buculei - pear", ("Nicu Buculei",), "", "pear"),
    ("Clipart by Nicu Buculei - jigsaw_red_10", ("Nicu Buculei",), "", ""),  # the file name after the author
    ("Clipart by Someone Else", (), "", ""),
    ("Bored dog by Jane Roe", ("Jane Roe",), "", "Bored dog"),
    ("Jane Roe", ("Jane Roe",), "", ""),
    ("Homes Clipart", (), "", "Homes"),
    ("LED Rounded V (Blue)", (), "", "LED Rounded V (Blue)"),
    ("(a fish)", (), "", "a fish"),
    ("fc23", (), "", ""),
    ("logo.svg", (), "", ""),
    ("arrow-down-red", (), "", ""),
    ("t-shirt", (), "", "t-shirt"),
    ("tux", (), "tux", ""),  # the file's own name
    ("12345", (), "", ""),
    ("untitled", (), "", ""),
])
def test_title_rules(raw, agents, stem, expected):
    assert clean_title(raw, agents, stem) == expected


def test_description_keywords_and_caption_source():
    assert clean_description("A simple shield", "shield") == "A simple shield"
    assert clean_description("shield", "Shield!") == ""  # the title again
    assert clean_description("EPS converted from  http://aiga.org", "x") == ""
    assert clean_description("contact: someone@example.org", "x") == ""
    assert clean_description("Part of Hotel Icons Collection", "x") == ""
    assert clean_description("Five moon phases. Easily changed to be more specific.", "moon") == "Five moon phases"
    assert clean_description(" ".join(["word"] * 40), "x") == ""
    assert clean_keywords(["Fruit", "hash", "", "food", "fruit", "en", "lemon_theme_icon", "Jane Roe", "icon_12"],
                          ["Jane Roe"]) == ["fruit", "food"]
    meta = Metadata("gramastar", "", ["stars", "shapes", "geometry", "magick"], ["codifiedivining"])
    assert captions_for(meta, "shapes") == (["stars, geometry, shapes"], "keywords", ["stars", "shapes", "geometry"])
    assert captions_for(Metadata("Lemon SVG theme"), "signs_and_symbols")[:2] == (["signs and symbols"], "category")
    assert captions_for(Metadata("Apple Pie", "A warm apple pie"), "food")[:2] == (["Apple Pie", "A warm apple pie"],
                                                                                   "title")


def test_split_rule_is_the_stated_one():
    paths = [f"food/item_{i}.svg" for i in range(400)]
    splits = [split_of(p) for p in paths]
    for p, s in zip(paths, splits):
        first = hashlib.sha1(p.encode()).hexdigest()[0]
        assert s == {"f": "test", "e": "val"}.get(first, "train")
    assert {"train", "val", "test"} == set(splits)


BOMB = ('<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
        '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>')


def _tree(root: Path) -> Path:
    src = root / "svg"
    (src / "food" / "fruit").mkdir(parents=True)
    (src / "shapes").mkdir()
    (src / "food" / "fruit" / "apple.svg").write_text(svg("Red Apple", ("fruit", "food"), "A shiny red apple"))
    (src / "food" / "pie.svg").write_text(svg("Apple Pie", width=400, height=100,  # wide: padded, not stretched
                                                  body='<rect x="0" y="0" width="400" height="100" fill="#0a0"/>'))
    (src / "shapes" / "star.svg").write_text(svg("gramastar", ("stars", "shapes", "geometry"), creator="someone",
                                               body='<circle cx="50" cy="50" r="30" fill="#00f"/>'))
    (src / "shapes" / "bomb.svg").write_text(svg("&c;", prolog=BOMB))
    (src / "shapes" / "broken.svg").write_text("<svg><rect></svg")
    (src / "shapes" / "empty.svg").write_text(svg("Nothing here", body=""))
    (src / "shapes" / "offpage.svg").write_text(svg("Off the page", body='<rect x="500" y="500" width="50" height="50"/>'))
    (src / "shapes" / "notes.txt").write_text("not an svg")
    os.symlink("../food/fruit/apple.svg", src / "shapes" / "apple-copy.svg")  # a copy inside the tree
    outside = root / "secret.svg"
    outside.write_text(svg("Secret"))
    os.symlink(outside, src / "shapes" / "leak.svg")  # points out of SRC
    return src


def test_import_renders_captions_and_counts_every_failure(tmp_path, capsys):
    src = _tree(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "openclipart", str(src), str(out), "--size", "32", "--workers", "2", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out)
    records = {r["source"]: r for r in map(json.loads, (out / "captions.jsonl").read_text().splitlines())}
    assert sorted(records) == ["food/fruit/apple.svg", "food/pie.svg", "shapes/apple-copy.svg", "shapes/offpage.svg",
                               "shapes/star.svg"]
    apple = records["food/fruit/apple.svg"]
    assert apple["captions"] == ["Red Apple", "A shiny red apple"] and apple["category"] == "food"
    assert apple["keywords"] == ["fruit", "food"] and apple["title_raw"] == "Red Apple"
    assert apple["caption_source"] == "title" and apple["split"] == split_of("food/fruit/apple.svg")
    copy = records["shapes/apple-copy.svg"]
    assert copy["category"] == "shapes" and copy["split"] == apple["split"]  # split by its target's path
    star = records["shapes/star.svg"]
    assert star["captions"] == ["stars, geometry, shapes"] and star["caption_source"] == "keywords"
    report = json.loads((out / "import_report.json").read_text())["problems"]
    assert report["XML entity declarations (refused, never expanded)"]["examples"] == ["shapes/bomb.svg"]
    assert report["not well-formed XML"]["count"] == 1
    assert report["holds no drawing (no shape element in the file)"]["examples"] == ["shapes/empty.svg"]
    assert report["symlink leaving the source folder"]["examples"] == ["shapes/leak.svg"]
    assert stats["written"] == 5 and stats["failed"] == 4
    pie = np.asarray(Image.open(out / records["food/pie.svg"]["image"]))
    assert pie.shape == (32, 32, 3)
    ink = np.argwhere(pie.min(axis=2) < 128)
    assert ink[:, 1].min() <= 2 and ink[:, 1].max() >= 29  # the drawing's width fills the square ...
    assert ink[:, 0].min() >= 10 and ink[:, 0].max() <= 21  # ... its height keeps the 4:1 aspect, centred
    assert pie[0, 0].tolist() == [255, 255, 255]
    off = np.asarray(Image.open(out / records["shapes/offpage.svg"]["image"]))
    assert off.min() < 50  # drawn although it lies off its page


def test_import_refuses_bad_arguments_and_keeps_sources(tmp_path, capsys):
    src = _tree(tmp_path)
    assert main(["data", "openclipart", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["data", "openclipart", str(src), str(tmp_path / "o"), "--size", "100000"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "openclipart", str(empty), str(tmp_path / "o2"), "--quiet"]) == 1
    assert not (tmp_path / "o2").exists()
    assert main(["data", "openclipart", str(src), str(src), "--overwrite", "--quiet"]) == 2  # never replaces SRC
    assert (src / "food" / "pie.svg").is_file()


def test_a_file_that_kills_its_renderer_is_counted_not_fatal(tmp_path, monkeypatch):
    src = _tree(tmp_path)
    real = oc.process

    def crash_on_pie(job, size):
        if job.relative == "food/pie.svg":
            os._exit(9)  # as the kernel's OOM killer or a segfault in cairo would end it
        return real(job, size)

    monkeypatch.setattr(oc, "process", crash_on_pie)
    stats = oc.import_openclipart(tmp_path / "out", src, size=16, workers=2, progress=False)
    assert stats["problems"]["renderer crashed (out of memory or a fault in cairo)"] == 1
    assert stats["written"] == 4


@pytest.mark.skipif(not SOURCE.is_dir(), reason="openclipart-svg not installed (apt-get install openclipart-svg)")
def test_real_package_files_render(tmp_path):
    files = sorted(SOURCE.glob("food/**/*.svg"))[:6]
    for f in files:
        image = oc.render(f.read_bytes(), 32)
        assert image.size == (32, 32) and min(image.convert("L").getextrema()) < 250


def test_what_a_killed_import_left_is_cleaned_by_the_next(tmp_path, capsys):
    import subprocess
    import sys

    src = _tree(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{dead.stdout.strip()}"  # as `kill -9` during an import leaves it
    (stale / "images").mkdir(parents=True)
    alive = tmp_path / f".out.partial-{os.getppid()}"  # a running import's folder is never touched
    alive.mkdir()
    assert main(["data", "openclipart", str(src), str(tmp_path / "out"), "--quiet", "--workers", "1"]) == 0
    assert not stale.exists() and alive.is_dir() and (tmp_path / "out" / "captions.jsonl").is_file()
