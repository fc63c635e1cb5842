"""`fedmrg generate` on one study with a run's generic model, on CPU: how long it takes.

Usage: ``python benchmarks/generate.py RUN_DIR [--center C] [--repeats 5] [--views 2]
[--out benchmarks/results/generate.json]``

RUN_DIR is a finished run's folder (`<tracking.storage_path>/<run name>`, e.g. after
``make run``: the default model). Measured in this process, in the order a user meets them:
importing fedmrg's serving code and torch, loading the model (`ReportPredictor.from_folder`:
the builtin base LM, adapters, encoder), then `predict` on one synthetic study (a phantom
study, `--views` views) `--repeats` times: the first call and the median of the others, with
the generated report's length in tokens. Also the whole command, `fedmrg generate --run
RUN_DIR IMAGE[,IMAGE]`, timed end to end as a fresh process (Python start and imports
included), once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import _common  # first: sets the environment before torch loads

DEFAULT_OUT = _common.RESULTS / "generate.json"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--center", default=None, help="a center's personalized model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--views", type=int, default=2, choices=(1, 2))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    import torch

    from fedmrg.serving.pyfunc import example_study
    from fedmrg.serving.sources import run_model

    import_s = time.perf_counter() - started
    from fedmrg.serving.predictor import ReportPredictor

    folder, settings = run_model(args.run_dir.resolve(), args.center)
    t = time.perf_counter()
    predictor = ReportPredictor.from_folder(folder, settings)
    load_s = time.perf_counter() - t
    study = example_study(settings.image_size, args.views)
    calls = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        [prediction] = predictor.predict([study])
        calls.append(time.perf_counter() - t)
    tokens = int(predictor.model.last_tokens.shape[1])

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, png in enumerate(study):
            paths.append(Path(tmp) / f"view{i + 1}.png")
            paths[-1].write_bytes(png)
        command = [sys.executable, "-m", "fedmrg", "generate", "--run",
                   str(args.run_dir.resolve()), ",".join(map(str, paths))]
        if args.center:
            command += ["--center", args.center]
        t = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=_common.ROOT)
        command_s = time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"fedmrg generate failed: {done.stderr.strip()[-500:]}")

    record = {
        "command": _common.command_line("generate.py", argv),
        "machine": _common.machine_info(torch_threads=torch.get_num_threads()),
        "args": {k: str(v) for k, v in vars(args).items()},
        "model": {"folder": str(folder), "personalized": settings.personalized,
                  "encoder": predictor.model.cfg.encoder, "lm": predictor.model.cfg.lm,
                  "image_size": settings.image_size, "generation": settings.generation},
        "study_views": len(study),
        "import_s": round(import_s, 3),
        "load_s": round(load_s, 3),
        "first_predict_s": round(calls[0], 3),
        "predict_s_median": round(_common.median(calls[1:] or calls), 3),
        "predict_s_all": [round(c, 3) for c in calls],
        "report_tokens": tokens,
        "report": prediction.report,
        "generate_command_s": round(command_s, 2),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    _common.write_json(args.out, record)
    print(f"load {load_s:.2f} s, first predict {calls[0]:.2f} s, median "
          f"{record['predict_s_median']:.2f} s ({tokens} tokens); `fedmrg generate` "
          f"end to end {command_s:.1f} s -> {args.out}")
    return record


if __name__ == "__main__":
    main()
