"""The scene generator: one object with known attributes on a textured background.

Everything is drawn from ``numpy.random.Generator`` streams derived from ``(seed, chunk)``, in
chunks of :data:`CHUNK` images, so image ``i`` depends only on ``(seed, i, size, options)``: the
same seed gives the same bytes, and ``make_scenes(100, s)`` is a prefix of ``make_scenes(1000, s)``.
Rendering is vectorised over a chunk (masks and textures are whole-array numpy operations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitdecomp.world.attributes import ATTRIBUTES, BACKGROUNDS, COLORS, PATTERNS, SHAPES, SIZES
from vitdecomp.world.captions import caption

_RGB = np.array(
    [
        (220, 40, 40),  # red
        (40, 190, 60),  # green
        (40, 80, 230),  # blue
        (245, 220, 40),  # yellow
        (150, 50, 200),  # purple
        (250, 140, 20),  # orange
    ],
    dtype=np.float32,
)
_SIZE_RANGES = ((0.18, 0.24), (0.26, 0.34))  # object radius as a fraction of the image side
CHUNK = 256
#: Objects are rotated by a uniform angle in [-MAX_ROTATION, MAX_ROTATION] degrees (upright shapes).
MAX_ROTATION = 15.0
#: Brightness of the pattern's second colour relative to the object's colour.
PATTERN_SHADE = 0.55
_OUTLINE = np.array((25, 25, 25), dtype=np.float32)


@dataclass
class Scenes:
    """A batch of generated scenes (all arrays share the first axis ``N``).

    ``attributes`` holds one integer column per attribute (indices into :data:`ATTRIBUTES`) plus
    the continuous ``radius`` (pixels), ``cx``, ``cy`` (pixels), ``angle`` (radians) and
    ``n_distractors``. :meth:`records` gives them as a list of dicts with the words.
    """

    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray  # bool [N, H, W], the main object's pixels
    attributes: dict[str, np.ndarray]
    captions: list[str]
    seed: int
    size: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def labels(self, name: str) -> np.ndarray:
        """Integer labels of one categorical attribute (index into ``ATTRIBUTES[name]``)."""
        return self.attributes[name]

    def words(self, name: str) -> list[str]:
        vocab = ATTRIBUTES[name]
        return [vocab[i] for i in self.attributes[name]]

    def records(self) -> list[dict[str, Any]]:
        """One dict per image: words for the categorical attributes, numbers for the rest."""
        out = []
        for i in range(len(self)):
            rec: dict[str, Any] = {}
            for k, v in self.attributes.items():
                rec[k] = ATTRIBUTES[k][int(v[i])] if k in ATTRIBUTES else v[i].item()
            rec["caption"] = self.captions[i]
            out.append(rec)
        return out

    def pil(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])


# ----------------------------------------------------------------------------------------------
# parameters


def _chunk_rng(seed: int, chunk: int, stream: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(chunk), stream])))


def _sample_params(rng: np.random.Generator, m: int, size: int, max_distractors: int) -> dict[str, np.ndarray]:
    p: dict[str, np.ndarray] = {
        "shape": rng.integers(0, len(SHAPES), m),
        "color": rng.integers(0, len(COLORS), m),
        "pattern": rng.integers(0, len(PATTERNS), m),
        "background": rng.integers(0, len(BACKGROUNDS), m),
        "size": rng.integers(0, len(SIZES), m),
    }
    p["_u"] = rng.random((4, m))
    p["color_jitter"] = rng.uniform(-18, 18, (m, 3))
    p["n_distractors"] = rng.integers(0, max_distractors + 1, m) if max_distractors > 0 else np.zeros(m, int)
    return p


def _place(p: dict[str, np.ndarray], size: int, max_rotation: float = MAX_ROTATION) -> None:
    """Radius, centre and angle from the size class and the raw uniforms (in place)."""
    u_r, u_x, u_y, u_a = p["_u"]
    lo = np.array([r[0] for r in _SIZE_RANGES])[p["size"]]
    hi = np.array([r[1] for r in _SIZE_RANGES])[p["size"]]
    radius = (lo + (hi - lo) * u_r) * size
    margin = radius + 1.0
    p["radius"] = radius
    p["cx"] = margin + (size - 2 * margin) * u_x
    p["cy"] = margin + (size - 2 * margin) * u_y
    p["angle"] = np.deg2rad(max_rotation) * (2 * u_a - 1)


# ----------------------------------------------------------------------------------------------
# shapes and patterns, in the object's frame (u, v scaled so the object fits in the unit disc)


def _polygon(u: np.ndarray, v: np.ndarray, k: int, start: float) -> np.ndarray:
    """Regular k-gon of circumradius 1: returns f with f <= 1 inside."""
    f = None
    for j in range(k):
        phi = start + 2 * np.pi * (j + 0.5) / k
        d = u * np.cos(phi) + v * np.sin(phi)
        f = d if f is None else np.maximum(f, d)
    return f / np.cos(np.pi / k)


def _shape_field(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    name = SHAPES[kind]
    if name == "circle":
        return np.sqrt(u * u + v * v) / 0.9
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) / 0.75
    if name == "triangle":
        return _polygon(u, v, 3, -np.pi / 2) / 1.0
    if name == "hexagon":
        return _polygon(u, v, 6, 0.0) / 0.95
    if name == "star":
        rho = np.sqrt(u * u + v * v)
        phi = np.arctan2(v, u)
        t = np.abs(((phi * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at the points, 0 between
        return rho / (0.42 + 0.58 * t)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        w = 0.3
        return np.minimum(np.maximum(au / w, av), np.maximum(au, av / w)) / 0.95
    raise ValueError(name)


def _pattern_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern's second (dark) colour goes."""
    name = PATTERNS[kind]
    if name == "solid":
        return np.zeros(u.shape, dtype=bool)
    if name == "striped":
        return np.sin(np.pi * u * 3.2) > 0.0
    if name == "dotted":
        fu = (u * 2.2 + 0.5) % 1.0 - 0.5
        fv = (v * 2.2 + 0.5) % 1.0 - 0.5
        return fu * fu + fv * fv < 0.07
    if name == "checkered":
        return (np.floor(u * 2.4 + 0.5) + np.floor(v * 2.4 + 0.5)) % 2 == 1
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------
# backgrounds


