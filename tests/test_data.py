import pytest
import torch
from PIL import Image

from orthoreg_tp.engine.data import DataUnavailableError, build_datasets, paper_transforms


def test_digits_offline_default():
    train, test, info = build_datasets("digits")
    assert (len(train), len(test)) == (1437, 360)
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 3, 16)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert sorted({int(t) for _, t in test}) == list(range(10))  # stratified split covers every class


def test_digits_grayscale_and_size_and_split_is_deterministic():
    a, _, info = build_datasets("digits", image_size=32, in_chans=1)
    b, _, _ = build_datasets("digits", image_size=32, in_chans=1)
    assert info.in_chans == 1 and a[0][0].shape == (1, 32, 32)
    assert torch.equal(a.tensors[0], b.tensors[0])


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "mnist"}, "unknown dataset"),
    ({"name": "digits", "in_chans": 2}, "in_chans"),
    ({"name": "digits", "image_size": 4}, "image_size"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_datasets(**kwargs)


def test_cifar_missing_offline_says_how_to_fix(tmp_path):
    with pytest.raises(DataUnavailableError, match="--data-path"):
        build_datasets("cifar100", data_path=tmp_path / "nowhere", download=False)
    assert not (tmp_path / "nowhere").exists()


def test_image_folder_needs_a_path():
    with pytest.raises(DataUnavailableError, match="--data-path"):
        build_datasets("tiny-imagenet")


def _write_images(folder, classes, n=2):
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 20), color=(i * 40, 0, 0)).save(folder / c / f"{i}.png")


def test_image_folder_with_train_and_val(tmp_path):
    _write_images(tmp_path / "train", ["a", "b", "c"])
    _write_images(tmp_path / "val", ["a", "b", "c"], n=1)
    train, test, info = build_datasets("imagefolder", data_path=tmp_path, image_size=16)
    assert (len(train), len(test), info.num_classes) == (6, 3, 3)
    assert train[0][0].shape == (3, 16, 16)


def test_tiny_imagenet_official_val_layout(tmp_path):
    _write_images(tmp_path / "train", ["n01", "n02"])
    (tmp_path / "val" / "images").mkdir(parents=True)
    lines = []
    for i, c in enumerate(["n02", "n01", "n02"]):
        Image.new("RGB", (64, 64)).save(tmp_path / "val" / "images" / f"val_{i}.JPEG", format="JPEG")
        lines.append(f"val_{i}.JPEG\t{c}\t0\t0\t63\t63")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines))
    _, test, info = build_datasets("tiny-imagenet", data_path=tmp_path)
    assert info.image_size == 64 and len(test) == 3
    assert [test[i][1] for i in range(3)] == [1, 0, 1]
    assert test[0][0].shape == (3, 64, 64)


def test_paper_cifar_transforms():
    img = Image.new("RGB", (32, 32), color=(255, 255, 255))
    x = paper_transforms(train=False)(img)
    assert torch.allclose(x, torch.ones(3, 32, 32))  # (1 - 0.5) / 0.5
    assert paper_transforms(train=True)(img).shape == (3, 32, 32)
