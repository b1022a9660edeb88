"""``chars``: an offline character-recognition dataset rendered from the TrueType fonts matplotlib ships.

47 classes (the EMNIST "balanced" set: digits, capitals, and the 11 lowercase letters whose shape differs from
their capital), 32x32 RGB uint8 images of one glyph each with random size, rotation, shear, translation,
stroke width and colours over a cluttered background (lines, blobs, fragments of other glyphs), then blur and
noise. Train and test are rendered from disjoint font files, so the test accuracy measures generalisation to
unseen typefaces. Every image is drawn from its own random generator seeded by ``(seed, split, index)``:
the arrays are byte-identical for a seed, whatever the number of worker processes. The data card is
docs/data-chars.md.

Example:
    >>> images, labels = render_chars(4, split="train", seed=0)
    >>> images.shape, images.dtype.name, labels.tolist()
    ((4, 32, 32, 3), 'uint8', [0, 1, 2, 3])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # bump when a change alters the pixels: the cache key holds it
# EMNIST balanced (Cohen et al. 2017): c i j k l m o p s u v w x y z are dropped, their lowercase looks like the capital
CLASSES: str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt"
# matplotlib's text fonts (mpl-data/fonts/ttf) with every class glyph; the Display, STIXNonUni, STIXSiz*, cmex10,
# cmsy10 and LastResort files hold symbols only. Each family and weight/slant appears on both sides of the split.
TRAIN_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmtt10.ttf", "cmmi10.ttf",
)
TEST_FONTS: tuple[str, ...] = (
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Italic.ttf",
    "STIXGeneralBol.ttf", "cmss10.ttf", "cmti10.ttf",
)
SPLITS: dict[str, int] = {"train": 0, "test": 1}  # the split's number enters every image's seed
DEFAULT_TRAIN: int = 250 * len(CLASSES)  # 11,750: balanced, >= 10,000
DEFAULT_TEST: int = 50 * len(CLASSES)  # 2,350: balanced, >= 2,000


@dataclass(frozen=True)
class CharsStyle:
    """Ranges of the random rendering steps (fractions of the image side unless named otherwise).

    The defaults are tuned so that the paper's models at width 0.125 land in 70-92% dense test accuracy
    (measured: VGG-13 92.2%, ResNet-34 77.7%, MobileNet-V1 87.8%; docs/data-chars.md); they enter the cache key.

    Example:
        >>> CharsStyle().to_dict()["rotation_deg"]
        20.0
    """

    glyph_size: tuple[float, float] = (0.6, 0.95)  # em size of the font
    rotation_deg: float = 20.0  # uniform in +-
    shear: float = 0.3  # uniform in +- (x shift per unit y)
    aspect: float = 0.15  # x and y scale, each uniform in 1 +- aspect
    translate: float = 0.12  # glyph centre offset, uniform in +-
    stroke: tuple[int, ...] = (0, 0, 0, 1, 1, 2, 3)  # stroke widths in pixels at twice the final side
    clutter: tuple[int, int] = (1, 5)  # number of background items, uniform in [low, high)
    fragment_prob: float = 0.4  # chance that a clutter item is a fragment of another glyph
    # the clutter layer is blended over the gradient with this opacity. v1 (fully opaque clutter, contrast 0.25)
    # kept a width-0.125 VGG-13 at chance for 8 epochs; v2 (opacity 0.2-0.5, contrast 0.5, +-15 deg, 0-3 items,
    # 15% occluders, noise <= 0.04, blur <= 0.7) was too easy (VGG-13 96.3%, ResNet-34 96.0%); a trial harder than
    # v3 (opacity 0.35-0.7, contrast 0.3, 2-5 items, +-25 deg) stayed at chance for 4 epochs at lr 0.05
    clutter_opacity: tuple[float, float] = (0.3, 0.6)
    occluder_prob: float = 0.3  # chance of one thin line drawn over the glyph
    min_contrast: float = 0.4  # min luminance gap (0-1) between the glyph and the background mean
    blur_sigma: tuple[float, float] = (0.0, 0.9)  # Gaussian blur at the final size, pixels
    noise_sigma: tuple[float, float] = (0.0, 0.06)  # additive Gaussian noise, 0-1 scale

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serializable)."""
        return asdict(self)


