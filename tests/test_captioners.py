import json

import numpy as np
import pytest
import torch
from PIL import Image

import xmodal
from xmodal.cli import main
from xmodal.data.collate import CaptionCollate
from xmodal.data.shapes import ShapesDataset
from xmodal.data.text import Vocabulary
from xmodal.metrics.captions import caption_scores, exact_match
from xmodal.models.decoding import DecodeOptions, decode
from xmodal.models.hub import ModelLoadError, load_model
from xmodal.models.image_encoders import ResNetEncoder, SmallCNN
from xmodal.models.registry import create_model, list_registered
from xmodal.worlds.shapes import parse

CAPTIONERS = [n for n in list_registered() if n.endswith("captioner")]
TINY = {
    "sat-captioner": dict(encoder_width=8, encoder_dim=16, embed_dim=8, decoder_dim=16, attention_dim=8),
    "transformer-captioner": dict(encoder_width=8, encoder_dim=16, d_model=16, n_layers=1, n_heads=2, ff_dim=32),
    "retrieval-captioner": dict(encoder_width=8, encoder_dim=16, d_model=16, n_layers=1, n_heads=2, ff_dim=32,
                                memory_size=8, retrieve=2, memory_len=6),
}


@pytest.fixture(scope="module")
def shapes_batch():
    data = ShapesDataset("train", count=8, seed=3)
    items = [data[i] for i in range(8)]
    vocab = Vocabulary.build(c for _, caps, _ in items for c in caps)
    return vocab, CaptionCollate(vocab, choice="first")(items)


def tiny(name, vocab, **kw):
    torch.manual_seed(0)
    model = create_model(name, vocab=vocab, **{**TINY[name], **kw})
    return model


def test_registry_lists_both_captioners_and_rejects_unknown():
    assert set(CAPTIONERS) == {"sat-captioner", "transformer-captioner", "retrieval-captioner"}
    with pytest.raises(ValueError, match="valid: .*sat-captioner"):
        create_model("no-such-model")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \[.decoder_dimm.\]; valid: .*decoder_dim"):
        create_model("sat-captioner", decoder_dimm=3)


@pytest.mark.parametrize("name", CAPTIONERS)
def test_forward_backward_save_load(name, shapes_batch, tmp_path):
    vocab, batch = shapes_batch
    model = tiny(name, vocab)
    loss, _ = model.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.vocab.words == vocab.words
    with torch.no_grad():
        assert torch.equal(model(batch["images"], batch["tokens"])[0], loaded(batch["images"], batch["tokens"])[0])
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model"] == name and meta["task"] == "image-to-text"


