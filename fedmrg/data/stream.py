"""One center's split as a Ray Data stream of torch batches (the batch contract).

Each client actor builds its own `CenterStream` over its own center's parquet files (never a
global dataset split after the fact: a slow center must not stall the others):

    CenterFiles (one read task per parquet file) -> filter(split) -> map_batches(decode)  # A
        -> map_batches(augment, normalize, tokenize) -> iter_torch_batches              # B

Stage A (decode + resize) gives the same arrays every epoch. For small data (the phantom
benchmark: ~10 MB of pixels per center) it runs once and its output is materialized in the
object store; each epoch then runs only stage B. Measured with benchmarks/data_stream.py on
2 shared cores: an epoch of the phantom's 210 train rows of a center takes ~0.27 s cached vs
~0.58 s decoding every epoch (1400 rows: ~1.0 s vs ~1.6 s). Above `CACHE_MAX_BYTES` of
decoded pixels (paper scale: 224 px, thousands of studies) both stages stream every epoch so
memory stays bounded. The cache holds float32, so cached and streaming passes give
bit-identical batches. Each pass over a Ray Dataset costs ~0.15 s of fixed executor overhead
here, which is why the cache is kept in few, large blocks.

Determinism: the dataset keeps block order (`preserve_order`), the shuffle (file or block
order, then a local shuffle buffer) is seeded by (seed, epoch), and a study's augmentation by
(seed, epoch, study_id), so a pass never depends on batching or task scheduling.

CPU: every task of a stream asks for `num_cpus_per_task` logical CPUs (default 0.25) and at
most `max_concurrent_tasks` run at once, so client actors that each hold a fraction of a CPU
and each run a stream fit in the cluster's logical CPUs. That is also why the files are read
by `CenterFiles` rather than `ray.data.read_parquet`: in Ray 2.60 read_parquet starts, on
every read, either FooterReader actors plus a 1-CPU listing task (datasource V2, the default:
~3 s per pass here) or 1-CPU sampling tasks (V1). When client actors hold all but a fraction
of a CPU those never get scheduled and the pass hangs (tests/test_stream.py runs streams in
client actors while only half a logical CPU is free).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data.block import BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.datasource import Datasource, ReadTask
from ray.data.expressions import col
from ray.exceptions import RayError

from fedmrg.choices import OnBadRow, choice_values
from fedmrg.config import ConfigError, DataConfig
from fedmrg.data.schema import LABEL_NAMES, NUM_OBSERVATIONS, SPLITS
from fedmrg.data.shards import DatasetError, SkipLog, center_files, read_manifest
from fedmrg.data.transforms import (
    Augmentation,
    ImageDecodeError,
    decode_study,
    finish_study,
    study_rng,
    tokenize_reports,
)

# Why a row was skipped under on_error="skip" (keys of `CenterStream.skipped.counts`).
CORRUPT_IMAGE, EMPTY_REPORT, BAD_LABELS = "corrupt_image", "empty_report", "bad_labels"
SKIP_REASONS = (CORRUPT_IMAGE, EMPTY_REPORT, BAD_LABELS)

# Decoded pixels up to this size per stream are materialized once (see the module docstring).
CACHE_MAX_BYTES = 512 * 1024 * 1024
# A streaming pass shuffles locally in a buffer of at most this many bytes of finished rows.
SHUFFLE_BUFFER_MAX_BYTES = 256 * 1024 * 1024
# Rows handed to one stage call are bounded by this many bytes of output. Calls on a few
# large batches, not on training-size ones: per call, Ray Data converts and concatenates the
# tensor columns: 16 rows per call cost ~30% more worker CPU than a block per call.
STAGE_BATCH_BYTES = 64 * 1024 * 1024
READ_COLUMNS = ("study_id", "split", "images", "report", "labels")


def skip_metrics(skipped: SkipLog) -> dict[str, float]:
    """A stream's skipped rows as the metrics a client reports with its update or evaluation:
    `skipped_rows` and `skipped_<reason>` for every reason a stream skips for, zeros included."""
    return skipped.metrics(SKIP_REASONS)


# --------------------------------------------------------------------------- reading


def file_error(center: str | None, path: str, error: BaseException) -> DatasetError:
    """A DatasetError naming the center and the file a read failed on. A file the manifest
    lists that is gone (deleted or unmounted during a run) is always an error, whatever
    `on_error` says: that policy is for bad rows, and skipping a whole file would change the
    dataset, and the sample count the aggregation weighs by, under a running experiment."""
    where = f"center {center!r}, file {path}" if center is not None else path
    if isinstance(error, FileNotFoundError) or not os.path.exists(path):
        return DatasetError(f"{where}: missing (the manifest lists it; did the dataset change "
                            f"during the run? `fedmrg data validate` re-checks it)")
    return DatasetError(f"{where}: cannot read parquet ({type(error).__name__}: {error})")


def read_center_file(path: str, columns: tuple[str, ...], center: str | None = None,
                     tag_center: bool = False) -> list[pa.Table]:
    """One parquet file -> [table of `columns` + its `path`] (runs in a Ray read task), plus a
    `center` column naming the file's center when `tag_center` (pooled streams); `center`
    also names the center in errors."""
    try:
        table = pq.read_table(path, columns=list(columns))
    except (OSError, pa.ArrowException) as e:
        raise file_error(center, path, e) from e
    table = table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
    if tag_center:
        table = table.append_column("center", pa.array([center] * table.num_rows, pa.string()))
    return [table]


class CenterFiles(Datasource):
    """A center's parquet files as a Ray Data source: one read task per file, in order.

    Footers are read here, in the calling process, so a read starts no helper tasks or
    actors of its own (see the module docstring).
    """

    def __init__(self, paths: list[str], columns: tuple[str, ...] = READ_COLUMNS,
                 centers: list[str] | None = None, tag_center: bool = False):
        self.paths, self.columns = list(paths), tuple(columns)
        # each file's center: named in errors, and a `center` column when `tag_center`
        self.centers = list(centers) if centers is not None else [None] * len(self.paths)
        self.tag_center = tag_center
        self.rows, self.sizes = [], []
        for path, center in zip(self.paths, self.centers, strict=True):
            try:
                schema = pq.read_schema(path)
                self.rows.append(pq.ParquetFile(path).metadata.num_rows)
                self.sizes.append(os.path.getsize(path))
            except (OSError, pa.ArrowException) as e:
                raise file_error(center, path, e) from e
            missing = [c for c in self.columns if c not in schema.names]
            if missing:
                where = f"center {center!r}, file {path}" if center is not None else path
                raise DatasetError(f"{where}: missing column(s) {missing}; the file has "
                                   f"{schema.names}")

    def estimate_inmemory_data_size(self) -> int:
        return sum(self.sizes)

    def supports_distributed_reads(self) -> bool:
        # A center's files may exist only on its client's node (resources.pin_centers).
        return False

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [
            ReadTask(functools.partial(read_center_file, path, self.columns, center,
                                       self.tag_center),
                     BlockMetadata(num_rows=rows, size_bytes=size, exec_stats=None,
                                   input_files=(path,)),
                     per_task_row_limit=per_task_row_limit)
            for path, center, rows, size in zip(self.paths, self.centers, self.rows, self.sizes,
                                                strict=True)
        ]


# --------------------------------------------------------------------------- stage A: decode


def decode_rows(batch: pa.Table, *, center: str, image_size: int, max_views: int,
                on_error: str) -> dict[str, np.ndarray]:
    """Stage A (runs in a Ray task): raw rows -> decoded, resized pixels and checked fields.

    A bad row raises a DatasetError naming center, file and study (on_error="raise") or is
    kept with a `skip_reason` so the driver can count it (on_error="skip").
    """
    n = batch.num_rows
    study_ids = batch["study_id"].to_pylist()
    paths = batch["path"].to_pylist()
    pooled = "center" in batch.column_names
    row_centers = batch["center"].to_pylist() if pooled else [center] * n
    reports = batch["report"].to_pylist()
    pixels = np.zeros((n, max_views, image_size, image_size), dtype=np.float32)  # (n, V, S, S)
    n_views = np.zeros(n, dtype=np.int64)
    labels = np.zeros((n, NUM_OBSERVATIONS), dtype=np.int64)
    skip_reason = [""] * n
    skip_message = [""] * n
    for i, (study_id, images, report, row_labels) in enumerate(zip(
            study_ids, batch["images"].to_pylist(), reports, batch["labels"].to_pylist(),
            strict=True)):
        reason, detail = "", ""
        if report is None or not report.strip():
            reason, detail = EMPTY_REPORT, "empty report"
        elif (row_labels is None or len(row_labels) != NUM_OBSERVATIONS
              or any(v not in range(len(LABEL_NAMES)) for v in row_labels)):
            reason, detail = BAD_LABELS, (f"labels {row_labels!r} are not {NUM_OBSERVATIONS} "
                                          f"codes in 0..{len(LABEL_NAMES) - 1}")
        else:
            try:
                pixels[i], n_views[i] = decode_study(images or [], study_id, image_size,
                                                     max_views)
                labels[i] = row_labels
            except ImageDecodeError as e:  # "study 's' view 1: ...": the study is named below
                reason, detail = CORRUPT_IMAGE, str(e).removeprefix(f"study {study_id!r} ")
        if reason:
            message = (f"center {row_centers[i]!r}, file {paths[i]}, study {study_id!r}: "
                       f"{detail}")
            if on_error == OnBadRow.RAISE:
                raise DatasetError(message + " (on_error='skip' skips and counts such rows)")
            skip_reason[i], skip_message[i] = reason, message
    out = {
        "study_id": np.array(study_ids, dtype=object),
        "report": np.array([r or "" for r in reports], dtype=object),
        "labels": labels,
        "pixels": pixels,
        "n_views": n_views,
        "skip_reason": np.array(skip_reason, dtype=object),
        "skip_message": np.array(skip_message, dtype=object),
    }
    if pooled:
        out["center"] = np.array(row_centers, dtype=object)
    return out


# --------------------------------------------------------------------------- stage B: finish


def finish_rows(batch: dict[str, np.ndarray], *, seed: int, epoch: int,
                augmentation: Augmentation | None, in_chans: int, tokenizer: Any,
                max_report_tokens: int) -> dict[str, np.ndarray]:
    """Stage B (runs in a Ray task): augment, normalize, replicate channels, tokenize."""
    pixels = batch["pixels"]  # (n, V, S, S)
    n, max_views, size, _ = pixels.shape
    images = np.zeros((n, max_views, in_chans, size, size), dtype=np.float32)  # (n, V, C, S, S)
    view_mask = np.zeros((n, max_views), dtype=bool)  # (n, V)
    for i, study_id in enumerate(batch["study_id"]):
        rng = study_rng(seed, epoch, study_id) if augmentation is not None else None
        images[i], view_mask[i] = finish_study(pixels[i], int(batch["n_views"][i]), in_chans,
                                               augmentation, rng)
    out = {
        "images": images,
        "view_mask": view_mask,
        "labels": batch["labels"],
        "report": batch["report"],
        "study_id": batch["study_id"],
        "skip_reason": batch["skip_reason"],
        "skip_message": batch["skip_message"],
    }
    if "center" in batch:  # pooled streams: which center each row comes from
        out["center"] = batch["center"]
    if tokenizer is not None:
        out["input_ids"], out["attention_mask"] = tokenize_reports(
            tokenizer, list(batch["report"]), max_report_tokens)
    return out


class Collate(NumpyBatchCollateFn):
    """Numpy batch -> the batch contract: tensors for arrays, lists for strings."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if value.dtype.kind in "OUS":  # strings
                out[key] = [str(v) for v in value]
            else:
                out[key] = torch.tensor(value)  # a copy: Ray's arrays may be read-only views
        return out


