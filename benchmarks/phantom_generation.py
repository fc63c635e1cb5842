"""How long the phantom benchmark takes to generate, and how big it is.

Usage: ``python benchmarks/phantom_generation.py [--centers 4] [--studies-per-center 300]
[--image-size 64] [--seed 0] [--repeats 1] [--out benchmarks/results/phantom_generation.json]``

Generates the dataset into a temporary folder (the default size is the CPU default of
`fedmrg run`), prints a markdown table (wall time, studies/s, images, size on disk, per-center
rows) and writes the numbers as JSON with the machine and the command. With --repeats > 1 it
also checks that every repeat produced the same manifest (determinism).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from fedmrg.data.phantom import PHANTOM_VERSION, generate_phantom
from fedmrg.data.shards import manifest_hash

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "phantom_generation.json"


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run(centers: int, studies_per_center: int, image_size: int, seed: int, repeats: int
        ) -> dict:
    times, hashes = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "phantom"
            start = time.perf_counter()
            manifest = generate_phantom(root, centers=centers,
                                        studies_per_center=studies_per_center,
                                        image_size=image_size, seed=seed)
            times.append(time.perf_counter() - start)
            hashes.append(manifest_hash(root))
            disk = _disk_bytes(root)
            images = sum(
                sum(len(v) for v in pq.read_table(root / f["path"], columns=["images"])
                    ["images"].to_pylist())
                for info in manifest["centers"].values() for f in info["files"])
    studies = sum(sum(c["rows"].values()) for c in manifest["centers"].values())
    best = min(times)
    return {
        "version": PHANTOM_VERSION,
        "args": {"centers": centers, "studies_per_center": studies_per_center,
                 "image_size": image_size, "seed": seed, "repeats": repeats},
        "seconds": {"best": round(best, 3), "all": [round(t, 3) for t in times]},
        "studies": studies,
        "images": images,
        "studies_per_second": round(studies / best, 1),
        "disk_bytes": disk,
        "bytes_per_image": round(disk / images),
        "manifest_sha256": hashes[0],
        "deterministic_across_repeats": len(set(hashes)) == 1,
        "rows": {c: info["rows"] for c, info in manifest["centers"].items()},
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        f"Phantom v{result['version']}: {a['centers']} centers + heldout x "
        f"{a['studies_per_center']} studies at {a['image_size']} px, seed {a['seed']} "
        f"({result['machine']['nproc']} CPUs)",
        "",
        "| wall time (s) | studies | images | studies/s | size on disk (MB) | bytes/image |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {result['seconds']['best']:.2f} | {result['studies']} | {result['images']} | "
        f"{result['studies_per_second']} | {result['disk_bytes'] / 1e6:.2f} | "
        f"{result['bytes_per_image']} |",
        "",
        "| center | train | val | test |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {c} | {r['train']} | {r['val']} | {r['test']} |"
              for c, r in result["rows"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--centers", type=int, default=4)
    parser.add_argument("--studies-per-center", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = run(args.centers, args.studies_per_center, args.image_size, args.seed, args.repeats)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
