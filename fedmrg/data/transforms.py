"""Image transforms: encoded bytes -> normalized, augmented, view-packed arrays.

Pure numpy/PIL, no Ray, so the Ray Data stream and a plain PyTorch DataLoader apply exactly the
same code. The pipeline for one study splits in two halves:

    decode_study(encoded views)      bytes -> (V, S, S) float32 in [0, 1], resized, padded
        -> cacheable: identical every epoch
    finish_study(pixels, n_views)    (augment) -> normalize -> (V, C, S, S) float32 + view mask
        -> per epoch: randomness comes only from the Generator it is handed

Augmentation randomness is drawn from `study_rng(seed, epoch, study_id)`, so a study gets the
same augmentation whatever batch, block or worker it lands in.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedmrg.data.shards import DatasetError

# Normalization: (x - 0.5) / 0.5 maps [0, 1] pixels to [-1, 1] (the batch contract).
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5

# A decoded image larger than this is refused rather than exhausting memory (a 16k x 16k
# radiograph is far beyond any real CXR; PIL's own bomb check only warns below 2x its limit).
MAX_IMAGE_PIXELS = 16384 * 16384


class ImageDecodeError(DatasetError):
    """An image could not be decoded; the message names the study and view."""


# --------------------------------------------------------------------------- decode + resize


def decode_image(data: bytes, study_id: str, view: int = 0) -> np.ndarray:
    """Encoded PNG/JPEG (any bit depth, grey or colour) -> (H, W) float32 grayscale in [0, 1]."""
    where = f"study {study_id!r} view {view}"
    if not data:
        raise ImageDecodeError(f"{where}: empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(f"{where}: image is {img.width}x{img.height}, "
                                       f"larger than {MAX_IMAGE_PIXELS} pixels")
            img.load()  # PIL decodes lazily: force it here so truncation is caught here
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"{where}: not a recognizable image (first bytes "
                               f"{data[:8]!r})") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ImageDecodeError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit radiographs (DICOM exports): keep their full dynamic range.
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
    else:
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if arr.ndim != 2 or arr.size == 0:
        raise ImageDecodeError(f"{where}: decoded to shape {arr.shape}, expected a 2-D image")
    if not np.isfinite(arr).all():
        raise ImageDecodeError(f"{where}: image has non-finite pixels")
    return np.clip(arr, 0.0, 1.0)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float32 -> (size, size), bilinear with antialiasing when shrinking.

    Radiographs are close to square; like R2Gen's eval transform we resize to a square rather
    than crop, so nothing at the image border (tubes, costophrenic angles) is cut off.
    """
    if img.shape == (size, size):
        return img.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def decode_study(images: list[bytes], study_id: str, image_size: int, max_views: int
                 ) -> tuple[np.ndarray, int]:
    """A study's encoded views -> ((max_views, S, S) float32 in [0, 1], number of real views).

    Views beyond `max_views` are dropped (not decoded); missing ones are zero.
    """
    if not images:
        raise ImageDecodeError(f"study {study_id!r}: no images")
    n_views = min(len(images), max_views)
    pixels = np.zeros((max_views, image_size, image_size), dtype=np.float32)
    for v in range(n_views):
        pixels[v] = resize_image(decode_image(images[v], study_id, v), image_size)
    return pixels, n_views


# --------------------------------------------------------------------------- augmentation


def study_rng(seed: int, epoch: int, study_id: str) -> np.random.Generator:
    """The augmentation Generator of one study in one epoch: independent of batching/scheduling.

    Python's hash() is salted per process, so the study id is hashed with blake2b instead.
    """
    digest = hashlib.blake2b(study_id.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, epoch, int.from_bytes(digest, "little")])


