"""Typed configuration: presets, overrides, and the errors a user sees."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fedmrg.cli import main
from fedmrg.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    describe_keys,
    load_config,
    parse_override,
    preset_names,
)


def test_every_preset_loads_and_validates():
    names = preset_names()
    assert "default" in names
    for name in names:
        assert isinstance(load_config(name), ExperimentConfig)


def test_default_preset_equals_dataclass_defaults_where_it_is_silent():
    cfg = load_config("default")
    assert cfg.model == ExperimentConfig().model
    assert cfg.train == ExperimentConfig().train


def test_overrides_are_typed_and_nested():
    cfg = load_config("default", ["federation.rounds=3", "model.losses.mutual=0",
                                  "data.centers=[a, b]", "train.lr=1e-4"])
    assert cfg.federation.rounds == 3
    assert cfg.model.losses.mutual == 0.0 and isinstance(cfg.model.losses.mutual, float)
    assert cfg.data.centers == ["a", "b"]
    assert cfg.train.lr == pytest.approx(1e-4)


def test_later_override_wins():
    cfg = load_config("default", ["federation.rounds=3", "federation.rounds=4"])
    assert cfg.federation.rounds == 4


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("federation.roundz=3", "unknown key federation.roundz"),
        ("federation.roundz=3", "'rounds'"),  # lists the allowed keys
        ("nosuchsection.x=1", "unknown key nosuchsection"),
        ("federation.strategy=fedsgd", "choose one of ['centralized', 'local', 'fedavg'"),
        ("train.lr=-1", "train.lr: -1.0 is below the minimum 0"),
        ("federation.fraction=1.5", "above the maximum 1"),
        ("data.batch_size=1.5", "data.batch_size: expected an integer"),
        ("data.augment=maybe", "data.augment: expected true or false"),
        ("model.lora_targets=q_proj", "model.lora_targets: expected a list"),
        ("data.centers=[a, zz]", "unknown center 'zz'"),
        ("model.lm_heads=3", "divisible by model.lm_heads"),
        ("resources.clients_per_actor=0", "resources.clients_per_actor: 0 is below the minimum"),
        ("federation", "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert fragment in str(err.value)


def test_heldout_is_a_phantom_center_only_when_it_is_generated():
    assert load_config("default", ["data.centers=[a, heldout]"]).data.centers == ["a", "heldout"]
    with pytest.raises(ConfigError, match="unknown center 'heldout'"):
        load_config("default", ["data.centers=[a, heldout]", "data.phantom.heldout_center=false"])


def test_several_clients_per_actor_cannot_be_pinned_to_their_centers_nodes():
    cfg = load_config("default", ["resources.clients_per_actor=4"])
    assert cfg.resources.clients_per_actor == 4
    with pytest.raises(ConfigError, match=r"resources.clients_per_actor \(4\) must be 1 when "
                                          r"resources.pin_centers is true"):
        load_config("default", ["resources.clients_per_actor=4", "resources.pin_centers=true"])


def test_section_given_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="federation: expected a mapping"):
        config_from_dict({"federation": 3})


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "x.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(bad))


def test_yaml_file_then_override(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 7\nfederation:\n  rounds: 2\n  strategy: fedavg\n")
    cfg = load_config(str(path), ["federation.rounds=5"])
    assert (cfg.seed, cfg.federation.rounds, cfg.federation.strategy) == (7, 5, "fedavg")


def test_flat_keys_round_trip():
    cfg = load_config("default")
    flat = cfg.flat()
    assert flat["federation.rounds"] == cfg.federation.rounds
    assert flat["model.losses.mutual_temperature"] == cfg.model.losses.mutual_temperature
    # dict-valued keys stay whole instead of exploding into sub-keys
    assert flat["model.encoder_kwargs"] == {}


def test_parse_override_value_types():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a.b=hello world") == {"a": {"b": "hello world"}}


def test_every_key_has_help():
    rows = describe_keys()
    assert len(rows) > 40
    missing = [key for key, _, help_ in rows if not help_.strip()]
    assert not missing, f"keys without help: {missing}"


def test_cli_config_prints_and_rejects():
    runner = CliRunner()
    ok = runner.invoke(main, ["config", "--set", "federation.rounds=2"])
    assert ok.exit_code == 0 and "rounds: 2" in ok.output
    bad = runner.invoke(main, ["config", "--set", "federation.rounds=0"])
    assert bad.exit_code == 2
    assert "federation.rounds: 0 is below the minimum 1" in bad.output
    assert "Traceback" not in bad.output
