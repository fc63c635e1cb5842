"""Repetition in generated reports: the distinct-n / rep-4 metric on hand-made strings, the
decoding remedies (no-repeat n-grams, repetition penalty) really acting on a tiny model that
generates from embeddings, and the `eval.*` keys that drive them."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model_config

from fedmrg.config import ConfigError, EvalConfig, load_config
from fedmrg.data.schema import NUM_OBSERVATIONS
from fedmrg.eval.evaluator import (
    GENERATION_KEYS,
    EvaluationError,
    evaluate_model,
    generation_kwargs,
)
from fedmrg.eval.repetition import (
    REPETITION_KEYS,
    compute_repetition_metrics,
    distinct_n,
    repeated_ngram_rate,
    report_words,
)

# --------------------------------------------------------------------------- the metric


def test_report_words_are_the_cleaned_words_without_full_stops():
    assert report_words("No effusion. The heart is normal.") == [
        "no", "effusion", "the", "heart", "is", "normal"]
    assert report_words("") == []


def test_a_looping_report_has_a_high_rep_4_and_a_varied_one_none():
    loop = report_words("no heart is no heart is no heart is no heart is")
    # 4-grams: 9, distinct: (no heart is no), (heart is no heart), (is no heart is) -> 3
    assert repeated_ngram_rate(loop, 4) == pytest.approx(1 - 3 / 9)
    varied = report_words("the heart is normal in size. no pleural effusion.")
    assert repeated_ngram_rate(varied, 4) == 0.0
    assert repeated_ngram_rate(["too", "short"], 4) == 0.0  # no 4-gram: counts 0


def test_distinct_n_counts_ngrams_inside_reports_over_the_corpus():
    reports = [["a", "b", "a"], ["a", "c"]]
    assert distinct_n(reports, 1) == pytest.approx(3 / 5)  # a, b, c of a b a a c
    # bigrams: (a b), (b a), (a c); none spans the two reports
    assert distinct_n(reports, 2) == pytest.approx(1.0)
    assert distinct_n([[], []], 2) == 0.0


def test_compute_repetition_metrics_of_a_corpus():
    m = compute_repetition_metrics(["is is is is is", "No effusion."])
    assert set(m) == set(REPETITION_KEYS)
    assert m["distinct_1"] == pytest.approx(3 / 7)  # is, no, effusion of 7 words
    assert m["distinct_2"] == pytest.approx(2 / 5)  # (is is) x4, (no effusion)
    assert m["rep_4"] == pytest.approx((1 - 1 / 2 + 0) / 2)  # 2 identical 4-grams; none
    clean = compute_repetition_metrics(["the heart is normal", "no pleural effusion"])
    assert clean["rep_4"] == 0.0 and clean["distinct_1"] == 1.0
    with pytest.raises(TypeError):
        compute_repetition_metrics("one string")
    with pytest.raises(ValueError):
        compute_repetition_metrics([])


# --------------------------------------------------------------------------- config


def test_generation_keys_are_typed_validated_config_keys():
    cfg = load_config("default", ["eval.no_repeat_ngram_size=3",
                                  "eval.repetition_penalty=1.2"])
    kwargs = generation_kwargs(cfg.eval)
    assert set(kwargs) == set(GENERATION_KEYS)
    assert kwargs["no_repeat_ngram_size"] == 3 and kwargs["repetition_penalty"] == 1.2
    assert generation_kwargs(cfg.eval, num_beams=2)["num_beams"] == 2
    with pytest.raises(EvaluationError, match="top_k"):
        generation_kwargs(cfg.eval, top_k=5)
    with pytest.raises(ConfigError, match="eval.no_repeat_ngram_size"):
        load_config("default", ["eval.no_repeat_ngram_size=-1"])
    with pytest.raises(ConfigError, match="eval.no_repeat_ngram_size"):
        load_config("default", ["eval.no_repeat_ngram_size=2.5"])
    with pytest.raises(ConfigError, match="eval.repetition_penalty"):
        load_config("default", ["eval.repetition_penalty=0.5"])
    with pytest.raises(ConfigError, match="eval.val_studies"):
        load_config("default", ["eval.val_studies=0"])
    with pytest.raises(ConfigError, match="eval.val_every"):
        load_config("default", ["eval.val_every=-2"])
    assert EvalConfig().val_every >= 0


# --------------------------------------------------------------------------- decoding

B, V, SIZE = 4, 2, 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fedmrg.data.phantom import neutral_corpus
    from fedmrg.model.base_lm import load_base_lm
    from fedmrg.model.mrg import MRGModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = tiny_model_config(tmp_path_factory.mktemp("lm_cache"))
    lm, tok = load_base_lm(cfg, corpus=neutral_corpus(120, 0))
    yield MRGModel.from_config(cfg, lm, tok, seed=0)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(B, V, 1, SIZE, SIZE, generator=g),
            "view_mask": torch.ones(B, V, dtype=torch.bool),
            "labels": torch.randint(0, 4, (B, NUM_OBSERVATIONS), generator=g),
            "report": ["The heart is normal. No effusion."] * B,
            "study_id": [f"s{i}" for i in range(B)]}


def _repeated_ngrams(model, n: int) -> int:
    """Repeated n-grams over the rows of the last generation, padding after EOS left out."""
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    count = 0
    for row in model.last_tokens.tolist():
        ids = []
        for t in row:
            if t == eos:
                break
            ids.append(t)
        ids = [t for t in ids if t != pad]
        grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        count += len(grams) - len(set(grams))
    return count


def test_no_repeat_ngram_size_bans_repeated_ngrams_in_embedding_generation(model, batch):
    kw = dict(num_beams=1, max_new_tokens=40)
    plain = model.generate(batch["images"], batch["view_mask"], **kw)
    # an untrained tiny LM loops: the ban has something to remove
    assert _repeated_ngrams(model, 3) > 0, plain
    with _no_warning():
        banned = model.generate(batch["images"], batch["view_mask"], no_repeat_ngram_size=3,
                                **kw)
    assert _repeated_ngrams(model, 3) == 0
    assert banned != plain
    model.generate(batch["images"], batch["view_mask"], no_repeat_ngram_size=2, **kw)
    assert _repeated_ngrams(model, 2) == 0


def test_repetition_penalty_changes_the_generation_from_embeddings(model, batch):
    kw = dict(num_beams=1, max_new_tokens=40)
    model.generate(batch["images"], batch["view_mask"], **kw)
    plain = _repeated_ngrams(model, 1)
    model.generate(batch["images"], batch["view_mask"], repetition_penalty=3.0, **kw)
    assert _repeated_ngrams(model, 1) < plain


def test_evaluate_model_reports_the_repetition_metrics_and_takes_the_remedies(model, batch):
    plain = evaluate_model(model, [batch], num_beams=1, max_new_tokens=30)
    assert set(REPETITION_KEYS) <= set(plain.metrics)
    for remedy in ({"no_repeat_ngram_size": 2}, {"repetition_penalty": 3.0}):
        treated = evaluate_model(model, [batch], num_beams=1, max_new_tokens=30, **remedy)
        assert treated.reports != plain.reports, remedy  # the remedy reached generate
        expected = compute_repetition_metrics(treated.reports)
        assert {k: treated.metrics[k] for k in REPETITION_KEYS} == expected
        assert not math.isnan(treated.metrics["distinct_2"])
    with pytest.raises(EvaluationError, match="top_k"):
        evaluate_model(model, [batch], top_k=3)


class _no_warning:
    """No UserWarning may escape generate (transformers warns about inputs_embeds)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.seen = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        messages = [str(w.message) for w in self.seen if "ngram" in str(w.message)]
        assert not messages, messages


def test_fedmrg_evaluate_takes_eval_settings_only(tmp_path):
    from click.testing import CliRunner

    from fedmrg.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["evaluate", str(tmp_path), "--set", "train.lr=0.1"])
    assert out.exit_code == 2
    assert "--set train.lr=0.1: only eval.* keys" in out.output
    out = runner.invoke(main, ["evaluate", str(tmp_path), "--set",
                               "eval.no_repeat_ngram_size=3"])
    assert out.exit_code == 2 and "not the folder of a finished fedmrg run" in out.output
