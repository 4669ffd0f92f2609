import pytest
import torch

from xmodal.data.collate import GenerationCollate
from xmodal.data.shapes import ShapesDataset
from xmodal.metrics.retrieval import clip_score, r_precision, recall_at_k
from xmodal.models.hub import load_model
from xmodal.models.registry import create_model
from xmodal.tasks.text_encoders import prepare_text_encoder


@pytest.fixture(scope="module")
def data():
    ds = ShapesDataset("train", count=8, seed=5)
    items = [ds[i] for i in range(8)]
    return [c for _, caps, _ in items for c in caps], GenerationCollate()(items)


def tiny_diffusion(captions):
    encoder, spec = prepare_text_encoder({"kind": "learned", "dim": 16}, captions)
    torch.manual_seed(0)
    ae = create_model("autoencoder", latent_channels=2, channels=(8, 8, 8))
    model = create_model("latent-diffusion", text_encoder=encoder, autoencoder=ae,
                         channels=(8, 16), heads=2, steps=3)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)  # zero at init: make the text matter
    return model


def test_autoencoder_shapes_and_overfit(data):
    _, batch = data
    torch.manual_seed(0)
    ae = create_model("autoencoder", latent_channels=4, channels=(8, 16, 16))
    assert ae.encode(batch["images"]).shape == (8, 4, 16, 16)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    first = ae.loss(batch)[0].item()
    for _ in range(40):
        loss, _ = ae.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_diffusion_loss_backward_and_frozen_first_stage(data):
    captions, batch = data
    model = tiny_diffusion(captions).train()
    assert not model.autoencoder.training
    loss, logs = model.loss(batch)
    assert set(logs) == {"mse"}
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert model.unet.conv_in.weight.grad is not None and model.null_tokens.grad is not None


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_diffusion_samplers_are_seeded(sampler, data, tmp_path):
    captions, _ = data
    model = tiny_diffusion(captions).eval()
    texts = ["a small red circle", "a large blue square above a small green cross"]
    a = model.generate(texts, [1, 2], sampler=sampler, steps=3, guidance=2.0)
    assert a.shape == (2, 3, 64, 64)
    assert torch.equal(a, model.generate(texts, [1, 2], sampler=sampler, steps=3, guidance=2.0))
    assert not torch.equal(a, model.generate(texts, [3, 4], sampler=sampler, steps=3, guidance=2.0))
    negative = model.generate(texts, [1, 2], sampler=sampler, steps=3, guidance=2.0, negative="a small red circle")
    assert not torch.equal(a, negative)
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(a, load_model(tmp_path / "m").generate(texts, [1, 2], sampler=sampler, steps=3, guidance=2.0))
    with pytest.raises(ValueError, match="sampler"):
        model.generate(texts, [1, 2], sampler="euler")


def test_clip_loss_and_embeddings(data, tmp_path):
    captions, batch = data
    encoder, spec = prepare_text_encoder({"kind": "learned", "dim": 16}, captions)
    torch.manual_seed(0)
    model = create_model("clip", text_encoder=encoder, encoder_width=8, encoder_dim=16, embed_dim=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(batch)[0].item()
    for _ in range(30):
        loss, metrics = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    model.eval()
    emb = model.encode_image(batch["images"])
    assert emb.shape == (8, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(8))
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(model.encode_text(batch["texts"]), load_model(tmp_path / "m").encode_text(batch["texts"]))


def test_retrieval_measures_on_constructed_embeddings():
    eye = torch.eye(4)
    assert recall_at_k(eye, 1) == {"image_to_text_r@1": 1.0, "text_to_image_r@1": 1.0}
    shifted = eye.roll(1, dims=1)  # image i best matches text i+1
    assert recall_at_k(shifted, 1)["image_to_text_r@1"] == 0.0
    assert recall_at_k(shifted + 0.5 * eye, 2)["text_to_image_r@2"] == 1.0
    emb = torch.nn.functional.normalize(torch.randn(120, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert r_precision(emb, emb, candidates=100) == 1.0
    assert r_precision(emb, -emb, candidates=100) == 0.0
    assert clip_score(emb, emb) == pytest.approx(2.5) and clip_score(emb, -emb) == 0.0
    with pytest.raises(ValueError):
        r_precision(emb[:10], emb[:10])


def test_decoder_second_stage_keeps_the_latent_space(tmp_path, capsys):
    """A decoder-only stage starts from a trained autoencoder: same encoder, same latents, new decoder."""
    from xmodal.cli import main

    def train(name, model_lines):
        config = tmp_path / f"{name}.toml"
        config.write_text('[model]\nname = "autoencoder"\nlatent_channels = 2\nchannels = [8, 8, 8]\n' + model_lines
                          + f'\n[data]\ncount = 16\neval_count = 4\n[train]\nout_dir = "{tmp_path / name}"\n'
                          'steps = 3\nbatch_size = 4\nprogress = false\n')
        return main(["train", str(config)])

    assert train("first", "") == 0
    second = (f'init_from = "{tmp_path / "first" / "model"}"\ntrain_encoder = false\n'
              'decoder_channels = [8, 8, 12]\ndecoder_depth = 2\nl1_weight = 1.0\n')
    assert train("second", second) == 0
    first, refined = load_model(tmp_path / "first" / "model"), load_model(tmp_path / "second" / "model")
    images = torch.stack([ShapesDataset("test", 2, seed=3)[i][0] for i in range(2)])
    with torch.no_grad():
        assert torch.equal(first.encode(images), refined.encode(images))
        assert refined.decode(refined.encode(images)).shape == images.shape
    assert refined.decoder[-3][0].weight.shape == (12, 12, 3, 3)  # the added 64 px convolution
    capsys.readouterr()
    assert train("bad", f'init_from = "{tmp_path / "nowhere"}"\n') == 2
    assert "init_from" in capsys.readouterr().err


def test_channels_last_upsampling_is_nearest_neighbour_exactly():
    from xmodal.models.image_encoders import upsample2x

    x = torch.randn(3, 5, 7, 6)
    out = upsample2x(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, torch.nn.Upsample(scale_factor=2, mode="nearest")(x))
