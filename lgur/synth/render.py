"""Rendering of synthetic pedestrians, with per-pixel part labels.

A person is drawn from simple shapes on a supersampled canvas (for anti-aliasing),
every shape drawn twice: in colour on the picture and as its part id on a label
map. Shading, outlines and the camera (crop, light, blur, JPEG) come after.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .attributes import COLOURS, HAIR_COLOURS, SKIN_TONES, Attributes

# Part labels of the label maps.
PARTS = ["background", "hair/head", "skin", "upper", "lower", "shoes", "bag", "accessory"]
BACKGROUND, HAIR, SKIN, UPPER, LOWER, SHOES, BAG, ACCESSORY = range(len(PARTS))

IMAGE_SIZE = (256, 96)  # (height, width) of the stored images
SUPERSAMPLE = 3
FEET = 0.97  # the world's camera stands a person's feet at this height of the image


@dataclass(frozen=True)
class Camera:
    """What changes between two images of one person."""

    view: str  # "front" | "back" | "side"
    facing_right: bool  # side view only
    phase: float  # walking phase (radians)
    scale: float  # person height / image height
    shift_x: float  # horizontal offset, fraction of width
    scene: str  # "street" | "park" | "indoor" | "plaza"
    scene_seed: int
    brightness: float
    tint: tuple[float, float, float]
    light_from_left: bool
    blur: float  # Gaussian radius in output pixels
    jpeg_quality: int
    occluder: str  # "none" | "pole" | "low wall"
    occluder_pos: float
    crop: tuple[float, float, float, float]  # fractions cut from (top, bottom, left, right)
    shift_y: float = 0.0  # vertical offset of the person, fraction of height (positive: down)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Camera:
        return cls(**{**data, "tint": tuple(data["tint"]), "crop": tuple(data["crop"])})


def sample_camera(rng: np.random.Generator, view: str | None = None) -> Camera:
    view = view or str(rng.choice(["front", "back", "side"], p=[0.4, 0.35, 0.25]))
    occluder = str(rng.choice(["none", "pole", "low wall"], p=[0.82, 0.09, 0.09]))
    return Camera(
        view=view,
        facing_right=bool(rng.random() < 0.5),
        phase=float(rng.uniform(0, 2 * math.pi)),
        scale=float(rng.uniform(0.8, 0.94)),
        shift_x=float(rng.uniform(-0.06, 0.06)),
        scene=str(rng.choice(["street", "park", "indoor", "plaza"])),
        scene_seed=int(rng.integers(0, 2**31)),
        brightness=float(rng.uniform(0.65, 1.2)),
        tint=tuple(float(t) for t in rng.uniform(0.9, 1.1, size=3)),
        light_from_left=bool(rng.random() < 0.5),
        blur=float(rng.choice([0.0, rng.uniform(0.3, 1.3)], p=[0.5, 0.5])),
        jpeg_quality=int(rng.integers(35, 93)),
        occluder=occluder,
        occluder_pos=float(rng.uniform(0.15, 0.85)),
        crop=tuple(float(c) for c in rng.uniform(0, 0.06, size=4)),
    )


# A person detector's crops: the person 0.55-1.0 of the image height, off centre by up to 0.15 each
# way, so a part may lie anywhere and the head or the feet may be cut off.
DETECTOR_HEIGHT = (0.55, 1.0)
DETECTOR_OFFSET = 0.15


def detector_framing(camera: Camera, person_height: float, rng: np.random.Generator) -> Camera:
    """The same camera (view, pose, scene, light) with a person detector's framing (DETECTOR_HEIGHT,
    DETECTOR_OFFSET); person_height: the identity's Attributes.height."""
    height = float(rng.uniform(*DETECTOR_HEIGHT))
    centre = 0.5 + float(rng.uniform(-DETECTOR_OFFSET, DETECTOR_OFFSET))
    scale = height / person_height
    return replace(
        camera,
        scale=scale,
        shift_x=float(rng.uniform(-DETECTOR_OFFSET, DETECTOR_OFFSET)),
        shift_y=centre + height / 2 - FEET,  # the feet at the centre plus half the height
        crop=(0.0, 0.0, 0.0, 0.0),
    )


def placed(camera: Camera, person_height: float, height: float, centre: float) -> Camera:
    """The same camera with the person `height` of the image tall, centred at `centre` (0 top, 1 bottom),
    in plain sight (no occluder)."""
    return replace(camera, scale=height / person_height, shift_x=0.0, shift_y=centre + height / 2 - FEET,
                   crop=(0.0, 0.0, 0.0, 0.0), occluder="none")  # fmt: skip


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in rgb)


