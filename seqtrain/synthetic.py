"""Embedded default dataset: CIFAR-shaped generated images of ten shape classes.

Every image is 3x32x32 uint8 and shows one foreground shape on a cluttered background; the class is the
shape, never its colour, size or place. Shapes are drawn from signed-distance fields in the shape's own
frame (u, v), where the unit is the shape's radius, and anti-aliased over one pixel.

Classes (index: name, what is drawn inside the radius-1 box):
  0 disc      filled circle                     5 cross     diagonal X, bars 0.44 wide
  1 ring      circle outline, 0.44 thick        6 hstripes  three horizontal bars in the box
  2 frame     square outline, 0.4 thick         7 vstripes  three vertical bars in the box
  3 triangle  filled, pointing up               8 checker   4x4 checkerboard in the box
  4 plus      upright +, bars 0.44 wide         9 dots      3x3 grid of small discs

Nuisance factors, drawn independently of the class (module constants below; the ranges were tuned so that
the baselines in benchmarks/dataset_baselines.py land where they should, see "Difficulty"):
  - radius 4..11 px; centre uniform over the positions that keep the radius-1 box inside the image;
  - rotation of at most ~17 degrees either way (tan uniform in +-0.3): enough to break pixel templates,
    small enough that plus and cross, or horizontal and vertical stripes, never swap;
  - background colour uniform in [0, 1]^3; foreground colour = background + an offset uniform in
    [0.15, 0.85] per channel, wrapped mod 1: uniform like the background, always at least 0.15 away from it
    in every channel. Since E[fg] = E[bg], the expected image is the same flat grey for every class, so
    neither the mean image nor the mean colour says anything about the class;
  - background shading: the sum of a vertical and a horizontal profile, each linear between 4 knots drawn
    uniformly in +-0.15 per channel;
  - distractors: 2 slots, each with probability 0.7 a line segment 6..20 px long and 1..3 px wide, of a
    uniform random colour, anywhere (it may cross the shape, and looks like a bar of plus or stripes);
  - per-pixel noise, uniform in +-0.2 per channel; the result is clipped to [0, 1] and rounded to uint8.

Difficulty (benchmarks/dataset_baselines.py: 10,000 train / 2,000 test images, seeds 0 and 1): a
95k-parameter 3-layer CNN reaches 88.2% / 86.6% test accuracy in 15 epochs, a linear classifier on raw
pixels 11.9% / 10.4%, one on the per-channel means 9.9% / 10.8% (chance is 10%).

Determinism: only numpy's Generator (`random`, `bytes`, `permutation`) and elementwise IEEE operations
(+ - * / sqrt, abs, min, max, floor, mod, clip) on float32 are used; no transcendental functions, no
reductions and no BLAS, whose last bit may differ between machines. The same (n, seed) therefore gives
byte-identical arrays on every machine with the same numpy Generator streams (numpy may change a stream
only in a feature release, with notice).
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10
CLASS_NAMES: tuple[str, ...] = (
    "disc",
    "ring",
    "frame",
    "triangle",
    "plus",
    "cross",
    "hstripes",
    "vstripes",
    "checker",
    "dots",
)

SIZE = 32
# Nuisance ranges, described in the module docstring; changing any of them changes the difficulty.
RADIUS = (4.0, 11.0)  # shape radius, px
MAX_TAN = 0.3  # rotation: tan(angle) uniform in +-MAX_TAN, about +-17 degrees
MIN_CONTRAST = 0.15  # per-channel |fg - bg| (circular) is at least this
SHADE = 0.15  # amplitude of each of the two background shading profiles
NOISE = 0.2  # per-pixel uniform noise amplitude
SEGMENTS = 2  # distractor segment slots per image
P_SEGMENT = 0.7  # probability that a slot holds a segment
SEG_LEN = (6.0, 20.0)  # segment length, px
SEG_WIDTH = (1.0, 3.0)  # segment width, px

_CHUNK = 1024  # samples per batch, bounding peak memory; part of the data definition (it orders the draws)
_F = np.float32
_YY, _XX = np.meshgrid(*2 * [np.arange(SIZE, dtype=_F) + _F(0.5)], indexing="ij")  # pixel centres

# ---------------------------------------------------------------------------------------------------
# Shapes: signed distance in radius units (negative inside), u to the right, v down.
# ---------------------------------------------------------------------------------------------------


def _box(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) - _F(r)


def _bar_union(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """Two perpendicular bars of half-width w along the a and b axes, each of half-length 1."""
    aa, bb = np.abs(a), np.abs(b)
    return np.minimum(np.maximum(aa - _F(w), bb - 1), np.maximum(bb - _F(w), aa - 1))


def _periodic(x: np.ndarray, period: float) -> np.ndarray:
    """Offset of x from the centre of its cell, for cells of `period` starting at -1."""
    return np.mod(x + 1, _F(period)) - _F(period / 2)


def _sdf(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if label == 0:  # disc
        return np.sqrt(u * u + v * v) - 1
    if label == 1:  # ring
        return np.abs(np.sqrt(u * u + v * v) - _F(0.78)) - _F(0.22)
    if label == 2:  # frame
        return np.abs(_box(u, v, 0.8)) - _F(0.2)
    if label == 3:  # triangle with circumradius 1: three half-planes
        h = _F(0.8660254) * u
        return np.maximum(np.maximum(v, -h - _F(0.5) * v), h - _F(0.5) * v) - _F(0.5)
    if label == 4:  # plus
        return _bar_union(u, v, 0.22)
    if label == 5:  # cross: the plus in axes turned 45 degrees
        s = _F(0.70710678)
        return _bar_union((u + v) * s, (u - v) * s, 0.22)
    if label in (6, 7):  # three stripes across the box
        t = v if label == 6 else u
        return np.maximum(np.abs(_periodic(t, 2 / 3)) - _F(0.17), _box(u, v, 1))
    if label == 8:  # 4x4 checker: inside on cells with even parity, distance to the nearest cell edge
        fu, fv = _periodic(u, 0.5), _periodic(v, 0.5)
        edge = np.minimum(_F(0.25) - np.abs(fu), _F(0.25) - np.abs(fv))
        odd = np.mod(np.floor((u + 1) * 2) + np.floor((v + 1) * 2), 2) > 0
        return np.maximum(np.where(odd, edge, -edge), _box(u, v, 1))
    if label == 9:  # 3x3 dots
        fu, fv = _periodic(u, 2 / 3), _periodic(v, 2 / 3)
        return np.maximum(np.sqrt(fu * fu + fv * fv) - _F(0.2), _box(u, v, 1))
    raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")


def _coverage(d_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels: a one-pixel linear ramp."""
    return np.clip(_F(0.5) - d_px, 0, 1)


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def _col(a: np.ndarray) -> np.ndarray:
    return a[:, None, None]  # [B] -> [B, 1, 1], to broadcast over pixels


