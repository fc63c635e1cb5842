"""Throughput of one center's Ray Data stream against a plain PyTorch DataLoader.

Usage: ``python benchmarks/data_stream.py [--root DIR] [--studies-per-center 300]
[--image-size 64] [--center a] [--split train] [--batch-size 16] [--epochs 7]
[--out benchmarks/results/data_stream.json]``

Reuses the phantom dataset at --root, or generates it there (default: a folder under the
system temp dir, kept between runs). Every loader produces the same batches (the batch
contract of fedmrg.data.stream, augmentation and shuffling on, as a training client uses
them) and runs one warm-up epoch, then --epochs timed epochs (round-robin over the loaders,
so background load affects all alike), all in this process on this machine:

- ``CenterStream`` as clients use it (decoded pixels cached, augmentation per epoch),
- ``CenterStream(cache_decoded=False)`` (decode + augment every epoch: the large-data mode),
- a ``torch.utils.data.DataLoader`` over the split read into memory with pyarrow, applying
  the same transforms per item (decode + augment every epoch) with 0, 1 and 2 workers,
- the same DataLoader over pixels decoded once in memory (the cached work, no Ray).

Prints a markdown table (samples/s = rows / median epoch time, and the ratio to the
DataLoader baselines) and writes the numbers as JSON with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader, Dataset

from fedmrg.data.phantom import PHANTOM_VERSION, generate_phantom
from fedmrg.data.shards import read_center_table, read_manifest
from fedmrg.data.stream import CenterStream
from fedmrg.data.transforms import Augmentation, decode_study, finish_study, study_rng

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "data_stream.json"
RAY_CPUS = 4  # logical CPUs, as in the tests and `fedmrg run`: more than the cores on purpose
# Ray starts its worker processes (the stream's tasks, client actors) at niceness 15. The
# driver runs the baselines, so it takes the same niceness: on a machine shared with other
# work, a nice-0 baseline would otherwise win CPU time that the stream's tasks cannot.
RAY_WORKER_NICENESS = 15


# --------------------------------------------------------------------------- the baseline


class StudyTable(Dataset):
    """One center's split in memory (pyarrow), transformed per item like the stream does."""

    def __init__(self, root: Path, center: str, split: str, image_size: int, max_views: int,
                 in_chans: int, seed: int, cache_decoded: bool = False):
        table = read_center_table(root, center, split)
        self.study_ids = table["study_id"].to_pylist()
        self.images = table["images"].to_pylist()
        self.reports = table["report"].to_pylist()
        self.labels = np.asarray(table["labels"].to_pylist(), dtype=np.int64)
        self.image_size, self.max_views, self.in_chans = image_size, max_views, in_chans
        self.seed, self.epoch = seed, 0
        self.augmentation = Augmentation()
        self.decoded = ([decode_study(views, sid, image_size, max_views)
                         for views, sid in zip(self.images, self.study_ids, strict=True)]
                        if cache_decoded else None)

    def __len__(self) -> int:
        return len(self.study_ids)

    def __getitem__(self, i: int) -> dict:
        study_id = self.study_ids[i]
        pixels, n_views = (self.decoded[i] if self.decoded is not None else
                           decode_study(self.images[i], study_id, self.image_size,
                                        self.max_views))
        images, mask = finish_study(pixels, n_views, self.in_chans, self.augmentation,
                                    study_rng(self.seed, self.epoch, study_id))
        return {"images": torch.from_numpy(images), "view_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(self.labels[i]), "report": self.reports[i],
                "study_id": study_id}


def collate(items: list[dict]) -> dict:
    return {k: ([it[k] for it in items] if isinstance(items[0][k], str)
                else torch.stack([it[k] for it in items])) for k in items[0]}


def dataloader_epochs(data: StudyTable, batch_size: int, workers: int, seed: int
                      ) -> Callable[[int], Iterable[dict]]:
    """epoch -> batches; persistent workers, so an epoch does not pay for process start-up.

    With workers, `data.epoch` is read by each worker's copy: the augmentation seed then
    stays at epoch 0, which does not change the work done per item.
    """
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator,
                        num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)

    def epoch(e: int) -> Iterable[dict]:
        data.epoch = e
        return loader

    return epoch


# --------------------------------------------------------------------------- measuring


def time_epoch(epochs_of: Callable[[int], Iterable[dict]], epoch: int) -> tuple[int, float]:
    """(rows, seconds) of one full pass."""
    start = time.perf_counter()
    rows = 0
    for batch in epochs_of(epoch):
        rows += len(batch["study_id"])
        assert batch["images"].dtype == torch.float32  # touch the batch
    return rows, time.perf_counter() - start


