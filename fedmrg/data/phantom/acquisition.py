"""Per-center image acquisition: how a center's equipment and habits turn anatomy into pixels.

An `Acquisition` is one center's imaging chain: output resolution (around the benchmark's
image size), field of view, positioning jitter, blur (detector/processing), intensity window,
gamma and contrast (processing curve), noise (dose), polarity (some PACS export inverted), and
burned-in annotations (side letters, a corner text block). `apply` is seeded per study, so two
studies of a center share the chain but not the jitter.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

MARKERS = ("side_letter", "text_block")


@dataclass(frozen=True)
class Acquisition:
    """One center's imaging chain (all effects deterministic given the study's rng)."""

    scale: float = 1.0  # output side = round(image_size * scale)
    zoom: float = 1.0  # field of view: > 1 magnifies (tighter collimation), < 1 shows more
    rotation_deg: float = 2.0  # positioning jitter, uniform in +-rotation_deg
    shift: float = 0.02  # positioning jitter, fraction of the side
    window: tuple[float, float] = (0.0, 1.0)  # attenuation mapped to black..white
    gamma: float = 1.0
    contrast: float = 1.0  # around mid-gray
    blur_sigma: float = 0.0  # gaussian sigma in pixels of a 64-px image (scales with the side)
    noise_std: float = 0.01  # gaussian, on the [0, 1] scale
    invert: bool = False  # exported with inverted polarity (air white)
    markers: tuple[str, ...] = ()  # subset of MARKERS
    marker_text: str = ""  # what the corner text block says

    def __post_init__(self) -> None:
        checks = {"scale": 0.25 <= self.scale <= 4, "zoom": 0.5 <= self.zoom <= 2,
                  "gamma": 0.2 <= self.gamma <= 5, "contrast": 0.2 <= self.contrast <= 5,
                  "blur_sigma": self.blur_sigma >= 0, "noise_std": 0 <= self.noise_std <= 0.5,
                  "rotation_deg": 0 <= self.rotation_deg <= 30, "shift": 0 <= self.shift <= 0.3,
                  "window": 0 <= self.window[0] < self.window[1] <= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"Acquisition: {bad[0]} = {getattr(self, bad[0])!r} is out of "
                             f"range")
        unknown = [m for m in self.markers if m not in MARKERS]
        if unknown:
            raise ValueError(f"Acquisition: unknown marker {unknown[0]!r}; known: {MARKERS}")

    def output_size(self, image_size: int) -> int:
        return max(16, round(image_size * self.scale))

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["window"] = list(self.window)
        d["markers"] = list(self.markers)
        return d

    def apply(self, attenuation: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(S, S) attenuation in [0, 1] -> (S, S) uint8 pixels as this center stores them."""
        size = attenuation.shape[0]
        angle = np.deg2rad(rng.uniform(-self.rotation_deg, self.rotation_deg))
        offset = rng.uniform(-self.shift, self.shift, size=2) * size
        img = _affine(attenuation, self.zoom, angle, offset)
        if self.blur_sigma > 0:
            img = ndimage.gaussian_filter(img, self.blur_sigma * size / 64, mode="nearest")
        lo, hi = self.window
        img = np.clip((img - lo) / (hi - lo), 0.0, 1.0) ** self.gamma
        img = np.clip(0.5 + (img - 0.5) * self.contrast, 0.0, 1.0)
        img = img + rng.normal(0.0, self.noise_std, size=img.shape)
        if self.invert:
            img = 1.0 - img
        pixels = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
        return self._burn_in(pixels)

    def _burn_in(self, pixels: np.ndarray) -> np.ndarray:
        if not self.markers:
            return pixels
        size = pixels.shape[0]
        im = Image.fromarray(pixels)
        draw = ImageDraw.Draw(im)
        font = ImageFont.load_default(size=max(6, size // 7))
        ink = 0 if self.invert else 255  # burned in before the export inverted the image
        if "side_letter" in self.markers:  # the patient's right is on the image's left
            draw.text((size * 0.06, size * 0.04), "R", fill=ink, font=font)
        if "text_block" in self.markers:
            small = ImageFont.load_default(size=max(5, size // 11))
            draw.text((size * 0.55, size * 0.88), self.marker_text or "CXR", fill=ink,
                      font=small)
        return np.asarray(im)


def _affine(img: np.ndarray, zoom: float, angle: float, offset: np.ndarray) -> np.ndarray:
    """Rotate by `angle`, magnify by `zoom` about the center, then shift by `offset` pixels."""
    size = img.shape[0]
    c, s = np.cos(angle), np.sin(angle)
    # affine_transform maps output coords to input coords: in = M @ out + b
    matrix = np.array([[c, -s], [s, c]]) / zoom
    center = np.array([size / 2 - 0.5, size / 2 - 0.5])
    b = center - matrix @ (center + offset)
    return ndimage.affine_transform(img, matrix, offset=b, order=1, mode="constant",
                                    cval=float(img[0, 0]))


def encode_png(pixels: np.ndarray) -> bytes:
    """Grayscale PNG bytes; deterministic (no timestamps or text chunks, fixed zlib level)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))
