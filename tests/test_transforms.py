"""Image and report transforms: pure functions, no Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fedmrg.data.shards import DatasetError
from fedmrg.data.transforms import (
    Augmentation,
    ImageDecodeError,
    decode_image,
    decode_study,
    finish_study,
    normalize,
    replicate_channels,
    resize_image,
    study_rng,
    tokenize_reports,
    transform_study,
    view_mask,
)


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def phantom(width: int = 48, height: int = 40) -> np.ndarray:
    """A dark field with a bright off-centre disc: uint8 (H, W)."""
    img = Image.new("L", (width, height), 20)
    ImageDraw.Draw(img).ellipse((6, 5, 26, 30), fill=220)
    return np.asarray(img)


def uniform(value: int, size: int = 32) -> bytes:
    return encode(np.full((size, size), value, dtype=np.uint8))


# --------------------------------------------------------------------------- decode


def test_decode_png_8bit_is_grey_float_in_unit_range():
    pixels = phantom()
    out = decode_image(encode(pixels), "s1")
    assert out.dtype == np.float32 and out.shape == pixels.shape
    np.testing.assert_allclose(out, pixels / 255.0, atol=1e-6)


def test_decode_16bit_png_keeps_full_range():
    ramp = np.linspace(0, 65535, 30 * 20).reshape(20, 30).astype(np.uint16)
    out = decode_image(encode(ramp), "s16")
    np.testing.assert_allclose(out, ramp / 65535.0, atol=1e-6)


def test_decode_rgb_jpeg_to_grey():
    rgb = np.repeat(phantom()[..., None], 3, axis=2)
    out = decode_image(encode(rgb, "JPEG"), "sj")
    assert out.shape == rgb.shape[:2]
    # JPEG is lossy: close to the grey source, not equal.
    assert np.abs(out - phantom() / 255.0).mean() < 0.02


@pytest.mark.parametrize("data, expected", [
    (b"", "empty image bytes"),
    (b"not an image at all", "not a recognizable image"),
    (encode(phantom())[:60], "cannot decode image"),  # truncated PNG
])
def test_corrupt_image_names_study_and_view(data, expected):
    with pytest.raises(ImageDecodeError, match=expected) as info:
        decode_image(data, "study-42", view=1)
    assert "'study-42' view 1" in str(info.value)
    assert isinstance(info.value, DatasetError)


def test_resize_to_square_and_keeps_constant_images_constant():
    out = resize_image(np.full((40, 56), 0.3, dtype=np.float32), 16)
    assert out.shape == (16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3, atol=1e-6)
    same = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    np.testing.assert_array_equal(resize_image(same, 16), same)


def test_decode_study_pads_missing_and_drops_extra_views():
    pixels, n = decode_study([uniform(10), uniform(200), uniform(90)], "s", 8, max_views=2)
    assert n == 2 and pixels.shape == (2, 8, 8)
    np.testing.assert_allclose(pixels[0], 10 / 255, atol=1e-6)
    np.testing.assert_allclose(pixels[1], 200 / 255, atol=1e-6)

    pixels, n = decode_study([uniform(10)], "s", 8, max_views=3)
    assert n == 1
    assert np.all(pixels[1:] == 0)


def test_decode_study_without_images_is_an_error():
    with pytest.raises(ImageDecodeError, match="'s0': no images"):
        decode_study([], "s0", 8, 2)


# --------------------------------------------------------------------------- augmentation


def test_study_rng_is_stable_across_processes_and_keyed_by_seed_epoch_study():
    draw = study_rng(0, 0, "a-1").random()
    # Pinned: Python's salted hash() would change this number from run to run.
    assert draw == pytest.approx(study_rng(0, 0, "a-1").random())
    assert draw == pytest.approx(0.890477306095406, abs=1e-12)
    others = [study_rng(1, 0, "a-1"), study_rng(0, 1, "a-1"), study_rng(0, 0, "a-2")]
    assert all(r.random() != draw for r in others)


def test_augmentation_is_a_function_of_the_generator():
    img = decode_image(encode(phantom(32, 32)), "s")
    aug = Augmentation()
    a = aug(img, study_rng(0, 0, "s"))
    b = aug(img, study_rng(0, 0, "s"))
    c = aug(img, study_rng(0, 1, "s"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == img.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    # Small perturbation: the anatomy stays where it was.
    assert not np.array_equal(a, img)
    assert np.corrcoef(a.ravel(), img.ravel())[0, 1] > 0.8


def test_augmentation_with_zero_ranges_is_the_identity():
    img = decode_image(encode(phantom(32, 32)), "s")
    none = Augmentation(min_scale=1.0, max_shift=0.0, max_rotation_deg=0.0, brightness=0.0,
                        contrast=0.0)
    np.testing.assert_allclose(none(img, np.random.default_rng(3)), img, atol=1e-6)


def test_brightness_only_shifts_the_mean_by_the_drawn_amount():
    img = np.full((16, 16), 0.5, dtype=np.float32)
    bright = Augmentation(min_scale=1.0, max_shift=0.0, max_rotation_deg=0.0, brightness=0.2,
                          contrast=0.0)
    rng = np.random.default_rng(7)
    out = bright(img, np.random.default_rng(7))
    rng.uniform(1.0, 1.0)  # scale
    rng.uniform(0, 0, size=2)  # shift
    rng.uniform(0, 0)  # rotation
    expected = 0.5 + rng.uniform(-0.2, 0.2)
    np.testing.assert_allclose(out, expected, atol=1e-5)


# --------------------------------------------------------------------------- finish


def test_normalize_maps_unit_range_to_minus_one_one():
    np.testing.assert_allclose(normalize(np.array([0.0, 0.5, 1.0], dtype=np.float32)),
                               [-1.0, 0.0, 1.0])


def test_replicate_channels_copies_grey():
    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    out = replicate_channels(x, 3)
    assert out.shape == (2, 3, 4, 4)
    for c in range(3):
        np.testing.assert_array_equal(out[:, c], x)
    assert replicate_channels(x, 1).shape == (2, 1, 4, 4)


def test_finish_study_masks_and_zero_pads_views():
    pixels = np.zeros((3, 8, 8), dtype=np.float32)
    pixels[0], pixels[1] = 0.25, 0.75
    images, mask = finish_study(pixels, 2, in_chans=3)
    assert images.shape == (3, 3, 8, 8) and images.dtype == np.float32
    np.testing.assert_array_equal(mask, [True, True, False])
    np.testing.assert_allclose(images[0], -0.5)
    np.testing.assert_allclose(images[1], 0.5)
    assert np.all(images[2] == 0)
    np.testing.assert_array_equal(view_mask(1, 3), [True, False, False])


def test_finish_study_augments_real_views_only():
    pixels = np.zeros((2, 16, 16), dtype=np.float32)
    pixels[0] = decode_image(encode(phantom(16, 16)), "s")
    images, mask = finish_study(pixels, 1, 1, Augmentation(), study_rng(0, 0, "s"))
    assert not np.allclose(images[0, 0], normalize(pixels[0]))
    assert np.all(images[1] == 0) and mask.tolist() == [True, False]
    with pytest.raises(ValueError, match="needs a Generator"):
        finish_study(pixels, 1, 1, Augmentation(), None)


def test_transform_study_is_decode_then_finish():
    views = [encode(phantom()), uniform(128)]
    images, mask = transform_study(views, "s9", 24, 2, 3, Augmentation(), seed=5, epoch=2)
    pixels, n = decode_study(views, "s9", 24, 2)
    expected, _ = finish_study(pixels, n, 3, Augmentation(), study_rng(5, 2, "s9"))
    np.testing.assert_array_equal(images, expected)
    assert mask.tolist() == [True, True]


# --------------------------------------------------------------------------- report tokens


def test_tokenize_adds_bos_eos_pads_and_masks(word_tokenizer):
    ids, mask = tokenize_reports(word_tokenizer, ["heart size normal", "no effusion"], 6)
    tok = word_tokenizer
    words = [tok.convert_tokens_to_ids(w) for w in ("heart", "size", "normal")]
    assert ids.dtype == np.int64 and ids.shape == (2, 6) and mask.shape == (2, 6)
    assert ids[0].tolist() == [tok.bos_token_id, *words, tok.eos_token_id, tok.pad_token_id]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0]
    assert ids[1, 4:].tolist() == [tok.pad_token_id] * 2


def test_tokenize_truncation_cuts_the_eos(word_tokenizer):
    ids, mask = tokenize_reports(word_tokenizer, ["heart size normal no effusion"], 4)
    assert ids[0, 0] == word_tokenizer.bos_token_id
    assert word_tokenizer.eos_token_id not in ids[0].tolist()
    assert mask[0].tolist() == [1, 1, 1, 1]


def test_tokenizer_without_pad_pads_with_eos_and_without_either_fails(word_tokenizer):
    import copy

    no_pad = copy.deepcopy(word_tokenizer)
    no_pad.pad_token = None
    ids, mask = tokenize_reports(no_pad, ["no effusion"], 6)
    assert ids[0, -1] == no_pad.eos_token_id and mask[0, -1] == 0
    no_pad.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        tokenize_reports(no_pad, ["no effusion"], 6)