def _uniform(rng: np.random.Generator, size, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    return _F(lo) + _F(hi - lo) * rng.random(size, dtype=_F)


def _profile(knots: np.ndarray) -> np.ndarray:
    """Linear interpolation of [..., K] knots spread over the image to [..., 32] pixel values."""
    k = knots.shape[-1]
    pos = (np.arange(SIZE, dtype=_F) + _F(0.5)) * _F((k - 1) / SIZE)
    i0 = np.minimum(pos.astype(np.int64), k - 2)
    w = pos - i0.astype(_F)
    # Fancy indexing yields a permuted memory layout that later ops would inherit (measured 5x slower).
    return np.ascontiguousarray(knots[..., i0] * (1 - w) + knots[..., i0 + 1] * w)


def _segment(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage [B, 32, 32] and colour [B, 3] of one distractor segment per sample (absent: coverage 0)."""
    length = _uniform(rng, n, *SEG_LEN)
    half_w = _uniform(rng, n, *SEG_WIDTH) / 2
    half_w = np.where(_uniform(rng, n) < _F(P_SEGMENT), half_w, _F(-1))  # -1: zero coverage everywhere
    dx, dy = _uniform(rng, n, -1, 1), _uniform(rng, n, -1, 1)  # direction, normalised below
    norm = np.sqrt(dx * dx + dy * dy) + _F(1e-6)
    dx, dy = dx / norm, dy / norm
    qx, qy = _XX - _col(_uniform(rng, n, 0, SIZE)), _YY - _col(_uniform(rng, n, 0, SIZE))  # from start
    # Distance to the closest point of the segment: the projection clipped to [0, length].
    t = np.clip(qx * _col(dx) + qy * _col(dy), 0, _col(length))
    ex, ey = qx - t * _col(dx), qy - t * _col(dy)
    return _coverage(np.sqrt(ex * ex + ey * ey) - _col(half_w)), _uniform(rng, (n, 3))


def _render(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images uint8 [B, 3, 32, 32] for labels sorted by class, so that each class is one contiguous slice."""
    n = len(labels)
    # Pose. The rotation (cos, sin) = (1, tan) / sqrt(1 + tan^2), so no sin/cos is needed (see Determinism).
    radius = _uniform(rng, n, *RADIUS)
    cx = radius + (SIZE - 2 * radius) * _uniform(rng, n)
    cy = radius + (SIZE - 2 * radius) * _uniform(rng, n)
    tan = _uniform(rng, n, -MAX_TAN, MAX_TAN)
    cos_r = 1 / (np.sqrt(1 + tan * tan) * radius)  # cos / radius: (u, v) come out in radius units
    sin_r = tan * cos_r
    x, y = _XX - _col(cx), _YY - _col(cy)  # B, 32, 32
    u = _col(cos_r) * x + _col(sin_r) * y
    v = _col(cos_r) * y - _col(sin_r) * x
    cover = np.empty((n, SIZE, SIZE), dtype=_F)
    bounds = np.searchsorted(labels, np.arange(NUM_CLASSES + 1))
    for k in range(NUM_CLASSES):
        sl = slice(bounds[k], bounds[k + 1])
        cover[sl] = _coverage(_sdf(k, u[sl], v[sl]) * _col(radius[sl]))

    bg = _uniform(rng, (n, 3))
    fg = np.mod(bg + _uniform(rng, (n, 3), MIN_CONTRAST, 1 - MIN_CONTRAST), _F(1))
    shade = _profile(_uniform(rng, (n, 3, 2, 4), -SHADE, SHADE))  # B, 3, (vertical, horizontal), 32
    img = (bg[..., None] + shade[:, :, 0])[..., None] + shade[:, :, 1, None, :]  # B, 3, 32, 32
    img += cover[:, None] * (fg[:, :, None, None] - img)
    for _ in range(SEGMENTS):
        seg, seg_col = _segment(rng, n)
        img += seg[:, None] * (seg_col[:, :, None, None] - img)
    # Pixel noise from raw random bytes (~3x faster than rng.random): uniform in +-NOISE, steps of 1/255.
    img += np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape) * _F(2 * NOISE / 255)
    img -= _F(NOISE)
    np.clip(img, 0, 1, out=img)
    return (img * _F(255) + _F(0.5)).astype(np.uint8)  # truncating a non-negative value: rounding


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return images uint8 [n, 3, 32, 32] and labels int64 [n], deterministic in (n, seed)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    # Balanced: each class appears floor(n/10) or ceil(n/10) times, in random order.
    labels = rng.permutation(np.arange(n, dtype=np.int64) % NUM_CLASSES)
    images = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        chunk = labels[start : start + _CHUNK]
        order = np.argsort(chunk, kind="stable")  # render class by class, then put images back in place
        images[start + order] = _render(chunk[order], rng)
    return images, labels
