"""The GAN: each side's loss trains only that side, and the adversarial game alone (no
reconstruction term) teaches the generator to draw what each prompt asks on a tiny set."""

from __future__ import annotations

import pytest
import torch

from xmodal.models.dfgan import DFGAN, DFGANConfig, Discriminator
from xmodal.models.layout import box_planes
from xmodal.tasks.text_encoders import prepare_text_encoder

PROMPTS = ("light on the left", "light on the right")


def tiny_gan(**overrides) -> DFGAN:
    torch.manual_seed(0)
    encoder, spec = prepare_text_encoder({"kind": "learned", "dim": 16}, list(PROMPTS))
    values = dict(image_size=32, image_channels=1, image_preset="gray32", z_dim=8, channels=(32, 16, 16, 8),
                  sentence_dim=16, spectral_norm=True, projection=True)
    config = DFGANConfig(text_encoder=spec, **{**values, **overrides})
    return DFGAN(config, encoder)


def targets(texts: list[str]) -> torch.Tensor:
    """Each prompt's picture: the named half white (1), the other black (-1), in 3 equal channels."""
    images = -torch.ones(len(texts), 3, 32, 32)
    for i, text in enumerate(texts):
        half = slice(0, 16) if text.endswith("left") else slice(16, 32)
        images[i, :, :, half] = 1.0
    return images


def test_each_side_of_the_loss_trains_only_its_own_network():
    model = tiny_gan().train()
    texts = [PROMPTS[i % 2] for i in range(6)]
    _, _, sentence = model.encode_text(texts)
    fake = model.generator(torch.randn(6, 8), sentence.detach())
    g_params = list(model.generator.parameters())
    d_params = list(model.discriminator.parameters())
    t_params = list(model.text_encoder.parameters())

    def grads(loss):
        found = torch.autograd.grad(loss, g_params + d_params + t_params, allow_unused=True, retain_graph=True)
        reached = [g is not None and bool(g.abs().sum() > 0) for g in found]
        n, m = len(g_params), len(g_params) + len(d_params)
        return any(reached[:n]), any(reached[n:m]), any(reached[m:])

    model.on_train_step(0)  # step 0: the gradient penalty is in the discriminator's term
    d_loss, logs = model.discriminator_loss(targets(texts), fake, sentence)
    assert float(logs["gp"]) > 0
    assert grads(d_loss) == (False, True, True)  # fakes detached: D (and the text it reads) only
    g_loss = model.generator_loss(fake, sentence)
    assert grads(g_loss) == (True, False, False)  # D's parameters and the sentence detached: G only


def test_the_adversarial_game_alone_teaches_the_generator_each_prompt():
    model = tiny_gan(gp_every=1, lr_scale_g=1.0).train()
    groups = [{"params": g["params"], "lr": 2e-3 * g["lr_scale"]} for g in model.param_groups()]
    optimizer = torch.optim.Adam(groups, betas=(0.0, 0.9))
    probe_texts = [PROMPTS[i % 2] for i in range(16)]

    def distance() -> float:  # how far samples are from what their prompt asks, mean |pixel error| in [0, 2]
        model.eval()
        images = model.generate(probe_texts, list(range(16)))
        model.train()
        return float((images - targets(probe_texts)).abs().mean())

    before = distance()
    for step in range(300):
        texts = [PROMPTS[(i + step) % 2] for i in range(16)]
        model.on_train_step(step)
        loss, logs = model.loss({"images": targets(texts), "texts": texts})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = distance()
    assert before > 0.9 and after < 0.2, (before, after)


def test_mode_seeking_term_trains_the_generator_only():
    model = tiny_gan(mode_seeking=1.0).train()
    texts = [PROMPTS[i % 2] for i in range(4)]
    _, _, sentence = model.encode_text(texts)
    z = torch.randn(4, 8)
    term = model.mode_seeking_loss(z, model.generator(z, sentence.detach()), sentence)
    assert float(term.detach()) > 0
    found = torch.autograd.grad(term, [*model.generator.parameters(), *model.discriminator.parameters(),
                                       *model.text_encoder.parameters()], allow_unused=True)
    n = len(list(model.generator.parameters()))
    assert any(g is not None for g in found[:n]) and all(g is None for g in found[n:])
    model.on_train_step(1)
    assert "mode_seeking" in model.loss({"images": targets(texts), "texts": texts})[1]


