"""Rendering a chest radiograph phantom and each finding in it.

The renderer draws an attenuation map in [0, 1] (bright = dense: bone, heart, fluid; dark = air)
at a given side length, in normalized coordinates u (left->right of the image) and v (top->bottom)
in [-1, 1]. Radiological convention: the patient's right is on the image's left. Acquisition
effects (window, gamma, noise, blur, polarity, markers) are applied later (acquisition.py).

Smooth regions (lungs, heart, fluid, haze) are numpy fields; thin structures (ribs, vessels,
tubes, pleural line) are drawn with PIL on a 2x supersampled layer and area-averaged down, which
anti-aliases them. Every finding is drawn where a radiologist would look for it:

  cardiomegaly              heart silhouette wider than half the chest (cardiothoracic ratio)
  enlarged cardiomediast.   wide upper mediastinum
  pleural effusion          fluid at the base with a meniscus, costophrenic angle blunted
  pneumothorax              pleural line with a black, marking-free space beyond it (apex)
  lung lesion               well-defined round nodule(s) or a lobulated mass
  lung opacity (isolated)   one or two soft patches
  pneumonia                 multifocal patchy opacities clustered in one lobe
  consolidation             dense homogeneous lobar opacity with a sharp fissure border
  edema                     bilateral perihilar (bat-wing) haze + Kerley B lines
  atelectasis               plate-like linear bands at the base
  fracture                  rib discontinuity with a displaced fragment and callus
  support devices           endotracheal tube, central line, pacemaker with leads, NG tube
  pleural other             apical cap and lateral pleural thickening

An UNCERTAIN finding is drawn at reduced strength (faint, ambiguous).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
    OPACITY,
    OPACITY_CHILDREN,
    PLEURAL_OTHER,
    PNEUMONIA,
    PTX,
    FindingDetails,
)
from fedmrg.data.schema import POSITIVE, UNCERTAIN

UNCERTAIN_STRENGTH = 0.45  # a hedged finding is drawn this much as strongly as a certain one
SUPERSAMPLE = 2

# Densities the regions blend towards.
SOFT_TISSUE, LUNG, HEART, MEDIASTINUM, FLUID, FREE_AIR = 0.52, 0.14, 0.72, 0.68, 0.6, 0.03


def strength(labels: Sequence[int], obs: int) -> float:
    """How strongly observation `obs` is drawn: 1 positive, faint if uncertain, else 0."""
    return {POSITIVE: 1.0, UNCERTAIN: UNCERTAIN_STRENGTH}.get(int(labels[obs]), 0.0)


class Canvas:
    """Coordinate grids and a supersampled PIL layer for one image of side `size`."""

    def __init__(self, size: int) -> None:
        self.size = size
        c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
        self.v, self.u = np.meshgrid(c, c, indexing="ij")  # (S, S) each: v rows, u columns

    def px(self, u: float, v: float) -> tuple[float, float]:
        s = self.size * SUPERSAMPLE
        return ((u + 1) / 2 * s, (v + 1) / 2 * s)

    def lines(self, polylines: Sequence[Sequence[tuple[float, float]]], width: float,
              rects: Sequence[tuple[float, float, float, float]] = ()) -> np.ndarray:
        """Coverage in [0, 1] of polylines of `width` (normalized units) and filled rects."""
        s = self.size * SUPERSAMPLE
        layer = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(layer)
        w = max(1, round(width / 2 * s))
        for line in polylines:
            draw.line([self.px(u, v) for u, v in line], fill=255, width=w, joint="curve")
        for u0, v0, u1, v1 in rects:
            draw.rectangle([self.px(u0, v0), self.px(u1, v1)], fill=255)
        small = layer.resize((self.size, self.size), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float32) / 255.0

    def ellipse(self, cu: float, cv: float, ru: float, rv: float, soft: float = 0.02
                ) -> np.ndarray:
        """Soft-edged filled ellipse, 1 inside, 0 outside."""
        f = np.sqrt(((self.u - cu) / ru) ** 2 + ((self.v - cv) / rv) ** 2)
        return _sigmoid((1 - f) * min(ru, rv) / soft)

    def gaussian(self, cu: float, cv: float, su: float, sv: float) -> np.ndarray:
        return np.exp(-0.5 * (((self.u - cu) / su) ** 2 + ((self.v - cv) / sv) ** 2))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _lerp(img: np.ndarray, target: float, alpha: np.ndarray) -> np.ndarray:
    return img + (target - img) * np.clip(alpha, 0.0, 1.0)


# --------------------------------------------------------------------------- the normal chest


@dataclass
class Chest:
    """One patient's geometry (normal variation drawn per study)."""

    lung_scale: float  # inspiration depth
    ctr: float  # cardiothoracic ratio
    mediastinum_half: float  # upper mediastinal half-width
    dome: tuple[float, float]  # diaphragm dome heights (image-left lung, image-right lung)
    heart_shift: float

    @staticmethod
    def sample(rng: np.random.Generator) -> Chest:
        return Chest(
            lung_scale=float(rng.uniform(0.95, 1.04)),
            ctr=float(rng.uniform(0.40, 0.47)),
            mediastinum_half=float(rng.uniform(0.085, 0.105)),
            dome=(float(rng.uniform(0.30, 0.36)), float(rng.uniform(0.34, 0.40))),
            heart_shift=float(rng.uniform(-0.03, 0.03)),
        )