def font_dir() -> Path:
    """The folder of matplotlib's bundled TrueType fonts.

    Example:
        >>> (font_dir() / "DejaVuSans.ttf").is_file()
        True
    """
    try:
        import matplotlib
    except ImportError as err:  # an optional dependency (the dev extra)
        raise ImportError("the chars dataset renders the fonts matplotlib ships: pip install matplotlib") from err
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def split_fonts(split: str) -> tuple[str, ...]:
    """The font files a split is rendered from (train and test are disjoint).

    Example:
        >>> split_fonts("test")[:2]
        ('DejaVuSans-BoldOblique.ttf', 'DejaVuSansMono.ttf')
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return TRAIN_FONTS if split == "train" else TEST_FONTS


@lru_cache(maxsize=1024)
def _font(name: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(font_dir() / name), size)


def _glyph_mask(rng: np.random.Generator, char: str, font: str, side: int, style: CharsStyle) -> np.ndarray:
    """One glyph, centred by its ink box then randomly sized, stroked, sheared, rotated and moved: float 0-1."""
    from PIL import Image, ImageDraw

    size = max(6, int(side * rng.uniform(*style.glyph_size)))
    stroke = int(rng.choice(style.stroke))
    face = _font(font, size)
    left, top, right, bottom = face.getbbox(char, stroke_width=stroke)
    canvas = Image.new("L", (side * 2, side * 2), 0)  # room for the glyph before the affine map shrinks it
    origin = (side - (left + right) / 2, side - (top + bottom) / 2)
    ImageDraw.Draw(canvas).text(origin, char, font=face, fill=255, stroke_width=stroke, stroke_fill=255)
    # output pixel p (centred) comes from input pixel M^-1 p: M = rotate @ shear @ scale, plus a shift
    angle = np.deg2rad(rng.uniform(-style.rotation_deg, style.rotation_deg))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shear = np.array([[1.0, rng.uniform(-style.shear, style.shear)], [0.0, 1.0]])
    scale = np.diag(1.0 + rng.uniform(-style.aspect, style.aspect, size=2))
    inv = np.linalg.inv(rot @ shear @ scale)
    shift = rng.uniform(-style.translate, style.translate, size=2) * side
    c_out, c_in = np.array([side / 2, side / 2]) + shift, np.array([side, side], dtype=float)
    offset = c_in - inv @ c_out
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    out = canvas.transform((side, side), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32) / 255.0


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _background(rng: np.random.Generator, side: int, fonts: Sequence[str], style: CharsStyle) -> np.ndarray:
    """A two-colour linear gradient in a random direction with lines, blobs and glyph fragments: float 0-1 RGB."""
    from PIL import Image, ImageDraw

    a, b = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
    direction = rng.normal(size=2)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    t = np.clip(0.5 + xx * direction[0] + yy * direction[1], 0, 1)[..., None]
    gradient = Image.fromarray(np.uint8(255 * (a * (1 - t) + b * t)))
    image = gradient.copy()
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(*style.clutter))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.uniform() < style.fragment_prob:  # a big piece of another glyph, mostly off-centre
            char, font = CLASSES[int(rng.integers(len(CLASSES)))], fonts[int(rng.integers(len(fonts)))]
            face = _font(font, int(side * rng.uniform(0.8, 1.6)))
            xy = tuple(float(v) for v in rng.uniform(-0.9, 0.5, size=2) * side)
            draw.text(xy, char, font=face, fill=colour)
        elif rng.uniform() < 0.5:
            points = [float(v) for v in rng.uniform(0, side, size=4)]
            draw.line(points, fill=colour, width=int(rng.integers(1, max(2, side // 12))))
        else:
            x, y = rng.uniform(-0.1, 1.0, size=2) * side
            w, h = rng.uniform(0.08, 0.4, size=2) * side
            draw.ellipse((float(x), float(y), float(x + w), float(y + h)), fill=colour)
    image = Image.blend(gradient, image, float(rng.uniform(*style.clutter_opacity)))
    return np.asarray(image, dtype=np.float32) / 255.0


def _glyph_colour(rng: np.random.Generator, background: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random colour whose luminance is at least ``min_contrast`` from the background's mean."""
    level = float(_luminance(background.reshape(-1, 3)).mean())
    for _ in range(32):
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        if abs(float(_luminance(colour)) - level) >= min_contrast:
            return colour
    return np.full(3, 0.0 if level > 0.5 else 1.0, dtype=np.float32)


