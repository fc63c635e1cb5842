"""What a center lets leave it at evaluation: its own disclosure policy, set where it runs.

An evaluation reply (`EvalReply`) carries metrics and, for MLflow's table of sample reports,
up to `eval.samples` sample generations; with `eval.share_references: true` each sample also
holds the center's reference report, its study id and the findings read from the reference.
The run config is written by whoever launches the run, so it can only ASK: each center has the
last word through a policy file in its own data folder, read by the client where the center
runs (never sent by the coordinator):

    <data.root>/center=<id>/disclosure.yaml
        share_references: false   # never send reference reports, study ids, true findings
        max_samples: 2            # at most 2 sample generations per evaluation (0: none)

A policy only takes away (`effective_disclosure`): references go out when the run asks AND
the policy allows, samples are the smaller of the run's and the policy's count. Per-study
scores (`eval.per_study`: each test study's CE labels of the generated and the reference
report and its BLEU counts, no text) hold what the labeler read from the reference reports,
so `share_references: false` refuses them too. Without a file
the run config decides (as before policies existed). The policy of the DATASET's center
applies, also when another client evaluates it (a held-out center's folder holds its own).

The reply names the policy it was produced under (`EvalReply.disclosure`), and the coordinator
checks every reply against the run config and that policy (`fedmrg.fl.validation.
validate_eval_reply`): a client whose code failed to strip a field is caught there too.
Pure: no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedmrg.config import ConfigError, EvalConfig, read_yaml

DISCLOSURE_FILE = "disclosure.yaml"
# sample fields that come from the center's own reference data (the rest are generated)
REFERENCE_FIELDS = ("study_id", "reference", "true_findings")
GENERATED_FIELDS = ("generated", "states", "findings")


class DisclosureError(ConfigError):
    """A center's disclosure policy file is unreadable or wrong; the message names the file
    and the key."""


@dataclass(frozen=True)
class DisclosurePolicy:
    """A center's own limits on what an evaluation reply may carry (module docstring)."""

    share_references: bool = True  # False: never reference reports, study ids, true findings
    max_samples: int | None = None  # sample generations per evaluation at most; None: no limit

    def __post_init__(self) -> None:
        if not isinstance(self.share_references, bool):
            raise DisclosureError(f"share_references: {self.share_references!r} is not true "
                                  f"or false")
        n = self.max_samples
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise DisclosureError(f"max_samples: {n!r} is not a count >= 0 (or null: no limit)")


@dataclass(frozen=True)
class Disclosure:
    """What one evaluation reply may carry: the run's request narrowed by the center's policy."""

    share_references: bool
    samples: int
    per_study: bool = False  # per-study scores (labels read from the references: see below)


def policy_path(dataset_root: str | Path, center: str) -> Path:
    return Path(dataset_root) / f"center={center}" / DISCLOSURE_FILE


def read_policy(dataset_root: str | Path, center: str) -> DisclosurePolicy:
    """`center`'s policy from its data folder; no file: the default (no objection)."""
    path = policy_path(dataset_root, center)
    if not path.exists():
        return DisclosurePolicy()
    try:
        data = read_yaml(str(path))
    except ConfigError as e:
        raise DisclosureError(str(e)) from None
    return policy_from_dict(data, str(path))


def policy_from_dict(data: Mapping[str, Any], where: str) -> DisclosurePolicy:
    known = [f.name for f in fields(DisclosurePolicy)]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise DisclosureError(f"{where}: unknown key {unknown[0]!r}; a disclosure policy has "
                              f"{known}")
    try:
        return DisclosurePolicy(**data)
    except DisclosureError as e:
        raise DisclosureError(f"{where}: {e}") from None


def effective_disclosure(run: EvalConfig, policy: DisclosurePolicy) -> Disclosure:
    """The run's `eval.share_references` / `eval.samples`, only ever narrowed by `policy`."""
    samples = run.samples if policy.max_samples is None else min(run.samples,
                                                                 policy.max_samples)
    # Per-study scores hold the labels read from each reference report, as true_findings
    # does: a policy that refuses references refuses them too.
    return Disclosure(share_references=run.share_references and policy.share_references,
                      samples=samples, per_study=run.per_study and policy.share_references)


def disclose_samples(samples: Sequence[Mapping[str, Any]], allowed: Disclosure
                     ) -> list[dict[str, Any]]:
    """The first `allowed.samples` samples, without the reference fields unless allowed."""
    keep = (*GENERATED_FIELDS, *REFERENCE_FIELDS) if allowed.share_references else (
        GENERATED_FIELDS)
    return [{k: v for k, v in s.items() if k in keep} for s in samples[:allowed.samples]]