def _side_centers(side: str) -> list[float]:
    """Image u of the lung centers for a patient side (patient right = image left)."""
    return {"right": [-0.4], "left": [0.4], "bilateral": [-0.4, 0.4]}[side]


def lung_mask(cv: Canvas, chest: Chest, cu: float, shrink: float = 0.0) -> np.ndarray:
    """Soft mask of one lung centered at image u=cu; `shrink` pulls the edge inwards."""
    k = chest.lung_scale
    ru, rv = 0.34 * k - shrink, 0.74 * k - shrink
    center_v = -0.12 + shrink * 0.6
    p = 3.0  # a squarish superellipse gives lateral costophrenic recesses
    f = (np.abs(cv.u - cu) / ru) ** p + (np.abs(cv.v - center_v) / rv) ** p
    shape = _sigmoid((1 - f) * 12)
    medial = cu - 0.06 * np.sign(cu)
    dome_v = chest.dome[0 if cu < 0 else 1] + 2.0 * (cv.u - medial) ** 2 - shrink * 0.5
    return shape * _sigmoid((dome_v - cv.v) / 0.015)


def _zone_mask(cv: Canvas, chest: Chest, cu: float, zone: str) -> np.ndarray:
    lung = lung_mask(cv, chest, cu)
    if zone == "upper":
        return lung * _sigmoid((-0.32 - cv.v) / 0.02)
    return lung * _sigmoid((cv.v - 0.0) / 0.02)


def _apical_lateral(cv: Canvas, cu: float) -> np.ndarray:
    """Where air and pleural disease collect on a frontal film: the apex and the lateral wall
    above the base, not the medial (mediastinal) side."""
    lateral = (cv.u - cu) * np.sign(cu)  # > 0 towards the chest wall
    return _sigmoid((0.15 - cv.v) / 0.05) * _sigmoid((lateral + 0.12 - 0.4 * (cv.v + 0.9))
                                                     / 0.04)


def _rib_path(side_u: float, k: int, n: int = 24) -> list[tuple[float, float]]:
    """Posterior rib k (0 = first) on one side: rises from the spine, curves down laterally."""
    v0 = -0.8 + 0.16 * k
    pts = []
    for t in np.linspace(0, 1, n):
        u = np.sign(side_u) * (0.07 + 0.72 * t)
        v = v0 - 0.13 * np.sin(np.pi * t * 0.9) + 0.16 * t
        pts.append((float(u), float(v)))
    return pts


