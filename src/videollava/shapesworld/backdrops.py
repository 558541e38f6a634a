"""ShapesWorld backdrops: what lies behind the objects, and how far a colour is from it.

A `Backdrop` is fully described by a few numbers (style, anchor colours, seed), so a scene can be
drawn again from its JSON alone, like everything else in the world. Colour distances are
CIEDE2000 (ΔE00) in CIELAB under D65, the perceptual distance the contrast rule of `render`
is stated in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from videollava.errors import VideoLlavaError

RGB = tuple[int, int, int]

# flat: one colour; noise: grey with per-pixel grey noise (the standard world's noisy grey);
# linear / radial: a colour gradient across the frame or out from a point; texture: a soft,
# smooth random mix of two colours; coarse: blocks of a few pixels, each its own colour near a base.
BACKDROP_STYLES: tuple[str, ...] = ("flat", "noise", "linear", "radial", "texture", "coarse")
_ANCHORS = {"flat": 1, "noise": 1, "linear": 2, "radial": 2, "texture": 2, "coarse": 1}

# sRGB (D65) -> XYZ, and the D65 white point
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])
_LEVELS = np.arange(256, dtype=np.float64) / 255.0
_LINEAR = np.where(_LEVELS <= 0.04045, _LEVELS / 12.92, ((_LEVELS + 0.055) / 1.055) ** 2.4)


def srgb_to_lab(rgb: Any) -> np.ndarray:
    """CIELAB (D65) of 8-bit sRGB colours: (..., 3) integers in 0..255 -> (..., 3) floats."""
    values = np.asarray(rgb)
    if values.shape[-1:] != (3,):
        raise VideoLlavaError(f"sRGB colours need a last axis of 3, got shape {values.shape}")
    linear = _LINEAR[np.clip(values, 0, 255).astype(np.intp)]
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


def delta_e2000(lab1: Any, lab2: Any) -> np.ndarray:
    """CIEDE2000 colour difference between CIELAB colours (broadcast over leading axes).

    Follows Sharma, Wu and Dalal (2005), "The CIEDE2000 color-difference formula: implementation
    notes", with kL = kC = kH = 1; the tests check it against their published pairs.
    """
    a_lab, b_lab = np.broadcast_arrays(np.asarray(lab1, dtype=np.float64), np.asarray(lab2, dtype=np.float64))
    l1, a1, b1 = np.moveaxis(a_lab, -1, 0)
    l2, a2, b2 = np.moveaxis(b_lab, -1, 0)
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    achromatic = c1p * c2p == 0
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(achromatic, 0.0, dh)
    d_l, d_c = l2 - l1, c2p - c1p
    d_h = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    l_bar, cp_bar, h_sum = (l1 + l2) / 2, (c1p + c2p) / 2, h1p + h2p
    h_bar = np.where(
        np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)
    )
    h_bar = np.where(achromatic, h_sum, h_bar)
    t = (
        1
        - 0.17 * np.cos(np.radians(h_bar - 30))
        + 0.24 * np.cos(np.radians(2 * h_bar))
        + 0.32 * np.cos(np.radians(3 * h_bar + 6))
        - 0.20 * np.cos(np.radians(4 * h_bar - 63))
    )
    d_theta = 30 * np.exp(-(((h_bar - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)
    s_c = 1 + 0.045 * cp_bar
    s_h = 1 + 0.015 * cp_bar * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    terms = (d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h)
    return np.sqrt(np.maximum(terms, 0.0))


@dataclass(frozen=True)
class Backdrop:
    """A background drawn from a few numbers: style, anchor colours and the style's parameters.

    ``amplitude``: the grey noise (noise) or the per-channel colour noise (coarse), in levels;
    ``scale``: the texture's cell or the coarse blocks' side, in pixels; ``angle``: the linear
    gradient's direction, first colour to second, in degrees (0 = left to right, 90 = top to
    bottom); ``center``: the radial gradient's centre as fractions of width and height; ``seed``:
    the random field of noise, texture and coarse styles.
    """

    style: str
    colors: tuple[RGB, ...]
    amplitude: int = 0
    scale: int = 0
    angle: float = 0.0
    center: tuple[float, float] = (0.5, 0.5)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.style not in BACKDROP_STYLES:
            raise VideoLlavaError(f"backdrop style must be one of {BACKDROP_STYLES}, not {self.style!r}")
        if len(self.colors) != _ANCHORS[self.style]:
            raise VideoLlavaError(
                f"a {self.style} backdrop takes {_ANCHORS[self.style]} colour(s), got {len(self.colors)}"
            )
        if self.style in ("texture", "coarse") and self.scale < 1:
            raise VideoLlavaError(f"a {self.style} backdrop needs a scale of at least 1 pixel")

    def pixels(self, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8: the backdrop at this size, the same every time."""
        rng = np.random.default_rng(self.seed)
        first = np.array(self.colors[0], dtype=np.float64)
        if self.style == "flat":
            out = np.broadcast_to(first, (height, width, 3))
        elif self.style == "noise":
            grey = rng.integers(-self.amplitude, self.amplitude + 1, size=(height, width))
            out = first + grey[:, :, None]
        elif self.style == "coarse":
            rows, cols = -(-height // self.scale), -(-width // self.scale)
            blocks = rng.integers(-self.amplitude, self.amplitude + 1, size=(rows, cols, 3))
            # (rows, cols, 3) -> (rows*scale, cols*scale, 3), cut to the frame
            blocks = np.repeat(np.repeat(blocks, self.scale, axis=0), self.scale, axis=1)
            out = first + blocks[:height, :width]
        else:
            out = self._mix(first, np.array(self.colors[1], dtype=np.float64), width, height, rng)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def _mix(
        self, first: np.ndarray, second: np.ndarray, width: int, height: int, rng: np.random.Generator
    ) -> np.ndarray:
        x = np.arange(width, dtype=np.float64)[None, :] + 0.5
        y = np.arange(height, dtype=np.float64)[:, None] + 0.5
        if self.style == "linear":
            ux, uy = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
            along = (x - width / 2) * ux + (y - height / 2) * uy
            reach = abs(width / 2 * ux) + abs(height / 2 * uy)
            weight = (along / reach + 1) / 2 if reach > 0 else np.zeros_like(along)
        elif self.style == "radial":
            cx, cy = self.center[0] * width, self.center[1] * height
            reach = max(math.hypot(px - cx, py - cy) for px in (0, width) for py in (0, height))
            weight = np.hypot(x - cx, y - cy) / reach
        else:  # texture: two octaves of smoothly interpolated random values
            weight = 0.7 * _smooth_field(rng, width, height, self.scale)
            weight += 0.3 * _smooth_field(rng, width, height, max(2, self.scale // 2))
        weight = np.broadcast_to(np.clip(weight, 0.0, 1.0), (height, width))[:, :, None]
        return first + (second - first) * weight

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"style": self.style, "colors": [list(c) for c in self.colors]}
        if self.style in ("noise", "coarse"):
            data["amplitude"] = self.amplitude
        if self.style in ("texture", "coarse"):
            data["scale"] = self.scale
        if self.style == "linear":
            data["angle"] = self.angle
        if self.style == "radial":
            data["center"] = list(self.center)
        if self.style in ("noise", "texture", "coarse"):
            data["seed"] = self.seed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Backdrop:
        return cls(
            style=data["style"],
            colors=tuple((int(c[0]), int(c[1]), int(c[2])) for c in data["colors"]),
            amplitude=int(data.get("amplitude", 0)),
            scale=int(data.get("scale", 0)),
            angle=float(data.get("angle", 0.0)),
            center=(float(data.get("center", (0.5, 0.5))[0]), float(data.get("center", (0.5, 0.5))[1])),
            seed=int(data.get("seed", 0)),
        )

    def signature(self) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in self.to_dict().items()))


def _smooth_field(rng: np.random.Generator, width: int, height: int, cell: int) -> np.ndarray:
    """Values in [0, 1] on a grid every ``cell`` pixels, smoothstep-interpolated between: soft blobs."""
    rows, cols = height // cell + 2, width // cell + 2
    grid = rng.random((rows, cols))
    gy = (np.arange(height, dtype=np.float64) + 0.5) / cell
    gx = (np.arange(width, dtype=np.float64) + 0.5) / cell
    iy, ix = np.floor(gy).astype(int), np.floor(gx).astype(int)
    fy, fx = gy - iy, gx - ix
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    top = grid[iy][:, ix] * (1 - fx) + grid[iy][:, ix + 1] * fx
    bottom = grid[iy + 1][:, ix] * (1 - fx) + grid[iy + 1][:, ix + 1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def _tinted(rng: np.random.Generator, level: float, tint: int) -> RGB:
    offset = rng.integers(-tint, tint + 1, size=3) if tint else np.zeros(3, dtype=int)
    rgb = np.clip(np.rint(level + offset), 0, 255).astype(int)
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def random_backdrop(
    rng: np.random.Generator,
    style: str,
    *,
    tint: int,
    levels: tuple[int, int],
    noise: tuple[int, int],
) -> Backdrop:
    """A backdrop of ``style``: anchor colours are greys in ``levels`` moved by up to ``tint`` per channel.

    Muted anchors (greys with a tint) keep the backdrop's chroma low, so it can hold colour and
    still sit far from the saturated colours of the objects; the contrast rule checks each scene.
    """
    lo, hi = levels
    seed = int(rng.integers(0, 2**31 - 1))
    if style == "flat":
        return Backdrop("flat", (_tinted(rng, rng.integers(lo, hi + 1), tint),))
    if style == "noise":
        level = int(rng.integers(lo, hi + 1))
        amplitude = int(rng.integers(noise[0], noise[1] + 1))
        return Backdrop("noise", ((level, level, level),), amplitude=amplitude, seed=seed)
    if style == "coarse":
        base = _tinted(rng, rng.integers(lo + 15, hi - 15 + 1), tint)
        amplitude = int(rng.integers(12, 29))
        return Backdrop("coarse", (base,), amplitude=amplitude, scale=int(rng.integers(4, 11)), seed=seed)
    first = _tinted(rng, rng.integers(lo, hi + 1), tint)
    second = _tinted(rng, rng.integers(lo, hi + 1), tint)
    if style == "linear":
        angle = round(float(rng.uniform(0.0, 360.0)), 1)
        return Backdrop("linear", (first, second), angle=angle)
    if style == "radial":
        center = (round(float(rng.uniform(0.2, 0.8)), 3), round(float(rng.uniform(0.2, 0.8)), 3))
        return Backdrop("radial", (first, second), center=center)
    if style == "texture":
        return Backdrop("texture", (first, second), scale=int(rng.integers(10, 33)), seed=seed)
    raise VideoLlavaError(f"backdrop style must be one of {BACKDROP_STYLES}, not {style!r}")
