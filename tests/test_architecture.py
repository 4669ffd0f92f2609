"""The code's shape, checked: imports point one way, and every registered model works end to end."""

import ast
import re
from pathlib import Path

import pytest
import torch

from xmodal.data.collate import CaptionCollate, GenerationCollate
from xmodal.data.shapes import ShapesDataset
from xmodal.data.text import Vocabulary
from xmodal.models.base import CONTRACTS
from xmodal.models.hub import load_model
from xmodal.models.registry import create_model, list_registered
from xmodal.tasks.text_encoders import prepare_text_encoder

SRC = Path(__file__).resolve().parents[1] / "src" / "xmodal"

# Layers, lowest first: a module may import only modules of its own layer or below.
LAYERS = [
    ("base", ["xmodal._version", "xmodal.typed_config", "xmodal.worlds", "xmodal.data", "xmodal.metrics", "xmodal.sheets", "xmodal.viz",
              "xmodal.training.config", "xmodal.training.plots", "xmodal.training.loop",
              "xmodal.training.checkpoints"]),
    ("encoders/layers", ["xmodal.models.base", "xmodal.models.row_workers", "xmodal.models.registry", "xmodal.models.text_encoders",
                         "xmodal.models.image_encoders", "xmodal.models.layout", "xmodal.models.layout_draws",
                         "xmodal.models.decoding"]),
    ("models", ["xmodal.models"]),
    ("pipelines", ["xmodal.pipelines"]),
    ("tasks", ["xmodal.tasks"]),
    ("training recipes", ["xmodal.training"]),
    ("surfaces", ["xmodal.api", "xmodal.cli", "xmodal.server", "xmodal.evaluation", "xmodal.search",
                  "xmodal.reports", "xmodal.__main__", "xmodal"]),
]


def layer_of(module: str) -> int:
    """The layer of a module: the longest listed prefix wins."""
    best, rank = -1, None
    for r, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), r
    if rank is None:
        raise ValueError(f"{module} is in no layer")
    return rank


def module_name(path: Path, root: Path) -> str:
    parts = ["xmodal", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.ImportFrom, name: str, root: Path) -> str:
    """`from a.b import c`: the module a.b.c when c is a module of the package, else a.b."""
    sub = f"{node.module}.{name}"
    relative = Path(*sub.split(".")[1:])
    return sub if (root / relative).with_suffix(".py").is_file() or (root / relative).is_dir() else node.module


def upward_imports(root: Path) -> list[str]:
    """Every import (at any depth, lazy ones included) of a module from a higher layer."""
    found = []
    for path in sorted(root.rglob("*.py")):
        here = module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [_imported(node, a.name, root) for a in node.names] \
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                if (name == "xmodal" or name.startswith("xmodal.")) and layer_of(name) > layer_of(here):
                    found.append(f"{here} ({LAYERS[layer_of(here)][0]}) imports {name} "
                                 f"({LAYERS[layer_of(name)][0]}), line {node.lineno}")
    return found


def test_imports_point_one_way():
    assert upward_imports(SRC) == []


