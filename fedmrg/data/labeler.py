"""A rule-based, CheXpert-style labeler for chest radiograph reports.

``label_report(text)`` returns the 14 CheXpert observation codes (``schema.OBSERVATIONS`` order,
``BLANK=0, POSITIVE=1, NEGATIVE=2, UNCERTAIN=3``); ``label_reports(texts)`` does the same for a
batch and returns an ``(N, 14)`` int8 array. It is used for clinical-efficacy (CE) metrics and to
fill labels that a source dataset lacks (the importers, docs/data.md). Pure Python + numpy.

How it works (the CheXpert / NegBio pipeline, with regular expressions instead of a parser):

1. Sections: ``INDICATION:``, ``HISTORY:``, ``COMPARISON:``, ``TECHNIQUE:`` ... are dropped (they
   name what was *asked*, not what was *seen*); ``FINDINGS:`` / ``IMPRESSION:`` headers are removed.
2. The text is lower-cased, split into sentences, and sentences into clauses at ``;``, "but",
   "however", "although", "except (for)", "other than", ... A negation or uncertainty cue never
   reaches across a clause boundary.
3. Mentions: every observation has a table of phrases (``MENTIONS`` below, one table per
   observation), each a regular expression plus the outcome it has when it is *affirmed*
   (``POSITIVE``, or ``UNCERTAIN`` for phrases that are hedged by nature such as "vascular
   congestion"). ``EXCLUSIONS`` lists look-alike phrases that are not mentions ("pleural line" is
   not a support device, "pericardial effusion" is not a pleural effusion). Statements about size
   and normality of anatomy ("heart size is normal", "mediastinal contours are within normal
   limits", "lungs are clear", "costophrenic angles are sharp") are handled by the ``ANATOMY``
   table, which maps a subject (or a list of subjects) and its predicate to outcomes.
4. Each mention is classified in its clause, in CheXpert's order: (a) uncertainty cues that contain
   a negation word ("cannot exclude", "not excluded", "no new", "not well seen") -> UNCERTAIN;
   (b) negation cues before ("no", "without", "negative for", "free of", "no evidence of", ...)
   or after ("is not seen", "has resolved", "no longer seen", "removed") -> NEGATIVE; (c)
   uncertainty cues ("may", "possible", "likely", "suspicious for", "concerning for", "versus",
   "cannot be excluded", "borderline", "X or Y") -> UNCERTAIN; else the phrase's affirmed outcome.
   A cue's scope runs to the end of its clause over lists ("no effusion, pneumothorax, or
   consolidation") but stops at a new predicate ("is", "are", "there is", "and the", ", the",
   "which" ...), so "no pneumothorax is seen and the heart is enlarged" keeps cardiomegaly
   positive. "No change in the effusion" / "partially resolved" are pseudo-negations.
5. Aggregation per observation over the report: positive beats uncertain beats negative; no
   mention -> blank.

Conventions (documented decisions; see also the comments in the tables):

* **No finding** follows CheXpert exactly: POSITIVE when the report is non-empty and no other
  observation except support devices is positive or uncertain, *and* no other abnormality from
  ``OTHER_FINDINGS`` (emphysema, granuloma, scoliosis, hernia, degenerative change, tortuous
  aorta, ...) is positive or uncertain; otherwise BLANK. It is never NEGATIVE. An empty /
  whitespace-only report is all BLANK. Explicit normal-study phrases ("no acute cardiopulmonary
  abnormality", "normal chest", "no acute findings") need no rule: they mention nothing, so they
  leave the other observations blank and No finding positive.
* **"Lungs are clear"** (and "clear lungs", "lungs are normal") codes **lung opacity NEGATIVE**
  and nothing else (consolidation, edema, pneumonia stay blank unless named). CheXpert itself
  leaves it blank; we negate the one observation the phrase directly denies so that centers that
  write "lungs are clear" and centers that write "no focal opacity" are labeled alike.
* "Pleural spaces are clear/normal" -> pleural effusion and pneumothorax NEGATIVE;
  "costophrenic angles are sharp" -> pleural effusion NEGATIVE; "osseous structures are intact /
  unremarkable" and "no acute osseous abnormality" -> fracture NEGATIVE; "pulmonary vasculature
  is normal" -> edema NEGATIVE.
* Heart: "heart size is normal", "heart is not enlarged" -> cardiomegaly NEGATIVE; "heart size is
  at the upper limits of normal", "borderline", "top-normal", "mildly prominent" -> UNCERTAIN
  (CheXpert would call "upper limits of normal" negative; we treat it as borderline); "heart size
  is stable/unchanged" (no size stated) -> UNCERTAIN (CheXpert's rule).
* "Cardiomediastinal silhouette" phrases code **enlarged cardiomediastinum only** (as CheXpert):
  "normal cardiomediastinal silhouette" -> enlarged cardiomediastinum NEGATIVE, cardiomegaly
  blank; "stable cardiomediastinal silhouette" -> enlarged cardiomediastinum UNCERTAIN. "Cardiac
  and mediastinal contours are normal" names both and negates both.
* CheXpert conventions kept: "vascular/pulmonary congestion" -> edema UNCERTAIN; "CHF" / "heart
  failure" -> edema; "fibrosis" -> pleural other; "scarring" -> lung opacity (but "pleural /
  pleuroparenchymal / apical scarring" -> pleural other); "no new X" -> X UNCERTAIN (an old X may
  persist); "X or Y" between two findings -> both UNCERTAIN; "likely X" -> UNCERTAIN; old/healed
  fractures -> fracture POSITIVE; consolidation does not imply lung opacity.
* "Blunting of the costophrenic angle" -> pleural effusion UNCERTAIN (effusion or thickening).
* A finding explained as a mimic ("nodular opacity likely a nipple shadow", "opacity may represent
  superimposed vessels") -> UNCERTAIN; "mass-like" -> lung lesion UNCERTAIN (a shape, not a
  diagnosis); "fractures could be missed" -> UNCERTAIN.
* Cue scope is at most 250 characters and never crosses a sentence or clause boundary.
* "Post-surgical / postoperative changes", "sternotomy", "CABG", "clips" -> support devices
  POSITIVE; "extubated", "has been removed" -> support devices NEGATIVE. External ECG leads are
  not support devices.

Adding phrases: append a ``_p(...)`` to the observation's table (or a regex to ``EXCLUSIONS``),
add a sentence to ``tests/data/labeler_sentences.py``, and run ``pytest tests/test_labeler.py``
and ``python benchmarks/labeler_accuracy.py``.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmrg.data.schema import (
    BLANK,
    NEGATIVE,
    NO_FINDING,
    NUM_OBSERVATIONS,
    OBSERVATIONS,
    POSITIVE,
    UNCERTAIN,
)

__all__ = [
    "ANATOMY",
    "EXCLUSIONS",
    "MENTIONS",
    "Mention",
    "OTHER_FINDINGS",
    "find_mentions",
    "label_report",
    "label_reports",
]


@dataclass(frozen=True)
class Phrase:
    """One mention rule: a regex (matched on lower-cased text) and its affirmed outcome.

    ``affirmed`` is the code when no cue applies (POSITIVE, or UNCERTAIN for phrases that are
    hedged by nature, or NEGATIVE for phrases that are themselves a denial such as "extubated").
    ``negated_only`` phrases count only when negated ("no acute osseous abnormality" denies a
    fracture, but "osseous abnormality" alone is not a fracture).
    """

    pattern: str
    affirmed: int = POSITIVE
    negated_only: bool = False


def _p(pattern: str, affirmed: int = POSITIVE, negated_only: bool = False) -> Phrase:
    return Phrase(pattern, affirmed, negated_only)


# ----------------------------------------------------------------------------------------------
# Mention tables: one per observation. Patterns are matched on lower-cased text; \b is implied
# at both ends of every pattern.
# ----------------------------------------------------------------------------------------------

ENLARGED_CARDIOMEDIASTINUM = (
    # "widened mediastinum", "enlarged cardiomediastinal silhouette" are ANATOMY statements.
    _p(r"mediastinal\s+(?:widening|enlargement)"),
    _p(r"(?:widening|enlargement)\s+of\s+the\s+(?:superior\s+|upper\s+)?(?:cardio)?mediastin\w*"),
    _p(r"cardiomediastinal\s+enlargement"),
    # "prominent mediastinum" is how radiologists hedge; CheXpert-style -> uncertain.
    _p(r"mediastinal\s+prominence|prominence\s+of\s+the\s+(?:superior\s+)?mediastinum", UNCERTAIN),
)

CARDIOMEGALY = (
    _p(r"cardiomegaly"),
    _p(r"cardiac\s+enlargement|enlargement\s+of\s+the\s+(?:heart|cardiac\s+silhouette)"),
    _p(r"biventricular\s+enlargement|(?:left|right)\s+ventricular\s+enlargement"),
    # "heart is enlarged", "enlarged heart", "heart size is normal" ...: see ANATOMY.
)

LUNG_OPACITY = (
    _p(r"opaci(?:ty|ties|fication|fications|fied|fying)"),
    _p(r"infiltrat(?:e|es|ion|ions|ive)"),
    _p(r"air[\s-]?space\s+(?:disease|process|filling)"),  # NOT bare "airspace": see consolidation
    _p(r"haz(?:e|iness|y)"),  # "perihilar haze" is excluded below: it is edema
    _p(r"ground[\s-]glass"),
    _p(r"shadowing"),  # British: "patchy airspace shadowing"
    _p(
        r"(?:increased|patchy|hazy|focal|ill-defined|streaky|linear|airspace|parenchymal"
        r"|retrocardiac|basilar|basal|bibasilar|perihilar)\s+densit(?:y|ies)"
    ),
    _p(
        r"interstitial\s+(?:markings?|pattern|prominence|thickening|abnormalit\w+|changes?|"
        r"lung\s+disease|disease|process)"
    ),
    _p(r"reticul(?:ar|onodular)\s+(?:markings?|pattern|changes?)|reticulation"),
    _p(r"peribronchial\s+(?:thickening|cuffing)|bronchial\s+wall\s+thickening"),
    # CheXpert: parenchymal scarring is an opacity; pleural / apical scarring is pleural other.
    _p(r"scar(?:s|ring)?"),
)

LUNG_LESION = (
    _p(r"nodul(?:e|es|i)"),
    _p(r"nodular\s+(?:opacit\w+|densit\w+|lesions?|foc(?:us|i))"),
    _p(r"mass(?:es)?"),
    _p(r"mass-?like", UNCERTAIN),  # describes a shape, not a diagnosis
    _p(r"lesions?"),  # bone / skin lesions are excluded below
    _p(r"tumou?rs?|neoplasms?|carcinoma|malignanc\w+|cancer"),
    _p(r"(?:pulmonary\s+|lung\s+)?metastas[ie]s|metastatic\s+(?:disease|nodules|lesions)"),
    _p(r"cavitary\s+(?:lesion|mass|nodule)"),
)

EDEMA = (
    _p(r"o?edema"),  # British "oedema"
    _p(r"(?:congestive\s+)?heart\s+failure|chf"),  # CheXpert: CHF is an edema mention
    _p(r"(?:fluid|volume)\s+overload"),
    _p(r"perihilar\s+haz(?:e|iness)"),
    _p(r"kerley\s+(?:b\s+)?lines|septal\s+lines"),
    # CheXpert: congestion is not frank edema -> uncertain (negated -> negative).
    _p(r"(?:pulmonary\s+|vascular\s+|venous\s+|perihilar\s+)*congestion", UNCERTAIN),
    _p(
        r"vascular\s+(?:engorgement|prominence|redistribution|indistinctness|plethora)"
        r"|indistinct(?:ness)?\s+(?:of\s+the\s+)?(?:pulmonary\s+)?vessels|cephalization",
        UNCERTAIN,
    ),
)

CONSOLIDATION = (
    # "no focal airspace consolidation" is a consolidation mention only (no lung opacity).
    _p(r"consolidat\w*"),
)

PNEUMONIA = (
    _p(r"(?:broncho)?pneumonias?|pneumonic"),
    _p(r"infect(?:ion|ions|ious)"),
)

ATELECTASIS = (
    _p(r"atelecta\w+"),  # atelectasis, atelectatic, "plate-like / subsegmental atelectasis"
    _p(r"collaps(?:e|ed|es)"),  # vertebral collapse excluded below
)

PNEUMOTHORAX = (
    _p(r"(?:hydro)?pneumothora(?:x|ces)|ptx"),
    # The visceral pleural line is the sign of a pneumothorax ("no visible pleural line" -> neg).
    _p(r"(?:visceral\s+)?pleural\s+(?:line|edge)"),
    _p(r"deep\s+sulcus\s+sign|air\s+in\s+the\s+pleural\s+space"),
)

PLEURAL_EFFUSION = (
    _p(r"effusions?"),  # pericardial / joint effusions excluded below
    _p(r"hydro(?:pneumo)?thora(?:x|ces)"),
    _p(
        r"(?:pleural|subpulmonic|layering)\s+fluid|fissural\s+fluid"
        r"|fluid\s+(?:[\w-]+\s+){0,2}?(?:in|within|along|into)\s+the\s+(?:\w+\s+)?"
        r"(?:fissures?|pleural\s+space)"
    ),
    _p(r"meniscus(?:\s+sign)?"),
    # Blunting is effusion *or* pleural thickening -> uncertain (negated -> negative).
    _p(
        r"blunt(?:ing|ed)\s+(?:of\s+)?(?:the\s+)?(?:(?:left|right|both|bilateral|lateral|posterior)"
        r"\s+)*costophrenic\s+(?:angles?|sulc[iu]s?|recess(?:es)?)"
        r"|costophrenic\s+(?:angle\s+|sulcus\s+)?blunting",
        UNCERTAIN,
    ),
)

PLEURAL_OTHER = (
    _p(r"pleural\s+(?:thickening|plaques?|calcifications?|scar\w*|abnormalit\w+)"),
    _p(r"calcified\s+pleural\s+plaques?|pleural\s+based\s+(?:thickening|plaques?)"),
    _p(r"pleur(?:al|o)[\s-]?(?:parenchymal|pericardial)\s+(?:scar\w*|thickening|changes)"),
    _p(r"(?:bi)?apical\s+(?:pleural\s+)?(?:thickening|scar\w*|caps?)"),
    _p(r"fibrothorax|mesothelioma"),
    _p(r"fibros[ie]s|fibrotic\s+(?:changes?|scarring|lung\s+disease)"),  # CheXpert convention
)

FRACTURE = (
    _p(r"fractur(?:e|es|ed)|fx"),
    _p(r"broken\s+ribs?"),
    _p(r"cortical\s+(?:discontinuity|disruption|step[\s-]?off|break)"),
    # A denial of any acute bone injury denies a fracture; the affirmed phrase is too vague.
    _p(
        r"(?:acute\s+)?(?:osseous|bony|skeletal)\s+(?:abnormalit(?:y|ies)|injur(?:y|ies)|findings?)",
        negated_only=True,
    ),
)

SUPPORT_DEVICES = (
    _p(r"tubes?|catheters?|picc|lines?"),  # anatomical / pathological "lines" excluded below
    _p(
        r"pace(?:maker|r)s?|pacing\s+(?:leads?|wires?|device|generator)|(?:a)?icd"
        r"|defibrillators?|(?:loop\s+)?recorder|leads"
    ),
    _p(r"port-?a-?cath|portacath|mediport|(?:chest\s+|infusion\s+|power\s+)?port"),
    _p(r"(?:endotracheal|nasogastric|orogastric|enteric|feeding|chest)\s+tubes?|ett|intubat\w+"),
    _p(r"tracheostomy|trach"),
    _p(
        r"(?:median\s+)?sternotomy(?:\s+wires)?|sternal\s+(?:wires|sutures|cerclage)|cabg"
        r"|coronary\s+(?:artery\s+)?bypass"
    ),
    _p(r"post[\s-]?surgical|post[\s-]?operative\s+changes"),  # brief: implies surgical material
    _p(
        r"(?:surgical\s+|vascular\s+|metallic\s+)?clips?|stents?|coils?|ivc\s+filter"
        r"|drains?|hardware|prosthes[ie]s|arthroplast\w+|screws?|cerclage\s+wires?"
    ),
    _p(
        r"(?:prosthetic|mechanical|bioprosthetic)\s+(?:\w+\s+)?valves?|valve\s+replacement"
        r"|(?:aortic|mitral|tricuspid)\s+(?:valve\s+)?(?:replacement|prosthesis|annuloplasty)"
        r"|tavr|tavi|lvad|impella|(?:intra-?aortic\s+)?balloon\s+pump|iabp"
    ),
    _p(r"(?:support|monitoring)\s+(?:devices?|apparatus)|devices?|swan[\s-]ganz|cannula"),
    _p(r"extubat\w+", NEGATIVE),  # "the patient has been extubated": the tube is gone
)

MENTIONS: dict[str, tuple[Phrase, ...]] = {
    "enlarged cardiomediastinum": ENLARGED_CARDIOMEDIASTINUM,
    "cardiomegaly": CARDIOMEGALY,
    "lung opacity": LUNG_OPACITY,
    "lung lesion": LUNG_LESION,
    "edema": EDEMA,
    "consolidation": CONSOLIDATION,
    "pneumonia": PNEUMONIA,
    "atelectasis": ATELECTASIS,
    "pneumothorax": PNEUMOTHORAX,
    "pleural effusion": PLEURAL_EFFUSION,
    "pleural other": PLEURAL_OTHER,
    "fracture": FRACTURE,
    "support devices": SUPPORT_DEVICES,
}

# Look-alike phrases: a mention of the observation that lies inside one of these is dropped.
EXCLUSIONS: dict[str, tuple[str, ...]] = {
    "lung opacity": (
        r"pleur(?:al|o)[\s-]?(?:parenchymal\s+|pericardial\s+)?scar\w*",  # pleural other
        r"(?:bi)?apical\s+(?:pleural\s+)?scar\w*",  # pleural other
        r"perihilar\s+haz(?:e|iness)",  # edema
        r"nodular\s+(?:opacit\w+|densit\w+)",  # lung lesion
    ),
    "lung lesion": (
        r"mass\s+effect",
        r"soft[\s-]tissue\s+mass(?:es)?",
        r"(?:lytic|sclerotic|blastic|osseous|bony|bone|skin|cutaneous)\s+lesions?",
    ),
    "edema": (r"(?:soft[\s-]tissue|subcutaneous|extremity)\s+o?edema",),
    "atelectasis": (r"(?:vertebral|compression)\s+(?:body\s+)?collapse",),
    "pleural effusion": (r"(?:pericardial|joint|knee|shoulder)\s+effusions?",),
    "pleural other": (),
    "pneumonia": (),
    "support devices": (
        # "line" as anatomy or pathology, not a catheter.
        r"(?:visceral\s+)?pleural\s+(?:line|edge)s?",
        r"(?:septal|kerley(?:\s+b)?|reticular|fissural|skin(?:\s+fold)?|azygo-?esophageal"
        r"|paraspinal|paratracheal|(?:anterior|posterior)\s+junction|junction|mach|fracture"
        r"|mid-?clavicular|mid-)\s*lines?",
        r"in\s+line\s+with",
        r"(?:ecg|ekg|monitoring|telemetry|external|cardiac\s+monitor(?:ing)?)\s+"
        r"(?:leads?|wires?|electrodes?|pads?|devices?)",
        r"eustachian\s+tubes?",
    ),
}

# Anatomy statements. Each subject (a regex, matched without a leading "the") belongs to the
# observations it speaks for; ``normal`` / ``abnormal`` / ``hedge`` / ``denied`` are predicate
# regexes. Predicates are read after the subject ("heart size is mildly enlarged", "heart size
# normal") and prefixes before it ("normal heart size", "stable cardiomediastinal silhouette").
# Subjects with no observations (hila, aorta, ...) exist so that lists such as "the heart, hila,
# mediastinum and lungs are normal" parse as one statement.


@dataclass(frozen=True)
class Anatomy:
    """One statement subject and how its predicates map to outcomes."""

    subject: str
    observations: tuple[str, ...]
    normal: str | None = None  # -> NEGATIVE
    abnormal: str | None = None  # -> ``abnormal_code`` (context cues apply)
    abnormal_code: int = POSITIVE
    hedge: str | None = None  # -> UNCERTAIN
    denied: str | None = None  # "not enlarged" -> NEGATIVE (checked before ``abnormal``)
    stable: bool = False  # "stable / unchanged <subject>" without a size -> UNCERTAIN


_NORMAL = (
    r"(?:normal(?!\s+to\b)|unremarkable|within\s+(?:the\s+)?normal\s+limits"
    r"|(?:of\s+)?normal\s+(?:size|caliber|contours?|configuration))"
)
_SIZE_HEDGE = (
    r"(?:(?:at\s+|in\s+)?(?:the\s+)?(?:upper\s+limits?\s+of\s+(?:the\s+)?normal"
    r"|upper\s+(?:range\s+of\s+)?normal|high\s+(?:range\s+of\s+)?normal|top\s+(?:of\s+)?normal"
    r"|(?:top|high|upper)-normal)|borderline(?:\s+enlarged|\s+in\s+size)?|prominent"
    r"|normal\s+to\s+(?:\w+\s+)?(?:enlarged|prominent))"
)
_HEART_ABN = r"(?:enlarged|large|increased|dilated|enlarging)"
_MEDIAST_ABN = r"(?:widened|wide|enlarged|widening|increased)"
_NOT_ABN = r"not\s+(?:\w+\s+)?(?:enlarged|widened|increased|dilated|large)"

ANATOMY: tuple[Anatomy, ...] = (
    # Order matters: longer subjects first ("cardiac and mediastinal contours" before "cardiac").
    Anatomy(
        r"cardiac\s+and\s+mediastinal\s+(?:contours?|silhouettes?|structures)",
        ("cardiomegaly", "enlarged cardiomediastinum"),
        normal=_NORMAL,
        abnormal=_HEART_ABN,
        hedge=_SIZE_HEDGE,
        denied=_NOT_ABN,
        stable=True,
    ),
    Anatomy(
        # CheXpert: "cardiomediastinal" speaks for the mediastinum only.
        r"(?:cardio)?mediastinal\s+and\s+hilar\s+(?:contours?|silhouettes?|structures)"
        r"|cardiomediastinal\s+(?:silhouette|contours?|structures|size|shadow)|cardiomediastinum"
        r"|mediastin(?:um|al\s+(?:contours?|silhouette|width|structures|configuration|shadow))"
        r"|(?:superior\s+)?mediastinum",
        ("enlarged cardiomediastinum",),
        normal=_NORMAL,
        abnormal=_MEDIAST_ABN,
        hedge=_SIZE_HEDGE,
        denied=_NOT_ABN,
        stable=True,
    ),
    Anatomy(
        r"heart(?:\s+size)?|cardiac\s+(?:size|silhouette|shadow|contours?|outline|diameter)"
        r"|size\s+of\s+the\s+heart|cardiopericardial\s+silhouette",
        ("cardiomegaly",),
        normal=_NORMAL,
        abnormal=_HEART_ABN,
        hedge=_SIZE_HEDGE,
        denied=_NOT_ABN,
        stable=True,
    ),
    Anatomy(
        r"lungs|lung\s+(?:fields|parenchyma|bases|apices)|lung(?!\s+volumes?)",
        ("lung opacity",),
        normal=r"(?:clear|normal|unremarkable|within\s+normal\s+limits)",
    ),
    Anatomy(
        r"pleural\s+(?:spaces?|surfaces?|margins)|pleurae?",
        ("pleural effusion", "pneumothorax"),
        normal=r"(?:clear|normal|unremarkable|within\s+normal\s+limits)",
    ),
    Anatomy(
        r"costophrenic\s+(?:angles?|sulc[iu]s?|recess(?:es)?)",
        ("pleural effusion",),
        normal=r"(?:sharp(?:ly\s+defined)?|clear|normal|preserved|well[\s-]defined)",
        abnormal=r"(?:blunted|obscured)",
        abnormal_code=UNCERTAIN,
    ),
    Anatomy(
        r"(?:pulmonary\s+)?(?:vasculature|vascularity|vascular\s+markings)|pulmonary\s+vessels",
        ("edema",),
        normal=_NORMAL,
        abnormal=r"(?:engorged|congested|prominent|increased|indistinct|cephalized|plethoric"
        r"|redistributed)",
        abnormal_code=UNCERTAIN,
    ),
    Anatomy(
        r"(?:osseous|bony|skeletal)\s+(?:structures|thorax|findings)|bones|ribs",
        ("fracture",),
        normal=r"(?:intact|normal|unremarkable|within\s+normal\s+limits)",
    ),
    Anatomy(
        r"hil(?:a|um|ar\s+(?:contours?|structures|regions?|shadows))|aorta|thoracic\s+aorta"
        r"|trachea|diaphragms?|hemidiaphragms?|soft\s+tissues|pulmonary\s+arteries",
        (),
    ),
)

# Other abnormalities (not among the 14): a positive / uncertain one means "not a normal study",
# so it keeps No finding blank (CheXpert does the same with its no-finding phrase list).
OTHER_FINDINGS: tuple[Phrase, ...] = (
    _p(
        r"emphysema\w*|hyper(?:inflat|expan|lucen)\w+|over[\s-]?inflat\w+|copd"
        r"|chronic\s+obstructive|bullae|bulla|bullous|blebs?"
    ),
    _p(r"granulom\w+|calcified\s+(?:[\w-]+\s+){0,3}?(?:lymph\s+)?nodes?"),
    _p(
        r"(?:aortic|vascular|arterial|coronary|valvular|annular|knob)\s+calcifications?"
        r"|calcified\s+(?:aorta|aortic\s+knob)|atheroscleros\w+|atherosclerotic|atheromatous"
    ),
    _p(
        r"tortu(?:ous|osity)|ectatic|ectasia|aneurysm\w*|unfold(?:ed|ing)\s+(?:of\s+the\s+)?aorta"
        r"|dilat(?:ed|ation)\s+(?:of\s+the\s+)?(?:thoracic\s+)?aorta"
    ),
    _p(
        r"elevat(?:ed|ion)\s+(?:of\s+the\s+)?(?:\w+\s+)?hemidiaphragm|eventration"
        r"|hemidiaphragm(?:atic)?\s+elevation"
    ),
    _p(
        r"pneumomediastinum|pneumoperitoneum|free\s+(?:intraperitoneal\s+)?air"
        r"|subcutaneous\s+(?:air|gas)"
    ),
    _p(r"(?:lymph)?adenopathy|hilar\s+(?:enlargement|fullness)|enlarged\s+(?:lymph\s+)?nodes"),
    _p(r"bronchiectasis|bronchitis|bronchiolitis|airways?\s+disease|reactive\s+airways?"),
    _p(r"aspiration|volume\s+loss|air[\s-]fluid\s+levels?"),
    _p(
        r"scolio\w+|kypho\w+|degenerative|spondylo\w+|osteophyt\w+|osteopeni\w+"
        r"|demineraliz\w+|compression\s+deformit\w+|deformit(?:y|ies)"
    ),
    _p(r"(?:lytic|sclerotic|blastic)\s+(?:lesions?|foc(?:us|i)|metastas[ie]s)"),
    _p(r"hernia|ha?ematoma|contusion|ha?emorrhage|pulmonary\s+(?:arterial\s+)?hypertension"),
)

# ----------------------------------------------------------------------------------------------
# Cues (context). All are regexes on lower-cased text.
# ----------------------------------------------------------------------------------------------

# (a) Uncertainty cues that contain a negation word: matched before negation, and masked out of
# the negation search ("cannot be excluded" must not read as "no").
NEGATED_UNCERTAINTY = (
    r"\bcan(?:not|'t|\s+not)\s+(?:be\s+)?(?:entirely\s+|completely\s+|definitely\s+|totally\s+"
    r"|fully\s+|reliably\s+)?(?:exclude[sd]?|rule[sd]?\s+out|ruled\s+out|assess(?:ed)?"
    r"|evaluate[sd]?)\b",
    r"\b(?:could|may|might)\s+not\s+(?:be\s+)?(?:entirely\s+)?(?:exclude[sd]?|ruled?\s+out)\b",
    r"\bnot\s+(?:be\s+)?(?:entirely\s+|completely\s+|definitely\s+|totally\s+|fully\s+)?"
    r"(?:excluded|ruled\s+out)\b",
    r"\bno\s+new\b",  # CheXpert: "no new X" leaves an old X possible
    r"\bnot\s+(?:well|clearly|adequately|optimally|reliably|fully)\s+(?:seen|visuali[sz]ed"
    r"|evaluated|assessed|appreciated|demonstrated|excluded|imaged)\b",
    r"\bnot\s+(?:be\s+)?(?:assessed|evaluated)\b",
)

# Negation words that do not negate the following finding.
PSEUDO_NEGATION = (
    r"\bno\s+(?:(?:significant|interval|appreciable|substantial|definite|major|marked|further"
    r"|other|real|gross|overall)\s+){0,3}(?:change|changes|increase|decrease|worsening"
    r"|progression|improvement|difference|enlargement\s+of)\b",
    r"\bnot\s+(?:significantly\s+|substantially\s+|appreciably\s+|markedly\s+)?(?:changed"
    r"|increased|decreased|improved|worsened|progressed)\b",
    r"\bwithout\s+(?:significant\s+|interval\s+|appreciable\s+)?(?:change|changes)\b",
    r"\bnot\s+only\b|\bno\s+doubt\b",
    r"\b(?:nearly|almost|partially|partly|incompletely|mostly|largely|slowly|not\s+(?:completely"
    r"|fully|entirely))\s+(?:resolved|cleared|removed)\b",
    r"\bpartial\s+resolution\s+of\b",
)

NEGATION_PRE = (
    r"\bno\b",
    r"\bwithout\b",
    r"\bnegative\s+for\b",
    r"\bfree\s+of\b",
    r"\bclear\s+of\b",
    r"\babsence\s+of\b",
    r"\b(?:interval\s+)?(?:resolution|removal|disappearance)\s+of\b",
    r"\bnor\b|\bneither\b",
    r"\bnot\s+(?:a|an|any)\b",
    r"\brather\s+than\b",
    # adjectival "resolved right pneumothorax" (not "has resolved and ... remains")
    r"(?:^|\b(?:the|a|an|previously|recently|interval|now)\s+)(?:resolved|removed)\b",
    r"\b(?:does|do|did)\s*(?:not|n't)\s+\w+",  # "does not show", "doesn't demonstrate"
)

NEGATION_POST = (
    r"\b(?:is|are|was|were)\s+(?:no\s+longer|not)\s+(?:\w+ly\s+)?(?:seen|identified|appreciated"
    r"|present|visuali[sz]ed|demonstrated|evident|detected|noted|visible|apparent|included)\b",
    r"\b(?:not|no\s+longer)\s+(?:seen|identified|appreciated|present|visuali[sz]ed"
    r"|demonstrated|evident|detected|visible|apparent)\b",
    r"\b(?:has|have|had)\s+(?:\w+\s+)?(?:resolved|cleared|disappeared|been\s+removed"
    r"|been\s+withdrawn\s+from\s+the\s+body)\b",
    r"\b(?:resolved|removed|absent|gone)\b",
)

UNCERTAINTY_PRE = (
    r"\b(?:may|might|could|would)\b",
    r"\bpossibl[ey]\b|\bprobabl[ey]\b|\bpossibility\b|\bpotential(?:ly)?\b",
    r"\b(?:most\s+|more\s+)?likely\b",
    r"\bsuspect(?:s|ed)?\b|\bsuspicio(?:n|us)\b",
    r"\b(?:concern(?:ing)?|worrisome|worry)\s+(?:for|of|about)\b",
    r"\bquestion(?:able|ably|ed)?\b",
    r"\bsuggest(?:s|ed|ing|ive|ion)?\b",
    r"\bdifferential\b|\bconsider(?:ed|ation)?\b|\bversus\b|\bor\s+less\s+likely\b",
    r"\bborderline\b|\bequivocal\b|\bindeterminate\b|\buncertain\b|\bunclear\b",
    r"\bpresum(?:ed|ably|ptive)\b|\bfavou?r(?:s|ed)?\b",
    r"\bcorrelat(?:e|ion)\b",
    r"\b(?:difficult|hard)\s+to\s+(?:exclude|rule\s+out|assess|evaluate|distinguish)\b",
    r"\bin\s+the\s+(?:appropriate|proper|correct|right)\s+clinical\s+(?:setting|context)\b",
)

# After the mention; the lookahead keeps "opacity is likely atelectasis" from hedging "opacity".
_UNC_END = (
    r"(?=\s*$|\s*,|\s+(?:and|given|in|on|at|though|although|clinically|with|if|as|for|present"
    r"|seen|noted|here|there)\b)"
)
UNCERTAINTY_POST = (
    r"\b(?:is|are|was|were)\s+(?:also\s+|still\s+)?(?:most\s+|more\s+|quite\s+)?(?:felt\s+to\s+be\s+"
    r"|thought\s+to\s+be\s+)?(?:likely|possible|probable|suspected|questioned|considered"
    r"|favou?red|a\s+consideration|in\s+the\s+differential)" + _UNC_END,
    r"\b(?:suspected|questioned)" + _UNC_END,
    r"\b(?:may|might|could|can)\s+(?:also\s+)?(?:be\s+)?(?:present|seen|exist)\b",
    r"\b(?:may|might|could|can)\s+(?:easily\s+)?be\s+(?:missed|occult|obscured)\b",
    # A finding explained away as a mimic is uncertain ("nodule likely a nipple shadow").
    r"\b(?:likely|probably|possibly|may|might|could|most\s+likely)\s+(?:represents?|reflects?"
    r"|be|be\s+due\s+to|due\s+to|related\s+to|from)\s+(?:an?\s+|the\s+)?(?:nipple|overlapping"
    r"|overlying|superimposed|superimposition|summation|artifact|skin\s+folds?|vessels?"
    r"|vascular\s+shadows?|soft\s+tissues?|costochondral|confluence)",
    r"\b(?:difficult|hard)\s+to\s+(?:exclude|rule\s+out|assess|evaluate)\b",
    r"\bin\s+the\s+(?:appropriate|proper|correct|right)\s+clinical\s+(?:setting|context)\b",
)

# Scope breakers. A pre-cue stops at a conjunction/new subject, a negation pre-cue and every
# post-cue also at a new predicate (a copula), so "no effusion is seen and there is a small
# pneumothorax" and "cardiomegaly is present and pneumothorax is not seen" work.
CONJUNCTION_BREAK = (
    r"\bwhich\b|\bwhose\b|\bwhile\b|\bthere\s+(?:is|are|has|have|was|were)\b"
    r"|\band\s+(?:the|there|a|an|this|these|it|with)\b|,\s+(?:the|there|this|these|it|with)\b"
    r"|\bnow\s+with\b"
)
COPULA_BREAK = (
    r"\b(?:is|are|was|were|remains?|persists?|has|have|had|demonstrates?|shows?|reveals?"
    r"|seen|noted|identified|present)\b"
)

# Two findings joined by "or" / "versus" are each uncertain (CheXpert).
_OR_GAP = re.compile(r"^(?:\s+[a-z-]+){0,5}?\s*,?\s*\b(?:or|and/or|versus)\s+(?:[a-z-]+\s+){0,3}$")

# Clause boundaries (within a sentence).
_CLAUSE_SPLIT = re.compile(
    # "hyperexpanded but clear" stays one clause so that "clear" keeps its subject.
    r";|\bbut\b(?!\s+(?:otherwise\s+)?(?:clear|normal|unremarkable|stable|unchanged)\b)|\bhowever\b|\balthough\b|\bthough\b|\bwhereas\b|\bexcept(?:\s+for)?\b"
    r"|\bwith\s+the\s+exception\s+of\b|\baside\s+from\b|\bapart\s+from\b|\bother\s+than\b"
)

# Report sections: dropped ones describe the request, not the image.
_DROP_SECTIONS = (
    r"indications?|history|clinical\s+history|clinical\s+indication|clinical\s+information"
    r"|reason\s+for\s+(?:exam(?:ination)?|study|examination)|comparisons?|technique|examination"
    r"|exam|procedure|type\s+of\s+(?:exam|study)|notification|clinical\s+data"
)
_KEEP_SECTIONS = r"findings|impression|conclusions?|comments?|opinion|summary|report|final\s+report"
_SECTION_HEADER = re.compile(
    rf"(?:^|(?<=[\n.]))\s*(?P<name>{_DROP_SECTIONS}|{_KEEP_SECTIONS})\s*:",
    re.IGNORECASE,
)
_DROP_NAME = re.compile(rf"^(?:{_DROP_SECTIONS})$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# Implementation
# ----------------------------------------------------------------------------------------------


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"\b(?:{pattern})\b")


def _rxs(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_OBS_INDEX = {name: i for i, name in enumerate(OBSERVATIONS)}
_OTHER = "__other__"  # pseudo-observation for OTHER_FINDINGS

_COMPILED_MENTIONS: list[tuple[str, re.Pattern[str], Phrase]] = [
    (obs, _rx(ph.pattern), ph) for obs, table in MENTIONS.items() for ph in table
] + [(_OTHER, _rx(ph.pattern), ph) for ph in OTHER_FINDINGS]
_COMPILED_EXCLUSIONS: dict[str, re.Pattern[str]] = {
    obs: _rx("|".join(f"(?:{p})" for p in pats)) for obs, pats in EXCLUSIONS.items() if pats
}

_RX_NEG_UNC = _rxs(NEGATED_UNCERTAINTY)
_RX_PSEUDO = _rxs(PSEUDO_NEGATION)
_RX_NEG_PRE = _rxs(NEGATION_PRE)
_RX_NEG_POST = _rxs(NEGATION_POST)
_RX_UNC_PRE = _rxs(UNCERTAINTY_PRE)
_RX_UNC_POST = _rxs(UNCERTAINTY_POST)
_RX_CONJ = re.compile(CONJUNCTION_BREAK)
_RX_COPULA = re.compile(COPULA_BREAK)

_SUBJECT_ALT = "|".join(f"(?:{a.subject})" for a in ANATOMY)
_RX_SUBJECT = re.compile(rf"\b(?:{_SUBJECT_ALT})\b")
_RX_SUBJECT_LIST = re.compile(
    rf"\b(?:{_SUBJECT_ALT})\b(?:\s*(?:,\s*(?:and\s+)?|\s+and\s+|\s+as\s+well\s+as\s+)(?:the\s+)?"
    rf"(?:{_SUBJECT_ALT})\b)*"
)
_ANATOMY_RX = [(re.compile(rf"^(?:{a.subject})$"), a) for a in ANATOMY]
_BE = r"(?:is|are|was|were|appears?|remains?|seems?|looks?|has\s+been|have\s+been)"
_RX_PREDICATE_START = re.compile(rf"^\s*(?::\s*)?(?:{_BE}\s+)?")
# Up to three filler words (adverbs) before the state word, never crossing a new predicate.
_FILLER = r"(?:(?!(?:is|are|with|or|no|not)\b|and\s+(?:the|there|a|an|no)\b)[\w-]+,?\s+){0,3}?"
_WORD = r"(?!(?:is|are|was|were|and|or|but|with|of|the|no|to|in|on|at|a|an)\b)[\w-]+"
_RX_PREFIX = re.compile(
    rf"(?<![\w-])(?P<adj>(?:{_WORD}\s+){{1,3}})(?:(?:appearance|size|configuration|contours?|caliber)"
    rf"\s+of\s+)?(?:the\s+)?$"
)
_RX_STABLE = re.compile(r"\b(?:stable|unchanged|similar|stably)\b")


@dataclass(frozen=True)
class Mention:
    """One classified mention (for debugging rules): observation, matched text, code, clause."""

    observation: str
    text: str
    code: int
    clause: str


def _strip_sections(text: str) -> str:
    headers = list(_SECTION_HEADER.finditer(text))
    if not headers:
        return text
    parts = [text[: headers[0].start()]]
    for i, h in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        if not _DROP_NAME.match(h.group("name").strip()):
            parts.append(text[h.end() : end])
    return ". ".join(p.strip() for p in parts if p.strip())


def _normalize(text: str) -> str:
    text = text.replace("\x00", " ")  # NUL marks mentions internally
    text = _strip_sections(text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.lower()
    # A blank line, or a line starting with a bullet / number, starts a new sentence; other
    # line breaks are wrapping inside a sentence.
    text = re.sub(r"\n\s*\n|\n\s*(?=[-*\u2022]|\d+[.)]\s)", ". ", text)
    text = text.replace("\n", " ")
    subs = (
        (r"\bvs\.?(?=\s)", "versus"),
        (r"\bw/o\b", "without"),
        (r"\bw/\s*", "with "),
        (r"\bs/p\b", "status post"),
        (r"\br/o\b", "rule out"),
        (r"\be\.g\.", "eg"),
        (r"\bi\.e\.", "ie"),
        (r"&", " and "),
        (r"(?:^|(?<=[\s(]))\?\s*(?=[a-z])", "possible "),  # "? pneumonia" (UK style)
        (r"[\u2019`]", "'"),
        (r"\s+", " "),
    )
    for pattern, repl in subs:
        text = re.sub(pattern, repl, text)
    return text.strip()


def _clauses(text: str) -> list[str]:
    out = []
    for sentence in re.split(r"[.!?]+(?=\s|$)", text):
        for clause in _CLAUSE_SPLIT.split(sentence):
            clause = clause.strip(" ,:-")
            if clause:
                out.append(clause)
    return out


def _spans(rx: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [m.span() for m in rx.finditer(text)]


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    chars = list(text)
    for s, e in spans:
        chars[s:e] = "#" * (e - s)
    return "".join(chars)


@dataclass
class _Raw:
    """A mention before classification: span, observation and how its code is decided."""

    start: int
    end: int
    observation: str
    affirmed: int
    mode: str = "context"  # "context" | "fixed" | "negated_only"
    inner: str = ""  # words inside the span that may carry a cue ("heart may be enlarged")


_LIST_COMMA = re.compile(r",(?!\s*(?:(?:and|or|and/or)\s+)?(?:[\w-]+\s+){0,2}\x00)")
_LIST_JOIN = re.compile(
    r"^\x00\s*,?\s*(?:(?:and|or|and/or|as\s+well\s+as)\s+)?(?:[\w-]+\s+){0,2}\x00"
)
_MAX_SCOPE = 250  # characters; a cue never reaches further (and long run-ons stay fast)
_TRAILING_COPULA = re.compile(r"\b(?:is|are|was|were|remains?|has|have|had)\s+(?:been\s+)?$")


class _Context:
    """The cues, scope breakers and mention spans of one clause, to classify its mentions."""

    def __init__(self, clause: str) -> None:
        self.clause = clause
        self.neg_unc = _spans(_RX_NEG_UNC, clause)
        masked = _mask(clause, self.neg_unc + _spans(_RX_PSEUDO, clause))
        self.neg_pre = _spans(_RX_NEG_PRE, masked)
        self.neg_post = _spans(_RX_NEG_POST, masked)
        self.unc_pre = _spans(_RX_UNC_PRE, masked)
        self.unc_post = _spans(_RX_UNC_POST, masked)
        conj = _spans(_RX_CONJ, clause)
        self.pre_breaks = conj
        self.strong_breaks = sorted(conj + _spans(_RX_COPULA, clause))
        self.mentions: list[tuple[int, int]] = []

    def _region(self, a: int, b: int, lead: bool, trail: bool) -> str:
        """clause[a:b] with every mention inside it replaced by NUL (and one at each end)."""
        parts, pos = [], a
        for s, e in self.mentions[bisect_left(self.mentions, (a, -1)) :]:
            if s >= b:
                break
            if e <= b and s >= pos:
                parts += [self.clause[pos:s], "\x00"]
                pos = e
        parts.append(self.clause[pos:b])
        return ("\x00" if lead else "") + "".join(parts) + ("\x00" if trail else "")

    def _in_scope(self, a: int, b: int, breaks: list[tuple[int, int]], post: bool) -> bool:
        """Whether a cue reaches across clause[a:b] (between cue and mention).

        Never across a breaker; across a comma only inside a list of findings ("no effusion,
        pneumothorax, or consolidation"); a post-cue only reaches back over other findings when
        they are listed with the mention ("effusion and pneumothorax are not seen").
        """
        for s, e in breaks[bisect_left(breaks, (a, -1)) :]:  # sorted by start
            if s >= b:
                break
            if e <= b:
                return False
        region = self._region(a, b, lead=post, trail=not post)
        if _LIST_COMMA.search(region):
            return False
        return not (post and region.count("\x00") > 1 and not _LIST_JOIN.match(region))

    def _pre(self, cues: list[tuple[int, int]], breaks: list[tuple[int, int]], start: int) -> bool:
        # Cues are sorted by start and short (< 60 characters).
        for s, e in cues[bisect_left(cues, (start - _MAX_SCOPE - 60, -1)) :]:
            if s >= start:
                break
            if start - _MAX_SCOPE <= e <= start and self._in_scope(e, start, breaks, post=False):
                return True
        return False

    def _post(self, cues: list[tuple[int, int]], end: int) -> bool:
        for s, _ in cues[bisect_left(cues, (end, -1)) :]:
            if s > end + _MAX_SCOPE:
                break
            copula = _TRAILING_COPULA.search(self.clause, end, s)  # "X is not seen"
            if copula and copula.end() == s:
                s = copula.start()
            if self._in_scope(end, s, self.strong_breaks, post=True):
                return True
        return False

    def negated(self, start: int, end: int) -> bool:
        return self._pre(self.neg_pre, self.strong_breaks, start) or self._post(self.neg_post, end)

    def classify(self, start: int, end: int, affirmed: int, inner: str = "") -> int:
        """The mention's code: CheXpert order (negated uncertainty, negation, uncertainty)."""
        if self._pre(self.neg_unc, self.pre_breaks, start) or self._post(self.neg_unc, end):
            return UNCERTAIN
        if self.negated(start, end):
            return NEGATIVE
        if (
            self._pre(self.unc_pre, self.pre_breaks, start)
            or self._post(self.unc_post, end)
            or (inner and _RX_UNC_PRE.search(inner))
        ):
            return UNCERTAIN
        return affirmed


def _excluded(obs: str, clause: str) -> list[tuple[int, int]]:
    rx = _COMPILED_EXCLUSIONS.get(obs)
    return _spans(rx, clause) if rx else []


def _phrase_mentions(clause: str) -> list[_Raw]:
    """Every table mention in the clause (not yet classified)."""
    found: list[_Raw] = []
    excl_cache: dict[str, list[tuple[int, int]]] = {}
    for obs, rx, phrase in _COMPILED_MENTIONS:
        for m in rx.finditer(clause):
            s, e = m.span()
            if obs not in excl_cache:
                excl_cache[obs] = _excluded(obs, clause)
            if any(xs <= s and e <= xe for xs, xe in excl_cache[obs]):
                continue
            if phrase.affirmed == NEGATIVE:
                mode = "fixed"
            elif phrase.negated_only:
                mode = "negated_only"
            else:
                mode = "context"
            found.append(_Raw(s, e, obs, phrase.affirmed, mode))
    # Within one observation the longest phrase wins ("mass-like" is not also "mass"): sweep
    # by start (longest first) and drop a mention that ends inside an earlier, longer one.
    kept: list[_Raw] = []
    reach: dict[str, int] = {}
    for r in sorted(found, key=lambda r: (r.start, -r.end)):
        if r.end <= reach.get(r.observation, -1):
            continue
        reach[r.observation] = max(reach.get(r.observation, -1), r.end)
        kept.append(r)
    return kept


def _state(anat: Anatomy, text: str, anchored: bool) -> tuple[int, re.Match[str]] | None:
    """Classify a predicate (``anchored``: state within 3 filler words) or prefix words."""
    checks: list[tuple[str | None, int]] = [
        (anat.hedge, UNCERTAIN),
        (anat.denied, NEGATIVE),
        (anat.abnormal, anat.abnormal_code),
        (anat.normal, NEGATIVE),
    ]
    for pattern, code in checks:
        if pattern is None:
            continue
        rx = rf"^{_FILLER}(?:{pattern})\b" if anchored else rf"\b(?:{pattern})\b"
        m = re.search(rx, text)
        if m:
            return code, m
    if anat.stable:
        m = (
            re.match(rf"^{_FILLER}(?:stable|unchanged|similar)\b", text)
            if anchored
            else _RX_STABLE.search(text)
        )
        if m:
            return UNCERTAIN, m
    return None


def _anatomy_mentions(clause: str) -> list[_Raw]:
    """Statements about anatomy ("heart size is normal", "clear lungs"), not yet classified."""
    found: list[_Raw] = []
    for lst in _RX_SUBJECT_LIST.finditer(clause):
        subjects = []
        for sm in _RX_SUBJECT.finditer(lst.group(0)):
            for rx, anat in _ANATOMY_RX:
                if rx.match(sm.group(0)):
                    subjects.append(anat)
                    break
        # Bounded windows keep long run-on clauses linear (a state is within a few words).
        after = clause[lst.end() : lst.end() + 160]
        pred_start = _RX_PREDICATE_START.match(after)
        offset = pred_start.end() if pred_start else 0
        predicate = after[offset:]
        prefix_from = max(0, lst.start() - 120)
        prefix = _RX_PREFIX.search(clause, prefix_from, lst.start())
        for anat in subjects:
            if not anat.observations:
                continue
            results = []
            st = _state(anat, predicate, anchored=True)
            if st:
                end = lst.end() + offset + st[1].end()
                results.append((lst.start(), end, st[0], clause[lst.end() : end]))
            if prefix:
                st = _state(anat, prefix.group("adj"), anchored=False)
                if st:
                    results.append((prefix.start(), lst.end(), st[0], prefix.group("adj")))
            for s, e, code, inner in results:
                # Abnormal findings go through the cues; normal / hedged / stable are fixed.
                mode = "context" if code == anat.abnormal_code else "fixed"
                for obs in anat.observations:
                    found.append(_Raw(s, e, obs, code, mode, inner))
    return found


def _or_pairs(clause: str, mentions: list[tuple[int, int, str, int]]) -> list[tuple[int, ...]]:
    """Two affirmed findings joined by "or"/"versus" are both uncertain (CheXpert)."""
    ms = sorted(mentions)
    out = list(ms)
    for i in range(len(ms) - 1):
        a, b = ms[i], ms[i + 1]
        if a[1] > b[0] or a[2] == b[2] or NEGATIVE in (a[3], b[3]):
            continue
        if _OR_GAP.match(clause[a[1] : b[0]]):
            out[i] = (a[0], a[1], a[2], UNCERTAIN)
            out[i + 1] = (b[0], b[1], b[2], UNCERTAIN)
    return out


def _clause_mentions(clause: str) -> list[tuple[int, int, str, int]]:
    """(start, end, observation, code) for every mention in one clause."""
    ctx = _Context(clause)
    raws = _phrase_mentions(clause) + _anatomy_mentions(clause)
    ctx.mentions = sorted((r.start, r.end) for r in raws if r.mode != "negated_only")
    out = []
    for r in raws:
        if r.mode == "fixed":
            code = r.affirmed
        elif r.mode == "negated_only":
            if not ctx.negated(r.start, r.end):
                continue
            code = NEGATIVE
        else:
            code = ctx.classify(r.start, r.end, r.affirmed, r.inner)
        out.append((r.start, r.end, r.observation, code))
    return _or_pairs(clause, out)


def find_mentions(text: str) -> list[Mention]:
    """Every classified mention in ``text``, in reading order (to debug or extend the rules)."""
    out: list[Mention] = []
    if not text or not text.strip():
        return out
    for clause in _clauses(_normalize(text)):
        for s, e, obs, code in sorted(_clause_mentions(clause)):
            out.append(Mention(obs, clause[s:e], code, clause))
    return out


_PRIORITY = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1, BLANK: 0}


