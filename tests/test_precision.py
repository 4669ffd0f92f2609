"""A model's default precision: bf16 autocast where its config asks for it and the device computes
bf16 natively, around its drawing network only; float32 elsewhere, or when a user asks for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xmodal
from xmodal.cli import main
from xmodal.models import hub
from xmodal.models.hub import autocast_dtype, load_model

PROMPTS = ["a large red circle", "a small blue square above a green triangle"]


def test_auto_is_bf16_only_for_a_model_that_asks_for_it_on_hardware_that_computes_it(monkeypatch):
    gan, vae = load_model("shapes-gan"), load_model("shapes-vae")
    assert gan.inference_dtype() == torch.bfloat16 and vae.inference_dtype() == torch.float32
    monkeypatch.setattr(hub, "native_bf16", lambda device: False)
    assert autocast_dtype(gan, "auto") is None  # emulated bf16 is slower than fp32
    assert autocast_dtype(gan, "bfloat16") == torch.bfloat16  # unless asked for
    monkeypatch.setattr(hub, "native_bf16", lambda device: True)
    assert autocast_dtype(gan, "auto") == torch.bfloat16
    assert autocast_dtype(gan, "float32") is None and autocast_dtype(vae, "auto") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype(gan, "float16")


def test_the_generator_draws_in_bf16_while_text_and_layout_are_read_in_fp32(monkeypatch):
    monkeypatch.setattr(hub, "native_bf16", lambda device: True)
    pipe = xmodal.load("shapes-gan")
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            seen.setdefault(name, output.dtype)
        return hook

    model = pipe.model
    hooks = [model.generator.to_pixels[1].register_forward_hook(record("generator")),
             model.layout.memory.register_forward_hook(record("layout")),
             model.text_encoder.pool.register_forward_hook(record("text"))]
    drawn = {}
    for precision in ("auto", "float32"):
        pipe.precision = precision
        seen.clear()
        drawn[precision] = np.stack([np.asarray(im, np.float32) for im in pipe(PROMPTS, n=2, seed=3)])
        assert seen == {"generator": torch.bfloat16 if precision == "auto" else torch.float32,
                        "layout": torch.float32, "text": torch.float32}
    for hook in hooks:
        hook.remove()
    difference = np.abs(drawn["auto"] - drawn["float32"]).mean()
    assert 0 < difference < 3  # bf16 rounding, not another picture (levels of 255)
    with pytest.raises(ValueError, match="precision must be one of"):
        pipe.precision = "half"


def test_a_config_names_float32_or_bfloat16_and_onnx_draws_in_float32(tmp_path, capsys):
    import dataclasses

    from xmodal.models.dfgan import DFGAN

    gan = load_model("shapes-gan")
    with pytest.raises(ValueError, match="inference_dtype must be 'float32' or 'bfloat16'"):
        DFGAN(dataclasses.replace(gan.config, inference_dtype="float16"), gan.text_encoder)
    code = main(["generate", "a red circle", "--model", "shapes-gan", "--runtime", "onnx", "--precision", "bfloat16",
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "--runtime onnx draws in float32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