class Canvas:
    """Paints each shape on the picture and, with its part id, on the label map."""

    def __init__(self, height: int, width: int) -> None:
        self.image = Image.new("RGB", (width, height))
        self.labels = Image.new("L", (width, height), BACKGROUND)
        self._rgb, self._lab = ImageDraw.Draw(self.image), ImageDraw.Draw(self.labels)

    def polygon(self, points, colour, label: int) -> None:
        self._rgb.polygon(points, fill=colour)
        self._lab.polygon(points, fill=label)

    def ellipse(self, box, colour, label: int) -> None:
        self._rgb.ellipse(box, fill=colour)
        self._lab.ellipse(box, fill=label)

    def rectangle(self, box, colour, label: int) -> None:
        self._rgb.rectangle(box, fill=colour)
        self._lab.rectangle(box, fill=label)

    def capsule(self, p0, p1, width: float, colour, label: int) -> None:
        """A limb: a thick segment with round ends."""
        w = max(1, int(round(width)))
        for draw, fill in ((self._rgb, colour), (self._lab, label)):
            draw.line([p0, p1], fill=fill, width=w)
            for x, y in (p0, p1):
                draw.ellipse((x - w / 2, y - w / 2, x + w / 2, y + w / 2), fill=fill)

    def line(self, points, colour, label: int, width: float) -> None:
        w = max(1, int(round(width)))
        self._rgb.line(points, fill=colour, width=w, joint="curve")
        self._lab.line(points, fill=label, width=w, joint="curve")


# -- background ------------------------------------------------------------------------------


