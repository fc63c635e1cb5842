"""Typed experiment configuration.

One `ExperimentConfig` made of small dataclasses (data, model, train, federation, resources,
tracking). Every default is written once, here. Presets live in `fedmrg/configs/*.yaml` and only
override; `--set section.key=value` overrides on top. An unknown key, a wrong type or an
out-of-range value raises `ConfigError` naming the key and what is allowed.

Field metadata: `help` (shown by `fedmrg config --help-keys`), `choices`, `min`, `max`. A key
whose type is a `StrEnum` of `fedmrg.choices` accepts exactly that enum's values and holds the
member (which equals its value); `to_dict`/`flat` give plain values.

Rules (docs/operations.md, "Configuration"):
- Every section is a frozen `Section` dataclass that validates itself in `__post_init__`: a bad
  value raises `ConfigError` when the object is built (`ModelConfig(lm_heads=0)` included), and
  `ExperimentConfig` adds the constraints between sections (`_validate_cross`).
- Nothing changes a config after it is built: a key cannot be assigned (FrozenInstanceError),
  and lists/dicts in it are never changed in place. A changed copy is `dataclasses.replace`
  (validated again) or `replace_keys(cfg, {"section.key": value})`.
- A run's config is resolved once, before anything starts (`Experiment.fit`: absolute paths,
  then the strategy's implied keys, then the run name); everything after reads that object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from fedmrg.choices import (
    AggregationMethod,
    DataSource,
    Device,
    LMDtype,
    LMVocabulary,
    NormAction,
    OnBadRow,
    PrivacyMode,
    Quantization,
    ServerOptimizer,
    WireDtype,
    choice_values,
    plain,
)
from fedmrg.fl.strategies import strategy_names  # reads names only: no torch, no cycle

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


def _f(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
       max: float | None = None) -> Any:
    """A dataclass field with help text and validation bounds."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