@pytest.mark.parametrize("name", CAPTIONERS)
def test_overfits_one_batch(name, shapes_batch):
    vocab, batch = shapes_batch
    model = tiny(name, vocab, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss, _ = model.loss(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


@pytest.mark.parametrize("name", CAPTIONERS)
def test_beam_one_equals_greedy_and_beam_is_no_worse(name, shapes_batch):
    vocab, batch = shapes_batch
    model = tiny(name, vocab).eval()
    images = batch["images"]
    greedy = decode(model, images, DecodeOptions(method="greedy", max_len=8))
    beam1 = decode(model, images, DecodeOptions(method="beam", beam_size=1, max_len=8))
    assert [d.tokens for d in greedy] == [d.tokens for d in beam1]
    beam3 = decode(model, images, DecodeOptions(method="beam", beam_size=3, max_len=8))
    for g, b in zip(greedy, beam3):
        if g.finished:
            assert b.score >= g.score - 1e-4


class Scripted:
    """A fake-free stand-in with fixed next-token tables, to check search exactly."""

    def __init__(self, table, v):
        self.table, self.v = table, v

    def encode_images(self, images):
        return {"x": images.new_zeros(images.size(0), 1)}

    def init_state(self, memory):
        return {"t": torch.zeros(memory["x"].size(0), dtype=torch.long)}

    def step(self, state, tokens):
        logits = torch.stack([torch.tensor(self.table(int(t), int(tok))) for t, tok in zip(state["t"], tokens)])
        return logits.log_softmax(-1), {"t": state["t"] + 1}, None


def test_beam_finds_better_sequence_than_greedy():
    # vocab: 0 pad 1 start 2 end 3 <unk> 4 "a" 5 "b". Greedy takes "a" (0.6) then is stuck with a flat
    # tail; "b" (0.4) is followed by a near-certain <end>: beam must prefer "b".
    def table(t, tok):
        if t == 0:
            return [-9, -9, -9, -9, np.log(0.6), np.log(0.4)]
        if tok == 5:
            return [-9, -9, 0.0, -9, -9, -9]
        return [-9, -9, np.log(0.34), -9, np.log(0.33), np.log(0.33)]

    model = Scripted(table, 6)
    images = torch.zeros(1, 3, 4, 4)
    g = decode(model, images, DecodeOptions(method="greedy", max_len=5, block_consecutive_repeats=False))[0]
    b = decode(model, images, DecodeOptions(method="beam", beam_size=2, max_len=5, block_consecutive_repeats=False))[0]
    assert g.tokens == [4] and b.tokens == [5] and b.score > g.score


def test_no_beam_reaches_end_returns_best_unfinished():
    model = Scripted(lambda t, tok: [-9, -9, -50, -9, 0.0, -1.0], 6)  # <end> never likely
    out = decode(model, torch.zeros(2, 3, 4, 4), DecodeOptions(method="beam", beam_size=3, max_len=4,
                                                              block_consecutive_repeats=False))
    assert all(len(d.tokens) == 4 and not d.finished for d in out)
    assert out[0].tokens == [4, 4, 4, 4]
    guarded = decode(model, torch.zeros(1, 3, 4, 4), DecodeOptions(method="beam", beam_size=3, max_len=4))[0]
    assert guarded.tokens == [4, 5, 4, 5]  # repetition guard: no word twice in a row


class Counted:
    """Row r writes `images[r, 0, 0, 0]` words ("a b a ...") then <end>; every step's row count is kept."""

    def __init__(self):
        self.rows = []

    def encode_images(self, images):
        return {"n": images[:, 0, 0, 0].long()}

    def init_state(self, memory):
        return {"t": torch.zeros_like(memory["n"]), "n": memory["n"]}

    def step(self, state, tokens):
        self.rows.append(len(tokens))
        logits = torch.full((len(tokens), 6), -9.0)
        ended = state["t"] >= state["n"]
        logits[ended, 2] = 0.0
        logits[~ended, 4 + state["t"][~ended] % 2] = 0.0
        return logits.log_softmax(-1), {"t": state["t"] + 1, "n": state["n"]}, None


def test_greedy_rows_that_ended_leave_the_batch_and_nothing_else_changes():
    lengths = [1, 6, 1, 1, 3, 1, 6, 1]
    images = torch.tensor(lengths, dtype=torch.float)[:, None, None, None].expand(-1, 3, 4, 4)
    model = Counted()
    together = decode(model, images, DecodeOptions(method="greedy", max_len=8))
    assert model.rows == [8, 8, 3, 3, 2, 2, 2]  # 5 of 8 ended after one word, 1 of 3 after three
    alone = [decode(Counted(), images[i:i + 1], DecodeOptions(method="greedy", max_len=8))[0] for i in range(8)]
    assert [(d.tokens, d.score, d.finished) for d in together] == [(d.tokens, d.score, d.finished) for d in alone]
    assert [len(d.tokens) for d in together] == lengths
    sampled = Counted()
    decode(sampled, images, DecodeOptions(method="sample", max_len=8), generator=torch.Generator().manual_seed(0))
    assert sampled.rows == [8] * 7  # sampling draws for every row at every step


def test_unknown_word_is_never_written():
    # <unk> (3) is the likeliest token at every step; every decoding method must write "a" (4) instead
    model = Scripted(lambda t, tok: [-9, -9, -9 if t < 2 else 0.0, 0.0, -0.5, -1.0], 6)
    images = torch.zeros(1, 3, 4, 4)
    for options in (DecodeOptions(method="greedy", max_len=5), DecodeOptions(method="beam", beam_size=3, max_len=5),
                    DecodeOptions(method="sample", top_k=1, max_len=5)):
        tokens = decode(model, images, options)[0].tokens
        assert tokens and 3 not in tokens


def test_sampling_is_seeded_and_top_k_one_is_greedy(shapes_batch):
    vocab, batch = shapes_batch
    model = tiny("sat-captioner", vocab).eval()
    images = batch["images"]
    opts = DecodeOptions(method="sample", max_len=6, temperature=1.5)
    a = decode(model, images, opts, generator=torch.Generator().manual_seed(1))
    b = decode(model, images, opts, generator=torch.Generator().manual_seed(1))
    assert [d.tokens for d in a] == [d.tokens for d in b]
    top1 = decode(model, images, DecodeOptions(method="sample", top_k=1, max_len=6))
    greedy = decode(model, images, DecodeOptions(method="greedy", max_len=6))
    assert [d.tokens for d in top1] == [d.tokens for d in greedy]
    with pytest.raises(ValueError, match="method"):
        DecodeOptions(method="nucleus")


def test_caption_metrics_against_hand_computed_values():
    # candidate "the cat sat on the mat" vs reference "the cat is on the mat":
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0, equal lengths (BP = 1)
    # BLEU-1 = 0.8333, BLEU-2 = sqrt(5/6 * 3/5) = 0.7071, BLEU-3 = (1/8) ** (1/3) = 0.5; ROUGE-L: LCS 5/6
    scores = caption_scores(["the cat sat on the mat"], [["the cat is on the mat"]], meteor=False)
    assert scores["bleu1"] == pytest.approx(5 / 6, abs=1e-4)
    assert scores["bleu2"] == pytest.approx(0.5 ** 0.5, abs=1e-4)
    assert scores["bleu3"] == pytest.approx(0.5, abs=1e-4)
    assert scores["bleu4"] < 1e-4
    assert scores["rouge_l"] == pytest.approx(5 / 6, abs=1e-4)
    same = caption_scores(["a red circle", "a blue square"], [["a red circle"], ["a blue square"]], meteor=False)
    assert same["bleu1"] == pytest.approx(1.0) and same["cider_d"] > 0.5


def test_exact_match():
    truth = [parse("a small red circle"), parse("a large blue square above a small red cross")]
    assert exact_match(["a small red circle", "a small red cross below a large blue square"], truth) == 1.0
    assert exact_match(["a small red circle .", "a large blue square to the left of a small red cross"], truth) == 0.0


def test_small_cnn_and_resnet_shapes(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    cnn = SmallCNN(8, 16)
    assert cnn.forward_features(x).shape == (2, 64, 16) and cnn.forward_pooled(x).shape == (2, 16)
    import torchvision
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    enc = ResNetEncoder("resnet18", weights=str(tmp_path / "r18.pt"), trainable=False)
    assert enc.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 49, 512)
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="no such file"):
        ResNetEncoder("resnet18", weights=str(tmp_path / "none.pt"))
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a resnet18 state dict"):
        ResNetEncoder("resnet18", weights=str(tmp_path / "bad.pt"))


def test_caption_cli_json_and_attention_map(shapes_batch, tmp_path, capsys):
    vocab, _ = shapes_batch
    tiny("sat-captioner", vocab).save_pretrained(tmp_path / "m")
    data = ShapesDataset("test", count=3, seed=0)
    paths = []
    for i in range(3):
        record, pixels = data.item(i)
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"nope")
    args = ["caption", str(paths[2]), str(paths[0]), str(tmp_path / "broken.png"), "--model", str(tmp_path / "m"), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["image"] for line in lines] == [str(paths[2]), str(paths[0])]
    assert "broken.png" in captured.err and "1 of 3 images skipped" in captured.err
    assert main(["caption", str(paths[1]), "--model", str(tmp_path / "m"), "--attention-map", str(tmp_path / "att.png"), "--min-len", "3"]) == 0
    assert (tmp_path / "att.png").stat().st_size > 1000
    assert main(["caption", str(paths[1]), "--model", str(tmp_path / "nowhere")]) == 2
    assert "no model folder or bundled model" in capsys.readouterr().err


