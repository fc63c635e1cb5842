"""A federated client as a plain class: one center's model, data stream and local training.

    client = FederatedClient(cfg, "a", dataset_root=root, seed=cfg.seed)
    update = client.fit(plan)                     # RoundPlan -> ClientUpdate
    reply = client.evaluate("test", personalized=True, global_state=state)

`cfg` must be the strategy's configured config (`make_strategy(cfg).cfg`; another is refused):
it decides the model's switches (specialized adapter, loss terms) and the update's form
(dense_update_rank, wire_dtype). Everything is built once and stays resident across rounds: the
frozen base LM (`load_base_lm`) wrapped into an `MRGModel` from `seed` (identical initial
weights in every client, so the run's initial global state is any client's shared state), the
train stream, the `LocalTrainer` (its AdamW state survives rounds), the `ErrorFeedback`
residuals, and the stream position (epochs continue across rounds). The Ray actor wrapper is
`fedmrg.fl.actors.ClientHost`; no Ray here except what the Ray Data stream does.

The strategy's client half (`self.strategy`, `fedmrg.fl.strategies.base.ClientStrategy`) decides
everything strategy-specific; this class knows no strategy by name. One round (`fit`):
1. load the plan's global state (`load_global_state`, the client half's way: e.g. FLoRA's
   stacked factors merged into the base weights, FedSA-LoRA's own B factors kept); with
   `train.reset_shared_moments` forget the AdamW moments of the shared tensors (by default they
   are kept: the client's own gradient statistics still describe the nearby global model);
2. train `plan.local_steps` steps on the next batches of the stream, with the client half's
   extra terms (`training_terms`: e.g. FedProx's proximal term, fedmrg's prototypes and global
   log prior; by default the center's own label prior);
3. send: the client half's model update (`model_update`: by default the generic LoRA factors as
   trained, every other shared tensor's round update (trained - global) through error feedback
   at `dense_update_rank`, dense when 0 and for the tensors under a `whole_tensors` prefix),
   the sample count (the center's train rows: the aggregation weight), scalar metrics, and the
   client half's named `statistics` (fedmrg: diagnosis prototypes of this round's batches,
   label-state counts of the train split). Private tensors are never read into a message.
A plan without a global state (`local`) trains the client's own model and sends no tensors.

Own checkpoints (`fedmrg.fl.checkpoint`): with a checkpoint folder (`checkpoint_dir`, by default
`<tracking.storage_path>/<tracking.run_name>/centers/<center>/checkpoints` when the config names
its run) the client writes its `state_dict()` after every fit, where it runs, never sent:
private adapter and head, their optimizer state, teacher-forcing generator (with the trainer's step,
which seeds every step's dropout and augmentation draws), error-feedback residuals and stream
position; of the shared tensors only those the client half makes the client's own
(`owned_shared`: all of them under `local`, the B factors under `fedsa_lora`; the others are
the server's: its checkpoint holds them). Atomic; kept: the newest round
and, for each round the coordinator may resume from (its last `tracking.checkpoint_keep`), the
newest at or before it (`fedmrg.fl.checkpoint.client_rounds_to_keep`: with every client in
every round, one round more than the coordinator, since a crash may leave a client one ahead).
It restores the newest one when built, so an actor restarted by Ray rejoins with its private
state. The coordinator says which round it continues from through the plan's round id: a plan
for a round at or below the round of the client's state (a resume from an earlier checkpoint
than this client's newest, written before the crash) makes the client go back to its newest
checkpoint before that round, or to the state as built when it had not trained before.

Evaluation on another center's data (generalization on the held-out center): the client asked
to evaluate builds that center's test stream itself, lazily (`dataset_center`). In simulation
the coordinator asks a participating client (the first by id); in a deployment the held-out
center would run its own evaluator client, which the pool can route to.

Centralized baseline: `centers_for_data` pools the train (and default test) splits of several
centers into one stream, interleaving their batches in a seeded order per epoch, every batch
tagged with its `center` (the client-aware contrastive loss reads it).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from fedmrg.choices import Device, View
from fedmrg.config import ExperimentConfig
from fedmrg.data.schema import NUM_OBSERVATIONS, NUM_STATES
from fedmrg.data.shards import DatasetError, center_files, read_manifest, verify_center_files
from fedmrg.data.stream import CenterStream
from fedmrg.data.transforms import report_lengths
from fedmrg.eval.evaluator import evaluate_model, first_studies, generation_kwargs
from fedmrg.fl.broadcast import StateDelta, apply_delta
from fedmrg.fl.checkpoint import (
    CheckpointError,
    client_checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    resumable_rounds,
    run_fingerprint,
    verify_checkpoint,
    write_checkpoint,
)
from fedmrg.fl.lowrank import ErrorFeedback
from fedmrg.fl.messages import ClientUpdate, EvalReply, RoundPlan
from fedmrg.fl.placement import train_workers
from fedmrg.fl.strategies import make_client_strategy
from fedmrg.fl.wire import from_wire, to_wire
from fedmrg.model.base_lm import load_base_lm
from fedmrg.model.mrg import MRGModel
from fedmrg.model.params import (
    counter_buffers,
    get_private_state,
    get_shared_state,
    load_private_state,
    load_shared_state,
)
from fedmrg.model.trainer import LocalTrainer, TrainerError
from fedmrg.privacy.client import SecAggParticipant
from fedmrg.privacy.disclosure import disclose_samples, effective_disclosure, read_policy

log = logging.getLogger(__name__)


class ClientError(ValueError):
    """A client cannot build or run; the message names the center and what is wrong."""


def derive_seed(seed: int, *keys: str) -> int:
    """A 32-bit seed from the run seed and names (center, purpose), stable across processes."""
    words = [seed, *(zlib.crc32(k.encode()) for k in keys)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def train_label_counts(root: str, centers: Sequence[str]) -> Tensor:
    """(14, 4) int64 counts of each label state over the train splits of `centers`, read from
    the parquet `split` and `labels` columns only (no image is decoded)."""
    manifest = read_manifest(root)
    counts = np.zeros((NUM_OBSERVATIONS, NUM_STATES), dtype=np.int64)
    for center in centers:
        for path in center_files(root, center, manifest):
            table = pq.read_table(path, columns=["split", "labels"])
            splits = table.column("split").to_pylist()
            labels = table.column("labels").to_pylist()
            for row, (split, codes) in enumerate(zip(splits, labels, strict=True)):
                if split != "train":
                    continue
                if codes is None or len(codes) != NUM_OBSERVATIONS:
                    raise DatasetError(f"{path}, row {row}: labels {codes!r} are not "
                                       f"{NUM_OBSERVATIONS} codes")
                for obs, code in enumerate(codes):
                    if not 0 <= code < NUM_STATES:
                        raise DatasetError(f"{path}, row {row}: label code {code} of "
                                           f"observation {obs} is not in [0, {NUM_STATES})")
                    counts[obs, code] += 1
    return torch.from_numpy(counts)


def train_report_truncation(root: str, centers: Sequence[str], tokenizer: Any,
                            max_tokens: int, *, client: str | None = None) -> dict[str, int]:
    """How the train reports of `centers` fit `data.max_report_tokens` (`max_tokens`) with
    `tokenizer`: {"truncated": reports longer (cut in training), "reports", "longest": the
    longest in tokens}, read from the parquet `split` and `report` columns only. With
    `client`, truncated reports are also warned in one line naming it, the count and limit."""
    manifest = read_manifest(root)
    lengths: list[int] = []
    for center in centers:
        for path in center_files(root, center, manifest):
            table = pq.read_table(path, columns=["split", "report"])
            reports = [r for sp, r in zip(table.column("split").to_pylist(),
                                          table.column("report").to_pylist(), strict=True)
                       if sp == "train" and isinstance(r, str)]
            lengths += report_lengths(tokenizer, reports) if reports else []
    out = {"truncated": sum(n > max_tokens for n in lengths), "reports": len(lengths),
           "longest": max(lengths, default=0)}
    if client is not None and out["truncated"]:
        log.warning(truncation_warning(client, out, max_tokens))
    return out


def truncation_warning(client: str, truncation: Mapping[str, int], max_tokens: int) -> str:
    """The one line that says a client's train reports are cut (`train_report_truncation`)."""
    return (f"center {client!r}: {truncation['truncated']} of {truncation['reports']} train "
            f"reports are longer than data.max_report_tokens={max_tokens} tokens (the longest "
            f"has {truncation['longest']}) and are truncated in training")


