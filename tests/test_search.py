"""The embedding index behind `xmodal index` / `xmodal search`: built once, reused, refreshed
when files change, rebuilt when damaged, and equal to ranking by brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_models import save_tiny_models

from xmodal import search as search_module
from xmodal.cli import main
from xmodal.pipelines import load_pipeline
from xmodal.search import INDEX_FOLDER, load_index, query


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(save_tiny_models(tmp_path_factory.mktemp("clip"), seed=7, kinds=("clip",)) / "clip")


@pytest.fixture()
def data(tmp_path, capsys):
    main(["data", "shapes", str(tmp_path / "d"), "--split", "test", "--count", "8", "--quiet"])
    capsys.readouterr()
    return tmp_path / "d"


class Counting:
    """The real pipeline, counting what it embeds."""

    def __init__(self, pipe):
        self.pipe, self.model, self.images, self.texts = pipe, pipe.model, 0, 0

    def embed_images(self, images):
        self.images += len(images)
        return self.pipe.embed_images(images)

    def embed_texts(self, texts):
        self.texts += len(texts)
        return self.pipe.embed_texts(texts)


def test_index_matches_brute_force_and_is_reused(tiny_clip, data, monkeypatch):
    index, pipe = load_index(tiny_clip, data)
    assert len(index.paths) == 8 and (data / INDEX_FOLDER).is_dir()
    paths = [data / p for p in index.paths]
    direct = pipe.embed_images(paths).numpy()
    assert np.allclose(index.image_embeddings, direct, atol=2e-3)  # stored as float16
    hits = query(index, pipe, data, text="a small red circle", top=8)
    scores = direct @ pipe.embed_texts(["a small red circle"])[0].numpy()
    assert [h["image"] for h in hits[:3]] == [str(paths[i]) for i in np.argsort(-scores)[:3]]

    def no_model(*a, **k):
        raise AssertionError("an unchanged collection must not load the model again")

    monkeypatch.setattr("xmodal.pipelines.load_pipeline", no_model)
    again, _ = load_index(tiny_clip, data)
    assert again.paths == index.paths and np.array_equal(again.image_embeddings, index.image_embeddings.astype(np.float16).astype(np.float32))


def test_changed_added_and_removed_files_refresh_only_themselves(tiny_clip, data):
    index, _ = load_index(tiny_clip, data)
    counting = Counting(load_pipeline(tiny_clip, "image-text-alignment"))
    first = data / index.paths[0]
    Image.new("RGB", (64, 64), "blue").save(first)  # changed content (and size / mtime)
    (data / index.paths[1]).unlink()
    records = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    records = [r for r in records if r["image"] != index.paths[1]]
    Image.new("RGB", (64, 64), "green").save(data / "images" / "new.png")
    records.append({"image": "images/new.png", "captions": ["a green square"], "split": "test"})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fresh, _ = load_index(tiny_clip, data, pipe=counting)
    assert counting.images == 2  # the changed one and the new one
    assert index.paths[1] not in fresh.paths and "images/new.png" in fresh.paths
    assert "a green square" in fresh.captions


def test_damaged_or_unwritable_index_is_rebuilt_not_trusted(tiny_clip, data, tmp_path):
    index, _ = load_index(tiny_clip, data)
    stored = next((data / INDEX_FOLDER).iterdir())
    stored.write_bytes(b"not an npz file")
    with pytest.warns(UserWarning, match="unreadable index"):
        rebuilt, _ = load_index(tiny_clip, data)
    assert rebuilt.paths == index.paths
    other = tmp_path / "plain"
    other.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), ("red", "green", "blue")[i]).save(other / f"{i}.png")
    (other / INDEX_FOLDER).write_text("a file where the index folder would go")
    with pytest.warns(UserWarning, match="cannot store the index"):
        plain, pipe = load_index(tiny_clip, other)
    assert len(plain.paths) == 3 and plain.captions == []
    with pytest.raises(ValueError, match="no captions.jsonl"):
        query(plain, pipe, other, image=other / "0.png")


def test_queries_file_answers_each_line_and_names_bad_ones(tiny_clip, data, tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    image = next((data / "images").iterdir())
    lines = [{"text": "a red circle", "id": 1}, "not json", {"image": str(image)}, {"image": "missing.png"},
             {"text": "x", "image": "y"}]
    queries.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    assert main(["search", str(data), "--queries-file", str(queries), "--model", tiny_clip, "--top", "2"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [("hits" in line, "error" in line) for line in lines] == [(True, False), (False, True), (True, False),
                                                                      (False, True), (False, True)]
    assert lines[0]["id"] == 1 and len(lines[0]["hits"]) == 2 and "caption" in lines[2]["hits"][0]
    assert "invalid JSON" in lines[1]["error"] and "missing.png" in lines[3]["error"]


def test_index_and_search_commands_with_a_sheet(tiny_clip, data, tmp_path, capsys):
    assert main(["index", str(data), "--model", tiny_clip]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8
    sheet = tmp_path / "hits.png"
    assert main(["search", str(data), "--text", "a blue square", "--model", tiny_clip, "--top", "4",
                 "--sheet", str(sheet)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4 and Image.open(sheet).width > 0
    assert main(["search", str(data), "--text", "x", "--image", "y.png", "--model", tiny_clip]) == 2
    assert main(["index", str(tmp_path / "nowhere"), "--model", tiny_clip]) == 2


def test_index_path_never_leaves_the_data_folder(tmp_path):
    path = search_module.index_path(tmp_path, tmp_path / ".." / "x" / "../../etc")
    assert path.parent == tmp_path / INDEX_FOLDER


def test_many_queries_load_the_model_once(tiny_clip, data, tmp_path, monkeypatch, capsys):
    import xmodal.pipelines

    load_index(tiny_clip, data)  # an index already up to date
    real, loads = xmodal.pipelines.load_pipeline, []
    monkeypatch.setattr(xmodal.pipelines, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"text": f"a red circle {i}"}) + "\n" for i in range(20)))
    assert main(["search", str(data), "--queries-file", str(queries), "--model", tiny_clip]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 20 and len(loads) == 1
