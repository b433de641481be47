"""`synthetic`: the built-in default dataset, generated on the fly, no download.

Each image is a pure function of `(data_seed, split, index)` (numpy, about 1 ms for 96 x 96), so `train`
(2000 images) and `val` (200 images) come from disjoint seeds and never change between runs. The run seed
does not change the images, only their training augmentation (engine/data/base.py).

Classes (8, background included):

    0 background          textured backdrop filling the image
    1 disc                radius 7-16 px
    2 square              half-side 6-13 px, random rotation
    3 triangle            equilateral, circumradius 9-18 px, random rotation
    4 bar                 24-48 x 4-8 px, random rotation
    5 ring                annulus, inner radius 10-16 px, 3-6 px thick; its hole shows the background
    6 patch in ring       small square (5-10 px side) lying in the hole of a ring
    7 patch outside ring  the same kind of small square lying on the background away from any ring

Generative process (sizes above are for 96 x 96 and scale with the image size):

1. Background: one texture over the whole image.
2. 3-6 shapes (classes 1-4) and 0-2 rings, each ring with one class-6 patch in its hole, drawn in random
   depth order, so later objects partially occlude earlier ones (the ring's hole is reset to the background).
3. 1-3 class-7 patches on background only (fewer when 20 tries find no free spot): the patch and a 2-px
   margin around it show background, and the patch centre lies outside every ring's outer circle.
4. Gaussian pixel noise (sigma 6) on everything; rounded to uint8.

Every texture (background included) is drawn from the same families: stripes (random angle, period 4-12 px,
hard or soft edges), checkerboard (random angle, cell 3-8 px), noise blobs (a coarse random grid upsampled
bilinearly and contrast-stretched) or a linear gradient (random direction), blending two colours picked
uniformly in RGB. Colour and texture therefore say nothing about the class: a pixel is told apart only by
the shape of the region it belongs to, which takes a receptive field of the object's size (up to ~40 px).
Classes 6 and 7 go further: their pixels and immediate surroundings come from the same distribution, and
only the presence of a ring 10-22 px away (around the patch versus nowhere near it) decides between them,
so a network has to see a region of about 50 px to separate them. This is what lets a deeper, wider teacher
clearly beat a small student on the default run.
"""
import math

import numpy as np

from engine.data.base import SegmentationDataset

CLASS_NAMES = ("background", "disc", "square", "triangle", "bar", "ring", "patch in ring",
               "patch outside ring")
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240)]
BACKGROUND, DISC, SQUARE, TRIANGLE, BAR, RING, PATCH_IN, PATCH_OUT = range(8)

SPLITS = {"train": (0, 2000), "val": (1, 200)}  # split -> (seed tag, number of images)
NOISE_SIGMA = 6.0


def _texture(rng, h, w, kinds):
    """A random texture field t in [0, 1], float32 [h, w], of one of `kinds` (see the module docstring)."""
    kind = kinds[int(rng.integers(len(kinds)))]
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    a = rng.uniform(0, math.pi)
    u = x * math.cos(a) + y * math.sin(a)                    # [h, w] coordinate along a random direction
    if kind == "stripes":
        wave = np.sin(u * (2 * math.pi / rng.uniform(4, 12)) + rng.uniform(0, 2 * math.pi))
        return (wave > 0).astype(np.float32) if rng.random() < 0.5 else 0.5 + 0.5 * wave
    if kind == "checker":
        v = y * math.cos(a) - x * math.sin(a)
        cell = rng.uniform(3, 8)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    if kind == "blobs":
        k = int(rng.integers(3, 7))
        grid = rng.random((k, k)).astype(np.float32)
        ay = np.maximum(0, 1 - np.abs(np.linspace(0, k - 1, h, dtype=np.float32)[:, None] - np.arange(k)))
        ax = np.maximum(0, 1 - np.abs(np.linspace(0, k - 1, w, dtype=np.float32)[:, None] - np.arange(k)))
        field = ay @ grid @ ax.T                             # [h, k] [k, k] [k, w] -> [h, w] bilinear upsampling
        return np.clip((field - 0.5) * rng.uniform(1.5, 4) + 0.5, 0, 1)
    span = max(float(u.max() - u.min()), 1.0)                # gradient
    return (u - u.min()) / span


