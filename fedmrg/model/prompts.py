"""Diagnosis-driven prompts: 14 observation states -> a short text the decoder reads first.

"Findings to report: cardiomegaly: positive; pleural effusion: negative." lists the non-blank
observations in OBSERVATIONS order; blank ones are left out so the prompt stays short in tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmrg.data.schema import BLANK, LABEL_NAMES, NUM_OBSERVATIONS, OBSERVATIONS

PROMPT_HEAD = "Findings to report:"


def diagnosis_prompt(states: Sequence[int]) -> str:
    """The prompt for one study's 14 label codes (0 blank, 1 positive, 2 negative, 3 uncertain)."""
    states = [int(s) for s in states]
    if len(states) != NUM_OBSERVATIONS:
        raise ValueError(f"diagnosis_prompt: expected {NUM_OBSERVATIONS} states, got {len(states)}")
    bad = [s for s in states if s not in range(len(LABEL_NAMES))]
    if bad:
        raise ValueError(f"diagnosis_prompt: state {bad[0]!r} is not a label code 0..3 "
                         f"({', '.join(LABEL_NAMES)})")
    return f"{PROMPT_HEAD} {findings_text(states)}."


def findings_text(states: Sequence[int]) -> str:
    """"cardiomegaly: positive; pleural effusion: negative": the non-blank observations of 14
    label codes in OBSERVATIONS order ("none" when every one is blank)."""
    items = [f"{obs}: {LABEL_NAMES[int(s)]}"
             for obs, s in zip(OBSERVATIONS, states, strict=True) if int(s) != BLANK]
    return "; ".join(items) or "none"


def prompt_vocabulary() -> list[str]:
    """Every word and punctuation mark a prompt can contain (for training a tokenizer)."""
    words = set(PROMPT_HEAD.lower().replace(":", " ").split()) | {"none", ":", ";", "."}
    for name in OBSERVATIONS + LABEL_NAMES:
        words.update(name.split())
    return sorted(words)


def prompt_corpus() -> list[str]:
    """Prompts covering every observation and state, so a tokenizer learns them as whole words."""
    return [diagnosis_prompt([s] * NUM_OBSERVATIONS) for s in range(1, len(LABEL_NAMES))] + [
        diagnosis_prompt([BLANK] * NUM_OBSERVATIONS)
    ]
