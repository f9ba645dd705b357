"""Draw the module icons (128x128 RGBA PNG): MAISIGenerate = an axial CT slice whose organs are
filled with their MAISI label colours, with the spark of synthesis; MAISITrain = a loss curve
falling over training steps. Run from the repository root: python Utilities/make_module_icons.py"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
SCALE = 4  # drawn at 4x and downsampled: smooth edges
ROOT = Path(__file__).resolve().parent.parent


def _canvas():
    image = Image.new("RGBA", (SIZE * SCALE, SIZE * SCALE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    s = SCALE
    draw.rounded_rectangle((4 * s, 4 * s, 124 * s, 124 * s), radius=22 * s, fill=(24, 28, 40, 255))
    return image, draw


def _star(draw, cx, cy, r, color):
    s = SCALE
    points = []
    for i in range(8):
        radius = r if i % 2 == 0 else r * 0.32
        angle = math.pi / 4 * i - math.pi / 2
        points.append(((cx + radius * math.cos(angle)) * s, (cy + radius * math.sin(angle)) * s))
    draw.polygon(points, fill=color)


def _save(image, path: Path):
    image = image.resize((SIZE, SIZE), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"wrote {path}")


def generate_icon(path: Path):
    image, draw = _canvas()
    s = SCALE
    # body (soft tissue), fat rim, lungs/bowel gas dark, spine and ribs bright
    draw.ellipse((14 * s, 34 * s, 114 * s, 106 * s), fill=(92, 92, 96, 255))
    draw.ellipse((18 * s, 38 * s, 110 * s, 102 * s), fill=(128, 128, 132, 255))
    draw.ellipse((60 * s, 84 * s, 74 * s, 98 * s), fill=(236, 236, 236, 255))  # vertebra
    # organs in their MAISI colours: liver, spleen, kidneys, aorta, stomach
    draw.ellipse((22 * s, 44 * s, 64 * s, 84 * s), fill=(221, 130, 101, 255))  # liver
    draw.ellipse((86 * s, 50 * s, 106 * s, 76 * s), fill=(157, 108, 162, 255))  # spleen
    draw.ellipse((42 * s, 78 * s, 56 * s, 94 * s), fill=(185, 102, 83, 255))  # right kidney
    draw.ellipse((78 * s, 78 * s, 92 * s, 94 * s), fill=(185, 102, 83, 255))  # left kidney
    draw.ellipse((66 * s, 72 * s, 74 * s, 80 * s), fill=(224, 97, 76, 255))  # aorta
    draw.ellipse((64 * s, 46 * s, 84 * s, 64 * s), fill=(60, 60, 64, 255))  # stomach gas
    _star(draw, 100, 24, 15, (255, 210, 60, 255))
    _star(draw, 80, 18, 6, (255, 230, 140, 255))
    _save(image, path)


def train_icon(path: Path):
    image, draw = _canvas()
    s = SCALE
    axis = (170, 176, 190, 255)
    draw.line((20 * s, 104 * s, 112 * s, 104 * s), fill=axis, width=3 * s)  # steps
    draw.line((20 * s, 104 * s, 20 * s, 20 * s), fill=axis, width=3 * s)  # loss
    for y in (40, 60, 80):
        draw.line((22 * s, y * s, 110 * s, y * s), fill=(60, 66, 84, 255), width=1 * s)
    # noisy training loss falling like 1/(1 + step); validation points a little above it
    def loss(i: float) -> float:
        return 0.12 + 0.88 / (1 + i / 8)

    def y_of(value: float) -> float:
        return 100 - 74 * value

    curve = [((24 + i) * s, (y_of(loss(i)) + 3 * math.sin(i * 1.9) * (1 - i / 110)) * s) for i in range(89)]
    draw.line(curve, fill=(80, 160, 255, 255), width=4 * s, joint="curve")
    for i in (8, 24, 42, 62, 84):
        x, y = 24 + i, y_of(loss(i) + 0.06)
        draw.ellipse(((x - 3.5) * s, (y - 3.5) * s, (x + 3.5) * s, (y + 3.5) * s), fill=(255, 150, 60, 255))
    _star(draw, 100, 24, 13, (255, 210, 60, 255))
    _save(image, path)


if __name__ == "__main__":
    generate_icon(ROOT / "MAISIGenerate" / "Resources" / "Icons" / "MAISIGenerate.png")
    train_icon(ROOT / "MAISITrain" / "Resources" / "Icons" / "MAISITrain.png")