def _cpu_torch_batches(dataset: ray.data.Dataset, **kwargs: Any) -> Iterable[dict[str, Any]]:
    """`dataset.iter_torch_batches(**kwargs)` with the batches on the CPU. Ray 2.60 moves a
    collate_fn's tensors to `device` (its default "auto" is a Ray Train worker's GPU), hence
    device="cpu"; Ray 2.55 (pinned by flwr[simulation], benchmarks/vs_flower.py) refuses any
    device beside a collate_fn, and leaves these batches (tensors and lists) where the
    collate_fn made them: on the CPU."""
    try:
        return dataset.iter_torch_batches(device="cpu", **kwargs)
    except ValueError as e:
        if "collate_fn cannot be used with" not in str(e):
            raise
        return dataset.iter_torch_batches(**kwargs)


# --------------------------------------------------------------------------- the stream


class CenterStream:
    """Torch batches of one (center, split) of a fedmrg dataset, read with Ray Data.

    `center` may also be a list of centers (the pooled data of the `centralized` baseline):
    their files are read as one dataset, so a shuffled pass mixes centers within batches
    (interleaving single-center batches would give BatchNorm per-center batch statistics in
    training and pooled running statistics at evaluation), and every batch gets a `center`
    list naming each row's center (for the client-aware contrastive loss).

    `iter_batches(epoch)` is a fresh pass; the same seed and epoch give identical batches.
    Bad rows: on_error="raise" stops with a DatasetError naming center, file and study;
    "skip" drops them and counts them in `skipped` (by reason).
    `cache_decoded`: None decides by size (CACHE_MAX_BYTES), True/False forces it.
    """

    def __init__(
        self,
        root: str | Path,
        center: str | Sequence[str],
        split: str,
        *,
        image_size: int = 64,
        max_views: int = 2,
        in_chans: int = 1,
        batch_size: int = 16,
        augment: bool = False,
        tokenizer: Any = None,
        max_report_tokens: int = DataConfig().max_report_tokens,
        shuffle: bool = False,
        seed: int = 0,
        on_error: str = "raise",
        cache_decoded: bool | None = None,
        num_cpus_per_task: float = 0.25,
        max_concurrent_tasks: int = 2,
        augmentation: Augmentation | None = None,
    ) -> None:
        _check_args(split=split, image_size=image_size, max_views=max_views, in_chans=in_chans,
                    batch_size=batch_size, max_report_tokens=max_report_tokens,
                    on_error=on_error, num_cpus_per_task=num_cpus_per_task,
                    max_concurrent_tasks=max_concurrent_tasks)
        # Absolute: read tasks run in other worker processes, whose cwd may differ.
        self.root, self.split = str(Path(root).resolve()), split
        self.pooled = not isinstance(center, str)
        self.centers = [center] if isinstance(center, str) else list(center)
        if not self.centers:
            raise ConfigError("center: a pooled stream needs at least one center")
        self.center = center if isinstance(center, str) else "+".join(self.centers)
        self.image_size, self.max_views, self.in_chans = image_size, max_views, in_chans
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.tokenizer, self.max_report_tokens = tokenizer, max_report_tokens
        self.on_error = on_error
        self.augmentation = (augmentation or Augmentation()) if augment else None
        self.num_cpus_per_task, self.max_concurrent_tasks = num_cpus_per_task, max_concurrent_tasks

        manifest = read_manifest(self.root)
        self.files, self.file_centers, self.manifest_rows = [], [], 0
        for c in self.centers:
            files = center_files(self.root, c, manifest)
            rows = int(manifest["centers"][c]["rows"].get(split, 0))
            if rows == 0:
                raise DatasetError(f"{self.root}: center {c!r} has no {split!r} rows "
                                   f"(rows per split: {manifest['centers'][c]['rows']})")
            self.files += files
            self.file_centers += [c] * len(files)
            self.manifest_rows += rows
        # Reads footers now: a bad file fails here.
        self.source = self._files(range(len(self.files)))
        decoded_bytes = self.manifest_rows * max_views * image_size * image_size * 4
        self.cache_decoded = (decoded_bytes <= CACHE_MAX_BYTES if cache_decoded is None
                              else cache_decoded)
        self._decoded: ray.data.Dataset | None = None  # materialized stage A (cached mode)
        self._skipped = SkipLog()

    def _files(self, indices: Iterable[int]) -> CenterFiles:
        """These files as a source (footers read now), each named with its center in errors;
        pooled streams also get the `center` column."""
        indices = list(indices)
        return CenterFiles([self.files[i] for i in indices],
                           centers=[self.file_centers[i] for i in indices],
                           tag_center=self.pooled)

    @classmethod
    def from_config(cls, data_cfg: DataConfig, center: str | Sequence[str], split: str,
                    in_chans: int, tokenizer: Any = None, seed: int = 0, **kwargs: Any
                    ) -> CenterStream:
        """The stream a client uses: augmented and shuffled for train, plain for val/test."""
        train = split == "train"
        options = dict(
            image_size=data_cfg.image_size, max_views=data_cfg.max_views, in_chans=in_chans,
            batch_size=data_cfg.batch_size, augment=data_cfg.augment and train,
            tokenizer=tokenizer, max_report_tokens=data_cfg.max_report_tokens, shuffle=train,
            seed=seed, on_error=data_cfg.on_error, cache_decoded=data_cfg.cache_decoded,
            num_cpus_per_task=data_cfg.stream_cpus_per_task,
            max_concurrent_tasks=data_cfg.stream_max_tasks,
        )
        options.update(kwargs)
        return cls(data_cfg.root, center, split, **options)

    # ----------------------------------------------------------------- public

    @property
    def num_rows(self) -> int:
        """Rows a pass yields. Cached: exact (skipped rows excluded). Streaming: the
        manifest's count for the split, an upper bound when rows get skipped."""
        if self.cache_decoded:
            return self._decoded_dataset().count()
        return self.manifest_rows

    @property
    def skipped(self) -> SkipLog:
        """Rows skipped under on_error="skip", by reason. Cached: every bad row once.
        Streaming: the rows the latest pass skipped (the same rows every full pass)."""
        if self.cache_decoded:
            self._decoded_dataset()
        return self._skipped

    def iter_batches(self, epoch: int = 0) -> Iterator[dict[str, Any]]:
        """One pass over the split as batches following the batch contract."""
        with _clear_errors():
            dataset = self._epoch_dataset(epoch)
        if not self.cache_decoded:
            self._skipped = SkipLog()
        batches = _cpu_torch_batches(
            dataset,
            batch_size=self.batch_size,
            collate_fn=Collate(),
            local_shuffle_buffer_size=self._shuffle_buffer_rows() if self.shuffle else None,
            local_shuffle_seed=(_derive_seed(self.seed, epoch, "local-shuffle")
                                if self.shuffle else None),
        )
        with _clear_errors():
            for batch in batches:
                batch = self._drop_skipped(batch)
                if batch is not None:
                    yield batch

    def __repr__(self) -> str:
        return (f"CenterStream(center={self.center!r}, split={self.split!r}, "
                f"rows={self.manifest_rows}, cache_decoded={self.cache_decoded})")

    # ----------------------------------------------------------------- pipeline

    def _ray_args(self, num_inputs: int) -> dict[str, Any]:
        """Resources of every task of this stream (the same for all ops, so Ray fuses them)."""
        # Never more tasks than input blocks (Ray warns about an unreachable limit otherwise).
        tasks = max(1, min(self.max_concurrent_tasks, num_inputs))
        return {"num_cpus": self.num_cpus_per_task,
                "compute": ray.data.TaskPoolStrategy(size=tasks)}

    def _read(self, file_seed: int | None, rows_per_block: int | None = None
              ) -> ray.data.Dataset:
        """Stage A as a lazy dataset: this center's files (shuffled by `file_seed`), this
        split, decoded; one block per file, or blocks of `rows_per_block` rows."""
        source = self.source
        if file_seed is not None:
            order = np.random.default_rng(file_seed).permutation(len(self.files))
            source = self._files(order)
        tasks = self._ray_args(len(self.files))
        dataset = ray.data.read_datasource(source, **tasks)
        context = dataset.context  # a copy owned by this dataset and the ones derived from it
        context.execution_options.preserve_order = True  # determinism
        # A task's DatasetError reaches the driver as itself, not as a UserCodeException
        # that keeps only the worker's traceback text.
        context.raise_original_map_exception = True
        context.enable_progress_bars = False
        context.enable_operator_progress_bars = False
        context.print_on_execution_start = False
        return dataset.filter(expr=col("split") == self.split, **tasks).map_batches(
            decode_rows,
            batch_format="pyarrow",
            batch_size=rows_per_block,  # None: a whole file's rows of this split per call
            fn_kwargs={"center": self.center, "image_size": self.image_size,
                       "max_views": self.max_views, "on_error": self.on_error},
            **tasks,
        )

    def _decoded_dataset(self) -> ray.data.Dataset:
        """Cached mode: stage A once, bad rows counted and removed, kept in the object store."""
        if self._decoded is None:
            with _clear_errors():
                self._decoded = self._materialize_decoded()
        return self._decoded

    def _materialize_decoded(self) -> ray.data.Dataset:
        decoded = self._read(file_seed=None, rows_per_block=self._cached_block_rows())
        decoded = decoded.materialize()
        if decoded.count() == 0:
            raise DatasetError(f"{self.root}: center {self.center!r} has no {self.split!r} "
                               f"rows in {self.files} (the manifest says "
                               f"{self.manifest_rows}; run `fedmrg data validate`)")
        skipped = SkipLog()
        # Every op states its resources: a default 1-CPU task may never get scheduled.
        reasons = decoded.select_columns(["skip_reason", "skip_message"],
                                         **self._ray_args(decoded.num_blocks()))
        for part in reasons.iter_batches(batch_format="numpy", batch_size=None):
            for reason, message in zip(part["skip_reason"], part["skip_message"], strict=True):
                if reason:
                    skipped.add(str(reason), str(message))
        self._skipped = skipped
        if skipped.total == 0:
            return decoded
        if skipped.total == decoded.count():
            raise DatasetError(f"center {self.center!r} split {self.split!r}: all "
                               f"{skipped.total} rows are bad ({dict(skipped.counts)}); "
                               f"first: {skipped.examples[0]}")
        return decoded.filter(expr=col("skip_reason") == "",
                              **self._ray_args(decoded.num_blocks())).materialize()

    def _epoch_dataset(self, epoch: int) -> ray.data.Dataset:
        """Stage B of one epoch over the cached decode, or both stages when streaming."""
        if self.cache_decoded:
            dataset = self._decoded_dataset()
            num_inputs = dataset.num_blocks()
            if self.shuffle:
                dataset = dataset.randomize_block_order(
                    seed=_derive_seed(self.seed, epoch, "block-order"))
        else:
            file_seed = _derive_seed(self.seed, epoch, "file-order") if self.shuffle else None
            dataset = self._read(file_seed)
            num_inputs = len(self.files)
        return dataset.map_batches(
            finish_rows,
            batch_format="numpy",
            batch_size=self._finish_batch_rows(),
            fn_kwargs={"seed": self.seed, "epoch": epoch, "augmentation": self.augmentation,
                       "in_chans": self.in_chans, "tokenizer": self.tokenizer,
                       "max_report_tokens": self.max_report_tokens},
            **self._ray_args(num_inputs),
        )

    def _cached_block_rows(self) -> int:
        """Rows per block of the decoded cache: as many blocks as concurrent tasks (every
        pass costs a task round trip per block: 2 blocks make an epoch of the phantom's 210
        rows ~1.5x faster than one block per file), each at most STAGE_BATCH_BYTES."""
        row_bytes = self.max_views * self.image_size ** 2 * 4
        return max(1, min(math.ceil(self.manifest_rows / self.max_concurrent_tasks),
                          STAGE_BATCH_BYTES // row_bytes))

    def _finish_batch_rows(self) -> int:
        """Rows per stage-B call: a whole input block when its output fits STAGE_BATCH_BYTES
        (never more, or Ray would bundle blocks into one task and lose parallelism)."""
        block_rows = self._cached_block_rows() if self.cache_decoded else max(self.source.rows)
        row_bytes = self.max_views * self.in_chans * self.image_size ** 2 * 4
        return max(1, min(block_rows, STAGE_BATCH_BYTES // row_bytes))

    def _shuffle_buffer_rows(self) -> int:
        """Cached (small) data: the whole split, a full shuffle. Streaming: bounded bytes."""
        if self.cache_decoded:
            return max(self.batch_size, self.num_rows)
        row_bytes = self.max_views * self.in_chans * self.image_size ** 2 * 4
        return max(self.batch_size, min(self.manifest_rows,
                                        SHUFFLE_BUFFER_MAX_BYTES // row_bytes))

    def _drop_skipped(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Count and drop rows stage A marked bad (streaming mode); None if none is left."""
        reasons, messages = batch.pop("skip_reason"), batch.pop("skip_message")
        bad = [i for i, r in enumerate(reasons) if r]
        if not bad:
            return batch
        for i in bad:
            self._skipped.add(reasons[i], messages[i])
        keep = [i for i, r in enumerate(reasons) if not r]
        if not keep:
            return None
        index = torch.tensor(keep, dtype=torch.long)
        return {k: ([v[i] for i in keep] if isinstance(v, list) else v[index])
                for k, v in batch.items()}


# --------------------------------------------------------------------------- helpers


def _dataset_error(error: BaseException) -> DatasetError | None:
    """The DatasetError a Ray task raised, found through Ray's exception wrappers.

    Ray re-raises a task's exception as a RayTaskError that also subclasses the original
    type, with the worker's traceback in its message; those wrappers are looked through.
    """
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DatasetError) and not isinstance(e, RayError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


# Ray Data 2.60 appends its retry advice to the message of an exception raised in a map task.
_RAY_DATA_NOTE = "\nFailed to apply UDF transform"


def _own_message(error: BaseException) -> str:
    """The message fedmrg wrote, without what Ray Data appended to it."""
    message = str(error.args[0]) if error.args else str(error)
    return message.split(_RAY_DATA_NOTE, 1)[0]


class _clear_errors:
    """Re-raise a DatasetError from inside Ray as itself: fedmrg's own message, without the
    worker traceback or Ray Data's retry advice."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, GeneratorExit):
            return False
        error = _dataset_error(exc)
        if error is None:
            return False
        message = _own_message(error)
        if error is exc and exc.args == (message,):
            return False
        raise DatasetError(message) from None


def _derive_seed(seed: int, epoch: int, purpose: str) -> int:
    """A 32-bit seed per (seed, epoch, purpose): streams of randomness that never collide."""
    tag = int.from_bytes(purpose.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    return int(np.random.SeedSequence([seed, epoch, tag]).generate_state(1)[0])


def _check_args(**args: Any) -> None:
    """Fail fast, naming the argument, before any Ray work starts."""
    if args["split"] not in SPLITS:
        raise ConfigError(f"split: {args['split']!r} is not one of {list(SPLITS)}")
    if args["on_error"] not in choice_values(OnBadRow):
        raise ConfigError(f"on_error: {args['on_error']!r} is not one of {choice_values(OnBadRow)}")
    if args["in_chans"] not in (1, 3):
        raise ConfigError(f"in_chans: {args['in_chans']!r} is not 1 or 3")
    for key in ("image_size", "max_views", "batch_size", "max_report_tokens",
                "max_concurrent_tasks"):
        if not isinstance(args[key], int) or args[key] < 1:
            raise ConfigError(f"{key}: expected a positive integer, got {args[key]!r}")
    cpus = args["num_cpus_per_task"]
    if not (isinstance(cpus, (int, float)) and cpus >= 0 and math.isfinite(cpus)):
        raise ConfigError(f"num_cpus_per_task: expected a number >= 0, got {cpus!r}")
