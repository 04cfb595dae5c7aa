import pytest

from detkd.config import load_recipe, parse_overrides
from detkd.errors import ConfigError


def test_overrides_parse_yaml_values_and_nest():
    assert parse_overrides(["train.lr=0.02", "data.sizes=[96,128]", "model.anchor_size=null"]) == {
        "train": {"lr": 0.02},
        "data": {"sizes": [96, 128]},
        "model": {"anchor_size": None},
    }


def test_recipe_file_plus_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  root: somewhere\ntrain:\n  epochs: 3\n  lr: 0.1\n")
    r = load_recipe(path, ["train.lr=0.05", "model.family=retinanet"])
    assert (r.train.epochs, r.train.lr, r.model.family, r.data.root) == (3, 0.05, "retinanet", "somewhere")


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  root: x\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_recipe(path)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_recipe(None, ["data.root=x", "train.epochs=many"])
    with pytest.raises(ConfigError, match=r"model\.family"):
        load_recipe(None, ["data.root=x", "model.family=yolo"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(bad)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])
