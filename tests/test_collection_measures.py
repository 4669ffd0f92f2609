"""Measures for a real collection: recall with several right answers (and its chance level), and
the two captioning baselines, exactly."""

from __future__ import annotations

from math import comb

import pytest
import torch

from xmodal.metrics.retrieval import recall_with_relevance
from xmodal.tasks.captioning import category_baseline


def test_recall_with_several_right_answers_and_chance():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0],   # right: 1, 3 -> top-1 is 0 (miss), top-2 has 1 (hit)
                           [0.1, 0.2, 0.3, 0.9]])  # right: 3 -> hit at 1
    relevant = torch.tensor([[False, True, False, True], [False, False, False, True]])
    out = recall_with_relevance(scores, relevant, ks=(1, 2))
    assert out["r@1"] == 0.5 and out["r@2"] == 1.0
    assert out["chance_r@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out["chance_r@2"] == pytest.approx(((1 - comb(2, 2) / comb(4, 2)) + (1 - comb(3, 2) / comb(4, 2))) / 2)
    with pytest.raises(ValueError, match="at least one right candidate"):
        recall_with_relevance(scores, torch.zeros(2, 4, dtype=torch.bool))


def test_category_baseline_is_each_category_s_most_common_first_caption():
    train = [{"captions": ["apple", "a red apple"], "category": "food"}, {"captions": ["pie"], "category": "food"},
             {"captions": ["apple"], "category": "food"}, {"captions": ["car"], "category": "transportation"}]
    test = [{"captions": ["x"], "category": "food"}, {"captions": ["y"], "category": "transportation"},
            {"captions": ["z"], "category": "people"}]
    assert category_baseline(train, test) == ["apple", "car", "apple"]  # unseen category: overall most common


def test_nearest_neighbour_baseline_finds_the_same_picture(tmp_path):
    import numpy as np
    from tiny_models import save_tiny_models

    from xmodal.pipelines import load_pipeline
    from xmodal.tasks.captioning import nearest_neighbour_captions

    pipe = load_pipeline(save_tiny_models(tmp_path, seed=3, kinds=("cap",)) / "cap", "image-to-text")
    rng = np.random.default_rng(0)
    train_images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    train = [{"captions": [f"picture {i}", "other"]} for i in range(5)]
    test_images = [train_images[3], train_images[1]]
    assert nearest_neighbour_captions(pipe, train_images, train, test_images) == ["picture 3", "picture 1"]