def test_patch_head_scores_every_patch_and_is_its_own_term():
    model = tiny_gan(patch_grid=8, d_channels=(32, 32, 16, 8), d_residual_init=1.0).train()  # 8 x 8 after 2 blocks
    assert all(float(block.gamma.detach()) == 1.0 for block in model.discriminator.blocks)  # D non-linear from step 0
    texts = [PROMPTS[i % 2] for i in range(4)]
    _, _, sentence = model.encode_text(texts)
    scores = model.discriminator(targets(texts), sentence)
    assert scores.shape == (4, 1 + 8 * 8)
    assert model.discriminator.stem.out_channels == 8 and model.discriminator.blocks[0].shortcut.out_channels == 16
    fake = model.generator(torch.randn(4, 8), sentence.detach())
    _, logs = model.discriminator_loss(targets(texts), fake, sentence)
    assert {"d_acc_patch_real", "d_acc_patch_fake"} <= set(logs)
    g_loss = model.generator_loss(fake, sentence)  # G is judged by both heads
    patch_grad = torch.autograd.grad(g_loss, fake, retain_graph=True)[0]
    whole_only = -model.discriminator(fake, sentence)[:, 0].mean()
    assert not torch.allclose(patch_grad, torch.autograd.grad(whole_only, fake)[0])


def test_layout_map_by_projection_is_read_only_through_its_embedding():
    config = DFGANConfig(image_size=32, channels=(32, 16, 16, 8), sentence_dim=16, map_projection=True, patch_grid=8)
    d = Discriminator(16, 5, config, patch_stage=2)
    assert d.stem.in_channels == 3  # the image features alone: how real a picture looks
    images, sentence = torch.randn(2, 3, 32, 32), torch.randn(2, 16)
    layout = torch.zeros(2, 5, 32, 32)
    layout[:, :, 4:12, 4:12] = 1.0
    plain, boxed = d(images, sentence, torch.zeros_like(layout)), d(images, sentence, layout)
    assert plain.shape == boxed.shape == (2, 1 + 8 * 8)
    changed = (plain - boxed).abs()[:, 1:].view(2, 8, 8) > 1e-6
    assert changed[:, 1:3, 1:3].all() and not changed[:, 5:, 5:].any()  # only the patches the box covers
    with torch.no_grad():
        d.map_patch.weight.zero_()
        d.map_whole.weight.zero_()
    assert torch.allclose(d(images, sentence, layout), plain)  # no other path from the map


@pytest.mark.parametrize("map_projection", [True, False])
def test_the_discriminator_reads_box_planes_as_it_reads_the_dense_map(map_projection):
    """Training paints the true boxes as BoxPlanes: D pools their few planes (or spreads them
    when it reads the map beside the image), the same sums as from the dense map, gradients too."""
    torch.manual_seed(0)
    config = DFGANConfig(image_size=32, channels=(32, 16, 16, 8), sentence_dim=16, map_projection=map_projection,
                         patch_grid=8, spectral_norm=False)
    d = Discriminator(16, 5 + 3, config, patch_stage=2)
    features = torch.randn(3, 2, 5, requires_grad=True)
    boxes = torch.tensor([[[16.0, 32.0, 8.0], [44.0, 20.0, 5.0]]] * 3) + torch.rand(3, 2, 3) * 4
    planes = box_planes(features, boxes, torch.tensor([[True, True], [True, False], [False, False]]), size=32)
    images, sentence = torch.randn(3, 3, 32, 32), torch.randn(3, 16)
    dense = d(images, sentence, planes.dense())
    factored = d(images, sentence, planes)
    assert torch.allclose(factored, dense, atol=1e-5)
    assert torch.allclose(d(images[1:], sentence[1:], planes[1:]), dense[1:], atol=1e-5)  # rows as a tensor's
    grad_dense, = torch.autograd.grad(dense.square().sum(), features)
    grad_factored, = torch.autograd.grad(factored.square().sum(), features)
    assert torch.allclose(grad_factored, grad_dense, atol=1e-4) and grad_dense.abs().sum() > 0
    assert not planes.detach().features.requires_grad