def measure(loaders: dict[str, Callable[[int], Iterable[dict]]], epochs: int) -> dict:
    """One warm-up epoch each, then `epochs` timed rounds in which every loader runs one
    epoch in turn: load from other processes on a shared machine hits all loaders alike."""
    warmup = {name: time_epoch(epochs_of, 0) for name, epochs_of in loaders.items()}
    timed: dict[str, list[tuple[int, float]]] = {name: [] for name in loaders}
    for epoch in range(1, epochs + 1):
        for name, epochs_of in loaders.items():
            timed[name].append(time_epoch(epochs_of, epoch))
    results = {}
    for name, runs in timed.items():
        rows = warmup[name][0]
        assert all(r == rows for r, _ in runs), f"{name}: epochs yielded different row counts"
        seconds = [s for _, s in runs]
        median = statistics.median(seconds)
        results[name] = {"rows": rows, "warmup_s": round(warmup[name][1], 3),
                         "epoch_s": [round(s, 4) for s in seconds],
                         "median_epoch_s": round(median, 4),
                         "samples_per_s": round(rows / median, 1)}
    return results


def ensure_phantom(root: Path, studies_per_center: int, image_size: int, seed: int) -> Path:
    if (root / "manifest.json").exists():
        read_manifest(root)  # a clear error if it is not a fedmrg dataset
        return root
    print(f"generating the phantom benchmark into {root} ...", flush=True)
    generate_phantom(root, centers=4, studies_per_center=studies_per_center,
                     image_size=image_size, seed=seed, heldout_center=False)
    return root


def run(args: argparse.Namespace) -> dict:
    root = ensure_phantom(args.root, args.studies_per_center, args.image_size, args.seed)
    niceness = os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    common = dict(image_size=args.image_size, max_views=args.max_views, in_chans=args.in_chans)

    def stream(cache: bool) -> Callable[[int], Iterable[dict]]:
        s = CenterStream(root, args.center, args.split, batch_size=args.batch_size,
                         augment=True, shuffle=True, seed=args.seed, cache_decoded=cache,
                         **common)
        return s.iter_batches

    makers = {
        "CenterStream (cached decode)": lambda: stream(True),
        "CenterStream (decode every epoch)": lambda: stream(False),
    }
    for workers in (0, 1, 2):
        makers[f"DataLoader, workers={workers}"] = lambda w=workers: dataloader_epochs(
            StudyTable(root, args.center, args.split, seed=args.seed, **common),
            args.batch_size, w, args.seed)
    makers["DataLoader, cached decode, workers=0"] = lambda: dataloader_epochs(
        StudyTable(root, args.center, args.split, seed=args.seed, cache_decoded=True,
                   **common), args.batch_size, 0, args.seed)
    loaders, setup_s = {}, {}
    for name, make in makers.items():
        start = time.perf_counter()
        loaders[name] = make()
        setup_s[name] = round(time.perf_counter() - start, 3)
    results = measure(loaders, args.epochs)
    for name, r in results.items():
        r["setup_s"] = setup_s[name]
        print(f"  {name}: {r['samples_per_s']} samples/s", flush=True)
    ray.shutdown()

    best_loader = max((r["samples_per_s"] for n, r in results.items()
                       if n.startswith("DataLoader, workers")))
    for r in results.values():
        r["ratio_to_best_dataloader"] = round(r["samples_per_s"] / best_loader, 3)
    return {
        "phantom_version": PHANTOM_VERSION,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__, "ray_num_cpus": RAY_CPUS,
                    "driver_niceness": niceness, "load_average": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        f"Center {a['center']!r} {a['split']} split of phantom v{result['phantom_version']} "
        f"({a['studies_per_center']} studies/center, {a['image_size']} px, max_views "
        f"{a['max_views']}, in_chans {a['in_chans']}, batch {a['batch_size']}, augment + "
        f"shuffle), median of {a['epochs']} epochs after a warm-up; "
        f"{result['machine']['nproc']} CPUs, load average "
        f"{result['machine']['load_average'][0]:.1f}",
        "",
        "| loader | rows | samples/s | x best DataLoader | median epoch (s) | warm-up (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["results"].items():
        lines.append(f"| {name} | {r['rows']} | {r['samples_per_s']} | "
                     f"{r['ratio_to_best_dataloader']} | {r['median_epoch_s']} | "
                     f"{r['warmup_s'] + r['setup_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="dataset to reuse or create (default: under the temp dir)")
    parser.add_argument("--studies-per-center", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-views", type=int, default=2)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--center", default="a")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.root is None:
        args.root = (Path(tempfile.gettempdir()) / "fedmrg-bench" /
                     f"phantom-v{PHANTOM_VERSION}-s{args.studies_per_center}"
                     f"-i{args.image_size}-seed{args.seed}")
    result = run(args)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
