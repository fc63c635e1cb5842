"""Tiny randomly initialized Hugging Face causal LMs of several architectures, written with
`save_pretrained` into a folder (no download): what `model.lm` points at in the tests of
"any Hugging Face causal LM". The tokenizer is fedmrg's own WordPiece fitted to a small
neutral corpus, saved beside the weights as a real model folder has it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

ARCHITECTURES = ("llama", "qwen2", "gpt2")
HIDDEN, LAYERS, HEADS = 32, 1, 2


def lm_config(arch: str, vocab_size: int, tokenizer) -> object:
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           num_key_value_heads=HEADS, max_position_embeddings=256, **ids)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           num_key_value_heads=1, max_position_embeddings=256, **ids)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                          n_positions=256, **ids)
    raise ValueError(arch)


def save_tiny_lm(arch: str, folder: str | Path, seed: int = 0) -> Path:
    """A random `arch` LM and its tokenizer in `folder` (created); returns the folder."""
    from fedmrg.data.phantom import neutral_corpus
    from fedmrg.model.base_lm import train_tokenizer

    folder = Path(folder)
    tokenizer = train_tokenizer(neutral_corpus(60, 0), 256)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(lm_config(arch, len(tokenizer), tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