class Section:
    """Base of every config section (a `@dataclass(frozen=True)`): `__post_init__` checks each
    key against its type and metadata, coerces it where lossless (int -> float, a choice's
    value -> its member, a mapping -> its section), then `check` the constraints between the
    section's keys. The key named in an error is its full `section.key`."""

    def __post_init__(self) -> None:
        prefix = _section_prefixes().get(type(self), "")
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key, value, tp = prefix + f.name, getattr(self, f.name), hints[f.name]
            if dataclasses.is_dataclass(tp):
                if isinstance(value, Mapping):  # e.g. a saved section read back from JSON
                    checked = _build(tp, dict(value), key + ".")
                elif isinstance(value, tp):
                    checked = value
                else:
                    raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            else:
                checked = _check_value(key, tp, value, dict(f.metadata))
            if checked is not value:
                object.__setattr__(self, f.name, checked)  # frozen: only while being built
        self.check()

    def check(self) -> None:
        """Constraints between this section's keys; raise `ConfigError` naming them."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class PhantomConfig(Section):
    """The embedded phantom multi-center benchmark (generated when missing)."""

    centers: int = _f(4, "number of training centers", min=1, max=26)
    studies_per_center: int = _f(300, "studies per center (all splits)", min=10)
    image_size: int = _f(64, "base image side in pixels (centers rescale around it)", min=32,
                         max=1024)
    heldout_center: bool = _f(True, "also generate an unseen-style center 'heldout'")
    seed: int = _f(0, "generator seed (same seed, byte-identical shards)", min=0)


@dataclass(frozen=True)
class DataConfig(Section):
    root: str = _f("data/phantom-v1", "dataset root (<root>/center=<id>/, manifest.json)")
    source: DataSource = _f(DataSource.PHANTOM, "where the dataset comes from when `root` is "
                                                "missing")
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    centers: list[str] = _f([], "centers that take part (empty: every center in the manifest "
                                 "except 'heldout')")
    image_size: int = _f(64, "side the stream resizes images to", min=16, max=1024)
    max_views: int = _f(2, "views per study fed to the encoder (extra dropped, missing padded)",
                        min=1, max=8)
    max_report_tokens: int = _f(160, "report tokens kept, <s> and </s> included (longer "
                                "reports are truncated)", min=8)
    batch_size: int = _f(16, "training batch size per client", min=1)
    augment: bool = _f(True, "train-time augmentation (random crop/shift, contrast jitter)")
    on_error: OnBadRow = _f(OnBadRow.RAISE, "bad rows: 'raise' names file and row, 'skip' skips "
                                            "and counts")
    cache_decoded: bool | None = _f(None, "keep decoded pixels in the object store across "
                                          "epochs (null: when they fit in 512 MiB)")
    stream_cpus_per_task: float = _f(0.25, "logical CPUs each Ray Data task of a stream asks "
                                           "for (small, so client actors cannot starve it)",
                                     min=0)
    stream_max_tasks: int = _f(2, "Ray Data tasks of one stream running at once", min=1)

    def check(self) -> None:
        if self.source == DataSource.PHANTOM and self.centers:
            n = self.phantom.centers
            known = {chr(ord("a") + i) for i in range(n)}
            if self.phantom.heldout_center:
                known.add("heldout")
            bad = [c for c in self.centers if c not in known]
            if bad:
                raise ConfigError(f"data.centers: unknown center {bad[0]!r}; the phantom "
                                  f"benchmark has {sorted(known)}")


@dataclass(frozen=True)
class LossConfig(Section):
    """Loss weights; 0 switches a term off."""

    lm_generic: float = _f(1.0, "LM loss of the generic-adapter path", min=0)
    lm_personal: float = _f(1.0, "LM loss of the generic+specialized path", min=0)
    mutual: float = _f(0.5, "dual-adapter mutual boosting (two-way KL) weight", min=0)
    mutual_temperature: float = _f(2.0, "KL temperature", min=0.05)
    diagnosis: float = _f(1.0, "diagnosis classification loss weight", min=0)
    diagnosis_logit_adjust_tau: float = _f(1.0, "logit adjustment strength for the diagnosis "
                                                "loss (0: plain CE)", min=0)
    diagnosis_prior_smoothing: float = _f(1.0, "Laplace smoothing of the label prior counts",
                                          min=1e-6)
    contrastive_global: float = _f(0.1, "global head: supervised contrastive vs prototypes",
                                   min=0)
    contrastive_local: float = _f(0.1, "local head: client-aware contrastive", min=0)
    contrastive_temperature: float = _f(0.1, "contrastive temperature", min=0.01)
    local_positive_jaccard: float = _f(0.5, "local head: min Jaccard of positive findings for "
                                            "a positive pair (1.0: exact pattern)", min=1e-6,
                                       max=1.0)


@dataclass(frozen=True)
class ModelConfig(Section):
    encoder: str = _f("resnet10t", "timm model name of the vision encoder")
    encoder_kwargs: dict = _f({}, "extra kwargs for timm.create_model (e.g. widths)")
    pretrained: bool = _f(False, "load pretrained encoder weights (local cache or hub)")
    encoder_checkpoint: str = _f("", "a local timm checkpoint file (.safetensors, .pth, .bin) "
                                     "with the encoder's pretrained weights (empty: none)")
    in_chans: int = _f(1, "image channels fed to the encoder", choices=(1, 3))
    freeze_encoder: bool = _f(False, "freeze the encoder (paper scale: true)")
    local_batchnorm: bool = _f(True, "keep a trained encoder's BatchNorm layers (weights and "
                                     "running statistics) private to each center (FedBN)")
    encoder_lora_rank: int = _f(0, "LoRA rank on a frozen encoder (0: none)", min=0)
    visual_tokens: int = _f(4, "visual tokens the projector produces", min=1, max=256)
    lm: str = _f("builtin:tiny-llama", "causal LM: 'builtin:tiny-llama', an HF id or a path")
    lm_dtype: LMDtype = _f(LMDtype.FLOAT32, "dtype of the frozen base LM's weights (bfloat16 "
                                            "halves its memory; the adapters train in float32)")
    lm_quantization: Quantization = _f(Quantization.NONE, "load the frozen base LM quantized "
                                                          "with bitsandbytes (QLoRA; CUDA only, "
                                                          "`pip install bitsandbytes`)")
    gradient_checkpointing: bool = _f(False, "recompute the LM's activations in the backward "
                                             "pass (less memory, ~30% more time)")
    lm_cache: str = _f("~/.cache/fedmrg/lm", "where the builtin base LM is cached")
    lm_hidden_size: int = _f(128, "builtin LM hidden size", min=16)
    lm_layers: int = _f(2, "builtin LM layers", min=1)
    lm_heads: int = _f(4, "builtin LM attention heads", min=1)
    lm_vocab_size: int = _f(1024, "builtin LM tokenizer vocabulary", min=64)
    lm_vocabulary: LMVocabulary = _f(LMVocabulary.PHANTOM, "builtin LM words and warm-up text: "
                                     "'phantom' (the phantom benchmark's), or 'radiology' for "
                                     "real reports (a public radiology word list, word pieces, "
                                     "a phrasebook; needs lm_vocab_size >= 1700, 4096 "
                                     "also holds all its word pieces)")
    lm_warmup_steps: int = _f(1000, "builtin LM warm-up steps on the neutral corpus", min=0)
    lora_rank: int = _f(8, "rank of the generic and specialized decoder adapters", min=1)
    lora_alpha: float = _f(16.0, "LoRA alpha", min=0)
    lora_dropout: float = _f(0.0, "LoRA dropout", min=0, max=1)
    # benchmarks/centralized.py's sweep preferred attention+MLP, rank 16, lr 5e-3 on pooled
    # data; in the default federated run the same values made the generic model worse
    # (BLEU-4 0.054 -> 0.008), so the federated defaults stay attention-only, rank 8, 2e-3.
    lora_targets: list[str] = _f([], "decoder modules that get the adapters ([]: the "
                                     "attention projections of the LM's architecture, "
                                     "fedmrg.model.lora_targets)")
    specialized_adapter: bool = _f(True, "train a private specialized adapter")
    diagnosis_prompts: bool = _f(True, "prepend the diagnosis prompt to the visual tokens")
    prompt_teacher_forcing: float = _f(1.0, "probability of ground-truth labels as the prompt "
                                            "during training", min=0, max=1)
    projection_dim: int = _f(64, "contrastive projection head output", min=4)
    losses: LossConfig = field(default_factory=LossConfig)

    def check(self) -> None:
        if self.lm_hidden_size % self.lm_heads:
            raise ConfigError(
                f"model.lm_hidden_size ({self.lm_hidden_size}) must be divisible by "
                f"model.lm_heads ({self.lm_heads})"
            )


@dataclass(frozen=True)
class TrainConfig(Section):
    """Local training (one client round, or a whole centralized/local baseline)."""

    lr: float = _f(2e-3, "AdamW learning rate", min=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = _f(10, "linear warm-up steps", min=0)
    grad_clip: float = _f(1.0, "gradient norm clip (0: off)", min=0)
    local_steps: int = _f(20, "optimizer steps per round per client", min=1)
    # Keeping them trained the from-scratch encoder and diagnosis head faster in the federated
    # default (diagnosis loss after 5 rounds of fedavg: 0.517 kept vs 0.592 reset): a reset
    # makes AdamW's next steps about lr * sign(grad) on every shared weight.
    reset_shared_moments: bool = _f(False, "forget the AdamW moments of the shared tensors "
                                           "each round when the global state is loaded")
    fedprox_mu: float = _f(0.01, "FedProx proximal weight mu (used by strategy fedprox only)",
                           min=0)


@dataclass(frozen=True)
class FederationConfig(Section):
    strategy: str = _f("fedmrg", "federated strategy (the registry, fedmrg.fl.strategies)",
                       choices=strategy_names())
    rounds: int = _f(10, "federated rounds", min=1)
    fraction: float = _f(1.0, "fraction of clients sampled per round", min=0, max=1)
    min_clients: int = _f(1, "replies needed to close a round", min=1)
    round_deadline_s: float = _f(0.0, "round deadline in seconds (0: wait for all)", min=0)
    eval_deadline_s: float = _f(0.0, "deadline in seconds for an evaluation's replies (0: wait "
                                     "for all; resources.progress_timeout_s still applies)",
                                min=0)
    aggregation: AggregationMethod = _f(AggregationMethod.EXACT, "LoRA aggregation")
    dense_update_rank: int = _f(8, "truncated-SVD rank of dense shared updates (0: dense)",
                                min=0)
    download_rank: int = _f(8, "rank of the low-rank round change of dense shared tensors sent "
                               "down to up-to-date clients (0: the full state every round)",
                            min=0)
    # The diagnosis head is small (112 KB at the default scale) and its prompts steer every
    # report: at rank 8, fedmrg's generic CE-F1 was 0.300 instead of 0.338 (mean of 3 seeds of
    # benchmarks/fl_mrg.py, docs/results.md), for 5% fewer bytes per run.
    whole_tensors: list[str] = _f(["diagnosis_head."],
                                  "name prefixes of dense shared tensors that travel whole, up "
                                  "and down, whatever the two ranks ([]: none)")
    wire_dtype: WireDtype = _f(WireDtype.FP32, "dtype of floating tensors in messages (bf16 "
                                               "halves the bytes; int8/nf4 quantize the "
                                               "clients' model updates blockwise, the rest "
                                               "fp32)")
    server_optimizer: ServerOptimizer = _f(ServerOptimizer.NONE, "server optimizer on the "
                                                                 "aggregated update")
    server_lr: float = _f(1.0, "server learning rate (1.0 with 'none' applies the mean update; "
                               "adam: try 0.01)", min=0)
    eval_every: int = _f(0, "evaluate every N rounds (0: only at the end)", min=0)
    max_update_norm: float = _f(0.0, "bound on a client update's L2 norm (0: no bound)", min=0)
    update_norm_action: NormAction = _f(NormAction.REJECT, "an update above max_update_norm is "
                                        "rejected or scaled down to it")
    round_retries: int = _f(2, "times a round with fewer than min_clients usable updates is "
                               "retried before the run stops with a checkpoint, and a "
                               "crashed evaluation call is asked again", min=0)


@dataclass(frozen=True)
class EvalConfig(Section):
    """Report generation and scoring at evaluation time."""

    num_beams: int = _f(1, "beam search width (1: greedy; beams made the small default LM "
                              "drop findings)", min=1)
    max_new_tokens: int = _f(160, "longest generated report in tokens", min=1)
    min_new_tokens: int = _f(0, "shortest generated report in tokens", min=0)
    repetition_penalty: float = _f(1.0, "HF generate repetition penalty (1.0: none)", min=1.0)
    # benchmarks/decoding.py on one default run's models: 4 removes repeated 4-grams (rep-4
    # 0.050 -> 0.000 generic, 0.075 -> 0.000 personalized) for CE-F1 macro -0.008 / -0.027
    # and BLEU-4 -0.008 / -0.006; 3 costs more (personalized CE-F1 -0.064).
    no_repeat_ngram_size: int = _f(4, "a generated report never repeats an n-gram of this many "
                                      "tokens (0: off)", min=0)
    batch_size: int = _f(64, "test studies decoded together: one batched greedy generate "
                             "call (Hugging Face, KV cache) per batch", min=1)
    calibrate_head: bool = _f(False, "personalization: each center sets its diagnosis head's "
                                     "positive threshold per observation to the best F1 on "
                                     "its own val split (fedmrg.eval.calibration)")
    head_tuning_steps: int = _f(0, "personalization: each center first tunes its own copy of "
                                   "the diagnosis head on its train split for this many steps, "
                                   "encoder frozen (fedmrg.model.head_tuning; 0: off); its "
                                   "saved model keeps that head for generate and serving",
                               min=0)
    samples: int = _f(5, "sample reports kept per center and view (MLflow table)", min=0)
    share_references: bool = _f(False, "ask for each sample's reference report and study id "
                                "with its generated report (report text then leaves the "
                                "center; a center's disclosure.yaml may refuse)")
    per_study: bool = _f(False, "ask each center for its test studies' scores one by one "
                         "(the CE labels of the generated and the reference report, BLEU "
                         "counts; no text) for paired bootstrap intervals; a center's "
                         "disclosure.yaml with share_references: false refuses")
    val_every: int = _f(2, "a cheap validation evaluation (greedy, `val_studies` val studies "
                           "per center) every N rounds, logged to MLflow as val/... (0: none)",
                        min=0)
    val_studies: int = _f(8, "val studies per center in a validation evaluation", min=1)


@dataclass(frozen=True)
class ResourcesConfig(Section):
    num_cpus_per_client: float = _f(0.5, "CPUs reserved per client actor", min=0)
    num_gpus_per_client: float = _f(0.0, "GPUs per client actor (fractional allowed)", min=0)
    clients_per_actor: int = _f(1, "clients one actor hosts and trains in turn (many simulated "
                                   "centers on one machine); >1 needs pin_centers false", min=1)
    pin_centers: bool = _f(False, "require custom resource center_<id> on a client's node")
    max_restarts: int = _f(2, "client actor restarts after a crash", min=0)
    gpus_per_center: int = _f(0, "GPUs of one center trained together: > 1 makes the client "
                                 "actor train each round's local steps as a Ray Train "
                                 "TorchTrainer run with one worker per GPU (0 or 1: the "
                                 "actor trains itself on num_gpus_per_client)", min=0)
    workers_per_center: int = _f(1, "Ray Train workers of a center without GPUs (gloo): > 1 "
                                    "trains its local steps data-parallel on that many CPU "
                                    "workers of num_cpus_per_client each", min=1)
    ray_address: str = _f("", "Ray cluster address: host:port, ray://..., 'auto' (the cluster "
                              "`ray start` left running on this machine) or 'local' (empty: "
                              "RAY_ADDRESS, else a private local cluster)")
    autoscaling: bool | None = _f(None, "the cluster adds nodes for work that waits: a run "
                                        "bigger than its current nodes is warned about, not "
                                        "refused (null: detected, true on the head node of a "
                                        "`ray up` cluster with workers to add)")
    progress_timeout_s: float = _f(600.0, "fail the run, naming Ray's pending resource demands, "
                                          "when a wait for client actors or replies sees "
                                          "nothing for this long (0: wait forever)", min=0)

    def check(self) -> None:
        if self.clients_per_actor > 1 and self.pin_centers:
            raise ConfigError(
                f"resources.clients_per_actor ({self.clients_per_actor}) must be 1 when "
                f"resources.pin_centers is true: each center's client runs on its own data's "
                f"node")
        if self.gpus_per_center > 1 and self.workers_per_center > 1:
            raise ConfigError(
                f"resources.workers_per_center={self.workers_per_center} with resources."
                f"gpus_per_center={self.gpus_per_center}: a center with GPUs has one Ray Train "
                f"worker per GPU; set workers_per_center only for CPU-only centers")


@dataclass(frozen=True)
class TrackingConfig(Section):
    tracking_uri: str = _f("sqlite:///mlflow.db", "MLflow tracking URI")
    artifact_location: str = _f("mlartifacts", "artifact folder for a new experiment")
    experiment: str = _f("fedmrg", "MLflow experiment name")
    run_name: str = _f("", "run name (empty: generated); reusing one resumes it")
    storage_path: str = _f("runs", "checkpoints and outputs (shared storage on a cluster)")
    log_models: bool = _f(True, "at the end of a run, log the generic model and each center's "
                                "personalized model as MLflow pyfunc models (docs/models.md)")
    register_model: str = _f("", "register the generic model in the MLflow Model Registry under "
                                 "this name, a new version per run (empty: not registered)")
    # 2: the newest and one to fall back to when it is corrupt (--checkpoint-fallback); each
    # client keeps its state of those rounds (68 MB a center at the default scale), plus
    # the round in progress while it runs
    checkpoint_keep: int = _f(2, "coordinator checkpoints kept per run (the last K rounds; "
                                 "each client keeps what resuming from them needs)",
                              min=1)


@dataclass(frozen=True)
class PrivacyConfig(Section):
    """What the coordinator may learn (docs/privacy.md). Everything off by default."""

    mode: PrivacyMode = _f(PrivacyMode.NONE, "client-level differential privacy: 'central' "
                           "(the coordinator clips each update and adds noise to their mean), "
                           "'local' (each client clips and noises what it sends) or 'none'")
    # about the median update norm of a default (non-private) ffa_lora run, 22.0 over 40
    # client updates (16.7 to 24.5), as DP-FedAvg practice suggests (docs/privacy.md)
    clip_norm: float = _f(22.0, "L2 bound on one client's update (the update norm over "
                                "everything it sends)", min=1e-12)
    noise_multiplier: float = _f(1.0, "Gaussian noise std as a multiple of clip_norm", min=0)
    delta: float = _f(1e-5, "delta of the (epsilon, delta) guarantee reported per round",
                      min=1e-15, max=0.1)
    target_epsilon: float = _f(0.0, "stop the run before a round would take epsilon past "
                                    "this (0: no budget)", min=0)
    noise_seed: int | None = _f(None, "seed of the DP noise (null: OS randomness, as a "
                                      "deployment needs; an integer: reproducible experiments "
                                      "only, whoever knows it can remove the noise)", min=0)
    secure_aggregation: bool = _f(False, "pairwise-masked secure aggregation: the "
                                         "coordinator learns only the weighted sum of updates")
    secagg_fraction_bits: int = _f(24, "fixed-point fraction bits of masked values (modulus "
                                       "2^64)", min=8, max=40)


@dataclass(frozen=True)
class ExperimentConfig(Section):
    seed: int = _f(0, "seed for sampling, initialization and aggregation order", min=0)
    device: Device = _f(Device.AUTO, "torch device")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def check(self) -> None:
        _validate_cross(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON types (choices as their values)."""
        return plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """`section.key` -> value, e.g. for MLflow params."""
        return flatten(self)


