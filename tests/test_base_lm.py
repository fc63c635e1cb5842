"""Diagnosis prompts, the builtin base LM (tokenizer, build, cache) and HF LM loading."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from fedmrg.config import ModelConfig
from fedmrg.data.schema import NUM_OBSERVATIONS, OBSERVATIONS
from fedmrg.model import base_lm
from fedmrg.model.base_lm import (
    BUILD_INFO,
    BaseLMError,
    WarmupRecipe,
    builtin_build_info,
    builtin_lm_key,
    ensure_pad_token,
    load_base_lm,
    train_tokenizer,
    warmup_sequences,
)
from fedmrg.model.prompts import diagnosis_prompt, prompt_corpus, prompt_vocabulary

TINY = dict(lm_hidden_size=32, lm_layers=1, lm_heads=2, lm_vocab_size=256, lm_warmup_steps=40)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    from fedmrg.data.phantom import neutral_corpus

    return neutral_corpus(200, 0)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> ModelConfig:
    return ModelConfig(lm_cache=str(tmp_path_factory.mktemp("lm_cache")), **TINY)


@pytest.fixture(scope="module")
def built(tiny_cfg, corpus):
    """The tiny builtin LM, built once for the module (with its build time)."""
    t0 = time.perf_counter()
    model, tok = load_base_lm(tiny_cfg, corpus=corpus)
    return model, tok, time.perf_counter() - t0


# --------------------------------------------------------------------------- prompts


def test_prompt_lists_non_blank_observations_in_order():
    states = [0] * NUM_OBSERVATIONS
    states[OBSERVATIONS.index("pleural effusion")] = 2
    states[OBSERVATIONS.index("cardiomegaly")] = 1
    states[OBSERVATIONS.index("support devices")] = 3
    assert diagnosis_prompt(states) == ("Findings to report: cardiomegaly: positive; "
                                        "pleural effusion: negative; support devices: uncertain.")
    assert diagnosis_prompt([0] * NUM_OBSERVATIONS) == "Findings to report: none."


def test_prompt_rejects_bad_states():
    with pytest.raises(ValueError, match="expected 14 states, got 3"):
        diagnosis_prompt([1, 2, 3])
    with pytest.raises(ValueError, match="state 7"):
        diagnosis_prompt([7] + [0] * 13)


def test_prompt_vocabulary_covers_every_prompt_word():
    vocab = set(prompt_vocabulary())
    for text in prompt_corpus():
        words = text.lower().replace(":", " : ").replace(";", " ; ").replace(".", " . ").split()
        assert set(words) <= vocab, set(words) - vocab


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic_and_lowercasing(corpus):
    a = train_tokenizer(corpus, 200)
    b = train_tokenizer(list(corpus), 200)
    assert a.get_vocab() == b.get_vocab()  # same ids in every process: same base LM
    assert len(a) == 200
    assert [a.pad_token, a.bos_token, a.eos_token, a.unk_token] == ["<pad>", "<s>", "</s>",
                                                                      "<unk>"]
    ids = a("The Heart is NORMAL.", add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == "the heart is normal."


def test_tokenizer_spells_out_unseen_ascii_words(corpus):
    tok = train_tokenizer(corpus, 200)
    ids = tok("xylophone 12mm: ok;", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "xylophone 12mm: ok;"


def test_tokenizer_too_small_vocabulary_is_a_clear_error(corpus):
    with pytest.raises(BaseLMError, match="lm_vocab_size=64 is too small"):
        train_tokenizer(corpus, 64)


def test_lexicon_words_are_whole_tokens_after_corpus_words(corpus):
    tok = train_tokenizer(corpus, 300, lexicon=["Oedema opacification", "bat-wing"])
    for word in ("oedema", "opacification", "bat", "wing"):
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id, word
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    # not in the neutral corpus: without the lexicon it falls apart into pieces
    plain = train_tokenizer(corpus, 300)
    assert len(plain("oedema", add_special_tokens=False)["input_ids"]) > 1


def test_radiology_lexicon_keeps_every_center_report_in_whole_words():
    """Reports of every style (center ones too) tokenize word by word, none spelled out: the
    wordiest center no longer loses its reports to truncation."""
    from fedmrg.data.phantom import STYLES, radiology_lexicon, report_from_labels
    from fedmrg.data.phantom.labels import sample_labels, study_rng
    from fedmrg.data.phantom.styles import NEUTRAL_SKEW

    tok = train_tokenizer(["no acute abnormality."], 1024, lexicon=radiology_lexicon())
    for name, style in STYLES.items():
        for i in range(40):
            rng = study_rng(0, 7, i)
            labels = sample_labels(rng, NEUTRAL_SKEW, style.negative_mention)
            report = report_from_labels(labels, style, rng)
            pieces = tok.tokenize(report)
            assert not [p for p in pieces if p.startswith("##")], (name, report, pieces)


def test_warmup_sequences_put_the_prompt_first_and_drop_it_as_seeded():
    from fedmrg.data.phantom import neutral_studies

    studies = neutral_studies(200, 0)
    tok = train_tokenizer([r for _, r in studies] + prompt_corpus(), 400)
    recipe = WarmupRecipe(max_tokens=32, prompt_dropout=0.25)
    seqs = warmup_sequences(tok, studies, recipe)
    assert seqs == warmup_sequences(tok, studies, recipe)  # seeded
    with_prompt = [(s, p) for s, p in zip(studies, seqs, strict=True) if p[0]]
    assert 0.6 < len(with_prompt) / len(seqs) < 0.9  # about 1 - prompt_dropout
    (labels, report), (prompt, ids) = with_prompt[0]
    assert tok.decode(prompt) == diagnosis_prompt(labels).lower()
    assert ids[0] == tok.bos_token_id and len(ids) <= 32
    # a bare report string never gets a prompt
    assert all(not p for p, _ in warmup_sequences(tok, [r for _, r in studies[:20]], recipe))
    # the loss covers the report only
    ids_, mask, target = base_lm._warmup_batch([(prompt, ids), ([], ids[:3])], tok.pad_token_id)
    assert (target[0, :len(prompt)] == -100).all()
    assert target[0, len(prompt):len(prompt) + len(ids)].tolist() == ids
    assert mask[1].sum() == 3 and (target[1, 3:] == -100).all()


# --------------------------------------------------------------------------- builtin LM


def test_builtin_lm_is_a_frozen_llama_sized_by_config(built, tiny_cfg):
    model, tok, _ = built
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.config.num_attention_heads == 2
    assert model.config.vocab_size == len(tok) <= 256
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    # prompt words are whole tokens: prompts stay short
    for word in prompt_vocabulary():
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_builtin_lm_warm_up_learned_the_corpus(built, tiny_cfg, corpus):
    info = builtin_build_info(tiny_cfg, corpus=corpus)
    assert info["warmup_steps"] == 40
    assert info["loss_last10"] < info["loss_first"] - 1.0
    assert info["build_s"] < 60


def test_builtin_lm_is_cached_and_not_rebuilt(built, tiny_cfg, corpus, monkeypatch):
    model, tok, _ = built
    entries = [p for p in Path(tiny_cfg.lm_cache).iterdir()]
    assert [p.name for p in entries] == [builtin_lm_key(tiny_cfg, corpus, WarmupRecipe())]
    assert (entries[0] / BUILD_INFO).exists()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached LM was rebuilt")

    monkeypatch.setattr(base_lm, "build_builtin_lm", no_rebuild)
    again, tok2 = load_base_lm(tiny_cfg, corpus=corpus)
    assert tok2.get_vocab() == tok.get_vocab()
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n


def test_builtin_lm_key_changes_with_what_determines_the_lm(tiny_cfg, corpus):
    key = builtin_lm_key(tiny_cfg, corpus, WarmupRecipe())
    assert key == builtin_lm_key(tiny_cfg, list(corpus), WarmupRecipe())
    other = ModelConfig(lm_cache=tiny_cfg.lm_cache, **{**TINY, "lm_warmup_steps": 41})
    assert builtin_lm_key(other, corpus, WarmupRecipe()) != key
    assert builtin_lm_key(tiny_cfg, corpus[:-1], WarmupRecipe()) != key
    assert builtin_lm_key(tiny_cfg, corpus, WarmupRecipe(lr=1e-3)) != key
    # the cache folder is not part of the key: a copied cache is still valid
    moved = ModelConfig(lm_cache="/elsewhere", **TINY)
    assert builtin_lm_key(moved, corpus, WarmupRecipe()) == key


def test_builtin_build_is_reproducible_across_processes(built, corpus, tmp_path):
    """Two independent builds (as on two nodes) give the same tokenizer and weights."""
    model, tok, _ = built
    cfg = ModelConfig(lm_cache=str(tmp_path), **TINY)
    model2, tok2 = load_base_lm(cfg, corpus=corpus)
    assert tok2.get_vocab() == tok.get_vocab()
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n


def test_losing_a_build_race_uses_the_winner_and_leaves_no_temp(corpus, tmp_path, monkeypatch):
    cfg = ModelConfig(lm_cache=str(tmp_path), **{**TINY, "lm_warmup_steps": 0})
    entry = tmp_path / builtin_lm_key(cfg, corpus, WarmupRecipe())
    real_build = base_lm.build_builtin_lm

    def build_while_another_process_finishes(*args):
        out = real_build(*args)
        model, tok, info = real_build(*args)  # the "other process" writes the entry first
        model.save_pretrained(entry)
        tok.save_pretrained(entry)
        (entry / BUILD_INFO).write_text(json.dumps({"winner": True}))
        return out

    monkeypatch.setattr(base_lm, "build_builtin_lm", build_while_another_process_finishes)
    model, tok = load_base_lm(cfg, corpus=corpus)
    assert json.loads((entry / BUILD_INFO).read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # temp folder removed
    assert isinstance(model, LlamaForCausalLM)


# --------------------------------------------------------------------------- HF LMs


def test_hf_lm_from_a_local_folder(built, tmp_path):
    model, tok, _ = built
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    loaded, tok2 = load_base_lm(ModelConfig(lm=str(tmp_path / "lm")))
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok2.pad_token_id == tok.pad_token_id


def test_missing_hf_lm_is_a_clear_error_not_a_hang():
    t0 = time.perf_counter()
    with pytest.raises(BaseLMError, match="cannot load the .*no-such-org/no-such-lm"):
        load_base_lm(ModelConfig(lm="no-such-org/no-such-lm"))
    assert time.perf_counter() - t0 < 20
    with pytest.raises(BaseLMError, match="unknown builtin LM 'builtin:gpt5'"):
        load_base_lm(ModelConfig(lm="builtin:gpt5"))


def test_pad_token_falls_back_to_eos(corpus):
    tok = train_tokenizer(corpus, 200)
    tok.pad_token = None
    assert ensure_pad_token(tok).pad_token == "</s>"
