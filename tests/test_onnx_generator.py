"""`xmodal export onnx` for one-pass generators and `xmodal generate --runtime onnx`."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from fresh_process import xmodal_in_fresh_process

pytest.importorskip("onnxruntime")

from xmodal.cli import main  # noqa: E402
from xmodal.export import IMAGE_TOLERANCE, export_onnx  # noqa: E402
from xmodal.models.folders import resolve_model_dir  # noqa: E402
from xmodal.models.hub import load_model  # noqa: E402
from xmodal.runtime import OnnxExportError, OnnxGenerator, find_generator_export  # noqa: E402

PROMPTS = ["a large red circle", "a small blue square above a large yellow triangle", "a small green cross"]


@pytest.fixture(scope="module")
def gan_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx") / "shapes-gan"
    meta = export_onnx("shapes-gan", folder)
    return folder, meta


def test_each_graph_matches_pytorch_on_the_same_inputs(gan_export):
    folder, meta = gan_export
    assert meta["graphs"] == ["centre", "draw", "radius", "slots", "text"]
    assert meta["check"].keys() >= {f"max_abs_diff_{g}" for g in meta["graphs"]}
    assert max(meta["check"].values()) < IMAGE_TOLERANCE
    # the runtime's picture for given noise and boxes is PyTorch's, for prompts of different lengths
    model = load_model("shapes-gan").eval()
    runtime = OnnxGenerator(folder)
    text = runtime.encode(PROMPTS)
    boxes, present = runtime.sample_layout(text["slots"], text["p_present"], [0, 1, 2])
    noise = np.random.default_rng(0).standard_normal((3, *runtime.noise_shape), dtype=np.float32)
    got = runtime.run("draw", {"noise": noise, **text, "boxes": boxes, "present": present})[0]
    with torch.no_grad():
        tokens, mask, pooled = model.encode_text(PROMPTS)
        slots = model.layout.read(tokens, mask)
        expected = model.draw(torch.from_numpy(noise), tokens, mask, pooled,
                              (slots, torch.from_numpy(boxes), torch.from_numpy(present) > 0.5,
                               model.layout.predict_labels(slots, model.layout_words(PROMPTS))))
    assert np.abs(got - expected.numpy()).max() < IMAGE_TOLERANCE
    assert np.abs(text["slots"] - slots.numpy()).max() < 1e-4
    # stored as onnxruntime's basic rewrites leave them (the tracer's shape arithmetic folded): standard operators only
    import onnx

    draw = onnx.load(str(folder / "draw.onnx")).graph.node
    assert {n.domain for n in draw} <= {"", "ai.onnx"} and not [n for n in draw if n.op_type == "Constant"]


def test_pictures_depend_on_their_own_seed_only(gan_export):
    runtime = OnnxGenerator(gan_export[0])
    alone = np.asarray(runtime(PROMPTS[1], seed=7)[0])
    mixed = runtime(PROMPTS, seed=6)  # seeds 6, 7, 8: the second prompt at seed 7, beside others
    # the same draws; onnxruntime's kernels round a batch of 3 and of 1 apart: one level, a few pixels at most
    diff = np.abs(np.asarray(mixed[1]).astype(int) - alone.astype(int))
    assert diff.max() <= 1 and (diff > 0).sum() <= 8
    seeds = [np.asarray(im) for im in runtime(PROMPTS[0], n=3)]
    assert not np.array_equal(seeds[0], seeds[1]) and not np.array_equal(seeds[1], seeds[2])
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in mixed)


def test_a_batch_drawn_in_parts_side_by_side_is_the_batch_drawn_whole(gan_export):
    whole, parts = OnnxGenerator(gan_export[0], threads=1), OnnxGenerator(gan_export[0], threads=2)
    prompts = PROMPTS * 12  # 36 rows: two parts of 18, one on each worker thread
    a, b = whole(prompts, seed=4), parts(prompts, seed=4)
    assert not whole.parts.used and parts.parts.used
    diff = np.abs(np.stack([np.asarray(im) for im in a]).astype(int) - np.stack([np.asarray(im) for im in b]).astype(int))
    assert len(b) == 36 and diff.max() <= 1 and (diff > 0).mean() < 1e-3


def _draw_in_a_child(runtime, queue) -> None:
    queue.put(len(runtime(PROMPTS * 12, seed=4)))


def test_a_forked_child_draws_in_parts_with_its_own_threads(gan_export):
    import multiprocessing

    runtime = OnnxGenerator(gan_export[0], threads=2)
    runtime(PROMPTS * 12, seed=4)  # the parent's worker threads exist
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_draw_in_a_child, args=(runtime, queue))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on its parent's worker threads")
    assert child.exitcode == 0 and queue.get(timeout=5) == 36


def test_the_bundled_default_generator_has_its_export_and_draws_without_torch(tmp_path):
    export = find_generator_export("shapes-diffusion-fast", options_given=False, require=True)
    assert export == resolve_model_dir("shapes-diffusion-fast") / "onnx"
    assert find_generator_export("shapes-diffusion-fast", options_given=True, require=False) is None
    lines, torch_used = xmodal_in_fresh_process(["generate", *PROMPTS, "-n", "2", "-o", tmp_path, "--json"])
    assert not torch_used
    written = [json.loads(line) for line in lines]
    assert [w["seed"] for w in written] == list(range(6)) and all(os.path.isfile(w["file"]) for w in written)


def test_bad_generator_exports_and_options_are_named(gan_export, tmp_path, capsys):
    folder, _ = gan_export
    args = ["generate", "a large red circle", "-o", str(tmp_path / "out"), "--runtime", "onnx"]
    assert main([*args, "--model", "shapes-diffusion-fast", "--steps", "4"]) == 2
    assert "drop --steps" in capsys.readouterr().err
    assert main([*args[:-2], "--model", str(folder), "--steps", "4"]) == 2  # an export folder: no PyTorch to fall back to
    assert "drop --steps" in capsys.readouterr().err
    assert main([*args, "--model", "shapes-vae"]) == 2
    assert "has no ONNX export" in capsys.readouterr().err
    assert main(["export", "onnx", "shapes-vae", str(tmp_path / "vae")]) == 2
    assert "does not draw in one pass" in capsys.readouterr().err
    assert main(["export", "onnx", "fashion-gan", str(tmp_path / "fgan")]) == 2
    assert "word-level encoders" in capsys.readouterr().err
    captioner = resolve_model_dir("shapes-captioner-transformer") / "onnx"
    assert main([*args, "--model", str(captioner)]) == 2
    assert "holds an export for image-to-text; this command needs one for text-to-image" in capsys.readouterr().err
    # an unknown word skips its prompt alone with --strict; the other prompts are drawn
    assert main(["generate", "a large red circle", "zebra stripes", "-o", str(tmp_path / "out"), "--runtime", "onnx",
                 "--model", str(folder), "--strict"]) == 0
    err = capsys.readouterr().err
    assert "'zebra'" in err and len(list((tmp_path / "out").glob("*.png"))) == 1
    long = " ".join(["a large red circle above"] * 10)  # 50 words: more than the layout stage reads
    for runtime in ("onnx", "torch"):
        out = tmp_path / f"long-{runtime}"
        assert main(["generate", long, "a small red circle", "-o", str(out), "--runtime", runtime,
                     "--model", "shapes-diffusion-fast"]) == 0
        assert "the layout stage reads at most 32" in capsys.readouterr().err
        assert [p.name for p in out.glob("*.png")] == ["0001-00-seed1.png"]  # the other prompt is drawn
    meta = json.loads((folder / "onnx.json").read_text())
    tampered = shutil.copytree(folder, tmp_path / "tampered")
    for change, message in (({"noise_shape": [100000, 100000]}, "is not the draw graph's"),
                            ({"graphs": ["../../x", "draw"]}, "this generator needs"),
                            ({"layout": {"bogus": 1}}, "unexpected keyword")):
        (tampered / "onnx.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(OnnxExportError, match=message):
            OnnxGenerator(tampered)
    broken = shutil.copytree(folder, tmp_path / "broken")
    (broken / "draw.onnx").write_bytes(b"not a graph")
    with pytest.raises(OnnxExportError, match="not a loadable ONNX export"):
        OnnxGenerator(broken)
