"""Real-style reports through the builtin LM (issue 19, item 4).

`tests/data/iu_xray_style_reports.txt`: 61 findings + impression reports in the style of
IU-Xray / R2Gen, written for this test (one per line; "XXXX" is IU-Xray's redaction mark). They
are imported as R2Gen's annotation.json with a Dirichlet partition into 2 centers, then:

- the `radiology` vocabulary (`model.lm_vocabulary`) keeps them in whole words: every report
  round-trips (decode(encode(x)) is x lower-cased with its whitespace collapsed, hyphens, decimal
  points and parentheses as written), no <unk>, almost no `##` pieces, none longer than
  `data.max_report_tokens`; the `phantom` vocabulary (the default, unchanged) spells half of
  their tokens out in pieces;
- truncation is counted per center and warned in one line naming the center, count and limit;
- a short training run of a tiny model on them generates varied text, not one string per
  center (the collapse the issue saw with the phantom vocabulary).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL
from PIL import Image

from fedmrg.config import DataConfig, ModelConfig, TrainConfig
from fedmrg.data.importers import ImportOptions, import_dataset
from fedmrg.data.shards import read_center_table
from fedmrg.data.transforms import transform_study
from fedmrg.eval.repetition import compute_repetition_metrics
from fedmrg.fl.client import train_report_truncation
from fedmrg.model.base_lm import (
    BaseLMError,
    WarmupRecipe,
    build_tokenizer,
    builtin_lm_key,
    check_base_lm,
    default_corpus,
    load_base_lm,
    train_tokenizer,
)
from fedmrg.model.mrg import MRGModel
from fedmrg.model.radiology_words import radiology_words, word_pieces
from fedmrg.model.trainer import LocalTrainer

REPORTS = Path(__file__).parent / "data" / "iu_xray_style_reports.txt"
CENTERS = ("c0", "c1")
# a small public warm-up corpus (400 neutral studies + 400 phrasebook reports) at a higher
# learning rate than the default recipe: the tiny LM learns the language in 300 steps
RECIPE = WarmupRecipe(corpus_size=400, max_tokens=96, lr=1e-2)
RADIOLOGY = {"lm_vocabulary": "radiology", "lm_vocab_size": 4096, "lm_warmup_steps": 300}


def normalized(text: str) -> str:
    """What the tokenizer keeps of a report: NFKC, lower case, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The reports as R2Gen IU-Xray (two 16 px views per study, splits as the top-level keys,
    no labels: the labeler fills them), imported with a Dirichlet partition into 2 centers."""
    tmp = tmp_path_factory.mktemp("iu")
    entries = []
    for i, report in enumerate(REPORTS.read_text().splitlines()):
        study = f"CXR{1000 + i}_IM-{i:04d}"
        for view in (0, 1):
            path = tmp / "iu" / "images" / study / f"{view}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(2 * i + view).integers(0, 256, (16, 16), np.uint8)
            Image.fromarray(pixels, mode="L").save(path)
        entries.append({"id": study, "report": report,
                        "image_path": [f"{study}/0.png", f"{study}/1.png"]})
    annotation = tmp / "iu" / "annotation.json"
    annotation.write_text(json.dumps({"train": entries[:45], "val": entries[45:50],
                                      "test": entries[50:]}))
    root = tmp / "data"
    import_dataset(ImportOptions("r2gen", [annotation], centers_from="dirichlet",
                                 num_centers=len(CENTERS), alpha=1.0, seed=0), root)
    return root


@pytest.fixture(scope="module")
def rows(dataset) -> dict[str, list[dict]]:
    return {c: read_center_table(dataset, c).to_pylist() for c in CENTERS}


@pytest.fixture(scope="module")
def radiology_lm(tmp_path_factory):
    """The tiny builtin LM with the radiology vocabulary, as saved and loaded from its cache."""
    cfg = ModelConfig(**{**TINY_MODEL, **RADIOLOGY,
                         "lm_cache": str(tmp_path_factory.mktemp("lm"))})
    lm, tokenizer = load_base_lm(cfg, recipe=RECIPE)
    return cfg, lm, tokenizer


def phantom_tokenizer():
    cfg = ModelConfig()  # the default builtin LM's tokenizer
    return build_tokenizer(cfg, default_corpus(WarmupRecipe()))


# --------------------------------------------------------------------------- tokenization


def test_the_import_keeps_every_report_and_splits_them_over_both_centers(rows):
    reports = REPORTS.read_text().splitlines()
    assert len(reports) == 61
    imported = [r for c in CENTERS for r in rows[c]]
    assert sorted(r["report"] for r in imported) == sorted(reports)
    assert all(any(r["split"] == "train" for r in rows[c]) for c in CENTERS)


def test_radiology_vocabulary_round_trips_real_reports_in_whole_words(radiology_lm, rows):
    _, _, tok = radiology_lm  # reloaded from disk: the saved decoder is the one tested
    reports = [r["report"] for c in CENTERS for r in rows[c]]
    pieces = [p for r in reports for p in tok.tokenize(r)]
    for report in reports:
        ids = tok(report, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == normalized(report)
        assert tok.unk_token_id not in ids
    continued = [p for p in pieces if p.startswith("##")]
    assert len(continued) <= 0.01 * len(pieces), continued
    for word in ("hilar", "costophrenic", "atelectasis", "cardiomediastinal", "granuloma",
                 "degenerative", "thoracic", "hemidiaphragm", "osteophyte", "kyphosis"):
        assert tok.tokenize(word) == [word]
    assert tok.decode(tok("Dual-lead (AP) 1.5 cm, 50%: x-ray/CT.")["input_ids"],
                      skip_special_tokens=True) == "dual-lead (ap) 1.5 cm, 50%: x-ray/ct."
    lengths = [len(tok(r)["input_ids"]) + 2 for r in reports]
    assert max(lengths) <= DataConfig().max_report_tokens  # none truncated at the default


def test_the_default_phantom_vocabulary_spells_real_reports_out(rows):
    """What the issue saw, kept as it was for the phantom benchmark's default run."""
    tok = phantom_tokenizer()
    reports = [r["report"] for c in CENTERS for r in rows[c]]
    pieces = [p for r in reports for p in tok.tokenize(r)]
    assert tok.tokenize("hilar") == ["h", "##i", "##l", "##a", "##r"]
    assert sum(p.startswith("##") for p in pieces) > 0.4 * len(pieces)
    assert sum(tok.decode(tok(r)["input_ids"]) != normalized(r) for r in reports) > 0


