"""A phrasebook of chest radiograph report sentences (public style, written for this project).

`phrasebook_reports(n, seed)` writes `n` findings + impression reports from sentence templates
of the common reporting language: normal statements per structure, findings with their size,
side and location, devices and their position, comparison and recommendation sentences. They
are the builtin LM's public warm-up text for the `radiology` vocabulary (`model.lm_vocabulary`):
the LM learns to use the words of `radiology_words` in sentences before any center trains it.
No center's report was read to write them. Deterministic: the same (n, seed), the same text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SIDES = ("right", "left")
SIZES = ("small", "moderate", "large", "tiny", "trace")
DEGREES = ("mild", "moderate", "severe", "minimal")
DEGREE_ADVERBS = ("mildly", "moderately", "markedly", "slightly")
LUNG_REGIONS = ("upper lobe", "lower lobe", "lung base", "lung apex", "midlung", "perihilar region",
                "infrahilar region", "retrocardiac region", "lingula", "middle lobe",
                "suprahilar region", "costophrenic angle", "lateral lung", "lung periphery")
RIBS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
        "tenth", "eleventh")
RIB_PARTS = ("anterior", "posterior", "lateral", "anterolateral", "posterolateral")
SPINE = ("thoracic spine", "lower thoracic spine", "thoracolumbar junction", "cervical spine",
         "upper lumbar spine")
JOINTS = ("shoulders", "acromioclavicular joints", "glenohumeral joints", "sternoclavicular "
          "joints")

NORMAL = {
    "heart": ("The heart is normal in size.", "Heart size is normal.",
              "The cardiac silhouette is within normal limits.",
              "The cardiomediastinal silhouette is within normal limits for size and contour.",
              "Normal heart size.", "The heart size is upper limits of normal.",
              "Cardiac size is stable and normal."),
    "mediastinum": ("The mediastinum is unremarkable.", "Mediastinal contours are normal.",
                    "The mediastinal and hilar contours are within normal limits.",
                    "Normal mediastinal contour.", "The trachea is midline.",
                    "Hilar contours are unremarkable.", "The aortic knob is normal."),
    "lungs": ("The lungs are clear.", "Lungs are clear bilaterally.",
              "The lungs are well expanded and clear.",
              "There is no focal airspace consolidation.",
              "No focal consolidation is seen.", "The lungs are free of focal airspace disease.",
              "Pulmonary vasculature is within normal limits.",
              "No evidence of pulmonary edema.", "There is no suspicious pulmonary nodule.",
              "The lungs are normally inflated without focal opacity."),
    "pleura": ("No pleural effusion or pneumothorax.", "There is no pleural effusion.",
               "No pneumothorax is seen.", "The costophrenic angles are sharp.",
               "No large pleural effusion.", "There is no pneumothorax or effusion.",
               "No pleural thickening."),
    "bones": ("The osseous structures are intact.", "No acute bony abnormality.",
              "Visualized osseous structures are unremarkable.",
              "No acute osseous abnormality is identified.",
              "The bones are unremarkable for age.",
              "Soft tissues are unremarkable."),
}
NEGATIVE_IMPRESSIONS = ("No acute cardiopulmonary disease.", "No acute cardiopulmonary process.",
                        "No acute cardiopulmonary abnormality.", "No active disease.",
                        "Normal chest.", "No acute findings.", "Negative chest radiograph.",
                        "No evidence of acute disease.")
COMPARISONS = ("Compared to the prior study, there is no significant change.",
               "Stable appearance of the chest compared with the previous examination.",
               "No prior studies are available for comparison.",
               "Comparison is made with the radiograph from earlier today.",
               "Frontal and lateral views of the chest were obtained.",
               "Single frontal view of the chest.",
               "Portable upright view of the chest.")
RECOMMENDATIONS = ("Follow-up radiographs are recommended to document resolution.",
                   "Chest CT is recommended for further evaluation.",
                   "Clinical correlation is recommended.",
                   "Comparison with prior studies would be helpful.",
                   "Findings were discussed with the referring physician.")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _finding(rng: np.random.Generator) -> tuple[str, str, str]:
    """(structure it replaces the normal statement of, findings sentence, impression phrase)."""
    side = SIDES[0] if rng.random() < 0.5 else SIDES[1]
    sides = _pick(rng, (side, side, "bilateral"))
    region = _pick(rng, LUNG_REGIONS)
    degree, adverb = _pick(rng, DEGREES), _pick(rng, DEGREE_ADVERBS)
    size = _pick(rng, SIZES)
    cm = f"{int(rng.integers(4, 40)) / 10:g}"
    kind = int(rng.integers(18))
    if kind == 0:
        what = _pick(rng, ("opacity", "airspace opacity", "consolidation", "infiltrate"))
        hedge = _pick(rng, (", concerning for pneumonia", ", which may represent atelectasis or "
                            "pneumonia", " with air bronchograms", ", likely infectious", ""))
        return ("lungs", f"There is {_pick(rng, ('patchy', 'focal', 'dense', 'hazy'))} {what} "
                         f"in the {side} {region}{hedge}.", f"{_cap(side)} {region} {what}.")
    if kind == 1:
        what = _pick(rng, ("subsegmental", "linear", "platelike", "bibasilar", "minimal",
                           "dependent"))
        return ("lungs", f"{_cap(what)} atelectasis at the {side} lung base.",
                f"{_cap(what)} atelectasis.")
    if kind == 2:
        plural = "s" if sides == "bilateral" else ""
        blunting = _pick(rng, (f" with blunting of the {side} costophrenic angle", " layering "
                               "posteriorly", " with adjacent compressive atelectasis", ""))
        return ("pleura", f"{_cap(size)} {sides} pleural effusion{plural}{blunting}.",
                f"{_cap(size)} {sides} pleural effusion{plural}.")
    if kind == 3:
        where = _pick(rng, ("apical", "basilar", "lateral", "anterior"))
        return ("pleura", f"There is a {size} {side} {where} pneumothorax without mediastinal "
                          f"shift.", f"{_cap(size)} {side} pneumothorax.")
    if kind == 4:
        what = _pick(rng, ("interstitial edema", "vascular congestion", "pulmonary edema",
                           "cephalization of the pulmonary vasculature"))
        return ("lungs", f"There is {degree} {what}{_pick(rng, (' with Kerley B lines', '', ''))}.",
                f"{_cap(degree)} {what}, consistent with fluid overload.")
    if kind == 5:
        return ("heart", f"The heart is {adverb} enlarged.", f"{_cap(degree)} cardiomegaly.")
    if kind == 6:
        what = _pick(rng, ("nodule", "nodular opacity", "mass", "rounded density", "lesion"))
        return ("lungs", f"There is a {cm} cm {what} in the {side} {region}.",
                f"{_cap(side)} {region} {what}, indeterminate. CT is recommended.")
    if kind == 7:
        calc = _pick(rng, ("calcified granuloma", "calcified granulomas",
                           "calcified hilar lymph nodes", "calcified mediastinal lymph nodes"))
        return ("lungs", f"Stable {calc} in the {side} {region}.",
                "Sequela of prior granulomatous disease.")
    if kind == 8:
        when = _pick(rng, ("healed", "old", "acute", "nondisplaced", "remote"))
        return ("bones", f"There is a{'n' if when[0] in 'ao' else ''} {when} fracture of the "
                         f"{side} {_pick(rng, RIB_PARTS)} {_pick(rng, RIBS)} rib.",
                f"{_cap(when)} {side} rib fracture.")
    if kind == 9:
        where = _pick(rng, SPINE + JOINTS)
        extra = _pick(rng, (" with osteophyte formation", " with endplate sclerosis", "",
                            " and mild kyphosis"))
        return ("bones", f"{_cap(degree)} degenerative changes of the {where}{extra}.",
                f"Degenerative changes of the {where}.")
    if kind == 10:
        what = _pick(rng, ("compression deformity", "wedge deformity", "loss of height"))
        return ("bones", f"{_cap(degree)} {what} of a {_pick(rng, ('lower', 'mid', 'upper'))} "
                         f"thoracic vertebral body, age indeterminate.",
                f"Thoracic vertebral {what}.")
    if kind == 11:
        device = _pick(rng, (
            f"A {side} internal jugular central venous catheter terminates in the superior vena "
            f"cava.",
            f"A {side} subclavian PICC line terminates at the cavoatrial junction.",
            "An endotracheal tube terminates 4 cm above the carina.",
            "An enteric tube courses below the diaphragm with the tip in the stomach.",
            f"A {side}-sided dual-lead pacemaker with leads in the right atrium and right "
            f"ventricle.",
            f"A {side} chest tube is in place.",
            "Median sternotomy wires and mediastinal clips from coronary artery bypass grafting.",
            f"A {side}-sided port catheter with the tip in the distal superior vena cava."))
        return ("mediastinum", device, "Support devices in satisfactory position.")
    if kind == 12:
        return ("lungs", _pick(rng, (
            "The lungs are hyperinflated with flattening of the hemidiaphragms.",
            "Hyperexpanded lungs consistent with chronic obstructive pulmonary disease.",
            "There are upper lobe predominant emphysematous changes.")),
            "Emphysema without acute superimposed process.")
    if kind == 13:
        return ("mediastinum", _pick(rng, (
            "The thoracic aorta is tortuous and calcified.",
            "Atherosclerotic calcification of the aortic arch.",
            "There is unfolding of the thoracic aorta.")), "Aortic atherosclerosis.")
    if kind == 14:
        return ("mediastinum", f"A {size} hiatal hernia is seen behind the heart.",
                f"{_cap(size)} hiatal hernia.")
    if kind == 15:
        what = _pick(rng, ("scarring", "pleural thickening", "fibrotic changes",
                           "chronic interstitial markings", "reticular opacities"))
        return ("lungs", f"{_cap(degree)} {what} in the {sides} {region}, unchanged.",
                f"Chronic {what}.")
    if kind == 16:
        return ("lungs", f"{_cap(_pick(rng, ('elevation', 'eventration')))} of the {side} "
                         f"hemidiaphragm with adjacent atelectasis.",
                f"Elevated {side} hemidiaphragm.")
    crowding = _pick(rng, ("bronchovascular crowding", "bibasilar opacities",
                           "crowding of the pulmonary vasculature"))
    return ("lungs", f"Low lung volumes with {crowding}.", "Low lung volumes.")


def phrasebook_report(rng: np.random.Generator) -> str:
    """One findings + impression report: a few findings (often none) in place of the normal
    statements of their structures, in a seeded order of structures."""
    n_findings = int(rng.choice([0, 1, 1, 2, 2, 3]))
    findings = [_finding(rng) for _ in range(n_findings)]
    replaced = {structure for structure, _, _ in findings}
    sentences = [_pick(rng, COMPARISONS)] if rng.random() < 0.3 else []
    for structure in ("heart", "mediastinum", "lungs", "pleura", "bones"):
        sentences += [text for s, text, _ in findings if s == structure]
        if structure not in replaced or rng.random() < 0.3:
            sentences.append(_pick(rng, NORMAL[structure]))
    impression = " ".join(dict.fromkeys(phrase for _, _, phrase in findings)) or _pick(
        rng, NEGATIVE_IMPRESSIONS)
    if findings and rng.random() < 0.25:
        impression += " " + _pick(rng, RECOMMENDATIONS)
    return " ".join(sentences) + " Impression: " + impression


def phrasebook_reports(n: int, seed: int) -> list[str]:
    """`n` phrasebook reports; the same (n, seed) gives the same reports."""
    if n < 0:
        raise ValueError(f"phrasebook_reports: n = {n} must be >= 0")
    rng = np.random.default_rng([seed, 19])
    return [phrasebook_report(rng) for _ in range(n)]
