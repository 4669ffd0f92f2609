import csv
import json

from PIL import Image

from xmodal.cli import main
from xmodal.data.prepared import read_records


def make_images(folder, names, broken=()):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / n)
    for n in broken:
        (folder / n).write_bytes(b"\x89PNG broken")


def run(args, capsys):
    assert main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_coco(tmp_path, capsys):
    make_images(tmp_path / "img", ["1.jpg", "2.jpg", "4.jpg"], broken=["3.jpg"])
    ann = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}, {"id": 3, "file_name": "3.jpg"},
                   {"id": 1, "file_name": "dup.jpg"}, {"id": 5, "file_name": "missing.jpg"}, {"id": 4, "file_name": "4.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A dog."}, {"image_id": 1, "id": 11, "caption": "A brown dog"},
            {"image_id": 1, "id": 11, "caption": "repeated id"}, {"image_id": 2, "id": 12, "caption": "  "},
            {"image_id": 3, "id": 13, "caption": "broken file"}, {"image_id": 5, "id": 14, "caption": "gone"},
            {"image_id": 9, "id": 15, "caption": "no such image"}, {"image_id": 4, "id": 16, "caption": "a cat"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    out = run(["data", "coco", "--annotations", str(tmp_path / "captions.json"), "--images", str(tmp_path / "img"),
               str(tmp_path / "out"), "--split", "val"], capsys)
    assert out["written"] == 2
    assert out["problems"] == {"duplicate image id": 1, "duplicate annotation id": 1, "caption for unknown image": 1,
                               "empty caption": 1, "image without captions": 1, "unreadable image": 1, "missing image": 1}
    records = read_records(tmp_path / "out")
    assert [r["captions"] for r in records] == [["A dog.", "A brown dog"], ["a cat"]]
    assert records[0]["split"] == "val" and (tmp_path / "out" / records[0]["image"]).is_file()
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert report["problems"]["missing image"]["examples"] == ["missing.jpg"]


def test_coco_not_json(tmp_path, capsys):
    (tmp_path / "c.json").write_text("{nope")
    assert main(["data", "coco", "--annotations", str(tmp_path / "c.json"), "--images", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_karpathy(tmp_path, capsys):
    make_images(tmp_path / "img", ["train2014/a.jpg", "val2014/b.jpg"])
    data = {"images": [
        {"filepath": "train2014", "filename": "a.jpg", "split": "restval", "cocoid": 1,
         "sentences": [{"raw": "A man riding.", "tokens": ["a", "man", "riding"]}, {"tokens": ["only", "tokens"]}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "test", "sentences": [{"raw": "a bus"}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "test", "sentences": [{"raw": "dup"}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "missing"}]},
    ]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    out = run(["data", "karpathy", "--json", str(tmp_path / "dataset_coco.json"), "--images", str(tmp_path / "img"),
               str(tmp_path / "out")], capsys)
    assert out["written"] == 2 and out["problems"] == {"duplicate image id": 1, "missing image": 1}
    records = read_records(tmp_path / "out")
    assert records[0]["split"] == "train" and records[0]["captions"] == ["A man riding.", "only tokens"]
    assert records[1]["split"] == "test" and records[1]["image"] == "images/val2014/b.jpg"


def test_flickr_token(tmp_path, capsys):
    make_images(tmp_path / "img", ["1000.jpg"], broken=["2000.jpg"])
    (tmp_path / "f.token").write_text(
        "1000.jpg#0\tA child in pink .\n1000.jpg#1\tA girl going into a building .\n1000.jpg#1\tdup\n"
        "garbage line without tab\n2000.jpg#0\tbroken image\n3000.jpg#0\tmissing image\n")
    out = run(["data", "flickr", "--token", str(tmp_path / "f.token"), "--images", str(tmp_path / "img"),
               str(tmp_path / "out"), "--mode", "symlink"], capsys)
    assert out["written"] == 1
    assert out["problems"] == {"duplicate caption id": 1, "malformed line": 1, "unreadable image": 1, "missing image": 1}
    records = read_records(tmp_path / "out")
    assert records[0]["captions"] == ["A child in pink .", "A girl going into a building ."]
    assert (tmp_path / "out" / "images" / "1000.jpg").is_symlink()


def test_folder_jsonl_and_csv(tmp_path, capsys):
    make_images(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "c.jsonl").write_text(
        '{"image": "a.png", "captions": ["one", "two"], "split": "val"}\nnot json\n'
        '{"image": "b.png", "caption": "three"}\n{"image": "a.png", "caption": "four"}\n{"caption": "no image"}\n')
    out = run(["data", "folder", "--captions", str(tmp_path / "c.jsonl"), "--images", str(tmp_path / "img"),
               str(tmp_path / "o1")], capsys)
    assert out["written"] == 2 and out["problems"] == {"malformed line": 2, "repeated image": 1}
    records = read_records(tmp_path / "o1")
    assert records[0]["captions"] == ["one", "two", "four"] and records[0]["split"] == "val"
    with (tmp_path / "c.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([["a.png", "first"], ["a.png", "second"], ["b.png", ""], ["zzz.png", "missing"]])
    out = run(["data", "folder", "--captions", str(tmp_path / "c.csv"), "--images", str(tmp_path / "img"),
               str(tmp_path / "o2")], capsys)
    assert out["written"] == 1
    assert out["problems"] == {"repeated image": 1, "empty caption": 1, "image without captions": 1, "missing image": 1}