def test_the_radiology_vocabulary_leaves_the_phantom_default_as_it_was():
    default = ModelConfig()
    corpus = default_corpus(WarmupRecipe())
    radiology = ModelConfig(lm_vocabulary="radiology", lm_vocab_size=4096)
    assert default_corpus(WarmupRecipe(), "phantom") == corpus
    # the default's cache key and tokenizer as before this vocabulary existed (the key also
    # hashes the pinned torch / transformers / tokenizers versions of constraints.txt)
    assert builtin_lm_key(default, corpus, WarmupRecipe()) == "43032f5c7380d5b3edf8", (
        "the default builtin LM changed: the phantom default must build what it always built")
    assert len(phantom_tokenizer()) == 346
    assert builtin_lm_key(radiology, corpus, WarmupRecipe()) != builtin_lm_key(
        default, corpus, WarmupRecipe())


def test_word_pieces_are_deterministic_and_split_unknown_words_into_few_pieces(radiology_lm):
    words = radiology_words()
    assert word_pieces(words) == word_pieces(list(reversed(words)))  # order-free, no hashing
    assert {"##osis", "##ectomy", "pneumo", "cardio"} <= set(word_pieces(words))
    _, _, tok = radiology_lm
    for word in ("lipomatosis", "arthrosis", "spurring"):  # not in the word list
        assert word not in words
        assert 1 < len(tok.tokenize(word)) < len(word) / 2, tok.tokenize(word)


