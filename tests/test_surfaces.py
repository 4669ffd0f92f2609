import json

import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_models

import xmodal
from xmodal.cli import main
from xmodal.data.shapes import ShapesDataset
from xmodal.models.registry import create_model
from xmodal.tasks.text_encoders import prepare_text_encoder


@pytest.mark.slow
def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, xmodal; bad = [m for m in ('torch', 'transformers', 'diffusers', 'gensim') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_a_card_quality_line_that_is_not_json_is_shown_without_it():
    from xmodal.api import _card_quality

    assert _card_quality("# m\n\nquality: {\"bleu4\": 0.9}\n") == {"bleu4": 0.9}
    assert _card_quality("# m\n") == {}
    with pytest.warns(UserWarning, match="README.md: its quality line is not JSON"):
        assert _card_quality("quality: {\"speed\": FILL_ME}\n", "README.md") == {}


def test_bundled_captioner_is_listed_and_reads_shapes(capsys):
    models = {m["name"]: m for m in xmodal.list_models()}
    assert "shapes-captioner" in models and models["shapes-captioner"]["task"] == "image-to-text"
    assert models["shapes-captioner"]["quality"]["test_exact_match"] >= 0.99
    assert main(["models"]) == 0 and "shapes-captioner" in capsys.readouterr().out
    data = ShapesDataset("test", count=20, seed=55)
    captioner = xmodal.load("shapes-captioner")
    captions = captioner([data.item(i)[1] for i in range(20)], method="greedy")
    from xmodal.worlds.shapes import Scene, parse

    right = sum(parse(c) == Scene.from_dict(data.item(i)[0]["scene"]).spec for i, c in enumerate(captions))
    assert right >= 18  # a real trained model, not a stub


def test_unknown_model_name_lists_bundled():
    with pytest.raises(ValueError, match="bundled: .*fashion-generator.*shapes-captioner"):
        xmodal.load("no-such-model")


def test_a_default_name_stands_for_the_bundled_model_measured_best(tmp_path, monkeypatch, capsys):
    from xmodal.models.folders import ALIASES, BUNDLED_DIR, resolve_model_dir

    assert ALIASES["fashion-generator"] == "fashion-gan"
    assert resolve_model_dir("fashion-generator") == BUNDLED_DIR / "fashion-gan"
    models = {m["name"]: m for m in xmodal.list_models()}
    assert models["fashion-generator"]["alias_of"] == "fashion-gan" and "alias_of" not in models["fashion-gan"]
    assert models["fashion-generator"]["quality"] == models["fashion-gan"]["quality"]
    assert main(["models"]) == 0 and "fashion-generator (= fashion-gan)" in capsys.readouterr().out
    (tmp_path / "fashion-generator").mkdir()  # a folder of that name here: still the bundled one, with a warning
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="give ./fashion-generator for the folder"):
        assert resolve_model_dir("fashion-generator") == BUNDLED_DIR / "fashion-gan"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("clip"), seed=7, kinds=("clip",)) / "clip"


def test_search_both_ways(tiny_clip, tmp_path, capsys):
    main(["data", "shapes", str(tmp_path / "d"), "--split", "test", "--count", "6", "--quiet"])
    capsys.readouterr()
    assert main(["search", str(tmp_path / "d"), "--text", "a small red circle", "--model", str(tiny_clip), "--top", "3"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"]
    image = next((tmp_path / "d" / "images").iterdir())
    assert main(["search", str(tmp_path / "d"), "--image", str(image), "--model", str(tiny_clip)]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 5 and "caption" in hits[0]
    assert main(["search", str(tmp_path / "d"), "--model", str(tiny_clip)]) == 2


def test_demo_writes_sheet(tmp_path, capsys):
    ds = ShapesDataset("train", count=8, seed=8)
    captions = [c for i in range(8) for c in ds[i][1]] + ["a large green triangle", "a small purple circle above a large orange square"]
    encoder, spec = prepare_text_encoder({"kind": "learned", "dim": 16}, captions)
    torch.manual_seed(0)
    gen = create_model("cvae", text_encoder=encoder, z_dim=4, channels=(16, 8, 8, 4, 4))
    gen.eval().save_pretrained(tmp_path / "gen")
    assert main(["demo", "--generator", str(tmp_path / "gen"), "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "round trips match" in out and "a large red circle" in out
    assert Image.open(tmp_path / "demo" / "sheet.png").size[0] > 400
    assert (tmp_path / "demo" / "sheet.html").read_text().count("<img") == 8