@pytest.mark.parametrize("map_projection", [True, False])
def test_mismatched_texts_are_judged_on_the_real_pictures_own_trunk(map_projection):
    """The discriminator's loss judges the real pictures with the next row's text on the trunk it
    computed for them once (it reads the image alone when the map comes by projection): the scores
    and gradients of separate calls; with the map beside the image, separate calls."""
    torch.manual_seed(0)
    config = DFGANConfig(image_size=32, channels=(32, 16, 16, 8), sentence_dim=16, map_projection=map_projection,
                         patch_grid=8, spectral_norm=False)
    d = Discriminator(16, 5 + 3, config, patch_stage=2)
    boxes = torch.tensor([[[16.0, 32.0, 8.0], [44.0, 20.0, 5.0]]] * 4) + torch.rand(4, 2, 3) * 4
    planes = box_planes(torch.randn(4, 2, 5), boxes, torch.ones(4, 2, dtype=torch.bool), size=32)
    images, sentence = torch.randn(4, 3, 32, 32, requires_grad=True), torch.randn(4, 16)
    assert d.shares_trunk(planes) == map_projection and d.shares_trunk(None)
    h, at_patch = d.trunk(images, planes)
    separate = d(images[:-1], sentence[1:], planes[1:])
    if map_projection:
        shared = d.judge((h[:-1], at_patch[:-1]), sentence[1:], planes[1:])
        assert torch.allclose(shared, separate, atol=1e-5)
        grad_shared, = torch.autograd.grad(shared.square().sum(), images)
        grad_separate, = torch.autograd.grad(separate.square().sum(), images)
        assert torch.allclose(grad_shared, grad_separate, atol=1e-5) and grad_shared[:-1].abs().sum() > 0
    assert torch.allclose(d.judge((h, at_patch), sentence, planes), d(images, sentence, planes), atol=1e-6)


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"temperature": -1.0}, {"mode_seeking": -0.1},
                                 {"sentence_dim": -4}, {"patch_grid": 32}, {"patch_grid": 4}, {"patch_grid": 5},
                                 {"d_channels": (8, 8)}])
def test_bad_gan_settings_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiny_gan(**bad)


def test_bundled_shapes_gan_draws_what_its_prompts_ask_in_one_pass():
    import numpy as np

    import xmodal
    from xmodal.data.shapes import ShapesDataset
    from xmodal.metrics.scenes import judge_reader, scene_accuracy
    from xmodal.tasks.records import scene_specs

    pipe = xmodal.load("shapes-gan")
    records = ShapesDataset("test", 40, seed=55).records
    images = pipe([r["captions"][0] for r in records], seed=0)
    accuracy = scene_accuracy(scene_specs(records), judge_reader([np.asarray(im) for im in images]))
    assert accuracy["scene_accuracy"] >= 0.75  # a trained generator, read by the independent pixel judge
    seeds = [np.asarray(im, np.float32) for im in pipe(["a large red circle"], n=4, seed=0)]
    assert min(np.abs(a - b).mean() for i, a in enumerate(seeds) for b in seeds[i + 1:]) > 1.0  # no one picture per prompt


def test_layout_only_reads_the_text_through_the_layout_map_alone():
    """With `layout_only`, G and D never see the sentence vector: the same layout and noise give
    the same picture whatever sentence vector comes with them."""
    from xmodal.models.layout import LayoutConfig

    with pytest.raises(ValueError, match="layout_only .* needs a layout stage"):
        tiny_gan(layout_only=True)
    model = tiny_gan(layout_only=True, layout=LayoutConfig(slots=2, dim=16, heads=2, layers=1, feature_dim=0,
                                                           labels={"side": ["left", "right"]})).eval()
    tokens, mask, pooled = model.encode_text(list(PROMPTS))
    layout = model.sample_layout(tokens, mask.bool(), [0, 1])
    noise = model.noise([0, 1], model.noise_shape, pooled.device)
    with torch.no_grad():
        drawn = model.draw(noise, tokens, mask, pooled, layout)
        assert torch.equal(drawn, model.draw(noise, tokens, mask, torch.randn_like(pooled), layout))
        assert not torch.equal(drawn, model.draw(noise, tokens, mask, pooled, model.sample_layout(tokens, mask.bool(), [5, 6])))


