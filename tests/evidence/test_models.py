import importlib.util

import pytest

from fewbit_fx.evidence import models

HAS_HF = importlib.util.find_spec("transformers") is not None


@pytest.mark.skipif(not HAS_HF, reason="needs transformers")
def test_build_hf_zeroes_every_random_drop():
    """BEiT's default config has stochastic depth (drop_path_rate 0.1): two runs of one
    step would differ, and a rewrite could not be checked for an unchanged forward."""
    model, args, kwargs = models.build_hf("beit", "tiny")
    cfg = model.config.to_dict()
    drops = {k: v for k, v in cfg.items() if models._random_drop(k) and isinstance(v, float)}
    assert "drop_path_rate" in drops and set(drops.values()) == {0.0}
    assert model.training
    assert list(kwargs) == ["pixel_values"]  # an image model, though its config has a vocab_size


def test_random_drop_names():
    for name in ("hidden_dropout_prob", "resid_pdrop", "drop_path_rate", "drop_connect_rate",
                 "encoder_layerdrop"):
        assert models._random_drop(name)
    for name in ("hidden_size", "layer_norm_eps", "initializer_range"):
        assert not models._random_drop(name)


@pytest.mark.skipif(not HAS_HF, reason="needs transformers")
def test_build_hf_feeds_images_to_cnn_configs_without_an_image_size():
    model, args, kwargs = models.build_hf("resnet", "tiny")
    assert list(kwargs) == ["pixel_values"] and kwargs["pixel_values"].shape[1:] == (3, 32, 32)
    model(*args, **kwargs)  # runs
