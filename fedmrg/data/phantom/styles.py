"""Reporting styles: labels (+ finding details) -> report text, one style per center.

A `ReportStyle` is a center's writing habit: section order (findings first, impression first, or
findings only), its terminology ("cardiomegaly" / "enlarged cardiac silhouette" / "the heart is
enlarged"), how it hedges ("possible", "questionable", "suspected"), how it phrases negatives
("no pleural effusion" / "the costophrenic angles are sharp" / "negative for effusion"), whether
negatives are listed together, and how often it mentions an absent finding at all (verbosity).

The text is a deterministic function of (labels, details, style, rng): every code is written so
that a CheXpert-style labeler reads it back exactly:
- POSITIVE: a plain statement; an opacity-causing finding is written as an opacity description
  and its cause in one sentence ("Patchy opacity in the right lower lobe, consistent with
  pneumonia."), so lung opacity is positive too;
- UNCERTAIN: a hedged statement; for an opacity cause, the opacity is described in its own
  (certain) sentence and the cause is hedged in the next one;
- NEGATIVE: a negated statement (or part of a negated list);
- BLANK: not mentioned. "No finding" is never written as a word list; it is what a report with
  nothing present says ("No acute cardiopulmonary process.").
All sentences of one observation carry the same code (findings and impression agree).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedmrg.data.phantom.labels import (
    ATELECT,
    CARDIO,
    CONSOL,
    DEVICES,
    ECM,
    EDEMA,
    EFFUSION,
    FRACTURE,
    LESION,
    NO_FINDING,
    OPACITY,
    OPACITY_CHILDREN,
    PLEURAL_OTHER,
    PNEUMONIA,
    PTX,
    FindingDetails,
    LabelSkew,
    check_labels,
    sample_details,
    sample_labels,
    study_rng,
)
from fedmrg.data.schema import NEGATIVE, POSITIVE, UNCERTAIN

T = tuple[str, ...]  # alternative templates; one is drawn per use

# Anatomical order most reports follow; ICU-style reports put the devices first.
ANATOMICAL_ORDER: tuple[int, ...] = (CARDIO, ECM, OPACITY, CONSOL, PNEUMONIA, EDEMA, ATELECT,
                                     LESION, EFFUSION, PTX, PLEURAL_OTHER, FRACTURE, DEVICES)
DEVICES_FIRST: tuple[int, ...] = (DEVICES,) + ANATOMICAL_ORDER[:-1]


@dataclass(frozen=True)
class ReportStyle:
    """A center's reporting habits. Templates use the fields of `finding_context`."""

    name: str
    summary: str  # one line for docs and the manifest
    sections: tuple[str, ...]  # "findings" / "impression", in the order written
    headers: dict[str, str]  # section -> header ("" writes no header)
    order: tuple[int, ...]  # observation order inside the findings section
    positive: dict[int, T]  # findings sentence for a present non-opacity observation
    opacity_desc: dict[int, T]  # the opacity an opacity cause (or isolated opacity) shows as
    cause: dict[int, T]  # the cause named after a connector ("... consistent with {cause}")
    connectors: T  # "consistent with", "in keeping with"
    nouns: dict[int, T]  # noun phrases: impression items and hedged sentences
    hedges: T  # "Possible {x}." -- {x} is a noun phrase
    negative: dict[int, T]  # negated sentences
    negative_list: dict[int, str] = field(default_factory=dict)  # nouns a "No a, b or c." joins
    list_rate: float = 0.0  # how often 2+ listable negatives are joined into one sentence
    normal: T = ("No acute cardiopulmonary process.",)
    devices: dict[str, T] = field(default_factory=dict)  # device kind -> findings sentence
    device_nouns: dict[str, str] = field(default_factory=dict)
    device_impression: T = ("{x} in satisfactory position.",)
    numbered_impression: bool = False
    negative_mention: dict[int, float] = field(default_factory=dict)  # label sampling habit

    @property
    def has_impression(self) -> bool:
        return "impression" in self.sections


# --------------------------------------------------------------------------- context


RIBS = ("fifth", "sixth", "seventh")
SIZES = ("small", "moderate", "large")
GRADES = ("mild", "moderate", "severe")
NODULE_CM = ("1.2", "1.8", "4.0")