def render_one(seed: int, split: str, index: int, *, size: int = 32, style: CharsStyle | None = None) -> np.ndarray:
    """Render image ``index`` of a split: ``(size, size, 3)`` uint8; its label is ``index % len(CLASSES)``.

    Args:
        seed: The dataset seed.
        split: ``"train"`` or ``"test"``: picks the font files (:func:`split_fonts`).
        index: Image number; with ``seed`` and ``split`` it seeds the image's own random generator.
        size: Output side in pixels (drawn at twice the side, then averaged down).
        style: Ranges of the random steps; default :class:`CharsStyle`.

    Example:
        >>> render_one(0, "test", 5).shape
        (32, 32, 3)
    """
    from PIL import Image, ImageDraw, ImageFilter

    style, fonts = style or CharsStyle(), split_fonts(split)
    rng = np.random.default_rng((seed, SPLITS[split], index))
    side = 2 * size
    font = fonts[int(rng.integers(len(fonts)))]
    background = _background(rng, side, fonts, style)
    mask = _glyph_mask(rng, CLASSES[index % len(CLASSES)], font, side, style)[..., None]
    image = background * (1 - mask) + _glyph_colour(rng, background, style.min_contrast) * mask
    pil = Image.fromarray(np.uint8(np.clip(image, 0, 1) * 255 + 0.5))
    if rng.uniform() < style.occluder_prob:
        points = [float(v) for v in rng.uniform(0, side, size=4)]
        ImageDraw.Draw(pil).line(points, fill=tuple(int(v) for v in rng.integers(0, 256, size=3)), width=2)
    pil = pil.resize((size, size), Image.Resampling.BOX)
    sigma = rng.uniform(*style.blur_sigma)
    if sigma > 0.05:
        pil = pil.filter(ImageFilter.GaussianBlur(float(sigma)))
    noisy = np.asarray(pil, dtype=np.float32) / 255.0 + rng.normal(0, rng.uniform(*style.noise_sigma), (size, size, 3))
    return np.uint8(np.clip(noisy, 0, 1) * 255 + 0.5)


def _render_range(args: tuple) -> np.ndarray:
    seed, split, start, stop, size, style = args
    return np.stack([render_one(seed, split, i, size=size, style=style) for i in range(start, stop)])


