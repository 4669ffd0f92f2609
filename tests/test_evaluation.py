import json

import numpy as np
import pytest
import torch

from xmodal.cli import main
from xmodal.evaluation import fid_kid


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