def test_a_vocabulary_too_small_for_the_word_list_is_a_clear_error():
    with pytest.raises(BaseLMError, match=r"lm_vocab_size=1024 is too small for model.lm_voc"
                                          r"abulary='radiology': its characters and word"):
        check_base_lm(ModelConfig(lm_vocabulary="radiology"))  # before any actor starts
    check_base_lm(ModelConfig(lm_vocabulary="radiology", lm_vocab_size=4096))
    with pytest.raises(BaseLMError, match="model.lm_vocab_size=1024 is too small: the charac"):
        build_tokenizer(ModelConfig(lm_vocabulary="radiology"), ["the heart is normal."])
    with pytest.raises(BaseLMError, match="lm_vocab_size=300 is too small"):
        train_tokenizer(["a b"], 300, radiology_words(), keep_every_word=True)


# --------------------------------------------------------------------------- truncation


def test_truncation_is_counted_per_center_and_warned_naming_center_count_and_limit(
        dataset, rows, caplog):
    tok = phantom_tokenizer()
    limit = 64
    caplog.set_level(logging.WARNING, logger="fedmrg.fl.client")
    for center in CENTERS:
        train = [r["report"] for r in rows[center] if r["split"] == "train"]
        lengths = [len(tok(r, add_special_tokens=False)["input_ids"]) + 2 for r in train]
        expected = sum(n > limit for n in lengths)
        assert 0 < expected < len(train)  # the limit cuts some reports of each center
        got = train_report_truncation(str(dataset), [center], tok, limit, client=center)
        assert got == {"truncated": expected, "reports": len(train), "longest": max(lengths)}
        assert (f"center {center!r}: {expected} of {len(train)} train reports are longer than "
                f"data.max_report_tokens={limit} tokens (the longest has {max(lengths)}) and "
                f"are truncated in training") in caplog.text
    caplog.clear()
    none = train_report_truncation(str(dataset), list(CENTERS), tok, 512, client="c0")
    assert none["truncated"] == 0 and caplog.text == ""  # nothing cut: nothing warned


# --------------------------------------------------------------------------- generation


def batches(rows: list[dict], size: int = 8) -> list[dict]:
    """The batch contract from imported rows (32 px, 2 views; the model tokenizes)."""
    out = []
    for k in range(0, len(rows), size):
        chunk = rows[k:k + size]
        studies = [transform_study(r["images"], r["study_id"], 32, 2, 1) for r in chunk]
        out.append({"images": torch.tensor(np.stack([s for s, _ in studies])),
                    "view_mask": torch.tensor(np.stack([m for _, m in studies])),
                    "labels": torch.tensor([r["labels"] for r in chunk]),
                    "report": [r["report"] for r in chunk],
                    "study_id": [r["study_id"] for r in chunk]})
    return out


def test_a_short_training_run_generates_varied_reports_not_one_string_per_center(
        radiology_lm, rows):
    cfg, lm, tok = radiology_lm
    model = MRGModel.from_config(cfg, lm, tok, seed=0)
    train = batches([r for c in CENTERS for r in rows[c] if r["split"] == "train"])
    trainer = LocalTrainer(model, TrainConfig(lr=5e-3, warmup_steps=1), seed=0)
    trainer.fit((b for _ in range(100) for b in train), 60)
    generated: dict[str, list[str]] = {}
    for center in CENTERS:
        for batch in batches([r for r in rows[center] if r["split"] == "train"]):
            generated.setdefault(center, []).extend(model.generate(
                batch["images"], batch["view_mask"], states=batch["labels"], num_beams=1,
                max_new_tokens=60, no_repeat_ngram_size=4))
    every = [g for texts in generated.values() for g in texts]
    for center, texts in generated.items():
        assert len(set(texts)) >= 0.75 * len(texts), (center, texts)
    metrics = compute_repetition_metrics(every)
    # measured on this machine: radiology distinct-2 0.21, stutter 0.00, 95 words of the
    # list; the same run with the phantom vocabulary: 0.09, 0.31 ("findings findings
    # findings", "there there there"), 45 words
    assert metrics["distinct_2"] >= 0.15, (metrics, every[:3])
    words = [w for g in every for w in re.findall(r"[a-z]+", g)]
    stutter = sum(a == b for a, b in zip(words, words[1:], strict=False)) / len(words)
    assert stutter < 0.1, every[:3]  # "is is is", "no. no. no" (the collapse)
    assert len(set(words) & set(radiology_words())) >= 60  # it writes the language it saw
