import time

import numpy as np
import pytest
import torch
from fontTools.ttLib import TTFont

from orthoreg_tp.engine import chars
from orthoreg_tp.engine.chars import CLASSES, CharsDataset, load_chars, render_chars
from orthoreg_tp.engine.data import DATASETS, DatasetInfo, build_datasets


def test_classes_are_the_emnist_balanced_set():
    assert len(CLASSES) == 47 and len(set(CLASSES)) == 47
    assert set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") <= set(CLASSES)
    # no lowercase whose shape is its capital's
    assert not set(CLASSES) & set("cijklmopsuvwxyz")
    assert "chars" in DATASETS


def test_train_and_test_fonts_are_disjoint_files_with_every_glyph():
    assert not set(chars.TRAIN_FONTS) & set(chars.TEST_FONTS)
    assert len(chars.TRAIN_FONTS) >= 3 * len(chars.TEST_FONTS) // 2
    for name in chars.TRAIN_FONTS + chars.TEST_FONTS:
        cmap = TTFont(chars.font_dir() / name).getBestCmap()
        assert all(ord(c) in cmap for c in CLASSES), name


def test_same_seed_same_bytes_other_seed_other_bytes():
    a, la = render_chars(50, split="train", seed=3)
    b, lb = render_chars(50, split="train", seed=3)
    c, _ = render_chars(50, split="train", seed=4)
    assert a.tobytes() == b.tobytes() and np.array_equal(la, lb)
    assert (a != c).mean() > 0.5


def test_images_are_varied_and_splits_differ():
    images, labels = render_chars(47, split="test", seed=0)
    assert images.shape == (47, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert labels.tolist() == list(range(47))  # balanced: labels cycle through the classes
    assert images.std() > 30  # not blank
    assert len({im.tobytes() for im in images}) == 47
    train, _ = render_chars(47, split="train", seed=0)
    assert (train != images).mean() > 0.5


def test_result_does_not_depend_on_workers():
    one, _ = render_chars(240, split="train", seed=1, workers=1)
    two, _ = render_chars(240, split="train", seed=1, workers=2)
    assert one.tobytes() == two.tobytes()


def test_a_small_count_renders_fast():
    start = time.process_time()  # CPU time of this process: robust to a loaded machine
    render_chars(100, split="train", seed=0)
    assert time.process_time() - start < 3.0  # ~2 ms per image on one core


def test_cache_hit_returns_the_same_arrays_without_rendering(tmp_path, monkeypatch):
    first = load_chars(train=20, test=10, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("chars-v*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("rendered on a cache hit")

    monkeypatch.setattr(chars, "render_chars", fail)
    second = load_chars(train=20, test=10, seed=0, cache_dir=tmp_path)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(first[key], second[key])
    with pytest.raises(AssertionError, match="cache hit"):  # another seed is another file
        load_chars(train=20, test=10, seed=1, cache_dir=tmp_path)


def test_cache_key_changes_with_every_input():
    base = dict(seed=0, train=10, test=5, size=32)
    keys = {chars.cache_key(**base), chars.cache_key(**{**base, "seed": 1}), chars.cache_key(**{**base, "train": 11}),
            chars.cache_key(**{**base, "size": 16}),
            chars.cache_key(**base, style=chars.CharsStyle(rotation_deg=5.0))}
    assert len(keys) == 5


def test_build_datasets_chars(tmp_path):
    train, test, info = build_datasets("chars", image_size=32, data_path=tmp_path, chars_train=94, chars_test=47)
    assert isinstance(info, DatasetInfo) and (len(train), len(test)) == (94, 47)
    assert (info.num_classes, info.in_chans, info.image_size) == (47, 3, 32)
    assert set(info.source["train_fonts"]).isdisjoint(info.source["test_fonts"])
    x, y = test[5]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y.dtype == torch.int64 and int(y) == 5
    assert -1.0 <= float(x.min()) < float(x.max()) <= 1.0
    raw = load_chars(train=94, test=47, cache_dir=tmp_path)["x_test"][5]  # the test set is not augmented
    assert torch.allclose(x, torch.from_numpy(raw).permute(2, 0, 1).float() / 127.5 - 1.0)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=16)))
    assert batch[0].shape == (16, 3, 32, 32) and batch[1].shape == (16,)


def test_build_datasets_chars_grayscale_and_size(tmp_path):
    train, _, info = build_datasets("chars", image_size=16, in_chans=1, data_path=tmp_path, chars_train=10,
                                    chars_test=5)
    assert (info.in_chans, info.image_size) == (1, 16) and train[0][0].shape == (1, 16, 16)


def test_train_crop_shifts_without_flipping():
    image = np.zeros((1, 8, 8, 1), np.uint8)
    image[0, 2, 3] = 255  # one bright pixel
    ds = CharsDataset(image, np.array([0]), train=True, pad=2)
    torch.manual_seed(0)
    spots = {tuple(torch.nonzero(ds[0][0][0] > 0)[0].tolist()) for _ in range(200)}
    # a crop of the zero-padded image moves the pixel by at most the padding, rows and columns independently
    assert spots == {(r, c) for r in range(0, 5) for c in range(1, 6)}


@pytest.mark.parametrize("kwargs,match", [
    ({"chars_train": 0}, "chars_train"),
    ({"chars_test": -1}, "chars_test"),
])
def test_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_datasets("chars", **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"count": 0, "split": "train"}, "count"),
    ({"count": 2, "split": "val"}, "split"),
    ({"count": 2, "split": "train", "size": 4}, "size"),
])
def test_render_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_chars(**kwargs)


def test_recipes_accept_chars_and_keep_it_in_memory():
    import argparse

    from orthoreg_tp.engine.config import RecipeConfig, add_common_args

    assert RecipeConfig(dataset="chars").resolved().workers == 0
    assert add_common_args(argparse.ArgumentParser()).parse_args(["--dataset", "chars"]).dataset == "chars"
