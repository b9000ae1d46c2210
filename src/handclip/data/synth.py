"""Procedural hand photos in the 11k Hands format: the built-in data of the demo and the tests.

Each identity is a persistent pair of hands: palm and finger geometry, skin tone, nails, dorsal moles,
veins, knuckle wrinkles and scars, palmar lines and flexion creases; the left hand is the right one
mirrored with small asymmetries. Each photo draws the hand in a new finger pose and a new scene:
rotation, scale, position, camera tilt, background, clutter, sleeve, light gradient, colour cast, blur,
sensor noise and JPEG quality. Identity lives in shape and marks, never in colour alone: skin tones
come from a few values shared by many people, and every photo gets its own colour cast.

Two photo styles: ``varied`` (the default: the scenes above, photos taken anywhere) and ``studio``
(a plain light backdrop, the hand upright and centred, even light, like the 11k Hands studio). The
demo's pretrained backbone learned hands from studio photos of other people
(tools/pretrain_demo_backbone.py); the demo then meets them in varied scenes.

Geometry is in hand units (palm width about 1), in the frame of a right hand seen from the back with
the fingers up (thumb at -x, little finger at +x, y up). Every photo is drawn at an internal
resolution and then resized, so a hand looks the same at 160x120 and at 1600x1200.
"""
from __future__ import annotations

import colorsys
import io
import math
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from handclip.hand_datasets import ASPECT_FROM_11K_LABEL, TRAIN_ID_THRESHOLD_11K
from handclip.errors import UserError
from handclip.fileio import atomic_directory, csv_text

HAND_INFO_COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand",
                     "imageName", "irregularities")
ASPECT_LABELS = tuple(ASPECT_FROM_11K_LABEL)  # "dorsal right", "dorsal left", "palmar right", "palmar left"
MARKER_FILE = "SYNTHETIC.txt"  # marks a folder this module may replace
MAX_IDS, MAX_PER_ASPECT, SIDE_RANGE = 1000, 100, (32, 4096)
TRAIN_FRACTION = 0.65
INTERNAL_SHORT_SIDE = 480  # drawing resolution of the image's short side
HAND_UNIT = 0.36  # pixels per hand unit, as a fraction of the short side, at scale 1
ACCESSORY_EVERY = 3  # every third identity gets one extra photo with a ring or watch in each aspect
STYLES = ("varied", "studio")

RGB = tuple[int, int, int]
# A few skin tones, each shared by many identities, so colour alone cannot tell people apart.
SKIN_TONES: tuple[tuple[str, RGB], ...] = (
    ("very fair", (238, 205, 185)), ("fair", (226, 178, 146)), ("medium", (200, 145, 108)),
    ("medium", (176, 122, 86)), ("dark", (122, 84, 60)),
)
POLISH_COLOURS: tuple[RGB, ...] = ((170, 20, 40), (215, 95, 130), (90, 20, 50))
PALMAR_TINT: RGB = (240, 180, 165)
RING_COLOURS: tuple[RGB, ...] = ((212, 175, 55), (196, 198, 205))
STRAP_COLOURS: tuple[RGB, ...] = ((25, 25, 28), (110, 70, 40), (170, 172, 178))


@dataclass(frozen=True)
class Digit:
    """A thumb or finger: a tapered capsule hinged at ``base``."""

    base: tuple[float, float]
    angle: float  # rest angle, degrees clockwise from straight up (towards the little finger)
    length: float
    width: float
    joints: tuple[float, ...]  # joint positions, fractions of the length from the base
    wrinkles: tuple[int, ...]  # dorsal wrinkle arcs at each joint
    nail: tuple[float, float, float]  # width (fraction of the digit's width), length (fraction), squareness


@dataclass(frozen=True)
class Mark:
    """A dot (mole) or a polyline (vein, scar, palm line, crease) fixed to one part of the hand."""

    part: int  # 0 = palm and forearm (hand units); 1..5 = thumb..little finger (u across, v along, fractions)
    points: tuple[tuple[float, float], ...]
    width: float  # line width or dot radius, hand units
    colour: RGB


@dataclass(frozen=True)
class Hand:
    palm: tuple[tuple[float, float], ...]  # outline polygon
    wrist_width: float
    digits: tuple[Digit, ...]  # thumb, index, middle, ring, little
    skin: RGB
    palmar_skin: RGB
    nail_colour: RGB
    dorsal_marks: tuple[Mark, ...]
    palmar_marks: tuple[Mark, ...]


