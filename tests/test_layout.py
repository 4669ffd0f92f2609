import dataclasses

import pytest
import torch

from xmodal.data.boxes import layout_targets
from xmodal.data.collate import GenerationCollate
from xmodal.data.shapes import ShapesDataset
from xmodal.models.hub import load_model
from xmodal.models.layout import (
    LayoutConfig,
    LayoutModel,
    box_planes,
    conv_over_map,
    layout_generators,
    paint_boxes,
)
from xmodal.models.registry import create_model
from xmodal.tasks.text_encoders import prepare_text_encoder

TINY_LAYOUT = {"slots": 2, "dim": 16, "heads": 2, "layers": 1, "grid": 8, "radius_bins": 4, "feature_dim": 4}
LABELS = {"color": ["red", "green", "blue", "yellow", "purple", "orange"],
          "shape": ["circle", "square", "triangle", "diamond", "cross"]}


@pytest.fixture(scope="module")
def data():
    ds = ShapesDataset("train", count=8, seed=6)
    items = [ds[i] for i in range(8)]
    return [c for _, caps, _ in items for c in caps], GenerationCollate(layout_slots=2)(items), items


def _record(*objects):
    return {"scene": {"objects": [{"cx": x, "cy": y, "r": r} for x, y, r in objects]}}


def test_targets_follow_reading_order_whatever_the_record_order():
    boxes, present = layout_targets([
        _record((50, 30, 7), (10, 32, 12)),  # right object listed first: the left one comes first
        _record((30, 50, 7), (32, 10, 12)),  # lower object listed first: the upper one comes first
        _record((20, 20, 9)),
    ], slots=2)
    assert boxes[0].tolist() == [[10, 32, 12], [50, 30, 7]]
    assert boxes[1].tolist() == [[32, 10, 12], [30, 50, 7]]
    assert present.tolist() == [[True, True], [True, True], [True, False]]
    assert boxes[2, 1].tolist() == [0, 0, 0]


def test_targets_name_missing_boxes_and_too_many_objects():
    with pytest.raises(ValueError, match="object boxes"):
        layout_targets([{"captions": ["a cat"]}], slots=2)
    with pytest.raises(ValueError, match="3 objects"):
        layout_targets([_record((5, 5, 2), (20, 5, 2), (40, 5, 2))], slots=2)


def test_paint_fills_the_box_and_nothing_else():
    features = torch.tensor([[[2.0], [5.0]]])  # (B=1, K=2, F=1); the second slot is absent
    boxes = torch.tensor([[[16.0, 32.0, 8.0], [48.0, 32.0, 8.0]]])
    present = torch.tensor([[True, False]])
    grid = paint_boxes(features, boxes, present, size=64)  # (1, F + 3, 64, 64)
    assert grid.shape == (1, 4, 64, 64)
    feature, u, v, mask = grid[0]
    assert mask[32, 16] == 1 and mask[32, 40] == 0 and mask[32, 56] == 0  # absent slot paints nothing
    assert feature[32, 16] == 2.0 and feature[5, 5] == 0
    assert mask[32, 7] == 1 and mask[32, 6] == 0  # the box grown by one pixel covers x in [7, 25]
    assert u[32, 20].item() == pytest.approx((20.5 - 16) / 8) and v[36, 16].item() == pytest.approx((36.5 - 32) / 8)
    assert torch.isfinite(grid).all()


def test_a_convolution_over_the_box_planes_equals_one_over_the_dense_map():
    torch.manual_seed(0)
    features = torch.randn(3, 2, 5)  # (B, K, F)
    boxes = torch.tensor([[[16.0, 32.0, 8.0], [44.0, 20.0, 5.0]]] * 3) + torch.rand(3, 2, 3) * 4
    present = torch.tensor([[True, True], [True, False], [False, False]])
    planes = box_planes(features, boxes, present, size=16)
    assert torch.equal(planes.dense(), paint_boxes(features, boxes, present, size=16))
    conv = torch.nn.Conv2d(4 + 5 + 3, 7, 3, 1, 1)  # 4 image channels, then the map's F + 3
    h = torch.randn(3, 4, 16, 16)
    dense = conv(torch.cat([h, planes.dense()], 1))
    assert torch.allclose(conv_over_map(conv, h, planes), dense, atol=1e-5)
    assert torch.equal(conv_over_map(conv, h, planes.dense()), dense)
    channels_last = h.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(conv_over_map(conv, channels_last, planes), dense, atol=1e-5)


