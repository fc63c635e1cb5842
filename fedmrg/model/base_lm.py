"""The frozen base causal LM and its tokenizer.

`model.lm` names it: an HF hub id or a local path (paper scale), or `builtin:tiny-llama` (the
CPU default). No pretrained LM can be downloaded offline, so the builtin one is built here: a
WordPiece tokenizer fitted to a public corpus (phantom reports in a neutral style no center
uses, plus the prompt vocabulary and the words of radiology English), a small Llama built from
config, and a short causal-LM warm-up on that corpus ("pretraining on a public corpus").
`model.lm_vocabulary: radiology` (for real reports) adds a public radiology word list and word
pieces derived from it to the tokenizer and a phrasebook of report sentences to the warm-up
corpus (`fedmrg.model.radiology_words`, `fedmrg.model.radiology_phrasebook`); the default
`phantom` builds exactly what it always built. Each
warm-up sequence is laid out as the report generator lays out its own, [diagnosis prompt][<s>
report </s>] (the prompt left out now and then), so the base LM already writes a report that
follows its prompt and the federated adapters only have to learn the centers' styles and the
images. The result is cached on disk under a
key that hashes everything that determines it, and written atomically (built in a temporary
folder, then renamed) so racing processes never see a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import string
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedmrg.choices import LMDtype, LMVocabulary, Quantization, choice_values
from fedmrg.config import ModelConfig
from fedmrg.data.transforms import tokenize_reports
from fedmrg.model.prompts import diagnosis_prompt, prompt_corpus, prompt_vocabulary

log = logging.getLogger(__name__)

BUILTIN_TINY_LLAMA = "builtin:tiny-llama"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
BUILD_INFO = "fedmrg_base_lm.json"  # written last inside a cache entry: its presence = complete
RECIPE_VERSION = 3  # bump when the build code changes what it produces


class BaseLMError(ValueError):
    """The base LM or its tokenizer cannot be loaded; the message names what and why."""


@dataclass(frozen=True)
class WarmupRecipe:
    """How the builtin LM is built, beyond the `model.lm_*` config keys (all part of the key)."""

    corpus_size: int = 2000  # neutral reports generated for tokenizer + warm-up
    corpus_seed: int = 0
    intermediate_ratio: int = 3  # MLP width / hidden size (Llama uses ~2.7 with SwiGLU)
    batch_size: int = 16
    max_tokens: int = 128  # warm-up sequence length (reports are shorter)
    lr: float = 3e-3
    seed: int = 0
    max_position_embeddings: int = 1024
    prompt_dropout: float = 0.2  # warm-up sequences without a prompt (the no-prompt ablation)


# --------------------------------------------------------------------------- tokenizer


# Decoded without the spaces the pre-tokenizer puts around these (`rejoin_punctuation`):
# "dual-lead", "left/right", "(pa)", "50%", "1.5 cm" come back as written.
REJOINED = ((" - ", "-"), (" / ", "/"), ("( ", "("), (" )", ")"), (" %", "%"),
            (Regex(r"(?<=\d)\. (?=\d)"), "."))


def train_tokenizer(texts: Sequence[str], vocab_size: int,
                    lexicon: Sequence[str] = (), *, pieces: Sequence[str] = (),
                    rejoin_punctuation: bool = False, keep_every_word: bool = False,
                    ) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer with <pad>/<s>/</s>/<unk>, fitted to `texts`.

    The vocabulary is every character seen (a-z, 0-9 and ASCII punctuation always), each also
    as a `##` continuation, then the words of `texts` by frequency (ties broken alphabetically),
    then the `lexicon` words the texts lack, then the word `pieces` (prefixes and `##`
    suffixes) not already in, up to `vocab_size`; any ASCII word tokenizes.
    Chosen by hand rather than with `tokenizers`' WordPieceTrainer because that trainer is not
    deterministic (token ids and even the token set change from run to run),
    and every center must get the same base LM.
    `rejoin_punctuation`: decode "-", "/", "(", ")", "%" and decimal points without spaces
    (`REJOINED`), so text written that way round-trips. `keep_every_word`: a `vocab_size` too
    small for every word of `texts` and `lexicon` is an error instead of a cut.
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # words and single punctuation marks
    counts: Counter[str] = Counter()
    for text in texts:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        counts.update(w for w, _ in words)
    always = string.ascii_lowercase + string.digits + string.punctuation
    chars = sorted({c for w in counts for c in w} | set(always))
    base = [PAD, BOS, EOS, UNK] + chars + ["##" + c for c in chars]
    if vocab_size <= len(base):
        raise BaseLMError(f"model.lm_vocab_size={vocab_size} is too small: the corpus's "
                          f"{len(chars)} characters alone need {len(base)} tokens")
    ranked = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    known = set(ranked)
    ranked += [w for w in dict.fromkeys(  # lexicon words the texts lack, in the given order
        w for entry in lexicon for w, _ in pre_tokenizer.pre_tokenize_str(
            normalizer.normalize_str(entry)) if len(w) > 1) if w not in known]
    if keep_every_word and len(base) + len(ranked) > vocab_size:
        raise BaseLMError(f"model.lm_vocab_size={vocab_size} is too small: the characters and "
                          f"the words of the corpus and the lexicon need "
                          f"{len(base) + len(ranked)} tokens; set it at least that large "
                          f"(the word pieces fill what is left)")
    taken = set(base) | set(ranked)
    ranked += [p for p in dict.fromkeys(pieces) if p not in taken]
    vocab = {tok: i for i, tok in enumerate(base + ranked[: vocab_size - len(base)])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    steps = [  # "normal ." -> "normal.", "findings :" -> "findings:"
        decoders.WordPiece(prefix="##", cleanup=True),
        decoders.Replace(" :", ":"), decoders.Replace(" ;", ";"),
    ]
    if rejoin_punctuation:  # on the whole text (Fuse): a rule may span two tokens
        steps += [decoders.Fuse(), *(decoders.Replace(a, b) for a, b in REJOINED)]
    tok.decoder = decoders.Sequence(steps)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="right", clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- builtin LM


# A warm-up text: a report, or (14 label codes, report) to put its diagnosis prompt first.
CorpusEntry = str | tuple[Sequence[int], str]


def default_corpus(recipe: WarmupRecipe, vocabulary: str = LMVocabulary.PHANTOM
                   ) -> list[CorpusEntry]:
    """The public warm-up corpus: neutral-style phantom studies (imported lazily); for the
    `radiology` vocabulary as many phrasebook reports after them, each with the labels the
    rule-based labeler reads from it (so it gets its diagnosis prompt)."""
    from fedmrg.data.phantom import neutral_studies

    corpus: list[CorpusEntry] = list(neutral_studies(recipe.corpus_size, recipe.corpus_seed))
    if vocabulary == LMVocabulary.RADIOLOGY:
        from fedmrg.data.labeler import label_reports
        from fedmrg.model.radiology_phrasebook import phrasebook_reports

        reports = phrasebook_reports(recipe.corpus_size, recipe.corpus_seed)
        labels = label_reports(reports)
        corpus += [([int(x) for x in row], r) for row, r in zip(labels, reports, strict=True)]
    return corpus


def _split_entry(entry: CorpusEntry) -> tuple[list[int] | None, str]:
    if isinstance(entry, str):
        return None, entry
    labels, report = entry
    return [int(x) for x in labels], report


def builtin_lm_key(cfg: ModelConfig, corpus: Sequence[CorpusEntry], recipe: WarmupRecipe) -> str:
    """Hash of everything that determines the builtin LM (config, corpus, recipe, libraries)."""
    from fedmrg.data.phantom import radiology_lexicon

    inputs = {
        "lm": cfg.lm, "hidden": cfg.lm_hidden_size, "layers": cfg.lm_layers,
        "heads": cfg.lm_heads, "vocab": cfg.lm_vocab_size, "warmup_steps": cfg.lm_warmup_steps,
        "recipe": asdict(recipe), "recipe_version": RECIPE_VERSION,
        "corpus_sha256": hashlib.sha256(
            json.dumps([_split_entry(e) for e in corpus]).encode()).hexdigest(),
        "prompt_vocabulary": prompt_vocabulary(), "lexicon": radiology_lexicon(),
        "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    if cfg.lm_vocabulary != LMVocabulary.PHANTOM:  # absent for phantom: its keys stay as built
        words, pieces, rejoin = _vocabulary(cfg.lm_vocabulary)
        inputs["vocabulary"] = {"name": cfg.lm_vocabulary, "words": words, "pieces": pieces,
                                "rejoin_punctuation": rejoin}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def warmup_sequences(tokenizer: PreTrainedTokenizerBase, corpus: Sequence[CorpusEntry],
                     recipe: WarmupRecipe) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, report ids) per corpus entry: the report as the report generator tokenizes
    it ([<s>] report [</s>], cut at `recipe.max_tokens`); the diagnosis prompt of its labels,
    or no prompt for a bare report and for a seeded `recipe.prompt_dropout` share of entries."""
    entries = [_split_entry(e) for e in corpus]
    ids, mask = tokenize_reports(tokenizer, [r for _, r in entries], recipe.max_tokens)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    dropped = torch.rand(len(entries), generator=gen) < recipe.prompt_dropout
    out = []
    for i, (labels, _) in enumerate(entries):
        prompt = [] if labels is None or dropped[i] else tokenizer(
            diagnosis_prompt(labels), add_special_tokens=False)["input_ids"]
        out.append((list(prompt), ids[i, : int(mask[i].sum())].tolist()))
    return out


