"""Hostile import suite: what an importer reads and writes when the captions file points outside.

    python benchmarks/hostile_import.py [--rows 2000]

Builds a tree: an image folder with good pictures, symlinks leading out and in, and a captions
CSV whose rows name good images, absolute paths and `..` escapes to files outside (a "victim"
folder and an "escape" folder), names that are too long, and lines that are not UTF-8. Runs
`xmodal data folder` and `xmodal data coco --mode symlink` under strace (every open, rename,
unlink, link and mkdir of the importer process and its children) and reports: files outside the
image folder and captions file that were opened, paths outside OUT (and its staging folder)
written, source files changed, and the refusals the import report counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

WRITE_CALLS = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "link", "linkat", "symlink", "symlinkat",
               "mkdir", "mkdirat", "rmdir", "creat")


def build(root: Path, rows: int) -> None:
    for folder, n in (("victim", 5), ("escape", 5), ("pics", 20)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(root / folder / f"{i}.png")
    os.symlink(root / "victim" / "0.png", root / "pics" / "out-link.png")
    os.symlink(root / "pics" / "0.png", root / "pics" / "in-link.png")
    lines = [b"image,caption"]
    for k in range(rows):
        kind = k % 8
        name = {0: f"{k % 20}.png", 1: f"{root}/victim/{k % 5}.png", 2: f"../escape/{k % 5}.png",
                3: f"../../{k % 5}.png", 4: "out-link.png", 5: "in-link.png", 6: "x" * 300 + ".png",
                7: f"{k % 20}.png"}[kind]
        caption = "caf\xe9".encode("cp1252") if kind == 7 else f"picture {k}".encode()
        lines.append(name.encode() + b"," + caption)
    (root / "caps.csv").write_bytes(b"\n".join(lines) + b"\n")
    ann = {"images": [{"id": i, "file_name": f"{root}/victim/0.png" if i % 2 else f"{i % 20}.png"} for i in range(40)],
           "annotations": [{"id": i, "image_id": i, "caption": f"c {i}"} for i in range(40)]}
    (root / "ann.json").write_text(json.dumps(ann))


def digests(root: Path, skip: tuple[str, ...]) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        if any(dirpath.startswith(s) for s in skip):
            continue
        for f in files:
            p = Path(dirpath) / f
            out[str(p)] = os.readlink(p) if p.is_symlink() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def traced(cmd: list[str], log: Path) -> tuple[int, list[tuple[str, str, bool]]]:
    """Exit code, and (syscall, path, writes) of every file call the command and its children made."""
    if shutil.which("strace") is None:
        return subprocess.run(cmd, capture_output=True).returncode, []
    calls = "open,openat,creat," + ",".join(WRITE_CALLS)
    code = subprocess.run(["strace", "-f", "-qq", "-e", f"trace={calls}", "-o", str(log), *cmd],
                          capture_output=True).returncode
    found = []
    for line in log.read_text(errors="replace").splitlines():
        call = re.search(r"(\w+)\(", line)
        if call is None:
            continue
        name = call.group(1)
        paths = re.findall(r"\"([^\"]*)\"", line)
        if name.startswith(("symlink", "link")) and paths:  # (target, new path): only the new path is written
            found.append((name, paths[0], False))
            paths = paths[1:]
        writes = name in WRITE_CALLS or bool(re.search(r"O_(CREAT|WRONLY|RDWR|TRUNC)", line))
        found.extend((name, path, writes) for path in paths)
    return code, found


def run(root: Path, name: str, args: list[str]) -> dict:
    out = root / name
    before = digests(root, (str(out),))
    code, calls = traced([sys.executable, "-m", "xmodal", "data", *args, str(out)], root / f"{name}.strace")
    after = digests(root, (str(out), str(root / f"{name}.strace")))
    inside = lambda p, *dirs: any(os.path.abspath(p).startswith(str(d)) for d in dirs)  # noqa: E731
    outside_reads = sorted({p for _, p, _ in calls if inside(p, root / "victim", root / "escape")})
    staging = [str(out), str(root / f".{name}.partial"), str(root / f".{name}.old")]
    writes = sorted({p for _, p, w in calls if w and inside(p, root)
                     and not any(os.path.abspath(p).startswith(s) for s in staging)})
    report = json.loads((out / "import_report.json").read_text()) if (out / "import_report.json").is_file() else {}
    return {"exit": code, "written": report.get("written"),
            "refused": {k: v["count"] for k, v in report.get("problems", {}).items()},
            "files_outside_opened": outside_reads, "paths_outside_out_written": writes,
            "source_files_changed": sorted(k for k in before if before[k] != after.get(k)),
            "syscalls_traced": len(calls)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.rows)
        result = {"rows": args.rows, "strace": shutil.which("strace") is not None,
                  "folder": run(root, "out-folder", ["folder", "--captions", str(root / "caps.csv"),
                                                     "--images", str(root / "pics")]),
                  "coco_symlink": run(root, "out-coco", ["coco", "--annotations", str(root / "ann.json"),
                                                         "--images", str(root / "pics"), "--mode", "symlink"])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