def finding_context(obs: int, details: FindingDetails) -> dict[str, str]:
    """Words a template can use for one observation (side, lobe, size, ...)."""
    side = details.side.get(obs, "right")
    zone = details.zone.get(obs, "lower")
    sev = details.severity.get(obs, 0)
    both = side == "bilateral"
    return {
        "side": side,
        "lobe": f"bilateral {zone} lobe" if both else f"{side} {zone} lobe",
        "the_lobe": f"both {zone} lobes" if both else f"the {side} {zone} lobe",
        "the_base": "both lung bases" if both else f"the {side} lung base",
        "basilar": "bibasilar" if both else f"{side} basilar",
        "hemithorax": "both hemithoraces" if both else f"the {side} hemithorax",
        "size": SIZES[sev],
        "grade": GRADES[sev],
        "s": "s" if both else "",
        "is": "are" if both else "is",
        "a": "" if both else "a ",
        "apex": "both apices" if both else f"the {side} apex",
        "lesion": f"{NODULE_CM[sev]} cm {'mass' if sev == 2 else 'nodule'}",
        "rib": RIBS[sev],
        "ett_cm": ("5", "4", "3")[sev],
        "line_side": "left" if side == "left" else "right",
    }


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick(rng: np.random.Generator, options: T) -> str:
    if not options:
        raise ValueError("a style table entry has no template")
    return options[int(rng.integers(len(options)))]


def _join_list(items: list[str], conj: str = "or") -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {conj} " + items[-1]


# --------------------------------------------------------------------------- text


def _hedge(style: ReportStyle, noun: str, ctx: dict[str, str], rng: np.random.Generator) -> str:
    return _cap(_pick(rng, style.hedges).format(x=noun, X=_cap(noun), **ctx))


def _noun(obs: int, code: int, style: ReportStyle, details: FindingDetails,
          ctx: dict[str, str], rng: np.random.Generator) -> str:
    """Noun phrase of a present observation (impression items and hedges)."""
    if obs != DEVICES:
        return _pick(rng, style.nouns[obs]).format(**ctx)
    kinds = details.devices or ("central_line",)
    if code == UNCERTAIN:  # one questionable device, not a hedged list of several
        kinds = kinds[:1]
    return _join_list([style.device_nouns[k].format(**ctx) for k in kinds], "and")


def _findings_sentences(labels: Sequence[int], details: FindingDetails, style: ReportStyle,
                        rng: np.random.Generator) -> list[str]:
    written: list[tuple[int, str]] = []  # (observation, sentence), in style order
    children_present = any(labels[c] in (POSITIVE, UNCERTAIN) for c in OPACITY_CHILDREN)
    for obs in style.order:
        code = labels[obs]
        ctx = finding_context(obs, details)
        if code == POSITIVE and obs == DEVICES:
            kinds = details.devices or ("central_line",)
            written += [(obs, _cap(_pick(rng, style.devices[k]).format(**ctx))) for k in kinds]
        elif code == POSITIVE and obs == OPACITY:
            if not children_present:  # otherwise each cause's sentence describes the opacity
                written.append((obs, _cap(_pick(rng, style.opacity_desc[OPACITY]).format(**ctx))
                                + "."))
        elif code == POSITIVE and obs in OPACITY_CHILDREN:
            desc = _pick(rng, style.opacity_desc[obs]).format(**ctx)
            cause = _pick(rng, style.cause[obs]).format(**ctx)
            written.append((obs, f"{_cap(desc)}, {_pick(rng, style.connectors)} {cause}."))
        elif code == POSITIVE:
            written.append((obs, _cap(_pick(rng, style.positive[obs]).format(**ctx))))
        elif code == UNCERTAIN:
            if obs in OPACITY_CHILDREN:  # the opacity is seen; only its cause is in doubt
                written.append((obs, _cap(_pick(rng, style.opacity_desc[obs]).format(**ctx))
                                + "."))
            noun = _noun(obs, code, style, details, ctx, rng)
            written.append((obs, _hedge(style, noun, ctx, rng)))
        elif code == NEGATIVE:
            written.append((obs, _cap(_pick(rng, style.negative[obs]).format(**ctx))))
    # Some styles join their negatives into one "No a, b or c." sentence, placed where the
    # first of them would have been.
    listable = [o for o in style.order if labels[o] == NEGATIVE and o in style.negative_list]
    if len(listable) >= 2 and rng.random() < style.list_rate:
        joined = f"No {_join_list([style.negative_list[o] for o in listable])}."
        first = next(i for i, (o, _) in enumerate(written) if o in listable)
        written = [(o, s) for o, s in written[:first]] + [(-1, joined)] + [
            (o, s) for o, s in written[first:] if o not in listable or labels[o] != NEGATIVE]
    return [s for _, s in written]