def _draw_scene(canvas: Canvas, scene: str, seed: int, h: int, w: int) -> None:
    rng = np.random.default_rng(seed)
    d = canvas._rgb  # the background is label 0 everywhere: picture only
    horizon = int(h * rng.uniform(0.45, 0.62))
    jitter = lambda base, s=18: tuple(int(np.clip(c + rng.integers(-s, s + 1), 0, 255)) for c in base)  # noqa: E731
    if scene == "indoor":
        d.rectangle((0, 0, w, horizon), fill=jitter((200, 190, 170), 30))
        for _ in range(3):  # shop windows / doors
            x0 = int(rng.uniform(-0.2, 0.9) * w)
            d.rectangle((x0, int(horizon * rng.uniform(0.1, 0.4)), x0 + int(w * rng.uniform(0.2, 0.5)), horizon),
                        fill=jitter((120, 140, 160), 40))  # fmt: skip
        d.rectangle((0, horizon, w, h), fill=jitter((170, 160, 150), 25))
        step = int(w * rng.uniform(0.15, 0.3))
        for y in range(horizon, h, step // 2):
            d.line([(0, y), (w, y)], fill=jitter((140, 130, 120)), width=2)
        return
    sky = (150, 185, 220) if scene != "plaza" else (190, 200, 210)
    d.rectangle((0, 0, w, horizon), fill=jitter(sky, 25))
    if scene == "park":
        for _ in range(int(rng.integers(2, 5))):
            x, r = rng.uniform(0, w), rng.uniform(0.2, 0.45) * w
            top = horizon - rng.uniform(1.0, 2.0) * r
            d.rectangle((x - r * 0.12, top + r, x + r * 0.12, horizon + 4), fill=jitter((90, 60, 40)))
            d.ellipse((x - r, top, x + r, top + 1.6 * r), fill=jitter((60, 120, 60), 30))
        d.rectangle((0, horizon, w, h), fill=jitter((110, 160, 80), 25))
        d.polygon([(w * 0.3, horizon), (w * 0.7, horizon), (w * 1.1, h), (-w * 0.1, h)], fill=jitter((190, 175, 150)))
        return
    if scene == "street":
        x = -rng.uniform(0, w * 0.3)
        while x < w:
            bw = rng.uniform(0.4, 0.9) * w
            top = horizon * rng.uniform(0.0, 0.5)
            colour = jitter((150, 130, 120), 60)
            d.rectangle((x, top, x + bw, horizon), fill=colour)
            for wy in np.arange(top + 10, horizon - 20, 40):
                for wx in np.arange(x + 8, x + bw - 20, 34):
                    d.rectangle((wx, wy, wx + 18, wy + 22), fill=_shade(colour, 0.55))
            x += bw
    else:  # plaza: pillars
        for _ in range(int(rng.integers(1, 4))):
            px = rng.uniform(0, w)
            d.rectangle((px, 0, px + w * 0.12, horizon), fill=jitter((200, 195, 185), 20))
    ground = jitter((150, 150, 150) if scene == "street" else (185, 175, 160), 25)
    d.rectangle((0, horizon, w, h), fill=ground)
    for y in np.arange(horizon, h, rng.uniform(25, 50)):
        d.line([(0, y), (w, y)], fill=_shade(ground, 0.88), width=2)


# -- the person ------------------------------------------------------------------------------


@dataclass
class _Body:
    """Key points of the body on the canvas (pixels)."""

    cx: float
    top: float
    u: float  # person height in pixels
    shoulder: float  # half-widths
    waist: float
    hip: float
    head_r: float

    def y(self, frac: float) -> float:
        return self.top + frac * self.u


def _colour(name: str) -> tuple[int, int, int]:
    return COLOURS[name]


def draw_person(canvas: Canvas, a: Attributes, cam: Camera, h: int, w: int) -> None:
    u = cam.scale * h * a.height
    female = a.gender == "female"
    width_scale = 0.62 if cam.view == "side" else 1.0  # the body is narrower in profile
    b = _Body(
        cx=w * (0.5 + cam.shift_x),
        top=h * (FEET + cam.shift_y) - u,
        u=u,
        shoulder=u * (0.100 if female else 0.118) * a.build * width_scale,
        waist=u * (0.072 if female else 0.085) * a.build * width_scale,
        hip=u * (0.092 if female else 0.088) * a.build * width_scale,
        head_r=u * (0.068 if a.age == "young" else 0.062),
    )
    skin = SKIN_TONES[a.skin_tone]
    top_c, bottom_c = _colour(a.top_colour), _colour(a.bottom_colour)
    side, front = cam.view == "side", cam.view == "front"
    facing = 1.0 if cam.facing_right else -1.0
    swing = math.sin(cam.phase)
    stoop = 0.03 * u if a.age == "elderly" else 0.0

    # Levels (fractions of height)
    y_neck, y_sh, y_waist, y_hip, y_knee, y_ankle = b.y(0.13), b.y(0.17), b.y(0.42), b.y(0.5), b.y(0.73), b.y(0.955)
    head_cx = b.cx + (facing * stoop if side else 0.0)
    head_cy = b.y(0.065) + stoop * 0.5

    # Backpack body behind the person (side view) is drawn first.
    if a.bag_type == "backpack" and side:
        bx = b.cx - facing * (b.waist + 0.05 * u)
        canvas.rectangle(
            (min(bx, bx - facing * 0.02 * u) - 0.04 * u, y_sh + 0.02 * u, max(bx, bx) + 0.04 * u, y_waist),
            _colour(a.bag_colour), BAG,
        )  # fmt: skip
    # Long hair falls behind the shoulders in front view.
    hair_c = HAIR_COLOURS.get(a.hair_colour, (0, 0, 0))
    if a.hair_style == "long" and front:
        canvas.polygon(
            [(head_cx - b.head_r * 1.15, head_cy), (head_cx + b.head_r * 1.15, head_cy),
             (head_cx + b.head_r * 1.35, b.y(0.26)), (head_cx - b.head_r * 1.35, b.y(0.26))],
            hair_c, HAIR,
        )  # fmt: skip

    # Legs
    leg_w = 0.058 * u * a.build
    if side:
        stride = 0.16 * u * swing
        feet = [(b.cx + stride, y_ankle), (b.cx - stride, y_ankle)]
        hips = [(b.cx, y_hip), (b.cx, y_hip)]
    else:
        spread = b.hip * 0.5
        lift = 0.02 * u
        feet = [
            (b.cx - spread * 1.1, y_ankle - lift * max(0, swing)),
            (b.cx + spread * 1.1, y_ankle - lift * max(0, -swing)),
        ]
        hips = [(b.cx - spread, y_hip), (b.cx + spread, y_hip)]
    knees = [((hx + fx) / 2, y_knee - (fy - y_ankle) * 0.5) for (hx, _), (fx, fy) in zip(hips, feet)]
    bottom_len = {"trousers": 1.0, "jeans": 1.0, "shorts": 0.42, "skirt": 0.0}[a.bottom_type]
    for (hx, hy), (kx, ky), (fx, fy) in zip(hips, knees, feet):
        canvas.capsule((hx, hy), (kx, ky), leg_w, skin, SKIN)
        canvas.capsule((kx, ky), (fx, fy), leg_w * 0.85, skin, SKIN)
        if bottom_len >= 1.0:
            canvas.capsule((hx, hy), (kx, ky), leg_w * 1.12, bottom_c, LOWER)
            canvas.capsule((kx, ky), (fx, fy - 0.01 * u), leg_w * 0.98, bottom_c, LOWER)
        elif bottom_len > 0:
            ex, ey = hx + (kx - hx) * 0.85, hy + (ky - hy) * 0.85
            canvas.capsule((hx, hy), (ex, ey), leg_w * 1.2, bottom_c, LOWER)
        # Shoes
        shoe_c = _colour(a.shoe_colour)
        sw, sh = 0.05 * u, 0.028 * u
        if a.shoe_type == "boots":
            canvas.capsule((fx, fy - 0.07 * u), (fx, fy), leg_w * 1.08, shoe_c, SHOES)  # boots cover the hem
        if side:
            box = (fx - sw * (0.6 if facing > 0 else 1.4), fy - sh, fx + sw * (1.4 if facing > 0 else 0.6), fy + sh)
        else:
            box = (fx - sw * 0.75, fy - sh, fx + sw * 0.75, fy + sh)
        if a.shoe_type == "sandals":
            canvas.ellipse(box, skin, SKIN)
            canvas.rectangle((box[0], fy - sh * 0.2, box[2], fy + sh * 0.4), shoe_c, SHOES)
        else:
            canvas.ellipse(box, shoe_c, SHOES)
    if a.bottom_type == "skirt":
        canvas.polygon(
            [(b.cx - b.waist, y_waist), (b.cx + b.waist, y_waist),
             (b.cx + b.hip * 1.45, b.y(0.68)), (b.cx - b.hip * 1.45, b.y(0.68))],
            bottom_c, LOWER,
        )  # fmt: skip
    else:  # hips and seat
        canvas.polygon(
            [(b.cx - b.waist, y_waist), (b.cx + b.waist, y_waist), (b.cx + b.hip, y_hip + 0.03 * u),
             (b.cx - b.hip, y_hip + 0.03 * u)],
            bottom_c, LOWER,
        )  # fmt: skip

    # Arms (the far arm first in side view, hidden behind the torso)
    arm_w = 0.042 * u * a.build
    hands = _draw_arms(canvas, a, b, cam, y_sh, arm_w, skin, top_c, facing, swing, behind=True)

    # Torso
    coat = a.top_type == "coat"
    y_top_end = b.y(0.66) if coat else y_hip + 0.01 * u
    canvas.polygon(
        [(b.cx - b.shoulder, y_sh), (b.cx + b.shoulder, y_sh), (b.cx + b.waist * 1.05, y_waist),
         (b.cx + b.hip * (1.25 if coat else 1.02), y_top_end), (b.cx - b.hip * (1.25 if coat else 1.02), y_top_end),
         (b.cx - b.waist * 1.05, y_waist)],
        top_c, UPPER,
    )  # fmt: skip
    canvas.capsule((b.cx - b.shoulder * 0.8, y_sh + 0.01 * u), (b.cx + b.shoulder * 0.8, y_sh + 0.01 * u),
                   0.05 * u, top_c, UPPER)  # fmt: skip
    _draw_top_details(canvas, a, b, cam, y_sh, y_waist, y_top_end, top_c)

    # Neck and head
    canvas.capsule((head_cx, head_cy), (b.cx, y_neck + 0.02 * u), b.head_r * 0.75, skin, SKIN)
    if a.top_type == "hoodie" and not front:
        canvas.ellipse((b.cx - b.shoulder * 0.7, y_sh - 0.05 * u, b.cx + b.shoulder * 0.7, y_sh + 0.07 * u),
                       _shade(top_c, 0.85), UPPER)  # fmt: skip
    hr = b.head_r
    canvas.ellipse((head_cx - hr * 0.88, head_cy - hr, head_cx + hr * 0.88, head_cy + hr * 1.05), skin, SKIN)
    _draw_hair_and_face(canvas, a, cam, head_cx, head_cy, hr, facing, hair_c, b)

    # Bags in front of the body
    _draw_bag(canvas, a, b, cam, y_sh, y_waist, y_hip, facing, hands)
    # The near arm, then what the hands carry
    hands = _draw_arms(canvas, a, b, cam, y_sh, arm_w, skin, top_c, facing, swing, behind=False) or hands
    _draw_carried(canvas, a, b, cam, hands, facing)


def _draw_arms(canvas, a, b, cam, y_sh, arm_w, skin, top_c, facing, swing, behind: bool):
    """Draws the arms for this pass; returns hand positions [(x, y), ...] drawn so far."""
    u = b.u
    hands = []
    if cam.view == "side":
        arms = [(-1.0, True), (1.0, False)]  # (swing sign, is far arm)
        sx = [b.cx, b.cx]
    else:
        arms = [(-1.0, None), (1.0, None)]
        sx = [b.cx - b.shoulder * 0.92, b.cx + b.shoulder * 0.92]
    for (sign, far), x0 in zip(arms, sx):
        if cam.view == "side" and far != behind:
            continue
        if cam.view != "side" and behind:
            continue
        if cam.view == "side":
            angle = 0.45 * swing * sign * facing
            elbow = (x0 + math.sin(angle) * 0.17 * u, y_sh + 0.02 * u + math.cos(angle) * 0.17 * u)
            fore = angle + 0.25 * facing
            hand = (elbow[0] + math.sin(fore) * 0.16 * u, elbow[1] + math.cos(fore) * 0.16 * u)
        else:
            out = sign * (0.10 + 0.03 * swing * sign)
            elbow = (x0 + math.sin(out) * 0.17 * u, y_sh + 0.02 * u + 0.17 * u)
            hand = (elbow[0] + math.sin(out * 0.6) * 0.15 * u, elbow[1] + 0.15 * u * (0.97 + 0.03 * swing * sign))
        shoulder = (x0, y_sh + 0.025 * u)
        sleeve_end = 0.5 if a.sleeves == "short" else 1.0
        canvas.capsule(shoulder, elbow, arm_w, skin, SKIN)
        canvas.capsule(elbow, hand, arm_w * 0.9, skin, SKIN)
        if sleeve_end >= 1.0:
            canvas.capsule(shoulder, elbow, arm_w * 1.15, top_c, UPPER)
            canvas.capsule(elbow, (hand[0] - (hand[0] - elbow[0]) * 0.12, hand[1] - (hand[1] - elbow[1]) * 0.12),
                           arm_w * 1.05, top_c, UPPER)  # fmt: skip
        else:
            mid = ((shoulder[0] + elbow[0]) / 2, (shoulder[1] + elbow[1]) / 2)
            canvas.capsule(shoulder, mid, arm_w * 1.3, top_c, UPPER)
        r = arm_w * 0.62
        canvas.ellipse((hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r * 1.2), skin, SKIN)
        hands.append(hand)
    return hands


def _draw_top_details(canvas, a, b, cam, y_sh, y_waist, y_end, top_c) -> None:
    u = b.u
    dark, light = _shade(top_c, 0.6), _shade(top_c, 1.35) if sum(top_c) < 500 else _shade(top_c, 0.8)
    x0, x1 = b.cx - b.shoulder, b.cx + b.shoulder
    if a.top_pattern == "striped":
        for y in np.arange(y_sh + 0.03 * u, y_end - 0.01 * u, 0.035 * u):
            canvas.line([(x0 + 0.02 * u, y), (x1 - 0.02 * u, y)], light, UPPER, 0.012 * u)
    elif a.top_pattern == "checked":
        for y in np.arange(y_sh + 0.02 * u, y_end, 0.04 * u):
            canvas.line([(x0 + 0.02 * u, y), (x1 - 0.02 * u, y)], dark, UPPER, 0.008 * u)
        for x in np.arange(x0 + 0.03 * u, x1 - 0.01 * u, 0.04 * u):
            canvas.line([(x, y_sh + 0.02 * u), (x, y_end - 0.01 * u)], dark, UPPER, 0.008 * u)
    elif a.top_pattern == "logo" and cam.view == "front":
        r = 0.03 * u
        canvas.ellipse((b.cx - r, y_sh + 0.07 * u, b.cx + r, y_sh + 0.07 * u + 2 * r), light, UPPER)
    if cam.view == "front":
        if a.top_type in ("jacket", "coat"):  # open front shows the shirt beneath
            inner = (235, 235, 230) if sum(top_c) < 450 else (40, 40, 45)
            canvas.polygon([(b.cx - 0.02 * u, y_sh), (b.cx + 0.02 * u, y_sh), (b.cx + 0.015 * u, y_waist),
                            (b.cx - 0.015 * u, y_waist)], inner, UPPER)  # fmt: skip
            canvas.line([(b.cx, y_waist), (b.cx, y_end)], dark, UPPER, 0.006 * u)
        elif a.top_type == "shirt":
            canvas.polygon([(b.cx - 0.035 * u, y_sh - 0.005 * u), (b.cx, y_sh + 0.04 * u),
                            (b.cx + 0.035 * u, y_sh - 0.005 * u)], light, UPPER)  # fmt: skip
            for y in np.arange(y_sh + 0.06 * u, y_end - 0.02 * u, 0.05 * u):
                canvas.ellipse((b.cx - 0.005 * u, y, b.cx + 0.005 * u, y + 0.01 * u), dark, UPPER)
        elif a.top_type == "hoodie":
            canvas.line([(b.cx - 0.02 * u, y_sh), (b.cx - 0.025 * u, y_sh + 0.07 * u)], light, UPPER, 0.006 * u)
            canvas.line([(b.cx + 0.02 * u, y_sh), (b.cx + 0.025 * u, y_sh + 0.07 * u)], light, UPPER, 0.006 * u)
            canvas.rectangle((b.cx - 0.06 * u, y_waist - 0.01 * u, b.cx + 0.06 * u, y_waist + 0.04 * u),
                             _shade(top_c, 0.85), UPPER)  # fmt: skip
        elif a.top_type == "sweater":
            canvas.line([(x0 + 0.02 * u, y_end - 0.012 * u), (x1 - 0.02 * u, y_end - 0.012 * u)], dark, UPPER,
                        0.015 * u)  # fmt: skip


def _draw_hair_and_face(canvas, a, cam, cx, cy, r, facing, hair_c, b) -> None:
    style, view = a.hair_style, cam.view
    if style != "bald":
        if view == "back":
            bottom = cy + r * (0.7 if style in ("short", "bun", "ponytail") else 0.0)
            canvas.ellipse((cx - r * 0.95, cy - r * 1.08, cx + r * 0.95, bottom + r * 0.5), hair_c, HAIR)
            if style == "long":
                canvas.polygon([(cx - r * 1.0, cy), (cx + r * 1.0, cy), (cx + r * 1.25, b.y(0.29)),
                                (cx - r * 1.25, b.y(0.29))], hair_c, HAIR)  # fmt: skip
        else:
            canvas.ellipse((cx - r * 0.95, cy - r * 1.1, cx + r * 0.95, cy + r * 0.1), hair_c, HAIR)
            if view == "side":
                canvas.ellipse((cx - facing * r * 0.9 - r * 0.5, cy - r * 0.8, cx - facing * r * 0.9 + r * 0.5,
                                cy + r * 0.5), hair_c, HAIR)  # fmt: skip
                if style == "long":
                    canvas.polygon([(cx - facing * r * 0.2, cy - r * 0.3), (cx - facing * r * 1.0, cy - r * 0.2),
                                    (cx - facing * r * 1.2, b.y(0.27)), (cx - facing * r * 0.3, b.y(0.25))],
                                   hair_c, HAIR)  # fmt: skip
        if style == "ponytail" and view != "front":
            px = cx - facing * r * 1.05 if view == "side" else cx
            canvas.capsule((px, cy - r * 0.2), (px - (facing * r * 0.3 if view == "side" else 0), cy + r * 1.9),
                           r * 0.45, hair_c, HAIR)  # fmt: skip
        if style == "bun":
            bx = cx - facing * r * 0.9 if view == "side" else cx
            by = cy - r * (0.9 if view != "back" else 0.2)
            canvas.ellipse((bx - r * 0.42, by - r * 0.42, bx + r * 0.42, by + r * 0.42), hair_c, HAIR)
    if view != "back":  # face
        eye = max(1.5, r * 0.12)
        ey = cy + r * 0.05
        eye_xs = [cx - r * 0.35, cx + r * 0.35] if view == "front" else [cx + facing * r * 0.5]
        for ex in eye_xs:
            canvas.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), (40, 30, 30), SKIN)
        mx = cx if view == "front" else cx + facing * r * 0.55
        canvas.line([(mx - r * 0.18, cy + r * 0.5), (mx + r * 0.18, cy + r * 0.5)], (150, 70, 70), SKIN, r * 0.08)
        if view == "side":
            canvas.polygon([(cx + facing * r * 0.85, cy), (cx + facing * r * 1.05, cy + r * 0.3),
                            (cx + facing * r * 0.85, cy + r * 0.35)], SKIN_TONES[a.skin_tone], SKIN)  # fmt: skip
        if a.glasses != "none":
            lens = (20, 20, 24) if a.glasses == "sunglasses" else None
            frame = (20, 20, 24)
            lr = r * 0.24
            for ex in eye_xs:
                box = (ex - lr, ey - lr * 0.8, ex + lr, ey + lr * 0.8)
                if lens:
                    canvas.ellipse(box, lens, ACCESSORY)
                else:
                    canvas._rgb.ellipse(box, outline=frame, width=max(1, int(r * 0.07)))
                    canvas._lab.ellipse(box, outline=ACCESSORY, width=max(1, int(r * 0.07)))
            if view == "front":
                canvas.line([(cx - r * 0.12, ey), (cx + r * 0.12, ey)], frame, ACCESSORY, r * 0.06)
            else:
                canvas.line([(cx + facing * r * 0.3, ey), (cx - facing * r * 0.4, ey - r * 0.05)], frame, ACCESSORY,
                            r * 0.06)  # fmt: skip
    hw = a.headwear
    if hw != "none":
        c = _colour(a.headwear_colour)
        dome = (cx - r * 1.0, cy - r * 1.2, cx + r * 1.0, cy + r * (0.2 if hw == "beanie" else 0.0))
        canvas.rectangle((dome[0], cy - r * 0.5, dome[2], dome[3] - r * 0.45), c, HAIR)
        canvas.ellipse(dome, c, HAIR)
        if hw == "hat":
            canvas.ellipse((cx - r * 1.6, cy - r * 0.45, cx + r * 1.6, cy - r * 0.05), _shade(c, 0.85), HAIR)
        elif hw == "cap" and view != "back":
            if view == "front":
                canvas.ellipse((cx - r * 0.9, cy - r * 0.55, cx + r * 0.9, cy - r * 0.2), _shade(c, 0.8), HAIR)
            else:
                canvas.polygon([(cx, cy - r * 0.5), (cx + facing * r * 1.6, cy - r * 0.35),
                                (cx + facing * r * 1.5, cy - r * 0.2), (cx, cy - r * 0.25)],
                               _shade(c, 0.8), HAIR)  # fmt: skip


