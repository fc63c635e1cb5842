"""The failure policy (fedmrg/fl/failure.py): the table of what a failed call means, and the
structured client faults that replace parsing Ray's error text. Pure, milliseconds."""

from __future__ import annotations

import pickle

import pytest

from fedmrg.data.shards import DatasetError
from fedmrg.fl.failure import (
    ClientDataError,
    ClientFailure,
    ClientFault,
    FailureAction,
    FailureKind,
    FailurePolicy,
    Phase,
    rejection_kind,
)

K, A = FailureKind, FailureAction


@pytest.mark.parametrize("kind", [K.CRASH, K.LOST, K.DEADLINE, K.INVALID, K.NORM])
def test_a_round_drops_every_failed_client_but_bad_data(kind):
    for tries in (1, 5):
        assert FailurePolicy(retries=2).decide(Phase.FIT, kind, tries) is A.DROP
    assert FailurePolicy(retries=2).decide(Phase.FIT, K.DATA) is A.RAISE


@pytest.mark.parametrize("phase, give_up", [(Phase.EVALUATE, A.RAISE),
                                            (Phase.VALIDATE, A.DROP)])
def test_an_evaluation_retries_transient_failures_then_gives_up(phase, give_up):
    policy = FailurePolicy(retries=2)
    for kind in (K.CRASH, K.LOST):
        assert [policy.decide(phase, kind, tries) for tries in (1, 2, 3)] == [
            A.RETRY, A.RETRY, give_up]
    # never retried: a deadline (the actor is still busy with the call), bad data
    for kind in (K.DEADLINE, K.DATA):
        assert policy.decide(phase, kind, 1) is give_up
    assert policy.decide(phase, K.INVALID, 1) is A.DROP  # left out, recorded
    assert FailurePolicy(retries=0).decide(phase, K.CRASH, 1) is give_up


def test_rounds_are_retried_up_to_the_retries():
    policy = FailurePolicy(retries=2)
    assert [policy.retry_round(n) for n in (1, 2, 3)] == [True, True, False]
    assert not FailurePolicy(retries=0).retry_round(1)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="retries must be >= 0, got -1"):
        FailurePolicy(retries=-1)
    with pytest.raises(ValueError, match="'sometimes' is not a valid"):
        FailurePolicy().decide(Phase.FIT, "sometimes")
    with pytest.raises(ValueError, match="no update norm"):
        FailurePolicy().decide(Phase.EVALUATE, K.NORM)


def test_rejection_metrics_keep_their_names():
    assert [rejection_kind(k) for k in K] == [
        "failed", "failed", "deadline", "invalid", "norm", "data"]


def test_a_fault_knows_bad_data_from_a_crash_by_type_not_text():
    data = ClientFault.from_exception("a", DatasetError("shard x.parquet row 3: bad image"))
    crash = ClientFault.from_exception("b", RuntimeError("DatasetError: looks like one"))
    assert (data.kind, data.error) == (K.DATA, "DatasetError")
    assert (crash.kind, crash.error) == (K.CRASH, "RuntimeError")

    error = data.as_error("fit failed: ")
    assert type(error) is ClientDataError
    assert error.errors == {"a": "fit failed: shard x.parquet row 3: bad image"}
    error = crash.as_error("fit failed: ")
    assert type(error) is ClientFailure and error.kind is K.CRASH
    assert str(error) == "client 'b': fit failed: RuntimeError: DatasetError: looks like one"


def test_errors_and_faults_cross_process_boundaries_intact():
    for value in (ClientFailure("a", "fit failed: x", K.LOST),
                  ClientDataError({"b": "m", "a": "n"}, "round 2"),
                  ClientFault("a", K.DATA, "DatasetError", "m")):
        back = pickle.loads(pickle.dumps(value))
        assert type(back) is type(value) and str(back) == str(value)
    assert pickle.loads(pickle.dumps(ClientFailure("a", "x", K.LOST))).kind is K.LOST
    assert str(ClientDataError({"b": "m", "a": "n"}, "round 2")) == (
        "round 2: bad data at 2 clients: client 'a': n | client 'b': m")
