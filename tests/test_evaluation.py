import json

import numpy as np
import pytest
import torch

from xmodal.cli import main
from xmodal.metrics.images import fid_kid


class FirstPixels(torch.nn.Module):
    """Features = the first 4 red values of the top row: lets a test set the feature distribution."""

    num_features = 4

    def forward(self, images):
        return images[:, 0, 0, :4].double() / 100


def images_with_features(features: np.ndarray) -> list[np.ndarray]:
    out = []
    for f in features:
        im = np.zeros((64, 64, 3), np.uint8)
        im[0, :4, 0] = f
        out.append(im)
    return out


def test_fid_closed_form_shift():
    # same covariance, means 0.3 apart on each of 4 features: FID = |mu1 - mu2|^2 = 4 * 0.09 = 0.36
    rng = np.random.default_rng(0)
    base = rng.integers(50, 150, size=(200, 4))
    result = fid_kid(images_with_features(base), images_with_features(base + 30), FirstPixels(), kid_subset=50)
    assert result["fid"] == pytest.approx(0.36, abs=1e-6)
    same = fid_kid(images_with_features(base), images_with_features(base), FirstPixels(), kid_subset=50)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and abs(same["kid"]) < 0.05
    assert result["kid"] > same["kid"]


def test_fid_needs_features():
    with pytest.raises(ValueError, match="inception-weights"):
        fid_kid([np.zeros((64, 64, 3), np.uint8)] * 2, [np.zeros((64, 64, 3), np.uint8)] * 2)


@pytest.mark.slow
def test_inception_path_with_local_weights_gives_fid_kid_and_inception_score(tmp_path, monkeypatch):
    """The Inception code path, offline: an InceptionV3 state dict made here stands in for real weights."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as m:  # build the network once without its download, save its (random) weights
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pt")
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    fake = [np.full((64, 64, 3), 128, np.uint8) for _ in range(8)]
    result = fid_kid(real, fake, inception_weights=str(tmp_path / "inception.pt"), kid_subset=4)
    assert set(result) == {"fid", "kid", "kid_std", "inception_score", "inception_score_std"}
    assert result["fid"] > 0 and result["inception_score"] == pytest.approx(1.0, abs=1e-3)  # identical fakes: IS 1


def test_evaluate_captioner_writes_json_and_html(tmp_path, capsys):
    main(["data", "shapes", str(tmp_path / "d"), "--split", "test", "--count", "12", "--quiet"])
    capsys.readouterr()
    code = main(["evaluate", "captioner", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "ev"), "--no-meteor",
                 "--beam", "1"])
    assert code == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["images"] == 12 and 0 <= metrics["exact_match"] <= 1 and "cider_d" in metrics
    page = (tmp_path / "ev" / "report.html").read_text()
    assert page.count("<img") >= 12 and "exact_match" in page
