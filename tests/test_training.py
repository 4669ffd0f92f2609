import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_trainer

from xmodal.training.config import ConfigError, apply_overrides, build_dataclass, load_config
from xmodal.training.loop import TrainConfig

HELPER = Path(__file__).parent / "helpers" / "tiny.py"


def weights(folder):
    return load_file(str(Path(folder) / "model" / "model.safetensors"))


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_loss_falls_and_logs(tmp_path):
    trainer = make_trainer(tmp_path, steps=30)
    summary = trainer.train()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 30 and len(log) == 30
    assert log[-1]["loss"] < log[0]["loss"] * 0.5
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "model" / "config.json").is_file()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_is_detected_and_resume_falls_back(tmp_path, damage, capsys):
    make_trainer(tmp_path / "full").train()

    def crash(step):
        if step == 17:
            raise RuntimeError("simulated crash")

    run = make_trainer(tmp_path / "run")
    run.on_step = crash
    with pytest.raises(RuntimeError):
        run.train()
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint*.pt"))
    assert names == ["checkpoint-1.pt", "checkpoint-2.pt", "checkpoint.pt"]  # steps 15, 10, 5
    newest = tmp_path / "run" / "checkpoint.pt"
    data = bytearray(newest.read_bytes())
    if damage == "flip":  # 300 bytes in the middle of the file, where the tensors are
        middle = len(data) // 2
        data[middle:middle + 300] = bytes(b ^ 0xFF for b in data[middle:middle + 300])
    else:
        data = data[: len(data) // 3]
    newest.write_bytes(bytes(data))
    resumed = make_trainer(tmp_path / "run", init_seed=99)
    assert resumed.resume() and resumed.step == 10 and resumed.resumed_from.name == "checkpoint-1.pt"
    err = capsys.readouterr().err
    assert "checkpoint.pt is unusable: checksum mismatch" in err and "resuming from checkpoint-1.pt (step 10)" in err
    assert (tmp_path / "run" / "checkpoint.pt.damaged").is_file()
    resumed.train()
    assert_same(weights(tmp_path / "full"), weights(tmp_path / "run"))  # exact resume from the older one


def test_no_intact_checkpoint_is_an_error(tmp_path):
    make_trainer(tmp_path / "run", steps=5).train()
    for p in (tmp_path / "run").glob("checkpoint*.pt"):
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="no intact checkpoint"):
        make_trainer(tmp_path / "run", steps=5).resume()


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    make_trainer(tmp_path / "full", ema=0.9).train()

    def crash(step):
        if step == 13:  # last checkpoint was at step 10: steps 11-13 are lost and redone
            raise RuntimeError("simulated crash")

    crashed = make_trainer(tmp_path / "resumed", ema=0.9)
    crashed.on_step = crash
    with pytest.raises(RuntimeError):
        crashed.train()
    resumed = make_trainer(tmp_path / "resumed", ema=0.9, init_seed=99)  # other init: must come from checkpoint
    assert resumed.resume() and resumed.step == 10
    resumed.train()
    assert_same(weights(tmp_path / "full"), weights(tmp_path / "resumed"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # the lost steps' log lines were dropped, not duplicated


@pytest.mark.slow
def test_killed_process_resumes_to_same_weights(tmp_path):
    cmd = [sys.executable, str(HELPER), "--steps", "40", "--sleep", "0.05"]
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 60
    while time.time() < deadline and not (ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 15):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it was killed"
    subprocess.run([*cmd, "--out", str(tmp_path / "killed"), "--resume"], check=True, capture_output=True)
    assert_same(weights(tmp_path / "full"), weights(tmp_path / "killed"))


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--dropout", "0", "--steps", "12"]
    subprocess.run([sys.executable, str(HELPER), *common, "--out", str(tmp_path / "single")],
                   check=True, capture_output=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29517", str(HELPER)]
    result = subprocess.run([*torchrun, *common, "--out", str(tmp_path / "ddp")], capture_output=True,
                            env=env, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same(weights(tmp_path / "single"), weights(tmp_path / "ddp"), exact=False)


def test_early_stopping_keeps_best(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.6, 0.9])
    trainer = make_trainer(tmp_path, steps=40, eval_every=5, early_stop_metric="acc", patience=3)
    trainer.evaluate_fn = lambda model: {"acc": next(scores)}
    summary = trainer.train()
    assert summary["stopped_early"] and summary["steps"] == 25
    assert summary["best"] == {"acc": 0.7}
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_bf16_autocast_trains(tmp_path):
    summary = make_trainer(tmp_path, steps=5, bf16=True).train()
    assert summary["steps"] == 5


def test_config_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('# comment\n[model]\nname = "x"\n[train]\nsteps = 10\n')
    config = load_config(path, ["--train.steps=200", "--train.bf16=true", "--data.path=some/dir"])
    assert config["train"] == {"steps": 200, "bf16": True} and config["data"] == {"path": "some/dir"}
    with pytest.raises(ConfigError, match="unknown key"):
        build_dataclass(TrainConfig, {"stpes": 3}, "train")
    with pytest.raises(ConfigError, match="unknown section"):
        apply_overrides({}, ["--trian.steps=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["steps=3"])
    path.write_text("[oops]\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(path)


def test_resume_refuses_other_batch_size(tmp_path):
    make_trainer(tmp_path, steps=5).train()
    other = make_trainer(tmp_path, steps=10)
    other.config.batch_size = 8
    with pytest.raises(ValueError, match="batch_size"):
        other.resume()


@pytest.mark.slow
def test_sigterm_checkpoints_before_exit(tmp_path):
    proc = subprocess.Popen([sys.executable, str(HELPER), "--steps", "200", "--sleep", "0.05", "--out", str(tmp_path)],
                            stderr=subprocess.DEVNULL)
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 7):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    step = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    last_logged = json.loads(log.read_text().splitlines()[-1])["step"]
    assert step == last_logged >= 7  # saved at the signal, not at the last checkpoint_every multiple
    assert not (tmp_path / "model").exists()


def test_xmodal_train_recipe_resume_and_refusal(tmp_path, capsys):
    from xmodal.cli import main

    config = Path(__file__).parents[1] / "configs" / "shapes-captioner.toml"
    args = ["train", str(config), f"--train.out_dir={tmp_path}", "--train.steps=4", "--train.batch_size=8",
            "--train.eval_every=2", "--train.checkpoint_every=2", "--train.progress=false", "--data.count=32",
            "--data.eval_count=8", "--model.encoder_width=8", "--model.encoder_dim=16", "--model.decoder_dim=16"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and "exact_match" in summary["quality"]
    assert "quality:" in (tmp_path / "model" / "README.md").read_text()
    assert main(args) == 2 and "pass --resume" in capsys.readouterr().err  # never overwrite a run silently
    assert main([*args, "--resume", "--train.steps=6"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 6
    assert main([*args[:2], "--train.stpes=3"]) == 2 and "unknown key" in capsys.readouterr().err


def test_recipes_are_data_agnostic(tmp_path, capsys):
    """A generator trains on a prepared data set without Shapes scenes (no layout stage, no
    scene measure); a layout stage without boxes, or a [model] value the data decides, is a clear error."""
    from xmodal.cli import main

    assert main(["data", "shapes", str(tmp_path / "d"), "--count", "8", "--quiet"]) == 0
    lines = (tmp_path / "d" / "captions.jsonl").read_text().splitlines()
    records = [{k: v for k, v in json.loads(line).items() if k not in ("scene", "seed")} for line in lines]
    (tmp_path / "d" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "gen.toml"
    config.write_text('[model]\nname = "cvae"\nz_dim = 4\nchannels = [16, 8, 8, 4, 4]\n'
                      'text_encoder = { kind = "learned", dim = 16 }\n'
                      f'[data]\nkind = "prepared"\npath = "{tmp_path / "d"}"\n'
                      '[train]\nsteps = 2\nbatch_size = 4\nprogress = false\n')
    capsys.readouterr()
    assert main(["train", str(config), f"--train.out_dir={tmp_path / 'run'}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and "quality" not in summary  # nothing to read scenes against
    assert main(["train", str(config), f"--train.out_dir={tmp_path / 'run2'}", "--model.layout={ slots = 2 }"]) == 2
    assert "no boxes" not in (err := capsys.readouterr().err) and "records have none at [data] boxes" in err
    captioner = Path(__file__).parents[1] / "configs" / "shapes-captioner.toml"
    assert main(["train", str(captioner), f"--train.out_dir={tmp_path / 'run3'}", "--model.max_len=30",
                 "--data.count=8"]) == 2
    assert "[model] max_len=30 differs from [data] max_len=20" in capsys.readouterr().err
    assert main(["train", str(captioner), f"--train.out_dir={tmp_path / 'run4'}", "--model.vocab_size=7",
                 "--data.count=8"]) == 2
    assert "vocab_size=7 given, but the prepared vocab set vocab_size=" in capsys.readouterr().err