@dataclass(frozen=True)
class Augmentation:
    """Small train-time perturbations that keep a radiograph anatomically plausible.

    No horizontal flip: it would move the heart to the right and contradict the report.
    """

    min_scale: float = 0.9       # random resized crop: the crop covers [min_scale, 1] of the side
    max_shift: float = 0.04      # translation, fraction of the side
    max_rotation_deg: float = 5.0
    brightness: float = 0.1      # additive, in [0, 1] pixel units
    contrast: float = 0.1        # multiplicative around the image mean: 1 +- contrast

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(H, W) float32 in [0, 1] -> same shape, augmented, in [0, 1]."""
        h, w = img.shape
        # Draw every parameter first, in a fixed order, so the result depends on rng alone.
        scale = rng.uniform(self.min_scale, 1.0)
        shift_x, shift_y = rng.uniform(-self.max_shift, self.max_shift, size=2) * (w, h)
        theta = math.radians(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg))
        brightness = rng.uniform(-self.brightness, self.brightness)
        contrast = rng.uniform(1.0 - self.contrast, 1.0 + self.contrast)

        # PIL's AFFINE maps each output pixel (x, y) to the input pixel (a x + b y + c,
        # d x + e y + f): rotate and zoom (crop of side `scale`) about the centre, then shift.
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        cos, sin = math.cos(theta) * scale, math.sin(theta) * scale
        a, b, d, e = cos, -sin, sin, cos
        c = cx + shift_x - a * cx - b * cy
        f = cy + shift_y - d * cx - e * cy
        # Out-of-image pixels take the border's mean, which is the background for both
        # polarities (black-on-white and white-on-black centres).
        fill = float(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).mean())
        pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
        out = pil.transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f),
                            resample=Image.Resampling.BILINEAR, fillcolor=fill)
        out = np.asarray(out, dtype=np.float32)
        mean = out.mean()
        out = (out - mean) * contrast + mean + brightness
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- finish


def normalize(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] pixels -> roughly [-1, 1] (mean 0.5, std 0.5)."""
    return ((pixels - PIXEL_MEAN) / PIXEL_STD).astype(np.float32, copy=False)


def replicate_channels(pixels: np.ndarray, in_chans: int) -> np.ndarray:
    """(..., H, W) grayscale -> (..., C, H, W), copied C times (RGB encoders take grey as 3)."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    return np.repeat(pixels[..., None, :, :], in_chans, axis=-3)


def view_mask(n_views: int, max_views: int) -> np.ndarray:
    """(max_views,) bool, True for the first `n_views` (real) views."""
    return np.arange(max_views) < n_views


def finish_study(pixels: np.ndarray, n_views: int, in_chans: int,
                 augmentation: Augmentation | None = None, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(V, S, S) decoded pixels -> ((V, C, S, S) float32 normalized, (V,) bool view mask).

    Augments each real view when `augmentation` is given (then `rng` is required); padded
    views stay exactly zero after normalization.
    """
    if augmentation is not None and rng is None:
        raise ValueError("finish_study: augmentation needs a Generator (see study_rng)")
    max_views = pixels.shape[0]
    mask = view_mask(n_views, max_views)
    out = np.zeros(pixels.shape, dtype=np.float32)  # (V, S, S)
    for v in range(n_views):
        view = pixels[v].astype(np.float32, copy=False)
        if augmentation is not None:
            view = augmentation(view, rng)
        out[v] = normalize(view)
    return replicate_channels(out, in_chans), mask  # (V, C, S, S), (V,)


def transform_study(images: list[bytes], study_id: str, image_size: int, max_views: int,
                    in_chans: int, augmentation: Augmentation | None = None, seed: int = 0,
                    epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Everything for one study at once (what a plain DataLoader calls per item)."""
    pixels, n_views = decode_study(images, study_id, image_size, max_views)
    rng = study_rng(seed, epoch, study_id) if augmentation is not None else None
    return finish_study(pixels, n_views, in_chans, augmentation, rng)


# --------------------------------------------------------------------------- report tokens


def report_lengths(tokenizer, reports: list[str]) -> list[int]:
    """The tokens each report takes in `tokenize_reports` before it is cut to `max_tokens`
    (BOS and EOS included when the tokenizer has them): longer reports are truncated."""
    specials = (tokenizer.bos_token_id is not None) + (tokenizer.eos_token_id is not None)
    encoded = tokenizer(list(reports), add_special_tokens=False)["input_ids"]
    return [len(ids) + specials for ids in encoded]


def tokenize_reports(tokenizer, reports: list[str], max_tokens: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Reports -> (input_ids (B, T) int64, attention_mask (B, T) int64), T = max_tokens.

    Each row is [BOS] + report tokens + [EOS] (each special token only if the tokenizer has
    one), truncated to `max_tokens` and right-padded with the pad token (EOS when there is no
    pad token, as for Llama). Like R2Gen, truncation cuts the EOS too: a cut report has not
    ended, so the model must not learn to stop there. No prompt: the model prepends its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS "
                         f"token; set tokenizer.pad_token before building the stream")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    # Special tokens are added here, not by the tokenizer, so every tokenizer behaves alike
    # (Llama's adds BOS only, GPT-2's nothing).
    encoded = tokenizer(list(reports), add_special_tokens=False)["input_ids"]
    input_ids = np.full((len(encoded), max_tokens), pad_id, dtype=np.int64)  # (B, T)
    attention_mask = np.zeros((len(encoded), max_tokens), dtype=np.int64)  # (B, T)
    for i, ids in enumerate(encoded):
        row = (bos + list(ids) + eos)[:max_tokens]
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask
