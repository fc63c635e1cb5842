"""CenterStream on the shared local Ray cluster, over tiny datasets written here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from fedmrg.config import ConfigError, DataConfig
from fedmrg.data.schema import NUM_OBSERVATIONS
from fedmrg.data.shards import DatasetError, Study, write_dataset
from fedmrg.data.stream import CORRUPT_IMAGE, EMPTY_REPORT, CenterStream
from fedmrg.data.transforms import normalize, tokenize_reports

pytestmark = pytest.mark.ray

SPLIT_OF = ("train", "train", "train", "val", "test", "train", "train")  # by study index % 7


def pixel_value(i: int, view: int) -> int:
    """The grey level of study i's view: identifies both, so packing can be checked."""
    return 10 + (7 * i + 90 * view) % 240


def png(value: int, size: int, mark: bool = False) -> bytes:
    img = Image.new("L", (size, size + 4), value)  # not square: the stream resizes
    if mark:  # some texture so augmentation visibly changes pixels
        ImageDraw.Draw(img).rectangle((2, 3, size // 2, size // 2 + 2), fill=255 - value)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def labels_of(i: int) -> list[int]:
    return [(i + k) % 4 for k in range(NUM_OBSERVATIONS)]


def make_study(center: str, i: int, split: str | None = None, mark: bool = False) -> Study:
    n_views = 1 + i % 3  # 1, 2 or 3 views; max_views=2 drops the third
    return Study(
        study_id=f"{center}-{i}", center=center, split=split or SPLIT_OF[i % 7],
        images=[png(pixel_value(i, v), 20 + 4 * (i % 3), mark) for v in range(n_views)],
        view="PA", report=f"heart size normal report {i}", labels=labels_of(i))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Center a: 21 studies over all splits, 5 rows per file; center b: train/val only."""
    root = tmp_path_factory.mktemp("stream") / "ds"
    studies = [make_study("a", i) for i in range(21)]
    studies += [make_study("b", i, split="train" if i % 2 else "val", mark=True)
                for i in range(8)]
    write_dataset(root, studies, {"kind": "test"}, rows_per_file=5)
    return root


def ids_in(root: Path, center: str, split: str) -> list[str]:
    return [f"{center}-{i}" for i in range(21 if center == "a" else 8)
            if (SPLIT_OF[i % 7] if center == "a" else ("train" if i % 2 else "val")) == split]


def run(stream: CenterStream, epoch: int = 0) -> list[dict]:
    return list(stream.iter_batches(epoch))


def concat(batches: list[dict], key: str):
    if isinstance(batches[0][key], list):
        return [x for b in batches for x in b[key]]
    return torch.cat([b[key] for b in batches])


# --------------------------------------------------------------------------- contract


def test_batches_follow_the_contract(ray_cluster, dataset):
    stream = CenterStream(dataset, "a", "train", image_size=16, max_views=2, in_chans=3,
                          batch_size=4)
    batches = run(stream)
    expected_ids = ids_in(dataset, "a", "train")
    assert stream.num_rows == len(expected_ids) == 15
    assert [len(b["study_id"]) for b in batches] == [4, 4, 4, 3]
    for b in batches:
        n = len(b["study_id"])
        assert set(b) == {"images", "view_mask", "labels", "report", "study_id"}
        assert b["images"].dtype == torch.float32 and b["images"].shape == (n, 2, 3, 16, 16)
        assert b["view_mask"].dtype == torch.bool and b["view_mask"].shape == (n, 2)
        assert b["labels"].dtype == torch.int64 and b["labels"].shape == (n, NUM_OBSERVATIONS)
        assert isinstance(b["report"], list) and len(b["report"]) == n
    # Only this center's train rows, each once, in file order (no shuffle).
    assert concat(batches, "study_id") == expected_ids


def test_views_are_packed_in_order_masked_and_zero_padded(ray_cluster, dataset):
    stream = CenterStream(dataset, "a", "train", image_size=8, max_views=2, in_chans=3,
                          batch_size=5)
    batches = run(stream)
    images, mask = concat(batches, "images"), concat(batches, "view_mask")
    labels, reports = concat(batches, "labels"), concat(batches, "report")
    for row, study_id in enumerate(concat(batches, "study_id")):
        i = int(study_id.split("-")[1])
        n_views = min(1 + i % 3, 2)
        assert mask[row].tolist() == [v < n_views for v in range(2)]
        for v in range(2):
            if v < n_views:
                expected = float(normalize(np.float32(pixel_value(i, v) / 255.0)))
                torch.testing.assert_close(images[row, v], torch.full((3, 8, 8), expected))
            else:
                assert torch.count_nonzero(images[row, v]) == 0
        assert labels[row].tolist() == labels_of(i)
        assert reports[row] == f"heart size normal report {i}"


@pytest.mark.parametrize("split", ["val", "test"])
def test_only_the_requested_split_appears(ray_cluster, dataset, split):
    stream = CenterStream(dataset, "a", split, image_size=8, batch_size=16)
    assert concat(run(stream), "study_id") == ids_in(dataset, "a", split)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("cache_decoded", [True, False])
def test_same_seed_and_epoch_repeat_and_epochs_differ(ray_cluster, dataset, cache_decoded):
    def make(batch_size: int = 4) -> CenterStream:
        return CenterStream(dataset, "a", "train", image_size=16, batch_size=batch_size,
                            augment=True, shuffle=True, seed=3, cache_decoded=cache_decoded)

    stream = make()
    first, again = run(stream, epoch=0), run(stream, epoch=0)
    other_instance = run(make(), epoch=0)
    next_epoch = run(stream, epoch=1)
    for batches in (again, other_instance):
        assert concat(batches, "study_id") == concat(first, "study_id")
        torch.testing.assert_close(concat(batches, "images"), concat(first, "images"),
                                   rtol=0, atol=0)
    ids0, ids1 = concat(first, "study_id"), concat(next_epoch, "study_id")
    assert sorted(ids0) == sorted(ids1) == sorted(ids_in(dataset, "a", "train"))
    assert ids0 != ids1  # reshuffled
    assert ids0 != ids_in(dataset, "a", "train")  # shuffled at all

    # A study's augmentation depends on (seed, epoch, study), not on its batch.
    def by_study(batches):
        return dict(zip(concat(batches, "study_id"), concat(batches, "images"), strict=True))

    e0, e1, bs7 = by_study(first), by_study(next_epoch), by_study(run(make(7), epoch=0))
    for study_id, image in e0.items():
        torch.testing.assert_close(bs7[study_id], image, rtol=0, atol=0)
    assert any(not torch.equal(e0[s], e1[s]) for s in e0)  # epochs augment differently


def test_cached_and_streaming_passes_are_identical(ray_cluster, dataset):
    options = dict(image_size=16, batch_size=5, augment=True, seed=1)
    cached = CenterStream(dataset, "b", "train", cache_decoded=True, **options)
    streamed = CenterStream(dataset, "b", "train", cache_decoded=False, **options)
    a, b = run(cached, 2), run(streamed, 2)
    assert concat(a, "study_id") == concat(b, "study_id") == ids_in(dataset, "b", "train")
    torch.testing.assert_close(concat(a, "images"), concat(b, "images"), rtol=0, atol=0)


# --------------------------------------------------------------------------- tokens


def test_reports_are_tokenized_in_the_stream(ray_cluster, dataset, word_tokenizer):
    stream = CenterStream(dataset, "a", "val", image_size=8, batch_size=8,
                          tokenizer=word_tokenizer, max_report_tokens=7)
    (batch,) = run(stream)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.int64 and ids.shape == (len(batch["report"]), 7)
    assert mask.dtype == torch.int64 and mask.shape == ids.shape
    expected_ids, expected_mask = tokenize_reports(word_tokenizer, batch["report"], 7)
    assert ids.tolist() == expected_ids.tolist() and mask.tolist() == expected_mask.tolist()
    assert (ids[:, 0] == word_tokenizer.bos_token_id).all()
    # "heart size normal report <i>" -> BOS + 5 tokens + EOS = 7: no padding, EOS last.
    assert (ids[:, -1] == word_tokenizer.eos_token_id).all() and mask.all()


# --------------------------------------------------------------------------- bad rows


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory) -> Path:
    """Center a, 8 train rows: a-3 has a corrupt second view, a-5 an empty report."""
    root = tmp_path_factory.mktemp("bad") / "ds"
    studies = [make_study("a", i, split="train") for i in range(8)]
    studies[3].images = [studies[3].images[0], b"\x89PNG\r\n\x1a\n garbage"]
    write_dataset(root, studies, {"kind": "test"}, rows_per_file=4)
    # write_dataset refuses empty reports, so break one on disk, like a hand-edited file.
    path = root / "center=a" / "part-00001.parquet"
    table = pq.read_table(path)
    reports = table["report"].to_pylist()
    reports[table["study_id"].to_pylist().index("a-5")] = "  "
    table = table.set_column(table.schema.get_field_index("report"),
                             table.schema.field("report"), pa.array(reports))
    pq.write_table(table, path)
    return root


def test_bad_rows_raise_naming_center_file_and_study(ray_cluster, bad_dataset):
    stream = CenterStream(bad_dataset, "a", "train", image_size=8, on_error="raise")
    with pytest.raises(DatasetError) as info:
        run(stream)
    message = str(info.value)
    assert type(info.value) is DatasetError  # not Ray's wrapper with a worker traceback
    assert "Traceback" not in message
    assert "center 'a'" in message and "study 'a-3'" in message
    assert str(bad_dataset / "center=a" / "part-00000.parquet") in message
    assert "view 1" in message and "on_error='skip'" in message


def test_empty_report_raises_in_streaming_mode_too(ray_cluster, bad_dataset):
    stream = CenterStream(bad_dataset, "a", "train", image_size=8, cache_decoded=False,
                          shuffle=True)
    with pytest.raises(DatasetError, match="center 'a'.*part-0000[01].parquet.*study 'a-[35]'"):
        run(stream)


@pytest.mark.parametrize("cache_decoded", [True, False])
def test_bad_rows_are_skipped_and_counted(ray_cluster, bad_dataset, cache_decoded):
    stream = CenterStream(bad_dataset, "a", "train", image_size=8, batch_size=3,
                          on_error="skip", cache_decoded=cache_decoded)
    batches = run(stream)
    ids = concat(batches, "study_id")
    assert ids == [f"a-{i}" for i in (0, 1, 2, 4, 6, 7)]
    assert all(len(b["study_id"]) == b["images"].shape[0] == b["labels"].shape[0]
               for b in batches)
    skipped = stream.skipped
    assert dict(skipped.counts) == {CORRUPT_IMAGE: 1, EMPTY_REPORT: 1}
    examples = " | ".join(skipped.examples)
    assert "study 'a-3'" in examples and "study 'a-5'" in examples
    assert "part-00000.parquet" in examples and "part-00001.parquet" in examples
    # Counted once per pass, not accumulated across passes.
    run(stream, epoch=1)
    assert stream.skipped.total == 2


def test_a_split_with_only_bad_rows_is_an_error_even_when_skipping(ray_cluster, tmp_path):
    root = tmp_path / "ds"
    studies = [make_study("a", i, split="val") for i in range(2)]
    for study in studies:
        study.images = [b"broken"]
    write_dataset(root, studies, {"kind": "t"})
    stream = CenterStream(root, "a", "val", image_size=8, on_error="skip")
    with pytest.raises(DatasetError, match=r"center 'a' split 'val': all 2 rows are bad"):
        run(stream)


def test_empty_split_and_unknown_center_are_clear_errors(ray_cluster, dataset):
    with pytest.raises(DatasetError, match="center 'b' has no 'test' rows"):
        CenterStream(dataset, "b", "test")
    with pytest.raises(DatasetError, match="unknown center 'z'"):
        CenterStream(dataset, "z", "train")


def test_unreadable_parquet_file_is_named(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, [make_study("a", i, split="train") for i in range(3)], {"kind": "t"})
    path = root / "center=a" / "part-00000.parquet"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(DatasetError, match=f"{path}: cannot read parquet"):
        CenterStream(root, "a", "train")


@pytest.mark.parametrize("kwargs, key", [
    ({"split": "training"}, "split"), ({"on_error": "ignore"}, "on_error"),
    ({"in_chans": 2}, "in_chans"), ({"batch_size": 0}, "batch_size"),
    ({"num_cpus_per_task": -1}, "num_cpus_per_task"),
])
def test_bad_arguments_name_the_argument(dataset, kwargs, key):
    args = {"root": dataset, "center": "a", "split": "train"} | kwargs
    with pytest.raises(ConfigError, match=key):
        CenterStream(**args)


# --------------------------------------------------------------------------- config, actors


def test_from_config_augments_and_shuffles_train_only(ray_cluster, dataset):
    cfg = DataConfig(root=str(dataset), image_size=16, max_views=3, batch_size=4,
                     max_report_tokens=16)
    train = CenterStream.from_config(cfg, "a", "train", in_chans=1, seed=2)
    val = CenterStream.from_config(cfg, "a", "val", in_chans=1, seed=2)
    assert train.augmentation is not None and train.shuffle
    assert val.augmentation is None and not val.shuffle
    batch = next(iter(train.iter_batches()))
    assert batch["images"].shape == (4, 3, 1, 16, 16)


def test_client_actors_holding_cpus_each_run_their_own_stream(ray_cluster, dataset):
    """Fractional-CPU client actors stream concurrently while most CPUs are held.

    2 clients x 0.5 CPU + a 2.5-CPU hog leave 0.5 of the 4 logical CPUs: the streams'
    0.25-CPU tasks still run, where any 1-CPU task (Ray's default, read_parquet's
    sampling/listing) would wait forever.
    """
    import ray

    @ray.remote(num_cpus=2.5)
    class Hog:
        def ready(self) -> bool:
            return True

    @ray.remote(num_cpus=0.5)
    class Client:
        def __init__(self, root: str, center: str):
            self.stream = CenterStream(root, center, "train", image_size=8, batch_size=4,
                                       augment=True, shuffle=True, seed=0)

        def epoch(self, epoch: int) -> list[str]:
            return [s for b in self.stream.iter_batches(epoch) for s in b["study_id"]]

    hog = Hog.remote()
    clients = []
    try:
        assert ray.get(hog.ready.remote(), timeout=60)
        clients = [Client.remote(str(dataset), c) for c in ("a", "b")]
        got = ray.get([c.epoch.remote(1) for c in clients], timeout=90)
    finally:
        for actor in [hog, *clients]:
            ray.kill(actor)
    local = CenterStream(dataset, "a", "train", image_size=8, batch_size=4, augment=True,
                         shuffle=True, seed=0)
    assert got[0] == concat(run(local, 1), "study_id")  # same order in an actor as here
    assert sorted(got[1]) == sorted(ids_in(dataset, "b", "train"))


# --------------------------------------------------------------------------- pooled


@pytest.mark.parametrize("cache_decoded", [True, False])
def test_pooled_stream_reads_every_center_and_mixes_them(ray_cluster, dataset, cache_decoded):
    expected = ids_in(dataset, "a", "train") + ids_in(dataset, "b", "train")
    plain = CenterStream(dataset, ["a", "b"], "train", image_size=8, batch_size=4,
                         cache_decoded=cache_decoded)
    assert plain.manifest_rows == len(expected) == 19
    batches = run(plain)
    assert concat(batches, "study_id") == expected  # no shuffle: file order, a then b
    for b in batches:
        assert set(b) == {"images", "view_mask", "labels", "report", "study_id", "center"}
        assert b["center"] == [s.split("-")[0] for s in b["study_id"]]
    shuffled = CenterStream(dataset, ["a", "b"], "train", image_size=8, batch_size=4,
                            shuffle=True, seed=3, cache_decoded=cache_decoded)
    batches = run(shuffled)
    assert sorted(concat(batches, "study_id")) == sorted(expected)
    assert any(len(set(b["center"])) == 2 for b in batches)  # centers mixed within batches
    assert concat(run(shuffled), "study_id") == concat(batches, "study_id")  # seeded
    with pytest.raises(DatasetError, match="center 'b' has no 'test' rows"):
        CenterStream(dataset, ["a", "b"], "test")
    with pytest.raises(ConfigError, match="at least one center"):
        CenterStream(dataset, [], "train")