def render_pa(labels: Sequence[int], details: FindingDetails, rng: np.random.Generator,
              size: int, ap: bool = False) -> np.ndarray:
    """Frontal (PA, or AP with its magnified heart) phantom with the labelled findings, (S, S)."""
    cv = Canvas(size)
    chest = Chest.sample(rng)
    s = {i: strength(labels, i) for i in range(len(labels))}
    img = np.full((size, size), 0.06, dtype=np.float32)
    img = _lerp(img, SOFT_TISSUE, cv.ellipse(0.0, 0.05, 0.9, 1.0, soft=0.03))  # body

    lungs = {cu: lung_mask(cv, chest, cu) for cu in (-0.4, 0.4)}
    both = np.maximum(lungs[-0.4], lungs[0.4])
    img = _lerp(img, LUNG, both)

    # Heart and mediastinum (cardiomegaly widens the heart, ECM the upper mediastinum).
    ctr = chest.ctr + s[CARDIO] * (0.14 + 0.06 * details.severity.get(CARDIO, 0))
    ctr *= 1.06 if ap else 1.0  # AP films magnify the heart
    heart_ru = ctr * 0.78
    heart_cu = 0.07 + chest.heart_shift + 0.35 * (heart_ru - 0.34)
    heart = cv.ellipse(heart_cu, 0.22, heart_ru, 0.3, soft=0.015)
    img = _lerp(img, HEART, heart)
    med_half = chest.mediastinum_half + s[ECM] * (0.09 + 0.03 * details.severity.get(ECM, 0))
    mediastinum = (_sigmoid((med_half - np.abs(cv.u)) / 0.012)
                   * _sigmoid((0.1 - cv.v) / 0.02) * _sigmoid((cv.v + 0.98) / 0.02))
    img = _lerp(img, MEDIASTINUM, mediastinum)
    trachea = _sigmoid((0.028 - np.abs(cv.u)) / 0.008) * _sigmoid((-0.3 - cv.v) / 0.02)
    img = img - 0.22 * trachea * mediastinum

    # Lung markings (vessels fanning out of the hila), later erased beyond a pneumothorax line.
    vessels = []
    for cu in (-0.4, 0.4):
        hilum = (cu * 0.5, -0.02)
        for angle in rng.uniform(-2.6, 0.5, size=7):
            length = rng.uniform(0.25, 0.45)
            direction = np.array([np.cos(angle) * np.sign(cu), np.sin(angle)])
            mid = np.array(hilum) + direction * length * 0.5
            end = np.array(hilum) + direction * length
            bend = rng.normal(0, 0.04, size=2)
            vessels.append([hilum, tuple(mid + bend), tuple(end + bend)])
    markings = cv.lines(vessels, width=0.025) * both
    ptx_space = np.zeros_like(img)
    if s[PTX] > 0:
        side_u = _side_centers(details.side.get(PTX, "right"))[0]
        gap = (0.13, 0.18, 0.26)[details.severity.get(PTX, 0)]
        outer = lung_mask(cv, chest, side_u)
        inner = lung_mask(cv, chest, side_u, shrink=gap)
        ptx_space = np.clip(outer - inner, 0, 1) * _apical_lateral(cv, side_u)
    img = img + 0.09 * markings * (1 - ptx_space)

    # Ribs and clavicles.
    ribs = [_rib_path(side, k) for side in (-1.0, 1.0) for k in range(9)]
    fracture = s[FRACTURE] > 0
    if fracture:
        side_u = -1.0 if details.side.get(FRACTURE, "right") == "right" else 1.0
        k = 4 + details.severity.get(FRACTURE, 0)
        broken = []
        for kk in (k, k + 1):  # two adjacent ribs: fractures rarely come alone
            ribs.remove(_rib_path(side_u, kk))
            path = _rib_path(side_u, kk)
            cut = int(len(path) * 0.62)
            step = 0.09 * s[FRACTURE]  # the lateral fragment is displaced downwards
            broken.append(path[:cut - 1])
            broken.append([(u, v + step) for u, v in path[cut + 1:]])
        rib_layer = cv.lines(ribs + broken, width=0.04)
        calluses = [(float(u), float(v)) for u, v in
                    (_rib_path(side_u, kk)[int(24 * 0.62)] for kk in (k, k + 1))]
        for cu_, cv_ in calluses:
            img = img + 0.5 * s[FRACTURE] * cv.gaussian(cu_, cv_ + 0.045, 0.04, 0.04)
    else:
        rib_layer = cv.lines(ribs, width=0.04)
    thorax = cv.ellipse(0.0, 0.0, 0.82, 0.95, soft=0.03)
    img = img + 0.11 * rib_layer * thorax
    clavicles = [[(-0.75, -0.78), (-0.35, -0.7), (-0.08, -0.74)],
                 [(0.75, -0.78), (0.35, -0.7), (0.08, -0.74)]]
    img = img + 0.18 * cv.lines(clavicles, width=0.05)
    spine = _sigmoid((0.05 - np.abs(cv.u)) / 0.01) * _sigmoid((0.95 - cv.v) / 0.02)
    img = img + 0.06 * spine

    # Parenchymal findings, drawn inside the lungs.
    parenchyma = np.zeros_like(img)
    if s[EDEMA] > 0:
        grade = 0.8 + 0.2 * details.severity.get(EDEMA, 0)
        for cu in (-0.22, 0.22):
            parenchyma += 0.3 * grade * s[EDEMA] * cv.gaussian(cu, -0.02, 0.17, 0.24)
        kerley = []
        for cu in (-0.72, 0.72):
            for v in rng.uniform(0.1, 0.4, size=3):
                kerley.append([(cu, float(v)), (cu - 0.1 * np.sign(cu), float(v))])
        parenchyma += 0.25 * s[EDEMA] * cv.lines(kerley, width=0.025)
    for obs, count, amp, sigma in ((OPACITY, 2, 0.22, 0.06), (PNEUMONIA, 10, 0.18, 0.06)):
        draw_isolated = obs != OPACITY or not any(labels[c] in (POSITIVE, UNCERTAIN)
                                                  for c in OPACITY_CHILDREN)
        if s[obs] == 0 or not draw_isolated:
            continue
        for cu in _side_centers(details.side.get(obs, "right")):
            zone = details.zone.get(obs, "lower")
            v_lo, v_hi = (-0.65, -0.35) if zone == "upper" else (0.0, 0.3)
            for _ in range(count):
                pu = cu + rng.uniform(-0.18, 0.18)
                pv = rng.uniform(v_lo, v_hi)
                parenchyma += amp * s[obs] * cv.gaussian(pu, pv, sigma, sigma * 0.8)
    if s[CONSOL] > 0:
        for cu in _side_centers(details.side.get(CONSOL, "right")):
            region = _zone_mask(cv, chest, cu, details.zone.get(CONSOL, "lower"))
            texture = 0.85 + 0.15 * cv.gaussian(cu, 0.1, 0.3, 0.3)
            parenchyma += 0.42 * s[CONSOL] * region * texture
    if s[ATELECT] > 0:
        bands = []
        for cu in _side_centers(details.side.get(ATELECT, "right")):
            for v in (0.0, 0.12)[: 1 + (details.severity.get(ATELECT, 0) > 0)]:
                tilt = rng.uniform(-0.04, 0.04)
                bands.append([(cu - 0.24, v - tilt), (cu + 0.24, v + tilt)])
        parenchyma += 0.55 * s[ATELECT] * cv.lines(bands, width=0.05)
    if s[LESION] > 0:
        cu = _side_centers(details.side.get(LESION, "right"))[0]
        sev = details.severity.get(LESION, 0)
        pv = -0.45 if details.zone.get(LESION, "lower") == "upper" else -0.05
        pu = cu + np.sign(cu) * rng.uniform(0.0, 0.12)  # lateral: clear of the heart
        radius = (0.07, 0.085, 0.13)[sev]
        blob = cv.ellipse(pu, pv, radius, radius, soft=0.008)
        if sev == 2:  # a mass is lobulated
            blob = np.maximum(blob, cv.ellipse(pu + radius * 0.6, pv - radius * 0.4,
                                               radius * 0.6, radius * 0.6, soft=0.008))
        parenchyma += 0.6 * s[LESION] * blob
    img = img + parenchyma * both * (1 - ptx_space)

    # Pleural findings.
    if s[EFFUSION] > 0:
        height = (0.16, 0.28, 0.42)[details.severity.get(EFFUSION, 0)]
        for cu in _side_centers(details.side.get(EFFUSION, "right")):
            lateral = np.clip(np.abs(cv.u - cu * 0.4) / 0.55, 0, 1)
            level = 0.62 - height - 0.12 * lateral**2  # meniscus climbs the lateral wall
            fluid = _sigmoid((cv.v - level) / 0.025) * cv.ellipse(cu, 0.3, 0.4, 0.6)
            fluid *= _sigmoid((0.05 - np.abs(cv.u)) * -10 + 3)  # stay off the midline
            img = _lerp(img, FLUID, fluid * s[EFFUSION])
    if s[PTX] > 0:
        img = _lerp(img, FREE_AIR, ptx_space * s[PTX])
        side_u = _side_centers(details.side.get(PTX, "right"))[0]
        gap = (0.13, 0.18, 0.26)[details.severity.get(PTX, 0)]
        inner = lung_mask(cv, chest, side_u, shrink=gap)
        edge = inner * (1 - inner) * 4 * _apical_lateral(cv, side_u)
        img = img + 0.3 * s[PTX] * edge
    if s[PLEURAL_OTHER] > 0:
        thick = (0.05, 0.07, 0.09)[details.severity.get(PLEURAL_OTHER, 0)]
        for cu in _side_centers(details.side.get(PLEURAL_OTHER, "right")):
            lung = lung_mask(cv, chest, cu)
            rim = np.clip(lung - lung_mask(cv, chest, cu, shrink=thick), 0, 1)
            img = img + 0.5 * s[PLEURAL_OTHER] * rim * _apical_lateral(cv, cu)

    if s[DEVICES] > 0:
        img = img + _devices(cv, details, s[DEVICES], side=details.side.get(DEVICES, "right"))
    return np.clip(img, 0.0, 1.0)


