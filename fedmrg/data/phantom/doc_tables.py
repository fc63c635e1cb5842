"""The computed parts of docs/phantom.md: acquisition, style, label tables, examples.

Usage: ``python -m fedmrg.data.phantom.doc_tables docs/phantom.md`` rewrites everything between
the `<!-- phantom:NAME -->` and `<!-- /phantom:NAME -->` markers, so the numbers in the docs are
always what the code produces (a test checks they are up to date).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from fedmrg.data.phantom.centers import CenterProfile, center_profiles
from fedmrg.data.phantom.generator import sample_record
from fedmrg.data.phantom.labels import CARDIO, EFFUSION
from fedmrg.data.phantom.styles import NEUTRAL, neutral_corpus
from fedmrg.data.schema import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN

SEED, STUDIES, IMAGE_SIZE = 0, 300, 64  # the defaults of `fedmrg data phantom`


def _records(profile: CenterProfile) -> list[tuple]:
    return [sample_record(profile, SEED, i) for i in range(STUDIES)]


def acquisition_table(profiles: list[CenterProfile]) -> str:
    rows = ["| center | side (px) | zoom | window | gamma | contrast | blur (px at 64) | noise | "
            "polarity | burned-in | AP films | lateral view |",
            "|---|---:|---:|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for p in profiles:
        a = p.acquisition
        marks = ", ".join({"side_letter": '"R"', "text_block": f'"{a.marker_text}"'}[m]
                          for m in a.markers) or "none"
        rows.append(
            f"| {p.center} | {a.output_size(IMAGE_SIZE)} | {a.zoom:g} | {a.window[0]:g}-"
            f"{a.window[1]:g} | {a.gamma:g} | {a.contrast:g} | {a.blur_sigma:g} | "
            f"{a.noise_std:g} | {'inverted' if a.invert else 'standard'} | {marks} | "
            f"{p.ap_rate:.0%} | {p.two_view_rate:.0%} |")
    return "\n".join(rows)


def style_table(profiles: list[CenterProfile]) -> str:
    rows = ["| center | style | sections | cardiomegaly | no effusion | hedge |",
            "|---|---|---|---|---|---|"]
    for p in [*profiles, None]:
        st = p.style if p else NEUTRAL
        sections = " then ".join(st.headers.get(s) or f"({s}, no header)" for s in st.sections)
        positive = st.positive[CARDIO][0].format(grade="mild").capitalize()
        hedges = " / ".join(h.format(x="X", X="X", **{"is": "is"}) for h in st.hedges)
        rows.append(f"| {p.center if p else '(none: LM warm-up)'} | {st.name} | {sections} | "
                    f"{positive} | {' / '.join(st.negative[EFFUSION])} | {hedges} |")
    return "\n".join(rows)


def label_table(profiles: list[CenterProfile]) -> str:
    labels = {p.center: np.array([r[0] for r in _records(p)]) for p in profiles}
    head = "| observation | " + " | ".join(labels) + " |"
    rows = [head, "|---|" + "---:|" * len(labels)]
    for k, name in enumerate(OBSERVATIONS):
        rates = [f"{(lab[:, k] == POSITIVE).mean():.1%}" for lab in labels.values()]
        rows.append(f"| {name} | " + " | ".join(rates) + " |")
    unc = [f"{(lab == UNCERTAIN).sum() / len(lab):.2f}" for lab in labels.values()]
    neg = [f"{(lab == NEGATIVE).sum() / len(lab):.2f}" for lab in labels.values()]
    rows.append("| *uncertain findings per study* | " + " | ".join(unc) + " |")
    rows.append("| *negated observations per study* | " + " | ".join(neg) + " |")
    return "\n".join(rows)


def examples(profiles: list[CenterProfile]) -> str:
    out = []
    for p in profiles:
        report = next(r[3] for r in _records(p)
                      if r[0][-1] != POSITIVE and sum(v == POSITIVE for v in r[0]) <= 4)
        normal = next(r[3] for r in _records(p) if r[0][-1] == POSITIVE)
        out.append(f"- **{p.center}** ({p.style.name}): {report}\n  - normal study: {normal}")
    out.append(f"- **neutral** (no center): {neutral_corpus(4, SEED)[3]}")
    return "\n".join(out)


def sections() -> dict[str, str]:
    profiles = center_profiles(4, heldout=True)
    return {"acquisition": acquisition_table(profiles), "styles": style_table(profiles),
            "labels": label_table(profiles), "examples": examples(profiles)}


def fill(markdown: str, parts: dict[str, str]) -> str:
    """Replace each marked block of `markdown` with its freshly computed content."""
    for name, body in parts.items():
        pattern = re.compile(rf"(<!-- phantom:{name} -->\n)(?:.*?\n)?(<!-- /phantom:{name} -->)",
                             re.DOTALL)
        if not pattern.search(markdown):
            raise ValueError(f"no <!-- phantom:{name} --> ... <!-- /phantom:{name} --> block")
        markdown = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), markdown)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("doc", type=Path)
    path = parser.parse_args().doc
    path.write_text(fill(path.read_text(), sections()))
    print(f"updated {path}")


if __name__ == "__main__":
    main()
