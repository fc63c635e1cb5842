"""Label sampling for the phantom benchmark: realistic co-occurrence and per-center skew.

A study's findings come from a few latent clinical situations (heart failure, infection, critical
care, trauma, neoplasm, chronic change), each switching on a set of observations with its own
probability, plus a small independent background rate per observation. A center's `LabelSkew`
sets how common each situation is, so an ICU center has many devices/edema/effusions and an
outpatient center many normals, while findings keep co-occurring the way they do in practice
(edema with cardiomegaly and effusion, pneumothorax with rib fractures, ...).

Codes follow the CheXpert convention (fedmrg.data.schema): a present finding is POSITIVE, or
UNCERTAIN at a low rate (rendered faint, reported with hedging); an absent finding is NEGATIVE
when the report mentions it as absent (the style decides how often it does) and BLANK otherwise.
Two rules tie the 14 codes together (`check_labels`):
- hierarchy: a positive or uncertain consolidation/pneumonia/edema/atelectasis/lung lesion makes
  lung opacity positive (the report describes the opacity, then names or hedges its cause);
- "no finding" is positive exactly when nothing but support devices is positive or uncertain,
  and blank otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedmrg.data.schema import (
    BLANK,
    NEGATIVE,
    NUM_OBSERVATIONS,
    OBSERVATIONS,
    POSITIVE,
    UNCERTAIN,
)

OBS = {name: i for i, name in enumerate(OBSERVATIONS)}
ECM, CARDIO, OPACITY, LESION, EDEMA, CONSOL, PNEUMONIA, ATELECT = range(8)
PTX, EFFUSION, PLEURAL_OTHER, FRACTURE, DEVICES, NO_FINDING = range(8, 14)

# Observations whose presence makes lung opacity positive (CheXpert hierarchy).
OPACITY_CHILDREN: tuple[int, ...] = (LESION, EDEMA, CONSOL, PNEUMONIA, ATELECT)
# Everything a radiograph can show (all but "no finding").
VISIBLE: tuple[int, ...] = tuple(range(NO_FINDING))
# Observations that can be hedged (a device is either there or not).
HEDGEABLE: tuple[int, ...] = tuple(i for i in VISIBLE if i not in (DEVICES,))

# Latent situation -> {observation: probability it is present given the situation}.
SITUATIONS: dict[str, dict[int, float]] = {
    "heart_failure": {CARDIO: 0.85, EDEMA: 0.7, EFFUSION: 0.6, ECM: 0.35, ATELECT: 0.25},
    "infection": {PNEUMONIA: 0.8, CONSOL: 0.5, OPACITY: 0.6, EFFUSION: 0.2, ATELECT: 0.15},
    "critical_care": {DEVICES: 0.95, ATELECT: 0.4, EDEMA: 0.3, EFFUSION: 0.35, PTX: 0.08,
                      CONSOL: 0.15},
    "trauma": {FRACTURE: 0.85, PTX: 0.35, EFFUSION: 0.2, CONSOL: 0.2},
    "neoplasm": {LESION: 0.9, EFFUSION: 0.25, ECM: 0.25, ATELECT: 0.2},
    "chronic": {PLEURAL_OTHER: 0.6, CARDIO: 0.3, FRACTURE: 0.2, LESION: 0.1},
}
SITUATION_NAMES: tuple[str, ...] = tuple(SITUATIONS)


@dataclass(frozen=True)
class LabelSkew:
    """How common each latent situation is at a center (probability per study)."""

    situations: Mapping[str, float]
    background: float = 0.02  # independent rate of each observation, on top of the situations
    uncertain_rate: float = 0.06  # a present finding is reported as uncertain (and drawn faint)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.situations) - set(SITUATIONS))
        if unknown:
            raise ValueError(f"LabelSkew: unknown situation {unknown[0]!r}; known: "
                             f"{list(SITUATIONS)}")
        for name, p in [*self.situations.items(), ("background", self.background),
                        ("uncertain_rate", self.uncertain_rate)]:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"LabelSkew: {name} = {p!r} is not a probability in [0, 1]")


@dataclass(frozen=True)
class FindingDetails:
    """Where and how big each present finding is: shared by the renderer and the report.

    side: 'left' | 'right' | 'bilateral'; zone: 'upper' | 'lower'; severity: 0 mild, 1 moderate,
    2 large; devices: a non-empty subset of DEVICE_KINDS when support devices are present.
    """

    side: dict[int, str] = field(default_factory=dict)
    zone: dict[int, str] = field(default_factory=dict)
    severity: dict[int, int] = field(default_factory=dict)
    devices: tuple[str, ...] = ()


DEVICE_KINDS: tuple[str, ...] = ("ett", "central_line", "pacemaker", "ng_tube")
BILATERAL_OK = {EDEMA, EFFUSION, ATELECT, PNEUMONIA, PLEURAL_OTHER}


def study_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of one study: depends only on (seed, stream, index), so studies can be
    generated in any order (or in parallel) and still come out identical."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def check_labels(labels: Sequence[int]) -> None:
    """Raise ValueError unless `labels` is a consistent phantom label vector (see module doc)."""
    if len(labels) != NUM_OBSERVATIONS:
        raise ValueError(f"labels: {len(labels)} codes, expected {NUM_OBSERVATIONS}")
    for i, code in enumerate(labels):
        if code not in (BLANK, POSITIVE, NEGATIVE, UNCERTAIN):
            raise ValueError(f"labels[{i}] ({OBSERVATIONS[i]}) = {code!r}; codes are 0..3")
    present = [i for i in OPACITY_CHILDREN if labels[i] in (POSITIVE, UNCERTAIN)]
    if present and labels[OPACITY] != POSITIVE:
        raise ValueError(f"labels: {OBSERVATIONS[present[0]]} is present but lung opacity is "
                         f"{labels[OPACITY]}, expected {POSITIVE} (hierarchy)")
    findings = [i for i in VISIBLE if i != DEVICES and labels[i] in (POSITIVE, UNCERTAIN)]
    expected = BLANK if findings else POSITIVE
    if labels[NO_FINDING] != expected:
        why = f"{OBSERVATIONS[findings[0]]} is present" if findings else "nothing is present"
        raise ValueError(f"labels: no finding = {labels[NO_FINDING]} but {why}; "
                         f"expected {expected}")


def sample_present(rng: np.random.Generator, skew: LabelSkew) -> set[int]:
    """Which observations are present in one study (before hedging and negation)."""
    present: set[int] = set()
    for name in SITUATION_NAMES:  # fixed order: the draw sequence is part of the benchmark
        p = skew.situations.get(name, 0.0)
        active = rng.random() < p
        probs = SITUATIONS[name]
        draws = rng.random(len(probs))
        if active:
            present.update(obs for (obs, q), u in zip(probs.items(), draws, strict=True)
                           if u < q)
    background = rng.random(len(VISIBLE)) < skew.background
    present.update(int(i) for i in np.flatnonzero(background))
    return present


def sample_labels(rng: np.random.Generator, skew: LabelSkew,
                  negative_mention: Mapping[int, float]) -> list[int]:
    """One study's 14 codes: situations -> present set -> hedging -> hierarchy -> negations.

    negative_mention[obs] is how likely the center's reports say obs is absent (style habit).
    """
    present = sample_present(rng, skew)
    labels = [BLANK] * NUM_OBSERVATIONS
    hedge = rng.random(NUM_OBSERVATIONS) < skew.uncertain_rate
    for i in sorted(present):
        labels[i] = UNCERTAIN if (hedge[i] and i in HEDGEABLE) else POSITIVE
    if any(labels[i] != BLANK for i in OPACITY_CHILDREN):
        labels[OPACITY] = POSITIVE
    mention = rng.random(NUM_OBSERVATIONS)
    for i in VISIBLE:
        if labels[i] == BLANK and mention[i] < negative_mention.get(i, 0.0):
            labels[i] = NEGATIVE
    findings = any(labels[i] in (POSITIVE, UNCERTAIN) for i in VISIBLE if i != DEVICES)
    labels[NO_FINDING] = BLANK if findings else POSITIVE
    return labels


def sample_details(rng: np.random.Generator, labels: Sequence[int]) -> FindingDetails:
    """Side, zone, severity and device kinds for every present finding (uniform, seeded)."""
    side: dict[int, str] = {}
    zone: dict[int, str] = {}
    severity: dict[int, int] = {}
    for i in VISIBLE:
        # One fixed-size draw per observation keeps the stream aligned whatever is present.
        u_side, u_zone, u_sev = rng.random(3)
        if labels[i] not in (POSITIVE, UNCERTAIN):
            continue
        if i in BILATERAL_OK and u_side < 0.35:
            side[i] = "bilateral"
        else:
            side[i] = "left" if u_side < 0.675 else "right"
        zone[i] = "upper" if u_zone < 0.3 else "lower"
        severity[i] = 0 if u_sev < 0.5 else (1 if u_sev < 0.85 else 2)
    if EDEMA in side:  # edema is a bilateral process on a radiograph
        side[EDEMA] = "bilateral"
    if PTX in zone:  # a pneumothorax collects at the apex of an upright patient
        zone[PTX] = "upper"
    for i in (ATELECT, EFFUSION):  # both gather at the lung bases
        if i in zone:
            zone[i] = "lower"
    kinds = rng.random(len(DEVICE_KINDS)) < np.array([0.6, 0.6, 0.3, 0.3])
    devices: tuple[str, ...] = ()
    if labels[DEVICES] in (POSITIVE, UNCERTAIN):
        devices = tuple(k for k, on in zip(DEVICE_KINDS, kinds, strict=True) if on)
        if not devices:
            devices = (DEVICE_KINDS[int(rng.integers(len(DEVICE_KINDS)))],)
    return FindingDetails(side=side, zone=zone, severity=severity, devices=devices)


def positive_rates(label_rows: Sequence[Sequence[int]]) -> dict[str, float]:
    """Fraction of studies where each observation is positive."""
    arr = np.asarray(label_rows, dtype=np.int8).reshape(-1, NUM_OBSERVATIONS)
    rates = (arr == POSITIVE).mean(axis=0) if len(arr) else np.zeros(NUM_OBSERVATIONS)
    return {name: float(r) for name, r in zip(OBSERVATIONS, rates, strict=True)}