def _devices(cv: Canvas, details: FindingDetails, amount: float, side: str) -> np.ndarray:
    out = np.zeros((cv.size, cv.size), dtype=np.float32)
    kinds = details.devices or ("central_line",)
    sev = details.severity.get(DEVICES, 0)
    if "ett" in kinds:
        tip = -0.3 - (0.16, 0.13, 0.1)[sev]  # tip above the carina (v = -0.3)
        out += 0.5 * cv.lines([[(0.0, -1.0), (0.0, tip)]], width=0.03)
    if "central_line" in kinds:
        su = -1.0 if side != "left" else 1.0
        path = [(0.42 * su, -1.0), (0.22 * su, -0.72), (0.09 * su, -0.5), (0.05 * su, -0.2)]
        out += 0.45 * cv.lines([path], width=0.025)
    if "pacemaker" in kinds:
        leads = [[(0.5, -0.62), (0.25, -0.55), (0.0, -0.3), (-0.02, 0.1), (0.12, 0.38)],
                 [(0.5, -0.62), (0.22, -0.5), (0.02, -0.25), (-0.06, 0.05)]]
        out += 0.45 * cv.lines(leads, width=0.024)
        out += 0.8 * cv.lines([], width=0.02, rects=[(0.42, -0.69, 0.6, -0.57)])
    if "ng_tube" in kinds:
        path = [(0.02, -1.0), (0.03, -0.3), (0.06, 0.3), (0.2, 0.55), (0.3, 0.62)]
        out += 0.4 * cv.lines([path], width=0.024)
    return amount * out


