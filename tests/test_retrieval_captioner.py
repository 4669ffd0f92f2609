"""The retrieval-augmented captioner: its memory, what it may read, and its copy mechanism."""

import pytest
import torch

from xmodal.data.collate import CaptionCollate
from xmodal.data.shapes import ShapesDataset
from xmodal.data.text import Vocabulary
from xmodal.models.hub import load_model
from xmodal.models.registry import create_model

TINY = dict(encoder_width=8, encoder_dim=16, d_model=16, n_layers=2, n_heads=2, ff_dim=32, memory_len=6)
CAPTIONS = ["a red circle", "a blue square", "zebra crossing", "a green cross", "purple", "a yellow star"]


@pytest.fixture(scope="module")
def data():
    shapes = ShapesDataset("train", count=6, seed=5)
    images = torch.stack([shapes[i][0] for i in range(6)])
    vocab = Vocabulary.build(CAPTIONS)
    return images, vocab


def filled(data, **kw):
    images, vocab = data
    torch.manual_seed(0)
    model = create_model("retrieval-captioner", vocab=vocab, memory_size=len(CAPTIONS), **{**TINY, **kw}).eval()
    with torch.no_grad():
        model.fill_memory(model.image_features(images), CAPTIONS)
    return model


def words(model, ids):
    return [model.vocab.words[i] for i in ids.tolist() if i != Vocabulary.pad_id]


def test_a_picture_reads_its_own_row_first_unless_excluded(data):
    images, _ = data
    model = filled(data, retrieve=2)
    with torch.no_grad():
        retrieved = model.encode_images(images)["retrieved"]  # (6, 2 * 7)
        first = [words(model, row[:7]) for row in retrieved]
        assert first == [[*c.split(), "<end>"] for c in CAPTIONS]
        excluded = model.encode_images(images, exclude=torch.arange(6))["retrieved"]
    for i, row in enumerate(excluded):
        for part in (row[:7], row[7:]):
            assert words(model, part) != [*CAPTIONS[i].split(), "<end>"]
    with torch.no_grad():  # -1 excludes nothing
        assert torch.equal(model.encode_images(images, exclude=torch.full((6,), -1))["retrieved"], retrieved)


def test_log_probabilities_are_normalized_and_the_cache_matches_the_full_decoder(data):
    images, vocab = data
    model = filled(data)
    batch = CaptionCollate(vocab, choice="first")([(im, [c], {}) for im, c in zip(images, CAPTIONS)])
    tokens = batch["tokens"]
    with torch.no_grad():
        full, _ = model(images, tokens)
        torch.testing.assert_close(full.logsumexp(-1), torch.zeros(full.shape[:2]), atol=1e-4, rtol=0)
        state = model.init_state(model.encode_images(images))
        for t in range(tokens.size(1) - 1):
            log_probs, state, attention = model.step(state, tokens[:, t])
            torch.testing.assert_close(log_probs, full[:, t], atol=1e-5, rtol=1e-5)
    assert attention.shape == (6, 8 * 8)  # over the image regions only (a 64 px picture: an 8x8 grid)


def test_copying_writes_a_retrieved_word_the_decoder_cannot_have_learned(data):
    """With the gate shut (all weight on copying) every word comes from the retrieved captions."""
    images, _ = data
    model = filled(data, retrieve=1)
    with torch.no_grad():
        model.copy_gate.bias.fill_(-30.0)
        model.copy_gate.weight.zero_()
        model.copy_key.weight.zero_()  # uniform over the retrieved words
        state = model.init_state(model.encode_images(images))
        log_probs, _, _ = model.step(state, torch.full((6,), Vocabulary.start_id))
    for i, caption in enumerate(CAPTIONS):
        allowed = {model.vocab.words.index(w) for w in [*caption.split(), "<end>"]}
        likely = set(torch.nonzero(log_probs[i] > -20).flatten().tolist())
        assert likely == allowed


def test_training_never_reads_the_pictures_own_row_and_the_frozen_encoder_stays(data):
    images, vocab = data
    model = filled(data, dropout=0.0)
    encoder = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    rows = {f"{i}.png": i for i in range(6)}
    batch = CaptionCollate(vocab, choice="first", memory_rows=rows)(
        [(im, [c], {"image": f"{i}.png"}) for i, (im, c) in enumerate(zip(images, CAPTIONS))])
    assert batch["memory_row"].tolist() == list(range(6))
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss, _ = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, encoder[k]) for k, v in model.image_encoder.state_dict().items())  # BN stats too
    assert not any(p.requires_grad for p in model.image_encoder.parameters())


def test_memory_is_saved_with_the_model(data, tmp_path):
    images, _ = data
    model = filled(data)
    model.save_pretrained(tmp_path / "m", dtype="float16")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(loaded.memory_tokens, model.memory_tokens)
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(images)["retrieved"], model.encode_images(images)["retrieved"])


@pytest.mark.parametrize(("values", "message"), [
    (dict(memory_size=0), "memory_size must be in 1"),
    (dict(memory_size=3, retrieve=4), "retrieve must be in 1..min"),
    (dict(memory_size=3, retrieve=2, memory_len=0), "memory_len must be in 1..64"),
])
def test_bad_memory_settings_are_named(data, values, message):
    _, vocab = data
    with pytest.raises(ValueError, match=message):
        create_model("retrieval-captioner", vocab=vocab, **{**TINY, **values})


def test_fill_memory_refuses_a_memory_of_another_size(data):
    images, _ = data
    model = filled(data)
    with pytest.raises(ValueError, match="the memory holds 6 rows"):
        model.fill_memory(model.image_features(images[:3]), CAPTIONS[:3])


def test_in_training_a_picture_looks_up_as_its_unaugmented_self(data):
    images, _ = data
    model = filled(data, retrieve=2)
    rows = torch.arange(6)
    with torch.no_grad():
        clean = model.encode_images(images, exclude=rows)["retrieved"]
        augmented = model.encode_images(images.flip(-1).roll(7, -2), exclude=rows)["retrieved"]
    assert torch.equal(augmented, clean)


def test_recipe_copies_a_trained_encoder_and_fills_the_memory(tmp_path, capsys):
    """`xmodal train` on a prepared folder: the encoder comes from `encoder_from` (and stays it),
    the memory holds every training picture's features and first caption; without `encoder_from`
    the recipe says what is missing."""
    import json

    from xmodal.cli import main
    from xmodal.data.prepared import CaptionDataset
    from xmodal.pipelines import load_pipeline
    from xmodal.tasks.data import stored_images

    assert main(["data", "shapes", str(tmp_path / "d"), "--count", "12", "--quiet"]) == 0
    common = (f'[data]\nkind = "prepared"\npath = "{tmp_path / "d"}"\nmax_len = 12\n'
              '[train]\nsteps = 2\nbatch_size = 4\nprogress = false\n')
    shape = 'encoder_width = 8\nencoder_dim = 16\nd_model = 16\nn_layers = 1\nn_heads = 2\nff_dim = 32\n'
    (tmp_path / "first.toml").write_text(f'[model]\nname = "transformer-captioner"\n{shape}{common}')
    assert main(["train", str(tmp_path / "first.toml"), f"--train.out_dir={tmp_path / 'first'}"]) == 0
    config = tmp_path / "ra.toml"
    config.write_text(f'[model]\nname = "retrieval-captioner"\nretrieve = 2\nmemory_len = 6\n{shape}{common}')
    capsys.readouterr()
    assert main(["train", str(config), f"--train.out_dir={tmp_path / 'none'}"]) == 2
    assert "needs encoder_from" in capsys.readouterr().err
    assert main(["train", str(config), f"--train.out_dir={tmp_path / 'ra'}",
                 f"--model.encoder_from={tmp_path / 'first' / 'model'}"]) == 0
    first, ra = load_model(tmp_path / "first" / "model"), load_model(tmp_path / "ra" / "model")
    assert json.loads((tmp_path / "ra" / "model" / "config.json").read_text())["config"]["encoder_from"] is None
    for k, v in first.image_encoder.state_dict().items():
        assert torch.equal(v, ra.image_encoder.state_dict()[k]), k
    train = CaptionDataset(tmp_path / "d", "train")
    assert ra.memory_tokens.size(0) == len(train)
    keys = load_pipeline(tmp_path / "first" / "model", "image-to-text").image_features(stored_images(train))
    torch.testing.assert_close(ra.memory_keys, keys, atol=1e-5, rtol=0)
    assert words(ra, ra.memory_tokens[0].long())[:-1] == train.records[0]["captions"][0].split()[:6]


def test_a_retrieved_caption_replaces_the_decoded_one_only_when_it_scores_higher_per_word(data):
    """A decoded caption that scores worse per word than a retrieved one gives way to it (its score
    is its summed log-probability, as the decoder itself computes it); a perfect one stays; a
    retrieved caption that breaks the decoding's rules never enters; `prefer_retrieved=False` keeps
    the search's caption."""
    from xmodal.models.decoding import Decoded, DecodeOptions, _allowed, decode

    images, vocab = data
    model = filled(data, retrieve=1)
    allowed = lambda ids: _allowed(ids, DecodeOptions("greedy", 1, max_len=8))  # noqa: E731
    with torch.no_grad():
        memory = model.encode_images(images)
        poor = [Decoded([4, 5], -100.0, True) for _ in CAPTIONS]
        chosen = model.rescore(memory, poor, allowed)
        batch = CaptionCollate(vocab, choice="first")([(im, [c], {}) for im, c in zip(images, CAPTIONS)])
        full, _ = model(images, batch["tokens"])
    expected = (full.gather(2, batch["tokens"][:, 1:, None])[..., 0] * (batch["tokens"][:, 1:] != 0)).sum(1)
    assert [" ".join(vocab.words[i] for i in d.tokens) for d in chosen] == CAPTIONS  # each its own row's title
    torch.testing.assert_close(torch.tensor([d.score for d in chosen]), expected, atol=1e-4, rtol=0)
    perfect = [Decoded([4, 5], 0.0, True) for _ in CAPTIONS]
    assert model.rescore(memory, perfect, allowed) == perfect
    one_word = model.rescore(memory, poor, lambda ids: len(ids) <= 1)
    assert [d.tokens for d in one_word] == [
        d.tokens if len(c.split()) > 1 else chosen[i].tokens for i, (d, c) in enumerate(zip(poor, CAPTIONS))]
    model.config.prefer_retrieved = False
    assert model.rescore(memory, poor, allowed) == poor
    model.config.prefer_retrieved = True
    with torch.no_grad():  # through decode: the rules hold for whatever is chosen
        assert all(len(d.tokens) <= 1 for d in decode(model, images, DecodeOptions("greedy", 1, max_len=1)))


def test_export_refuses_a_retrieval_captioner(data, tmp_path):
    from xmodal.export import export_onnx

    filled(data).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="retrieval captioner"):
        export_onnx(tmp_path / "m", tmp_path / "onnx")


def test_runtime_onnx_names_why_a_retrieval_captioner_has_no_export(data, tmp_path, capsys):
    from xmodal.cli import main

    filled(data).save_pretrained(tmp_path / "m")
    picture = tmp_path / "p.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(picture)
    assert main(["caption", str(picture), "--model", str(tmp_path / "m"), "--runtime", "onnx"]) == 2
    assert "is a retrieval-captioner: it has no ONNX export" in capsys.readouterr().err
    assert main(["caption", str(picture), "--model", str(tmp_path / "m")]) == 0  # auto: PyTorch