def _overfit(layout, encoder, batch, opt, steps):
    """Train the layout (and text encoder) on one batch; the last loss."""
    for _ in range(steps):
        tokens, mask, _ = encoder.encode(batch["texts"])
        loss = layout.loss(layout.read(tokens, mask), *batch["layout"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def test_layout_learns_boxes_and_samples_per_seed(data):
    captions, batch, _ = data
    encoder, spec = prepare_text_encoder({"kind": "learned", "dim": 16}, captions)
    torch.manual_seed(0)
    layout = LayoutModel(16, LayoutConfig(**TINY_LAYOUT))
    params = list(layout.parameters()) + list(encoder.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    tokens, mask, _ = encoder.encode(batch["texts"])
    first = layout.loss(layout.read(tokens, mask), *batch["layout"]).item()
    loss = _overfit(layout, encoder, batch, opt, 60)
    assert loss.item() < 0.5 * first
    slots = layout.read(*encoder.encode(batch["texts"])[:2])
    boxes, present = layout.sample(slots, layout_generators(range(8)))
    again, _ = layout.sample(slots[3:5], layout_generators([3, 4]))
    assert torch.equal(boxes[3:5], again)  # a layout depends on its own prompt and seed only
    assert present[:, 0].all() and (boxes[..., 2][present] >= 3).all()
    assert present[:, 1].tolist() == batch["layout"][1][:, 1].tolist()  # overfit: the object count is learned


@pytest.mark.parametrize("name,labels", [("cvae", {}), ("dfgan", {}), ("latent-diffusion", {}),
                                         ("latent-diffusion", LABELS)])
def test_generators_with_a_layout_stage(name, labels, data, tmp_path):
    captions, batch, items = data
    encoder, spec = prepare_text_encoder({"kind": "learned", "dim": 16}, captions)
    torch.manual_seed(0)
    layout = {**TINY_LAYOUT, "labels": labels}
    if labels:
        batch = GenerationCollate(layout_slots=2, layout_labels=labels)(items)
    if name in ("cvae", "dfgan"):
        model = create_model(name, text_encoder=encoder, z_dim=4, channels=(16, 8, 8, 4, 4), layout=layout)
    else:
        ae = create_model("autoencoder", latent_channels=2, channels=(8, 8, 8))
        model = create_model("latent-diffusion", text_encoder=encoder, autoencoder=ae,
                             channels=(8, 16), heads=2, steps=3, layout=layout)
        torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)
    loss, logs = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and logs["layout_nll"] > 0
    assert model.layout.queries.grad is not None and model.layout.to_features.weight.grad is not None
    with pytest.raises(ValueError, match="object boxes"):
        model.loss(GenerationCollate()(items))  # no "layout" in the batch
    model.eval()
    texts = ["a small red circle", "a large blue square to the left of a small green cross"]
    a = model.generate(texts, [1, 2])
    assert torch.equal(a, model.generate(texts, [1, 2]))
    torch.testing.assert_close(a[1], model.generate(texts[1:], [2])[0], atol=1e-5, rtol=0)
    assert not torch.equal(a, model.generate(texts, [5, 6]))
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(a, load_model(tmp_path / "m").generate(texts, [1, 2]))


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        LayoutModel(16, LayoutConfig(**{**TINY_LAYOUT, "temperature": 0.0}))



def test_targets_carry_object_labels_in_reading_order():
    records = [{"scene": {"objects": [{"cx": 50, "cy": 30, "r": 7, "color": "blue", "shape": "cross"},
                                      {"cx": 10, "cy": 32, "r": 9, "color": "red", "shape": "square"}]}}]
    boxes, present, labels = layout_targets(records, slots=2, labels=LABELS)
    assert labels.tolist() == [[[0, 1], [2, 4]]]  # the left (red square) object first
    records[0]["scene"]["objects"][0]["color"] = "teal"
    with pytest.raises(ValueError, match="'teal', not one of"):
        layout_targets(records, slots=2, labels=LABELS)


def test_labelled_layout_learns_labels_and_paints_them_one_hot(data):
    captions, _, items = data
    torch.manual_seed(0)
    encoder, spec = prepare_text_encoder({"kind": "learned", "dim": 16}, captions)
    batch = GenerationCollate(layout_slots=2, layout_labels=LABELS)(items)
    layout = LayoutModel(16, LayoutConfig(**TINY_LAYOUT, labels=LABELS))
    opt = torch.optim.Adam(list(layout.parameters()) + list(encoder.parameters()), lr=3e-3)
    _overfit(layout, encoder, batch, opt, 150)
    slots = layout.read(*encoder.encode(batch["texts"])[:2])
    _, present, labels = batch["layout"]
    assert torch.equal(layout.predict_labels(slots)[present], labels[present])  # overfit: every label read
    boxes = torch.tensor([[[16.0, 32.0, 8.0], [48.0, 32.0, 8.0]]])
    grid = layout.paint(slots[:1], boxes, torch.tensor([[True, True]]), 64, labels=torch.tensor([[[2, 4], [0, 1]]]))
    assert grid.shape == (1, 4 + 11 + 3, 64, 64) and layout.config.channels == 18
    one_hot = grid[0, 4:15]
    assert one_hot[:, 32, 16].tolist() == [0, 0, 1, 0, 0, 0] + [0, 0, 0, 0, 1]  # blue cross, left box
    assert one_hot[:, 32, 48].tolist() == [1, 0, 0, 0, 0, 0] + [0, 1, 0, 0, 0]  # red square, right box


def test_word_labels_are_read_from_the_words_and_used_in_generation(data, tmp_path):
    captions, _, items = data
    torch.manual_seed(0)
    encoder, spec = prepare_text_encoder({"kind": "learned", "dim": 16}, captions)
    batch = GenerationCollate(layout_slots=2, layout_labels=LABELS)(items)
    config = LayoutConfig(**TINY_LAYOUT, labels=LABELS, word_labels=True)
    with pytest.raises(ValueError, match="word-level text encoder"):
        LayoutModel(16, config)  # no vocabulary: a BERT-style encoder
    layout = LayoutModel(16, config, vocab_size=len(spec.words))
    words = encoder.ids(batch["texts"])
    with pytest.raises(ValueError, match="pass the prompts' \\(ids, mask\\)"):
        layout.loss(layout.read(*encoder.encode(batch["texts"])[:2]), *batch["layout"])
    opt = torch.optim.Adam(list(layout.parameters()) + list(encoder.parameters()), lr=3e-3)
    for _ in range(150):
        tokens, mask, _ = encoder.encode(batch["texts"])
        loss = layout.loss(layout.read(tokens, mask), *batch["layout"], words=words)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, present, labels = batch["layout"]
    slots = layout.read(*encoder.encode(batch["texts"])[:2])
    from_words = layout.predict_labels(slots, words)
    assert torch.equal(from_words[present], labels[present])  # overfit: every label read from the words
    # the word reader alone decides: its labels change when its weights do, the slots' heads do not matter
    for head in layout.label_heads:
        torch.nn.init.zeros_(head.weight)
    assert torch.equal(layout.predict_labels(slots, words), from_words)

    model = create_model("dfgan", text_encoder=encoder, z_dim=4, channels=(16, 8, 8, 4, 4),
                         layout=dataclasses.asdict(config)).eval()
    assert model.layout.word_labels is not None
    texts = batch["texts"][:2]
    with torch.no_grad():
        layout = model.sample_layout(*model.encode_text(texts)[:2], [1, 2], words=model.layout_words(texts))
    assert layout[3].shape == (2, 2, 2)
    with torch.no_grad():
        drawn = model.generate(texts, [1, 2])
    model.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.layout.config.word_labels and torch.equal(drawn, again.generate(texts, [1, 2]))


def test_min_gap_keeps_sampled_boxes_apart():
    torch.manual_seed(0)
    config = LayoutConfig(**{**TINY_LAYOUT, "grid": 16, "radius_range": (2.0, 8.0)}, min_gap=3.0)
    layout = LayoutModel(16, config)
    with torch.no_grad():
        layout.presence.bias.fill_(10.0)  # both slots present
        slots = layout.read(torch.randn(64, 5, 16), torch.ones(64, 5, dtype=torch.bool))
    boxes, present = layout.sample(slots, layout_generators(range(64)))
    assert present.all()
    gap = (boxes[:, 0, :2] - boxes[:, 1, :2]).norm(dim=-1) - boxes[:, 0, 2] - boxes[:, 1, 2]
    assert (gap >= 3.0).all()
    free, _ = LayoutModel(16, dataclasses.replace(config, min_gap=None)).sample(slots, layout_generators(range(64)))
    # without the constraint an untrained layout lets boxes touch
    free_gap = (free[:, 0, :2] - free[:, 1, :2]).norm(dim=-1) - free[:, 0, 2] - free[:, 1, 2]
    assert (free_gap < 3.0).any()


def test_boxes_are_picked_as_torch_multinomial_picks_them_row_by_row():
    """The batched pick draws each row from its own generator exactly what torch.multinomial drew
    (the bundled models' boxes, and so their pictures, stay those their numbers were measured on)."""
    import numpy as np

    from xmodal.models.layout import layout_generators, pick_per_row

    rng = np.random.default_rng(0)
    for bins in (26, 1024):
        probs = rng.random((64, bins)).astype(np.float32) ** 4
        probs[:, : bins // 3] = 0  # zeroed bins, as keep_apart leaves them
        probs /= probs.sum(1, keepdims=True)
        seeds = range(100, 164)
        expected = [int(torch.multinomial(torch.from_numpy(row), 1, generator=g))
                    for row, g in zip(probs, layout_generators(seeds))]
        picked = pick_per_row(probs, layout_generators(seeds))
        assert picked.tolist() == expected and picked.min() >= bins // 3