def _draw_bag(canvas, a, b, cam, y_sh, y_waist, y_hip, facing, hands) -> None:
    if a.bag_type == "none":
        return
    u = b.u
    c = _colour(a.bag_colour)
    strap = _shade(c, 0.75)
    if a.bag_type == "backpack":
        if cam.view == "back":
            canvas.rectangle((b.cx - b.shoulder * 0.75, y_sh + 0.02 * u, b.cx + b.shoulder * 0.75, y_waist + 0.02 * u),
                             c, BAG)  # fmt: skip
            canvas.ellipse(
                (b.cx - b.shoulder * 0.75, y_sh - 0.01 * u, b.cx + b.shoulder * 0.75, y_sh + 0.08 * u), c, BAG
            )
            canvas.rectangle((b.cx - b.shoulder * 0.45, y_waist - 0.08 * u, b.cx + b.shoulder * 0.45, y_waist),
                             strap, BAG)  # fmt: skip
        elif cam.view == "front":
            for s in (-1, 1):
                x = b.cx + s * b.shoulder * 0.55
                canvas.line([(x, y_sh), (x + s * 0.01 * u, y_waist - 0.04 * u)], strap, BAG, 0.022 * u)
        else:
            canvas.line([(b.cx, y_sh + 0.01 * u), (b.cx + facing * 0.01 * u, y_waist - 0.04 * u)], strap, BAG, 0.02 * u)
    elif a.bag_type == "shoulder bag":
        side = -1.0 if cam.view != "side" else -facing
        if cam.view != "side":
            canvas.line([(b.cx + b.shoulder * 0.7, y_sh), (b.cx - b.waist * 1.1, y_hip - 0.02 * u)], strap, BAG,
                        0.014 * u)  # fmt: skip
        bx = b.cx + side * (b.hip * 1.05)
        canvas.rectangle((bx - 0.05 * u, y_hip - 0.05 * u, bx + 0.05 * u, y_hip + 0.04 * u), c, BAG)
    elif a.bag_type == "handbag" and hands:
        hx, hy = hands[0]
        canvas.line([(hx - 0.02 * u, hy + 0.03 * u), (hx, hy - 0.005 * u), (hx + 0.02 * u, hy + 0.03 * u)], strap,
                    BAG, 0.008 * u)  # fmt: skip
        canvas.polygon([(hx - 0.045 * u, hy + 0.03 * u), (hx + 0.045 * u, hy + 0.03 * u),
                        (hx + 0.055 * u, hy + 0.1 * u), (hx - 0.055 * u, hy + 0.1 * u)], c, BAG)  # fmt: skip