def label_report(text: str) -> list[int]:
    """Label one report: 14 codes in ``schema.OBSERVATIONS`` order.

    Codes are ``BLANK=0`` (not mentioned), ``POSITIVE=1``, ``NEGATIVE=2``, ``UNCERTAIN=3``; per
    observation, positive beats uncertain beats negative across the report. No finding is
    POSITIVE when nothing but support devices is positive/uncertain (see module docstring).
    An empty or whitespace-only report gives all BLANK.
    """
    if not isinstance(text, str):
        raise TypeError(f"report must be a str, got {type(text).__name__}")
    labels = [BLANK] * NUM_OBSERVATIONS
    if not re.search(r"\w", text):
        return labels
    other = BLANK
    for m in find_mentions(text):
        if m.observation == _OTHER:
            if _PRIORITY[m.code] > _PRIORITY[other]:
                other = m.code
            continue
        i = _OBS_INDEX[m.observation]
        if _PRIORITY[m.code] > _PRIORITY[labels[i]]:
            labels[i] = m.code
    support = _OBS_INDEX["support devices"]
    findings = [c for i, c in enumerate(labels) if i not in (support, NO_FINDING)] + [other]
    if not any(c in (POSITIVE, UNCERTAIN) for c in findings):
        labels[NO_FINDING] = POSITIVE
    return labels


def label_reports(texts: Sequence[str]) -> np.ndarray:
    """Label a batch of reports: an ``(N, 14)`` int8 array (rows in input order)."""
    out = np.zeros((len(texts), NUM_OBSERVATIONS), dtype=np.int8)
    for i, text in enumerate(texts):
        out[i] = label_report(text)
    return out
