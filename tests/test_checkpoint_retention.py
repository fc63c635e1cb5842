"""Client checkpoint retention (fedmrg.fl.checkpoint.client_rounds_to_keep), pure: no Ray.

The rule on hand-made cases, then a simulation with the real checkpoint writer: a coordinator
folder (keep K) and a client folder written as `FederatedClient._write_checkpoint` does, over
every participation pattern below; at every point where a crash could happen (after the
client wrote its round, after the coordinator wrote it) each round the coordinator could
resume from finds in the client's folder exactly the client's state of that round (its
newest participation at or before it), and the folder holds nothing else. A fallback resume
to an older coordinator round re-runs rounds and drops the abandoned ones. At the end of the
run `prune_client_checkpoints` leaves the rounds the coordinator's kept checkpoints need.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmrg.fl.checkpoint import (
    client_checkpoint_dir,
    client_rounds_to_keep,
    latest_checkpoint,
    list_checkpoints,
    prune_client_checkpoints,
    resumable_rounds,
    run_checkpoint_dir,
    write_checkpoint,
)

ROUNDS = 8


def test_resumable_rounds_are_the_coordinators_kept_rounds_while_a_round_runs():
    assert resumable_rounds(1, 3) == []  # round 1: a crash starts the run over
    assert resumable_rounds(2, 3) == [1]
    assert resumable_rounds(5, 3) == [2, 3, 4]
    assert resumable_rounds(5, 1) == [4]


@pytest.mark.parametrize("rounds, resumable, expected", [
    ([], [1, 2], set()),
    ([1, 2, 3, 4, 5], [3, 4], {3, 4, 5}),  # every round: K + 1
    ([1, 2, 3, 4, 5], [2, 3, 4], {2, 3, 4, 5}),
    ([1, 4, 7], [5, 6], {4, 7}),  # sat rounds 5-6 out: its round-4 state serves both
    ([1, 4, 7], [], {7}),
    ([7], [5, 6], {7}),  # nothing at or before 5 or 6: back to the state as built
    ([2, 3, 9], [3, 8], {3, 9}),
])
def test_the_newest_and_the_newest_at_or_before_each_resumable_round(rounds, resumable,
                                                                     expected):
    assert client_rounds_to_keep(rounds, resumable) == expected


def test_write_checkpoint_takes_one_retention_rule(tmp_path):
    with pytest.raises(ValueError, match="one of keep and resumable_from"):
        write_checkpoint(tmp_path, 1, {}, keep=2, resumable_from=[1])
    with pytest.raises(ValueError, match="one of keep and resumable_from"):
        write_checkpoint(tmp_path, 1, {})


class Run:
    """A coordinator folder and one client folder, written as the product writes them."""

    def __init__(self, run_dir: Path, keep: int, participates):
        self.run_dir, self.keep, self.participates = run_dir, keep, participates
        self.coordinator = run_checkpoint_dir(run_dir)
        self.client = client_checkpoint_dir(run_dir, "a")
        self.state_round: int | None = None  # the client's, as FederatedClient.state_round

    def truth(self, resumed: int) -> int | None:
        """The client's state at coordinator round `resumed`: its newest round at or before."""
        done = [r for r in range(1, resumed + 1) if self.participates(r)]
        return done[-1] if done else None

    def restore(self, max_round: int) -> int | None:
        """What `FederatedClient.restore_latest_checkpoint(max_round)` finds (or raises)."""
        found = latest_checkpoint(self.client, max_round=max_round)
        if found is not None:
            return found.round_id
        kept = list_checkpoints(self.client)
        if kept and max_round > 0:
            oldest = latest_checkpoint(self.client, max_round=kept[0][0])
            assert oldest.meta["previous_round"] is None, (
                f"round {max_round}: pruned; kept {[r for r, _ in kept]}")
        return None

    def client_round(self, round_id: int) -> None:
        if self.state_round is not None and round_id <= self.state_round:
            # a retry, or a resume from before the client's state: back to its state then
            self.state_round = self.restore(round_id - 1)
            assert self.state_round == self.truth(round_id - 1), (round_id, self.kept())
        write_checkpoint(self.client, round_id, {"x": torch.tensor([round_id])},
                         resumable_from=resumable_rounds(round_id, self.keep), kind="client",
                         meta={"center": "a", "previous_round": self.state_round})
        self.state_round = round_id

    def coordinator_round(self, round_id: int) -> None:
        write_checkpoint(self.coordinator, round_id, {"round_id": round_id}, keep=self.keep)

    def check_every_resume(self) -> None:
        """Each round the coordinator could resume from restores the client's true state,
        and the client folder holds only what some resume needs."""
        coordinator_rounds = [r for r, _ in list_checkpoints(self.coordinator)]
        for resumed in coordinator_rounds:
            assert self.restore(resumed) == self.truth(resumed), (resumed, self.kept())
        needed = {self.truth(r) for r in coordinator_rounds}
        if self.state_round is not None:  # as of its last write: its round, and what the
            # coordinator could then resume from (it may not have written that round yet)
            needed |= {self.state_round, *(self.truth(r) for r in resumable_rounds(
                self.state_round, self.keep))}
        assert set(self.kept()) <= needed - {None}, (self.kept(), needed)

    def kept(self) -> list[int]:
        return [r for r, _ in list_checkpoints(self.client)]

    def play(self, first: int, last: int) -> None:
        for round_id in range(first, last + 1):
            if self.participates(round_id):
                self.client_round(round_id)
                self.check_every_resume()  # crash before the coordinator's checkpoint
            self.coordinator_round(round_id)
            self.check_every_resume()


