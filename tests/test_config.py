"""Config validation: typed keys, unknown keys, overrides, presets, stages."""
from pathlib import Path

import pytest

from handclip.cli import main
from handclip.config import (Config, apply_overrides, config_from_dict, config_to_dict, dump_config, load_config,
                             parse_override, stage_config)
from handclip.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(path):
    config = load_config(path)
    assert config_from_dict(config_to_dict(config)) == config


def test_yaml_dump_reloads_identically(tmp_path):
    config = load_config(CONFIGS / "vitb16-ce-triplet-center.yaml", {"loss.center": 0.001})
    (tmp_path / "c.yaml").write_text(dump_config(config))
    assert load_config(tmp_path / "c.yaml") == config
    assert config.loss.center == 0.001


@pytest.mark.parametrize("mapping, key", [
    ({"loss": {"triplett": 1.0}}, "loss.triplett"),
    ({"modle": {}}, "modle"),
    ({"data": {"augment": {"flip": 0.5}}}, "data.augment.flip"),
])
def test_unknown_key_is_named(mapping, key):
    with pytest.raises(UserError, match=f"unknown key '{key}'"):
        config_from_dict(mapping)


@pytest.mark.parametrize("mapping, key", [
    ({"loss": {"triplet": "heavy"}}, "loss.triplet"),
    ({"train": {"epochs": 2.5}}, "train.epochs"),
    ({"model": {"classifier": "softmax"}}, "model.classifier"),
    ({"data": {"aspects": "dorsal_r"}}, "data.aspects"),
    ({"model": {"unfreeze": "some"}}, "model.unfreeze"),
    ({"train": {"compile": "yes"}}, "train.compile"),
])
def test_ill_typed_value_is_named(mapping, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        config_from_dict(mapping)


def test_value_checks():
    with pytest.raises(UserError, match="data.aspects"):
        config_from_dict({"data": {"aspects": ["dorsal_x"]}})
    with pytest.raises(UserError, match="data.k"):
        config_from_dict({"data": {"sampler": "pk", "batch_size": 30, "k": 4}})
    with pytest.raises(UserError, match="loss.triplet"):
        config_from_dict({"loss": {"triplet": -1.0}})


def test_ints_widen_to_floats_and_unfreeze_takes_both_kinds():
    config = config_from_dict({"loss": {"triplet": 1}, "data": {"sampler": "pk"}, "model": {"unfreeze": 3}})
    assert config.loss.triplet == 1.0 and isinstance(config.loss.triplet, float)
    assert config.model.unfreeze == 3
    assert config_from_dict({"model": {"unfreeze": "none"}}).model.unfreeze == "none"


def test_overrides_parse_yaml_values():
    assert parse_override("loss.triplet=1.0") == ("loss.triplet", 1.0)
    assert parse_override("data.aspects=[dorsal_r, palmar_r]") == ("data.aspects", ["dorsal_r", "palmar_r"])
    assert parse_override("model.pretrained=none") == ("model.pretrained", "none")
    with pytest.raises(UserError, match="key=value"):
        parse_override("loss.triplet")
    nested = apply_overrides({"loss": {"ce": 1.0}}, {"loss.triplet": 2.0, "train.epochs": 3})
    assert nested == {"loss": {"ce": 1.0, "triplet": 2.0}, "train": {"epochs": 3}}


def test_stages_are_validated_up_front_and_resolve():
    config = config_from_dict({"stages": [{"data": {"aspects": ["dorsal_r"]}}, {"data.aspects": ["palmar_r"]}]})
    assert stage_config(config, 1).data.aspects == ["palmar_r"]
    assert stage_config(config, 1).stages == []
    with pytest.raises(UserError, match=r"stages\[1\].*loss.tripplet"):
        config_from_dict({"stages": [{}, {"loss": {"tripplet": 1.0}}]})


def test_cli_bad_config_key_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  tripplet: 1.0\n")
    code = main(["train", "--config", str(bad), "--data", str(tmp_path), "--splits", str(tmp_path),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "loss.tripplet" in err and str(bad) in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_invalid_yaml_names_file(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("loss: [unclosed\n")
    assert main(["train", "--config", str(bad), "--data", str(tmp_path), "--splits", str(tmp_path),
                 "--out", str(tmp_path / "run")]) == 2
    assert "broken.yaml" in capsys.readouterr().err


def test_defaults_are_the_original_baseline():
    config = Config()
    assert (config.model.arch, config.model.pretrained, config.loss.ce, config.loss.triplet) == \
        ("ViT-B-16", "openai", 1.0, 0.0)


def test_pair_losses_require_pk_sampler():
    with pytest.raises(UserError, match="data.sampler"):
        config_from_dict({"loss": {"triplet": 1.0}, "data": {"sampler": "random"}})
    with pytest.raises(UserError, match="train.seed"):
        config_from_dict({"train": {"seed": -1}})