def test_pipeline_api(shapes_batch, tmp_path):
    vocab, _ = shapes_batch
    tiny("transformer-captioner", vocab).save_pretrained(tmp_path / "m")
    pipe = xmodal.load(tmp_path / "m")
    record, pixels = ShapesDataset("test", count=1).item(0)
    out = pipe([Image.fromarray(pixels), pixels])
    assert len(out) == 2 and out[0] == out[1] and isinstance(out[0], str)
    with pytest.raises(TypeError):
        pipe([42])
    with pytest.raises(ModelLoadError):
        load_model(tmp_path)


@pytest.mark.parametrize("layers", [1, 2])
def test_transformer_kv_cache_step_matches_the_full_decoder(shapes_batch, layers):
    """Decoding word by word with cached keys/values gives the log-probabilities and attention of
    running the whole prefix through the decoder at every step."""
    vocab, batch = shapes_batch
    model = tiny("transformer-captioner", vocab, n_layers=layers).eval()
    tokens = batch["tokens"][:, :6]
    with torch.no_grad():
        memory = model.encode_images(batch["images"])
        full, weights = model._decode(memory["memory"], tokens, need_weights=True)
        state = model.init_state(memory)
        for t in range(tokens.size(1)):
            log_probs, state, attention = model.step(state, tokens[:, t])
            torch.testing.assert_close(log_probs, full[:, t].float().log_softmax(-1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(attention, weights[:, t], atol=1e-6, rtol=1e-5)
        assert state["k0"].shape[2] == tokens.size(1)  # one cached key per word so far


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_label_smoothing_out_of_range_is_named(shapes_batch, value):
    vocab, _ = shapes_batch
    with pytest.raises(ValueError, match="label_smoothing"):
        tiny("transformer-captioner", vocab, label_smoothing=value)


@pytest.mark.parametrize("name", CAPTIONERS)
def test_chunked_encoding_gives_the_same_memory(name, shapes_batch):
    from xmodal.models.base import CPU_CHUNK, in_cpu_chunks

    vocab, batch = shapes_batch
    model = tiny(name, vocab).eval()
    images = torch.cat([batch["images"]] * 3)[: 2 * CPU_CHUNK + 3]  # two full chunks and a short one
    with torch.no_grad():
        whole, chunked = model.encode_images(images), in_cpu_chunks(model.encode_images, images)
    assert whole.keys() == chunked.keys()
    for key in whole:
        assert torch.allclose(whole[key], chunked[key], atol=1e-5), key


def test_decoding_default_comes_from_the_model(shapes_batch, tmp_path, capsys):
    vocab, batch = shapes_batch
    tiny("transformer-captioner", vocab, beam_size=1).save_pretrained(tmp_path / "greedy")
    tiny("transformer-captioner", vocab).save_pretrained(tmp_path / "beam")
    greedy, beam = xmodal.load(tmp_path / "greedy"), xmodal.load(tmp_path / "beam")
    assert (greedy.options.method, beam.options.method, beam.options.beam_size) == ("greedy", "beam", 3)
    record, pixels = ShapesDataset("test", count=1).item(0)
    Image.fromarray(pixels).save(tmp_path / "one.png")
    # the CLI decodes as the model says unless --beam is given: greedy and --beam 1 agree
    assert main(["caption", str(tmp_path / "one.png"), "--model", str(tmp_path / "greedy")]) == 0
    default = capsys.readouterr().out
    assert main(["caption", str(tmp_path / "one.png"), "--model", str(tmp_path / "greedy"), "--beam", "1"]) == 0
    assert capsys.readouterr().out == default == f"{tmp_path / 'one.png'}\t{greedy(pixels)[0]}\n"
