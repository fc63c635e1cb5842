"""The MRG model: encoder, sequence layout, dual adapters, losses, generation, groups, save/load.

Everything runs on a tiny config (32-wide 1-layer Llama, a narrow resnet10t at 32 px); the
builtin LM is built once per module into a temporary cache and each model loads it from there.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch
from helpers import TINY_ENCODER, tiny_model_config
from peft import PeftModel

from fedmrg.config import LossConfig, ModelConfig
from fedmrg.data.schema import NUM_OBSERVATIONS
from fedmrg.model.base_lm import load_base_lm, load_causal_lm
from fedmrg.model.encoder import EncoderError, VisionEncoder
from fedmrg.model.io import load_model, save_model
from fedmrg.model.mrg import GENERIC, IGNORE, SPECIALIZED, ModelInputError, MRGModel
from fedmrg.model.params import (
    ParameterGroupError,
    describe_parameter_groups,
    get_private_state,
    get_shared_state,
    load_shared_state,
    local_norm_modules,
    parameter_group_summary,
    parameter_groups,
)
from fedmrg.model.prompts import diagnosis_prompt

B, V, SIZE = 4, 2, 32


@pytest.fixture(scope="module")
def make_model(tmp_path_factory, corpus):
    """make_model(**config overrides) -> a fresh MRGModel on the cached tiny LM."""
    cache = str(tmp_path_factory.mktemp("lm_cache"))

    def make(seed: int = 0, **over) -> MRGModel:
        cfg = tiny_model_config(cache, **over)
        lm, tok = load_base_lm(cfg, corpus=corpus)
        return MRGModel.from_config(cfg, lm, tok, seed=seed)

    return make


@pytest.fixture(scope="module")
def batch(corpus) -> dict:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(B, NUM_OBSERVATIONS, dtype=torch.long)
    labels[0, 1] = 1  # cardiomegaly positive
    labels[1, [1, 9]] = torch.tensor([1, 2])  # + pleural effusion negative
    labels[2, 13] = 1  # no finding
    labels[3] = torch.randint(0, 4, (NUM_OBSERVATIONS,), generator=g)
    return {
        "images": torch.randn(B, V, 1, SIZE, SIZE, generator=g),
        "view_mask": torch.tensor([[True, False], [True, True], [True, False], [True, True]]),
        "labels": labels,
        "report": corpus[:B],
        "study_id": [f"s{i}" for i in range(B)],
    }


def perturb_adapter(model: MRGModel, adapter: str, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def two_path_logits(model: MRGModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        feats = model.encode_features(batch)
        states = batch["labels"]
        ids, mask = model._report_tokens(batch)
        seq = model.build_sequence(feats, states, ids, mask)
        return (model.report_logits(seq, personalized=False),
                model.report_logits(seq, personalized=True))


# --------------------------------------------------------------------------- encoder


def test_encoder_pools_real_views_only():
    cfg = ModelConfig(encoder_kwargs=TINY_ENCODER)
    torch.manual_seed(0)
    enc = VisionEncoder(cfg).eval()
    images = torch.randn(2, 2, 1, SIZE, SIZE)
    mask = torch.tensor([[True, False], [True, True]])
    feats = enc(images, mask)
    assert feats.shape == (2, enc.num_features)
    per_view = enc.backbone(images.flatten(0, 1)).view(2, 2, -1)
    assert torch.allclose(feats[0], per_view[0, 0], atol=1e-5)
    assert torch.allclose(feats[1], per_view[1].mean(0), atol=1e-5)
    noisy = images.clone()
    noisy[0, 1] = 100.0  # the padded view's pixels must not matter
    assert torch.allclose(enc(noisy, mask), feats, atol=1e-6)


def test_encoder_errors_are_clear():
    enc = VisionEncoder(ModelConfig(encoder_kwargs=TINY_ENCODER))
    with pytest.raises(EncoderError, match=r"expected \(B, V, 1, H, W\)"):
        enc(torch.randn(2, 2, 3, SIZE, SIZE), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(EncoderError, match="at least one real view"):
        enc(torch.randn(2, 2, 1, SIZE, SIZE), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(EncoderError, match="not a timm model"):
        VisionEncoder(ModelConfig(encoder="resnet_does_not_exist"))
    t0 = time.perf_counter()
    with pytest.raises(EncoderError, match="pretrained weights for 'resnet10t' are not avail"):
        VisionEncoder(ModelConfig(pretrained=True))  # offline: an error, never a hang
    assert time.perf_counter() - t0 < 20
    with pytest.raises(EncoderError, match="needs model.freeze_encoder=true"):
        VisionEncoder(ModelConfig(encoder_lora_rank=4, encoder_kwargs=TINY_ENCODER))


def test_frozen_encoder_keeps_batchnorm_statistics():
    enc = VisionEncoder(ModelConfig(encoder_kwargs=TINY_ENCODER, freeze_encoder=True))
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    enc(torch.randn(2, 1, 1, SIZE, SIZE), torch.ones(2, 1, dtype=torch.bool))
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert not any(p.requires_grad for p in enc.parameters())


# --------------------------------------------------------------------------- sequence layout


@pytest.mark.parametrize("prompts", [True, False])
def test_sequence_layout_and_label_masking(make_model, batch, prompts):
    model = make_model(diagnosis_prompts=prompts)
    tok = model.tokenizer
    feats = model.encode_features(batch)
    ids, mask = model._report_tokens(batch)
    seq = model.build_sequence(feats, batch["labels"], ids, mask)
    lp, nv, tr = seq.prompt_len, seq.visual_len, seq.report_len
    assert nv == 3 and tr == ids.shape[1] == int(mask.sum(1).max())
    assert seq.embeds.shape == (B, lp + nv + tr, 32)
    assert seq.labels.shape == seq.attention_mask.shape == seq.position_ids.shape
    assert (lp > 0) == prompts
    # labels: -100 exactly on prompt, visual and padding positions; report tokens elsewhere
    expected = torch.full_like(seq.labels, IGNORE)
    report = expected[:, lp + nv:]
    report[mask.bool()] = ids[mask.bool()]
    assert torch.equal(seq.labels, expected)
    assert (seq.labels[:, : lp + nv] == IGNORE).all()
    # every report starts with BOS right after the visual tokens
    assert (seq.labels[:, lp + nv] == tok.bos_token_id).all()
    # positions count real tokens only (left-padded prompt, right-padded report)
    for row in range(B):
        real = seq.attention_mask[row].bool()
        assert torch.equal(seq.position_ids[row][real], torch.arange(int(real.sum())))
    # visual tokens are the projector's output; prompt positions hold the prompt's embeddings
    visual = model.projector(feats)
    assert torch.allclose(seq.embeds[:, lp:lp + nv], visual)
    embed = model.decoder.get_input_embeddings()
    for row in range(B):
        n_prompt = int(seq.attention_mask[row, :lp].sum())
        if prompts:
            prompt_ids = tok(diagnosis_prompt(batch["labels"][row].tolist()),
                             add_special_tokens=False)["input_ids"]
            assert n_prompt == len(prompt_ids)
            assert torch.equal(seq.embeds[row, lp - n_prompt:lp],
                               embed(torch.tensor(prompt_ids)))
            assert (seq.attention_mask[row, :lp - n_prompt] == 0).all()


def test_prompt_states_teacher_forcing(make_model, batch):
    model = make_model(prompt_teacher_forcing=0.5)
    logits = torch.randn(B * 8, NUM_OBSERVATIONS, 4)
    labels = torch.randint(0, 4, (B * 8, NUM_OBSERVATIONS))
    predicted = logits.argmax(-1)
    model.train()
    a = model.prompt_states(logits, labels, torch.Generator().manual_seed(3))
    b = model.prompt_states(logits, labels, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # seeded
    rows_truth = (a == labels).all(1)
    rows_pred = (a == predicted).all(1)
    assert (rows_truth | rows_pred).all() and rows_truth.any() and rows_pred.any()
    model.eval()  # inference: always the diagnosis head's predictions
    assert torch.equal(model.prompt_states(logits, labels), predicted)
    model.cfg = dataclasses.replace(model.cfg, prompt_teacher_forcing=1.0)
    model.train()
    assert torch.equal(model.prompt_states(logits, labels), labels)


# --------------------------------------------------------------------------- dual adapters


def test_both_adapters_train_and_stay_trainable(make_model, batch):
    model = make_model()
    perturb_adapter(model, GENERIC)
    perturb_adapter(model, SPECIALIZED, seed=2)  # nonzero B: gradients reach every A too
    model.train()
    out = model(batch)
    assert set(out) >= {"loss", "lm_generic", "lm_personal", "mutual", "diagnosis",
                        "contrastive_local"}
    assert "contrastive_global" not in out  # no prototypes given
    out["loss"].backward()
    for adapter in (GENERIC, SPECIALIZED):
        lora = {n: p for n, p in model.named_parameters() if f".{adapter}." in n}
        assert len(lora) == 2 * 4  # A and B on q, k, v, o of the one layer
        for name, p in lora.items():
            assert p.requires_grad, f"{name} was frozen by peft's set_adapter"
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = parameter_groups(model)["frozen"]
    assert all(p.grad is None for p in frozen.values())


def test_generic_path_ignores_specialized_weights(make_model, batch):
    model = make_model()
    perturb_adapter(model, GENERIC)
    generic0, personal0 = two_path_logits(model, batch)
    perturb_adapter(model, SPECIALIZED, seed=5)
    generic1, personal1 = two_path_logits(model, batch)
    assert torch.equal(generic0, generic1)
    assert not torch.allclose(personal0, personal1, atol=1e-3)


def test_mutual_kl_is_zero_at_init_and_positive_after_specializing(make_model, batch):
    model = make_model()
    model.train()
    out = model(batch)
    assert out["mutual"] == pytest.approx(0.0, abs=1e-7)  # LoRA B starts at zero
    assert out["lm_generic"] == pytest.approx(out["lm_personal"], abs=1e-6)
    perturb_adapter(model, SPECIALIZED)
    out = model(batch)
    assert out["mutual"] > 1e-4
    assert out["lm_generic"] != pytest.approx(out["lm_personal"], abs=1e-6)


def test_loss_terms_follow_the_weights(make_model, batch):
    losses = LossConfig(lm_personal=0.0, mutual=0.0, contrastive_local=0.0)
    model = make_model(losses=losses)
    model.train()
    protos = torch.randn(NUM_OBSERVATIONS, 8)
    counts = torch.ones(NUM_OBSERVATIONS, dtype=torch.long)
    out = model(batch, prototypes=protos, proto_counts=counts, return_features=True)
    assert set(out) == {"loss", "lm_generic", "diagnosis", "contrastive_global", "features"}
    weighted = (out["lm_generic"] + losses.diagnosis * out["diagnosis"]
                + losses.contrastive_global * out["contrastive_global"])
    assert out["loss"].item() == pytest.approx(weighted, rel=1e-5)
    assert out["features"].shape == (B, 64)
    # personal terms never computed without a specialized adapter
    plain = make_model(specialized_adapter=False)
    plain.train()
    out = plain(batch)
    assert "lm_personal" not in out and "mutual" not in out
    assert SPECIALIZED not in plain.decoder.peft_config
    nothing = make_model(losses=LossConfig(**{k: 0.0 for k in (
        "lm_generic", "lm_personal", "mutual", "diagnosis", "contrastive_global",
        "contrastive_local")}))
    with pytest.raises(ModelInputError, match="no loss term"):
        nothing(batch)


def test_a_few_optimizer_steps_reduce_the_loss(make_model, batch):
    model = make_model()
    model.train()
    groups = parameter_groups(model)
    params = list(groups["shared"].values()) + list(groups["private"].values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(8):
        out = model(batch, generator=gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] * 0.9, losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_reports_can_come_from_input_ids(make_model, batch):
    model = make_model()
    ids, mask = model._report_tokens(batch)
    wide = torch.full((B, ids.shape[1] + 24), model.tokenizer.pad_token_id)
    wide_mask = torch.zeros((B, ids.shape[1] + 24), dtype=torch.long)
    wide[:, : ids.shape[1]], wide_mask[:, : ids.shape[1]] = ids, mask
    model.eval()
    with torch.no_grad():
        a = model(batch)["loss"]
        b = model({**batch, "input_ids": wide, "attention_mask": wide_mask})["loss"]
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    with pytest.raises(ModelInputError, match="'input_ids'/'attention_mask' or 'report'"):
        model({k: v for k, v in batch.items() if k != "report"})


def test_local_prototypes(make_model, batch):
    model = make_model()
    protos, counts = model.local_prototypes([batch, batch])
    assert protos.shape == (NUM_OBSERVATIONS, 8)
    expected = 2 * (batch["labels"] == 1).sum(0)
    assert torch.equal(counts, expected)
    assert model.training  # mode restored


# --------------------------------------------------------------------------- generation


def test_generate_reports_and_states(make_model, batch):
    model = make_model()
    texts, states = model.generate(batch["images"], batch["view_mask"], num_beams=1,
                                   max_new_tokens=6, return_states=True)
    assert len(texts) == B and all(isinstance(t, str) for t in texts)
    assert states.shape == (B, NUM_OBSERVATIONS)
    assert model.training  # generate() ran in eval mode and restored the mode
    model.eval()
    with torch.no_grad():
        expected = model.diagnosis_head(model.encode_features(batch)).argmax(-1)
    assert torch.equal(states, expected)
    for t in texts:
        assert len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 6 + 2
    given = torch.zeros(B, NUM_OBSERVATIONS, dtype=torch.long)
    model.generate(batch["images"], batch["view_mask"], num_beams=2, max_new_tokens=4,
                   states=given, personalized=True)
    assert torch.equal(model.last_states, given)


# --------------------------------------------------------------------------- parameter groups


def test_parameter_groups_keep_private_tensors_private(make_model):
    model = make_model()
    groups = parameter_groups(model)
    names = {g: set(p) for g, p in groups.items()}
    all_names = {n for n, _ in model.named_parameters()}
    assert names["shared"] | names["private"] | names["frozen"] == all_names
    assert not (names["shared"] & names["private"]) and not (names["shared"] & names["frozen"])
    assert not any(f".{SPECIALIZED}." in n for n in names["shared"])
    norm = local_norm_modules(model)  # FedBN (model.local_batchnorm, the default)
    assert norm and all(n.startswith("encoder.") for n in norm)
    assert all(f".{SPECIALIZED}." in n or n.startswith("local_head.")
               or n.rsplit(".", 1)[0] in norm for n in names["private"])
    assert any(n.rsplit(".", 1)[0] in norm for n in names["private"])
    assert any(n.startswith("local_head.") for n in names["private"])
    assert sum(f"lora_A.{GENERIC}." in n for n in names["shared"]) == 4
    for prefix in ("projector.", "diagnosis_head.", "global_head.", "encoder."):
        assert any(n.startswith(prefix) for n in names["shared"]), prefix
    assert all(n.startswith("decoder.") and "lora_" not in n for n in names["frozen"])
    assert all(p.requires_grad for g in ("shared", "private") for p in groups[g].values())
    assert not any(p.requires_grad for p in groups["frozen"].values())
    shared = get_shared_state(model)
    assert not any(n.rsplit(".", 1)[0] in norm for n in shared)  # BN weights and stats stay
    assert any(n.endswith("running_mean") for n in get_private_state(model))
    assert not any(f".{SPECIALIZED}." in n or n.startswith("local_head.") for n in shared)
    rows = describe_parameter_groups(model)
    summary = parameter_group_summary(model)
    assert summary["shared"]["bytes"] == sum(r.bytes for r in rows if r.group == "shared")
    assert summary["private"]["tensors"] == len(get_private_state(model))  # buffers too


def test_without_local_batchnorm_the_encoder_norm_layers_and_statistics_travel(make_model):
    model = make_model(local_batchnorm=False)
    assert local_norm_modules(model) == set()
    groups = parameter_groups(model)
    assert all(n.startswith("local_head.") or f".{SPECIALIZED}." in n
               for n in groups["private"])
    shared = get_shared_state(model)
    assert any(n.endswith("running_mean") for n in shared)  # trained encoder: BN stats travel
    assert not any("running" in n for n in get_private_state(model))
    rows = describe_parameter_groups(model)
    assert {r.group for r in rows if r.kind == "buffer"} == {"shared"}


def test_frozen_encoder_with_lora_shares_only_its_adapter(make_model):
    model = make_model(freeze_encoder=True, encoder_lora_rank=2)
    groups = parameter_groups(model)
    enc_shared = [n for n in groups["shared"] if n.startswith("encoder.")]
    assert enc_shared and all(".lora_" in n for n in enc_shared)
    assert any(n.startswith("encoder.") for n in groups["frozen"])
    assert not any(n.startswith("encoder.") for n in get_shared_state(model)
                   if "running" in n)


def test_same_seed_same_initial_state_across_processes(make_model):
    a, b, c = make_model(seed=7), make_model(seed=7), make_model(seed=8)
    sa, sb, sc = get_shared_state(a), get_shared_state(b), get_shared_state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_load_shared_state_is_strict(make_model):
    src, dst = make_model(seed=1), make_model(seed=2)
    private_before = get_private_state(dst)
    load_shared_state(dst, get_shared_state(src))
    assert all(torch.equal(v, get_shared_state(src)[k]) for k, v in get_shared_state(dst).items())
    assert all(torch.equal(v, private_before[k]) for k, v in get_private_state(dst).items())

    state = get_shared_state(src)
    name = next(n for n in state if f"lora_A.{GENERIC}." in n)
    with pytest.raises(ParameterGroupError, match="unknown tensor 'bogus.weight'"):
        load_shared_state(dst, {**state, "bogus.weight": torch.zeros(1)})
    with pytest.raises(ParameterGroupError, match=f"missing tensor '{name}'"):
        load_shared_state(dst, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ParameterGroupError, match=f"'{name}' has shape \\(3, 3\\)"):
        load_shared_state(dst, {**state, name: torch.zeros(3, 3)})
    with pytest.raises(ParameterGroupError, match="non-finite"):
        load_shared_state(dst, {**state, name: torch.full_like(state[name], float("nan"))})
    private = get_private_state(src)
    with pytest.raises(ParameterGroupError, match="unknown tensor"):
        load_shared_state(dst, {**state, **private})  # private tensors never load as shared


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(make_model, batch, tmp_path):
    model = make_model()
    perturb_adapter(model, GENERIC)
    perturb_adapter(model, SPECIALIZED, seed=2)
    model.train()
    model(batch)["loss"].backward()  # moves BN statistics off their initial values
    path = save_model(model, tmp_path / "model")
    loaded = load_model(path)
    for personalized in (False, True):
        for beams in (1, 3):
            kw = dict(personalized=personalized, num_beams=beams, max_new_tokens=8)
            assert (model.generate(batch["images"], batch["view_mask"], **kw)
                    == loaded.generate(batch["images"], batch["view_mask"], **kw))
    for get in (get_shared_state, get_private_state):
        a, b = get(model), get(loaded)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(model.cfg)
    # saving again over the folder replaces it
    save_model(loaded, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model"]


def own_head_of(model: MRGModel, seed: int = 5) -> torch.nn.Module:
    """A copy of the shared head moved far off it (a center's tuned head differs)."""
    head = copy.deepcopy(model.diagnosis_head)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 2.0)
    return head