def _impression_items(labels: Sequence[int], details: FindingDetails, style: ReportStyle,
                      rng: np.random.Generator) -> list[str]:
    items: list[str] = []
    children_present = any(labels[c] in (POSITIVE, UNCERTAIN) for c in OPACITY_CHILDREN)
    for obs in style.order:
        code = labels[obs]
        if code not in (POSITIVE, UNCERTAIN) or (obs == OPACITY and children_present):
            continue
        ctx = finding_context(obs, details)
        noun = _noun(obs, code, style, details, ctx, rng)
        if code == UNCERTAIN:
            items.append(_hedge(style, noun, ctx, rng))
        elif obs == DEVICES:
            items.append(_cap(_pick(rng, style.device_impression).format(x=noun)))
        else:
            items.append(_cap(noun) + ".")
    if labels[NO_FINDING] == POSITIVE:
        items.append(_pick(rng, style.normal))
    return items


def report_from_labels(labels: Sequence[int], style: ReportStyle, rng: np.random.Generator,
                       details: FindingDetails | None = None) -> str:
    """Write the report a center with `style` would write for these labels.

    `details` (side, size, devices, ...) should be the ones the image was rendered with; when
    None they are drawn from `rng`. Raises ValueError if the labels are inconsistent
    (see labels.check_labels).
    """
    labels = [int(v) for v in labels]
    check_labels(labels)
    if details is None:
        details = sample_details(rng, labels)
    findings = _findings_sentences(labels, details, style, rng)
    impression = _impression_items(labels, details, style, rng) if style.has_impression else []
    if not findings:  # say it differently from the impression when the style can
        others = tuple(n for n in style.normal if n not in impression) or style.normal
        findings = [_pick(rng, others)]
    if not style.has_impression and labels[NO_FINDING] == POSITIVE and \
            findings[-1] not in style.normal:
        findings.append(_pick(rng, style.normal))
    if style.numbered_impression and len(impression) > 1:
        impression = [f"{i + 1}. {item}" for i, item in enumerate(impression)]
    parts: list[str] = []
    for section in style.sections:
        body = " ".join(findings if section == "findings" else impression)
        header = style.headers.get(section, "")
        parts.append(f"{header} {body}" if header else body)
    return " ".join(parts)


# --------------------------------------------------------------------------- the styles

_DEVICE_SENTENCES_STANDARD: dict[str, T] = {
    "ett": ("Endotracheal tube terminates {ett_cm} cm above the carina.",),
    "central_line": ("{line_side} internal jugular central venous catheter terminates in the "
                     "superior vena cava.",),
    "pacemaker": ("Left chest wall pacemaker with leads in the right atrium and right "
                  "ventricle.",),
    "ng_tube": ("Nasogastric tube courses below the diaphragm.",),
}

ACADEMIC = ReportStyle(
    name="academic",
    summary="FINDINGS then IMPRESSION; 'cardiomegaly', 'possible ...', 'no pleural effusion or "
            "pneumothorax'",
    sections=("findings", "impression"),
    headers={"findings": "FINDINGS:", "impression": "IMPRESSION:"},
    order=ANATOMICAL_ORDER,
    positive={
        CARDIO: ("{grade} cardiomegaly.",),
        ECM: ("The mediastinum is widened.", "Widened mediastinum."),
        EFFUSION: ("{size} {side} pleural effusion{s}.",),
        PTX: ("{size} {side} apical pneumothorax.",),
        PLEURAL_OTHER: ("{side} apical pleural thickening.",),
        FRACTURE: ("Acute fracture of the {side} {rib} rib.",),
    },
    opacity_desc={
        OPACITY: ("patchy opacity in {the_lobe}",),
        PNEUMONIA: ("patchy airspace opacities in {the_lobe}",),
        CONSOL: ("dense opacity in {the_lobe}",),
        EDEMA: ("{grade} bilateral interstitial opacities",),
        ATELECT: ("linear opacities at {the_base}",),
        LESION: ("rounded opacity in {the_lobe}",),
    },
    cause={PNEUMONIA: ("pneumonia",), CONSOL: ("consolidation",), EDEMA: ("pulmonary edema",),
           ATELECT: ("atelectasis",), LESION: ("a {lesion}",)},
    connectors=("consistent with",),
    nouns={
        CARDIO: ("{grade} cardiomegaly",), ECM: ("widened mediastinum",),
        OPACITY: ("opacity in {the_lobe}",), PNEUMONIA: ("{lobe} pneumonia",),
        CONSOL: ("{lobe} consolidation",), EDEMA: ("{grade} pulmonary edema",),
        ATELECT: ("{basilar} atelectasis",), LESION: ("{lesion} in {the_lobe}",),
        EFFUSION: ("{size} {side} pleural effusion{s}",), PTX: ("{size} {side} pneumothorax",),
        PLEURAL_OTHER: ("{side} apical pleural thickening",),
        FRACTURE: ("{side} {rib} rib fracture",),
    },
    hedges=("Possible {x}.",),
    negative={
        CARDIO: ("Heart size is normal.",), ECM: ("The mediastinal contours are normal.",),
        OPACITY: ("No focal airspace opacity.",), CONSOL: ("No focal consolidation.",),
        PNEUMONIA: ("No evidence of pneumonia.",), EDEMA: ("No pulmonary edema.",),
        ATELECT: ("No atelectasis.",), LESION: ("No pulmonary nodules or masses.",),
        EFFUSION: ("No pleural effusion.",), PTX: ("No pneumothorax.",),
        PLEURAL_OTHER: ("No pleural thickening.",), FRACTURE: ("No acute rib fracture.",),
        DEVICES: ("No lines or tubes.",),
    },
    negative_list={CONSOL: "focal consolidation", EDEMA: "pulmonary edema",
                   EFFUSION: "pleural effusion", PTX: "pneumothorax"},
    list_rate=0.8,
    normal=("No acute cardiopulmonary process.",),
    devices=_DEVICE_SENTENCES_STANDARD,
    device_nouns={"ett": "endotracheal tube", "central_line": "{line_side} internal jugular "
                  "catheter", "pacemaker": "pacemaker", "ng_tube": "nasogastric tube"},
    negative_mention={CARDIO: 0.5, ECM: 0.3, CONSOL: 0.6, EDEMA: 0.3, EFFUSION: 0.7, PTX: 0.7,
                      FRACTURE: 0.1},
)