@dataclass(frozen=True)
class Person:
    age: int
    gender: str
    skin_label: str
    nail_polish: bool
    irregular: bool  # has a scar
    right: Hand
    left: Hand


@dataclass(frozen=True)
class Scene:
    """Everything about a photo that is not the person."""

    rotation: float  # degrees
    scale: float
    shift: tuple[float, float]  # fractions of width and height
    tilt: float  # vertical foreshortening of a slightly tilted camera
    background: tuple[RGB, RGB]  # the two ends of a linear gradient
    background_angle: float  # radians
    clutter: int  # random shapes on the background
    sleeve: Optional[RGB]
    sleeve_start: float  # hand units below the wrist
    light: tuple[float, float]  # gain at the two ends of a light gradient
    light_angle: float  # radians
    cast: tuple[float, float, float]  # per-channel gain
    blur: float  # Gaussian radius, fraction of the image width
    noise: float  # sensor noise, grey levels


NEUTRAL_SCENE = Scene(rotation=0.0, scale=1.0, shift=(0.0, 0.0), tilt=1.0, background=((245, 245, 245),) * 2,
                      background_angle=0.0, clutter=0, sleeve=None, sleeve_start=0.0, light=(1.0, 1.0),
                      light_angle=0.0, cast=(1.0, 1.0, 1.0), blur=0.0, noise=0.0)


# ---------------------------------------------------------------- the dataset


