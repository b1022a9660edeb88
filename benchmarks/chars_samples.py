"""Write the sample grid of the ``chars`` data card (docs/data-chars.png): training rows, then test rows.

    python benchmarks/chars_samples.py            # 3 training rows and 2 test rows of 24 images, scaled 3x
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from orthoreg_tp.engine.chars import render_chars


def sample_grid(*, train_rows: int, test_rows: int, per_row: int, seed: int, scale: int, gap: int = 2) -> Image.Image:
    """Rows of images running through the classes, training fonts first, with a gap between images."""
    rows = []
    for split, count in (("train", train_rows), ("test", test_rows)):
        images, _ = render_chars(count * per_row, split=split, seed=seed)
        rows += [images[r * per_row:(r + 1) * per_row] for r in range(count)]
    side = images.shape[1] * scale
    grid = np.full((len(rows) * (side + gap) - gap, per_row * (side + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            big = np.kron(image, np.ones((scale, scale, 1), np.uint8))
            grid[r * (side + gap):r * (side + gap) + side, c * (side + gap):c * (side + gap) + side] = big
    return Image.fromarray(grid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "data-chars.png"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sample_grid(train_rows=3, test_rows=2, per_row=24, seed=args.seed, scale=3).save(args.output, optimize=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