def render_chars(count: int, *, split: str, seed: int = 0, size: int = 32, style: CharsStyle | None = None,
                 workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Render ``count`` images of a split: ``(images [N, size, size, 3] uint8, labels [N] int64)``.

    Labels cycle through the classes (balanced). The result does not depend on ``workers``.

    Args:
        count: Number of images (>= 1).
        split: ``"train"`` or ``"test"``.
        seed: Dataset seed.
        size: Image side (>= 8).
        style: Ranges of the random steps; default :class:`CharsStyle`.
        workers: Processes to render with (1: in this process).

    Example:
        >>> images, labels = render_chars(2, split="test", seed=1, size=16)
        >>> images.shape, labels.tolist()
        ((2, 16, 16, 3), [0, 1])
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count!r}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    split_fonts(split)  # validates the split
    style = style or CharsStyle()
    labels = np.arange(count, dtype=np.int64) % len(CLASSES)
    if workers == 1 or count < 200:
        return _render_range((seed, split, 0, count, size, style)), labels
    bounds = np.linspace(0, count, 4 * workers + 1).astype(int)
    jobs = [(seed, split, int(a), int(b), size, style) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return np.concatenate(list(pool.map(_render_range, jobs))), labels


def default_cache_dir() -> Path:
    """``$ORTHOREG_TP_CACHE/chars`` when set, else ``~/.cache/orthoreg_tp/chars``.

    Example:
        >>> default_cache_dir().name
        'chars'
    """
    root = os.environ.get("ORTHOREG_TP_CACHE")
    return Path(root) / "chars" if root else Path.home() / ".cache" / "orthoreg_tp" / "chars"


def cache_key(*, seed: int, train: int, test: int, size: int, style: CharsStyle | None = None) -> str:
    """The cache file name of a generation: version, seed, sizes, and a hash of the style and the fonts.

    Example:
        >>> cache_key(seed=0, train=10, test=5, size=32)[:27]
        'chars-v3-seed0-10-5-32px-h-'
    """
    spec = {"style": (style or CharsStyle()).to_dict(), "classes": CLASSES, "train": TRAIN_FONTS, "test": TEST_FONTS}
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"chars-v{GENERATOR_VERSION}-seed{seed}-{train}-{test}-{size}px-h-{digest}.npz"


def load_chars(*, train: int = DEFAULT_TRAIN, test: int = DEFAULT_TEST, seed: int = 0, size: int = 32,
               cache_dir: str | os.PathLike | None = None, style: CharsStyle | None = None,
               workers: int | None = None) -> dict[str, np.ndarray]:
    """Load the dataset from the cache, rendering and caching it on a miss.

    Args:
        train: Training images.
        test: Test images.
        seed: Dataset seed.
        size: Image side.
        cache_dir: Folder of the ``.npz`` cache; default :func:`default_cache_dir`.
        style: Ranges of the random steps; default :class:`CharsStyle`.
        workers: Render processes on a miss; default ``min(os.cpu_count(), 8)``.

    Returns:
        ``{"x_train", "y_train", "x_test", "y_test"}`` arrays (images NHWC uint8, labels int64).

    Example:
        >>> import tempfile
        >>> arrays = load_chars(train=3, test=2, cache_dir=tempfile.mkdtemp())
        >>> arrays["x_train"].shape, arrays["y_test"].tolist()
        ((3, 32, 32, 3), [0, 1])
    """
    path = Path(cache_dir or default_cache_dir()) / cache_key(seed=seed, train=train, test=test, size=size,
                                                               style=style)
    if path.is_file():
        with np.load(path) as cached:
            return {k: cached[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    workers = workers or min(os.cpu_count() or 1, 8)
    start = time.perf_counter()
    x_train, y_train = render_chars(train, split="train", seed=seed, size=size, style=style, workers=workers)
    x_test, y_test = render_chars(test, split="test", seed=seed, size=size, style=style, workers=workers)
    logger.info("rendered chars (%d train + %d test) in %.1f s with %d workers",
                train, test, time.perf_counter() - start, workers)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return arrays


class CharsDataset(Dataset):
    """Images held in memory as uint8, served as normalized float tensors (mean = std = 0.5, like CIFAR).

    Training sets add the paper's random crop (zero padding ``pad``) and no flip: a mirrored character is a
    different character or none.

    Args:
        images: ``[N, H, W, C]`` uint8 array (C = 1 or 3).
        labels: ``[N]`` integer labels.
        train: Whether to add the random crop.
        pad: Crop padding in pixels (the paper's 4 at 32x32).

    Example:
        >>> ds = CharsDataset(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]), train=True)
        >>> x, y = ds[1]
        >>> tuple(x.shape), float(x.min()), int(y)
        ((3, 32, 32), -1.0, 1)
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, train: bool, pad: int = 4):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"images must be [N, H, W, C] uint8 with one label each, got {images.dtype} "
                             f"{images.shape!r} and {len(labels)} labels")
        self.side, self.pad = images.shape[1], pad if train else 0
        chw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.images = torch.nn.functional.pad(chw, (self.pad,) * 4) if self.pad else chw
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.train = train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.pad:
            top, left = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
            image = image[:, top:top + self.side, left:left + self.side]
        return image.float().div_(127.5).sub_(1.0), self.labels[index]
