"""Input pipelines: random-access sources fed through one `grain` pipeline.

Every data set is a random-access *source* (``len`` and ``__getitem__`` returning
``{"image": float32 [H, W, C] in [-1, 1], "label": int32}``) and one shared pipeline turns a
source into an infinite stream of batches::

    source -> seed -> shuffle -> repeat -> random flip -> batch -> this process's rows

With several processes, global batch ``k`` is the same examples as in a one-process run:
process ``i`` of ``n`` reads (only) rows ``[i B/n, (i+1) B/n)`` of it, so a run gives the same
batches, and its checkpointed data position means the same, on any number of processes.

The pipeline is deterministic given ``train.seed``: each epoch is reshuffled from the seed and
the epoch number, and the per-element random flip is seeded by element index. Its iterator
state is small JSON that is checkpointed with the model, so a resumed run sees exactly the
batches an uninterrupted run would.

Sources:

* ``digits``: scikit-learn's built-in ``load_digits`` (1,797 images of 8x8, values 0..16),
  upsampled bilinearly to ``data.image_size``. Embedded: no download.
* ``oxford_flowers102``: through ``tfds.data_source`` (array_record, random access, no
  TensorFlow at run time), resized on the shorter side, centre-cropped (the book's recipe).
* ``image_folder``: any folder of PNG/JPEG images, searched recursively.

Example::

    config = configs.digits.get_config()
    source = build_source(config.data)
    it = iter(make_dataset(source, batch_size=64, seed=0, random_flip=False))
    batch = next(it)           # {"image": [64, 16, 16, 1], "label": [64]}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DATASETS = ("digits", "oxford_flowers102", "image_folder")


# ---------------------------------------------------------------------------------------------
# Image helpers (numpy, host side).
# ---------------------------------------------------------------------------------------------


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resizes the shorter side to ``size`` (bilinear) and crops the centre ``size x size``.

    This is torchvision's ``Resize(size) -> CenterCrop(size)`` on PIL images, the book's recipe.
    """
    w, h = image.size
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_model_range(image_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the book's ``ToTensor`` then ``x * 2 - 1``)."""
    return (image_uint8.astype(np.float32) / 255.0) * 2.0 - 1.0


def _pil_to_array(image: Image.Image, channels: int) -> np.ndarray:
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"data.channels={channels} is not supported; use 1 (grey) or 3 (RGB).")
    arr = np.asarray(image.convert(mode), dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------


DIGITS_SPLITS = ("train", "test", "train+test")
DIGITS_TEST_PER_CLASS = 50


def digits_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of a digits split: ``"test"`` is 50 images of each class (500), ``"train"`` the rest.

    The held-out images are drawn per class with a fixed generator (seed 0), so the split is
    stratified and the same on every machine; indices are returned in ascending order.
    ``"train+test"`` is every image.
    """
    if split not in DIGITS_SPLITS + ("train+validation+test",):
        raise ValueError(f"data.split={split!r} is not a digits split; use one of {DIGITS_SPLITS}.")
    if split in ("train+test", "train+validation+test"):  # the latter: the TFDS-style default name
        return np.arange(len(labels))
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), bool)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        test[rng.permutation(members)[:DIGITS_TEST_PER_CLASS]] = True
    return np.flatnonzero(test if split == "test" else ~test)


class DigitsSource:
    """scikit-learn's 8x8 digits as ``image_size`` x ``image_size`` grey images in [-1, 1].

    Pixel = value / 16 (background 0, ink bright), bilinear upsampling, then ``x * 2 - 1``.
    Labels 0..9 are kept for class-conditional training. ``split``: ``"train+test"`` (all
    1,797 images, the default), ``"train"`` (1,297) or ``"test"`` (500 held-out images, 50 per
    class; see :func:`digits_split_indices`): evaluation compares samples with the held-out
    digits a model never saw.
    """

    num_classes = 10

    def __init__(self, image_size: int = 16, split: str = "train+test"):
        from sklearn.datasets import load_digits  # Local import: only this source needs it.

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
        if image_size != 8:
            images = np.stack(
                [
                    np.asarray(
                        Image.fromarray(img, mode="F").resize(
                            (image_size, image_size), Image.Resampling.BILINEAR
                        )
                    )
                    for img in images
                ]
            )
        images = np.clip(images, 0.0, 1.0) * 2.0 - 1.0
        keep = digits_split_indices(digits.target, split)
        self.split = split
        self._images = images[keep, ..., None].astype(np.float32)  # [N, S, S, 1]
        self._labels = digits.target[keep].astype(np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self._images[index], "label": self._labels[index]}

    @property
    def images(self) -> np.ndarray:
        return self._images

    @property
    def labels(self) -> np.ndarray:
        return self._labels


class TfdsImageSource:
    """A TFDS image data set through ``tfds.data_source`` (random access, array_record).

    Images are resized on the shorter side to ``image_size`` (bilinear), centre-cropped and
    scaled to [-1, 1].
    """

    def __init__(
        self,
        name: str = "oxford_flowers102",
        split: str = "train+validation+test",
        image_size: int = 64,
        channels: int = 3,
        data_dir: str | None = None,
    ):
        import tensorflow_datasets as tfds  # Heavy import: only when a TFDS source is used.

        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for "not prepared"
            where = data_dir or "~/tensorflow_datasets"
            raise FileNotFoundError(
                f"The TFDS data set {name!r} (split {split!r}) is not prepared in array_record "
                f"format under {where!r}. Prepare it once on a machine with internet access:\n"
                f"    pip install tensorflow && tfds build {name} --file_format=array_record "
                f"--data_dir=DATA_DIR\n"
                f"then pass --config.data.data_dir=DATA_DIR. (Underlying error: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = self._source[index]
        image = Image.fromarray(np.asarray(example["image"], dtype=np.uint8))
        image = resize_and_center_crop(image, self.image_size)
        return {
            "image": to_model_range(_pil_to_array(image, self.channels)),
            "label": np.int32(example.get("label", 0)),
        }


class ImageFolderSource:
    """Every image file under ``path`` (recursive), resized and centre-cropped.

    Files are checked when the source is built, so a corrupt image stops the run before
    training with its name (or, with ``skip_corrupt=True``, is left out and counted).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        skip_corrupt: bool = False,
    ):
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(
                f"data.path={str(path)!r} is not a folder. Pass a folder of PNG/JPEG images "
                "with --config.data.path=PATH."
            )
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        good, bad = [], []
        for f in files:
            try:
                with Image.open(f) as im:
                    im.verify()
                good.append(f)
            except Exception as e:
                if not skip_corrupt:
                    raise ValueError(
                        f"Cannot read image {str(f)!r}: {type(e).__name__}: {e}. Remove or fix "
                        "the file, or set --config.data.skip_corrupt=True to skip unreadable files."
                    ) from e
                bad.append(f)
        if bad:
            logging.warning("Skipped %d unreadable image(s) under %s, e.g. %s", len(bad), root, bad[0])
        if not good:
            raise ValueError(
                f"No readable images ({', '.join(IMAGE_EXTENSIONS)}) found under data.path={str(path)!r}."
            )
        self.files = good
        self.num_skipped = len(bad)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        path = self.files[index]
        try:
            with Image.open(path) as im:
                image = resize_and_center_crop(im.convert("RGB"), self.image_size)
        except Exception as e:
            raise ValueError(f"Cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e
        return {
            "image": to_model_range(_pil_to_array(image, self.channels)),
            "label": np.int32(0),
        }


def build_source(data_config: Mapping[str, Any]):
    """Builds the random-access source named by ``data_config.name``."""
    name = data_config["name"]
    if name == "digits":
        split = data_config.get("split", "train+test")
        return DigitsSource(image_size=data_config["image_size"], split=split)
    if name == "oxford_flowers102":
        return TfdsImageSource(
            name="oxford_flowers102",
            split=data_config.get("split", "train+validation+test"),
            image_size=data_config["image_size"],
            channels=data_config.get("channels", 3),
            data_dir=data_config.get("data_dir") or None,
        )
    if name == "image_folder":
        return ImageFolderSource(
            path=data_config["path"],
            image_size=data_config["image_size"],
            channels=data_config.get("channels", 3),
            skip_corrupt=data_config.get("skip_corrupt", False),
        )
    raise ValueError(f"Unknown data.name={name!r}; choose one of {DATASETS}.")


# ---------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------


def _random_flip(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if rng.random() < 0.5:
        example = dict(example, image=example["image"][:, ::-1, :])
    return example


def make_dataset(
    source: Sequence[Mapping[str, np.ndarray]],
    *,
    batch_size: int,
    seed: int,
    random_flip: bool = False,
    num_threads: int = 2,
    prefetch: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Returns an infinite, deterministic ``grain.IterDataset`` of batches for this process.

    Args:
      source: random-access source (``len`` and ``__getitem__``).
      batch_size: the *global* batch size; each process gets ``batch_size // process_count``
        rows of each global batch (its own slice; the global batches do not depend on the
        process count).
      seed: shuffling and augmentation seed (each epoch is reshuffled deterministically).
      random_flip: random horizontal flip (p = 0.5), seeded per element.
      num_threads, prefetch: host-side parallelism and read-ahead.
      process_index, process_count: multi-host sharding (default: this JAX process).

    Example::

        it = iter(make_dataset(DigitsSource(), batch_size=8, seed=0))
        state = it.get_state()        # JSON-able; it.set_state(state) resumes exactly
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by the number of processes "
            f"({process_count}); choose a multiple of {process_count}."
        )
    per_process = batch_size // process_count
    ds = grain.MapDataset.source(source)
    if len(ds) < batch_size:
        raise ValueError(
            f"The data set has {len(ds)} examples, fewer than one batch ({batch_size}); lower train.batch_size."
        )
    ds = ds.seed(seed).shuffle().repeat(None)
    if random_flip:
        ds = ds.random_map(_random_flip)
    ds = ds.batch(per_process, drop_remainder=True)
    if process_count > 1:
        # Global batch k = these per-process batches k*n .. k*n+n-1 in order; this process
        # takes (and, the dataset being lazy, reads) only its own: the same global batches
        # whatever the process count.
        ds = ds[process_index::process_count]
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return ds.to_iter_dataset(read_options)

