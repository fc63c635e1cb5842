"""The picture in docs/phantom.md: one row per center (held-out included), images and a report.

Usage: ``python -m fedmrg.data.phantom.figure docs/phantom_centers.png [--seed 0]``
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from fedmrg.data.phantom.centers import center_profiles  # noqa: E402
from fedmrg.data.phantom.generator import make_sample, sample_record  # noqa: E402
from fedmrg.data.schema import NUM_OBSERVATIONS, POSITIVE  # noqa: E402

IMAGES_PER_ROW = 4
SHORT_NAMES = ("ECM", "cardiomeg.", "opacity", "lesion", "edema", "consol.", "pneumonia",
               "atelect.", "PTX", "effusion", "pl. other", "fracture", "devices")


def _example_indices(profile, seed: int, count: int) -> list[int]:
    """The first studies with at least one finding, and one with a lateral view if any."""
    chosen: list[int] = []
    lateral = None
    for i in range(200):
        labels, _, views, _ = sample_record(profile, seed, i)
        if lateral is None and len(views) > 1 and labels[-1] != POSITIVE:
            lateral = i
        elif labels[-1] != POSITIVE and len(chosen) < count:
            chosen.append(i)
    if lateral is not None:
        chosen = chosen[: count - 1] + [lateral]
    return chosen


def render_centers_figure(out_png: str | Path, seed: int = 0, image_size: int = 64,
                          centers: int = 4) -> Path:
    """Draw the center grid to `out_png` (PNG) and return its path."""
    profiles = center_profiles(centers, heldout=True)
    fig = plt.figure(figsize=(15, 2.35 * len(profiles)), dpi=110)
    grid = fig.add_gridspec(len(profiles), IMAGES_PER_ROW + 3, wspace=0.05, hspace=0.25,
                            top=0.95)
    for row, profile in enumerate(profiles):
        indices = _example_indices(profile, seed, IMAGES_PER_ROW)
        for col, index in enumerate(indices):
            sample = make_sample(profile, seed, index, image_size)
            ax = fig.add_subplot(grid[row, col])
            view = len(sample.views) - 1 if col == len(indices) - 1 else 0
            ax.imshow(sample.images[view], cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            found = [SHORT_NAMES[k] for k in range(NUM_OBSERVATIONS - 1)
                     if sample.labels[k] == POSITIVE]
            ax.set_title(f"{sample.views[view]}: " + _short(found), fontsize=6.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"center {profile.center}\n({profile.style.name})", fontsize=10)
        report = sample_record(profile, seed, indices[0])[3]
        text_ax = fig.add_subplot(grid[row, IMAGES_PER_ROW:])
        text_ax.axis("off")
        head = textwrap.fill(profile.description, 95)
        body = textwrap.fill(report, 95, max_lines=7, placeholder=" [...]")
        text_ax.text(0.0, 1.0, head, fontsize=7.5, style="italic", va="top", color="#444")
        text_ax.text(0.0, 0.62, body, fontsize=8, va="top", family="monospace")
    fig.suptitle(f"Phantom multi-center benchmark (seed {seed}, {image_size} px): acquisition "
                 f"and reporting style differ per center; first image's report at the right",
                 fontsize=11, y=0.985)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out


def _short(names: list[str]) -> str:
    words = ", ".join(names) or "normal"
    return words if len(words) <= 30 else words[:28] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_png", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    print(render_centers_figure(args.out_png, seed=args.seed, image_size=args.image_size))


if __name__ == "__main__":
    main()