def test_upward_import_is_caught(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.py").write_text("def f():\n    from xmodal.models.hub import load_model\n")
    assert upward_imports(tmp_path) == ["xmodal.data.bad (base) imports xmodal.models.hub (models), line 2"]


def test_capabilities_are_declared_not_probed():
    probes = []
    for path in sorted(SRC.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\b(hasattr|getattr)\(", line):
                probes.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    # the only getattr left: reading a dataclass's fields by name (scene attributes, options), not a capability
    assert all("SceneSpec" in p or "ATTRIBUTES" in p or "getattr(a, k)" in p or "getattr(self, f.name)" in p
               for p in probes), probes


def functions_over(root: Path, limit: int) -> list[str]:
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return long


def test_no_function_over_60_lines():
    assert functions_over(SRC, 60) == []


# ----------------------------------------------------------------------------- every registered model

TINY_TEXT = {"kind": "learned", "dim": 16}
TINY = {  # the smallest real config of each registered model
    "sat-captioner": dict(encoder_width=8, encoder_dim=16, embed_dim=8, decoder_dim=16, attention_dim=8),
    "transformer-captioner": dict(encoder_width=8, encoder_dim=16, d_model=16, n_layers=1, n_heads=2, ff_dim=32),
    "retrieval-captioner": dict(encoder_width=8, encoder_dim=16, d_model=16, n_layers=1, n_heads=2, ff_dim=32,
                                memory_size=4, retrieve=2, memory_len=6),
    "cvae": dict(z_dim=4, channels=(16, 8, 8, 4, 4)),
    "dfgan": dict(z_dim=4, channels=(16, 8, 8, 4, 4)),
    "autoencoder": dict(latent_channels=2, channels=(8, 8, 8)),
    "latent-diffusion": dict(channels=(8, 16), heads=2, steps=2),
    "distilled-diffusion": dict(channels=(8, 16), heads=2, student_timesteps=(900, 450)),
    "clip": dict(encoder_width=8, encoder_dim=16, embed_dim=8),
}
BUILTIN = sorted(n for n in list_registered() if not n.startswith("test-"))


@pytest.fixture(scope="module")
def shapes():
    data = ShapesDataset("train", count=6, seed=11)
    items = [data[i] for i in range(6)]
    return items, [c for _, caps, _ in items for c in caps]


def build(name: str, shapes):
    items, captions = shapes
    torch.manual_seed(0)
    if name.endswith("captioner"):
        vocab = Vocabulary.build(captions)
        return create_model(name, vocab=vocab, **TINY[name]), CaptionCollate(vocab, choice="first")(items)
    batch = GenerationCollate("first")(items)
    if name == "autoencoder":
        return create_model(name, **TINY[name]), batch
    encoder, _ = prepare_text_encoder(TINY_TEXT, captions)
    diffusion = name.endswith("diffusion")
    parts = {"autoencoder": create_model("autoencoder", **TINY["autoencoder"])} if diffusion else {}
    if name == "distilled-diffusion":  # a student learns from a teacher's trajectories, not from pictures
        batch = {"texts": batch["texts"], "states": torch.randn(len(items), 3, 2, 16, 16), "layout_map": None}
    return create_model(name, text_encoder=encoder, **parts, **TINY[name]), batch


def outputs(model, batch) -> list[torch.Tensor]:
    """What the model gives at inference, for its task."""
    from xmodal.models.decoding import DecodeOptions, decode

    with torch.no_grad():
        if model.task == "image-to-text":
            return [torch.tensor(d.tokens) for d in decode(model, batch["images"], DecodeOptions(max_len=6))]
        if model.task == "text-to-image":
            return [model.generate(batch["texts"], list(range(len(batch["texts"]))))]
        if model.task == "image-text-alignment":
            return [model.encode_image(batch["images"]), model.encode_text(batch["texts"])]
        return [model.decode(model.encode(batch["images"]))]


def test_every_builtin_model_has_a_tiny_config():
    assert sorted(TINY) == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_registered_model_builds_trains_saves_and_loads_the_same(name, shapes, tmp_path):
    model, batch = build(name, shapes)
    assert isinstance(model, CONTRACTS[model.task]), f"{name} does not keep the {model.task} contract"
    loss, logs = model.train().loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and isinstance(logs, dict)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval().save_pretrained(tmp_path / name)
    loaded = load_model(tmp_path / name)
    assert type(loaded) is type(model)
    for a, b in zip(outputs(model, batch), outputs(loaded, batch), strict=True):
        assert torch.equal(a, b)


def test_prepared_parts_decide_their_config_fields(shapes):
    items, captions = shapes
    vocab = Vocabulary.build(captions)
    with pytest.raises(ValueError, match=r"vocab_size=99 given, but the prepared vocab set vocab_size=\d+; leave vocab_size out"):
        create_model("sat-captioner", vocab=vocab, vocab_size=99, **TINY["sat-captioner"])
    encoder, spec = prepare_text_encoder(TINY_TEXT, captions)
    model = create_model("cvae", text_encoder=encoder, **TINY["cvae"])
    assert model.text_encoder is encoder and model.config.text_encoder == spec
    with pytest.raises(ValueError, match=r"text_encoder: unknown key\(s\) \['dimm'\]; valid: \['kind', 'dim'"):
        create_model("cvae", text_encoder={"kind": "learned", "dimm": 3})
    with pytest.raises(ValueError, match=r"layout: unknown key\(s\) \['slotz'\]; valid: \['slots'"):
        create_model("cvae", text_encoder=encoder, layout={"slotz": 2})