def _warmup_batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> (
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
    """Right-padded (input_ids, attention_mask, labels) with the loss on report tokens only."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (prompt, report) in enumerate(seqs):
        n = len(prompt) + len(report)
        ids[i, :n] = torch.tensor(prompt + report, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(prompt):n] = torch.tensor(report, dtype=torch.long)
    return ids, mask, labels


def warm_up(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase,
            corpus: Sequence[CorpusEntry], steps: int, recipe: WarmupRecipe) -> list[float]:
    """Seeded causal-LM training on `corpus` (loss on the reports, not the prompts); returns
    the loss of every step."""
    if steps == 0:
        return []
    seqs = warmup_sequences(tokenizer, corpus, recipe)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(seqs), (recipe.batch_size,), generator=gen).tolist()
        ids, mask, labels = _warmup_batch([seqs[i] for i in idx], tokenizer.pad_token_id)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


def _vocabulary(vocabulary: str) -> tuple[list[str], list[str], bool]:
    """(lexicon words beyond the phantom's, word pieces, rejoin_punctuation) of a vocabulary."""
    if vocabulary == LMVocabulary.PHANTOM:
        return [], [], False
    if vocabulary == LMVocabulary.RADIOLOGY:
        from fedmrg.model.radiology_words import radiology_words, word_pieces

        words = radiology_words()
        return words, word_pieces(words), True
    raise BaseLMError(f"model.lm_vocabulary: {vocabulary!r} is not one of "
                      f"{choice_values(LMVocabulary)}")


def build_tokenizer(cfg: ModelConfig, corpus: Sequence[CorpusEntry]) -> PreTrainedTokenizerFast:
    """The builtin LM's tokenizer for `cfg.lm_vocabulary` and the warm-up `corpus`."""
    from fedmrg.data.phantom import radiology_lexicon

    reports = [_split_entry(e)[1] for e in corpus]
    texts = reports + prompt_corpus() * 20 + [" ".join(prompt_vocabulary())]
    words, pieces, rejoin = _vocabulary(cfg.lm_vocabulary)
    if cfg.lm_vocabulary == LMVocabulary.PHANTOM:  # exactly as it was always built
        return train_tokenizer(texts, cfg.lm_vocab_size, lexicon=radiology_lexicon())
    return train_tokenizer(texts, cfg.lm_vocab_size, lexicon=radiology_lexicon() + words,
                           pieces=pieces, rejoin_punctuation=rejoin, keep_every_word=True)


def build_builtin_lm(cfg: ModelConfig, corpus: Sequence[CorpusEntry], recipe: WarmupRecipe
                     ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    """Tokenizer + Llama from config + warm-up. Returns (model, tokenizer, build info)."""
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(cfg, corpus)
    lm_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.lm_hidden_size,
        intermediate_size=cfg.lm_hidden_size * recipe.intermediate_ratio,
        num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads,
        num_key_value_heads=cfg.lm_heads, max_position_embeddings=recipe.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(lm_config)
    t1 = time.perf_counter()
    losses = warm_up(model, tokenizer, corpus, cfg.lm_warmup_steps, recipe)
    t2 = time.perf_counter()
    info = {
        "lm": cfg.lm, "vocab": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_steps": cfg.lm_warmup_steps, "corpus_size": len(corpus),
        "loss_first": losses[0] if losses else None,
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "setup_s": round(t1 - t0, 3), "warmup_s": round(t2 - t1, 3),
    }
    return model, tokenizer, info


def _builtin_path(cfg: ModelConfig, corpus: Sequence[CorpusEntry] | None,
                  recipe: WarmupRecipe) -> Path:
    """The cache entry for the builtin LM, building it first if missing."""
    corpus = default_corpus(recipe, cfg.lm_vocabulary) if corpus is None else list(corpus)
    if not corpus:
        raise BaseLMError("the builtin LM needs a non-empty warm-up corpus")
    cache = Path(os.path.expanduser(cfg.lm_cache))
    entry = cache / builtin_lm_key(cfg, corpus, recipe)
    if (entry / BUILD_INFO).exists():
        return entry
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    except OSError as e:
        raise BaseLMError(f"model.lm_cache: cannot write the builtin LM cache {cache}: {e}") from e
    try:
        log.info("building the builtin base LM into %s", entry)
        t0 = time.perf_counter()
        model, tokenizer, info = build_builtin_lm(cfg, corpus, recipe)
        quiet_weight_bars()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info["build_s"] = round(time.perf_counter() - t0, 3)
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, entry)  # atomic; fails if another process got there first
        except OSError:
            if not (entry / BUILD_INFO).exists():
                raise
            log.info("another process built %s first; using it", entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def builtin_lm_path(cfg: ModelConfig, corpus: Sequence[CorpusEntry] | None = None,
                    recipe: WarmupRecipe = WarmupRecipe()) -> Path:
    """The cached builtin LM's folder (a Hugging Face model folder); builds it if missing."""
    return _builtin_path(cfg, corpus, recipe)


def builtin_build_info(cfg: ModelConfig, corpus: Sequence[CorpusEntry] | None = None,
                       recipe: WarmupRecipe = WarmupRecipe()) -> dict:
    """What the cached builtin LM's build recorded (time, losses, size); builds it if missing."""
    return json.loads((_builtin_path(cfg, corpus, recipe) / BUILD_INFO).read_text())


# --------------------------------------------------------------------------- loading


def quiet_weight_bars() -> None:
    """No "Loading weights" / "Writing model shards" progress bars: every client actor loads
    the base LM, and on a run's console (and in Ray's worker logs) those bars are only noise.
    Process-wide: `transformers.utils.logging.enable_progress_bar()` brings them back."""
    transformers.utils.logging.disable_progress_bar()


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_error(what: str, path: str | Path, e: Exception) -> BaseLMError:
    return BaseLMError(
        f"cannot load the {what} {str(path)!r}: not a local folder with one, and not in the "
        f"Hugging Face cache (downloads are off when HF_HUB_OFFLINE=1). Use model.lm="
        f"{BUILTIN_TINY_LLAMA!r} or a local path. Cause: {type(e).__name__}: {e}")


DTYPES = {LMDtype.FLOAT32: torch.float32, LMDtype.BFLOAT16: torch.bfloat16,
          LMDtype.FLOAT16: torch.float16}


def quantization_config(quantization: str, dtype: str) -> Any:
    """transformers' `BitsAndBytesConfig` for `model.lm_quantization` (None for "none"):
    NF4 with double quantization for 4-bit (QLoRA's recipe), computing in `dtype` (bfloat16
    when the weights' dtype is float32: a 4-bit matmul in float32 only costs time)."""
    if quantization == Quantization.NONE:
        return None
    from transformers import BitsAndBytesConfig

    compute = DTYPES[dtype] if dtype != LMDtype.FLOAT32 else torch.bfloat16
    if quantization == Quantization.FOUR_BIT:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    if quantization == Quantization.EIGHT_BIT:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise BaseLMError(f"model.lm_quantization: {quantization!r} is not one of "
                      f"{choice_values(Quantization)}")


def check_quantization_device(quantization: str, device: str | torch.device | None) -> None:
    """A quantized base LM needs CUDA and bitsandbytes: say which is missing, naming the key."""
    if quantization == Quantization.NONE:
        return
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise BaseLMError(
            f"model.lm_quantization={quantization!r} needs a CUDA GPU (bitsandbytes); this "
            f"client runs on {device or 'cpu'}: give the clients GPUs "
            f"(resources.num_gpus_per_client) or set model.lm_quantization=none with "
            f"model.lm_dtype=bfloat16")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise BaseLMError(f"model.lm_quantization={quantization!r} needs the bitsandbytes "
                          f"package: pip install 'fedmrg[gpu]' (or bitsandbytes)") from e


def load_causal_lm(path: str | Path, *, dtype: str = "float32", quantization: str = "none",
                   device: str | torch.device | None = None) -> PreTrainedModel:
    """An HF causal LM from a hub id (cached offline) or a folder, frozen, its weights in
    `dtype` (`model.lm_dtype`), or quantized (`model.lm_quantization`: loaded straight onto
    `device`, which must be CUDA; unquantized models load on the CPU and the caller moves
    them)."""
    if dtype not in DTYPES:
        raise BaseLMError(f"model.lm_dtype: {dtype!r} is not one of {choice_values(LMDtype)}")
    check_quantization_device(quantization, device)
    quiet_weight_bars()
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    quant = quantization_config(quantization, dtype)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": torch.device(device).index or 0})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error("causal LM", path, e) from e
    return _freeze(model)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """An HF tokenizer from a hub id (cached offline) or a folder, with a pad token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise _load_error("tokenizer", path, e) from e
    return ensure_pad_token(tokenizer, str(path))


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, name: str = "the tokenizer") -> (
        PreTrainedTokenizerBase):
    """Give a tokenizer without a pad token EOS as its pad token (in place)."""
    if tokenizer.pad_token is None:
        # Padding positions are masked everywhere, so EOS can stand in for a pad token.
        if tokenizer.eos_token is None:
            raise BaseLMError(f"{name}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_lm(cfg: ModelConfig, *, corpus: Sequence[CorpusEntry] | None = None,
                 recipe: WarmupRecipe = WarmupRecipe(),
                 device: str | torch.device | None = None) -> (
        tuple[PreTrainedModel, PreTrainedTokenizerBase]):
    """The frozen base LM and its tokenizer for `cfg.lm` (builtin: built once, then cached),
    in `cfg.lm_dtype` or quantized per `cfg.lm_quantization` onto `device` (CUDA).
    (`cfg.gradient_checkpointing` is turned on by `MRGModel`, which knows the adapters.)

    `corpus` overrides the builtin's warm-up corpus (default: the phantom neutral studies,
    each with its diagnosis prompt, and for `model.lm_vocabulary: radiology` the phrasebook's
    reports too; plain report strings warm up without prompts).
    """
    path: str | Path = cfg.lm
    if cfg.lm.startswith("builtin:"):
        if cfg.lm != BUILTIN_TINY_LLAMA:
            raise BaseLMError(f"model.lm: unknown builtin LM {cfg.lm!r}; the builtin one is "
                              f"{BUILTIN_TINY_LLAMA!r}")
        path = _builtin_path(cfg, corpus, recipe)
    model = load_causal_lm(path, dtype=cfg.lm_dtype, quantization=cfg.lm_quantization,
                           device=device)
    return model, load_tokenizer(path)


def lm_source_config(name: str) -> Any:
    """The HF config of `model.lm` (a folder or a hub id), read without weights: a one-line
    `BaseLMError` naming the key and value for a folder without config.json or an id that is
    neither a folder nor in the Hugging Face cache (nor downloadable when online)."""
    from transformers import AutoConfig

    folder = Path(os.path.expanduser(name))
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise BaseLMError(f"model.lm={name!r}: the folder has no config.json (a Hugging Face "
                          f"model folder holds config.json, the weights and the tokenizer)")
    if not folder.is_dir() and (name.startswith(("/", "./", "../", "~"))
                                or name.count("/") > 1):
        raise BaseLMError(f"model.lm={name!r}: no such folder")
    try:
        return AutoConfig.from_pretrained(str(folder) if folder.is_dir() else name)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise BaseLMError(
            f"model.lm={name!r}: not a local folder and not in the Hugging Face cache"
            + (" (downloads are off: HF_HUB_OFFLINE=1)" if offline else "")
            + f"; download it first (hf download {name}) or point model.lm at a folder "
            f"({type(e).__name__})") from e


def lm_module_names(name: str) -> tuple[str, list[str]]:
    """(model_type, the LoRA-adaptable module names) of `model.lm`, from its config on the
    meta device: no weights are read or allocated, so a 7B LM is checked in a second."""
    return _module_names(lm_source_config(name))


def _module_names(config: Any) -> tuple[str, list[str]]:
    from fedmrg.model.lora_targets import adaptable_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config.model_type, adaptable_modules(model)


def check_vocabulary_size(cfg: ModelConfig) -> None:
    """Before any build: `model.lm_vocab_size` holds the characters and the word list of
    `model.lm_vocabulary` (a lower bound of what the build needs; the build checks exactly)."""
    if cfg.lm_vocabulary == LMVocabulary.PHANTOM:  # cuts its lexicon to fit, as it always did
        return
    from fedmrg.data.phantom import radiology_lexicon

    words, _, _ = _vocabulary(cfg.lm_vocabulary)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    need = 4 + 2 * len(chars) + len({w for w in radiology_lexicon() + words if len(w) > 1})
    if cfg.lm_vocab_size < need:
        raise BaseLMError(f"model.lm_vocab_size={cfg.lm_vocab_size} is too small for "
                          f"model.lm_vocabulary={cfg.lm_vocabulary!r}: its characters and word "
                          f"list alone need {need} tokens (4096 holds its word pieces too)")


def check_base_lm(cfg: ModelConfig) -> str:
    """Before any actor starts: `model.lm` resolves (a folder with a config, or a cached id)
    and every LoRA target matches a module of it. Returns the LM's model_type. The builtin LM
    is checked on a one-layer Llama of its shape (the cached build is not needed)."""
    from fedmrg.model.lora_targets import check_lora_targets, resolve_lora_targets

    if cfg.lm.startswith("builtin:"):
        if cfg.lm != BUILTIN_TINY_LLAMA:
            raise BaseLMError(f"model.lm: unknown builtin LM {cfg.lm!r}; the builtin one is "
                              f"{BUILTIN_TINY_LLAMA!r}")
        check_vocabulary_size(cfg)
        config = LlamaConfig(vocab_size=64, hidden_size=cfg.lm_hidden_size,
                             intermediate_size=cfg.lm_hidden_size, num_hidden_layers=1,
                             num_attention_heads=cfg.lm_heads)
        where = "the builtin Llama"
    else:
        config, where = lm_source_config(cfg.lm), repr(cfg.lm)
    model_type, names = _module_names(config)
    targets = resolve_lora_targets(model_type, cfg.lora_targets)
    check_lora_targets(targets.modules, names, f"{where} ({model_type})")
    return model_type