class FederatedClient:
    """One center (or the pooled data of several) with its resident model (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, center: str, *, dataset_root: str | None = None,
                 centers_for_data: list[str] | None = None, seed: int = 0,
                 generation: Mapping[str, Any] | None = None,
                 eval_samples: int | None = None,
                 checkpoint_dir: str | Path | None = None):
        self.cfg, self.center, self.seed = cfg, center, seed
        self.root = str(dataset_root or cfg.data.root)
        self.data_centers = list(centers_for_data) if centers_for_data else [center]
        ev = cfg.eval
        # evaluate_model's generation arguments: the config's, then explicit overrides
        self.generation = generation_kwargs(ev, **(generation or {}))
        self.eval_samples = ev.samples if eval_samples is None else eval_samples
        self.data_cfg = dataclasses.replace(cfg.data, root=self.root)
        # before anything is built: this client's files are the manifest's (sha256, rows,
        # schema; cached by size and mtime next to the data), else a DatasetError naming them
        self._verified: set[str] = set()
        self.verify_data(self.data_centers)

        device = _device(cfg.device)
        lm, tokenizer = load_base_lm(cfg.model, device=device)  # a quantized LM loads there
        self.model = MRGModel.from_config(cfg.model, lm, tokenizer, seed=seed,
                                          max_report_tokens=cfg.data.max_report_tokens)
        self.model.to(device)
        # the strategy's client half (`fl.strategies`): what to load, train, keep and send
        self.strategy = make_client_strategy(cfg)
        self.strategy.prepare_model(self.model)
        self.trainer = LocalTrainer(self.model, cfg.train, seed=derive_seed(seed, center, "train"))
        # > 1: each round's local steps run data parallel on Ray Train workers (fl/ddp.py)
        self.train_workers = train_workers(cfg.resources)
        self.error_feedback = ErrorFeedback()
        self.train_stream = self._stream(self.data_centers, "train")
        self.num_samples = int(self.train_stream.manifest_rows)
        # reports longer than data.max_report_tokens are cut in training: counted, warned
        # where the center runs, and reported with every update ("truncated_reports")
        self.truncation = train_report_truncation(self.root, self.data_centers,
                                                  self.model.tokenizer,
                                                  cfg.data.max_report_tokens, client=center)
        self._eval_streams: dict[tuple[str, str], CenterStream] = {}
        self._label_counts: Tensor | None = None
        self._secagg: SecAggParticipant | None = None  # secure aggregation, per round keys
        self.epoch, self.batch_in_epoch = 0, 0  # stream position, continues across rounds
        self._batches = self._batch_iterator()

        # Own checkpoints (module docstring): restored at once, so an actor restarted by Ray
        # or rebuilt on resume comes back with its private state.
        self.checkpoint_dir = (Path(checkpoint_dir) if checkpoint_dir is not None
                               else default_checkpoint_dir(cfg, center))
        self.state_round: int | None = None  # the round the state ends with (None: as built)
        # the downlink (`fl.broadcast`): the last synced global state received (training moves
        # the model away from it; a round's delta applies to it) and its version (None: none)
        self.state_version: int | None = None
        self._synced: dict[str, Tensor] | None = None
        self._initial_state: dict[str, Any] | None = None
        if self.checkpoint_dir is not None:
            self._fingerprint = run_fingerprint(cfg, self.root)
            self._initial_state = self.state_dict()  # to go back before the first checkpoint
            self.restore_latest_checkpoint()

    # ----------------------------------------------------------------- data

    def verify_data(self, centers: Sequence[str]) -> None:
        """Check each of `centers`' files against the dataset's manifest once
        (`fedmrg.data.shards.verify_center_files`); a mismatch is a `DatasetError` naming the
        file."""
        todo = [c for c in centers if c not in self._verified]
        if not todo:
            return
        manifest = read_manifest(self.root)
        for center in todo:
            verify_center_files(self.root, center, manifest)
            self._verified.add(center)

    def _stream(self, centers: Sequence[str], split: str, batch_size: int | None = None,
                **options: Any) -> CenterStream:
        """One center's stream, or (centralized) one stream over several centers' files with
        centers mixed inside shuffled batches: batches of a single center gave BatchNorm one
        acquisition at a time and trained worse (benchmarks/centralized.py). `batch_size`:
        other than `data.batch_size` (evaluation decodes `eval.batch_size` studies at once);
        `options`: `CenterStream` options (e.g. the train split without augmentation)."""
        if len(centers) == 1:
            which, seed = centers[0], derive_seed(self.seed, centers[0], "data")
        else:
            which, seed = list(centers), derive_seed(self.seed, self.center, "pool")
        data_cfg = self.data_cfg if batch_size is None else dataclasses.replace(
            self.data_cfg, batch_size=batch_size)
        return CenterStream.from_config(data_cfg, which, split, self.cfg.model.in_chans,
                                        tokenizer=self.model.tokenizer, seed=seed, **options)

    def _batch_iterator(self) -> Iterator[dict]:
        """Endless batches from (epoch, batch_in_epoch) on; the position is kept for
        checkpoints (a deterministic stream replays an epoch identically)."""
        skip = self.batch_in_epoch
        while True:
            seen = 0
            for i, batch in enumerate(self.train_stream.iter_batches(self.epoch)):
                seen += 1
                if i < skip:
                    continue
                self.batch_in_epoch = i + 1
                yield batch
            if seen == 0:
                raise TrainerError(f"client {self.center!r}: epoch {self.epoch} of the train "
                                   f"stream yielded no batch")
            self.epoch, self.batch_in_epoch, skip = self.epoch + 1, 0, 0

    def _restart_batches(self) -> None:
        """End the pass in progress (if any) and start the next one at the kept position."""
        self._batches.close()
        self._batches = self._batch_iterator()

    def label_counts(self) -> Tensor:
        """(14, 4) int64 label-state counts of the train split(s), computed once."""
        if self._label_counts is None:
            self._label_counts = train_label_counts(self.root, self.data_centers)
        return self._label_counts

    def eval_stream(self, dataset_center: str, split: str) -> CenterStream:
        key = (dataset_center, split)
        if key not in self._eval_streams:
            centers = self.data_centers if dataset_center == self.center else [dataset_center]
            self.verify_data(centers)  # e.g. the held-out center this client evaluates
            self._eval_streams[key] = self._stream(centers, split, self.cfg.eval.batch_size)
        return self._eval_streams[key]

    # ----------------------------------------------------------------- state

    def load_global_state(self, state: Mapping[str, Tensor]) -> None:
        """Load a global shared state the strategy's way (`ClientStrategy.load_global_state`)."""
        self.strategy.load_global_state(self, state)

    @property
    def synced_state(self) -> dict[str, Tensor] | None:
        """The last global state received (what this round's training started from)."""
        return self._synced

    def apply_state_delta(self, delta: StateDelta) -> None:
        """Bring the last synced state up to date with the round's low-rank delta
        (`fl.broadcast`) and load it; a client not at the delta's base version cannot, and
        says so (the coordinator then sends it the full state next round)."""
        if self._synced is None or self.state_version != delta.base_version:
            raise ClientError(f"client {self.center!r} holds shared state version "
                              f"{self.state_version}, the round's delta is against version "
                              f"{delta.base_version}: it needs the full state")
        self._synced = apply_delta(self._synced, delta)
        self.load_global_state(self._synced)
        self.state_version = delta.version

    def state_dict(self) -> dict[str, Any]:
        """The client's own state for a checkpoint kept with the client: private tensors, the
        shared tensors as they stand, trainer and error-feedback state, stream position."""
        counters = {n: b.detach().to("cpu", copy=True)
                    for n, b in counter_buffers(self.model).items()}
        return {"center": self.center, "private": get_private_state(self.model),
                "shared": get_shared_state(self.model), "counters": counters,
                "trainer": self.trainer.state_dict(),
                "error_feedback": self.error_feedback.state_dict(),
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("center") != self.center:
            raise ClientError(f"client {self.center!r}: checkpoint of center "
                              f"{state.get('center')!r}")
        load_private_state(self.model, state["private"])
        if "shared" in state:  # only the shared tensors the strategy makes the client's own
            load_shared_state(self.model, {**get_shared_state(self.model), **state["shared"]})
        counters = counter_buffers(self.model)
        with torch.no_grad():
            for name, value in state.get("counters", {}).items():  # absent: an older checkpoint
                if name in counters:
                    counters[name].copy_(value)
        self.trainer.load_state_dict(state["trainer"])
        self.error_feedback.load_state_dict(state["error_feedback"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.state_version, self._synced = None, None  # restored: full shared state next
        self._restart_batches()

    def restore_latest_checkpoint(self, max_round: int | None = None) -> int | None:
        """Load this client's newest valid own checkpoint (at or below `max_round` when
        given) and return its round; None when there is none, the state then being the one
        as built. A corrupt or incompatible newest checkpoint raises `CheckpointError` (the
        state as of that round cannot be had from an older one); so does a `max_round`
        older than every kept checkpoint when the client had trained before them (pruned:
        `tracking.checkpoint_keep` too small for the round resumed from)."""
        if self.checkpoint_dir is None:
            return None
        found = latest_checkpoint(self.checkpoint_dir, fingerprint=self._fingerprint,
                                  max_round=max_round)
        if found is not None:
            self.load_state_dict(found.load(self._fingerprint))
            self.state_round = found.round_id
            return found.round_id
        kept = list_checkpoints(self.checkpoint_dir)
        if kept and max_round is not None and max_round > 0:
            oldest = verify_checkpoint(kept[0][1], self._fingerprint)
            previous = oldest.get("meta", {}).get("previous_round")
            if previous is not None:
                raise CheckpointError(self.checkpoint_dir, (
                    f"client {self.center!r}: no checkpoint at or before round {max_round}; "
                    f"kept rounds {[r for r, _ in kept]}, the oldest continues round "
                    f"{previous} (raise tracking.checkpoint_keep)"))
        if self.state_round is not None:
            self.load_state_dict(self._initial_state)
            self.state_round = None
        return None

    def _write_checkpoint(self, round_id: int, previous_round: int | None) -> None:
        """This round's own state, kept where the client runs (never sent), with the older
        rounds a resume of the coordinator's kept checkpoints can need and no more
        (`fedmrg.fl.checkpoint.client_rounds_to_keep`)."""
        state = self.state_dict()
        owned = self.strategy.owned_shared(list(state["shared"]))
        if owned != set(state["shared"]):
            # The shared tensors not the client's own are the server's (its checkpoint holds
            # them; every plan and export loads them): kept out, so a client rebuilt from its
            # checkpoint still shows the model as built to a coordinator that starts afresh.
            # Their Adam moments stay unless the next fit forgets them anyway
            # (`train.reset_shared_moments`).
            if owned:
                state["shared"] = {n: t for n, t in state["shared"].items() if n in owned}
            else:
                del state["shared"]
            if self.cfg.train.reset_shared_moments:
                state["trainer"]["optimizer"] = self._without_shared_moments(
                    state["trainer"]["optimizer"])
        write_checkpoint(self.checkpoint_dir, round_id, state,
                         resumable_from=resumable_rounds(
                             round_id, self.cfg.tracking.checkpoint_keep), kind="client",
                         fingerprint=self._fingerprint,
                         meta={"center": self.center, "previous_round": previous_round})

    def _without_shared_moments(self, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        """A torch optimizer state_dict without the entries of shared parameters (its state is
        keyed by the parameters' positions in the param groups)."""
        shared = {id(p) for p in self.trainer.shared.values()}
        params = [p for group in self.trainer.optimizer.param_groups for p in group["params"]]
        keep = {i for i, p in enumerate(params) if id(p) not in shared}
        return {**optimizer_state, "state": {i: v for i, v in optimizer_state["state"].items()
                                             if i in keep}}

    def close(self) -> None:
        """End the train stream's pass in progress (a suspended Ray Data iterator); call before
        Ray shuts down. The client can still train afterwards: the next fit resumes from the
        stream position."""
        self._restart_batches()

    # ----------------------------------------------------------------- a round

    def fit(self, plan: RoundPlan) -> ClientUpdate:
        start_time = time.perf_counter()
        plan = from_wire(plan)
        if (self.checkpoint_dir is not None and self.state_round is not None
                and plan.round_id <= self.state_round):
            # a retried round, or the coordinator resumed from before this client's state: go
            # back to its round. The synced global state is the coordinator's, not this
            # client's work: kept, since a retry is planned as a delta from its version (a
            # resumed coordinator sends the full state anyway).
            synced = self.state_version, self._synced
            self.restore_latest_checkpoint(max_round=plan.round_id - 1)
            self.state_version, self._synced = synced
        previous_round = self.state_round
        federated = plan.global_state is not None or plan.global_delta is not None
        if plan.global_delta is not None:
            self.apply_state_delta(plan.global_delta)
        elif plan.global_state is not None:
            self.load_global_state(plan.global_state)
            self.state_version = plan.state_version
            self._synced = (None if plan.state_version is None else
                            {n: t.detach().clone() for n, t in plan.global_state.items()})
        if federated and self.cfg.train.reset_shared_moments:
            self.trainer.reset_optimizer("shared")
        start = get_shared_state(self.model)  # (the global state, as loaded)

        round_batches: list[dict] = []
        keep_batches = self.strategy.keeps_batches(plan)

        def batches() -> Iterator[dict]:
            for batch in self._batches:
                if keep_batches:
                    round_batches.append(batch)
                yield batch

        try:
            metrics = self._train(batches(), plan, self.strategy.training_terms(self, plan,
                                                                                start))
        except BaseException:
            # an error raised inside the stream finishes its generator: without a new pass
            # every retry of this client would find no batch at all
            self._restart_batches()
            raise

        lora: dict[str, Tensor] = {}
        dense: dict = {}
        masked = None
        if federated:
            lora, dense = self.strategy.model_update(self, start, get_shared_state(self.model))
        if federated and plan.secure_aggregation is not None:  # only the masked vector leaves
            masked = self.secure_aggregation_session().masked_vector(
                plan.secure_aggregation, plan.round_id,
                ClientUpdate(plan.round_id, self.center, self.num_samples, lora, dense), start)
            lora, dense = {}, {}
        statistics = self.strategy.statistics(self, plan, round_batches)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update(epoch=float(self.epoch), residual_norm=self.error_feedback.residual_norm(),
                       fit_s=time.perf_counter() - start_time,
                       truncated_reports=float(self.truncation["truncated"]))
        update = ClientUpdate(round_id=plan.round_id, center=self.center,
                              num_samples=self.num_samples, lora=lora, dense=dense,
                              statistics=statistics, metrics=metrics, masked=masked)
        self.state_round = plan.round_id
        if self.checkpoint_dir is not None:
            self._write_checkpoint(plan.round_id, previous_round)
        return to_wire(update, self.cfg.federation.wire_dtype)

    def _train(self, batches: Iterator[dict], plan: RoundPlan, terms: dict[str, Any]
               ) -> dict[str, float]:
        """The round's local steps: in this process, or (`resources.gpus_per_center` or
        `workers_per_center` > 1) data parallel on a Ray Train run (`fedmrg.fl.ddp`) over the
        same global batches, its trained tensors and optimizer state loaded back here."""
        if not self.train_workers.distributed:
            return self.trainer.fit(batches, plan.local_steps, **terms)
        from fedmrg.fl.ddp import RoundInputs, run_round_on_workers

        start = time.perf_counter()
        inputs = RoundInputs(
            cfg=self.cfg, center=self.center, seed=self.seed,
            batches=list(itertools.islice(batches, plan.local_steps)),
            shared=get_shared_state(self.model), private=get_private_state(self.model),
            trainer_state=self.trainer.state_dict(), terms=terms)
        if not inputs.batches:
            raise TrainerError(f"client {self.center!r}: the train stream yielded no batch")
        storage = (self.checkpoint_dir.parent / "ray_train" if self.checkpoint_dir is not None
                   else Path(tempfile.gettempdir()) / "fedmrg-ray-train" / self.center)
        result = run_round_on_workers(inputs, self.train_workers, storage,
                                      f"round-{plan.round_id}")
        load_shared_state(self.model, result.shared)
        load_private_state(self.model, result.private)
        self.trainer.load_state_dict(result.trainer_state)
        return {**result.metrics, "wall_s": time.perf_counter() - start,
                "train_workers": float(self.train_workers.count)}

    # ----------------------------------------------------------------- secure aggregation

    def secure_aggregation_session(self) -> SecAggParticipant:
        if self._secagg is None:
            self._secagg = SecAggParticipant(self.center)
        return self._secagg

    def secure_aggregation(self, stage: str, round_id: int, message: Any) -> Any:
        """A secure-aggregation step besides the masked fit (`fedmrg.privacy.client`: keys,
        key shares, unmasking shares); its keys live in this process only."""
        return self.secure_aggregation_session().handle(stage, round_id, message)

    # ----------------------------------------------------------------- evaluation

    def head_thresholds(self, head: torch.nn.Module | None = None) -> np.ndarray:
        """The positive thresholds of the diagnosis head (`head`, default the model's as it
        stands) fitted on this center's val split (`fedmrg.eval.calibration`)."""
        from fedmrg.eval.calibration import fit_positive_thresholds
        from fedmrg.eval.evaluator import head_probabilities

        probs, labels = head_probabilities(
            self.model, self.eval_stream(self.center, "val").iter_batches(0), head)
        return fit_positive_thresholds(probs, labels)

    def own_head(self) -> torch.nn.Module:
        """A copy of the diagnosis head tuned on this center's train split, `eval.
        head_tuning_steps` steps on the frozen encoder's features (`fedmrg.model.head_tuning`)."""
        from fedmrg.model.head_tuning import tune_own_head

        train = self._stream(self.data_centers, "train", self.cfg.eval.batch_size,
                             augment=False, shuffle=False)
        return tune_own_head(self.model, train.iter_batches(0), self.cfg.model.losses,
                             self.cfg.eval.head_tuning_steps,
                             seed=derive_seed(self.seed, self.center, "head"))

    def keep_own_head(self) -> None:
        """With `eval.head_tuning_steps`, tune this center's own head (`own_head`) from the
        model as it stands and keep it in the model (`MRGModel.own_diagnosis_head`), so the
        saved model a center deploys writes its prompts as its evaluation did."""
        if self.cfg.eval.head_tuning_steps:
            self.model.set_own_diagnosis_head(self.own_head())

    def evaluate(self, split: str = "test", personalized: bool = False,
                 dataset_center: str | None = None,
                 global_state: Mapping[str, Tensor] | None = None,
                 max_studies: int | None = None) -> EvalReply:
        """Generate and score reports on `dataset_center`'s `split` (default: this client's
        own data), its first `max_studies` studies when given (a validation point).
        `global_state` is loaded first (None: the model as it stands, e.g. under
        `local`); the next `fit` loads its plan's state anyway. personalized=True uses generic
        + specialized adapters; a model without a specialized adapter uses the generic one
        (its own model is then its generic path)."""
        if global_state is not None:
            self.load_global_state(from_wire(dict(global_state)))  # the synced copy stays
        target = dataset_center or self.center
        use_specialized = personalized and self.cfg.model.specialized_adapter
        batches = self.eval_stream(target, split).iter_batches(0)
        if max_studies is not None:
            batches = first_studies(batches, max_studies)
        # a validation point (max_studies) is cheap: no METEOR, whose JVM would then stay
        # resident in every client through the rest of training
        # a center's own model may tune and calibrate its own head on its own data (never
        # another center's)
        own = personalized and target == self.center
        head = (self.own_head() if self.cfg.eval.head_tuning_steps
                else self.model.diagnosis_head_for(True)) if own else None
        thresholds = self.head_thresholds(head) if own and self.cfg.eval.calibrate_head else None
        result = evaluate_model(self.model, batches, use_specialized,
                                num_samples=self.eval_samples, meteor=max_studies is None,
                                thresholds=thresholds, head=head, **self.generation)
        metrics = {**result.metrics, "eval_s": result.wall_s}
        # What leaves the center: the run asks (eval.samples, eval.share_references), the
        # dataset center's own policy file may only narrow it (fedmrg.privacy.disclosure).
        # Without shared references the true findings (read from the reference) stay too.
        policy = read_policy(self.root, target)
        asked = dataclasses.replace(self.cfg.eval, samples=self.eval_samples)
        allowed = effective_disclosure(asked, policy)
        samples = disclose_samples(result.samples, allowed)
        view = View.PERSONALIZATION if personalized else View.GENERALIZATION
        return EvalReply(center=target, view=view, metrics=metrics, samples=samples,
                         disclosure=policy,
                         per_study=result.per_study if allowed.per_study else {})


def default_checkpoint_dir(cfg: ExperimentConfig, center: str) -> Path | None:
    """`<tracking.storage_path>/<tracking.run_name>/centers/<center>/checkpoints` when the
    config names its run (`Experiment` sets `tracking.run_name`), else None: no checkpoints."""
    if not cfg.tracking.run_name:
        return None
    return client_checkpoint_dir(Path(cfg.tracking.storage_path) / cfg.tracking.run_name, center)


def _device(name: str) -> torch.device:
    if name == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
