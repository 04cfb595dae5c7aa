"""The embedded synthetic shapes data set, written in COCO format.

Six shape classes with random colours (colour never tells the class), sizes from ~6 to
~60 px at 128 px, aspect and rotation variation, 0-12 objects per image with bounded
occlusion, unlabelled clutter (lines, lumpy blobs, partial arcs, speckles), textured
backgrounds, low-contrast objects and pixel noise. It is easy to generate and hard enough
that a small detector does not saturate in a few epochs, so a teacher can beat it.

Every image is drawn from its own ``numpy`` PCG64 stream seeded by (seed, split, index):
images can be made in any order or in parallel and the files are byte-identical for a
given seed. Boxes are the tight box of each object's *visible* pixels (COCO convention).
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SYNTH_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "star")

_SPLIT_CODES = {"train": 0, "val": 1}
# Smallest diameter per class (px at 128 px) so that holes, arms and points still render.
_MIN_DIAMETER = (6.0, 7.0, 8.0, 11.0, 9.0, 11.0)
_MAX_DIAMETER = 60.0
_EMPTY_PROB = 0.07
_LOW_CONTRAST_PROB = 0.15
_MAX_OBJECTS = 12


@dataclass
class SynthObject:
    """One labelled object of a rendered image."""

    label: int  # 1..K, index into SYNTH_CLASSES plus one
    box: tuple[int, int, int, int]  # xyxy in pixel edges (x2, y2 exclusive): tight around ``mask``
    area: int  # visible pixels
    mask: np.ndarray  # bool [H, W], visible pixels


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_CODES[split], index])))


def _in_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = verts[-1]
    for x1, y1 in verts:
        if y1 != y0:  # horizontal edges never cross a horizontal ray
            crosses = (y1 > v) != (y0 > v)
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
            inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside


def _regular(n: int, radius: float = 1.0, phase: float = np.pi / 2) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mask of class ``kind`` in unit coordinates; every shape fits in the unit circle."""
    r2 = u * u + v * v
    if kind == 0:  # circle (an ellipse once the aspect is applied)
        return r2 <= 1.0
    if kind == 1:  # square, inscribed so that any rotation stays in the circle
        return np.maximum(np.abs(u), np.abs(v)) <= np.sqrt(0.5)
    if kind == 2:
        return _in_polygon(u, v, _regular(3))
    if kind == 3:  # ring
        inner = rng.uniform(0.45, 0.68)
        return (r2 <= 1.0) & (r2 >= inner * inner)
    if kind == 4:  # plus-shaped cross, arms reaching the unit circle
        t = rng.uniform(0.22, 0.36)
        arm = np.sqrt(1.0 - t * t)
        au, av = np.abs(u), np.abs(v)
        return ((au <= t) & (av <= arm)) | ((av <= t) & (au <= arm))
    # five-pointed star: outer points on the unit circle, inner ones at ``rho``
    rho = rng.uniform(0.38, 0.55)
    outer, inner = _regular(5), _regular(5, rho, np.pi / 2 + np.pi / 5)
    return _in_polygon(u, v, np.stack([outer, inner], axis=1).reshape(10, 2))


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates X, Y of an h x w image."""
    return np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)


def _background(rng: np.random.Generator, h: int, w: int, clutter: bool) -> np.ndarray:
    base = rng.uniform(0, 255, 3)
    if not clutter:  # flat, so every object pixel differs from it (used to test box tightness)
        return np.broadcast_to(np.rint(base), (h, w, 3)).astype(np.float32)
    x, y = _grid(h, w)
    kind = rng.integers(3)
    if kind == 0:  # linear gradient between two colours
        other, a = rng.uniform(0, 255, 3), rng.uniform(0, 2 * np.pi)
        t = np.clip(((x - w / 2) * np.cos(a) + (y - h / 2) * np.sin(a)) / max(h, w) + 0.5, 0, 1)
        bg = base + (other - base) * t[..., None]
    elif kind == 1:  # low-frequency colour noise, bilinearly upsampled
        cells = int(rng.integers(2, 6))
        grid = base + rng.normal(0, 45, (cells + 1, cells + 1, 3))
        gy, gx = np.linspace(0, cells, h), np.linspace(0, cells, w)
        iy, ix = np.minimum(gy.astype(int), cells - 1), np.minimum(gx.astype(int), cells - 1)
        fy, fx = (gy - iy)[:, None, None], (gx - ix)[None, :, None]
        rows = grid[iy] * (1 - fy) + grid[iy + 1] * fy
        bg = rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx
    else:  # stripes or checker texture
        f, a, amp = rng.uniform(0.04, 0.35), rng.uniform(0, np.pi), rng.uniform(8, 35)
        p = np.sin(2 * np.pi * f * (x * np.cos(a) + y * np.sin(a)))
        if rng.random() < 0.5:
            p = np.sign(p * np.sin(2 * np.pi * f * (-x * np.sin(a) + y * np.cos(a))))
        bg = base + amp * p[..., None] * rng.uniform(-1, 1, 3)
    grain = rng.uniform(0, 6)
    return (bg + rng.normal(0, grain, (h, w, 3))).astype(np.float32)


def _draw_distractors(canvas: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """Unlabelled clutter, alpha-blended under the objects."""
    h, w, _ = canvas.shape
    x, y = _grid(h, w)
    for _ in range(int(rng.integers(1, 10))):
        kind = rng.integers(4)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if kind == 0:  # line segment
            a, length, thick = rng.uniform(0, np.pi), rng.uniform(10, 80) * scale, rng.uniform(1, 3) * scale
            d = np.array([np.cos(a), np.sin(a)])
            t = np.clip((x - cx) * d[0] + (y - cy) * d[1], -length / 2, length / 2)
            alpha = np.hypot(x - cx - t * d[0], y - cy - t * d[1]) <= thick / 2
        elif kind == 1:  # partial arc, never a whole ring
            rad, thick = rng.uniform(5, 30) * scale, rng.uniform(1, 3) * scale
            start, span = rng.uniform(0, 2 * np.pi), rng.uniform(np.pi / 3, 1.2 * np.pi)
            ang = np.mod(np.arctan2(y - cy, x - cx) - start, 2 * np.pi)
            alpha = (np.abs(np.hypot(x - cx, y - cy) - rad) <= thick / 2) & (ang <= span)
        elif kind == 2:  # lumpy blob with a soft edge
            rad = rng.uniform(3, 14) * scale
            a2, a3, p2, p3 = rng.uniform(0.15, 0.3), rng.uniform(0.1, 0.25), *rng.uniform(0, 2 * np.pi, 2)
            phi, r = np.arctan2(y - cy, x - cx), np.hypot(x - cx, y - cy)
            edge = rad * (1 + a2 * np.cos(2 * phi + p2) + a3 * np.cos(3 * phi + p3))
            alpha = np.clip((edge - r) / (1.5 * scale) + 0.5, 0, 1)
        else:  # speckles
            alpha = np.zeros((h, w), dtype=bool)
            n = int(rng.integers(5, 30))
            alpha[rng.integers(0, h, n), rng.integers(0, w, n)] = True
        alpha = alpha.astype(np.float32)[..., None] * rng.uniform(0.4, 1.0)
        canvas *= 1 - alpha
        canvas += alpha * rng.uniform(0, 255, 3).astype(np.float32)


def _object_colour(rng: np.random.Generator, bg: np.ndarray, under: np.ndarray, low_contrast: bool) -> np.ndarray:
    """A colour standing out from the background ``bg`` and from ``under`` (mean colours of what
    the object covers): by 22-40 levels when ``low_contrast``, by at least 60 otherwise."""
    if low_contrast:
        for _ in range(5):
            delta = rng.uniform(22, 40) * rng.uniform(0.5, 1.0, 3) * rng.choice([-1.0, 1.0], 3)
            colour = np.rint(np.clip(bg + delta, 0, 255))
            if min(np.abs(colour - bg).max(), np.abs(colour - under).max()) >= 20:
                return colour
    for _ in range(10):
        colour = np.rint(rng.uniform(0, 255, 3))
        if min(np.abs(colour - bg).max(), np.abs(colour - under).max()) >= 60:
            return colour
    return np.where(bg < 128, 255.0, 0.0)  # the RGB corner farthest from the background


def render_image(
    seed: int, split: str, index: int, *, image_size: int = 128, clutter: bool = True
) -> tuple[np.ndarray, list[SynthObject]]:
    """Render image ``index`` of ``split``: uint8 [H, W, 3] and its objects.

    ``clutter=False`` gives a flat background, no distractors, no shading and no noise,
    so the non-background pixels are exactly the union of the object masks.
    """
    rng = _rng(seed, split, index)
    h = w = image_size
    scale = image_size / 128.0
    canvas = np.ascontiguousarray(_background(rng, h, w, clutter))
    if clutter:
        _draw_distractors(canvas, rng, scale)
    background = canvas.copy()  # what objects are contrasted against
    owner = np.full((h, w), -1, dtype=np.int16)  # which object each pixel shows
    full_areas: list[int] = []
    visible: list[int] = []
    labels: list[int] = []
    min_pixels = max(8, int(12 * scale * scale))

    target = 0 if rng.random() < _EMPTY_PROB else int(rng.integers(1, _MAX_OBJECTS + 1))
    for _ in range(target * 6):
        if len(labels) == target:
            break
        kind = int(rng.integers(len(SYNTH_CLASSES)))
        # log-uniform size: many small objects, some large ones
        diameter = np.exp(rng.uniform(np.log(_MIN_DIAMETER[kind]), np.log(_MAX_DIAMETER))) * scale
        radius = diameter / 2
        aspect = rng.uniform(0.55, 1.0) if kind < 4 else rng.uniform(0.78, 1.0)
        theta = rng.uniform(0, 2 * np.pi)
        margin = min(radius * 0.6, w / 2)
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)

        x0, y0 = int(np.floor(cx - radius - 1)), int(np.floor(cy - radius - 1))
        x1, y1 = int(np.ceil(cx + radius + 1)), int(np.ceil(cy + radius + 1))
        dx = (np.arange(x0, x1) + 0.5 - cx)[None, :]
        dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]
        cos, sin = np.cos(theta), np.sin(theta)
        u = (cos * dx + sin * dy) / radius
        v = (-sin * dx + cos * dy) / (radius * aspect)
        full = _shape_mask(kind, u, v, rng)
        # crop to the image; reject objects truncated by more than 20%
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        mask = full[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        area = int(mask.sum())
        if area < min_pixels or area < 0.8 * full.sum():
            continue
        win = (slice(cy0, cy1), slice(cx0, cx1))
        # bounded occlusion: every earlier object keeps at least half of its pixels
        under = owner[win][mask]
        under = under[under >= 0]
        if under.size:
            hidden = np.bincount(under, minlength=len(labels))
            left = np.asarray(visible) - hidden
            if np.any(left < np.maximum(0.5 * np.asarray(full_areas), min_pixels)):
                continue
            for j, n in enumerate(hidden.tolist()):
                visible[j] -= n

        low = rng.random() < _LOW_CONTRAST_PROB
        colour = _object_colour(rng, background[win][mask].mean(axis=0), canvas[win][mask].mean(axis=0), low)
        fill = np.broadcast_to(colour, (area, 3)).astype(np.float32)
        if clutter:  # mild linear shading across the object
            amp = rng.uniform(-1, 1) * (10 if low else 25)
            shade = u[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0][mask]
            fill = fill + (amp * shade)[:, None].astype(np.float32)
        canvas[win][mask] = fill
        owner[win][mask] = len(labels)
        full_areas.append(area)
        visible.append(area)
        labels.append(kind + 1)

    if clutter:
        canvas += rng.normal(0, rng.uniform(0, 8), canvas.shape).astype(np.float32)
    image = np.rint(np.clip(canvas, 0, 255)).astype(np.uint8)

    objects = []
    for j, label in enumerate(labels):
        m = owner == j
        ys, xs = np.nonzero(m)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SynthObject(label=label, box=box, area=int(m.sum()), mask=m))
    return image, objects


def _write_one(task: tuple[str, int, str, int, int, bool]) -> list[tuple[int, list[float], float]]:
    """Render and save one image; returns (category id, xywh box, area) per object."""
    out_dir, seed, split, index, image_size, clutter = task
    image, objects = render_image(seed, split, index, image_size=image_size, clutter=clutter)
    # PIL writes no timestamp or other metadata into PNGs, so the files are byte-identical
    Image.fromarray(image).save(Path(out_dir) / "images" / _file_name(split, index), format="PNG")
    out = []
    for o in objects:
        x1, y1, x2, y2 = (float(c) for c in o.box)
        out.append((o.label, [x1, y1, x2 - x1, y2 - y1], float(o.area)))
    return out


def _file_name(split: str, index: int) -> str:
    return f"{split}/{index + 1:06d}.png"


def _coco(split: str, results: list[list[tuple[int, list[float], float]]], image_size: int, seed: int) -> dict:
    images, annotations = [], []
    for index, objects in enumerate(results):
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": _file_name(split, index), "height": image_size, "width": image_size}
        )
        for category_id, bbox, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": f"detkd synthetic shapes, {split} split", "version": "1", "seed": seed},
        "licenses": [{"id": 1, "name": "CC0-1.0 (generated by detkd)"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SYNTH_CLASSES)],
    }


def generate_synthetic(
    out_dir: str | Path,
    *,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 128,
    seed: int = 0,
    workers: int = 1,
    clutter: bool = True,
) -> Path:
    """Write the synthetic shapes data set to ``out_dir`` and return it.

    Layout: ``images/{train,val}/NNNNNN.png``, ``annotations/{train,val}.json`` (COCO,
    ``file_name`` relative to ``images/``) and ``README.txt``. The same arguments give
    byte-identical files whatever ``workers`` is. ``workers > 1`` uses spawned processes, so a
    script calling it must guard its entry point with ``if __name__ == "__main__":``.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {"train": num_train, "val": num_val}
    for split in counts:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)

    tasks = {s: [(str(out), seed, s, i, image_size, clutter) for i in range(n)] for s, n in counts.items()}
    if workers > 1:
        # spawn: the parent may hold torch threads, which do not survive fork well
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = {s: pool.map(_write_one, t, chunksize=32) for s, t in tasks.items()}
    else:
        results = {s: [_write_one(t) for t in ts] for s, ts in tasks.items()}

    for split, res in results.items():
        coco = _coco(split, res, image_size, seed)
        (out / "annotations" / f"{split}.json").write_text(json.dumps(coco), encoding="utf-8")
    (out / "README.txt").write_text(
        "Synthetic shapes detection data set, generated by detkd (detkd.data.synthetic).\n"
        f"seed={seed} image_size={image_size} train={num_train} val={num_val} clutter={clutter}\n"
        f"classes: {', '.join(SYNTH_CLASSES)}\n"
        "Licence: CC0-1.0; every image is generated, no third-party content.\n"
        f"Recreate with: detkd data synth --out DIR --train {num_train} --val {num_val} "
        f"--size {image_size} --seed {seed}\n",
        encoding="utf-8",
    )
    return out
