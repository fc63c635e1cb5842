"""The README's, docs/results.md's and docs/privacy.md's numbers, generated from the recorded
runs.

Usage (from the repository root):

    python benchmarks/readme_results.py           # rewrite the generated blocks in place
    python benchmarks/readme_results.py --check   # exit 1, naming each stale block

A generated block sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`; the text
around it is written by hand. Every block comes from the run records of the current default's
FL-MRG table (`CURRENT_TABLE`, written by `benchmarks/fl_mrg.py --report`), aggregated again
here with fl_mrg.py's own functions (`aggregate`, `check_targets`, `results_tables`,
`targets_text`), so a number in the docs is always what the records say:

- README.md `status`: how many quality targets fedmrg meets, and which it misses; and, when
  the runs decoded otherwise than today's default `eval.*` settings, which and how;
- README.md `table`: one compact table (every strategy row, the main metrics, bytes per run);
- docs/results.md `fl_mrg`: the full tables, target checks and ablations, as `--report` prints;
- README.md and docs/privacy.md `privacy`: the privacy rows (`PRIVACY_TABLE`, DP and secure
  aggregation on ffa_lora) against the non-private `ffa_lora` row of `CURRENT_TABLE`: epsilon,
  quality and its cost (the difference in generic CE-F1 macro), bytes, wall time.
- README.md `evidence` and docs/results.md `evidence`: the evidence table (`EVIDENCE_TABLE`,
  `fl_mrg.py --preset evidence`: 150 test studies per center, per-study records): the
  headline rows, and every comparison (targets, quantized wires) with its paired bootstrap
  95% interval over test studies; docs/results.md gets the full `--report` text;
- docs/results.md `calibration`, `head_by_strategy` and `vs_flower`: the tables
  `benchmarks/calibration.py` (`CALIBRATION`, `HEAD_BY_STRATEGY`) and
  `benchmarks/vs_flower.py` (`VS_FLOWER`) wrote beside their JSON.

`tests/test_readme.py` regenerates every block in memory and fails when a file differs. After a
new `--report` into `CURRENT_TABLE` (or after pointing it at another table), run this script.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fl_mrg
from _common import ROOT, markdown_table

# The current default's FL-MRG table (3 seeds, diagnosis head sent whole).
CURRENT_TABLE = Path("benchmarks/results/fl_mrg/lora_strategies/full.json")
README = Path("README.md")
RESULTS_DOC = Path("docs/results.md")
# The privacy rows (benchmarks/fl_mrg.py PRIVACY), compared with CURRENT_TABLE's ffa_lora.
PRIVACY_TABLE = Path("benchmarks/results/fl_mrg/privacy/full.json")
PRIVACY_DOC = Path("docs/privacy.md")
PRIVACY_REFERENCE = "ffa_lora"
# The evidence table (fl_mrg.py --preset evidence) and the head calibration measured on its
# fedmrg runs (benchmarks/calibration.py).
EVIDENCE_TABLE = Path("benchmarks/results/fl_mrg/evidence/full.json")
CALIBRATION = Path("benchmarks/results/calibration.json")
# the same script on fedmrg, fedavg and local runs: every strategy with its head tuned
HEAD_BY_STRATEGY = Path("benchmarks/results/head_by_strategy.json")
VS_FLOWER = Path("benchmarks/results/vs_flower.json")  # benchmarks/vs_flower.py

# The compact table's columns: (final metric key, header).
COMPACT_COLUMNS = (
    ("generalization/ce_f1_macro", "generic CE-F1"),
    ("generalization/bleu4", "generic BLEU-4"),
    ("heldout/ce_f1_macro", "held-out CE-F1"),
    ("personalization/ce_f1_macro", "personal CE-F1"),
    ("personalization/bleu4", "personal BLEU-4"),
)


class ResultsDocError(ValueError):
    """A results file or a marked document is not what this script expects; says which."""


def load_table(root: Path = ROOT, table: Path = CURRENT_TABLE) -> dict[str, Any]:
    """The `--report` document at `table` (relative to `root`), checked to hold run records."""
    path = root / table
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ResultsDocError(f"{table}: cannot read the FL-MRG table ({e})") from None
    if not isinstance(document, dict) or not document.get("runs"):
        raise ResultsDocError(f"{table}: no 'runs' (not written by benchmarks/fl_mrg.py)")
    return document


def _seeds(records: Sequence[Mapping[str, Any]], row: str) -> int:
    return len({r["seed"] for r in records if r["row"] == row})


KEY_WORDS = {"generalization": "generic", "heldout": "held-out", "personalization": "personalized",
             "ce_f1_macro": "CE-F1 macro", "bleu4": "BLEU-4"}


def _key_words(key: str) -> str:
    """`personalization/ce_f1_macro` -> `personalized CE-F1 macro`."""
    return " ".join(KEY_WORDS.get(part, part) for part in key.split("/"))


def _missed_words(check: Mapping[str, Any]) -> str:
    """One missed target in words, with its numbers (fl_mrg.check_targets' entries)."""
    beats = re.fullmatch(r"(\S+) > (\S+) on (\S+)", check["target"])
    if check["kind"] == "beats" and beats:
        winner, loser, key = beats.groups()
        margin = check.get("margin_std")
        spread = "" if margin is None else f", {margin:+.1f} pooled std"
        return (f"{_key_words(key)} against {loser} "
                f"({check[winner]:.3f} vs {check[loser]:.3f}{spread})")
    if check["kind"] == "fraction":
        return (f"{fl_mrg.CENTRALIZED_FRACTION:.0%} of centralized generic CE-F1 macro "
                f"({check['ratio']:.0%})")
    return f"{check['target']} ({check['detail']})"


def decoding_note(records: Sequence[Mapping[str, Any]]) -> str:
    """'' when every run decoded with today's default `eval.*` generation settings; else one
    sentence naming each setting the runs used and today's default (a setting a record lacks
    did not exist when it ran: it was off)."""
    from fedmrg.config import load_config
    from fedmrg.eval.evaluator import generation_kwargs

    now = generation_kwargs(load_config("default").eval)
    used: dict[str, set[str]] = {}
    for record in records:
        settings = record.get("generation") or {}
        for key, value in now.items():
            if settings.get(key, None) != value:
                used.setdefault(key, set()).add(repr(settings[key]) if key in settings
                                                else "off (before the setting existed)")
    if not used:
        return ""
    return ("The runs decoded with " + "; ".join(
        f"`eval.{k}` {' / '.join(sorted(v))}, the default now {now[k]!r}"
        for k, v in sorted(used.items())) + ".")


def status_block(agg: Mapping[str, Any], targets: Mapping[str, Any], table: Path) -> str:
    """One sentence: targets met, which are missed (with both numbers), where from."""
    missed = [c for c in targets["checks"] if c["passed"] is False]
    seeds = len(agg.get("fedmrg", {}).get("seeds", ()))
    text = (f"On the FL-MRG benchmark ({seeds} seeds) fedmrg meets "
            f"**{targets['passed']} of {targets['decided']}** quality targets")
    if missed:
        text += "; it misses " + " and ".join(_missed_words(c) for c in missed)
        margins = [c.get("margin_std") for c in missed]
        if all(m is not None and abs(m) < 1 for m in margins):
            text += (", each by less than one standard deviation of the seeds" if len(missed) > 1
                     else ", by less than one standard deviation of the seeds")
    return text + f" (`{table.as_posix()}`)."


def compact_table(agg: Mapping[str, Any]) -> str:
    """Every strategy row (ablations left to docs/results.md): mean ± std of the main
    metrics over seeds, and bytes per run (all clients, up and down)."""
    header = ["strategy", "seeds", *(h for _, h in COMPACT_COLUMNS), "bytes per run"]
    rows = []
    for row, a in agg.items():
        if row.startswith("fedmrg-"):  # an ablation (fl_mrg.ABLATIONS)
            continue
        stats = a["stats"]
        name = f"**{row}** (default)" if row == "fedmrg" else row
        rows.append([name, len(a["seeds"]),
                     *(fl_mrg.format_mean_std(*stats.get(k, (None, None, 0))[:2])
                       for k, _ in COMPACT_COLUMNS),
                     fl_mrg.format_bytes(stats["bytes_total"][0])])
    return markdown_table(header, rows)


def privacy_table(reference: Mapping[str, Any], privacy_records: Sequence[Mapping[str, Any]]
                  ) -> str:
    """The non-private `PRIVACY_REFERENCE` row of `reference` (an `aggregate`) and each
    privacy row: seeds, epsilon at the run's delta, generic and held-out CE-F1 macro, the
    difference in generic CE-F1 macro to the reference (the cost in quality), generic BLEU-4,
    bytes up and in all, wall time; mean ± std over seeds."""
    agg = {PRIVACY_REFERENCE: reference[PRIVACY_REFERENCE],
           **{row: a for row, a in fl_mrg.aggregate(privacy_records).items()
              if row != PRIVACY_REFERENCE}}
    base = agg[PRIVACY_REFERENCE]["stats"]["generalization/ce_f1_macro"][0]
    header = ["row", "seeds", "epsilon", "generic CE-F1", "vs ffa_lora", "held-out CE-F1",
              "generic BLEU-4", "bytes up", "bytes per run", "wall (min)"]
    rows = []
    for row, a in agg.items():
        s = a["stats"]
        spent = [r["privacy"].get("epsilon") for r in privacy_records
                 if r["row"] == row and (r.get("privacy") or {}).get("mode") not in (None, "none")]
        # the accountant's: the same for every seed of a row
        epsilon = fl_mrg.format_mean_std(fl_mrg.mean_std(spent)[0], None, 2) if spent else "none"
        ce = s.get("generalization/ce_f1_macro", (None, None, 0))
        cost = "" if row == PRIVACY_REFERENCE or ce[0] is None else f"{ce[0] - base:+.3f}"
        wall = s.get("wall_s", (None, None, 0))
        rows.append([fl_mrg.row_label(row), len(a["seeds"]), epsilon,
                     fl_mrg.format_mean_std(*ce[:2]), cost,
                     fl_mrg.format_mean_std(*s.get("heldout/ce_f1_macro", (None, None))[:2]),
                     fl_mrg.format_mean_std(*s.get("generalization/bleu4", (None, None))[:2]),
                     fl_mrg.format_bytes(s["bytes_up"][0]),
                     fl_mrg.format_bytes(s["bytes_total"][0]),
                     fl_mrg.format_mean_std(*(None if v is None else v / 60
                                              for v in wall[:2]), 1)])
    return markdown_table(header, rows)


def full_block(agg: Mapping[str, Any], targets: Mapping[str, Any],
               records: Sequence[Mapping[str, Any]]) -> str:
    """What `fl_mrg.py --report` prints: the tables, target checks, ablations, warnings."""
    parts = [fl_mrg.results_tables(agg), "", fl_mrg.targets_text(targets)]
    problems = fl_mrg.consistency(records)
    if problems:
        parts += ["", "**warning, runs not comparable**: " + " | ".join(problems)]
    return "\n".join(parts)


def interval_lines(targets: Mapping[str, Any]) -> list[str]:
    """One line per decided comparison with a paired interval: the targets, then each wire
    row's quality cost (fedmrg minus it) on the main metrics."""
    lines = []
    for c in targets["checks"]:
        ci = c.get("ci95")
        beats = re.fullmatch(r"(\S+) > (\S+) on (\S+)", c["target"])
        if ci is None or not beats:
            continue
        winner, loser, key = beats.groups()
        verdict = ("resolved: " + (f"{winner} ahead" if ci["lo"] > 0 else f"{loser} ahead")
                   if ci["resolved"] else "not resolved")
        lines.append(f"- {winner} - {loser}, {_key_words(key)}: {ci['diff']:+.3f} "
                     f"[{ci['lo']:+.3f}, {ci['hi']:+.3f}] ({verdict}; {ci['studies']} test "
                     f"studies in {ci['units']} seed x center sets)")
    for row, a in targets["ablations"].items():
        if row.removeprefix("fedmrg-") not in fl_mrg.WIRE:
            continue
        for key, ci in (a.get("ci95") or {}).items():
            if ci is None or not key.endswith(("ce_f1_macro", "bleu4")):
                continue
            wire = row.removeprefix("fedmrg-")
            verdict = ("resolved: " + ("fp32 ahead" if ci["lo"] > 0 else f"{wire} ahead")
                       if ci["resolved"] else "not resolved")
            lines.append(f"- fedmrg, fp32 wire - {fl_mrg.row_label(row)}, {_key_words(key)}: "
                         f"{ci['diff']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}] ({verdict}; "
                         f"{ci['studies']} test studies in {ci['units']} seed x center sets); "
                         f"bytes x{a['bytes_ratio_without']:.2f}")
    return lines


def evidence_blocks(root: Path, table: Path) -> tuple[str, str]:
    """(README block, docs/results.md block) of the evidence table."""
    document = load_table(root, table)
    records = document["runs"]
    agg = fl_mrg.aggregate(records)
    targets = fl_mrg.check_targets(agg, records)
    sizes = sorted({len(models[0]["bleu"]) for r in records for models in
                    (r.get("per_study") or {}).get("personalization", {}).values()})
    head = (f"{len(records)} runs, command `{document['command']}`, "
            f"{document['machine']['nproc']} cores ({document['machine']['cpu']}); "
            f"{' or '.join(map(str, sizes)) or 'no'} test studies per center.")
    readme = "\n".join([head, "", compact_table(agg), "", "Paired bootstrap 95% intervals "
                        "(over test studies, paired across rows, pooled over seeds):", "",
                        *interval_lines(targets)])
    return readme, "\n".join([head, "", full_block(agg, targets, records)])


def recorded_markdown(root: Path, path: Path) -> str:
    """The markdown a benchmark wrote beside its JSON `path`, without its `# ` title line."""
    md = (root / path).with_suffix(".md")
    try:
        lines = md.read_text().strip().splitlines()
    except OSError as e:
        raise ResultsDocError(f"{md}: cannot read the benchmark's table ({e})") from None
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()


def blocks(root: Path = ROOT, table: Path = CURRENT_TABLE,
           privacy: Path = PRIVACY_TABLE) -> dict[Path, dict[str, str]]:
    """file -> block name -> generated markdown, from the records in `table` and `privacy`."""
    records = load_table(root, table)["runs"]
    agg = fl_mrg.aggregate(records)
    targets = fl_mrg.check_targets(agg)
    note = decoding_note(records)
    status = status_block(agg, targets, table) + (f" {note}" if note else "")
    full = full_block(agg, targets, records) + (f"\n\n{note}" if note else "")
    private = privacy_table(agg, load_table(root, privacy)["runs"])
    out = {README: {"status": status, "table": compact_table(agg), "privacy": private},
           RESULTS_DOC: {"fl_mrg": full}, PRIVACY_DOC: {"privacy": private}}
    if (root / EVIDENCE_TABLE).is_file():  # absent in a tree that has not run it yet
        out[README]["evidence"], out[RESULTS_DOC]["evidence"] = evidence_blocks(
            root, EVIDENCE_TABLE)
    for name, path in (("calibration", CALIBRATION), ("head_by_strategy", HEAD_BY_STRATEGY),
                       ("vs_flower", VS_FLOWER)):
        if (root / path).is_file():
            out[RESULTS_DOC][name] = recorded_markdown(root, path)
    return out


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- results:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /results:"
                      rf"{re.escape(name)} -->)", re.S)


def fill(markdown: str, generated: Mapping[str, str], where: str = "document") -> str:
    """`markdown` with every named block's body replaced; a missing block is an error."""
    for name, body in generated.items():
        pattern = _pattern(name)
        if not pattern.search(markdown):
            raise ResultsDocError(f"{where}: no <!-- results:{name} --> ... "
                                  f"<!-- /results:{name} --> block")
        markdown = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), markdown)
    return markdown


def stale(root: Path = ROOT, table: Path = CURRENT_TABLE) -> list[str]:
    """`file: block` for every generated block whose text differs from the records'."""
    out = []
    for path, generated in blocks(root, table).items():
        text = (root / path).read_text()
        for name, body in generated.items():
            if fill(text, {name: body}, str(path)) != text:
                out.append(f"{path}: {name}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a generated block is out of date")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = stale()
            for p in problems:
                print(f"out of date: {p} (run: python benchmarks/readme_results.py)")
            return 1 if problems else 0
        new = {path: fill((ROOT / path).read_text(), generated, str(path))
               for path, generated in blocks().items()}  # every block first, then write
        for path, text in new.items():
            (ROOT / path).write_text(text)
            print(f"updated {path}")
    except ResultsDocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