def _draw_carried(canvas, a, b, cam, hands, facing) -> None:
    if a.carried_object == "none" or not hands:
        return
    u = b.u
    hx, hy = hands[-1]
    if a.carried_object == "umbrella":
        tip = (hx + facing * 0.05 * u if cam.view == "side" else hx + 0.04 * u, b.y(0.99))
        canvas.line([(hx, hy - 0.04 * u), tip], (30, 30, 40), ACCESSORY, 0.03 * u)
        canvas.line([(hx, hy - 0.04 * u), (hx - 0.02 * u, hy - 0.06 * u)], (90, 60, 40), ACCESSORY, 0.012 * u)
    elif a.carried_object == "phone":
        canvas.rectangle((hx - 0.015 * u, hy - 0.045 * u, hx + 0.015 * u, hy + 0.005 * u), (25, 25, 30), ACCESSORY)
    elif a.carried_object == "bottle":
        canvas.rectangle((hx - 0.014 * u, hy - 0.05 * u, hx + 0.014 * u, hy + 0.04 * u), (120, 180, 220), ACCESSORY)
        canvas.rectangle((hx - 0.008 * u, hy - 0.065 * u, hx + 0.008 * u, hy - 0.05 * u), (240, 240, 240), ACCESSORY)


# -- finishing: shading, occluders, camera -------------------------------------------------


