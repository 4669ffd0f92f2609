"""Importers as a hostile user drives them: nothing outside OUT is read or written, no source
file changes, every refusal is counted, and a failed import leaves no half data set."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from xmodal.cli import main
from xmodal.data.prepared import read_records


def png(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def snapshot(root, skip):
    """Every file below root (but inside `skip`): path -> (is link, bytes digest)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        if dirpath.startswith(str(skip)):
            continue
        for f in files:
            p = os.path.join(dirpath, f)
            link = os.path.islink(p)
            data = os.readlink(p).encode() if link else Path(p).read_bytes()
            out[p] = (link, hashlib.sha1(data).hexdigest())
    return out


@pytest.fixture
def tree(tmp_path):
    png(tmp_path / "victim" / "victim.png", (1, 2, 3))
    png(tmp_path / "esc" / "x.png", (4, 5, 6))
    png(tmp_path / "pics" / "ok.png")
    png(tmp_path / "pics" / "sub" / "inner.png")
    os.symlink(tmp_path / "victim" / "victim.png", tmp_path / "pics" / "link.png")
    os.symlink(tmp_path / "pics" / "ok.png", tmp_path / "pics" / "inside-link.png")
    rows = [b"image,caption", b"ok.png,a red square", f"{tmp_path}/victim/victim.png,absolute".encode(),
            b"../esc/x.png,escape", b"sub/../../esc/x.png,escape again", b"link.png,link out",
            b"inside-link.png,link in", b"sub/inner.png,caf\xe9 au lait", b"sub/./inner.png,a second caption"]
    (tmp_path / "caps.csv").write_bytes(b"\n".join(rows) + b"\n")
    return tmp_path


def test_folder_import_stays_inside_and_counts_every_refusal(tree, capsys):
    before = snapshot(tree, tree / "out")
    assert main(["data", "folder", "--captions", str(tree / "caps.csv"), "--images", str(tree / "pics"),
                 str(tree / "out")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["problems"] == {"path outside the image folder": 3, "symlink leaving the image folder": 1,
                                   "undecodable text": 1}
    assert snapshot(tree, tree / "out") == before  # no source touched, nothing written outside OUT
    records = read_records(tree / "out")
    assert sorted(r["image"] for r in records) == ["images/inside-link.png", "images/ok.png", "images/sub/inner.png"]
    assert all((tree / "out" / r["image"]).resolve().is_relative_to((tree / "out").resolve()) for r in records)
    report = json.loads((tree / "out" / "import_report.json").read_text())
    assert "line 8" in report["problems"]["undecodable text"]["examples"][0]
    assert "café" in report["problems"]["undecodable text"]["examples"][0]  # how it reads as cp1252


def test_follow_symlinks_and_symlink_mode_never_touch_the_source(tree, capsys):
    before = snapshot(tree, tree / "out")
    ann = {"images": [{"id": 1, "file_name": str(tree / "victim" / "victim.png")}, {"id": 2, "file_name": "link.png"},
                      {"id": 3, "file_name": "ok.png"}],
           "annotations": [{"image_id": i, "id": i, "caption": "x"} for i in (1, 2, 3)]}
    (tree / "ann.json").write_text(json.dumps(ann))
    before = snapshot(tree, tree / "out")
    assert main(["data", "coco", "--annotations", str(tree / "ann.json"), "--images", str(tree / "pics"),
                 str(tree / "out"), "--mode", "symlink", "--follow-symlinks"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 2 and summary["problems"] == {"path outside the image folder": 1}
    assert snapshot(tree, tree / "out") == before
    assert os.path.islink(tree / "victim" / "victim.png") is False


def test_existing_output_needs_overwrite_and_a_failed_import_writes_nothing(tree, capsys):
    assert main(["data", "shapes", str(tree / "out"), "--count", "20", "--quiet"]) == 0
    args = ["data", "folder", "--captions", str(tree / "caps.csv"), "--images", str(tree / "pics"), str(tree / "out")]
    assert main(args) == 2 and "not empty" in capsys.readouterr().err
    assert len(read_records(tree / "out")) == 20  # untouched
    assert main([*args, "--overwrite"]) == 0
    assert len(read_records(tree / "out")) == 3 and len(list((tree / "out" / "images").rglob("*.png"))) == 3
    (tree / "bad.csv").write_text("image,caption\n" + "".join(f"../nope{i}.png,x\n" for i in range(1000)))
    assert main(["data", "folder", "--captions", str(tree / "bad.csv"), "--images", str(tree / "pics"),
                 str(tree / "new")]) == 1
    err = capsys.readouterr().err
    assert "no image could be imported" in err and "path outside the image folder: 1000" in err
    assert not (tree / "new").exists() and not list(tree.glob(".new.partial-*"))
    assert main([*args[:-1], str(tree / "pics"), "--overwrite"]) == 2  # OUT holding the sources: refused
    assert "holds the source" in capsys.readouterr().err and (tree / "pics" / "ok.png").is_file()