def test_own_head_is_private_saved_and_writes_only_the_personalized_prompts(
        make_model, batch, tmp_path):
    from fedmrg.model.io import OWN_HEAD, ModelIOError
    from fedmrg.serving.pyfunc import export_generic_model

    model = make_model()
    keys, shared_keys = model.state_dict().keys(), get_shared_state(model).keys()
    model.set_own_diagnosis_head(own_head_of(model))
    # outside the module tree: never in a state that travels or is checkpointed
    assert model.state_dict().keys() == keys and get_shared_state(model).keys() == shared_keys
    model.eval()
    with torch.no_grad():
        features = model.encode_features(batch)
        shared = model.diagnosis_head(features).argmax(-1)
        own = model.own_diagnosis_head(features).argmax(-1)
    assert not torch.equal(shared, own)
    kw = dict(num_beams=1, max_new_tokens=4, return_states=True)
    assert torch.equal(model.generate(batch["images"], batch["view_mask"], **kw)[1], shared)
    assert torch.equal(model.generate(batch["images"], batch["view_mask"], personalized=True,
                                      **kw)[1], own)
    path = save_model(model, tmp_path / "model")
    assert (path / OWN_HEAD).is_file()
    loaded = load_model(path)
    for k, v in model.own_diagnosis_head.state_dict().items():
        assert torch.equal(loaded.own_diagnosis_head.state_dict()[k], v)
    assert torch.equal(loaded.generate(batch["images"], batch["view_mask"], personalized=True,
                                       **kw)[1], own)
    # the shared (generic) model a run logs leaves the center's own head out
    generic = load_model(export_generic_model(path, tmp_path / "generic"))
    assert generic.own_diagnosis_head is None and not (tmp_path / "generic" / OWN_HEAD).exists()
    (path / OWN_HEAD).unlink()
    with pytest.raises(ModelIOError, match=f"{OWN_HEAD}: missing"):
        load_model(path)
    model.set_own_diagnosis_head(None)
    assert not (save_model(model, path) / OWN_HEAD).exists() and \
        load_model(path).own_diagnosis_head is None


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # inside peft
def test_saved_generic_adapter_loads_with_peft(make_model, tmp_path):
    model = make_model()
    perturb_adapter(model, GENERIC)
    path = save_model(model, tmp_path / "model")
    base = load_causal_lm(path / "base_lm")
    peft_model = PeftModel.from_pretrained(base, str(path / "adapters" / GENERIC))
    ids = torch.tensor([[model.tokenizer.bos_token_id, 10, 11, 12, 13]])
    model.eval()
    model.use_adapters(personalized=False)
    with torch.no_grad():
        ours = model.decoder(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
        bare = load_causal_lm(path / "base_lm")(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(bare, theirs, atol=1e-3)  # the adapter did load and matter
    assert sorted(p.name for p in (path / "adapters").iterdir() if p.is_dir()) == \
        sorted([GENERIC, SPECIALIZED])


def test_load_model_rejects_a_folder_that_is_not_a_model(tmp_path):
    from fedmrg.model.io import ModelIOError

    with pytest.raises(ModelIOError, match="fedmrg_model.json: not found"):
        load_model(tmp_path)

