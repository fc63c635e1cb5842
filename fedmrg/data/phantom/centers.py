"""The center profiles: acquisition + reporting style + label skew (the dual heterogeneity).

Four hand-designed centers ('a'..'d') and the held-out unseen center ('heldout') each differ in
all three parts; centers beyond 'd' (up to 'z') are derived from the four by seeded perturbation
of the acquisition and the skew, with a style mixed from the four center styles. A profile is
part of the benchmark definition: it depends on the center's index only, never on the seed.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmrg.data.phantom.acquisition import Acquisition
from fedmrg.data.phantom.labels import SITUATION_NAMES, LabelSkew
from fedmrg.data.phantom.styles import (
    ACADEMIC,
    BRITISH,
    ICU,
    NARRATIVE,
    TERSE,
    ReportStyle,
)

HELDOUT = "heldout"
MAX_CENTERS = 26
HELDOUT_STREAM = 100  # seed stream of the held-out center (center i uses stream i)


@dataclass(frozen=True)
class CenterProfile:
    """Everything that makes one center's data look like that center's."""

    center: str
    description: str
    acquisition: Acquisition
    style: ReportStyle
    skew: LabelSkew
    ap_rate: float  # share of frontal films taken AP (portable) rather than PA
    two_view_rate: float  # share of studies with a lateral view too
    stream: int  # seed stream: studies are seeded from (seed, stream, index)

    def summary(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "acquisition": self.acquisition.summary(),
            "style": self.style.name,
            "style_summary": self.style.summary,
            "label_skew": dict(self.skew.situations),
            "uncertain_rate": self.skew.uncertain_rate,
            "ap_rate": self.ap_rate,
            "two_view_rate": self.two_view_rate,
        }


BASE_PROFILES: tuple[CenterProfile, ...] = (
    CenterProfile(
        center="a",
        description="academic outpatient clinic: PA + lateral, clean standard films, many "
                    "normals",
        acquisition=Acquisition(scale=1.0, noise_std=0.01, markers=("side_letter",)),
        style=ACADEMIC,
        skew=LabelSkew({"heart_failure": 0.08, "infection": 0.1, "critical_care": 0.02,
                        "trauma": 0.03, "neoplasm": 0.06, "chronic": 0.1}),
        ap_rate=0.05, two_view_rate=0.6, stream=0,
    ),
    CenterProfile(
        center="b",
        description="intensive care unit: portable AP films, low resolution, noisy, soft and "
                    "flat, rotated; devices, edema and effusions everywhere",
        acquisition=Acquisition(scale=0.875, rotation_deg=5.0, shift=0.04, window=(0.05, 0.95),
                                gamma=1.3, contrast=0.75, blur_sigma=0.6, noise_std=0.045,
                                markers=("text_block",), marker_text="PORTABLE"),
        style=ICU,
        skew=LabelSkew({"heart_failure": 0.35, "infection": 0.25, "critical_care": 0.6,
                        "trauma": 0.05, "neoplasm": 0.04, "chronic": 0.1}),
        ap_rate=0.9, two_view_rate=0.05, stream=1,
    ),
    CenterProfile(
        center="c",
        description="oncology imaging center: high resolution, inverted polarity (air white), "
                    "hard contrast; many nodules and masses",
        acquisition=Acquisition(scale=1.25, gamma=0.8, contrast=1.25, noise_std=0.015,
                                invert=True, markers=("side_letter", "text_block"),
                                marker_text="ONC-2"),
        style=TERSE,
        skew=LabelSkew({"heart_failure": 0.1, "infection": 0.15, "critical_care": 0.05,
                        "trauma": 0.03, "neoplasm": 0.3, "chronic": 0.15}),
        ap_rate=0.1, two_view_rate=0.4, stream=2,
    ),
    CenterProfile(
        center="d",
        description="community emergency department: tight field of view, blurred, clipped "
                    "window; trauma and infections",
        acquisition=Acquisition(zoom=1.15, rotation_deg=3.0, window=(0.1, 0.9), blur_sigma=1.2,
                                noise_std=0.012, markers=("side_letter",)),
        style=NARRATIVE,
        skew=LabelSkew({"heart_failure": 0.15, "infection": 0.22, "critical_care": 0.08,
                        "trauma": 0.28, "neoplasm": 0.04, "chronic": 0.12}),
        ap_rate=0.3, two_view_rate=0.3, stream=3,
    ),
)

HELDOUT_PROFILE = CenterProfile(
    center=HELDOUT,
    description="unseen center (never trained on): wide field of view, dark high-gamma "
                "processing, British reporting",
    acquisition=Acquisition(scale=1.125, zoom=0.88, window=(0.0, 0.85), gamma=1.6,
                            contrast=1.1, blur_sigma=0.4, noise_std=0.02,
                            markers=("text_block",), marker_text="RAD/UK"),
    style=BRITISH,
    skew=LabelSkew({"heart_failure": 0.15, "infection": 0.15, "critical_care": 0.1,
                    "trauma": 0.08, "neoplasm": 0.08, "chronic": 0.15}),
    ap_rate=0.2, two_view_rate=0.35, stream=HELDOUT_STREAM,
)

CENTER_PROFILES: dict[str, CenterProfile] = {p.center: p for p in (*BASE_PROFILES,
                                                                   HELDOUT_PROFILE)}
CENTER_STYLES: tuple[ReportStyle, ...] = tuple(p.style for p in BASE_PROFILES)


def center_ids(n: int) -> list[str]:
    if not 1 <= n <= MAX_CENTERS:
        raise ValueError(f"centers = {n}: the phantom benchmark has 1..{MAX_CENTERS} centers")
    return list(string.ascii_lowercase[:n])


def center_profiles(n: int, heldout: bool = True) -> list[CenterProfile]:
    """Profiles of centers 'a'.. (n of them), plus 'heldout' when asked."""
    profiles = [BASE_PROFILES[i] if i < len(BASE_PROFILES) else _derived(i)
                for i in range(len(center_ids(n)))]
    return profiles + ([HELDOUT_PROFILE] if heldout else [])


def _derived(index: int) -> CenterProfile:
    """Center `index` >= 4: a seeded variation of base center index % 4."""
    base = BASE_PROFILES[index % len(BASE_PROFILES)]
    rng = np.random.default_rng(np.random.SeedSequence([7919, index]))
    acq = base.acquisition
    acquisition = dataclasses.replace(
        acq,
        scale=float(np.clip(acq.scale * rng.uniform(0.85, 1.15), 0.75, 1.5)),
        gamma=float(acq.gamma * rng.uniform(0.8, 1.25)),
        noise_std=float(acq.noise_std * rng.uniform(0.7, 1.4)),
        blur_sigma=float(acq.blur_sigma + rng.uniform(0.0, 0.5)),
        zoom=float(acq.zoom * rng.uniform(0.93, 1.07)),
    )
    skew = LabelSkew({k: float(np.clip(base.skew.situations.get(k, 0.0)
                                       * rng.uniform(0.5, 1.5), 0.0, 0.9))
                      for k in SITUATION_NAMES})
    center = string.ascii_lowercase[index]
    return CenterProfile(
        center=center,
        description=f"variant of center {base.center!r} ({base.description.split(':')[0]}) "
                    f"with its own mixed reporting style",
        acquisition=acquisition,
        style=mixed_style(f"mixed-{center}", rng),
        skew=skew,
        ap_rate=base.ap_rate,
        two_view_rate=base.two_view_rate,
        stream=index,
    )


def mixed_style(name: str, rng: np.random.Generator) -> ReportStyle:
    """A new style: each observation's phrasing, and the layout, from a random center style."""
    def pick() -> ReportStyle:
        return CENTER_STYLES[int(rng.integers(len(CENTER_STYLES)))]

    layout, habits = pick(), pick()
    per_obs = {obs: pick() for obs in layout.order}
    tables = {}
    for table in ("positive", "opacity_desc", "cause", "negative"):  # nouns go with hedges
        tables[table] = {obs: getattr(st, table)[obs] for obs, st in per_obs.items()
                         if obs in getattr(st, table)}
    return dataclasses.replace(
        layout,
        name=name,
        summary=f"mix of center styles (layout of {layout.name!r}, negation habits of "
                f"{habits.name!r})",
        negative_list={},  # list nouns belong to a style's own negative phrasing
        list_rate=0.0,
        negative_mention=habits.negative_mention,
        **tables,
    )
