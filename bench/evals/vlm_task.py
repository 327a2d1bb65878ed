"""Synthetic images with captions, and the image-text mislabel task (``vlm-mislabel``).

Scenes are drawn by code: one to three shapes of one colour on a noisy grey background,
64 pixels a side. The same seed always gives the same scenes and pixels; shapes and
colours cycle, so any run of ``len(SHAPES) * len(COLOURS)`` scenes holds each pair once.

``vlm-mislabel`` is the paper's image mislabel protocol (its dog/cat experiment) on these
images: one shape per image, the question "What shape is in the image?", the answer "It is
a {label}", two classes; a mislabeled training sample gets the other class's label
(``VLM_FLIP_SHARE`` of them); the validation set is clean and balanced. Samples keep their
ground truth under ``"meta"`` as the text mislabel tasks do (``class``, ``given``,
``flipped``), so bench/evals/eval.py scores them with the same metrics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .tasks import Task, with_ids

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
COUNT_WORDS = ("zero", "one", "two", "three")
IMAGE_SIZE = 64

VLM_TASK = "vlm-mislabel"
VLM_CLASSES = ("circle", "square")
VLM_QUESTION = "What shape is in the image?"
VLM_FLIP_SHARE = 0.6
_VLM_PER_CLASS = {"small": (20, 5), "full": (90, 10)}  # (train, valid) per class


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    seed: int  # background, sizes and places

    def caption(self) -> str:
        """"Two red circles."."""
        plural = "es" if self.shape == "cross" else "s"
        noun = self.shape + (plural if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count].capitalize()} {self.colour} {noun}."

    def image(self) -> Image.Image:
        rng = np.random.default_rng(self.seed)
        grey = rng.integers(90, 170)
        pixels = np.clip(grey + rng.normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
        picture = Image.fromarray(pixels)
        draw = ImageDraw.Draw(picture)
        half = IMAGE_SIZE // 2
        # One shape per quadrant, so that shapes never overlap and stay countable.
        for quadrant in rng.permutation(4)[:self.count]:
            size = int(rng.integers(14, 27)) if self.count == 1 else int(rng.integers(11, 19))
            room = (IMAGE_SIZE if self.count == 1 else half) - size
            left = int(rng.integers(0, room + 1)) + (0 if self.count == 1 else half * (quadrant % 2))
            top = int(rng.integers(0, room + 1)) + (0 if self.count == 1 else half * (quadrant // 2))
            colour = tuple(int(c) for c in np.clip(np.array(COLOURS[self.colour]) + rng.integers(-15, 16, 3),
                                                  0, 255))
            _draw(draw, self.shape, left, top, size, colour)
        return picture


def _draw(draw: ImageDraw.ImageDraw, shape: str, left: int, top: int, size: int,
          colour: tuple[int, ...]) -> None:
    right, bottom = left + size - 1, top + size - 1
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=colour)
    elif shape == "triangle":
        draw.polygon([(left + size // 2, top), (left, bottom), (right, bottom)], fill=colour)
    else:  # a cross: two bars a third of the size wide
        bar = size // 3
        draw.rectangle((left + bar, top, right - bar, bottom), fill=colour)
        draw.rectangle((left, top + bar, right, bottom - bar), fill=colour)


def scenes(n: int, seed: int, *, shapes: tuple[str, ...] = SHAPES, counts: tuple[int, ...] = (1, 2, 3),
           start: int = 0) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of the stream ``seed``: shapes cycle fastest, then
    colours; counts and pixels are drawn per scene."""
    out = []
    for k in range(start, start + n):
        rng = random.Random(f"vlm-scene/{seed}/{k}")  # str seeds are stable across runs
        colour = tuple(COLOURS)[(k // len(shapes)) % len(COLOURS)]
        out.append(Scene(shapes[k % len(shapes)], colour, rng.choice(counts), rng.getrandbits(32)))
    return out


def image_message(picture: Image.Image | str, question: str) -> dict:
    """A user turn holding one image and a question."""
    return {"role": "user", "content": [{"type": "image", "image": picture},
                                        {"type": "text", "text": question}]}


def make_vlm_task(size: str = "small", seed: int = 0) -> Task:
    """``vlm-mislabel`` at ``size``; the same seed always gives the same samples and pixels."""
    if size not in _VLM_PER_CLASS:
        raise ValueError(f"unknown size {size!r}; choose one of {tuple(_VLM_PER_CLASS)}")
    n_train, n_valid = _VLM_PER_CLASS[size]
    n_classes = len(VLM_CLASSES)
    train_scenes = scenes(n_train * n_classes, seed, shapes=VLM_CLASSES, counts=(1,))
    valid_scenes = scenes(n_valid * n_classes, seed, shapes=VLM_CLASSES, counts=(1,), start=len(train_scenes))
    rng = random.Random(f"{VLM_TASK}/{size}/{seed}")
    flipped = set(rng.sample(range(len(train_scenes)), round(VLM_FLIP_SHARE * len(train_scenes))))
    train = [_sample(scene, flipped=k in flipped) for k, scene in enumerate(train_scenes)]
    valid = [_sample(scene, flipped=False) for scene in valid_scenes]
    return Task(VLM_TASK, "mislabeled", with_ids(train, "train"), with_ids(valid, "valid"),
                loss_on="response", classes=VLM_CLASSES)


def _sample(scene: Scene, *, flipped: bool) -> dict:
    cls = VLM_CLASSES.index(scene.shape)
    given = 1 - cls if flipped else cls  # two classes: the other one
    return {"messages": [image_message(scene.image(), VLM_QUESTION),
                         {"role": "assistant", "content": f"It is a {VLM_CLASSES[given]}"}],
            "meta": {"class": cls, "given": given, "flipped": int(flipped), "colour": scene.colour}}
