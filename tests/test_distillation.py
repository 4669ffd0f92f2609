"""The few-step student of a diffusion teacher (xmodal.models.distilled, xmodal.tasks.distillation)."""

import json

import pytest
import torch

from xmodal.cli import main
from xmodal.data.shapes import ShapesDataset
from xmodal.models.diffusion import make_scheduler
from xmodal.models.distilled import CLEAN, alphas_cumprod
from xmodal.models.hub import load_model
from xmodal.models.registry import create_model
from xmodal.tasks import distillation
from xmodal.tasks.text_encoders import prepare_text_encoder

PROMPTS = ["a small red circle", "a large blue square above a small green cross"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny latent-diffusion teacher, saved: 10 DPM-Solver++ steps, guidance 3."""
    captions = [c for r in ShapesDataset("train", count=16, seed=5).records for c in r["captions"]]
    encoder, _ = prepare_text_encoder({"kind": "learned", "dim": 16}, captions)
    torch.manual_seed(0)
    ae = create_model("autoencoder", latent_channels=2, channels=(8, 8, 8))
    model = create_model("latent-diffusion", text_encoder=encoder, autoencoder=ae, channels=(8, 16), heads=2,
                         steps=10, guidance=3.0).eval()
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)  # zero at init: make the text matter
    folder = tmp_path_factory.mktemp("teacher") / "model"
    model.save_pretrained(folder)
    return folder


def test_schedule_is_diffusers_own_and_a_jump_with_the_true_noise_is_exact():
    from xmodal.models.diffusion import DiffusionConfig

    config = DiffusionConfig()  # 1000 steps, the cosine schedule
    assert torch.equal(alphas_cumprod(1000, config.beta_schedule), make_scheduler("ddim", config).alphas_cumprod)
    student = _student_of_random_weights()
    x0, eps = torch.randn(3, 2, 16, 16), torch.randn(3, 2, 16, 16)
    a, b = torch.tensor([900, 450, 450]), torch.tensor([450, 90, CLEAN])
    bar = alphas_cumprod(1000, config.beta_schedule)
    x_a = bar[a].sqrt().view(-1, 1, 1, 1) * x0 + (1 - bar[a]).sqrt().view(-1, 1, 1, 1) * eps
    expected = torch.stack([bar[450].sqrt() * x0[0] + (1 - bar[450]).sqrt() * eps[0],
                            bar[90].sqrt() * x0[1] + (1 - bar[90]).sqrt() * eps[1], x0[2]])
    assert torch.allclose(student._jump(x_a, eps, a, b), expected, atol=1e-4)


def _student_of_random_weights(**kw):
    encoder, _ = prepare_text_encoder({"kind": "learned", "dim": 16}, PROMPTS)
    ae = create_model("autoencoder", latent_channels=2, channels=(8, 8, 8))
    return create_model("distilled-diffusion", text_encoder=encoder, autoencoder=ae, channels=(8, 16), heads=2, **kw)


def test_recorded_trajectory_is_the_sampling_itself(teacher):
    model = load_model(teacher)
    latents, trace = model.denoise(PROMPTS, [3, 4], record=[0, 5, 10])
    assert trace["states"].shape == (2, 3, 2, 16, 16) and trace["layout_map"] is None
    assert torch.equal(trace["states"][:, 0], model.noise([3, 4], (2, 16, 16), "cpu"))
    assert torch.equal(trace["states"][:, 2], latents)
    assert torch.equal(model.generate(PROMPTS, [3, 4]), model.autoencoder.decode(latents * model.config.latent_scale).clamp(-1, 1))
    with pytest.raises(ValueError, match="record: step counts must be in 0..10"):
        model.denoise(PROMPTS, [3, 4], record=[11])


def test_student_timesteps_are_checked():
    with pytest.raises(ValueError, match="distinct, decreasing"):
        _student_of_random_weights(student_timesteps=(450, 900))
    with pytest.raises(ValueError, match="distinct, decreasing"):
        _student_of_random_weights(student_timesteps=(1000,))
    student = _student_of_random_weights()
    assert student.check_options() == (2, student.config.guidance, "distilled") and student.work() == 2
    with pytest.raises(ValueError, match="distilled to 2 steps"):
        student.check_options(steps=5)
    with pytest.raises(ValueError, match="distilled to 2 steps"):
        student.check_options(negative="blue")


def _config(tmp_path, teacher, timesteps="[900, 450]"):
    config = tmp_path / "student.toml"
    config.write_text(f'[model]\nname = "distilled-diffusion"\nteacher = "{teacher}"\nstudent_timesteps = {timesteps}\n'
                      '[data]\nkind = "shapes"\ncount = 48\neval_count = 8\ncaptions = "random"\n'
                      f'[train]\nout_dir = "{tmp_path / "run"}"\nsteps = 30\nbatch_size = 16\nlr = 1e-3\n'
                      'progress = false\neval_every = 0\n')
    return config


def test_recipe_learns_the_teachers_trajectories(teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(distillation, "BLOCK", 16)
    assert main(["train", str(_config(tmp_path, teacher))]) == 0
    bank = torch.load(tmp_path / "run" / "trajectories.pt", weights_only=True)
    assert sum(len(s) for s in bank["states"]) == 48 and bank["states"][0].shape[1:] == (3, 2, 16, 16)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]  # the student moves toward the teacher's jumps
    student = load_model(tmp_path / "run" / "model")
    assert student.registry_name == "distilled-diffusion" and student.config.teacher == str(teacher)
    images = student.generate(PROMPTS, [1, 2])
    assert images.shape == (2, 3, 64, 64) and torch.equal(images, student.generate(PROMPTS, [1, 2]))
    capsys.readouterr()
    assert main(["generate", "a small red circle", "--model", str(tmp_path / "run" / "model"), "--steps", "4",
                 "-o", str(tmp_path / "out")]) == 2
    assert "distilled to 2 steps" in capsys.readouterr().err


def test_recording_continues_after_a_kill_and_a_grid_miss_is_named(teacher, tmp_path, capsys, monkeypatch):
    from xmodal.models.diffusion import LatentDiffusion

    monkeypatch.setattr(distillation, "BLOCK", 16)
    calls, die_at = [], [3]
    real = LatentDiffusion.denoise

    def dies_on_the_third_block(self, texts, seeds, *args, **kw):
        calls.append(seeds[0])
        if len(calls) == die_at[0]:
            raise KeyboardInterrupt
        return real(self, texts, seeds, *args, **kw)

    monkeypatch.setattr(LatentDiffusion, "denoise", dies_on_the_third_block)
    config = _config(tmp_path, teacher)
    assert main(["train", str(config)]) == 130  # interrupted, as Ctrl-C or a kill between blocks
    saved = torch.load(tmp_path / "run" / "trajectories.pt", weights_only=True)
    assert sum(len(s) for s in saved["states"]) == 32  # two blocks kept
    calls.clear()
    die_at[0] = 0
    assert main(["train", str(config), "--train.steps=2"]) == 0
    assert calls == [distillation.SEED_OFFSET + 32]  # only the missing block was recorded
    (tmp_path / "run" / "trajectories.pt").write_bytes(b"\x80garbage")  # damaged: recorded again, no traceback
    calls.clear()
    assert main(["train", str(config), "--resume", "--train.steps=3"]) == 0
    assert len(calls) == 3 and "unreadable" in capsys.readouterr().err
    assert main(["train", str(_config(tmp_path, teacher, "[900, 500]")), "--train.out_dir=" + str(tmp_path / "r2")]) == 2
    assert "student_timesteps [500] are not on the teacher's 10-step dpm grid" in capsys.readouterr().err
    assert main(["train", str(_config(tmp_path, "shapes-clip")), "--train.out_dir=" + str(tmp_path / "r3")]) == 2
    assert "is a clip; a student learns from a latent-diffusion model" in capsys.readouterr().err
