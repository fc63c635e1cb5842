"""cluster.yaml passes Ray's own autoscaler config validation and places fedmrg's clients.

`prepare_config` merges the AWS provider defaults the way `ray up` does, `validate_config`
checks the result against Ray's JSON schema and its cross-field rules; neither calls the cloud.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fedmrg.config import PhantomConfig, load_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_validates_cluster_yaml(raw):
    prepared = _validate(raw)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("breakage", ["unknown_key", "min_over_max", "bad_head"])
def test_validation_rejects_a_broken_copy(raw, breakage):
    # The check above means something only if Ray's validation can fail on this file.
    import jsonschema

    broken = copy.deepcopy(raw)
    if breakage == "unknown_key":
        broken["available_node_types"]["gpu_shared"]["gpus_please"] = 4
    elif breakage == "min_over_max":
        for node_type in broken["available_node_types"].values():
            node_type["min_workers"] = broken["max_workers"]
    else:
        broken["head_node_type"] = "no_such_type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(broken)


def test_head_is_cpu_only_and_idle_timeout_set(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert raw["idle_timeout_minutes"] > 0


def test_every_default_center_has_a_pinned_one_gpu_node_type(raw):
    # resources.pin_centers asks for `center_<id>: 1`; some node type must offer it, with the
    # one GPU a paper-scale client needs, or the autoscaler could never place that client.
    paper = load_config("paper")
    centers = [chr(ord("a") + i) for i in range(PhantomConfig().centers)]
    types = raw["available_node_types"]
    for center in centers:
        offering = [name for name, t in types.items()
                    if t.get("resources", {}).get(f"center_{center}", 0) >= 1]
        assert len(offering) == 1, f"center_{center}: offered by {offering}"
        node_type = types[offering[0]]
        assert node_type["resources"]["GPU"] >= paper.resources.num_gpus_per_client == 1
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1


def test_a_shared_gpu_type_packs_several_small_clients(raw):
    shared = [t for t in raw["available_node_types"].values()
              if t.get("resources", {}).get("GPU", 0) > 1
              and not any(k.startswith("center_") for k in t["resources"])]
    assert shared, "no multi-GPU node type without center pinning for simulation"
    assert sum(t["resources"]["GPU"] * t["max_workers"] for t in shared) / 0.25 >= 4


def test_setup_installs_the_project_from_constraints(raw):
    commands = " && ".join(raw["setup_commands"])
    assert "constraints.txt" in commands and "-e ~/fedmrg" in commands
    # torch is installed (pinned) before the project, as the Makefile does
    torch_at = next(i for i, c in enumerate(raw["setup_commands"]) if "install -q torch" in c)
    project_at = next(i for i, c in enumerate(raw["setup_commands"]) if "-e ~/fedmrg" in c)
    assert torch_at < project_at
    assert raw["file_mounts"]["~/fedmrg"] == "."


def test_paper_preset_is_fully_specified_and_fits_a_center_node(raw):
    import timm

    cfg = load_config("paper")  # the loader validates every key, type and range
    assert cfg.model.encoder == "swin_base_patch4_window7_224" and timm.is_model(cfg.model.encoder)
    assert cfg.model.pretrained and cfg.model.freeze_encoder and cfg.model.in_chans == 3
    assert "llama" in cfg.model.lm.lower() and "7b" in cfg.model.lm.lower()
    assert 8 <= cfg.model.lora_rank <= 16 and cfg.data.image_size == 224
    assert cfg.resources.num_gpus_per_client == 1 and cfg.resources.pin_centers
    # a client and its stream's Ray Data tasks fit in one center node's CPUs
    node = raw["available_node_types"]["gpu_center_a"]["resources"]
    wanted = cfg.resources.num_cpus_per_client + (cfg.data.stream_cpus_per_task
                                                  * cfg.data.stream_max_tasks)
    assert wanted <= node["CPU"]
    assert cfg.tracking.storage_path.startswith("/mnt/fedmrg")  # shared storage on the cluster
