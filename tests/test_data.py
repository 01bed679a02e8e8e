"""Input pipelines: digits, TFDS flowers (mock data), image folders, exact iterator resume."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from jaxdiff import data as data_lib
from jaxdiff import train as train_lib


def test_digits_source_matches_the_spec():
    src = data_lib.DigitsSource(16)
    assert len(src) == 1797
    ex = src[0]
    assert ex["image"].shape == (16, 16, 1) and ex["image"].dtype == np.float32
    assert src.images.min() >= -1.0 and src.images.max() <= 1.0
    # Background is 0 -> -1; ink is bright (sklearn value 16 -> 1).
    assert np.isclose(src.images[:, 0, 0, 0], -1.0).mean() > 0.95
    assert src.images.max() > 0.9
    assert sorted(set(src.labels.tolist())) == list(range(10))
    from sklearn.datasets import load_digits

    # Upsampling keeps the picture: average-pooling 16x16 back to 8x8 stays close to the original.
    small = (src.images[:, :, :, 0] + 1) / 2
    pooled = small.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    assert np.abs(pooled - load_digits().images / 16.0).mean() < 0.08


def test_pipeline_is_deterministic_and_resumes_exactly():
    src = data_lib.DigitsSource(16)
    ds = data_lib.make_dataset(src, batch_size=32, seed=3, random_flip=True, num_threads=1)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    after = [next(it) for _ in range(3)]

    again = iter(ds)
    np.testing.assert_array_equal(next(again)["image"], first[0]["image"])  # same seed, same order
    resumed = iter(ds)
    resumed.set_state(state)
    for a, b in zip(after, [next(resumed) for _ in range(3)]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = next(iter(data_lib.make_dataset(src, batch_size=32, seed=4, num_threads=1)))
    assert not np.array_equal(other["label"], first[0]["label"])


def test_epochs_cover_the_data_set_once_each():
    src = data_lib.DigitsSource(8)
    ds = data_lib.make_dataset(src, batch_size=599, seed=0, num_threads=1)  # 3 batches = 1 epoch
    it = iter(ds)
    labels = np.concatenate([next(it)["label"] for _ in range(3)])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(src.labels[:1797], minlength=10))


def test_process_sharding_splits_the_batch():
    src = data_lib.DigitsSource(8)
    a = next(iter(data_lib.make_dataset(src, batch_size=8, seed=0, process_index=0, process_count=2)))
    b = next(iter(data_lib.make_dataset(src, batch_size=8, seed=0, process_index=1, process_count=2)))
    assert a["image"].shape == (4, 8, 8, 1) and b["image"].shape == (4, 8, 8, 1)
    with pytest.raises(ValueError, match="not divisible"):
        data_lib.make_dataset(src, batch_size=7, seed=0, process_index=0, process_count=2)


def test_flowers_through_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = load_config("flowers", "smoke")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        src = data_lib.build_source(config.data)
        assert len(src) == 12
        ex = src[0]
        assert ex["image"].shape == (16, 16, 3)
        assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
        batch = next(iter(data_lib.make_dataset(src, batch_size=8, seed=0, random_flip=True, num_threads=1)))
        assert batch["image"].shape == (8, 16, 16, 3)
        state = train_lib.train_and_evaluate(config, tmp_path)
    assert int(state.step) == config.train.num_steps
    assert (tmp_path / "samples" / f"step_{config.train.num_steps}.png").exists()


def test_flowers_not_prepared_says_how_to_prepare(tmp_path):
    config = load_config("flowers")
    config.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="tfds build oxford_flowers102") as info:
        data_lib.build_source(config.data)
    assert "--config.data.data_dir" in str(info.value)


def test_resize_and_center_crop_is_the_books_recipe():
    img = Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint8).reshape(100, 60, 3) % 251)
    out = data_lib.resize_and_center_crop(img, 30)
    assert out.size == (30, 30)
    full = img.resize((30, 50), Image.Resampling.BILINEAR)  # shorter side 60 -> 30
    np.testing.assert_array_equal(np.asarray(out), np.asarray(full)[10:40])


def _write_images(folder, n, size=(20, 12)):
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        where = folder / "sub" if i % 2 else folder
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(where / f"im{i}.png")


def test_image_folder_recursive_and_corrupt_files(tmp_path):
    _write_images(tmp_path, 6)
    config = load_config("image_folder", "smoke")
    config.data.path = str(tmp_path)
    src = data_lib.build_source(config.data)
    assert len(src) == 6
    assert src[0]["image"].shape == (16, 16, 3)

    (tmp_path / "sub" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        data_lib.build_source(config.data)
    config.data.skip_corrupt = True
    src = data_lib.build_source(config.data)
    assert len(src) == 6 and src.num_skipped == 1

    config.data.channels = 1
    assert data_lib.build_source(config.data)[0]["image"].shape == (16, 16, 1)
    config.data.path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="data.path"):
        data_lib.build_source(config.data)


def test_image_folder_trains(tmp_path):
    _write_images(tmp_path / "imgs", 8)
    config = load_config("image_folder", "smoke")
    config.data.path = str(tmp_path / "imgs")
    config.train.batch_size = 8
    state = train_lib.train_and_evaluate(config, tmp_path / "run")
    assert int(state.step) == config.train.num_steps