def _shade_and_outline(canvas: Canvas, cam: Camera, cx: float, half_width: float) -> None:
    rgb = np.asarray(canvas.image, dtype=np.float32)
    lab = np.asarray(canvas.labels)
    person = lab != BACKGROUND
    h, w = lab.shape
    xs = (np.arange(w, dtype=np.float32) - cx) / max(half_width, 1.0)
    direction = -1.0 if cam.light_from_left else 1.0
    light = 1.0 + 0.22 * np.clip(direction * xs, -1.5, 1.5) / 1.5  # brighter on the lit side
    vertical = 1.05 - 0.12 * np.linspace(0, 1, h, dtype=np.float32)[:, None]
    factor = np.where(person, light[None, :] * vertical, 1.0)
    # Dark outlines where parts meet (and around the person), as a draughtsman would.
    edge = np.zeros_like(person)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge &= person
    factor = np.where(edge, factor * 0.7, factor)
    canvas.image = Image.fromarray(np.clip(rgb * factor[..., None], 0, 255).astype(np.uint8))


def _draw_occluder(canvas: Canvas, cam: Camera, h: int, w: int) -> None:
    draw_rgb = ImageDraw.Draw(canvas.image)
    draw_lab = ImageDraw.Draw(canvas.labels)
    rng = np.random.default_rng(cam.scene_seed + 1)
    colour = tuple(int(c) for c in rng.integers(40, 200, size=3))
    if cam.occluder == "pole":
        x = cam.occluder_pos * w
        box = (x - 0.05 * w, 0, x + 0.05 * w, h)
    else:  # a low wall or bench in front of the legs
        box = (0, h * (0.78 + 0.1 * cam.occluder_pos), w, h)
    draw_rgb.rectangle(box, fill=colour)
    draw_lab.rectangle(box, fill=BACKGROUND)