def synthesize(out, ids: int = 40, per_aspect: int = 4, size: tuple[int, int] = (160, 120), seed: int = 0,
               workers: int = 1, style: str = "varied") -> dict:
    """Write ``out/Hands/*.jpg`` and ``out/HandInfo.csv`` (11k Hands format); return the counts.

    ``out`` is replaced whole, so it must be missing, empty, or an earlier synth output.
    Same arguments → byte-identical files, whatever ``workers`` (processes drawing the photos).
    ``style``: one of ``STYLES`` (see the module's doc).
    """
    out = Path(out)
    _check_arguments(out, ids, per_aspect, size, seed, style)
    plan = []  # (person, 11k aspect label, rng seed, accessory), in file-number order
    rows = []
    for index, subject in enumerate(subject_ids(ids)):
        person = make_person(seed, index)
        for aspect_index, aspect in enumerate(ASPECT_LABELS):
            accessories = [None] * per_aspect
            if index % ACCESSORY_EVERY == 0:
                accessories.append(("ring", "watch")[(index // ACCESSORY_EVERY + aspect_index) % 2])
            for photo, accessory in enumerate(accessories):
                plan.append((person, aspect, (seed, 1, index, aspect_index, photo), accessory))
                rows.append(_csv_row(subject, person, aspect, f"Hand_{len(rows) + 1:07d}.jpg", accessory is not None))
    draw = partial(_photo_jpeg, size=size, style=style)
    with atomic_directory(out) as tmp, ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        (tmp / "Hands").mkdir()
        photos = pool.map(draw, plan, chunksize=8) if pool else map(draw, plan)
        for row, jpeg in zip(rows, photos):
            (tmp / "Hands" / row[HAND_INFO_COLUMNS.index("imageName")]).write_bytes(jpeg)
        (tmp / "HandInfo.csv").write_text(csv_text(HAND_INFO_COLUMNS, rows), encoding="utf-8")
        style_flag = "" if style == STYLES[0] else f" --style {style}"
        (tmp / MARKER_FILE).write_text(
            f"written by: handclip synth --ids {ids} --per-aspect {per_aspect} --size {size[0]}x{size[1]} "
            f"--seed {seed}{style_flag}\nthis folder is replaced whole by the next synth run into it\n",
            encoding="utf-8")
    return {"images": len(rows), "identities": ids}


def _photo_jpeg(item: tuple, size: tuple[int, int], style: str) -> bytes:
    person, aspect, rng_seed, accessory = item
    rng = np.random.default_rng(list(rng_seed))
    image = render_photo(person, aspect, size, rng, accessory=accessory, style=style)
    return _jpeg(image, quality=int(rng.integers(60, 96)))


def subject_ids(count: int) -> list[str]:
    """7-digit subject ids: about 65% at or below every aspect's train threshold, the rest above all."""
    train_count = min(count - 1, max(1, round(TRAIN_FRACTION * count)))
    train_span = min(TRAIN_ID_THRESHOLD_11K.values()) + 1
    first_test = max(TRAIN_ID_THRESHOLD_11K.values()) + 1
    train = [i * train_span // train_count for i in range(train_count)]
    test = [first_test + 3 * i for i in range(count - train_count)]
    return [f"{number:07d}" for number in train + test]


def _check_arguments(out: Path, ids, per_aspect, size, seed, style) -> None:
    if not 2 <= ids <= MAX_IDS:
        raise UserError(f"--ids {ids}: must be between 2 and {MAX_IDS} (the protocol needs train and test identities)")
    if not 2 <= per_aspect <= MAX_PER_ASPECT:
        raise UserError(f"--per-aspect {per_aspect}: must be between 2 and {MAX_PER_ASPECT} "
                        "(the protocol needs a query besides each gallery image)")
    low, high = SIDE_RANGE
    if len(size) != 2 or not all(low <= side <= high for side in size):
        raise UserError(f"--size {'x'.join(map(str, size))}: each side must be between {low} and {high} pixels")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be 0 or more")
    if style not in STYLES:
        raise UserError(f"--style {style}: must be one of {', '.join(STYLES)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).exists():
        raise UserError(f"--out {out}: folder is not empty and was not written by handclip synth; "
                        "choose a new or empty folder")


def _csv_row(subject: str, person: Person, aspect: str, name: str, accessory: bool) -> list:
    return [subject, person.age, person.gender, person.skin_label, int(accessory), int(person.nail_polish),
            aspect, name, int(person.irregular)]


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------- identities


def make_person(seed: int, index: int) -> Person:
    """The persistent identity number ``index`` of a seeded set (independent of the set's size)."""
    rng = np.random.default_rng([seed, 0, index])
    skin_label, tone = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    skin = _jitter_colour(tone, rng, 4)
    nail_polish = bool(rng.random() < 0.25)
    nail_colour = POLISH_COLOURS[rng.integers(len(POLISH_COLOURS))] if nail_polish else _mix(skin, (250, 225, 220), 0.55)
    irregular = bool(rng.random() < 0.2)
    right = _make_hand(rng, skin, nail_colour, irregular)
    return Person(age=int(rng.integers(18, 76)), gender=("male", "female")[rng.integers(2)], skin_label=skin_label,
                  nail_polish=nail_polish, irregular=irregular, right=right, left=_asymmetric_twin(right, rng))


def _make_hand(rng: np.random.Generator, skin: RGB, nail_colour: RGB, scarred: bool) -> Hand:
    size = rng.uniform(0.92, 1.08)
    width, height = size, size * rng.uniform(0.95, 1.25)
    slender = rng.uniform(0.8, 1.2)  # finger girth of the whole hand
    wrist = width * rng.uniform(0.74, 0.88)
    thumb_y = height * rng.uniform(0.35, 0.5)
    palm = ((-wrist / 2, 0.0), (wrist / 2, 0.0), (width * rng.uniform(0.48, 0.53), height * 0.45),
            (width / 2, height * rng.uniform(0.86, 0.92)), (width * 0.3, height * rng.uniform(0.98, 1.02)),
            (0.0, height * 1.03), (-width * 0.3, height * rng.uniform(1.0, 1.04)),
            (-width * 0.5, height * 0.86), (-width * rng.uniform(0.5, 0.56), thumb_y))
    middle = height * rng.uniform(0.7, 0.95)
    fingers = []
    for x, top, length, girth, angle in zip(
            (-0.375, -0.125, 0.125, 0.375), (1.0, 1.03, 1.01, 0.9),
            (middle * rng.uniform(0.82, 0.97), middle, middle * rng.uniform(0.85, 0.99), middle * rng.uniform(0.62, 0.8)),
            (0.24, 0.25, 0.23, 0.2), (rng.uniform(-10, -3), rng.uniform(-2, 2), rng.uniform(3, 8), rng.uniform(8, 16))):
        fingers.append(_make_digit(rng, (width * (x + rng.uniform(-0.02, 0.02)), height * top - 0.12),
                                   angle, length + 0.12, width * girth * slender * rng.uniform(0.92, 1.08),
                                   joint_count=2))
    thumb = _make_digit(rng, (-width * 0.42, thumb_y * rng.uniform(0.55, 0.75)), -rng.uniform(28, 56),
                        height * rng.uniform(0.6, 0.8), width * 0.29 * slender * rng.uniform(0.92, 1.08), joint_count=1)
    digits = (thumb, *fingers)
    palmar_skin = _mix(skin, PALMAR_TINT, 0.3)
    return Hand(palm=palm, wrist_width=wrist, digits=digits, skin=skin, palmar_skin=palmar_skin,
                nail_colour=nail_colour, dorsal_marks=_dorsal_marks(rng, digits, width, wrist, height, skin, scarred),
                palmar_marks=_palmar_marks(rng, digits, width, wrist, height, palmar_skin))


def _make_digit(rng, base, angle, length, width, joint_count) -> Digit:
    joints = (rng.uniform(0.5, 0.6),) if joint_count == 1 else (rng.uniform(0.45, 0.53), rng.uniform(0.72, 0.78))
    return Digit(base=base, angle=angle, length=length, width=width, joints=joints,
                 wrinkles=tuple(int(n) for n in rng.integers(1, 5, size=joint_count)),
                 nail=(rng.uniform(0.55, 0.8), rng.uniform(0.16, 0.26), rng.uniform(2.0, 5.0)))


def _on_back(rng, width, wrist, height) -> np.ndarray:
    """A random point well inside the palm or the wrist (either side of the hand)."""
    y = rng.uniform(-0.3, 0.92) * height
    half = wrist / 2 + (width - wrist) / 2 * float(np.clip(y / (0.45 * height), 0, 1))
    return np.array((rng.uniform(-0.85, 0.85) * half, y))


def _line_inside(rng, width, wrist, height) -> tuple[tuple[float, float], ...]:
    """A short wobbly line from one inside point halfway to another: inside too, the palm being nearly convex."""
    start = _on_back(rng, width, wrist, height)
    end = (start + _on_back(rng, width, wrist, height)) / 2
    return _wobbly_line(rng, start, end, 4, 0.015)


def _dorsal_marks(rng, digits, width, wrist, height, skin, scarred) -> tuple[Mark, ...]:
    mole = (90, 55, 40)

    def spot():
        return (tuple(_on_back(rng, width, wrist, height)),)

    marks = [Mark(0, spot(), rng.uniform(0.015, 0.045), _mix(skin, mole, rng.uniform(0.5, 0.9)))
             for _ in range(rng.integers(1, 7))]
    marks += [Mark(int(rng.integers(1, 6)), ((rng.uniform(-0.3, 0.3), rng.uniform(0.2, 0.8)),),
                   rng.uniform(0.012, 0.03), _mix(skin, mole, rng.uniform(0.5, 0.9)))
              for _ in range(rng.integers(0, 3))]
    freckle = _mix(skin, mole, rng.uniform(0.25, 0.45))
    marks += [Mark(0, spot(), rng.uniform(0.006, 0.012), freckle) for _ in range(int(rng.choice([0, 0, 10, 25, 50])))]
    if rng.random() < 0.3:  # a birthmark: an irregular patch
        centre = _on_back(rng, width * 0.8, wrist * 0.8, height)
        patch = _mix(skin, (120, 70, 50), rng.uniform(0.25, 0.45))
        marks += [Mark(0, (tuple(centre + rng.normal(0, 0.05, size=2)),), rng.uniform(0.04, 0.08), patch)
                  for _ in range(6)]
    vein = _mix(skin, (70, 90, 140), rng.uniform(0.25, 0.4))
    for finger in [digits[1 + i] for i in rng.permutation(4)[: rng.integers(2, 5)]]:
        start = (rng.uniform(-0.25, 0.25) * width, rng.uniform(-0.4, 0.1))
        end = (finger.base[0] + rng.uniform(-0.08, 0.08), finger.base[1] - rng.uniform(0.05, 0.2))
        marks.append(Mark(0, _wobbly_line(rng, start, end, 5, 0.05), rng.uniform(0.025, 0.045), vein))
    for part, digit in enumerate(digits, start=1):
        for joint, count in zip(digit.joints, digit.wrinkles):
            spacing = rng.uniform(0.02, 0.04) / digit.length
            bend = rng.uniform(-0.03, 0.05) / digit.length
            for k in range(count):
                v = joint + (k - (count - 1) / 2) * spacing
                marks.append(Mark(part, ((-0.3, v), (0.0, v + bend), (0.3, v)), 0.016, _mix(skin, (60, 40, 30), 0.45)))
    if scarred:
        marks.append(Mark(0, _line_inside(rng, width, wrist, height), rng.uniform(0.02, 0.035),
                          _mix(skin, (250, 215, 210), 0.5)))
    return tuple(marks)


def _palmar_marks(rng, digits, width, wrist, height, palmar_skin) -> tuple[Mark, ...]:
    line_colour = _mix(palmar_skin, (90, 45, 40), rng.uniform(0.4, 0.55))

    def jitter(x, y):
        return x * width + rng.uniform(-0.06, 0.06), y * height + rng.uniform(-0.06, 0.06)

    heart = _bezier(jitter(0.5, 0.76), jitter(0.05, 0.68), jitter(-0.25, 0.86))
    head = _bezier(jitter(-0.47, 0.66), jitter(-0.05, 0.6), jitter(0.38, 0.46))
    life = _bezier(jitter(-0.46, 0.64), jitter(-0.12, 0.35), jitter(-0.2, 0.02))
    marks = [Mark(0, line, rng.uniform(0.025, 0.04), line_colour) for line in (heart, head, life)]
    marks += [Mark(0, _line_inside(rng, width, wrist, height), rng.uniform(0.012, 0.022), line_colour)
              for _ in range(rng.integers(1, 5))]  # minor lines
    for part, digit in enumerate(digits, start=1):
        for joint in (0.12, *digit.joints):
            for _ in range(rng.integers(1, 3)):
                v = joint + rng.uniform(-0.03, 0.03)
                marks.append(Mark(part, ((-0.42, v), (0.42, v + rng.uniform(-0.03, 0.03))),
                                  rng.uniform(0.012, 0.02), line_colour))
    return tuple(marks)


def _asymmetric_twin(hand: Hand, rng: np.random.Generator) -> Hand:
    """The other hand: the same person, each length and mark slightly off."""

    def nudge(points, amount):
        return tuple((x + rng.normal(0, amount), y + rng.normal(0, amount)) for x, y in points)

    def marks(group):
        return tuple(replace(m, points=nudge(m.points, 0.01 if m.part else 0.03)) for m in group)

    digits = tuple(replace(d, length=d.length * rng.uniform(0.97, 1.03), angle=d.angle + rng.normal(0, 1.5))
                   for d in hand.digits)
    return replace(hand, palm=nudge(hand.palm, 0.01), digits=digits,
                   dorsal_marks=marks(hand.dorsal_marks), palmar_marks=marks(hand.palmar_marks))


# ---------------------------------------------------------------- photos


def render_photo(person: Person, aspect: str, size: tuple[int, int], rng: np.random.Generator,
                 nuisance: bool = True, accessory: Optional[str] = None, style: str = "varied") -> Image.Image:
    """One RGB photo of ``person``'s hand; ``aspect`` is an 11k label such as ``"dorsal right"``.

    The finger pose always varies with ``rng``; the scene follows ``style`` ("varied" or "studio").
    With ``nuisance=False`` the scene is fixed (white background, centred, upright, even light,
    sharp), which shows what identity alone looks like. ``accessory``: None, "ring" or "watch".
    """
    view, side = aspect.split()
    hand = person.left if side == "left" else person.right
    palmar = view == "palmar"
    spread = rng.uniform(-0.4, 0.6)  # the whole hand opens or closes
    angles = tuple(d.angle * (1 + spread) + rng.uniform(-4, 4) for d in hand.digits)
    scene = (_random_scene(rng) if style == "varied" else _studio_scene(rng)) if nuisance else NEUTRAL_SCENE
    internal = _internal_size(size)
    image = _background(scene, internal, rng)
    fingertips = max(d.base[1] + d.length for d in hand.digits)
    to_pixels = _Projection(scene, internal, mirrored=(side == "left") != palmar, centre_height=fingertips / 2)
    _draw_hand(ImageDraw.Draw(image), hand, angles, palmar, scene, to_pixels, accessory, rng)
    return _light(_resize_and_blur(image, size, scene.blur), scene, rng)


def _random_scene(rng: np.random.Generator) -> Scene:
    # Strong enough that raw pixels and colour histograms match at about chance (tests/test_synth.py),
    # mild enough that a small network learns identities: vivid backgrounds and casts of ±22% halved
    # what a small CNN learned in 160 steps, while not being needed to defeat raw-pixel matching.
    first = _random_background_colour(rng)
    second = _jitter_colour(first, rng, 40)
    return Scene(
        rotation=rng.uniform(-20, 20), scale=rng.uniform(0.85, 1.15),
        shift=(rng.uniform(-0.12, 0.12), rng.uniform(-0.08, 0.08)), tilt=rng.uniform(0.9, 1.0),
        background=(first, second), background_angle=rng.uniform(0, 2 * math.pi), clutter=int(rng.integers(0, 3)),
        sleeve=tuple(int(c) for c in rng.integers(0, 256, size=3)) if rng.random() < 0.35 else None,
        sleeve_start=rng.uniform(0.3, 1.2), light=(rng.uniform(0.7, 1.0), rng.uniform(0.95, 1.2)),
        light_angle=rng.uniform(0, 2 * math.pi), cast=tuple(rng.uniform(0.85, 1.15, size=3)),
        blur=rng.uniform(0, 0.008), noise=rng.uniform(1, 7))


def _studio_scene(rng: np.random.Generator) -> Scene:
    """A studio photo: a plain light backdrop, the hand nearly upright and centred, no sleeve or
    clutter, even light, a faint cast; what still varies is the finger pose and the camera's small moves."""
    grey = rng.uniform(0.8, 1.0)
    backdrop = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.08), grey))
    return Scene(
        rotation=rng.uniform(-6, 6), scale=rng.uniform(0.95, 1.05),
        shift=(rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03)), tilt=rng.uniform(0.97, 1.0),
        background=(backdrop, _jitter_colour(backdrop, rng, 8)), background_angle=rng.uniform(0, 2 * math.pi),
        clutter=0, sleeve=None, sleeve_start=0.0, light=(rng.uniform(0.92, 1.0), rng.uniform(1.0, 1.05)),
        light_angle=rng.uniform(0, 2 * math.pi), cast=tuple(rng.uniform(0.97, 1.03, size=3)),
        blur=rng.uniform(0, 0.003), noise=rng.uniform(1, 3))


def _random_background_colour(rng) -> RGB:
    if rng.random() < 0.3:  # paper or a table top, like the 11k studio
        grey = rng.uniform(0.75, 1.0)
        hue, saturation, value = rng.uniform(0, 1), rng.uniform(0, 0.1), grey
    else:
        hue, saturation, value = rng.uniform(0, 1), rng.uniform(0, 0.35), rng.uniform(0.45, 1.0)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def _internal_size(size: tuple[int, int]) -> tuple[int, int]:
    factor = INTERNAL_SHORT_SIDE / min(size)
    return round(size[0] * factor), round(size[1] * factor)


def _background(scene: Scene, internal: tuple[int, int], rng) -> Image.Image:
    # A gradient is smooth: computing it on a small grid and resizing is exact enough and cheap.
    w, h = internal[0] // 16 + 2, internal[1] // 16 + 2
    x, y = np.meshgrid(np.linspace(-0.5, 0.5, w), np.linspace(-0.5, 0.5, h) * h / w)
    t = np.clip(0.5 + x * math.cos(scene.background_angle) + y * math.sin(scene.background_angle), 0, 1)[..., None]
    first, second = (np.asarray(c, np.float32) for c in scene.background)
    small = Image.fromarray(np.round(first * (1 - t) + second * t).astype(np.uint8))
    image = small.resize(internal, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(scene.clutter):
        x0, y0 = rng.uniform(-0.2, 1.0) * internal[0], rng.uniform(-0.2, 1.0) * internal[1]
        box = (x0, y0, x0 + rng.uniform(0.1, 0.4) * internal[0], y0 + rng.uniform(0.1, 0.4) * internal[1])
        colour = _mix(scene.background[0], tuple(int(c) for c in rng.integers(0, 256, size=3)), 0.35)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


class _Projection:
    """Hand units → pixel coordinates of the internal canvas (y down): mirrored for the left-looking
    views, scaled, tilted, rotated, with the point (0, ``centre_height``) at the shifted image centre."""

    def __init__(self, scene: Scene, internal: tuple[int, int], mirrored: bool, centre_height: float):
        self.unit = HAND_UNIT * min(internal) * scene.scale  # pixels per hand unit
        angle = math.radians(scene.rotation)
        self._rotation = (math.cos(angle), math.sin(angle))
        self._centre = (internal[0] * (0.5 + scene.shift[0]), internal[1] * (0.5 + scene.shift[1]))
        self._scale = ((-1.0 if mirrored else 1.0) * self.unit, -self.unit * scene.tilt)
        self._centre_height = centre_height

    def __call__(self, points) -> list[tuple[float, float]]:
        (cos, sin), (cx, cy), (sx, sy) = self._rotation, self._centre, self._scale
        out = []
        for x, y in points:
            x, y = x * sx, (y - self._centre_height) * sy
            out.append((cx + cos * x - sin * y, cy + sin * x + cos * y))
        return out


def _draw_hand(draw, hand: Hand, angles, palmar: bool, scene: Scene, to_pixels, accessory, rng) -> None:
    unit = to_pixels.unit
    skin = hand.palmar_skin if palmar else hand.skin
    edge = _mix(skin, (40, 25, 20), 0.35)
    forearm = ((-hand.wrist_width / 2, 0.2), (hand.wrist_width / 2, 0.2),
               (hand.wrist_width * 0.56, -4.0), (-hand.wrist_width * 0.56, -4.0))
    digit_outlines = [_digit_outline(d, a) for d, a in zip(hand.digits, angles)]
    outline_width = max(1, round(0.012 * unit))
    # The silhouette's edge first, then the digits (each edged, so touching fingers stay apart),
    # then palm and forearm on top of the digits' roots.
    for shape in (forearm, hand.palm, *digit_outlines):
        draw.polygon(to_pixels(shape), fill=edge, outline=edge, width=2 * outline_width)
    for shape in digit_outlines:
        draw.polygon(to_pixels(shape), fill=skin, outline=edge, width=outline_width)
    for shape in (forearm, hand.palm):
        draw.polygon(to_pixels(shape), fill=skin)
    for mark in hand.palmar_marks if palmar else hand.dorsal_marks:
        _draw_mark(draw, mark, hand.digits, angles, to_pixels)
    if not palmar:
        for digit, angle in zip(hand.digits, angles):
            nail = _on_digit(digit, angle, _nail_outline(digit))
            draw.polygon(to_pixels(nail), fill=hand.nail_colour, outline=_mix(hand.nail_colour, edge, 0.5))
    if scene.sleeve is not None:
        w = hand.wrist_width * 0.62
        draw.polygon(to_pixels(((-w, -scene.sleeve_start), (w, -scene.sleeve_start), (w, -5.0), (-w, -5.0))),
                     fill=scene.sleeve)
    if accessory == "ring":
        _draw_ring(draw, hand.digits, angles, to_pixels, rng)
    elif accessory == "watch":
        _draw_watch(draw, hand.wrist_width, palmar, to_pixels, rng)


def _digit_outline(digit: Digit, angle: float) -> list[tuple[float, float]]:
    """A tapered capsule along the digit, in hand units."""
    half_base, half_tip = digit.width / 2, digit.width * 0.42
    tip_centre = digit.length - half_tip
    arc = [(half_tip * math.cos(t), tip_centre + half_tip * math.sin(t)) for t in np.linspace(0, math.pi, 9)]
    local = [(half_base, 0.0), *arc, (-half_base, 0.0)]
    return [_rotate(digit, angle, x, y) for x, y in local]


def _nail_outline(digit: Digit) -> list[tuple[float, float]]:
    """A superellipse near the tip, in the digit's (u, v) fractions."""
    width, length, squareness = digit.nail
    centre = 1 - length / 2 - 0.02
    points = []
    for t in np.linspace(0, 2 * math.pi, 16, endpoint=False):
        c, s = math.cos(t), math.sin(t)
        points.append((width / 2 * math.copysign(abs(c) ** (2 / squareness), c),
                       centre + length / 2 * math.copysign(abs(s) ** (2 / squareness), s)))
    return points


def _rotate(digit: Digit, angle: float, x: float, y: float) -> tuple[float, float]:
    a = math.radians(angle)
    bx, by = digit.base
    return bx + x * math.cos(a) + y * math.sin(a), by - x * math.sin(a) + y * math.cos(a)


def _on_digit(digit: Digit, angle: float, points) -> list[tuple[float, float]]:
    """Digit (u, v) fractions → hand units, following the digit's taper and pose."""
    out = []
    for u, v in points:
        width = digit.width * (1 - 0.16 * v)
        out.append(_rotate(digit, angle, u * width, v * digit.length))
    return out


def _draw_mark(draw, mark: Mark, digits, angles, to_pixels) -> None:
    points = mark.points if mark.part == 0 else _on_digit(digits[mark.part - 1], angles[mark.part - 1], mark.points)
    pixels = to_pixels(points)
    size = mark.width * to_pixels.unit
    if len(pixels) == 1:
        (x, y), r = pixels[0], max(size, 0.75)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=mark.colour)
    else:
        draw.line(pixels, fill=mark.colour, width=max(1, round(size)), joint="curve")


def _draw_ring(draw, digits, angles, to_pixels, rng) -> None:
    part = int(rng.choice([2, 3, 3, 4]))  # ring finger most often
    digit, angle = digits[part], angles[part]
    low = (0.12 + 0.1) / digit.length  # just above where the finger leaves the palm
    high = low + 0.07 / digit.length
    band = ((-0.58, low), (0.58, low), (0.58, high), (-0.58, high))
    colour = RING_COLOURS[rng.integers(len(RING_COLOURS))]
    draw.polygon(to_pixels(_on_digit(digit, angle, band)), fill=colour, outline=_mix(colour, (0, 0, 0), 0.4))


def _draw_watch(draw, wrist_width: float, palmar: bool, to_pixels, rng) -> None:
    w, y = wrist_width * 0.6, -rng.uniform(0.15, 0.35)
    strap = STRAP_COLOURS[rng.integers(len(STRAP_COLOURS))]
    draw.polygon(to_pixels(((-w, y), (w, y), (w, y - 0.2), (-w, y - 0.2))), fill=strap)
    if palmar:
        buckle = ((-0.08, y + 0.01), (0.08, y + 0.01), (0.08, y - 0.21), (-0.08, y - 0.21))
        draw.polygon(to_pixels(buckle), outline=(190, 190, 195), width=max(1, round(0.02 * to_pixels.unit)))
    else:
        (cx, cy), = to_pixels(((0.0, y - 0.1),))
        r = 0.2 * to_pixels.unit
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(30, 32, 40), outline=(200, 200, 205),
                     width=max(1, round(0.03 * to_pixels.unit)))


