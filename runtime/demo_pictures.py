"""Synthetic pictures and questions for the demo vision-language model (``vlmserve-demo``).

The demo model (``runtime/demo_vlm/``, trained by ``scripts/train_demo_vlm.py``) knows only these
pictures: solid shapes in named colours on plain, slightly tinted backgrounds. This module draws
them and writes the questions the model was trained on, with their answers, so that training,
the evaluation script, the tests and the README's quick start all use the same generator.

Public API:

* ``COLORS`` / ``SHAPES`` / ``POSITIONS`` / ``NUMBERS``: the vocabulary of the answers.
* ``Picture``: a drawn image with the objects on it (``objects``: (colour, shape, position)).
* ``draw_picture(rng, layout)`` -> ``Picture``; layout "single" (one big shape anywhere) or
  "grid" (one to four shapes, each inside its own cell of a 3 x 3 grid).
* ``make_example(rng, kind)`` -> ``Example``: a picture with one question and its answer;
  kind "color" | "shape" | "count" | "where".
* ``held_out_examples(kind, n, seed=HELD_OUT_SEED)`` -> ``n`` examples of one kind from a seed
  the training never used (the evaluation script's and the tests' pictures).
* ``chat_messages(question, image, image_first=True)`` -> OpenAI-style chat messages.
* ``png_bytes(image)`` / ``png_data_url(image)``: a picture as sent to the server (lossless).

Everything is drawn from a ``numpy.random.Generator``, so a seed fixes the whole data set.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours, far from the neutral backgrounds and from each other (jittered per picture).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "purple": (135, 50, 185),
    "pink": (240, 105, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
# Cell (row, column) of the 3 x 3 grid -> its name, the answer to "Where is the ...?".
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "What colour is the shape?", "What color is it?"),
    "shape": ("What shape is this?", "What shape is it?", "Which shape is this?"),
    "count": ("How many shapes are there?", "How many shapes are in the picture?"),
    "where": ("Where is the {color} {shape}?",),
}
KINDS: tuple[str, ...] = tuple(QUESTIONS)

# Rendered size: sqrt(area) in pixels and aspect ratio (width / height). The model's image
# processor then resizes every picture into its [min_pixels, max_pixels] area; the aspect stays
# moderate so that the short side keeps at least two image tokens.
MIN_SIDE, MAX_SIDE = 64, 160
MAX_ASPECT = 1.5
_SUPERSAMPLE = 3  # drawn this many times larger, then shrunk: smooth edges like a real picture


@dataclass
class Picture:
    image: Image.Image
    # (colour name, shape name, position name); position is the 3 x 3 cell of the shape's centre.
    objects: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Example:
    picture: Picture
    kind: str
    question: str
    answer: str


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of ``shape`` inscribed in the circle of radius ``r`` around (cx, cy)."""
    if shape == "square":
        h = r * 0.8  # a square of side 1.6 r has about the area of the circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "triangle":  # equilateral, pointing up, centred on its circumcircle
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    if shape == "star":  # five points; inner radius 0.45 r keeps the points sharp at small sizes
        pts = []
        for i in range(10):
            a = math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A neutral grey of any lightness, faintly tinted, with a gentle gradient and a little noise."""
    base = rng.uniform(0, 255)
    tint = rng.uniform(-15, 15, size=3)
    img = np.full((h, w, 3), base, dtype=np.float32) + tint
    gx, gy = rng.uniform(-30, 30, size=2)
    img += (np.linspace(-0.5, 0.5, w)[None, :, None] * gx + np.linspace(-0.5, 0.5, h)[:, None, None] * gy)
    img += rng.normal(0, rng.uniform(0, 6), size=img.shape)
    return img


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _position(cx: float, cy: float, w: int, h: int) -> str:
    return POSITIONS[(min(int(3 * cy / h), 2), min(int(3 * cx / w), 2))]


def draw_picture(rng: np.random.Generator, layout: str = "single", num_objects: int | None = None) -> Picture:
    """Draw one picture. "single": one shape, 50-90% of the short side across, anywhere inside
    (big: the model tells shapes apart by their outline, a few image patches across).
    "grid": ``num_objects`` (else 1-4) shapes in distinct cells of a 3 x 3 grid, none overlapping,
    with distinct (colour, shape) pairs so that "the red circle" names exactly one."""
    side, aspect = rng.uniform(MIN_SIDE, MAX_SIDE), math.exp(rng.uniform(-1, 1) * math.log(MAX_ASPECT))
    w, h = round(side * math.sqrt(aspect)), round(side / math.sqrt(aspect))
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (w * s, h * s))
    bg = Image.fromarray(np.clip(_background(rng, w, h), 0, 255).astype(np.uint8), "RGB")
    canvas.paste(bg.resize((w * s, h * s), Image.Resampling.NEAREST))
    draw = ImageDraw.Draw(canvas)
    colors, shapes = list(COLORS), list(SHAPES)
    objects: list[tuple[str, str, str]] = []
    if layout == "single":
        r = rng.uniform(0.25, 0.45) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        placed = [(cx, cy, r)]
    elif layout == "grid":
        n = num_objects or int(rng.integers(1, 5))
        cells = rng.choice(9, size=n, replace=False)
        cw, ch = w / 3, h / 3
        placed = []
        for cell in cells:
            row, col = divmod(int(cell), 3)
            r = rng.uniform(0.28, 0.45) * min(cw, ch)
            # The whole shape stays inside its cell: its position is unambiguous.
            cx = col * cw + rng.uniform(r, cw - r)
            cy = row * ch + rng.uniform(r, ch - r)
            placed.append((cx, cy, r))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    pairs: set[tuple[str, str]] = set()
    for cx, cy, r in placed:
        while True:
            pair = (colors[int(rng.integers(len(colors)))], shapes[int(rng.integers(len(shapes)))])
            if pair not in pairs:
                break
        pairs.add(pair)
        color, shape = pair
        fill = _jitter(rng, COLORS[color])
        if shape == "circle":
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
        else:
            draw.polygon([(x * s, y * s) for x, y in _shape_points(shape, cx, cy, r)], fill=fill)
        objects.append((color, shape, _position(cx, cy, w, h)))
    return Picture(canvas.resize((w, h), Image.Resampling.BOX), objects)


def make_example(rng: np.random.Generator, kind: str) -> Example:
    """A picture and one question of ``kind`` about it, with the answer the model should give.
    Colour and shape questions ("the shape", "this") come with one-shape pictures (colour ones
    also with a small shape in the grid); count and where questions with grid pictures."""
    if kind == "color":
        pic = draw_picture(rng, "single" if rng.random() < 0.75 else "grid", num_objects=1)
    elif kind == "shape":  # a small grid shape is only a few pixels across once resized: big ones only
        pic = draw_picture(rng, "single")
    elif kind in ("count", "where"):
        pic = draw_picture(rng, "grid")
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    templates = QUESTIONS[kind]
    question = templates[int(rng.integers(len(templates)))]
    if kind == "color":
        answer = pic.objects[0][0]
    elif kind == "shape":
        answer = pic.objects[0][1]
    elif kind == "count":
        answer = NUMBERS[len(pic.objects) - 1]
    else:
        color, shape, answer = pic.objects[int(rng.integers(len(pic.objects)))]
        question = question.format(color=color, shape=shape)
    return Example(pic, kind, question, answer)


def chat_messages(question: str, image: Any, image_first: bool = True) -> list[dict[str, Any]]:
    """One user turn with ``image`` (an ``image_url`` part: a URL / data URL string, or a PIL
    image for the offline engine) and the question text, image first unless told otherwise."""
    if isinstance(image, str):
        part: dict[str, Any] = {"type": "image_url", "image_url": {"url": image}}
    else:
        part = {"type": "image", "image": image}  # the offline engine's PIL image part
    text = {"type": "text", "text": question}
    return [{"role": "user", "content": [part, text] if image_first else [text, part]}]


# scripts/train_demo_vlm.py draws its data from seeds [seed, 1] and [seed, 2] with seed 0; the
# held-out pictures come from [HELD_OUT_SEED, kind index], never seen in training.
HELD_OUT_SEED = 999


def held_out_examples(kind: str, n: int, seed: int = HELD_OUT_SEED) -> list[Example]:
    """``n`` examples of ``kind``; the first k of them are the same whatever ``n`` is."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    return [make_example(rng, kind) for _ in range(n)]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
