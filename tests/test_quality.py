"""Explanation-quality measures against part labels."""

from __future__ import annotations

import numpy as np
import pytest

from lgur.quality import explanation_quality, format_quality, patch_part_fractions, roc_auc
from lgur.synth.world import WorldSpec, generate_world


def test_roc_auc_known_values() -> None:
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


def test_patch_part_fractions() -> None:
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[:2, :2] = 3  # top-left patch is all "upper"
    labels[2:, 2:] = 4
    labels[3, 3] = 5
    fractions = patch_part_fractions(labels, (2, 2))
    assert fractions.shape == (4, 8) and np.allclose(fractions.sum(1), 1)
    assert fractions[0, 3] == 1 and fractions[3, 4] == 0.75 and fractions[3, 5] == 0.25


def test_explanation_quality_on_a_tiny_world(tiny_model, tmp_path) -> None:
    generate_world(WorldSpec(seed=2, train_identities=1, val_identities=1, test_identities=3), tmp_path, 1, False)
    result = explanation_quality(tiny_model, tmp_path, "test")
    assert 0 <= result["foreground_auc"] <= 1
    shares = np.array(result["prototype_part_share"])
    assert shares.shape == (tiny_model.config.num_prototypes, 8)
    assert np.allclose(shares.sum(1), 1, atol=1e-3)  # each prototype's attention is spread over the parts
    assert sum(result["part_area_share"]) == pytest.approx(1, abs=1e-3)
    assert 0 <= result["prototype_overlap"] <= 1
    assert "prototype overlap" in format_quality(result)
