"""Does each decoder path write what its diagnosis prompt says? Per finished run, per center.

Usage: ``python benchmarks/prompt_following.py RUN_DIR [RUN_DIR ...] [--centers a b]
[--out benchmarks/results/prompt_following.json]``

RUN_DIR is a finished run's folder (`<tracking.storage_path>/<run name>`, with `models/<center>`
saved by the product). For every center's own saved model and its test split (the run's
dataset), both decoder paths (generic; generic + specialized when the model has one) each with
both prompt sources:

- `head`: the diagnosis head's argmax, as evaluation and deployment prompt;
- `oracle`: the study's true labels (what training shows: `model.prompt_teacher_forcing`).

Reported per (path, prompt), mean over centers: CE-F1 macro of the generated reports against
the references (the benchmark's metric), **prompt following** (CE-F1 macro of the labeler on the
generated report against the states the prompt showed), and BLEU-4. With the oracle prompt the
two CE numbers coincide up to the labeler's reading of the references. Greedy decoding with the
run's `eval` settings. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: sets the environment before torch loads)
import numpy as np

DEFAULT_OUT = _common.RESULTS / "prompt_following.json"
PATHS = ("generic", "personalized")
PROMPTS = ("head", "oracle")


def center_rows(run_dir: Path, center: str, cfg: Any) -> list[dict[str, Any]]:
    """Every (path, prompt) of one center's own model on its test split."""
    from fedmrg.data.labeler import label_reports
    from fedmrg.data.stream import CenterStream
    from fedmrg.eval.clinical import compute_ce_metrics
    from fedmrg.eval.evaluator import evaluate_model, generation_kwargs
    from fedmrg.model.io import load_model

    model = load_model(run_dir / "models" / center)
    stream = CenterStream.from_config(cfg.data, center, "test", model.cfg.in_chans,
                                      tokenizer=model.tokenizer, seed=cfg.seed)
    batches = list(stream.iter_batches(0))
    truth = np.concatenate([b["labels"].numpy() for b in batches])
    generation = generation_kwargs(cfg.eval)
    rows = []
    for path in PATHS if model.cfg.specialized_adapter else PATHS[:1]:
        for prompt in PROMPTS:
            result = evaluate_model(model, batches, path == "personalized",
                                    oracle_prompt=prompt == "oracle", num_samples=2,
                                    **generation)
            shown = truth if prompt == "oracle" else result.predicted_states
            follows = compute_ce_metrics(shown, label_reports(result.reports))
            rows.append({"center": center, "path": path, "prompt": prompt,
                         "ce_f1_macro": result.metrics["ce_f1_macro"],
                         "follows_prompt_f1_macro": follows["ce_f1_macro"],
                         "bleu4": result.metrics["bleu4"],
                         "diag_f1_macro": result.metrics["diag_f1_macro"],
                         "studies": len(result.reports), "samples": result.samples})
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over centers per (run, path, prompt)."""
    keys = sorted({(r["run"], r["path"], r["prompt"]) for r in rows},
                  key=lambda k: (k[0], PATHS.index(k[1]), PROMPTS.index(k[2])))
    out = []
    for run, path, prompt in keys:
        sel = [r for r in rows if (r["run"], r["path"], r["prompt"]) == (run, path, prompt)]
        out.append({"run": run, "path": path, "prompt": prompt, "centers": len(sel),
                    **{m: float(np.mean([r[m] for r in sel]))
                       for m in ("ce_f1_macro", "follows_prompt_f1_macro", "bleu4")}})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished runs' folders")
    parser.add_argument("--centers", nargs="*", help="default: every saved center model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from fedmrg.config import load_config
    from fedmrg.experiment import RUN_CONFIG
    from fedmrg.ray_cluster import connect

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for run_dir in args.runs:
        run_dir = run_dir.expanduser().resolve()
        if not (run_dir / RUN_CONFIG).is_file() or not (run_dir / "models").is_dir():
            parser.error(f"{run_dir}: not a finished fedmrg run (needs {RUN_CONFIG} and models/)")
        cfg = load_config(str(run_dir / RUN_CONFIG))
        connect(cfg.resources)
        centers = args.centers or sorted(p.name for p in (run_dir / "models").iterdir())
        for center in centers:
            for row in center_rows(run_dir, center, cfg):
                rows.append({"run": run_dir.name, **row})
                print(f"{run_dir.name} {center} {row['path']:<12} {row['prompt']:<6} CE-F1 "
                      f"{row['ce_f1_macro']:.3f} follows {row['follows_prompt_f1_macro']:.3f} "
                      f"BLEU-4 {row['bleu4']:.3f}", flush=True)
    summary = summarize(rows)
    table = _common.markdown_table(
        ["run", "path", "prompt", "centers", "CE-F1 macro vs reference",
         "follows the prompt (CE-F1 macro)", "BLEU-4"],
        [[s["run"], s["path"], s["prompt"], s["centers"], f"{s['ce_f1_macro']:.3f}",
          f"{s['follows_prompt_f1_macro']:.3f}", f"{s['bleu4']:.3f}"] for s in summary],
        align="lllrrrr")
    print(table)
    _common.write_json(args.out, {
        "command": _common.command_line("prompt_following.py", argv),
        "machine": _common.machine_info(), "wall_s": time.perf_counter() - start,
        "summary": summary, "rows": rows, "table": table})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
