"""The closed choice lists of fedmrg, as `StrEnum`s that the config and the code share.

A config key with one of these types accepts exactly the enum's values (`fedmrg.config`
names them in its error); the code that branches on a choice compares against the member
(`method is AggregationMethod.EXACT`), so a value cannot be misspelt in one place only.
Members are `str`: they equal, hash, print, `repr` (so `{key}={value!r}` in an error message
reads `'cpu'`), JSON- and MLflow-log as their value.

Strategy names are not here: they are whatever `fedmrg.fl.strategies` registers.
No imports beyond the standard library (the config imports this without torch).
"""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10 has no StrEnum; the same contract by hand
    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


class Choice(StrEnum):
    """A closed choice list; a member reads as its value everywhere, `repr` included."""

    def __repr__(self) -> str:
        return repr(self.value)


class View(Choice):
    """An evaluation view: the generic model on every center, or each center's own model."""

    GENERALIZATION = "generalization"
    PERSONALIZATION = "personalization"


class AggregationMethod(Choice):
    """How the server combines the clients' LoRA factors (`fedmrg.fl.lowrank`)."""

    EXACT = "exact"  # best rank-r approximation of the weighted sum of B_k A_k
    FEDAVG = "fedavg"  # mean of the A's and of the B's separately (inexact)
    STACK = "stack"  # FLoRA concatenation: exact, rank = sum of the clients' ranks


class NormAction(Choice):
    """What happens to a client update above `federation.max_update_norm`."""

    REJECT = "reject"
    CLIP = "clip"


class LMDtype(Choice):
    """The dtype of the frozen base LM's weights (`model.lm_dtype`)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class LMVocabulary(Choice):
    """The builtin LM's vocabulary and warm-up text (`model.lm_vocabulary`)."""

    PHANTOM = "phantom"  # the phantom's words and reports (the CPU default)
    RADIOLOGY = "radiology"  # + a public radiology word list, word pieces and a phrasebook


class Quantization(Choice):
    """How the frozen base LM is quantized with bitsandbytes (`model.lm_quantization`)."""

    NONE = "none"
    FOUR_BIT = "4bit"
    EIGHT_BIT = "8bit"


class WireDtype(Choice):
    """The dtype floating tensors travel in (`fedmrg.fl.wire`)."""

    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"  # model updates blockwise int8 (fedmrg.fl.quantize), the rest fp32
    NF4 = "nf4"  # model updates blockwise 4-bit NormalFloat, the rest fp32


class ServerOptimizer(Choice):
    """The server optimizer applied to the aggregated update (`fedmrg.fl.server_optim`)."""

    NONE = "none"
    ADAM = "adam"


class DataSource(Choice):
    """Where the dataset comes from when `data.root` is missing."""

    PHANTOM = "phantom"
    PATH = "path"


class OnBadRow(Choice):
    """What a stream does with a row it cannot read."""

    RAISE = "raise"
    SKIP = "skip"


class PrivacyMode(Choice):
    """Client-level differential privacy (`fedmrg.privacy`, docs/privacy.md)."""

    NONE = "none"
    CENTRAL = "central"  # the coordinator clips every update and noises their sum
    LOCAL = "local"  # each client clips and noises what it sends


class Device(Choice):
    """The torch device a client trains on (`auto`: cuda when there is one)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def choice_values(choices: type[Enum]) -> list[str]:
    """The allowed values of a choice list, for error messages: `['exact', 'fedavg', ...]`."""
    return [member.value for member in choices]


def plain(value: object) -> object:
    """`value` with every enum member (also inside lists and dicts) replaced by its value:
    what YAML's safe dumper and equality with a file's contents need."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