def _value_noise(rng: np.random.Generator, m: int, size: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random grid bilinearly upsampled to ``size``; [m, size, size]."""
    g = rng.random((m, cells_y + 1, cells_x + 1)).astype(np.float32)
    ys = np.linspace(0, cells_y, size, dtype=np.float32)
    xs = np.linspace(0, cells_x, size, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), cells_y - 1)
    x0 = np.minimum(xs.astype(int), cells_x - 1)
    ty = (ys - y0)[:, None]
    tx = (xs - x0)[None, :]
    ty = ty * ty * (3 - 2 * ty)
    tx = tx * tx * (3 - 2 * tx)
    a = g[:, y0][:, :, x0]
    b = g[:, y0][:, :, x0 + 1]
    c = g[:, y0 + 1][:, :, x0]
    d = g[:, y0 + 1][:, :, x0 + 1]
    return (a * (1 - tx) + b * tx) * (1 - ty) + (c * (1 - tx) + d * tx) * ty


def _background(kind: int, rng: np.random.Generator, m: int, size: int) -> np.ndarray:
    """[m, size, size, 3] float32 texture of one background kind."""
    name = BACKGROUNDS[kind]
    y = np.arange(size, dtype=np.float32)[None, :, None] / size
    x = np.arange(size, dtype=np.float32)[None, None, :] / size
    phase = rng.uniform(0, 2 * np.pi, (m, 1, 1)).astype(np.float32)
    shade = rng.uniform(0.9, 1.1, (m, 1, 1)).astype(np.float32)
    if name == "grass":
        blades = _value_noise(rng, m, size, 3, size // 3)
        patches = _value_noise(rng, m, size, 3, 3)
        lum = shade * (0.55 + 0.6 * blades * (0.6 + 0.4 * patches))
        base = np.array((70, 150, 55), np.float32)
    elif name == "sand":
        grain = rng.random((m, size, size), dtype=np.float32)
        dunes = np.sin(2 * np.pi * (2.0 * y + 0.25 * np.sin(2 * np.pi * x + phase)) + phase)
        lum = shade * (0.92 + 0.07 * dunes + 0.12 * (grain - 0.5))
        base = np.array((215, 190, 135), np.float32)
    elif name == "snow":
        speck = rng.random((m, size, size), dtype=np.float32) > 0.93
        soft = _value_noise(rng, m, size, 4, 4)
        lum = np.minimum(shade, 1.02) * (0.9 + 0.1 * soft - 0.18 * speck)
        base = np.array((238, 242, 250), np.float32)
    elif name == "water":
        ripple = np.sin(2 * np.pi * (6.0 * y + 0.15 * np.sin(2 * np.pi * 3 * x + phase)) + phase)
        noise = _value_noise(rng, m, size, 8, 8)
        lum = shade * (0.8 + 0.2 * ripple + 0.15 * (noise - 0.5))
        base = np.array((35, 95, 165), np.float32)
    elif name == "sky":
        clouds = _value_noise(rng, m, size, 4, 6)
        top = np.array((95, 150, 230), np.float32)
        bottom = np.array((175, 210, 245), np.float32)
        grad = top + (bottom - top) * y[..., None]
        cloud = np.clip((clouds - 0.55) * 4.0, 0, 1)[..., None]
        return (grad * (1 - cloud) + 245.0 * cloud) * shade[..., None]
    else:  # pragma: no cover
        raise ValueError(name)
    return lum[..., None] * base


# ----------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class _Objects:
    """Objects to paint, one per selected image: shape and pattern indices, colour ``rgb [k, 3]``,
    centre (``cx``, ``cy``), radius and rotation ``angle`` (radians), each ``[k]``."""

    shape: np.ndarray
    pattern: np.ndarray
    rgb: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    angle: np.ndarray


def _draw_object(canvas: np.ndarray, sel: np.ndarray, obj: _Objects, size: int, outline: bool = True) -> np.ndarray:
    """Paint objects on ``canvas[sel]`` (in place); returns their masks [len(sel), H, W]."""
    shape, pattern, rgb = obj.shape, obj.pattern, obj.rgb
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - obj.cx[:, None, None].astype(np.float32)
    dy = grid[None, :, None] - obj.cy[:, None, None].astype(np.float32)
    c, s = np.cos(obj.angle)[:, None, None], np.sin(obj.angle)[:, None, None]
    r = obj.radius[:, None, None].astype(np.float32)
    u = ((dx * c + dy * s) / r).astype(np.float32)
    v = ((-dx * s + dy * c) / r).astype(np.float32)
    masks = np.zeros((len(sel), size, size), dtype=bool)
    dark = np.zeros((len(sel), size, size), dtype=bool)
    for k in np.unique(shape):
        j = np.nonzero(shape == k)[0]
        masks[j] = _shape_field(int(k), u[j], v[j]) <= 1.0
    for k in np.unique(pattern):
        j = np.nonzero(pattern == k)[0]
        dark[j] = _pattern_mask(int(k), u[j], v[j])
    col = np.where(dark[..., None], rgb[:, None, None, :] * PATTERN_SHADE, rgb[:, None, None, :])
    if outline:
        inner = masks.copy()
        inner[:, 1:, :] &= masks[:, :-1, :]
        inner[:, :-1, :] &= masks[:, 1:, :]
        inner[:, :, 1:] &= masks[:, :, :-1]
        inner[:, :, :-1] &= masks[:, :, 1:]
        col = np.where((masks & ~inner)[..., None], _OUTLINE, col)
    sub = canvas[sel]
    canvas[sel] = np.where(masks[..., None], col, sub)
    return masks


def _render_chunk(params: dict[str, np.ndarray], rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    m = len(params["shape"])
    canvas = np.empty((m, size, size, 3), dtype=np.float32)
    for k in range(len(BACKGROUNDS)):
        j = np.nonzero(params["background"] == k)[0]
        if len(j):
            canvas[j] = _background(k, rng, len(j), size)
    # distractors: small solid objects drawn under the main object
    nd = params["n_distractors"]
    for t in range(int(nd.max()) if m else 0):
        dshape = rng.integers(0, len(SHAPES), m)
        dcol = rng.integers(0, len(COLORS), m)
        drad = rng.uniform(0.06, 0.1, m) * size
        dcx = rng.uniform(0, size, m)
        dcy = rng.uniform(0, size, m)
        dang = rng.uniform(0, 2 * np.pi, m)
        j = np.nonzero(nd > t)[0]
        if len(j):
            objects = _Objects(dshape[j], np.zeros(len(j), int), _RGB[dcol[j]], dcx[j], dcy[j], drad[j], dang[j])
            _draw_object(canvas, j, objects, size, outline=True)
    rgb = np.clip(_RGB[params["color"]] + params["color_jitter"], 0, 255).astype(np.float32)
    idx = np.arange(m)
    objects = _Objects(
        *(params[k] for k in ("shape", "pattern")), rgb, *(params[k] for k in ("cx", "cy", "radius", "angle"))
    )
    masks = _draw_object(canvas, idx, objects, size)
    canvas += rng.normal(0.0, 3.0, canvas.shape).astype(np.float32)
    images = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return images, masks


def _fix(params: dict[str, np.ndarray], fixed: Mapping[str, Sequence[int] | np.ndarray], rows: slice, n: int) -> None:
    """Override the chunk's first images' categorical attributes by ``fixed``'s labels of ``rows``."""
    m = rows.stop - rows.start
    for k, v in fixed.items():
        if k not in ATTRIBUTES:
            raise KeyError(f"unknown attribute {k!r}; one of {list(ATTRIBUTES)}")
        vals = np.asarray(v, dtype=np.int64)[rows]
        if len(vals) != m:
            raise ValueError(f"fixed[{k!r}] must have n={n} entries")
        if vals.min(initial=0) < 0 or vals.max(initial=0) >= len(ATTRIBUTES[k]):
            raise ValueError(f"fixed[{k!r}] out of range")
        params[k] = params[k].copy()
        params[k][:m] = vals


def make_scenes(
    n: int,
    seed: int = 0,
    size: int = 64,
    *,
    max_distractors: int = 0,
    fixed: Mapping[str, Sequence[int] | np.ndarray] | None = None,
    caption_seed_offset: int = 0,
    start: int = 0,
    max_rotation: float = MAX_ROTATION,
) -> Scenes:
    """Generate ``n`` scenes deterministically from ``seed``.

    ``max_distractors`` adds 0..k small solid distractor objects per image. ``fixed`` overrides
    categorical attributes (name -> ``n`` integer labels, e.g. for the Waterbirds-like split or
    for rendering the same objects again with new nuisances under another seed). ``start`` skips
    the first ``start`` images of the stream (must be a multiple of :data:`CHUNK`).
    ``max_rotation`` (degrees) bounds the object's random rotation (shapes stay upright by default;
    the zoo was trained with the default).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if size < 16:
        raise ValueError("size must be >= 16")
    if start % CHUNK:
        raise ValueError(f"start must be a multiple of {CHUNK}")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    cols: dict[str, list[np.ndarray]] = {}
    caps: list[str] = []
    for c0 in range(0, n, CHUNK):
        c = (start + c0) // CHUNK
        m = min(CHUNK, n - c0)
        rng = _chunk_rng(seed, c)
        params = _sample_params(rng, CHUNK, size, max_distractors)
        if fixed is not None:
            _fix(params, fixed, slice(c0, c0 + m), n)
        _place(params, size, max_rotation)
        # always render the whole chunk, so an image never depends on n
        im, mk = _render_chunk(params, _chunk_rng(seed, c, 1), size)
        images[c0 : c0 + m] = im[:m]
        masks[c0 : c0 + m] = mk[:m]
        params = {k: (v[:, :m] if k == "_u" else v[:m]) for k, v in params.items()}
        for k in _COLUMNS:
            cols.setdefault(k, []).append(params[k])
        crng = _chunk_rng(seed, c, 2 + caption_seed_offset)
        choice = crng.integers(0, 1 << 30, CHUNK)[:m]
        for i in range(m):
            caps.append(caption({k: int(params[k][i]) for k in ATTRIBUTES}, int(choice[i])))
    attrs = _attribute_arrays(cols)
    return Scenes(images, masks, attrs, caps, seed=int(seed), size=size, meta={"max_distractors": max_distractors})


#: The attributes a scene carries (the categorical ones, then its geometry).
_COLUMNS = (*ATTRIBUTES, "radius", "cx", "cy", "angle", "n_distractors")


def _attribute_arrays(cols: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    if not cols:
        return {k: np.zeros(0, np.int64) for k in ATTRIBUTES}
    return {
        k: np.concatenate(v).astype(np.int64 if k in ATTRIBUTES or k == "n_distractors" else np.float64)
        for k, v in cols.items()
    }


def scene_attributes(
    n: int, seed: int = 0, size: int = 64, max_rotation: float = MAX_ROTATION
) -> dict[str, np.ndarray]:
    """The attributes of ``make_scenes(n, seed, size)`` (no distractors) without rendering an image:
    the same draws, a few bytes per scene (``{name: [n]}``)."""
    cols: dict[str, list[np.ndarray]] = {}
    for c0 in range(0, n, CHUNK):
        m = min(CHUNK, n - c0)
        params = _sample_params(_chunk_rng(seed, c0 // CHUNK), CHUNK, size, 0)
        _place(params, size, max_rotation)
        for k in _COLUMNS:
            cols.setdefault(k, []).append(params[k][:m])
    return _attribute_arrays(cols)
