"""Any Hugging Face causal LM as the frozen base: tiny random Llama, Qwen2 and GPT-2 models
written with `save_pretrained` into a folder (tests/tiny_hf.py, no download), LoRA targets
chosen per architecture, the base in bfloat16, gradient checkpointing, a pretrained encoder
from a local checkpoint file, and the bad inputs a run refuses before any actor starts. One
federated round of each architecture runs end to end (plain clients, in-process pool)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
from helpers import TINY_ENCODER
from safetensors.torch import save_file
from tiny_hf import ARCHITECTURES, save_tiny_lm

from fedmrg.config import ConfigError, ModelConfig, config_from_dict, load_config
from fedmrg.fl.client import FederatedClient
from fedmrg.fl.coordinator import Coordinator, InProcessPool
from fedmrg.fl.lowrank import is_lora_factor
from fedmrg.fl.strategies import make_strategy
from fedmrg.model.base_lm import BaseLMError, load_base_lm, load_causal_lm
from fedmrg.model.encoder import EncoderError, VisionEncoder
from fedmrg.model.lora_targets import LoraTargetError, resolve_lora_targets
from fedmrg.model.mrg import MRGModel
from fedmrg.model.params import get_shared_state
from fedmrg.model.preflight import check_model_inputs

# the attention module names each architecture's adapters must land on
EXPECTED = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
            "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj"}, "gpt2": {"c_attn", "c_proj"}}


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: str(save_tiny_lm(arch, root / arch)) for arch in ARCHITECTURES}


def _model_cfg(lm: str, **kw) -> ModelConfig:
    return ModelConfig(lm=lm, encoder_kwargs=TINY_ENCODER, visual_tokens=2, lora_rank=2,
                       projection_dim=8, **kw)


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(2, 2, 1, 32, 32, generator=g),
            "view_mask": torch.tensor([[True, False], [True, True]]),
            "labels": torch.randint(0, 4, (2, 14), generator=g),
            "report": ["no acute findings .", "heart size is normal . lungs are clear ."]}


# --------------------------------------------------------------------------- LoRA targets


def test_lora_targets_follow_the_architecture_and_an_explicit_list_overrides():
    assert resolve_lora_targets("llama").modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert resolve_lora_targets("mistral").modules == resolve_lora_targets("qwen2").modules
    gpt2 = resolve_lora_targets("gpt2")
    assert gpt2.modules == ("c_attn", "attn.c_proj") and gpt2.fan_in_fan_out
    assert resolve_lora_targets("gpt_neox").modules[0] == "query_key_value"
    assert resolve_lora_targets("llama", ["q_proj"]).modules == ("q_proj",)
    assert resolve_lora_targets("t5").chosen_by.endswith("(peft's table)")
    with pytest.raises(LoraTargetError, match="model.lora_targets=.*no default LoRA targets "
                                              "for LM architecture 'mamba9'"):
        resolve_lora_targets("mamba9")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_gets_float32_adapters_on_its_attention_in_a_bf16_base(
        lm_folders, arch):
    cfg = _model_cfg(lm_folders[arch], lm_dtype="bfloat16")
    assert check_model_inputs(cfg) == arch
    lm, tokenizer = load_base_lm(cfg)
    model = MRGModel.from_config(cfg, lm, tokenizer, seed=0)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1]
               for n, _ in model.decoder.named_parameters() if ".lora_A.generic" in n}
    assert adapted == EXPECTED[arch]
    if arch == "gpt2":  # the attention output, not the MLP's c_proj of the same name
        assert not any("mlp.c_proj.lora" in n for n, _ in model.decoder.named_parameters())
    trainable = [p for p in model.decoder.parameters() if p.requires_grad]
    frozen = [p for p in model.decoder.parameters() if not p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    model.train()
    out = model(_batch())
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_gradient_checkpointing_gives_the_same_gradients_with_both_adapters(lm_folders):
    """The generic and generic+specialized passes share the layers: each checkpointed layer
    must be recomputed with the adapters of its own pass."""
    grads = []
    for checkpointing in (False, True):
        cfg = _model_cfg(lm_folders["llama"], gradient_checkpointing=checkpointing)
        lm, tokenizer = load_base_lm(cfg)
        model = MRGModel.from_config(cfg, lm, tokenizer, seed=0)
        # both adapters nonzero: with B = 0 (peft's init) the two passes would coincide
        for name, p in model.decoder.named_parameters():
            if ".lora_B." in name:
                p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        model.train()
        model(_batch(), generator=torch.Generator().manual_seed(1))["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.decoder.named_parameters()
                      if p.requires_grad})
        lm = model.decoder.get_base_model()
        on = getattr(lm, "is_activation_checkpointing", None)
        assert (lm.is_gradient_checkpointing if on is None else on) == checkpointing
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4,
                                   msg=name)


# --------------------------------------------------------------------------- bad input


def test_bad_model_inputs_are_one_line_errors_naming_key_and_value(lm_folders, tmp_path):
    with pytest.raises(ConfigError, match=r"model.lora_targets: 'wq' matches no Linear module"
                                          r".*\(gpt2\); its adaptable module names end in"):
        check_model_inputs(_model_cfg(lm_folders["gpt2"], lora_targets=["c_attn", "wq"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model.lm='.*empty': the folder has no config.json"):
        check_model_inputs(_model_cfg(str(tmp_path / "empty")))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"model.lm='no-such-org/no-such-lm': not a local "
                                          r"folder and not in the Hugging Face cache"):
        check_model_inputs(_model_cfg("no-such-org/no-such-lm"))
    assert time.perf_counter() - t0 < 20
    with pytest.raises(ConfigError, match=r"model.encoder_checkpoint='/nope.pth': no such file"):
        check_model_inputs(_model_cfg(lm_folders["llama"], encoder_checkpoint="/nope.pth"))


def test_a_quantized_base_on_cpu_is_refused_by_the_config_and_by_the_loader(lm_folders):
    with pytest.raises(ConfigError, match=r"model.lm_quantization='4bit' needs CUDA .*"
                                          r"device='auto', resources.num_gpus_per_client=0"):
        load_config("default", ["model.lm_quantization=4bit"])
    with pytest.raises(ConfigError, match="model.lm_quantization='8bit' needs CUDA"):
        load_config("default", ["model.lm_quantization=8bit", "device=cpu",
                                "resources.num_gpus_per_client=1"])
    load_config("default", ["model.lm_quantization=4bit", "resources.num_gpus_per_client=0.25"])
    with pytest.raises(BaseLMError, match=r"model.lm_quantization='4bit' needs a CUDA GPU .*"
                                          r"runs on cpu"):
        load_causal_lm(lm_folders["llama"], quantization="4bit", device="cpu")


def test_paper_preset_loads_its_decoder_in_bfloat16_not_float32():
    cfg = load_config("paper")
    assert cfg.model.lm_dtype == "bfloat16" and cfg.model.gradient_checkpointing


# --------------------------------------------------------------------------- the encoder


def test_encoder_weights_come_from_a_local_checkpoint_file(tmp_path):
    cfg = ModelConfig(encoder_kwargs=TINY_ENCODER)
    torch.manual_seed(3)
    source = timm.create_model("resnet10t", num_classes=0, in_chans=1, **TINY_ENCODER)
    save_file(source.state_dict(), str(tmp_path / "enc.safetensors"))
    torch.save(source.state_dict(), tmp_path / "enc.pth")
    for name in ("enc.safetensors", "enc.pth"):
        encoder = VisionEncoder(ModelConfig(encoder_kwargs=TINY_ENCODER,
                                            encoder_checkpoint=str(tmp_path / name)))
        loaded = encoder.backbone.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    fresh = VisionEncoder(cfg).backbone.state_dict()  # without the file: not those weights
    assert not torch.equal(fresh["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    wrong = timm.create_model("resnet10t", num_classes=0, in_chans=1)  # other widths
    save_file(wrong.state_dict(), str(tmp_path / "wrong.safetensors"))
    with pytest.raises(EncoderError, match=r"model.encoder_checkpoint='.*wrong.safetensors': "
                                           r"not weights of 'resnet10t'"):
        VisionEncoder(ModelConfig(encoder_kwargs=TINY_ENCODER,
                                  encoder_checkpoint=str(tmp_path / "wrong.safetensors")))


def test_swin_b_is_created_without_weights_as_the_paper_encoder():
    cfg = load_config("paper").model
    assert cfg.encoder == "swin_base_patch4_window7_224"
    encoder = VisionEncoder(ModelConfig(encoder=cfg.encoder, in_chans=3, freeze_encoder=True))
    assert encoder.num_features == 1024
    assert sum(p.numel() for p in encoder.parameters()) > 85e6
    with torch.no_grad():
        out = encoder(torch.zeros(1, 1, 3, 224, 224), torch.ones(1, 1, dtype=torch.bool))
    assert out.shape == (1, 1024)


# --------------------------------------------------------------------------- one round each


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from fedmrg.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("hfdata") / "phantom"
    generate_phantom(root, centers=2, studies_per_center=10, image_size=32, seed=0,
                     heldout_center=False)
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_federated_round_with_each_architecture(ray_cluster, dataset, lm_folders, arch):
    cfg = make_strategy(config_from_dict({
        "device": "cpu",
        "data": {"root": dataset, "image_size": 32, "batch_size": 4, "max_report_tokens": 24,
                 "stream_max_tasks": 1},
        "model": {"lm": lm_folders[arch], "lm_dtype": "bfloat16", "encoder_kwargs": TINY_ENCODER,
                  "visual_tokens": 2, "lora_rank": 2, "projection_dim": 8},
        "train": {"local_steps": 1, "warmup_steps": 1},
        "federation": {"rounds": 1, "dense_update_rank": 2},
        "eval": {"max_new_tokens": 4, "val_every": 0},
    })).cfg
    strategy = make_strategy(cfg)
    clients = {c: FederatedClient(cfg, c, dataset_root=dataset, seed=cfg.seed,
                                  generation={"num_beams": 1, "max_new_tokens": 4},
                                  eval_samples=1) for c in ("a", "b")}
    try:
        pool = InProcessPool(clients)
        initial = get_shared_state(clients["a"].model)
        result = Coordinator(cfg, strategy, pool, initial, np.random.default_rng(0)).run()
    finally:
        for client in clients.values():
            client.close()
    assert [s.round_id for s in result.history] == [1]
    assert result.history[0].participants == ["a", "b"]
    assert np.isfinite(result.history[0].metrics["loss"])
    factors = {n for n in result.global_state if is_lora_factor(n)}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in factors} == EXPECTED[arch]
    # the aggregate moved the generic adapter away from its (zero-B) initialization
    assert any(float(result.global_state[n].abs().sum()) > 0
               for n in factors if ".lora_B." in n)
    assert set(result.personalization.per_center) == {"a", "b"}
