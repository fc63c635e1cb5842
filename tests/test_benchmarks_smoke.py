"""The performance benchmarks (benchmarks/comm.py, aggregation.py, overhead.py, scale.py) run
at their smallest setting and write valid JSON whose numbers hang together. Not timed: the
benchmarks measure; these tests check that they still run against the current code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import tiny_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import aggregation  # noqa: E402
import comm  # noqa: E402


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def read(path: Path) -> dict:
    record = json.loads(path.read_text())
    assert record["command"].startswith("python benchmarks/")
    assert record["machine"]["nproc"] >= 1 and record["args"]
    return record


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """One tiny dataset and base LM for the module (built by the first benchmark)."""
    return tmp_path_factory.mktemp("bench")


def test_comm_counts_the_round_messages_at_default_scale(tiny):
    out = tiny / "comm.json"
    comm.main(["--scales", "default", "--ranks", "4", "--aggregations", "exact", "--wires",
               "bf16", "--clients", "2", *sets(tiny_overrides(tiny)), "--out", str(out)])
    (row,) = read(out)["results"]
    c, shapes = row["counted"], row["shape_check"]
    assert set(c["up_by_dtype"]) >= {"bfloat16"} and "float32" not in c["up_by_dtype"]
    # the low-rank downlink delta is far smaller than the full state a lagging client gets
    assert c["down_delta"] < c["down_full"] / 2 and c["up"] < c["down_full"]
    assert c["up"] < c["dense_fedavg"] < c["full_model"]
    # the shape formula (used at paper scale) counts the tensors the messages carry
    for key in ("up", "down_delta", "down_full"):
        assert 0 < shapes[key] <= c[key], key
    assert shapes["full_model"] == c["full_model"] == c["full_model_fp32"] // 2


def test_aggregation_smallest_setting_agrees_with_the_dense_route(tmp_path):
    out = tmp_path / "aggregation.json"
    aggregation.main(["--sizes", "64", "--clients", "2", "--ranks", "4", "--out", str(out)])
    record = read(out)
    (row,) = record["results"]
    assert row["rel_diff"] < 1e-4 and row["exact_s"] > 0 and row["dense_s"] > 0
    assert record["target"]["worst_speedup"] is None  # no d = 4096 case was run


@pytest.mark.ray
@pytest.mark.slow
def test_overhead_one_client_one_rep(ray_cluster, tiny):
    import overhead

    out = tiny / "overhead.json"
    overhead.main(["--clients", "1", "--reps", "1", "--plain-threads", "1", "--keep-niceness",
                   *sets([*tiny_overrides(tiny), "train.local_steps=1"]), "--out", str(out)])
    (r,) = read(out)["results"]
    assert r["clients"] == 1 and len(r["runs"]["ray"]) == len(r["runs"]["plain_1"]) == 1
    ray_run = r["runs"]["ray"][0]
    assert 0 < ray_run["own_s"] < ray_run["round_s"] and ray_run["fit_s"]["a"] > 0
    assert ray_run["own_cpu_s"] > 0 and ray_run["wait_s"] > 0
    assert r["ratio"] == pytest.approx(r["ray_round_s"] / r["plain_round_s"]["1"])


@pytest.mark.ray
@pytest.mark.slow
def test_scale_clients_in_shared_actors_and_stub_clients(ray_cluster, tiny):
    import scale

    out = tiny / "scale.json"
    # K=1: one actor for c00; K=3: c01 and c02 added, hosted together by a second actor
    scale.main(["--clients", "1", "3", "--clients-per-actor", "2", "--stub-clients", "2", "4",
                "--rounds", "2", "--steps", "1", "--reserve-gib", "0", "--keep-niceness",
                *sets(tiny_overrides(tiny)), "--out", str(out)])
    record = read(out)
    one, three = record["results"]
    assert (one["clients"], one["actors_alive"]) == (1, 1)
    assert (three["clients"], three["clients_alive"], three["actors_alive"]) == (3, 3, 2)
    pids = {c: p["pid"] for c, p in three["probes"].items()}
    assert pids["c01"] == pids["c02"] != pids["c00"]
    assert all(p["rss_peak"] > 0 and p["uss"] > 0 for p in three["probes"].values())
    assert three["cluster_mem_per_client_mib"] < three["cluster_mem_per_actor_mib"]
    assert [s["clients"] for s in record["stub_results"]] == [2, 4]
    assert all(s["own_s"] > 0 for s in record["stub_results"])
    assert record["target"]["stub_clients"]["own_cpu_s"]["exponent"] is not None
    assert all(s["own_cpu_s"] > 0 for s in record["stub_results"])


def test_records_are_written_with_every_leaf_list_on_one_line(tmp_path):
    from _common import write_json

    record = {"runs": [{"name": "a", "per_study": {"ce_labels": [[[1, 0], [1, 1]]] * 3,
                                                   "bleu": [[20, 20, 19, 18]] * 3},
                        "empty": {}, "none": [], "nan": float("nan")}],
              "path": tmp_path}
    text = write_json(tmp_path / "r.json", record).read_text()
    back = json.loads(text)
    assert back["runs"][0]["per_study"] == record["runs"][0]["per_study"]
    assert back["runs"][0]["nan"] is None and back["path"] == str(tmp_path)
    lines = text.splitlines()
    # one line per study item list, not one per number
    assert '        "bleu": [[20, 20, 19, 18], [20, 20, 19, 18], [20, 20, 19, 18]]' in lines
    assert lines.count("          [[1, 0], [1, 1]],") == 2  # a study's labels: one line
    assert len(lines) < 25