def _object_colours(rng, h, w):
    """An object's look, float32 [h, w, 3]: a busy texture blending two clearly different colours."""
    c1 = rng.uniform(0, 255, 3)
    while True:  # contrast >= 100 (RGB distance) keeps every object textured, unlike the background
        c2 = rng.uniform(0, 255, 3)
        if np.sum((c2 - c1) ** 2) >= 100 ** 2:
            break
    t = _texture(rng, h, w, ("stripes", "checker", "blobs"))
    return (c1 + t[..., None] * (c2 - c1)).astype(np.float32)


def _background_colours(rng, size):
    """The backdrop, float32 [size, size, 3]: smooth blobs or a gradient between two nearby colours."""
    c1 = rng.uniform(30, 225, 3)
    c2 = c1 + rng.uniform(-40, 40, 3)
    t = _texture(rng, size, size, ("blobs", "gradient"))
    return (c1 + t[..., None] * (c2 - c1)).astype(np.float32)


class _Canvas:
    """An image and label under construction; objects are painted in depth order."""

    def __init__(self, rng, size):
        self.rng = rng
        self.size = size
        self.background = _background_colours(rng, size)   # [S, S, 3]
        self.image = self.background.copy()
        self.label = np.zeros((size, size), np.uint8)

    def box(self, cx, cy, radius):
        """Clipped bounding box (y0, y1, x0, x1) of a disc, and the pixel-centre grids inside it."""
        s = self.size
        y0, y1 = max(int(cy - radius), 0), min(int(math.ceil(cy + radius)) + 1, s)
        x0, x1 = max(int(cx - radius), 0), min(int(math.ceil(cx + radius)) + 1, s)
        if y0 >= y1 or x0 >= x1:
            return None
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy    # [h, 1]
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx    # [1, w]
        return (y0, y1, x0, x1), dy, dx

    def paint(self, where, mask, cls, colour=None):
        """Paint mask [h, w] of box `where` with class cls and a fresh texture (or the given colours)."""
        y0, y1, x0, x1 = where
        if colour is None:
            colour = _object_colours(self.rng, y1 - y0, x1 - x0)
        self.image[y0:y1, x0:x1][mask] = colour[mask]
        self.label[y0:y1, x0:x1][mask] = cls

    def shape(self, cls, cx, cy, size, angle, aspect=1.0):
        """Disc, square, triangle, bar (or the small patch square) centred at (cx, cy)."""
        reach = size * max(aspect, 1.0) * 1.5
        boxed = self.box(cx, cy, reach)
        if boxed is None:
            return
        where, dy, dx = boxed
        if cls == DISC:
            mask = dx * dx + dy * dy <= size * size
        else:
            c, s = math.cos(angle), math.sin(angle)
            u, v = dx * c + dy * s, dy * c - dx * s                  # [h, w] rotated frame
            if cls == TRIANGLE:                                      # three half-planes at the inradius size/2
                mask = u <= size / 2
                for k in (1, 2):
                    t = 2 * math.pi * k / 3
                    mask &= u * math.cos(t) + v * math.sin(t) <= size / 2
            else:                                                    # square, bar, patch: a rectangle
                mask = (np.abs(u) <= size * aspect) & (np.abs(v) <= size)
        self.paint(where, mask, cls)

    def ring(self, cx, cy, r_in, r_out):
        where, dy, dx = self.box(cx, cy, r_out)
        d2 = dx * dx + dy * dy
        y0, y1, x0, x1 = where
        hole = d2 < r_in * r_in
        self.paint(where, hole, 0, colour=self.background[y0:y1, x0:x1])
        self.paint(where, (d2 >= r_in * r_in) & (d2 <= r_out * r_out), RING)

    def only_background(self, cx, cy, reach):
        y0, y1 = max(int(cy - reach), 0), min(int(math.ceil(cy + reach)) + 1, self.size)
        x0, x1 = max(int(cx - reach), 0), min(int(math.ceil(cx + reach)) + 1, self.size)
        return not self.label[y0:y1, x0:x1].any()


