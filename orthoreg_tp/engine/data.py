"""Datasets of the recipes: CIFAR-10/100, Tiny-ImageNet or any ImageFolder, scikit-learn's digits, and chars.

``digits`` (1,797 8x8 grayscale digits, upsampled) is the offline default for quick runs and tests; it needs
no download. ``chars`` (47 classes of characters rendered from matplotlib's fonts, train and test from
disjoint fonts; :mod:`orthoreg_tp.engine.chars`, docs/data-chars.md) is the offline dataset harder than
digits; it is rendered once (about half a minute of CPU) and cached. CIFAR comes through torchvision and is
downloaded when online; offline, point ``data_path`` at a folder that holds ``cifar-10-batches-py/`` or
``cifar-100-python/``.

Example:
    >>> train_set, test_set, info = build_datasets("digits", image_size=16)
    >>> info.num_classes, info.in_chans, len(train_set) + len(test_set)
    (10, 3, 1797)
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "chars", "cifar10", "cifar100", "tiny-imagenet", "imagefolder")
IN_MEMORY: tuple[str, ...] = ("digits", "chars")  # held as tensors: no loader workers needed
# The paper normalizes CIFAR (and Tiny-ImageNet) with mean = std = 0.5 per channel (docs/method.md, section 4).
PAPER_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
PAPER_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


class DataUnavailableError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable; the message says how to point ``--data-path`` at it."""