@dataclass
class Rendering:
    image: Image.Image  # RGB, IMAGE_SIZE, before JPEG compression
    labels: Image.Image  # L, part ids per pixel (the part at each pixel's centre)
    fine_labels: Image.Image | None = None  # L, at drawing resolution (SUPERSAMPLE x), undegraded renders only


def render(a: Attributes, cam: Camera, size: tuple[int, int] = IMAGE_SIZE, degrade: bool = True) -> Rendering:
    """Draw one image of a person. degrade=False skips light, blur and crop (for tests)."""
    h, w = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    canvas = Canvas(h, w)
    _draw_scene(canvas, cam.scene, cam.scene_seed, h, w)
    draw_person(canvas, a, cam, h, w)
    u = cam.scale * h * a.height
    _shade_and_outline(canvas, cam, w * (0.5 + cam.shift_x), u * 0.12)
    if cam.occluder != "none":
        _draw_occluder(canvas, cam, h, w)
    image, labels = canvas.image, canvas.labels
    fine = None if degrade else labels
    if degrade:
        top, bottom, left, right = cam.crop
        box = (int(left * w), int(top * h), int(w - right * w), int(h - bottom * h))
        image, labels = image.crop(box), labels.crop(box)
    image = image.resize((size[1], size[0]), Image.Resampling.BOX)  # supersampling: block means
    labels = labels.resize((size[1], size[0]), Image.Resampling.NEAREST)
    if degrade:
        arr = np.asarray(image, dtype=np.float32) * cam.brightness * np.asarray(cam.tint, dtype=np.float32)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if cam.blur > 0:
            image = image.filter(ImageFilter.GaussianBlur(cam.blur))
    return Rendering(image, labels, fine)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