ICU = ReportStyle(
    name="icu",
    summary="verbose portable-film style: devices first, 'enlarged cardiac silhouette', "
            "'questionable ...', numbered IMPRESSION, every negative spelled out",
    sections=("findings", "impression"),
    headers={"findings": "FINDINGS:", "impression": "IMPRESSION:"},
    order=DEVICES_FIRST,
    positive={
        CARDIO: ("The cardiac silhouette is {grade}ly enlarged.",),
        ECM: ("Mediastinal widening is noted.",),
        EFFUSION: ("{size} layering {side} pleural effusion{s}.",),
        PTX: ("There is a {size} {side} apical pneumothorax.",),
        PLEURAL_OTHER: ("{side} apical pleural thickening is noted.",),
        FRACTURE: ("There is a displaced fracture of the {side} {rib} rib.",),
    },
    opacity_desc={
        OPACITY: ("hazy opacity in {the_lobe}",),
        PNEUMONIA: ("multifocal patchy opacities in {the_lobe}",),
        CONSOL: ("dense airspace opacity in {the_lobe}",),
        EDEMA: ("bilateral perihilar and interstitial opacities",),
        ATELECT: ("streaky opacities at {the_base}",),
        LESION: ("rounded opacity in {the_lobe}",),
    },
    cause={PNEUMONIA: ("multifocal pneumonia",), CONSOL: ("airspace consolidation",),
           EDEMA: ("{grade} interstitial edema",), ATELECT: ("atelectasis",),
           LESION: ("a {lesion}",)},
    connectors=("compatible with", "consistent with"),
    nouns={
        CARDIO: ("enlarged cardiac silhouette",), ECM: ("mediastinal widening",),
        OPACITY: ("hazy opacity in {the_lobe}",), PNEUMONIA: ("pneumonia in {the_lobe}",),
        CONSOL: ("consolidation in {the_lobe}",), EDEMA: ("{grade} interstitial edema",),
        ATELECT: ("{basilar} atelectasis",), LESION: ("{lesion} in {the_lobe}",),
        EFFUSION: ("{size} {side} pleural effusion{s}",), PTX: ("{size} {side} pneumothorax",),
        PLEURAL_OTHER: ("{side} apical pleural thickening",),
        FRACTURE: ("fracture of the {side} {rib} rib",),
    },
    hedges=("Questionable {x}.", "{X} may be present."),
    negative={
        CARDIO: ("The cardiac silhouette is within normal limits.",),
        ECM: ("The mediastinum is not widened.",),
        OPACITY: ("No focal airspace opacity is seen.",),
        CONSOL: ("No focal consolidation is seen.",),
        PNEUMONIA: ("No radiographic evidence of pneumonia.",),
        EDEMA: ("No pulmonary edema.",), ATELECT: ("No atelectasis.",),
        LESION: ("No pulmonary nodules are identified.",),
        EFFUSION: ("No pleural effusion is seen.",), PTX: ("No pneumothorax is identified.",),
        PLEURAL_OTHER: ("No pleural thickening.",),
        FRACTURE: ("No displaced rib fractures are identified.",),
        DEVICES: ("No lines or tubes are present.",),
    },
    normal=("No acute cardiopulmonary abnormality.",),
    devices={
        "ett": ("An endotracheal tube is in place with its tip {ett_cm} cm above the carina.",),
        "central_line": ("A {line_side} internal jugular central venous line terminates in the "
                         "mid superior vena cava.",),
        "pacemaker": ("A left-sided pacemaker is present with leads in the right atrium and "
                      "right ventricle.",),
        "ng_tube": ("An enteric tube passes below the diaphragm with its tip in the stomach.",),
    },
    device_nouns={"ett": "endotracheal tube", "central_line": "{line_side} internal jugular "
                  "line", "pacemaker": "left-sided pacemaker", "ng_tube": "enteric tube"},
    device_impression=("{x} in appropriate position.",),
    numbered_impression=True,
    negative_mention={CARDIO: 0.7, ECM: 0.4, OPACITY: 0.3, CONSOL: 0.5, PNEUMONIA: 0.2,
                      EDEMA: 0.6, ATELECT: 0.2, EFFUSION: 0.8, PTX: 0.9, FRACTURE: 0.2},
)

