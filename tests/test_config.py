"""Typed configuration: presets, overrides, and the errors a user sees."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from click.testing import CliRunner

from fedmrg.choices import AggregationMethod
from fedmrg.cli import main
from fedmrg.config import (
    ConfigError,
    ExperimentConfig,
    FederationConfig,
    LossConfig,
    ModelConfig,
    PhantomConfig,
    Section,
    TrainConfig,
    config_from_dict,
    describe_keys,
    load_config,
    parse_override,
    preset_names,
    replace_keys,
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


def test_a_duplicate_yaml_key_is_an_error_naming_the_key_file_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\nfederation:\n  rounds: 2\n  strategy: fedavg\n  rounds: 7\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == (f"{path}, line 5: duplicate key 'federation.rounds' (first at "
                                 f"line 3); give each key once")
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"line 2: duplicate key 'seed' \(first at line 1\)"):
        load_config(str(path))


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


# --------------------------------------------------------------------------- the config rules


def _sections(cls: type = ExperimentConfig) -> list[type]:
    hints = typing.get_type_hints(cls)
    found = [cls]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += _sections(hints[f.name])
    return found


def test_every_section_is_a_frozen_self_validating_section():
    for cls in _sections():
        assert issubclass(cls, Section) and cls.__dataclass_params__.frozen, cls.__name__


def test_constructing_a_bad_section_raises_naming_its_full_key():
    with pytest.raises(ConfigError, match=r"^data\.phantom\.centers: 0 is below the minimum 1"):
        PhantomConfig(centers=0)
    with pytest.raises(ConfigError, match=r"model\.lm_hidden_size \(128\) must be divisible"):
        ModelConfig(lm_heads=3)
    with pytest.raises(ConfigError, match=r"^federation\.wire_dtype: 'fp16' is not allowed; "
                                          r"choose one of \['fp32', 'bf16', 'int8', 'nf4'\]"):
        FederationConfig(wire_dtype="fp16")
    with pytest.raises(ConfigError, match="^train.lr: expected a number"):
        dataclasses.replace(TrainConfig(), lr="fast")  # a derived copy is validated again
    with pytest.raises(ConfigError, match="^model: expected a mapping"):
        ExperimentConfig(model=3)
    # a section read back from JSON (fedmrg.model.io) is built from its mapping
    assert ModelConfig(losses={"mutual": 0}).losses == LossConfig(mutual=0.0)


def test_a_config_cannot_be_changed_only_copied():
    cfg = load_config("default")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.federation.rounds = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = ModelConfig()
    more = replace_keys(cfg, {"federation.rounds": 3, "model.losses.mutual": 0})
    assert (more.federation.rounds, more.model.losses.mutual) == (3, 0.0)
    assert cfg.federation.rounds == 10 and more.data is cfg.data  # untouched sections shared
    with pytest.raises(ConfigError, match="unknown key federation.roundz; allowed keys in "
                                          "federation"):
        replace_keys(cfg, {"federation.roundz": 3})
    with pytest.raises(ConfigError, match="federation.rounds: 0 is below the minimum 1"):
        replace_keys(cfg, {"federation.rounds": 0})
    # lists and mappings are the config's own copies, not the caller's
    encoder = {"stem_width": 8}
    model = ModelConfig(encoder_kwargs=encoder)
    encoder["stem_width"] = 16
    assert model.encoder_kwargs == {"stem_width": 8}


def test_choices_are_enum_members_that_read_as_their_values():
    cfg = load_config("default", ["federation.aggregation=stack", "device=cpu"])
    assert cfg.federation.aggregation is AggregationMethod.STACK
    assert cfg.federation.aggregation == "stack" and repr(cfg.device) == "'cpu'"
    assert cfg.to_dict()["federation"]["aggregation"] == "stack"
    assert type(cfg.flat()["federation.aggregation"]) is str
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()
    assert load_config(None, []).federation.aggregation is AggregationMethod.EXACT


def test_a_run_config_is_resolved_once_with_what_the_strategy_changed(tmp_path):
    from fedmrg.experiment import resolve_run_config
    from fedmrg.fl.strategies import make_strategy

    user = load_config("default", ["federation.strategy=fedavg"])
    cfg, implied = resolve_run_config(user, "r1", cwd=tmp_path)
    assert cfg.tracking.run_name == "r1" and cfg.data.root.startswith(str(tmp_path))
    assert implied["federation.aggregation"] == ("exact", "fedavg")
    assert not cfg.model.specialized_adapter and user.model.specialized_adapter
    assert make_strategy(cfg).cfg is cfg  # nothing left to resolve
    named, _ = resolve_run_config(user, cwd=tmp_path)
    assert named.tracking.run_name.startswith("fedavg-")
