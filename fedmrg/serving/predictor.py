"""A trained model as a report writer: a study's encoded images -> findings and a report.

    predictor = ReportPredictor.from_folder("runs/RUN/models/a", settings)
    [prediction] = predictor.predict([[png_frontal, png_lateral]], names=["study-1"])
    prediction.findings  # 14 Finding: observation, predicted state, its probability, all four
    prediction.report    # the generated report

The images go through exactly the evaluation's preprocessing (`transform_study` without
augmentation: decode, grayscale, resize to `data.image_size`, views beyond `data.max_views`
dropped, missing ones padded), the diagnosis head's softmax gives the findings, and the report
is generated with the run's `eval.*` decoding settings, its prompt showing the head's argmax:
the same numbers `fedmrg evaluate` computes for that study. No Ray, no MLflow here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmrg.data.schema import LABEL_NAMES, OBSERVATIONS
from fedmrg.data.transforms import transform_study


class ServingError(ValueError):
    """A model or an input cannot be used for generation; the message names which and why."""


@dataclass(frozen=True)
class PredictorSettings:
    """How a saved model is fed and decoded: the run's data and eval settings it was scored
    with (`from_config`), and which adapters write the report."""

    image_size: int
    max_views: int
    # a center's own model: generic + specialized adapter and its own tuned diagnosis head,
    # those it has (`MRGModel.diagnosis_head_for`); False: the generic model
    personalized: bool = False
    generation: dict[str, Any] = field(default_factory=dict)  # MRGModel.generate arguments

    @classmethod
    def from_config(cls, cfg: Any, personalized: bool = False) -> PredictorSettings:
        """From an ExperimentConfig: `data.image_size`, `data.max_views`, the `eval` decoding."""
        from fedmrg.eval.evaluator import generation_kwargs

        return cls(cfg.data.image_size, cfg.data.max_views, personalized,
                   generation_kwargs(cfg.eval))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PredictorSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ServingError(f"predictor settings: unknown key {unknown[0]!r}; known: "
                               f"{sorted(names)}")
        return cls(**data)

    def write(self, path: str | Path) -> Path:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> PredictorSettings:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class Finding:
    """One observation: the diagnosis head's most probable state and its probabilities."""

    observation: str
    state: str  # one of LABEL_NAMES: blank (not mentioned), positive, negative, uncertain
    probability: float  # of `state`
    probabilities: dict[str, float]  # every state -> its probability (they sum to 1)


@dataclass
class StudyPrediction:
    """What the model says about one study."""

    study: str  # the name it was given (a file name on the command line)
    views: int  # images used (at most data.max_views)
    findings: list[Finding]  # the 14 observations, in OBSERVATIONS order
    report: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def positive(self) -> list[Finding]:
        return [f for f in self.findings if f.state == "positive"]


def findings_from_probabilities(probs: np.ndarray) -> list[Finding]:
    """(14, 4) state probabilities of one study -> its 14 findings (argmax state)."""
    if probs.shape != (len(OBSERVATIONS), len(LABEL_NAMES)):
        raise ServingError(f"diagnosis probabilities: expected shape "
                           f"({len(OBSERVATIONS)}, {len(LABEL_NAMES)}), got {probs.shape}")
    out = []
    for obs, row in zip(OBSERVATIONS, probs, strict=True):
        state = int(row.argmax())
        out.append(Finding(obs, LABEL_NAMES[state], float(row[state]),
                           {name: float(p) for name, p in zip(LABEL_NAMES, row, strict=True)}))
    return out


class ReportPredictor:
    """An `MRGModel` with its settings; `predict` studies (module docstring)."""

    def __init__(self, model: Any, settings: PredictorSettings):
        self.model = model.eval()
        self.settings = settings

    @classmethod
    def from_folder(cls, model_dir: str | Path, settings: PredictorSettings) -> ReportPredictor:
        """Load a `fedmrg.model.io` folder (on CPU)."""
        from fedmrg.model.base_lm import BaseLMError
        from fedmrg.model.io import ModelIOError, load_model

        try:
            model = load_model(model_dir)
        except (ModelIOError, BaseLMError) as e:
            raise ServingError(str(e)) from e
        return cls(model, settings)

    @torch.no_grad()
    def predict(self, studies: Sequence[Sequence[bytes]], names: Sequence[str] | None = None
                ) -> list[StudyPrediction]:
        """Findings and a report for each study (a list of its encoded views, frontal first).

        `names` (default study-1, study-2, ...) name a study in errors: an unreadable image is
        an `ImageDecodeError` naming it and the view."""
        if not studies:
            return []
        names = list(names) if names is not None else [f"study-{i + 1}"
                                                       for i in range(len(studies))]
        if len(names) != len(studies):
            raise ServingError(f"{len(studies)} studies but {len(names)} names")
        s, in_chans = self.settings, self.model.cfg.in_chans
        pixels, masks = zip(*(transform_study(list(images), name, s.image_size, s.max_views,
                                              in_chans)
                              for images, name in zip(studies, names, strict=True)),
                            strict=True)
        images = torch.from_numpy(np.stack(pixels))  # (B, V, C, S, S)
        view_mask = torch.from_numpy(np.stack(masks))  # (B, V)
        # as evaluate_model: the head's softmax, its argmax is the prompt
        features = self.model.encode_features({"images": images, "view_mask": view_mask})
        head = self.model.diagnosis_head_for(s.personalized)
        probs = torch.softmax(head(features).float(), dim=-1)  # (B, 14, 4)
        adapters = s.personalized and self.model.cfg.specialized_adapter
        reports = self.model.generate(images, view_mask, personalized=adapters,
                                      states=probs.argmax(-1), **s.generation)
        return [StudyPrediction(name, int(mask.sum()), findings_from_probabilities(p), report)
                for name, mask, p, report in zip(names, masks, probs.cpu().numpy(), reports,
                                                 strict=True)]


def format_prediction(prediction: StudyPrediction) -> str:
    """A study's prediction for people: the findings as a table, then the report."""
    lines = [f"{prediction.study} ({prediction.views} view{'s' * (prediction.views > 1)})",
             f"  {'observation':28s} {'state':10s} {'p':>5s}   " + " ".join(
                 f"{n[:5]:>5s}" for n in LABEL_NAMES)]
    for f in prediction.findings:
        lines.append(f"  {f.observation:28s} {f.state:10s} {f.probability:5.2f}   " + " ".join(
            f"{f.probabilities[n]:5.2f}" for n in LABEL_NAMES))
    lines += ["  report:", f"    {prediction.report}"]
    return "\n".join(lines)
