import dataclasses

import pytest

from pipeline.config import ConfigError, ExtractConfig, canonical_json, content_hash
from pipeline.presets import TinyPreset


def test_configs_are_frozen_and_validated():
    cfg = ExtractConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.limit = 3  # type: ignore[misc]
    for bad in ({"limit": 0}, {"limit": -5}, {"crops": "some"}, {"batch_size": 0}, {"shard_size": -1},
                {"images": ""}):
        with pytest.raises(ConfigError):
            ExtractConfig(**bad)


def test_hash_is_canonical_json():
    a = ExtractConfig(images="synthetic:docs", limit=10)
    b = ExtractConfig.from_dict({"limit": 10, "images": "synthetic:docs"})
    assert a.hash() == b.hash() and a.to_json() == b.to_json()
    assert a.hash() != ExtractConfig(images="synthetic:docs", limit=11).hash()
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert content_hash({"b": 1, "a": 2}) == content_hash({"a": 2, "b": 1})


def test_batch_size_does_not_change_the_cache_key():
    assert ExtractConfig(batch_size=4).cache_relevant() == ExtractConfig(batch_size=32).cache_relevant()
    assert ExtractConfig(crops="base").cache_relevant() != ExtractConfig(crops="all").cache_relevant()


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown extract config key 'limt' \(did you mean 'limit'\?\)"):
        ExtractConfig.from_dict({"limt": 5})


def test_tiny_preset_validation():
    assert TinyPreset().tokens_per_crop == 64
    with pytest.raises(ConfigError):
        TinyPreset(patch_size=7)
    with pytest.raises(ConfigError):
        TinyPreset(grid_pinpoints=((64, 100),))
