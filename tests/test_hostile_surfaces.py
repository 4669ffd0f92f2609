"""The CLI, the API and the server as a careless or hostile user drives them: clean errors, no
tracebacks, bounded work, nothing lost."""

import json
import os
import warnings

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from tiny_models import save_tiny_models

import xmodal
from xmodal.cli import main
from xmodal.models.diffusion import SAMPLERS, max_steps
from xmodal.models.hub import ModelLoadError, load_model
from xmodal.server import ServerLimits, create_app


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"), seed=12, kinds=("gen", "cap", "diff"))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_takes_every_step_count_validation_allows(models, sampler):
    pipe = xmodal.load(str(models / "diff"))
    most = max_steps(sampler, 1000, "squaredcos_cap_v2")
    assert most == (995 if sampler == "dpm" else 1000)
    for steps in (1, 2, most):
        image = pipe("a small red circle", steps=steps, guidance=1.0, sampler=sampler)[0]
        assert np.isfinite(np.asarray(image, dtype=float)).all()
    with pytest.raises(ValueError, match=f"steps must be in 1..{most} for the {sampler} sampler, got {most + 1}"):
        pipe("a small red circle", steps=most + 1, sampler=sampler)


def test_bad_model_config_is_a_model_load_error(models, tmp_path):
    import shutil

    shutil.copytree(models / "cap", tmp_path / "cap")
    meta = json.loads((tmp_path / "cap" / "config.json").read_text())
    meta["config"]["encoder_dim"] = "abc"
    (tmp_path / "cap" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="encoder_dim = 'abc' is not of type int"):
        load_model(tmp_path / "cap")


def test_cli_errors_are_one_clean_line(models, tmp_path, capsys):
    cases = [
        (["generate", "a red circle", "--model", str(models / "cap")], "image-to-text model"),
        (["caption", str(tmp_path), "--model", str(models / "gen")], "text-to-image model"),
        (["generate", "a red circle", "--model", str(models / "diff"), "--guidance", "nan"], "guidance"),
        (["generate", "a red circle", "--model", str(models / "diff"), "-n", "1000000000"], "-n must be in"),
        (["generate", "a red circle", "--model", str(models / "diff"), "--seed", str(10**23)], "--seed must be within"),
        (["generate", "a red circle", "--model", str(models / "diff"), "--steps", "999", "--sampler", "dpm"],
         "steps must be in 1..995 for the dpm sampler"),
        (["train", "configs/shapes-captioner.toml", "--train.steps=abc"], "steps = 'abc' is not of type int"),
    ]
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def test_generate_streams_and_a_rerun_skips_what_exists(models, tmp_path, capsys):
    args = ["generate", "a small red circle", "a large blue square", "--model", str(models / "gen"), "-n", "3",
            "--batch-size", "2", "--out", str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["seed"] for x in first] == [0, 1, 2, 3, 4, 5] and not list((tmp_path / "out").glob("*.tmp"))
    victim = first[4]["file"]
    before = np.asarray(Image.open(victim)).astype(int)
    os.remove(victim)  # as if the run had been killed before this image
    assert main([*args, "--skip-existing"]) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["file"] for x in again] == [victim]
    assert np.abs(np.asarray(Image.open(victim)).astype(int) - before).max() <= 1
    # a file that cannot be written stops the run with one line naming it; what came before stays
    blocked = tmp_path / "blocked"
    (blocked / "0000-01-seed1.png").mkdir(parents=True)
    assert main([*args[:-3], "--out", str(blocked)]) == 2
    captured = capsys.readouterr()
    assert "0000-01-seed1.png" in captured.err and "Traceback" not in captured.err
    assert [p.name for p in sorted(blocked.iterdir())] == ["0000-00-seed0.png", "0000-01-seed1.png"]


def test_a_local_folder_does_not_shadow_a_bundled_name(models, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(models / "cap", tmp_path / "shapes-captioner")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"bundled model and also a folder here.*\./shapes-captioner"):
        bundled = xmodal.load("shapes-captioner")
    assert bundled.model.config.decoder_dim == 256  # the bundled one, not the tiny folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xmodal.load("./shapes-captioner").model.config.decoder_dim == 16


def test_server_work_budget_and_heavy_queue(models):
    limits = ServerLimits(work=400, heavy_work=40)
    with TestClient(create_app(str(models / "diff"), str(models / "cap"), limits=limits)) as client:
        too_much = client.post("/v1/generate", json={"prompt": "a small red circle", "steps": 995, "n": 16,
                                                     "guidance": 50})
        assert too_much.status_code == 413 and "31840 network evaluations" in too_much.json()["detail"]
        light = client.post("/v1/generate", json={"prompt": "a small red circle", "steps": 2, "guidance": 1})
        heavy = client.post("/v1/generate", json={"prompt": "a small red circle", "steps": 100, "guidance": 1})
        assert light.status_code == 200 and heavy.status_code == 200
        assert client.app.state.batchers["generate"].jobs == 1 and client.app.state.service.heavy_done == 1
        bad = client.post("/v1/generate", json={"prompt": "a small red circle", "steps": 996, "sampler": "dpm"})
        assert bad.status_code == 400 and "1..995" in bad.json()["detail"]