def test_a_later_stage_trains_only_the_word_label_reader_of_a_trained_gan(tmp_path, capsys):
    from safetensors.torch import load_file

    from xmodal.cli import main

    layout = ('layout = { slots = 2, dim = 16, heads = 2, layers = 1, grid = 8, radius_bins = 4, feature_dim = 4, '
              'word_labels = WORDS, labels = { color = ["red", "green", "blue", "yellow", "purple", "orange"], '
              'shape = ["circle", "square", "triangle", "diamond", "cross"] } }\n')

    def train(name, words, extra_model="", extra_train=""):
        config = tmp_path / f"{name}.toml"
        config.write_text('[model]\nname = "dfgan"\ntext_encoder = { kind = "learned", dim = 16 }\nz_dim = 4\n'
                          'channels = [16, 8, 8, 4, 4]\n' + layout.replace("WORDS", words) + extra_model
                          + f'\n[data]\ncount = 16\neval_count = 4\n[train]\nout_dir = "{tmp_path / name}"\n'
                          'steps = 3\nbatch_size = 4\nprogress = false\n' + extra_train)
        return main(["train", str(config)])

    assert train("gan", "false") == 0
    first = tmp_path / "gan" / "model"
    stage = (f'init_from = "{first}"\n', 'trainable = ["layout.word_labels."]\n')
    assert train("words", "true", *stage) == 0
    before, after = load_file(first / "model.safetensors"), load_file(tmp_path / "words" / "model" / "model.safetensors")
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k != "step")  # everything else as trained
    assert {k for k in after if k not in before} and all(k.startswith("layout.word_labels.") for k in after if k not in before)
    capsys.readouterr()
    assert train("typo", "true", stage[0], 'trainable = ["layout.word_label."]\n') == 2
    assert "names no parameter" in capsys.readouterr().err
    assert train("other", "true", stage[0] + "sentence_dim = 8\n", stage[1]) == 2
    assert "do not fit this config" in capsys.readouterr().err


def test_a_subpixel_generator_draws_full_size_pictures_from_half_size_blocks(tmp_path, capsys):
    """`subpixel`: the blocks stop at half the size and each place gives its 2 x 2 pixels; a later
    stage starts one from a trained full-size GAN, whose last block and to_rgb have no place in it."""
    from safetensors.torch import load_file

    from xmodal.cli import main

    with pytest.raises(ValueError, match="subpixel .* d_channels"):
        tiny_gan(subpixel=True, channels=(32, 16, 8))
    with pytest.raises(ValueError, match="channels must give 3 widths"):
        tiny_gan(subpixel=True, d_channels=(8, 8, 16, 32))
    model = tiny_gan(subpixel=True, channels=(32, 16, 8), d_channels=(8, 8, 16, 32))
    assert model.map_sizes == (8, 16)
    assert model.generator(torch.randn(2, 8), torch.randn(2, 16)).shape == (2, 3, 32, 32)
    assert model.generator.to_pixels[1].out_channels == 16  # to_pixels' first convolution: twice the last width
    slim = tiny_gan(subpixel=True, channels=(32, 16, 8), d_channels=(8, 8, 16, 32), pixel_width=4)
    assert slim.generator.to_pixels[1].out_channels == 4 and slim.generator.to_pixels[3].in_channels == 4
    assert slim.generator(torch.randn(2, 8), torch.randn(2, 16)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="pixel_width must be >= 0"):
        tiny_gan(subpixel=True, channels=(32, 16, 8), d_channels=(8, 8, 16, 32), pixel_width=-1)

    def train(name, extra_model="", extra_train=""):
        config = tmp_path / f"{name}.toml"
        config.write_text('[model]\nname = "dfgan"\ntext_encoder = { kind = "learned", dim = 16 }\nz_dim = 4\n'
                          'layout = { slots = 2, dim = 16, heads = 2, layers = 1, grid = 8, radius_bins = 4 }\n'
                          + extra_model + f'\n[data]\ncount = 16\neval_count = 4\n[train]\nout_dir = "{tmp_path / name}"\n'
                          'steps = 2\nbatch_size = 4\nprogress = false\n' + extra_train)
        return main(["train", str(config)])

    assert train("full", "channels = [16, 8, 8, 4, 4]\n") == 0
    first = tmp_path / "full" / "model"
    capsys.readouterr()
    assert train("sub", f'channels = [16, 8, 8, 4]\nd_channels = [16, 8, 8, 4, 4]\nsubpixel = true\ninit_from = "{first}"\n',
                 'trainable = ["generator.blocks.2.", "generator.to_pixels.", "discriminator."]\n') == 0
    assert "no place for generator.blocks.3, generator.to_rgb; left out" in capsys.readouterr().err
    before, after = load_file(first / "model.safetensors"), load_file(tmp_path / "sub" / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith(("generator.blocks.0.", "layout.")))
    assert not torch.equal(before["generator.blocks.2.conv2.weight"], after["generator.blocks.2.conv2.weight"])
    import xmodal

    assert xmodal.load(tmp_path / "sub" / "model")(["a red circle"])[0].size == (64, 64)


def test_a_gan_student_learns_to_draw_its_teachers_pictures_with_a_cheaper_generator(tmp_path, capsys):
    """`[model] teacher` = a trained dfgan: the student takes its config (a subpixel generator over
    it here) and the weights that fit, keeps the teacher's text encoder, layout stage and
    discriminator frozen, and trains its generator on the distance to the teacher's pictures."""
    import json

    from safetensors.torch import load_file

    import xmodal
    from xmodal.cli import main

    layout = 'layout = { slots = 2, dim = 16, heads = 2, layers = 1, grid = 8, radius_bins = 4 }\n'
    data = '\n[data]\ncount = 16\neval_count = 4\n'

    def train(name, model, steps=2):
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[model]\nname = "dfgan"\n{model}{data}[train]\nout_dir = "{tmp_path / name}"\n'
                          f'steps = {steps}\nbatch_size = 4\nlr = 3e-3\nbetas = [0.5, 0.9]\nlog_every = 5\n'
                          f'eval_every = 0\nprogress = false\n')
        return main(["train", str(config)])

    assert train("teacher", 'text_encoder = { kind = "learned", dim = 16 }\nz_dim = 4\nchannels = [16, 8, 8, 4, 4]\n'
                 + layout) == 0
    teacher = tmp_path / "teacher" / "model"
    capsys.readouterr()
    assert train("bad", f'teacher = "{teacher}"\ntext_encoder = {{ kind = "learned", dim = 16 }}\n') == 2
    assert "teacher's text encoder" in capsys.readouterr().err
    student = f'teacher = "{teacher}"\nsubpixel = true\nchannels = [16, 8, 8, 4]\nd_channels = [16, 8, 8, 4, 4]\n'
    assert train("student", student, steps=40) == 0
    assert "no place for generator.blocks.3, generator.to_rgb; left out" in capsys.readouterr().err
    logs = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    l1 = [row["distill_l1"] for row in logs if "distill_l1" in row]
    assert len(l1) >= 4 and sum(l1[-2:]) < 0.7 * sum(l1[:2])  # it learns the teacher's pictures
    before, after = load_file(teacher / "model.safetensors"), load_file(tmp_path / "student" / "model" / "model.safetensors")
    frozen = [k for k in after if not k.startswith("generator.") and k != "step"]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["generator.blocks.0.conv1.weight"], after["generator.blocks.0.conv1.weight"])
    saved = json.loads((tmp_path / "student" / "model" / "config.json").read_text())
    assert saved["config"]["teacher"] == str(teacher) and saved["config"]["subpixel"] is True
    assert xmodal.load(tmp_path / "student" / "model")(["a red circle"])[0].size == (64, 64)