TERSE = ReportStyle(
    name="terse",
    summary="IMPRESSION first, then short FINDINGS; 'cardiomegaly', 'probable ...', "
            "'negative for effusion'",
    sections=("impression", "findings"),
    headers={"findings": "FINDINGS:", "impression": "IMPRESSION:"},
    order=ANATOMICAL_ORDER,
    positive={
        CARDIO: ("Cardiomegaly.",), ECM: ("Wide mediastinum.",),
        EFFUSION: ("{side} effusion{s}, {size}.",), PTX: ("{side} pneumothorax, {size}.",),
        PLEURAL_OTHER: ("{side} apical pleural thickening.",),
        FRACTURE: ("{side} {rib} rib fracture.",),
    },
    opacity_desc={
        OPACITY: ("{lobe} opacity",), PNEUMONIA: ("{lobe} opacity",),
        CONSOL: ("{lobe} opacity",), EDEMA: ("perihilar opacities",),
        ATELECT: ("{basilar} opacities",), LESION: ("{lobe} opacity",),
    },
    cause={PNEUMONIA: ("pneumonia",), CONSOL: ("consolidation",), EDEMA: ("edema",),
           ATELECT: ("atelectasis",), LESION: ("{lesion}",)},
    connectors=("consistent with",),
    nouns={
        CARDIO: ("cardiomegaly",), ECM: ("wide mediastinum",), OPACITY: ("{lobe} opacity",),
        PNEUMONIA: ("{lobe} pneumonia",), CONSOL: ("{lobe} consolidation",),
        EDEMA: ("edema",), ATELECT: ("{basilar} atelectasis",),
        LESION: ("{lobe} {lesion}",), EFFUSION: ("{side} effusion{s}",),
        PTX: ("{side} pneumothorax",), PLEURAL_OTHER: ("{side} pleural thickening",),
        FRACTURE: ("{side} {rib} rib fracture",),
    },
    hedges=("Probable {x}.",),
    negative={
        CARDIO: ("Normal heart size.",), ECM: ("Normal mediastinum.",),
        OPACITY: ("No opacity.",), CONSOL: ("No consolidation.",),
        PNEUMONIA: ("Negative for pneumonia.",), EDEMA: ("No edema.",),
        ATELECT: ("No atelectasis.",), LESION: ("No nodules.",),
        EFFUSION: ("Negative for effusion.",), PTX: ("Negative for pneumothorax.",),
        PLEURAL_OTHER: ("No pleural thickening.",), FRACTURE: ("No fracture.",),
        DEVICES: ("No devices.",),
    },
    negative_list={CONSOL: "consolidation", EDEMA: "edema", EFFUSION: "effusion",
                   PTX: "pneumothorax"},
    list_rate=0.5,
    normal=("Normal chest.", "No acute findings."),
    devices={
        "ett": ("ET tube {ett_cm} cm above carina.",),
        "central_line": ("{line_side} IJ line, tip in SVC.",),
        "pacemaker": ("Pacemaker in place.",),
        "ng_tube": ("NG tube in stomach.",),
    },
    device_nouns={"ett": "ET tube", "central_line": "{line_side} IJ line",
                  "pacemaker": "pacemaker", "ng_tube": "NG tube"},
    device_impression=("{x} in place.",),
    negative_mention={CARDIO: 0.2, CONSOL: 0.2, EFFUSION: 0.3, PTX: 0.3},
)