class DataError(ValueError):
    """A dataset on disk is broken: an empty class folder, an unreadable image, an unknown class name.

    The message names the file or folder.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Example:
        >>> DatasetInfo(num_classes=10, in_chans=3, image_size=32).to_dict()["num_classes"]
        10
    """

    num_classes: int
    in_chans: int
    image_size: int
    # where generated data came from (chars: classes, font files per split, seed, cache file); None otherwise
    source: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serializable)."""
        return asdict(self)


def build_datasets(
    name: str,
    *,
    data_path: str | os.PathLike | None = None,
    image_size: int | None = None,
    in_chans: int = 3,
    download: bool = True,
    chars_train: int | None = None,
    chars_test: int | None = None,
    chars_seed: int = 0,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build the train and test sets of a dataset.

    Args:
        name: One of :data:`DATASETS`.
        data_path: Root folder. CIFAR: where torchvision keeps (or downloads) it, default ``./data``.
            ``tiny-imagenet``/``imagefolder``: a folder with ``train/`` and ``test/`` (or ``val/``); required.
            ``chars``: the cache folder, default ``~/.cache/orthoreg_tp/chars``. Unused by ``digits``.
        image_size: Side of the (square) images; default 16 for digits, 32 for CIFAR and chars, 64 otherwise.
        in_chans: 1 or 3; digits and chars honour 1 (grayscale).
        download: Allow torchvision to download CIFAR when it is not under ``data_path``.
        chars_train: ``chars`` training images; default 11,750 (250 per class).
        chars_test: ``chars`` test images; default 2,350 (50 per class).
        chars_seed: ``chars`` generator seed (the data, not the run: keep it fixed to compare runs).

    Returns:
        ``(train_set, test_set, info)``; the train set carries the paper's augmentation.

    Raises:
        ValueError: For an unknown name or a bad option.
        DataUnavailableError: When the data is not on disk (and cannot be downloaded).

    Example:
        >>> train_set, test_set, info = build_datasets("digits", image_size=32, in_chans=1)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset, got {name!r}; choose one of {list(DATASETS)}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
    if image_size is not None and image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size!r}")
    if name == "digits":
        return _digits(image_size or 16, in_chans)
    if name == "chars":
        return _chars(image_size or 32, in_chans, data_path, train=chars_train, test=chars_test, seed=chars_seed)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, Path(data_path or "data"), image_size or 32, download)
    if data_path is None:
        raise DataUnavailableError(f"dataset {name!r} needs --data-path DIR with train/ and test/ (or val/)")
    return _image_folder(Path(data_path), image_size or 64)


def paper_transforms(*, train: bool, image_size: int = 32, resize: bool = True):
    """The paper's CIFAR pipeline: RandomCrop(pad 4) + horizontal flip for training, normalize with 0.5/0.5.

    Args:
        train: Whether to add the augmentation.
        image_size: Output side; every input is resized to it first (train and test alike).
        resize: ``False`` skips the resize, for inputs known to be ``image_size`` already (CIFAR at 32).

    Returns:
        A torchvision transform.

    Example:
        >>> tf = paper_transforms(train=True)
    """
    from torchvision import transforms as T

    steps = [T.Resize((image_size, image_size))] if resize else []
    if train:
        steps += [T.RandomCrop(image_size, padding=max(1, image_size // 8)), T.RandomHorizontalFlip()]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(PAPER_MEAN, PAPER_STD)])


def _digits(image_size: int, in_chans: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)

    def to_set(images, labels) -> TensorDataset:
        t = torch.as_tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
        t = (t - 0.5) / 0.5
        return TensorDataset(t.expand(-1, in_chans, -1, -1).contiguous(), torch.as_tensor(labels))

    info = DatasetInfo(num_classes=10, in_chans=in_chans, image_size=image_size)
    return to_set(x_train, y_train), to_set(x_test, y_test), info


def _chars(image_size: int, in_chans: int, cache_dir: str | os.PathLike | None, *, train: int | None,
           test: int | None, seed: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    import numpy as np

    from . import chars

    counts = {"chars_train": chars.DEFAULT_TRAIN if train is None else train,
              "chars_test": chars.DEFAULT_TEST if test is None else test}
    for key, count in counts.items():
        if count < 1:
            raise ValueError(f"{key} must be >= 1, got {count!r}")
    arrays = chars.load_chars(train=counts["chars_train"], test=counts["chars_test"], seed=seed, size=image_size,
                              cache_dir=cache_dir)
    if in_chans == 1:  # ITU-R 601 luminance, like PIL's convert("L")
        for key in ("x_train", "x_test"):
            gray = arrays[key] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            arrays[key] = (gray + 0.5).clip(0, 255).astype(np.uint8)[..., None]
    pad = max(1, image_size // 8)  # the paper's 4 at 32x32, as paper_transforms; no flip for characters
    train_set = chars.CharsDataset(arrays["x_train"], arrays["y_train"], train=True, pad=pad)
    test_set = chars.CharsDataset(arrays["x_test"], arrays["y_test"], train=False)
    source = {"generator": f"orthoreg_tp.engine.chars v{chars.GENERATOR_VERSION}", "seed": seed,
              "classes": chars.CLASSES, "train_fonts": list(chars.TRAIN_FONTS), "test_fonts": list(chars.TEST_FONTS),
              "train": len(train_set), "test": len(test_set)}
    info = DatasetInfo(num_classes=len(chars.CLASSES), in_chans=in_chans, image_size=image_size, source=source)
    return train_set, test_set, info


def _cifar(name: str, root: Path, image_size: int, download: bool) -> tuple[Dataset, Dataset, DatasetInfo]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        sets = [cls(str(root), train=train, transform=paper_transforms(train=train, image_size=image_size,
                                                                      resize=image_size != 32),
                    download=download and not (root / folder).is_dir()) for train in (True, False)]
    except Exception as err:  # torchvision raises RuntimeError when missing, URLError/OSError when offline
        raise DataUnavailableError(
            f"{name} is not under {str(root)!r} and could not be downloaded ({type(err).__name__}: {err}). "
            f"Put the extracted '{folder}/' folder (from https://www.cs.toronto.edu/~kriz/cifar.html) in a "
            f"directory and pass --data-path DIR."
        ) from err
    info = DatasetInfo(num_classes=10 if name == "cifar10" else 100, in_chans=3, image_size=image_size)
    return sets[0], sets[1], info


def _image_folder(root: Path, image_size: int) -> tuple[Dataset, Dataset, DatasetInfo]:

    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataUnavailableError(
            f"expected {str(root)!r} to hold train/ and test/ (or val/) class folders; pass --data-path DIR"
        )
    train_set = _folder(root / "train", paper_transforms(train=True, image_size=image_size))
    test_tf = paper_transforms(train=False, image_size=image_size)
    annotations = test_dir / "val_annotations.txt"  # the official Tiny-ImageNet val layout: one flat folder
    if annotations.is_file():
        test_set = _tiny_imagenet_val(test_dir, annotations, train_set.class_to_idx, test_tf)
    else:
        test_set = _folder(test_dir, test_tf)
        if test_set.class_to_idx != train_set.class_to_idx:
            raise ValueError(f"train/ and {test_dir.name}/ have different classes under {str(root)!r}")
    info = DatasetInfo(num_classes=len(train_set.classes), in_chans=3, image_size=image_size)
    return train_set, test_set, info


def load_image(path: str) -> object:
    """Open an image file as RGB (a PIL image), or raise :class:`DataError` naming the file.

    Used as the ``loader`` of every image-folder dataset, so a truncated or non-image file stops the run with
    its path instead of a decoder traceback.

    Example:
        >>> load_image("/nonexistent.png")
        Traceback (most recent call last):
        ...
        orthoreg_tp.engine.data.DataError: cannot read image '/nonexistent.png' (FileNotFoundError: no such file)
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    # PIL's UnidentifiedImageError and truncation are OSErrors; ImportError: a plugin hook some libraries install
    # into PIL.Image.open (ultralytics' HEIF fallback) failing on a file Pillow cannot identify
    except (OSError, SyntaxError, ValueError, ImportError) as err:
        reason = "no such file" if isinstance(err, FileNotFoundError) else (str(err).splitlines() or [""])[0]
        raise DataError(f"cannot read image {path!r} ({type(err).__name__}: {reason})") from None


def _folder(folder: Path, transform) -> Dataset:
    """``ImageFolder`` with :func:`load_image`; an empty class folder raises :class:`DataError` naming it."""
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(folder), transform, loader=load_image)
    except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
        extensions = datasets.folder.IMG_EXTENSIONS
        empty = [d for d in sorted(folder.iterdir()) if d.is_dir() and not any(
            f.is_file() and f.name.lower().endswith(extensions) for f in d.rglob("*"))]
        where = ", ".join(repr(str(d)) for d in empty) or repr(str(folder))
        raise DataError(f"class folder {where} holds no image files ({err})") from None


class _LabeledFiles(Dataset):
    """Labeled image files (the official Tiny-ImageNet ``val/``: a flat folder plus an annotation file)."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return self.transform(load_image(path)), target


def _tiny_imagenet_val(folder: Path, annotations: Path, class_to_idx: dict[str, int], transform) -> Dataset:
    samples = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) >= 2:
            if fields[1] not in class_to_idx:
                raise DataError(f"{str(annotations)!r} line {number}: class {fields[1]!r} is not one of the "
                                f"{len(class_to_idx)} class folders of train/")
            samples.append((str(folder / "images" / fields[0]), class_to_idx[fields[1]]))
    return _LabeledFiles(samples, transform)