# --------------------------------------------------------------------------- building


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@functools.cache
def _section_prefixes() -> dict[type, str]:
    """Section class -> its `section.` prefix in ExperimentConfig (`data.phantom.`)."""
    out: dict[type, str] = {ExperimentConfig: ""}

    def walk(cls: type, prefix: str) -> None:
        for name, tp in _hints(cls).items():
            if dataclasses.is_dataclass(tp):
                out[tp] = f"{prefix}{name}."
                walk(tp, out[tp])

    walk(ExperimentConfig, "")
    return out


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A config section -> {`section.key`: value}; dict-valued keys stay whole."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = plain(value)
    return out


def _check_value(key: str, tp: Any, value: Any, meta: dict) -> Any:
    """Coerce `value` to `tp` where lossless (int -> float), else raise ConfigError."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
        origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            value = tp(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of "
                              f"{choice_values(tp)}") from None
    elif origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    elif origin is list or tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        if item is not Any:
            value = [_check_value(f"{key}[{i}]", item, v, {}) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value = dict(value)  # the config's own copy
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(choices)}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is above the maximum {hi}")
    return value


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    allowed = sorted(f.name for f in dataclasses.fields(cls))
    return ConfigError(f"unknown key {prefix}{name!s}; allowed keys in "
                       f"{prefix.rstrip('.') or 'the top level'}: {allowed}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """A section from a mapping (sub-sections from nested mappings); the section validates
    the values itself (`Section.__post_init__`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise _unknown_key(cls, unknown[0], prefix)
    kwargs = {name: _build(hints[name], value, f"{prefix}{name}.")
              if dataclasses.is_dataclass(hints[name]) else value
              for name, value in data.items()}
    return cls(**kwargs)


def replace_keys(cfg: Any, changes: Mapping[str, Any], prefix: str = "") -> Any:
    """A copy of `cfg` (a section) with every `section.key` of `changes` set to its value,
    validated like a loaded config; an unknown key is a `ConfigError` naming it."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise _unknown_key(type(cfg), head, prefix)
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub_changes in nested.items():
        section = getattr(cfg, head)
        if not dataclasses.is_dataclass(section):
            raise ConfigError(f"{prefix}{head} is a key, not a section: "
                              f"{prefix}{head}.{next(iter(sub_changes))} does not exist")
        direct[head] = replace_keys(section, sub_changes, f"{prefix}{head}.")
    return dataclasses.replace(cfg, **direct) if direct else cfg


def _validate_cross(cfg: ExperimentConfig) -> None:
    """Constraints between keys of different sections (those within one section are its
    `check`)."""
    m, r = cfg.model, cfg.resources
    if m.lm_quantization != Quantization.NONE and (
            cfg.device == Device.CPU
            or (cfg.device == Device.AUTO and r.num_gpus_per_client == 0)):
        raise ConfigError(
            f"model.lm_quantization={m.lm_quantization!r} needs CUDA (bitsandbytes) but the "
            f"clients run on the CPU (device={cfg.device!r}, resources.num_gpus_per_client="
            f"{r.num_gpus_per_client:g}): give them GPUs, or use model.lm_dtype=bfloat16")


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """A validated config from nested mappings (unset keys: the defaults)."""
    return _build(ExperimentConfig, data, "")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(name_or_path: str) -> dict[str, Any]:
    """A preset name (`default`, `paper`) or a path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {name_or_path!r}; presets: {preset_names()} "
                              f"(or give a path to a .yaml file)")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
        check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), str(path))
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def check_unique_keys(node: yaml.Node | None, where: str, prefix: str = "") -> None:
    """Raise `ConfigError` for a key given twice in one YAML mapping (PyYAML keeps the last one
    silently): names the dotted key, the file and both lines."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            check_unique_keys(item, where, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
        if key is not None and key != "<<":  # "<<" is a merge key, not a setting
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{where}, line {line}: duplicate key {prefix + key!r} (first "
                                  f"at line {seen[key]}); give each key once")
            seen[key] = line
        check_unique_keys(value_node, where, f"{prefix}{key}." if key is not None else prefix)


def parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: dict[str, Any] = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def load_config(config: str | None = "default", overrides: typing.Sequence[str] = ()) -> (
        ExperimentConfig):
    """Preset or YAML file, then `--set` overrides, validated."""
    data = read_yaml(config) if config else {}
    for item in overrides:
        data = deep_merge(data, parse_override(item))
    return config_from_dict(data)


def describe_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key, for `fedmrg config --keys`."""
    rows = []
    hints = get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows += describe_keys(tp, key + ".")
            continue
        meta = f.metadata
        extra = ""
        if meta.get("choices"):
            extra = f" {list(meta['choices'])}"
        elif isinstance(tp, type) and issubclass(tp, Enum):
            extra = f" {choice_values(tp)}"
        rows.append((key, repr(plain(getattr(default, f.name))),
                     f"{meta.get('help', '')}{extra}"))
    return rows