NARRATIVE = ReportStyle(
    name="narrative",
    summary="findings only, no headers, full sentences; 'the heart is enlarged', 'the "
            "costophrenic angles are sharp', '... is suspected'",
    sections=("findings",),
    headers={"findings": ""},
    order=ANATOMICAL_ORDER,
    positive={
        CARDIO: ("The heart is {grade}ly enlarged.",),
        ECM: ("The superior mediastinum is widened.",),
        EFFUSION: ("There {is} {a}{size} {side} pleural effusion{s}.",),
        PTX: ("A {size} {side} pneumothorax is present.",),
        PLEURAL_OTHER: ("There is pleural thickening at {apex}.",),
        FRACTURE: ("There is a fracture of the {side} {rib} rib.",),
    },
    opacity_desc={
        OPACITY: ("there is a patchy opacity in {the_lobe}",),
        PNEUMONIA: ("there are patchy opacities in {the_lobe}",),
        CONSOL: ("there is a dense opacity in {the_lobe}",),
        EDEMA: ("there is hazy perihilar opacity in a bat-wing distribution",),
        ATELECT: ("there are linear opacities at {the_base}",),
        LESION: ("there is a rounded opacity in {the_lobe}",),
    },
    cause={PNEUMONIA: ("pneumonia",), CONSOL: ("consolidation",), EDEMA: ("pulmonary edema",),
           ATELECT: ("atelectasis",), LESION: ("a {lesion}",)},
    connectors=("consistent with", "representing"),
    nouns={
        CARDIO: ("cardiac enlargement",), ECM: ("mediastinal widening",),
        OPACITY: ("an opacity in {the_lobe}",), PNEUMONIA: ("pneumonia in {the_lobe}",),
        CONSOL: ("consolidation in {the_lobe}",), EDEMA: ("pulmonary edema",),
        ATELECT: ("atelectasis at {the_base}",), LESION: ("a {lesion} in {the_lobe}",),
        EFFUSION: ("{a}{size} {side} pleural effusion{s}",),
        PTX: ("a {size} {side} pneumothorax",), PLEURAL_OTHER: ("pleural thickening at {apex}",),
        FRACTURE: ("a fracture of the {side} {rib} rib",),
    },
    hedges=("{X} {is} suspected.",),
    negative={
        CARDIO: ("The heart is normal in size.", "The heart is not enlarged."),
        ECM: ("The mediastinum is not widened.",),
        OPACITY: ("There is no focal opacity.",), CONSOL: ("There is no focal consolidation.",),
        PNEUMONIA: ("There is no evidence of pneumonia.",),
        EDEMA: ("There is no pulmonary edema.",), ATELECT: ("There is no atelectasis.",),
        LESION: ("There is no pulmonary nodule.",),
        EFFUSION: ("The costophrenic angles are sharp.",),
        PTX: ("There is no evidence of pneumothorax.",),
        PLEURAL_OTHER: ("There is no pleural thickening.",),
        FRACTURE: ("The osseous structures are intact.",),
        DEVICES: ("There are no lines or tubes.",),
    },
    normal=("The chest is unremarkable.", "No acute abnormality is seen."),
    devices={
        "ett": ("The endotracheal tube tip lies {ett_cm} cm above the carina.",),
        "central_line": ("A {line_side} internal jugular catheter ends in the superior vena "
                         "cava.",),
        "pacemaker": ("A pacemaker overlies the left chest with leads in the heart.",),
        "ng_tube": ("A nasogastric tube extends into the stomach.",),
    },
    device_nouns={"ett": "an endotracheal tube", "central_line": "a {line_side} internal "
                  "jugular catheter", "pacemaker": "a pacemaker", "ng_tube": "a nasogastric tube"},
    negative_mention={CARDIO: 0.8, ECM: 0.3, CONSOL: 0.5, EFFUSION: 0.8, PTX: 0.6,
                      FRACTURE: 0.4},
)

