"""Disclosure decided by the center (issue 19, item 5).

A center's policy file (`<root>/center=<id>/disclosure.yaml`, read where the center runs) may
only narrow what the run config asks its evaluation replies to carry, and the coordinator
validates every `EvalReply` (fields, sizes, numbers, samples within the run's request and the
center's policy) before anything of it is used or logged.

- pure: the policy file, `effective_disclosure`, `validate_eval_reply` field by field, and the
  coordinator dropping a reply that breaks a policy (fake clients, milliseconds);
- in process with real clients (tiny model, Ray Data streams): a run asking for references
  with `eval.share_references=true` gets none from a refusing center, nor from a refusing
  held-out center evaluated by another center's client; an allowing center's come through.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from helpers import FakeClient, fake_state, tiny_client_config

from fedmrg.config import EvalConfig, config_from_dict
from fedmrg.fl.coordinator import Coordinator, InProcessPool
from fedmrg.fl.messages import EvalReply
from fedmrg.fl.strategies import make_strategy
from fedmrg.fl.validation import MAX_METRICS, MAX_SAMPLE_CHARS, validate_eval_reply
from fedmrg.privacy.disclosure import (
    DISCLOSURE_FILE,
    REFERENCE_FIELDS,
    Disclosure,
    DisclosureError,
    DisclosurePolicy,
    disclose_samples,
    effective_disclosure,
    read_policy,
)

SAMPLE = {"study_id": "a-0001", "reference": "The heart is normal. No effusion.",
          "generated": "the heart is normal.", "states": "0 2 0 0 0 0 0 0 0 0 0 0 0 1",
          "findings": "no finding: positive", "true_findings": "no finding: positive"}
REFUSE = DisclosurePolicy(share_references=False)


# --------------------------------------------------------------------------- the policy file


def write_policy(root, center: str, text: str) -> None:
    folder = root / f"center={center}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DISCLOSURE_FILE).write_text(text)


def test_no_policy_file_leaves_the_run_config_in_charge(tmp_path):
    assert read_policy(tmp_path, "a") == DisclosurePolicy(share_references=True,
                                                          max_samples=None)


def test_a_policy_file_is_read_from_the_centers_own_folder(tmp_path):
    write_policy(tmp_path, "a", "share_references: false\nmax_samples: 2\n")
    assert read_policy(tmp_path, "a") == DisclosurePolicy(False, 2)
    assert read_policy(tmp_path, "b") == DisclosurePolicy()  # another center's is not a's


@pytest.mark.parametrize("text, message", [
    ("share_refs: false\n", "unknown key 'share_refs'"),
    ("share_references: 'no'\n", "share_references: 'no' is not true or false"),
    ("max_samples: -1\n", "max_samples: -1 is not a count >= 0"),
    ("max_samples: 2.5\n", "max_samples: 2.5 is not a count"),
    ("- share_references\n", "top level must be a mapping"),
    ("share_references: [\n", "not valid YAML"),
    ("share_references: true\nshare_references: false\n", "duplicate key 'share_references'"),
])
def test_a_bad_policy_file_is_a_one_line_error_naming_the_file(tmp_path, text, message):
    write_policy(tmp_path, "a", text)
    with pytest.raises(DisclosureError, match=message) as info:
        read_policy(tmp_path, "a")
    assert str(tmp_path / "center=a" / DISCLOSURE_FILE) in str(info.value)


@pytest.mark.parametrize("run_shares, run_samples, policy, expected", [
    (True, 5, DisclosurePolicy(), Disclosure(True, 5)),
    (True, 5, REFUSE, Disclosure(False, 5)),  # the center refuses what the run asks
    (False, 5, DisclosurePolicy(share_references=True), Disclosure(False, 5)),  # never forced
    (True, 5, DisclosurePolicy(max_samples=2), Disclosure(True, 2)),
    (True, 1, DisclosurePolicy(max_samples=3), Disclosure(True, 1)),  # never more than asked
    (True, 5, DisclosurePolicy(max_samples=0), Disclosure(True, 0)),
])
def test_a_policy_only_ever_narrows_the_runs_request(run_shares, run_samples, policy, expected):
    run = EvalConfig(share_references=run_shares, samples=run_samples)
    assert effective_disclosure(run, policy) == expected


def test_disclose_samples_keeps_generated_fields_and_references_only_when_allowed():
    samples = [dict(SAMPLE, extra="x"), dict(SAMPLE), dict(SAMPLE)]
    kept = disclose_samples(samples, Disclosure(False, 2))
    assert kept == [{k: SAMPLE[k] for k in ("generated", "states", "findings")}] * 2
    shared = disclose_samples(samples, Disclosure(True, 5))
    assert shared == [SAMPLE] * 3  # unknown fields never leave either


# --------------------------------------------------------------------------- validation


def reply(**fields) -> EvalReply:
    base = EvalReply("a", "generalization", {"bleu4": 0.1, "ce_f1/edema": math.nan,
                                             "num_studies": 4.0}, [dict(SAMPLE)])
    return dataclasses.replace(base, **fields)


SHARING = EvalConfig(share_references=True, samples=5)


def check(r, run: EvalConfig = SHARING) -> str | None:
    return validate_eval_reply(r, center="a", view="generalization", run=run)


def with_extra_attribute() -> EvalReply:
    r = reply()
    r.images = b"\x89PNG"
    return r


@pytest.mark.parametrize("bad, reason", [
    ("not a reply", "not an EvalReply but a str"),
    (with_extra_attribute(), "unexpected field 'images'"),
    (reply(center="b"), "center: the reply names 'b', the evaluation was of 'a'"),
    (reply(center="x" * 500), "center: the reply names 'xxxxxxx"),
    (reply(view="personalization"), "view: the reply names 'personalization'"),
    (reply(metrics=[("bleu4", 0.1)]), "metrics: a list, not a mapping"),
    (reply(metrics={"bleu4": "The heart is normal."}), "metrics['bleu4']: a str, not a number"),
    (reply(metrics={"bleu4": True}), "metrics['bleu4']: a bool, not a number"),
    (reply(metrics={"bleu4": math.inf}), "metrics['bleu4']: inf is not finite"),
    (reply(metrics={"The heart is normal. No effusion. " * 3: 1.0}),
     "metrics: a name that is not a string of 1 to 64 characters"),
    (reply(metrics={3: 1.0}), "metrics: a name that is not a string"),
    (reply(metrics={f"m{i}": 0.0 for i in range(MAX_METRICS + 1)}), "metrics: 513 of them"),
    (reply(disclosure={"share_references": True}), "disclosure: a dict, not a Disclosure"),
    (reply(samples=({"generated": "x"},)), "samples: a tuple, not a list"),
    (reply(samples=[dict(SAMPLE)] * 6), "samples: 6 sample(s), more than the 5 allowed"),
    (reply(samples=["the heart is normal"]), "samples[0]: a str, not a mapping"),
    (reply(samples=[{"generated": "x", "image": "..."}]), "samples[0]: unexpected field"),
    (reply(samples=[{"generated": b"x"}]), "samples[0]['generated']: a bytes, not a string"),
    (reply(samples=[{"generated": "x" * (MAX_SAMPLE_CHARS + 1)}]),
     f"samples[0]['generated']: {MAX_SAMPLE_CHARS + 1} characters, more than"),
])
def test_validation_rejects_each_bad_field_by_name(bad, reason):
    assert check(reply()) is None  # the well-formed reply passes
    assert check(bad).startswith(reason), check(bad)


def test_a_policy_object_with_bad_values_is_rejected():
    policy = DisclosurePolicy()
    object.__setattr__(policy, "max_samples", -3)  # built around __post_init__
    assert check(reply(disclosure=policy)).startswith("disclosure: max_samples: -3")


@pytest.mark.parametrize("field", REFERENCE_FIELDS)
def test_reference_fields_need_the_run_to_ask_and_the_center_to_allow(field):
    only = [{"generated": "x", field: SAMPLE[field]}]
    assert check(reply(samples=only)) is None  # asked for, allowed
    refused = check(reply(samples=only, disclosure=REFUSE))
    assert refused == (f"samples[0][{field!r}]: not allowed, the center's disclosure policy "
                       f"refuses references")
    not_asked = check(reply(samples=only), run=EvalConfig(share_references=False))
    assert not_asked.startswith(f"samples[0][{field!r}]: not allowed, the run did not ask")
    # the reason names the field, never its content
    assert SAMPLE[field] not in refused and SAMPLE[field] not in not_asked


def per_study(n: int = 4) -> dict[str, list]:
    return {"ce_labels": [[[0] * 14, [1] * 14]] * n, "bleu": [[3, 4, 3, 2, 1, 0, 2, 1, 0, 0]] * n}


PER_STUDY = EvalConfig(share_references=False, samples=5, per_study=True)


@pytest.mark.parametrize("bad, reason", [
    ({"ce_labels": [], "bleu": []}, "per_study['ce_labels']: 0 item(s), expected one per "
                                    "evaluated study (4.0)"),
    ({"ce_labels": per_study()["ce_labels"]}, "per_study: keys must be exactly"),
    ({**per_study(), "reports": ["x"] * 4}, "per_study: keys must be exactly"),
    ({**per_study(), "bleu": [[1, 2, 3]] * 4}, "per_study['bleu']: shape (4, 3)"),
    ({**per_study(), "bleu": [["the heart"] * 10] * 4}, "per_study['bleu']: shape (4, 10) of <U"),
    ({**per_study(), "ce_labels": [[[0] * 14, [7] * 14]] * 4},
     "per_study['ce_labels']: a value outside [0, 3]"),
    ({**per_study(), "bleu": [[3, 4, 3, 2, 1, 0, 2, 1, 0, -1]] * 4},
     "per_study['bleu']: a value outside [0, inf]"),
    ([1, 2], "per_study: a list, not a mapping"),
])
def test_per_study_items_are_checked_by_shape_and_range(bad, reason):
    samples = [{"generated": "x"}]
    assert check(reply(samples=samples, per_study=per_study()), run=PER_STUDY) is None
    assert check(reply(samples=samples, per_study=bad), run=PER_STUDY).startswith(reason)


def test_per_study_items_need_the_run_to_ask_and_the_center_to_allow_references():
    samples = [{"generated": "x"}]
    not_asked = check(reply(samples=samples, per_study=per_study()), run=EvalConfig())
    assert not_asked == ("per_study: not allowed, the run did not ask for them "
                         "(eval.per_study=false)")
    refused = check(reply(samples=samples, per_study=per_study(), disclosure=REFUSE),
                    run=PER_STUDY)
    assert refused == "per_study: not allowed, the center's disclosure policy refuses references"
    assert effective_disclosure(PER_STUDY, DisclosurePolicy()).per_study
    assert not effective_disclosure(PER_STUDY, REFUSE).per_study


def test_a_centers_sample_limit_is_enforced():
    two = DisclosurePolicy(max_samples=2)
    assert check(reply(samples=[dict(SAMPLE)] * 2, disclosure=two)) is None
    assert check(reply(samples=[dict(SAMPLE)] * 3, disclosure=two)).startswith(
        "samples: 3 sample(s), more than the 2 allowed (eval.samples=5, the center's "
        "max_samples=2)")


class LeakyClient(FakeClient):
    """A client whose code fails to apply its own refusing policy: sends references anyway."""

    def evaluate(self, split, personalized, dataset_center=None, global_state=None):
        out = super().evaluate(split, personalized, dataset_center, global_state)
        return dataclasses.replace(out, samples=[dict(SAMPLE)], disclosure=REFUSE)


def test_the_coordinator_drops_a_reply_that_breaks_its_centers_policy(caplog):
    strategy = make_strategy(config_from_dict({"federation": {"strategy": "fedavg"},
                                               "eval": {"share_references": True}}))
    pool = InProcessPool({"a": LeakyClient("a"), "b": FakeClient("b")})
    coordinator = Coordinator(strategy.cfg, strategy, pool, fake_state(),
                              np.random.default_rng(0))
    generalization, personalization = coordinator.evaluate(round_id=0)
    for evaluation in (generalization, personalization):
        assert set(evaluation.per_center) == {"b"}  # a's metrics are not used either
        assert [r.center for r in evaluation.replies] == ["b"]
        assert evaluation.rejected == {"a": "samples[0]['study_id']: not allowed, the center's "
                                            "disclosure policy refuses references"}
        assert evaluation.mean == evaluation.per_center["b"]
    warned = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(warned) == 2 and all("'a'" in w for w in warned)
    assert not any(SAMPLE["reference"] in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- real clients


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fedmrg.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("disclosure") / "phantom"
    generate_phantom(root, centers=2, studies_per_center=20, image_size=32, seed=0,
                     heldout_center=True)
    # a refuses outright; the held-out center (evaluated by a's client) allows one sample
    # without references; b says nothing: the run config decides for it
    write_policy(root, "a", "share_references: false\n")
    write_policy(root, "heldout", "share_references: false\nmax_samples: 1\n")
    return root


class RecordingPool(InProcessPool):
    """Keeps every reply that reached the coordinator, in order (as `RayClientPool(record=
    True)` does over Ray)."""

    def __init__(self, clients):
        super().__init__(clients)
        self.received = []

    def result(self, handle):
        out = super().result(handle)
        self.received.append(out)
        return out


@pytest.mark.ray
def test_a_refusing_center_sends_no_reference_even_when_the_run_asks(ray_cluster, dataset,
                                                                     tmp_path_factory):
    import pyarrow.parquet as pq

    from fedmrg.fl.client import FederatedClient
    from fedmrg.model.params import get_shared_state

    cfg = tiny_client_config("fedavg", str(dataset), str(tmp_path_factory.mktemp("lm")))
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, share_references=True,
                                                            samples=3))
    strategy = make_strategy(cfg)
    clients = {c: FederatedClient(strategy.cfg, c, dataset_root=str(dataset), seed=0,
                                  generation={"num_beams": 1, "max_new_tokens": 6})
               for c in ("a", "b")}
    try:
        pool = RecordingPool(clients)
        coordinator = Coordinator(strategy.cfg, strategy, pool,
                                  get_shared_state(clients["a"].model),
                                  np.random.default_rng(0), heldout_centers=["heldout"])
        generalization, personalization = coordinator.evaluate(round_id=0)
    finally:
        for client in clients.values():
            client.close()
    assert generalization.rejected == {} and personalization.rejected == {}
    received = {(r.view, r.center): r for r in pool.received}
    assert set(received) == {("generalization", c) for c in ("a", "b", "heldout")} | {
        ("personalization", c) for c in ("a", "b")}
    rows = [row for p in sorted(dataset.glob("center=*/*.parquet"))
            for row in pq.read_table(p, columns=["study_id", "report"]).to_pylist()]
    reports = {row["report"] for row in rows}
    study_ids = {row["study_id"] for row in rows}
    for (view, center), r in received.items():
        texts = [v for s in r.samples for v in s.values()]
        if center == "b":  # no policy: the run's request holds
            assert len(r.samples) == 3 and all(set(REFERENCE_FIELDS) <= set(s) for s in r.samples)
            assert {s["reference"] for s in r.samples} <= reports
            continue
        assert r.disclosure.share_references is False
        assert len(r.samples) == (1 if center == "heldout" else 3), (view, center)
        assert all(set(s) == {"generated", "states", "findings"} for s in r.samples)
        assert not any(t in reports or t in study_ids for t in texts), (view, center)
