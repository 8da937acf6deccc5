"""MCU in one call on the digits set: curve, sweep, region, t*, exported model."""

import json

import jax
import numpy as np
import pytest

from mcu_jax import checkpoint, pipeline, train
from mcu_jax.mcu import MCUConfig


def test_run_mcu_end_to_end(tmp_path, monkeypatch, theta_o, theta_p, digits_images,
                            digits_split, small_model):
    train_images, test_images = digits_images
    refs = train.reference_accuracies(small_model, theta_o, train_images, test_images,
                                      digits_split)
    out = pipeline.run_mcu(
        small_model, theta_o, theta_p, train_images, test_images, digits_split, refs,
        jax.random.PRNGKey(0), MCUConfig(epochs=2, progress=False),
        pipeline.MaskConfig(k=0.5, k_r=0.1), pipeline.SelectionConfig(num_t=6),
        out_dir=tmp_path / "mcu",
    )
    assert 0.75 <= out.t_star <= 1.0
    assert out.sweep.acc["forget"].shape == (6,)
    assert out.gaps.shape == (6,)
    for lo, hi in out.region:
        assert 0.0 <= lo <= hi <= 1.0
    assert set(out.measured) == {"retain", "forget", "test"}
    assert np.isfinite(out.measured_gap)
    assert set(out.minutes) == {"mask", "curve", "selection"}
    summary = json.loads((tmp_path / "mcu" / "mcu.json").read_text())
    assert summary["t_star"] == pytest.approx(out.t_star)
    # The chosen model is an ordinary checkpoint that evaluates like theta(t*).
    variables, meta = checkpoint.load_model(tmp_path / "mcu" / "model")
    assert meta["t_star"] == pytest.approx(out.t_star)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(out.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    # A second run reuses the cached mask, the finished curve checkpoint, the saved sweep and
    # the exported model: nothing is recomputed.
    def recomputed(*args, **kwargs):
        raise AssertionError("a finished part of run_mcu was recomputed")

    monkeypatch.setattr(pipeline.sweep, "sweep", recomputed)
    monkeypatch.setattr(pipeline.bn, "recompute", recomputed)
    monkeypatch.setattr(pipeline.masks, "mask_gradients", recomputed)
    again = pipeline.run_mcu(
        small_model, theta_o, theta_p, train_images, test_images, digits_split, refs,
        jax.random.PRNGKey(0), MCUConfig(epochs=2, progress=False),
        selection_config=pipeline.SelectionConfig(num_t=6), out_dir=tmp_path / "mcu",
    )
    assert again.t_star == pytest.approx(out.t_star)
    np.testing.assert_allclose(again.gaps, out.gaps)
    assert again.measured == pytest.approx(out.measured)
    assert again.region == out.region


def test_config_validation():
    with pytest.raises(ValueError, match="k_r"):
        pipeline.MaskConfig(k_r=1.5)
    with pytest.raises(ValueError, match="num_t"):
        pipeline.SelectionConfig(num_t=3)
    with pytest.raises(ValueError, match="bn_set"):
        pipeline.SelectionConfig(bn_set="test")