PATTERNS = {
    "every round": lambda r: True,
    "every other round": lambda r: r % 2 == 1,
    "joins late": lambda r: r >= 4,
    "rarely": lambda r: r in (2, 7),
    "seeded half": lambda r: r in (1, 2, 5, 6, 8),
}


@pytest.mark.parametrize("keep", [1, 2, 3])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_every_resume_finds_the_clients_state_and_nothing_more_is_kept(tmp_path, keep,
                                                                        pattern):
    run = Run(tmp_path / "run", keep, PATTERNS[pattern])
    run.play(1, ROUNDS)
    assert len(run.kept()) <= keep + 1
    removed = prune_client_checkpoints(tmp_path / "run")
    run.check_every_resume()
    coordinator_rounds = [r for r, _ in list_checkpoints(run.coordinator)]
    assert coordinator_rounds == list(range(ROUNDS - keep + 1, ROUNDS + 1))
    expected = {run.truth(r) for r in coordinator_rounds} - {None}
    assert set(run.kept()) == expected and not set(run.kept()) & set(removed.get("a", []))


@pytest.mark.parametrize("keep", [2, 3])
def test_every_round_keeps_one_more_than_the_coordinator_until_the_end(tmp_path, keep):
    run = Run(tmp_path / "run", keep, PATTERNS["every round"])
    for round_id in range(1, ROUNDS + 1):
        run.client_round(round_id)
        assert run.kept() == list(range(max(1, round_id - keep), round_id + 1))
        run.coordinator_round(round_id)
    assert prune_client_checkpoints(tmp_path / "run") == {"a": [ROUNDS - keep]}
    assert run.kept() == list(range(ROUNDS - keep + 1, ROUNDS + 1))


@pytest.mark.parametrize("pattern", ["every round", "every other round"])
def test_a_fallback_resume_reruns_rounds_and_drops_the_abandoned_ones(tmp_path, pattern):
    keep = 3
    run = Run(tmp_path / "run", keep, PATTERNS[pattern])
    run.play(1, 5)
    if run.participates(6):  # crashed in round 6, after the client wrote it
        run.client_round(6)
    run.check_every_resume()
    # the coordinator's round 5 is corrupt: --checkpoint-fallback resumes from round 4 and
    # runs round 5 again (the client goes back to its state of round 4)
    assert [r for r, _ in list_checkpoints(run.coordinator)] == [3, 4, 5]
    run.client_round(5)  # (both patterns take part in round 5)
    assert run.kept()[-1] == 5  # round 6, of the abandoned timeline, is gone
    run.coordinator_round(5)
    run.check_every_resume()
    run.play(6, ROUNDS)
    assert max(run.kept()) == max(r for r in range(1, ROUNDS + 1) if run.participates(r))
    prune_client_checkpoints(tmp_path / "run")
    run.check_every_resume()


def test_end_of_run_pruning_leaves_a_client_without_checkpoints_alone(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "centers" / "b" / "specialized_adapter").mkdir(parents=True)
    write_checkpoint(run_checkpoint_dir(run_dir), 1, {"round_id": 1}, keep=2)
    assert prune_client_checkpoints(run_dir) == {}
    assert prune_client_checkpoints(tmp_path / "absent") == {}