def render_lateral(labels: Sequence[int], details: FindingDetails, rng: np.random.Generator,
                   size: int) -> np.ndarray:
    """Lateral view (anterior on the image left): heart, spine, retrosternal and posterior
    sulcus; shows size of the heart, effusion, opacities, lesion and devices, (S, S)."""
    cv = Canvas(size)
    s = {i: strength(labels, i) for i in range(len(labels))}
    img = np.full((size, size), 0.06, dtype=np.float32)
    img = _lerp(img, SOFT_TISSUE, cv.ellipse(0.0, 0.05, 0.82, 1.0, soft=0.03))
    dome = 0.42 + 0.25 * cv.u**2 + rng.uniform(-0.03, 0.03)
    lungs = cv.ellipse(0.02, -0.12, 0.62, 0.75, soft=0.03) * _sigmoid((dome - cv.v) / 0.02)
    img = _lerp(img, LUNG + 0.06, lungs)
    grow = s[CARDIO] * (0.06 + 0.02 * details.severity.get(CARDIO, 0))
    heart = cv.ellipse(-0.22 - grow * 0.3, 0.24, 0.24 + grow, 0.26 + grow * 0.5, soft=0.015)
    img = _lerp(img, HEART, heart)
    if s[ECM] > 0:
        img = _lerp(img, MEDIASTINUM, s[ECM] * cv.ellipse(-0.3, -0.28, 0.16, 0.22))
    vertebrae = [(0.5, v, 0.68, v + 0.1) for v in np.arange(-0.9, 0.9, 0.15)]
    img = img + 0.22 * cv.lines([], width=0.02, rects=vertebrae)
    img = img + 0.12 * cv.lines([[(-0.66, -0.7), (-0.7, 0.4)]], width=0.05)  # sternum
    trachea = cv.lines([[(0.02, -1.0), (0.1, -0.3)]], width=0.06)
    img = img - 0.15 * trachea

    parenchyma = np.zeros_like(img)
    for obs in (OPACITY, PNEUMONIA, CONSOL, LESION, ATELECT):
        if s[obs] == 0:
            continue
        pv = -0.45 if details.zone.get(obs, "lower") == "upper" else 0.2
        pu = rng.uniform(-0.1, 0.35)
        spread = 0.14 if obs in (CONSOL, PNEUMONIA) else 0.07
        parenchyma += 0.3 * s[obs] * cv.gaussian(pu, pv, spread, spread * 0.8)
    if s[EDEMA] > 0:
        parenchyma += 0.28 * s[EDEMA] * cv.gaussian(0.05, -0.05, 0.25, 0.25)
    img = img + parenchyma * lungs
    if s[EFFUSION] > 0:
        height = (0.14, 0.25, 0.38)[details.severity.get(EFFUSION, 0)]
        level = 0.62 - height - 0.15 * np.clip(cv.u - 0.1, 0, 1)  # posterior sulcus fills
        fluid = _sigmoid((cv.v - level) / 0.025) * _sigmoid((cv.u - 0.0) / 0.05) * lungs
        img = _lerp(img, FLUID, fluid * s[EFFUSION])
    if s[PLEURAL_OTHER] > 0:
        img = img + 0.3 * s[PLEURAL_OTHER] * cv.ellipse(0.05, -0.8, 0.3, 0.07) * lungs
    if s[DEVICES] > 0:
        kinds = details.devices or ("central_line",)
        out = np.zeros_like(img)
        if "ett" in kinds:
            out += 0.5 * cv.lines([[(0.02, -1.0), (0.08, -0.42)]], width=0.03)
        if "central_line" in kinds:
            out += 0.45 * cv.lines([[(-0.1, -1.0), (-0.15, -0.6), (-0.2, -0.2)]], width=0.025)
        if "pacemaker" in kinds:
            out += 0.8 * cv.lines([], width=0.02, rects=[(-0.62, -0.7, -0.48, -0.58)])
            out += 0.45 * cv.lines([[(-0.55, -0.6), (-0.3, -0.3), (-0.25, 0.3)]], width=0.024)
        if "ng_tube" in kinds:
            out += 0.4 * cv.lines([[(0.05, -1.0), (0.2, 0.3), (0.05, 0.65)]], width=0.024)
        img = img + s[DEVICES] * out
    return np.clip(img, 0.0, 1.0)