BRITISH = ReportStyle(
    name="british",
    summary="the unseen center: Findings/Conclusion, British terms ('oedema', 'opacification', "
            "'in keeping with', 'in situ'), '... cannot be excluded'",
    sections=("findings", "impression"),
    headers={"findings": "Findings:", "impression": "Conclusion:"},
    order=ANATOMICAL_ORDER,
    positive={
        CARDIO: ("Cardiac enlargement.",),
        ECM: ("Widening of the superior mediastinum.",),
        EFFUSION: ("{size} {side} pleural effusion{s} with blunting of the costophrenic "
                   "angle{s}.",),
        PTX: ("{size} {side} pneumothorax with a visible lung edge.",),
        PLEURAL_OTHER: ("Pleural thickening at {apex}.",),
        FRACTURE: ("Fracture of the {side} {rib} rib.",),
    },
    opacity_desc={
        OPACITY: ("ill-defined opacification in {the_lobe}",),
        PNEUMONIA: ("patchy airspace opacification in {the_lobe}",),
        CONSOL: ("dense opacification of {the_lobe}",),
        EDEMA: ("bilateral perihilar airspace opacification",),
        ATELECT: ("linear opacification at {the_base}",),
        LESION: ("a well-defined rounded opacity in {the_lobe}",),
    },
    cause={PNEUMONIA: ("pneumonia",), CONSOL: ("consolidation",), EDEMA: ("pulmonary oedema",),
           ATELECT: ("atelectasis",), LESION: ("a {lesion}",)},
    connectors=("in keeping with",),
    nouns={
        CARDIO: ("cardiac enlargement",), ECM: ("mediastinal widening",),
        OPACITY: ("opacification in {the_lobe}",), PNEUMONIA: ("{lobe} pneumonia",),
        CONSOL: ("{lobe} consolidation",), EDEMA: ("pulmonary oedema",),
        ATELECT: ("{basilar} atelectasis",), LESION: ("{lesion} in {the_lobe}",),
        EFFUSION: ("{side} pleural effusion{s}",), PTX: ("{side} pneumothorax",),
        PLEURAL_OTHER: ("{side} apical pleural thickening",),
        FRACTURE: ("{side} {rib} rib fracture",),
    },
    hedges=("{X} cannot be excluded.", "Probable {x}."),
    negative={
        CARDIO: ("Heart size within normal limits.",), ECM: ("Normal mediastinal contour.",),
        OPACITY: ("No focal opacification.",), CONSOL: ("No consolidation.",),
        PNEUMONIA: ("No features of pneumonia.",), EDEMA: ("No pulmonary oedema.",),
        ATELECT: ("No atelectasis.",), LESION: ("No pulmonary nodule.",),
        EFFUSION: ("No pleural effusion.", "Clear costophrenic angles."),
        PTX: ("No pneumothorax.",), PLEURAL_OTHER: ("No pleural thickening.",),
        FRACTURE: ("No rib fracture identified.",), DEVICES: ("No lines or tubes.",),
    },
    negative_list={CONSOL: "consolidation", EFFUSION: "effusion", PTX: "pneumothorax"},
    list_rate=0.6,
    normal=("Normal chest radiograph.", "No acute abnormality."),
    devices={
        "ett": ("Endotracheal tube tip {ett_cm} cm above the carina.",),
        "central_line": ("{line_side} internal jugular central line, tip projected over the "
                         "SVC.",),
        "pacemaker": ("Dual-chamber pacemaker in situ.",),
        "ng_tube": ("Nasogastric tube tip below the diaphragm.",),
    },
    device_nouns={"ett": "endotracheal tube", "central_line": "{line_side} internal jugular "
                  "line", "pacemaker": "pacemaker", "ng_tube": "nasogastric tube"},
    device_impression=("{x} in situ.",),
    negative_mention={CARDIO: 0.5, ECM: 0.2, CONSOL: 0.6, EFFUSION: 0.5, PTX: 0.6},
)

