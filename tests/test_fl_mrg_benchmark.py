"""benchmarks/fl_mrg.py, the FL-MRG benchmark table: its pure parts (the run matrix and the
budget rule, argument parsing, mean ± std, the tables, the target checks, the plot, `--resume`
records) on synthetic run records, and one tiny end-to-end invocation (one fedmrg run of one
round on a 2-center phantom) through `main`, then again with `--resume`, and
benchmarks/prompt_following.py on that finished run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_overrides

from fedmrg.config import load_config
from fedmrg.fl.strategies import make_strategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fl_mrg  # noqa: E402
from fl_mrg import BenchmarkError, RunSpec  # noqa: E402

# --------------------------------------------------------------------------- the run matrix


def matrix(**kw):
    args = dict(rounds=3, local_steps=5, n_centers=4, eval_every=0, experiment="bench",
                storage_path="/tmp/bench-storage")
    args.update(kw)
    return args


def test_run_matrix_is_seed_major_with_names_and_the_same_budget():
    rows = ["centralized", "local", "fedavg", "fedmrg", "fedmrg-no_specialized"]
    specs = fl_mrg.run_matrix(rows, [0, 7], **matrix())
    assert [s.name for s in specs[:5]] == [
        "centralized-base-seed0", "local-base-seed0", "fedavg-base-seed0",
        "fedmrg-base-seed0", "fedmrg-no_specialized-seed0"]
    assert [s.seed for s in specs] == [0] * 5 + [7] * 5
    steps = {}
    for spec in specs:
        cfg = make_strategy(load_config("default", spec.overrides)).cfg
        assert cfg.seed == spec.seed and cfg.federation.strategy == spec.strategy
        assert cfg.tracking.experiment == "bench"
        assert cfg.tracking.storage_path == "/tmp/bench-storage"
        steps[spec.row] = (cfg.federation.rounds, cfg.train.local_steps)
        # every round waits for every client: a failed one is retried, never left out
        assert cfg.federation.fraction == 1.0
        assert cfg.federation.min_clients == (1 if spec.row == "centralized" else 4)
    # every client 3 x 5 steps; centralized's one client as many as the 4 together
    assert all(steps[r] == (3, 5) for r in rows if r != "centralized")
    assert steps["centralized"] == (3, 20)
    rule = fl_mrg.budget_rule(3, 5, 4, 16)
    assert "3 rounds x 5 steps = 15 steps" in rule and "3 rounds x 20 steps = 60 steps" in rule


def test_each_ablation_switches_off_exactly_its_mechanism():
    base = {s.row: s for s in fl_mrg.run_matrix(fl_mrg.ROWS, [0], **matrix())}
    full = make_strategy(load_config("default", base["fedmrg"].overrides)).cfg.flat()
    expected = {
        "fedmrg-no_lowrank": {"federation.aggregation": "fedavg",
                              "federation.dense_update_rank": 0,
                              "federation.download_rank": 0},
        "fedmrg-no_contrastive": {"model.losses.contrastive_global": 0.0,
                                  "model.losses.contrastive_local": 0.0},
        "fedmrg-no_prompts": {"model.diagnosis_prompts": False},
        "fedmrg-no_mutual": {"model.losses.mutual": 0.0},
        "fedmrg-no_specialized": {"model.specialized_adapter": False,
                                  "model.losses.lm_personal": 0.0, "model.losses.mutual": 0.0},
        "fedmrg-int8": {"federation.wire_dtype": "int8"},  # the wire rows change only it
        "fedmrg-nf4": {"federation.wire_dtype": "nf4"},
    }
    assert set(expected) == {r for r in fl_mrg.ROWS if r.startswith("fedmrg-")}
    assert fl_mrg.parse_rows("wire") == ["fedmrg-int8", "fedmrg-nf4"]
    assert "fedmrg-int8" not in fl_mrg.parse_rows("ablations")
    for row, changes in expected.items():
        cfg = make_strategy(load_config("default", base[row].overrides)).cfg.flat()
        differ = {k: cfg[k] for k in cfg if cfg[k] != full[k]}
        assert differ == changes, row
        # and the full model really has the mechanism on
        assert all(full[k] != v for k, v in changes.items()), row


def test_extra_overrides_come_last_and_the_tracking_uri_only_when_given():
    (spec,) = fl_mrg.run_matrix(["fedavg"], [1], **matrix(tracking_uri="sqlite:////x.db"),
                                extra=["train.local_steps=2"])
    assert spec.overrides[-1] == "train.local_steps=2"
    assert "tracking.tracking_uri=sqlite:////x.db" in spec.overrides
    assert load_config("default", spec.overrides).train.local_steps == 2
    (plain,) = fl_mrg.run_matrix(["fedavg"], [1], **matrix())
    assert not any(o.startswith("tracking.tracking_uri=") for o in plain.overrides)


def test_bad_rows_seeds_and_budgets_are_named():
    assert fl_mrg.parse_rows("fedmrg, local,centralized") == ["centralized", "local", "fedmrg"]
    assert fl_mrg.parse_rows("ablations") == [f"fedmrg-{a}" for a in fl_mrg.ABLATIONS]
    assert fl_mrg.parse_rows("privacy") == ["ffa_lora-dp8", "ffa_lora-dp2", "ffa_lora-secagg"]
    assert fl_mrg.parse_rows("all") == list(fl_mrg.ROWS)
    with pytest.raises(BenchmarkError, match="'fedsgd'"):
        fl_mrg.parse_rows("fedmrg,fedsgd")
    with pytest.raises(BenchmarkError, match="no row"):
        fl_mrg.parse_rows(" , ")
    assert fl_mrg.parse_seeds("3") == [0, 1, 2]
    assert fl_mrg.parse_seeds("0,4,7") == [0, 4, 7]
    assert fl_mrg.parse_seeds("5,") == [5]
    for bad in ("x", "0", "1,1", "-1,2", ""):
        with pytest.raises(BenchmarkError, match="--seeds"):
            fl_mrg.parse_seeds(bad)
    with pytest.raises(BenchmarkError, match="one seed alone is a list: '0,'"):
        fl_mrg.parse_seeds("0")
    with pytest.raises(BenchmarkError, match="'fedsgd'"):
        fl_mrg.budget_overrides("fedsgd", 1, 1, 1)
    with pytest.raises(BenchmarkError, match="local steps \\(0\\)"):
        fl_mrg.budget_overrides("fedmrg", 1, 0, 4)
    assert issubclass(BenchmarkError, ValueError)


# --------------------------------------------------------------------------- records


def summary(*, gen=0.2, heldout=(0.1, 0.3), pers=0.4, up=1000.0, down=3000.0, rounds=2):
    """A `Result.summary()` of a 2-center run with two held-out centers."""
    def m(v):
        return {k: v for k in fl_mrg.METRICS} | {"num_studies": 10}

    return {
        "centers": ["a", "b"], "wall_s": 12.0,
        "generalization": {"per_center": {"a": m(gen), "b": m(gen), "x": m(heldout[0]),
                                          "y": m(heldout[1])}, "mean": m(gen)},
        "personalization": {"per_center": {"a": m(pers), "b": m(pers)}, "mean": m(pers)},
        "communication": {"bytes_up_total": up, "bytes_down_total": down},
        "rounds": [{"round_id": i, "participants": ["a", "b"], "rejected": {},
                    "bytes_up": up / rounds, "bytes_down": down / rounds, "round_time_s": 1.0,
                    "metrics": {"loss": 5.0 - i, "lm_generic": 4.0 - i, "steps": 3.0}}
                   for i in range(1, rounds + 1)],
        "mlflow": {"tracking_uri": "sqlite:///x.db", "run_id": "r1"}, "storage_dir": "/s",
    }


def record(row="fedmrg", seed=0, product="c1", beams=1, **kw):
    strategy, _, ablation = row.partition("-")
    spec = RunSpec(row, strategy, ablation or fl_mrg.BASE, seed, ("a=1",))
    return fl_mrg.run_record(spec, summary(**kw), [], wall_s=60.0, loadavg_start=[1, 1, 1],
                             loadavg_end=[2, 2, 2], git_commit="tree", product=product,
                             generation={"num_beams": beams, "max_new_tokens": 160})


def test_final_metrics_take_the_heldout_centers_and_the_bytes():
    s = summary()
    s["personalization"]["mean"]["cider"] = math.nan
    final = fl_mrg.final_metrics(s)
    assert final["generalization/bleu4"] == 0.2
    assert final["heldout/bleu4"] == pytest.approx(0.2)  # mean of the centers not trained on
    assert final["personalization/cider"] is None  # NaN is "no value", never a number
    assert final["bytes_total"] == 4000.0 and final["bytes_up"] == 1000.0


def test_evaluations_by_round_average_heldout_centers_and_keep_every_step():
    keys = fl_mrg.evaluation_keys(["x", "y"])
    assert keys["heldout/bleu4"] == ("generalization/x/bleu4", "generalization/y/bleu4")
    histories = {"generalization/bleu4": [(2, 0.1), (4, 0.2)],
                 "generalization/x/bleu4": [(2, 0.0), (4, 0.4)],
                 "generalization/y/bleu4": [(2, 0.2), (4, math.nan)],
                 "personalization/bleu4": [(4, 0.5)]}
    rows = fl_mrg.evaluations_by_round(histories, keys)
    assert rows == [{"round": 2, "generalization/bleu4": 0.1, "heldout/bleu4": 0.1},
                    {"round": 4, "generalization/bleu4": 0.2, "heldout/bleu4": 0.4,
                     "personalization/bleu4": 0.5}]


def test_run_record_falls_back_to_the_final_evaluation_and_keeps_round_losses():
    r = record()
    assert r["name"] == "fedmrg-base-seed0" and r["overrides"] == ["a=1"]
    assert [x["round"] for x in r["rounds"]] == [1, 2]
    assert r["rounds"][1]["lm_generic"] == 2.0 and "steps" not in r["rounds"][1]
    (last,) = r["evaluations"]  # MLflow gave nothing: the final metrics at the last round
    assert last["round"] == 2 and last["personalization/bleu4"] == 0.4
    json.dumps(r)  # plain JSON


def test_runs_of_other_code_or_generation_settings_are_flagged():
    same = [record("fedmrg"), record("local")]
    assert fl_mrg.consistency(same) == []
    mixed = [record("fedmrg"), record("local", product="c2"), record("fedavg", beams=3)]
    problems = fl_mrg.consistency(mixed)
    assert len(problems) == 2
    lost = record("fedavg")
    lost["rounds"][1]["rejected"] = {"d": "failed: actor restarted"}
    (lost_problem,) = fl_mrg.consistency([lost])
    assert lost_problem == ("fedavg-base-seed0: client updates not aggregated in round(s) 2 (d); "
                            "it trained less than the budget")
    assert problems[0].startswith("2 different versions of the product code") and (
        "\"c2\" (local-base-seed0)" in problems[0])
    assert "2 different generation settings" in problems[1] and "fedavg-base-seed0" in (
        problems[1])


def test_product_version_changes_with_the_product_code_only(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "fedmrg").mkdir()
    (tmp_path / "fedmrg" / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("r\n")
    git("add", ".")
    git("commit", "-qm", "one")
    clean = fl_mrg.product_version(tmp_path)
    assert len(clean) == 40 and "+" not in clean
    (tmp_path / "README.md").write_text("changed\n")  # not product code
    git("commit", "-qam", "readme")
    assert fl_mrg.product_version(tmp_path) == clean
    (tmp_path / "fedmrg" / "a.py").write_text("x = 2\n")
    edited = fl_mrg.product_version(tmp_path)
    assert edited.startswith(clean + "+dirty.")
    (tmp_path / "fedmrg" / "new.py").write_text("y = 1\n")  # untracked, still imported
    assert fl_mrg.product_version(tmp_path) not in (clean, edited)
    assert fl_mrg.product_version(tmp_path / "fedmrg" / "..") == fl_mrg.product_version(tmp_path)
    assert fl_mrg.product_version(tmp_path.parent / "no-such-dir") == "unknown"


# --------------------------------------------------------------------------- aggregation


def test_mean_std_and_its_formatting():
    mean, std, n = fl_mrg.mean_std([0.1, 0.2, None, math.nan, 0.3])
    assert (round(mean, 6), round(std, 6), n) == (0.2, 0.1, 3)
    assert fl_mrg.mean_std([0.5]) == (0.5, None, 1)
    assert fl_mrg.mean_std([None]) == (None, None, 0)
    assert fl_mrg.format_mean_std(0.2, 0.1) == "0.200 ± 0.100"
    assert fl_mrg.format_mean_std(0.2, None) == "0.200"
    assert fl_mrg.format_mean_std(None, None) == "n/a"
    assert fl_mrg.format_bytes(21_600_000, 100_000) == "21.6 MB ± 0.1"
    assert fl_mrg.format_bytes(276) == "276 B" and fl_mrg.format_bytes(None) == "n/a"
    assert fl_mrg.format_bytes(1.5e9) == "1.5 GB" and fl_mrg.format_bytes(2048) == "2.0 KB"


def test_tables_show_mean_and_std_per_row_in_the_table_order():
    records = [record("local", gen=0.5), record("fedmrg", 0, pers=0.1),
               record("fedmrg", 1, pers=0.2), record("fedmrg", 2, pers=0.3),
               record("fedmrg-no_mutual", pers=0.05)]
    agg = fl_mrg.aggregate(records)
    assert list(agg) == ["local", "fedmrg", "fedmrg-no_mutual"]
    assert agg["fedmrg"]["seeds"] == [0, 1, 2]
    text = fl_mrg.results_tables(agg)
    personalization = text.split("**personalization**")[1].split("**cost**")[0]
    fedmrg_line = next(line for line in personalization.splitlines()
                       if line.startswith("| fedmrg | 3 |"))
    assert fedmrg_line.count("0.200 ± 0.100") == len(fl_mrg.METRICS)
    assert "| fedmrg w/o mutual boosting | 1 | 0.050 |" in personalization
    generalization = text.split("**heldout**")[0]
    assert "| local | 1 | 0.500 |" in generalization
    cost = text.split("**cost**")[1]
    assert "| fedmrg | 3 | 4.0 KB ± 0.0 | 1.0 KB ± 0.0 | 3.0 KB ± 0.0 | 1.0 ± 0.0 |" in cost


def test_report_tables_records_of_several_invocations_and_names_bad_ones(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    paths = []
    for rec in (record("local", 0, gen=0.5), record("fedmrg", 0, product="c2", pers=0.1),
                record("fedmrg", 1, product="c2", pers=0.3)):
        paths.append(runs / f"{rec['name']}.json")
        paths[-1].write_text(json.dumps(rec))
    out = tmp_path / "out"
    assert fl_mrg.main(["--quick", "--report", *map(str, paths), "--out", str(out)]) == 0
    doc = json.loads((out / "quick.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["local-base-seed0", "fedmrg-base-seed0",
                                                "fedmrg-base-seed1"]
    assert doc["rows"] == ["local", "fedmrg"] and doc["seeds"] == [0, 1]
    assert doc["aggregate"]["fedmrg"]["stats"]["personalization/bleu4"][0] == pytest.approx(0.2)
    assert "2 different versions of the product code" in doc["consistency"][0]
    assert (out / "quick.md").is_file() and (out / "quick_rounds.png").stat().st_size > 0
    assert "WARNING, runs not comparable" in capsys.readouterr().out
    with pytest.raises(BenchmarkError, match="the same run twice"):
        fl_mrg.main(["--quick", "--report", str(paths[1]), str(paths[1]), "--out", str(out)])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(BenchmarkError, match=f"{bad}: not a run record"):
        fl_mrg.main(["--quick", "--report", str(bad), "--out", str(out)])


def test_per_round_series_are_means_over_seeds():
    records = [record("fedmrg", 0, pers=0.1), record("fedmrg", 1, pers=0.3)]
    records[1]["rounds"][0]["lm_generic"] = 5.0  # seed 1, round 1 (seed 0: 3.0)
    series = fl_mrg.per_round_series(records)["fedmrg"]
    assert series["train/lm_generic"] == [(1, 4.0), (2, 2.0)]
    assert series["personalization/bleu4"] == [(2, pytest.approx(0.2))]


# --------------------------------------------------------------------------- targets


def agg_of(values: dict[str, dict[str, float]], std: float | None = None) -> dict:
    return {row: {"seeds": [0], "stats": {k: (v, std, 1) for k, v in metrics.items()}}
            for row, metrics in values.items()}


def test_targets_met_missed_and_skipped():
    pers = {"personalization/ce_f1_macro": 0.5, "personalization/bleu4": 0.2,
            "heldout/ce_f1_macro": 0.3, "heldout/bleu4": 0.1,
            "generalization/ce_f1_macro": 0.45, "bytes_total": 100.0}
    agg = agg_of({"fedmrg": pers,
                  "fedavg": {**pers, "personalization/ce_f1_macro": 0.4,
                             "personalization/bleu4": 0.3},
                  "centralized": {"generalization/ce_f1_macro": 0.5}}, std=0.05)
    targets = fl_mrg.check_targets(agg)
    by = {c["target"]: c for c in targets["checks"]}
    beat_ce = by["fedmrg > fedavg on personalization/ce_f1_macro"]
    assert beat_ce["passed"] is True and beat_ce["delta"] == pytest.approx(0.1)
    assert beat_ce["margin_std"] == pytest.approx(2.0)  # 0.1 / pooled std 0.05
    assert by["fedmrg > fedavg on personalization/bleu4"]["passed"] is False
    assert by["fedmrg > local on heldout/bleu4"]["passed"] is None  # local did not run
    assert "local" in by["fedmrg > local on heldout/bleu4"]["detail"]
    fraction = by["fedmrg generalization/ce_f1_macro >= 90% of centralized"]
    assert fraction["passed"] is True and fraction["ratio"] == pytest.approx(0.9)
    assert (targets["passed"], targets["decided"]) == (2, 3)
    agg["centralized"]["stats"]["generalization/ce_f1_macro"] = (0.51, None, 1)
    again = {c["target"]: c for c in fl_mrg.check_targets(agg)["checks"]}
    assert again["fedmrg generalization/ce_f1_macro >= 90% of centralized"]["passed"] is False
    text = fl_mrg.targets_text(targets)
    assert "2 of 3 met" in text and "MISSED: fedmrg > fedavg on personalization/bleu4" in text


def test_ablation_contribution_is_full_minus_ablated():
    full = {"personalization/bleu4": 0.2, "generalization/bleu4": 0.1, "bytes_total": 100.0}
    agg = agg_of({"fedmrg": full,
                  "fedmrg-no_lowrank": {**full, "generalization/bleu4": 0.15,
                                        "bytes_total": 2500.0},
                  "fedmrg-no_mutual": {**full, "personalization/bleu4": 0.15}})
    ablations = fl_mrg.check_targets(agg)["ablations"]
    lowrank, mutual = ablations["fedmrg-no_lowrank"], ablations["fedmrg-no_mutual"]
    assert lowrank["contribution"]["generalization/bleu4"] == pytest.approx(-0.05)
    assert lowrank["hurts_on"] == ["generalization/bleu4"]
    assert lowrank["bytes_ratio_without"] == 25.0
    assert mutual["helps_on"] == ["personalization/bleu4"] and not mutual["hurts_on"]
    assert mutual["contribution"]["heldout/bleu4"] is None  # no value on either side
    text = fl_mrg.targets_text(fl_mrg.check_targets(agg))
    assert "| fedmrg w/o mutual boosting | " in text and "+0.0500" in text and "| 25.00 |" in text


# --------------------------------------------------------------------------- plot, resume


def test_plot_writes_a_png_with_one_line_per_row(tmp_path):
    import matplotlib.image

    series = fl_mrg.per_round_series([record("fedmrg"), record("local", pers=0.3),
                                      record("fedmrg-no_prompts")])
    path = fl_mrg.write_plot(series, tmp_path / "p" / "rounds.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 1000 and height > 700
    # a panel with no data (no periodic evaluation) still writes the figure
    fl_mrg.write_plot({"fedmrg": {"train/lm_generic": [(1, 3.0)]}}, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 0


def test_resume_accepts_only_a_record_made_with_the_same_overrides(tmp_path):
    spec = RunSpec("fedmrg", "fedmrg", "base", 0, ("a=1",))
    path = tmp_path / "fedmrg-base-seed0.json"
    path.write_text(json.dumps(record()))
    assert fl_mrg.load_recorded(path, spec)["name"] == "fedmrg-base-seed0"
    with pytest.raises(BenchmarkError, match="fedmrg-base-seed0.json.*'a=2'"):
        fl_mrg.load_recorded(path, RunSpec("fedmrg", "fedmrg", "base", 0, ("a=2",)))
    # where the files went is not a setting: a record copied from another --storage resumes
    path.write_text(json.dumps({**record(), "overrides": [
        "a=1", "tracking.storage_path=/elsewhere", "tracking.tracking_uri=sqlite:///x.db"]}))
    moved = RunSpec("fedmrg", "fedmrg", "base", 0, ("a=1", "tracking.storage_path=/here"))
    assert fl_mrg.load_recorded(path, moved)["name"] == "fedmrg-base-seed0"
    with pytest.raises(BenchmarkError, match="'a=2'"):
        fl_mrg.load_recorded(path, RunSpec("fedmrg", "fedmrg", "base", 0,
                                           ("a=2", "tracking.storage_path=/here")))
    path.write_text("{half")
    with pytest.raises(BenchmarkError, match="unreadable run record"):
        fl_mrg.load_recorded(path, spec)


def test_a_failed_run_is_continued_from_its_checkpoint_then_given_up(monkeypatch):
    spec = RunSpec("fedavg", "fedavg", "base", 0, ("a=1",))
    calls = []

    def flaky(spec, *, resume):
        calls.append(resume)
        if len(calls) < 2:
            raise RuntimeError("actor killed by the memory monitor")
        return record("fedavg")

    monkeypatch.setattr(fl_mrg, "run_one", flaky)
    r = fl_mrg.run_with_retries(spec, resume=False, retries=1)
    assert calls == [False, True]  # the retry continues the run (resume), never restarts it
    (failure,) = r["failed_attempts"]
    assert failure["error"] == "RuntimeError: actor killed by the memory monitor"
    assert r["wall_s"] == r["final"]["wall_s"] >= failure["wall_s"]
    calls.clear()
    with pytest.raises(RuntimeError, match="memory monitor"):
        fl_mrg.run_with_retries(spec, resume=False, retries=0)
    assert calls == [False]


# --------------------------------------------------------------------------- end to end


@pytest.mark.ray
@pytest.mark.slow
def test_one_tiny_run_end_to_end_then_resume_skips_it(ray_cluster, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    tiny = [o for o in tiny_overrides(tmp_path) if not o.startswith("federation.rounds=")]
    args = ["--quick", "--strategies", "fedmrg", "--rounds", "1", "--local-steps", "1",
            "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "storage"),
            "--tracking-uri", f"sqlite:///{tmp_path}/bench.db",
            *[a for o in tiny if not o.startswith("tracking.") for a in ("--set", o)],
            "--set", f"tracking.artifact_location={tmp_path}/artifacts",
            "--set", "eval.per_study=true"]
    assert fl_mrg.main(args) == 0
    doc = json.loads((tmp_path / "out" / "quick.json").read_text())
    (run,) = doc["runs"]
    assert run["name"] == "fedmrg-base-seed0" and not doc["failed"]
    assert [r["round"] for r in run["rounds"]] == [1] and run["rounds"][0]["participants"] == 2
    assert run["evaluations"][-1]["round"] == 1  # read back from the run's MLflow metrics
    assert run["final"]["generalization/bleu4"] is not None and run["final"]["bytes_up"] > 0
    assert doc["budget"]["n_centers"] == 2 and "1 rounds x 1 steps" in doc["budget"]["rule"]
    assert run["product_version"] == doc["product_version"] != "unknown"
    assert not doc["consistency"]
    assert run["generation"]["max_new_tokens"] == 24  # the tiny config's, as the run used it
    # every test study's items, per scope and center, from the clients' replies
    assert sorted(run["per_study"]) == ["generalization", "personalization"]
    for scope, centers in run["per_study"].items():
        for center, (items,) in centers.items():
            n = run["per_center"][scope][center]["num_studies"]
            assert len(items["ce_labels"]) == len(items["bleu"]) == n > 0
    assert (tmp_path / "out" / "runs" / "quick" / "fedmrg-base-seed0.json").is_file()
    assert (tmp_path / "out" / "quick_rounds.png").stat().st_size > 0
    assert "| fedmrg | 1 |" in (tmp_path / "out" / "quick.md").read_text()
    client = MlflowClient(f"sqlite:///{tmp_path}/bench.db")
    experiment = client.get_experiment_by_name("fl_mrg_benchmark_quick")
    names = [r.info.run_name for r in client.search_runs([experiment.experiment_id],
                                                         "tags.`fedmrg.role` = 'parent'")]
    assert names == ["fedmrg-base-seed0"]
    capsys.readouterr()
    # --resume: the recorded run is skipped (no new MLflow run), the outputs rewritten
    assert fl_mrg.main([*args, "--resume"]) == 0
    assert "[1/1] fedmrg-base-seed0: recorded" in capsys.readouterr().out
    assert len(client.search_runs([experiment.experiment_id],
                                  "tags.`fedmrg.role` = 'parent'")) == 1
    again = json.loads((tmp_path / "out" / "quick.json").read_text())
    assert again["runs"][0]["final"] == run["final"]

    # benchmarks/prompt_following.py reads the finished run's saved models back
    import prompt_following

    out = tmp_path / "prompt_following.json"
    run_dir = tmp_path / "storage" / "fedmrg-base-seed0"
    assert prompt_following.main([str(run_dir), "--centers", "a", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["path"], r["prompt"]) for r in rows) == [
        ("generic", "head"), ("generic", "oracle"), ("personalized", "head"),
        ("personalized", "oracle")]
    assert len({r["studies"] for r in rows}) == 1 and rows[0]["studies"] > 0  # a's test split
    for r in rows:
        assert r["center"] == "a"
        assert all(0.0 <= r[m] <= 1.0 for m in ("ce_f1_macro", "follows_prompt_f1_macro",
                                                  "bleu4"))
    with pytest.raises(SystemExit):  # a folder that is not a finished run is named, not read
        prompt_following.main([str(tmp_path / "out"), "--out", str(out)])

    # benchmarks/calibration.py: as trained, the personalized models score what the run did
    import calibration

    out = tmp_path / "calibration.json"
    assert calibration.main([str(run_dir), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (measured,) = doc["runs"]
    assert measured["as trained"]["mean"]["ce_f1_macro"] == pytest.approx(
        run["final"]["personalization/ce_f1_macro"])
    assert measured["strategy"] == "fedmrg" and measured["seed"] == 0
    assert sorted(doc["minus_as_trained"]["fedmrg"]) == ["calibrated", "head tuned"]
    for cis in doc["minus_as_trained"]["fedmrg"].values():
        ci = cis["bleu4"]
        assert ci["units"] == 2 and ci["lo"] <= ci["diff"] <= ci["hi"]
    assert doc["between_strategies"] == {}  # one strategy: nothing to compare it with
    assert "paired 95% CI" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):  # the same strategy and seed twice is not two samples
        calibration.main([str(run_dir), str(run_dir), "--out", str(out)])


def _bleu_counts(rng: np.random.Generator, n: int, match: float) -> list[list[int]]:
    """n studies' BLEU counts (fedmrg.eval.nlg.bleu_statistics layout): 20 tokens each, a
    reference of 20, `match` of every n-gram order matched."""
    guess = [20, 19, 18, 17]
    return [[20, 20, *guess, *(int(rng.binomial(g, match)) for g in guess)] for _ in range(n)]


def test_targets_get_paired_intervals_where_records_have_per_study_items():
    rng = np.random.default_rng(0)
    records = []
    for seed in (0, 1):
        ref = (rng.random((40, 14)) < 0.3).astype(int)
        items = {}  # fedmrg-no_mutual gets fedmrg's exact items
        for row, match, flip in (("fedmrg", 0.5, 0.1), ("fedavg", 0.3, 0.3),
                                 ("fedmrg-no_mutual", None, None)):
            r = record(row, seed)
            if match is not None:
                hyp = np.where(rng.random(ref.shape) < flip, 1 - ref, ref)
                models = [{"ce_labels": [[h.tolist(), t.tolist()] for h, t in
                                         zip(hyp, ref, strict=True)],
                           "bleu": _bleu_counts(rng, 40, match)}]
                items[row] = {"a": models, "b": models}
            r["per_study"] = {"personalization": items[row if match is not None else "fedmrg"]}
            records.append(r)
    records.append(record("local", 0))  # an older record: no per-study items
    targets = fl_mrg.check_targets(fl_mrg.aggregate(records), records)
    by = {c["target"]: c for c in targets["checks"]}
    bleu = by["fedmrg > fedavg on personalization/bleu4"]["ci95"]
    assert bleu["units"] == 4 and bleu["studies"] == 160
    assert 0 < bleu["lo"] < bleu["diff"] < bleu["hi"] and bleu["resolved"]
    ce = by["fedmrg > fedavg on personalization/ce_f1_macro"]["ci95"]
    assert ce["units"] == 4 and 0 < ce["lo"] < ce["diff"] < ce["hi"] and ce["resolved"]
    assert "paired 95% CI [" in by["fedmrg > fedavg on personalization/bleu4"]["detail"]
    local = by["fedmrg > local on personalization/bleu4"]
    assert local["ci95"] is None and local["detail"].endswith(fl_mrg.NO_PER_STUDY)
    mutual = targets["ablations"]["fedmrg-no_mutual"]["ci95"]
    assert mutual["personalization/bleu4"]["diff"] == pytest.approx(0.0)
    assert (mutual["personalization/bleu4"]["lo"], mutual["personalization/bleu4"]["hi"]) == (
        pytest.approx(0.0), pytest.approx(0.0))
    assert mutual["generalization/bleu4"] is None
    text = fl_mrg.targets_text(targets)
    assert "paired bootstrap 95% intervals" in text and fl_mrg.NO_PER_STUDY in text


def test_per_study_items_split_heldout_from_participating_and_average_models():
    rng = np.random.default_rng(1)
    ref = (rng.random((30, 14)) < 0.3).astype(int)

    def model(flip, match):
        hyp = np.where(rng.random(ref.shape) < flip, 1 - ref, ref)
        return {"ce_labels": [[h.tolist(), t.tolist()] for h, t in zip(hyp, ref, strict=True)],
                "bleu": _bleu_counts(rng, 30, match)}

    good, bad = model(0.05, 0.6), model(0.4, 0.2)
    s = summary()
    s["generalization"]["per_study"] = {"a": [good], "x": [good, bad]}  # x: two local models
    s["personalization"]["per_study"] = {"a": [good]}
    items = fl_mrg.per_study_items(s)
    assert sorted(items) == ["generalization", "heldout", "personalization"]
    assert list(items["generalization"]) == ["a"] and list(items["heldout"]) == ["x"]
    one, two = record("fedmrg"), record("local")
    one["per_study"] = {"heldout": {"x": [good]}}
    two["per_study"] = {"heldout": {"x": [good, bad]}}
    ci = fl_mrg.paired_interval([one, two], "fedmrg", "local", "heldout/ce_f1_macro")
    from fedmrg.eval.bootstrap import ce_f1_macro_of_studies
    expected = ce_f1_macro_of_studies(good["ce_labels"]) - (
        ce_f1_macro_of_studies(good["ce_labels"]) + ce_f1_macro_of_studies(bad["ce_labels"])) / 2
    assert ci["diff"] == pytest.approx(expected) and ci["lo"] > 0 and ci["studies"] == 30
    assert fl_mrg.paired_interval([one, two], "fedmrg", "local", "heldout/rouge_l") is None


def test_calibration_pairs_strategies_on_the_seed_and_center_both_hold():
    import calibration

    rng = np.random.default_rng(1)
    ref = (rng.random((30, 14)) < 0.3).astype(int)

    def items(flip: float, match: float) -> dict:
        hyp = np.where(rng.random(ref.shape) < flip, 1 - ref, ref)
        return {"ce_labels": [[h.tolist(), t.tolist()] for h, t in zip(hyp, ref, strict=True)],
                "bleu": _bleu_counts(rng, len(ref), match)}

    good = {(0, "a"): items(0.05, 0.6), (1, "a"): items(0.05, 0.6), (2, "a"): items(0.05, 0.6)}
    poor = {(0, "a"): items(0.4, 0.2), (1, "a"): items(0.4, 0.2)}  # no seed 2
    cis = calibration.paired_intervals(good, poor)
    for ci in cis.values():  # seed 2 has nothing to pair with: left out, not mixed in
        assert ci["units"] == 2 and ci["studies"] == 60
        assert ci["resolved"] and 0 < ci["lo"] <= ci["diff"] <= ci["hi"]
    flipped = calibration.paired_intervals(poor, good)
    assert flipped["bleu4"]["diff"] == pytest.approx(-cis["bleu4"]["diff"])
    with pytest.raises(ValueError, match="in common"):
        calibration.paired_intervals(good, {(5, "b"): poor[(0, "a")]})