def _resize_and_blur(image: Image.Image, size: tuple[int, int], blur: float) -> Image.Image:
    """Resize to ``size``; blur (radius = ``blur`` × width) at whichever resolution is smaller, for speed."""
    shrinking = size[0] < image.width
    if shrinking:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur * image.width))
    return image if shrinking else image.resize(size, Image.Resampling.BICUBIC)


def _light(image: Image.Image, scene: Scene, rng) -> Image.Image:
    """Light gradient, colour cast and sensor noise, at the output resolution."""
    pixels = np.array(image, dtype=np.float32)
    h, w = pixels.shape[:2]
    x = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    y = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * (h / w)
    t = np.clip(0.5 + x * math.cos(scene.light_angle) + y * math.sin(scene.light_angle), 0, 1)
    pixels *= (scene.light[0] + (scene.light[1] - scene.light[0]) * t)[..., None] * np.asarray(scene.cast, np.float32)
    pixels += rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(scene.noise)  # luminance noise
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- small helpers


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _jitter_colour(colour: RGB, rng, amount: int) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _bezier(p0, p1, p2, count: int = 12) -> tuple[tuple[float, float], ...]:
    t = np.linspace(0, 1, count)[:, None]
    points = (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t ** 2 * np.asarray(p2)
    return tuple((float(x), float(y)) for x, y in points)


def _wobbly_line(rng, start, end, count: int, wobble: float) -> tuple[tuple[float, float], ...]:
    t = np.linspace(0, 1, count)[:, None]
    points = (1 - t) * np.asarray(start) + t * np.asarray(end)
    points[1:-1] += rng.normal(0, wobble, size=(count - 2, 2))
    return tuple((float(x), float(y)) for x, y in points)