NEUTRAL = ReportStyle(
    name="neutral",
    summary="no center writes this way: plain 'there is ...' sentences, Findings/Impression; "
            "the base LM warm-up corpus",
    sections=("findings", "impression"),
    headers={"findings": "Findings:", "impression": "Impression:"},
    order=ANATOMICAL_ORDER,
    positive={
        CARDIO: ("The heart is enlarged.",), ECM: ("The mediastinum is enlarged.",),
        EFFUSION: ("There {is} {a}{size} {side} pleural effusion{s}.",),
        PTX: ("There is a {size} {side} pneumothorax.",),
        PLEURAL_OTHER: ("There is {side} pleural thickening.",),
        FRACTURE: ("There is a fracture of the {side} {rib} rib.",),
    },
    opacity_desc={
        OPACITY: ("there is an opacity in {the_lobe}",),
        PNEUMONIA: ("there are patchy opacities in {the_lobe}",),
        CONSOL: ("there is a dense opacity in {the_lobe}",),
        EDEMA: ("there are bilateral hazy opacities",),
        ATELECT: ("there are linear opacities at {the_base}",),
        LESION: ("there is a round opacity in {the_lobe}",),
    },
    cause={PNEUMONIA: ("pneumonia",), CONSOL: ("consolidation",), EDEMA: ("pulmonary edema",),
           ATELECT: ("atelectasis",), LESION: ("a {lesion}",)},
    connectors=("consistent with",),
    nouns={
        CARDIO: ("cardiomegaly",), ECM: ("mediastinal enlargement",),
        OPACITY: ("opacity in {the_lobe}",), PNEUMONIA: ("pneumonia",),
        CONSOL: ("consolidation",), EDEMA: ("pulmonary edema",), ATELECT: ("atelectasis",),
        LESION: ("{lesion} in {the_lobe}",), EFFUSION: ("{side} pleural effusion{s}",),
        PTX: ("{side} pneumothorax",), PLEURAL_OTHER: ("pleural thickening",),
        FRACTURE: ("rib fracture",),
    },
    hedges=("Possible {x}.", "{X} may be present."),
    negative={
        CARDIO: ("The heart is normal in size.",), ECM: ("The mediastinum is normal.",),
        OPACITY: ("There is no opacity.",), CONSOL: ("There is no consolidation.",),
        PNEUMONIA: ("There is no pneumonia.",), EDEMA: ("There is no pulmonary edema.",),
        ATELECT: ("There is no atelectasis.",), LESION: ("There is no nodule.",),
        EFFUSION: ("There is no pleural effusion.",), PTX: ("There is no pneumothorax.",),
        PLEURAL_OTHER: ("There is no pleural thickening.",),
        FRACTURE: ("There is no fracture.",), DEVICES: ("There are no lines or tubes.",),
    },
    normal=("No acute abnormality.",),
    devices={
        "ett": ("There is an endotracheal tube.",),
        "central_line": ("There is a {line_side} central venous catheter.",),
        "pacemaker": ("There is a pacemaker.",),
        "ng_tube": ("There is a nasogastric tube.",),
    },
    device_nouns={"ett": "endotracheal tube", "central_line": "central venous catheter",
                  "pacemaker": "pacemaker", "ng_tube": "nasogastric tube"},
    device_impression=("{x} in place.",),
    negative_mention={CARDIO: 0.4, ECM: 0.2, OPACITY: 0.2, CONSOL: 0.4, EDEMA: 0.3,
                      EFFUSION: 0.4, PTX: 0.4, FRACTURE: 0.2},
)

STYLES: dict[str, ReportStyle] = {s.name: s for s in (ACADEMIC, ICU, TERSE, NARRATIVE, BRITISH,
                                                     NEUTRAL)}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)
NEUTRAL_STYLE = NEUTRAL.name

# The label mix of the neutral corpus: every situation fairly common, so every phrase occurs.
NEUTRAL_SKEW = LabelSkew(situations={"heart_failure": 0.2, "infection": 0.2,
                                     "critical_care": 0.15, "trauma": 0.08, "neoplasm": 0.1,
                                     "chronic": 0.1})
NEUTRAL_STREAM = 10_000  # seed stream of the neutral corpus (centers use 0..26)


def get_style(name: str) -> ReportStyle:
    if name not in STYLES:
        raise ValueError(f"unknown report style {name!r}; known: {list(STYLES)}")
    return STYLES[name]


def neutral_studies(n: int, seed: int) -> list[tuple[list[int], str]]:
    """`n` (labels, report) pairs in the neutral style (no center uses it), from labels sampled
    with a broad mix of findings; the public corpus the builtin base LM is warmed up on (the
    labels make its diagnosis prompts). Deterministic."""
    if n < 0:
        raise ValueError(f"neutral_corpus: n = {n} must be >= 0")
    studies = []
    for i in range(n):
        rng = study_rng(seed, NEUTRAL_STREAM, i)
        labels = sample_labels(rng, NEUTRAL_SKEW, NEUTRAL.negative_mention)
        studies.append(([int(x) for x in labels], report_from_labels(labels, NEUTRAL, rng)))
    return studies


def neutral_corpus(n: int, seed: int) -> list[str]:
    """The reports of `neutral_studies(n, seed)`."""
    return [report for _, report in neutral_studies(n, seed)]


def _template_strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [s for v in value for s in _template_strings(v)]
    return []


def radiology_lexicon() -> list[str]:
    """Every word any report style can write (templates and the values their fields take),
    lower-cased and sorted: the vocabulary of radiology English. A general-purpose LLM's
    tokenizer knows these words; the builtin LM's tokenizer gets them from here so no center's
    reports fall apart into characters. Words only: no sentence of a center style is used."""
    import re

    texts: list[str] = []
    for style in STYLES.values():
        for f in dataclasses.fields(style):
            if f.name not in ("name", "summary"):
                texts += _template_strings(getattr(style, f.name))
    values = [*RIBS, *SIZES, *GRADES, *(g + "ly" for g in GRADES), *NODULE_CM,
              "left right bilateral both upper middle lower",
              "lobe lobes lung base bases bibasilar basilar hemithorax hemithoraces apex apices",
              "mass nodule cm are is a s"]
    text = re.sub(r"\{[A-Za-z_]+\}[a-z]*", " ", " ".join(texts + values)).lower()
    return sorted(set(re.findall(r"[a-z]+|[0-9]+", text)))
