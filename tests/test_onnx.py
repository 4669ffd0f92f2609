"""`xmodal export onnx` and the torch-free runtime (`xmodal caption --runtime onnx`)."""

import json
import os
import time

import pytest
import torch
from fresh_process import xmodal_in_fresh_process
from PIL import Image

pytest.importorskip("onnxruntime")

import xmodal  # noqa: E402
from xmodal.cli import main  # noqa: E402
from xmodal.data.collate import CaptionCollate  # noqa: E402
from xmodal.data.shapes import ShapesDataset  # noqa: E402
from xmodal.data.text import Vocabulary  # noqa: E402
from xmodal.export import export_onnx  # noqa: E402
from xmodal.models.registry import create_model  # noqa: E402
from xmodal.runtime import OnnxCaptioner, OnnxExportError  # noqa: E402

TINY = {
    "sat-captioner": dict(encoder_width=8, encoder_dim=16, embed_dim=8, decoder_dim=16, attention_dim=8),
    "transformer-captioner": dict(image_encoder="factorized-cnn", encoder_width=8, encoder_dim=16, d_model=16,
                                  n_layers=2, n_heads=2, ff_dim=32),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    data = ShapesDataset("test", count=12, seed=4)
    paths = []
    for i in range(12):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(data.item(i)[1]).save(paths[-1])
    return paths


def trained_briefly(name, tmp_path):
    """A tiny captioner fitted for a few steps (so that its captions differ between images)."""
    data = ShapesDataset("train", count=32, seed=3)
    items = [data[i] for i in range(32)]
    vocab = Vocabulary.build(c for _, caps, _ in items for c in caps)
    torch.manual_seed(0)
    model = create_model(name, vocab=vocab, beam_size=1, **TINY[name])
    batch = CaptionCollate(vocab, choice="first")(items)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss, _ = model.train().loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("name", sorted(TINY))
def test_onnx_captions_equal_pytorch_greedy(name, images, tmp_path, capsys):
    folder = trained_briefly(name, tmp_path)
    assert main(["export", "onnx", str(folder), str(tmp_path / "onnx")]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["check"]["max_abs_log_prob_diff"] < 1e-3
    pipe = xmodal.load(folder)
    expected = pipe([str(p) for p in images], method="greedy")
    runtime = OnnxCaptioner(tmp_path / "onnx")
    assert runtime([Image.open(p).convert("RGB") for p in images], batch_size=5) == expected
    batch = pipe._batch([str(p) for p in images[:4]])
    with torch.no_grad():
        reference = pipe.model.init_state(pipe.model.encode_images(batch))
    for name_, got in zip(runtime.names, runtime.start(batch.numpy())):
        assert torch.allclose(torch.from_numpy(got), reference[name_], atol=1e-4), name_
    first = reference[runtime.names[0]]
    assert (first[0] - first[1]).abs().max() > 1e-3  # the state depends on the picture
    args = ["caption", *map(str, images[:3]), "--model", str(tmp_path / "onnx"), "--runtime", "onnx", "--min-len", "4"]
    assert main(args) == 0
    torch_args = [a for a in args if a not in ("--runtime", "onnx")]
    torch_args[torch_args.index(str(tmp_path / "onnx"))] = str(folder)
    onnx_out = capsys.readouterr().out
    assert main([*torch_args, "--beam", "1"]) == 0 and capsys.readouterr().out == onnx_out
    assert main(["export", "onnx", str(folder), str(tmp_path / "onnx")]) == 0  # an earlier export is replaced


def _caption_in_fresh_process(image, *args):
    """`xmodal caption` in a new interpreter: (its caption line, whether torch was imported)."""
    lines, torch_used = xmodal_in_fresh_process(["caption", image, *args])
    return lines[0], torch_used


def test_an_export_beside_the_weights_is_used_without_torch_until_the_weights_change(images, tmp_path):
    folder = trained_briefly("transformer-captioner", tmp_path)
    caption, torch_used = _caption_in_fresh_process(images[0], "--model", folder)
    assert torch_used  # no export yet: PyTorch
    export_onnx(folder, folder / "onnx")
    assert _caption_in_fresh_process(images[0], "--model", folder) == (caption, False)
    assert _caption_in_fresh_process(images[0], "--model", folder / "onnx", "--runtime", "onnx") == (caption, False)
    assert _caption_in_fresh_process(images[0], "--model", folder, "--beam", "2")[1]  # beam search: PyTorch
    model = xmodal.load(folder).model
    with torch.no_grad():
        model.head.weight.mul_(1.5)
    model.save_pretrained(folder)  # retrained: the export no longer matches (save keeps the onnx folder)
    assert (folder / "onnx" / "onnx.json").is_file()
    assert _caption_in_fresh_process(images[0], "--model", folder)[1]


def test_bad_exports_and_folders_are_named(images, tmp_path, capsys):
    args = ["caption", str(images[0]), "--runtime", "onnx", "--model"]
    assert main([*args, str(tmp_path)]) == 2 and "not a model folder (no config.json)" in capsys.readouterr().err
    folder = trained_briefly("transformer-captioner", tmp_path)
    export_onnx(folder, tmp_path / "onnx")
    meta = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    (tmp_path / "onnx" / "onnx.json").write_text(json.dumps({**meta, "state": ["k0", "v0"]}))  # tampered
    assert main([*args, str(tmp_path / "onnx")]) == 2 and "do not run as onnx.json describes" in capsys.readouterr().err
    (tmp_path / "onnx" / "step.onnx").write_bytes(b"not a graph")
    assert main([*args, str(tmp_path / "onnx")]) == 2 and "not a loadable ONNX export" in capsys.readouterr().err
    assert main([*args[:-1], "--beam", "3", "--model", str(tmp_path / "onnx")]) == 2
    assert "decodes greedily: give --beam 1" in capsys.readouterr().err
    assert main([*args[:-1], "--model", str(folder)]) == 2
    assert "has no ONNX export: run `xmodal export onnx" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", "onnx", str(folder), str(tmp_path / "busy")]) == 2
    assert "other files in it" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").is_file()
    assert main(["export", "onnx", "shapes-clip", str(tmp_path / "clip")]) == 2
    assert "exports captioners and generators" in capsys.readouterr().err
    with pytest.raises(OnnxExportError):
        OnnxCaptioner(tmp_path / "nowhere")


def test_the_graphs_onnxruntime_optimized_are_kept_and_a_damaged_or_unwritable_cache_is_worked_around(
        images, tmp_path, monkeypatch):
    export = tmp_path / "onnx"
    export_onnx(trained_briefly("transformer-captioner", tmp_path), export)
    pictures = [Image.open(p) for p in images[:4]]
    monkeypatch.setenv("XMODAL_CACHE_DIR", "off")
    captions = OnnxCaptioner(export)(pictures)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XMODAL_CACHE_DIR", str(cache))
    assert OnnxCaptioner(export)(pictures) == captions
    kept = sorted(cache.iterdir())
    assert [p.suffix for p in kept] == [".onnx", ".onnx"]  # start and step, whole (no partial file left)
    stamps = [p.stat().st_mtime_ns for p in kept]
    assert OnnxCaptioner(export)(pictures) == captions
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # loaded as kept, not made again
    kept[0].write_bytes(b"damaged")
    left = kept[0].with_name(kept[0].name + ".999999.tmp")  # a killed process's partial copy, an hour old
    left.write_bytes(b"partial")
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    assert OnnxCaptioner(export)(pictures) == captions
    assert kept[0].stat().st_size > 100 and sorted(cache.iterdir()) == kept  # made again, in its place; no leftovers
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XMODAL_CACHE_DIR", str(blocked / "cache"))
    assert OnnxCaptioner(export)(pictures) == captions and blocked.read_text() == "not a folder"


def test_the_server_captions_with_the_export_where_the_model_has_one(images, tmp_path):
    from fastapi.testclient import TestClient
    from tiny_models import save_tiny_models

    from xmodal.server import create_app

    folder = trained_briefly("transformer-captioner", tmp_path)
    export_onnx(folder, folder / "onnx")
    tiny = save_tiny_models(tmp_path / "tiny", seed=6)
    expected = xmodal.load(folder)([images[0]], method="greedy")[0]
    for runtime, used in (("auto", "onnx"), ("onnx", "onnx"), ("torch", "torch")):
        with TestClient(create_app(str(tiny / "gen"), str(folder), runtime=runtime)) as client:
            assert client.get("/v1/models").json()["loaded"]["captioner"]["runtime"] == used
            upload = {"file": ("a.png", images[0].read_bytes(), "image/png")}
            assert client.post("/v1/caption", files=upload).json()["caption"] == expected
    with TestClient(create_app(str(tiny / "gen"), str(tiny / "cap"))) as client:  # no export: PyTorch
        assert client.get("/v1/models").json()["loaded"]["captioner"]["runtime"] == "torch"
    with pytest.raises(OnnxExportError, match="has no ONNX export"):
        create_app(str(tiny / "gen"), str(tiny / "cap"), runtime="onnx")
    with pytest.raises(ValueError, match="runtime must be one of"):
        create_app(str(tiny / "gen"), str(folder), runtime="fast")