def generate(data_seed, split_tag, index, size=96):
    """One synthetic image: (rgb uint8 [size, size, 3], label uint8 [size, size]); see the module docstring."""
    rng = np.random.default_rng([data_seed, split_tag, index])
    k = size / 96                                     # every length below is for 96 x 96
    canvas = _Canvas(rng, size)

    items = [("shape", int(cls)) for cls in rng.integers(DISC, BAR + 1, rng.integers(3, 7))]
    items += [("ring", RING)] * int(rng.choice(3, p=(0.15, 0.55, 0.3)))
    rng.shuffle(items)
    rings = []
    for kind, cls in items:
        if kind == "ring":
            r_in, thick = rng.uniform(10, 16) * k, rng.uniform(3, 6) * k
            half = rng.uniform(2.5, 5) * k
            cx, cy = rng.uniform(r_in, size - r_in, 2)
            canvas.ring(cx, cy, r_in, r_in + thick)
            room = r_in - half * math.sqrt(2) - 2 * k        # the patch stays clear of the ring
            rho, phi = room * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            canvas.shape(PATCH_IN, cx + rho * math.cos(phi), cy + rho * math.sin(phi), half,
                         rng.uniform(0, math.pi))
            rings.append((cx, cy, r_in + thick))
            continue
        cx, cy = rng.uniform(0, size, 2)
        angle = rng.uniform(0, math.pi)
        if cls == DISC:
            canvas.shape(cls, cx, cy, rng.uniform(7, 16) * k, angle)
        elif cls == SQUARE:
            canvas.shape(cls, cx, cy, rng.uniform(6, 13) * k, angle)
        elif cls == TRIANGLE:
            canvas.shape(cls, cx, cy, rng.uniform(9, 18) * k, angle)
        else:
            half_width = rng.uniform(2, 4) * k
            canvas.shape(cls, cx, cy, half_width, angle, aspect=rng.uniform(12, 24) * k / half_width)

    for _ in range(int(rng.integers(1, 4))):
        half = rng.uniform(2.5, 5) * k
        for _try in range(20):
            cx, cy = rng.uniform(half, size - half, 2)
            if all((cx - rx) ** 2 + (cy - ry) ** 2 > r * r for rx, ry, r in rings) \
                    and canvas.only_background(cx, cy, half * math.sqrt(2) + 2 * k):
                canvas.shape(PATCH_OUT, cx, cy, half, rng.uniform(0, math.pi))
                break

    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * NOISE_SIGMA
    rgb = np.clip(canvas.image + noise + 0.5, 0, 255).astype(np.uint8)
    return rgb, canvas.label


class SyntheticSegmentation(SegmentationDataset):
    """The built-in dataset; see the module docstring. `root` is accepted for a uniform signature and unused."""
    name = "synthetic"
    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, split, *, root="", train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0,
                 seed=0, size=96, length=None, data_seed=0):
        super().__init__(split, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate, seed=seed)
        if split not in SPLITS:
            raise ValueError(f"synthetic has splits {sorted(SPLITS)}, got {split!r}")
        self.split_tag, default_length = SPLITS[split]
        self.length = default_length if length is None else int(length)
        self.size = int(size)
        self.data_seed = int(data_seed)
        if self.length <= 0 or self.size < 16:
            raise ValueError(f"synthetic needs length > 0 and size >= 16, got {self.length}, {self.size}")

    def __len__(self):
        return self.length

    def load(self, i):
        return generate(self.data_seed, self.split_tag, i, self.size)
