"""`synthetic`: the built-in default dataset, generated on the fly, no download.

Each image is a pure function of `(data_seed, split, index)` (numpy, 1-2 ms for 96 x 96 on one core), so `train`
(2000 images) and `val` (200 images) come from disjoint seeds and never change between runs. The run seed
does not change the images, only their training augmentation (engine/data/base.py).

Classes (8, background included; sizes for 96 x 96, scaled with the image size):

    0 background          smooth, greyish, low-contrast backdrop filling the image
    1 disc                radius 10-20 px
    2 square              half-side 9-16 px, random rotation
    3 triangle            equilateral, circumradius 13-24 px, random rotation
    4 bar                 40-70 x 8-12 px, random rotation
    5 ring                annulus, inner radius 16-21 px, 5-8 px thick; its hole shows the background
    6 patch in ring       small square (10-15 px side, random rotation) lying in the hole of a ring
    7 patch outside ring  the same kind of square lying on the background, outside every ring

Generative process:

1. Background: smooth noise blobs or a linear gradient between two nearby greyish colours.
2. 3-5 shapes (classes 1-4, uniform) and 0-2 rings (probabilities .15/.55/.3), each ring with one class-6
   patch in its hole, drawn in random depth order, so later objects partially occlude earlier ones
   (drawing a ring resets its hole to the background, then places the patch in it, 2 px clear of the ring).
3. 1-3 class-7 patches (fewer when 20 tries find no free spot), each on background only: the patch and a
   2-px margin around it show background, and its centre lies outside every ring's outer circle.
4. Gaussian pixel noise (sigma 6) on everything; rounded to uint8.

Every object is textured, blending a saturated colour with a darker shade of it through one family:
noise blobs (a coarse random grid upsampled bilinearly, contrast-stretched), checkerboard (cell 3-8 px),
stripes (period 4-12 px, hard or soft) or dots (period 5-9 px), each at a random angle.

What a pixel's class takes to recognise:
- object versus background: local contrast and saturation (a few pixels).
- which shape: colour narrows it to a pair (discs and squares take warm hues, -30..50 deg; triangles and
  bars cool ones, 170..250 deg), the texture family usually tells the pair apart (each shape wears its own
  family, blobs / checker / stripes / dots, 70% of the time, any family otherwise), and the outline always
  does, which needs a receptive field of the object's size (20-70 px).
- ring: any hue, any family; only its thin annular outline identifies it.
- patch in ring versus patch outside ring (6 vs 7): identical in size, hue (any), family (any) and immediate
  surroundings (background); only the ring around it, whose inner edge lies 2-16 px beyond the patch,
  separates them, so this takes a receptive field of about 60 px and a network able to relate the ring to the patch. A small
  student learns these two classes last (see tests/engine/data/test_data.py for the check that no local statistic
  separates them).
"""
import colorsys
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
# Uniform ranges in pixels at 96 x 96 (scaled with the image size). Objects are large next to the output
# stride 8 of the segmentation models: the smallest, the patches, span about 2 cells of their logit maps.
DISC_RADIUS = (10, 20)
SQUARE_HALF_SIDE = (9, 16)
TRIANGLE_CIRCUMRADIUS = (13, 24)
BAR_HALF_WIDTH, BAR_HALF_LENGTH = (4, 6), (20, 35)
RING_INNER_RADIUS, RING_THICKNESS = (16, 21), (5, 8)
PATCH_HALF_SIDE = (5, 7.5)
SHAPES_PER_IMAGE = (3, 5)          # inclusive
RINGS_PER_IMAGE_P = (0.15, 0.55, 0.3)  # probability of 0, 1, 2 rings
LOOSE_PATCHES = (1, 3)             # inclusive, fewer when no free spot is found
OBJECT_FAMILIES = ("blobs", "checker", "stripes", "dots")
FAMILY_OF = {DISC: "blobs", SQUARE: "checker", TRIANGLE: "stripes", BAR: "dots"}
FAMILY_P = 0.7                     # how often a shape wears its own family (else any of the four)
# Hue ranges in degrees: shapes share them in pairs, so colour narrows a shape down to two classes;
# the texture family and the outline decide. Rings and both patch classes take any hue.
HUES = {DISC: (-30, 50), SQUARE: (-30, 50), TRIANGLE: (170, 250), BAR: (170, 250)}


def _texture(rng, h, w, kind):
    """A random texture field t in [0, 1], float32 [h, w], of family `kind` (see the module docstring)."""
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
    if kind == "dots":
        v = y * math.cos(a) - x * math.sin(a)
        period = rng.uniform(5, 9)
        du, dv = u % period - period / 2, v % period - period / 2
        return (du * du + dv * dv <= (period * rng.uniform(0.25, 0.4)) ** 2).astype(np.float32)
    if kind == "blobs":
        k = int(rng.integers(3, 7))
        grid = rng.random((k, k)).astype(np.float32)
        ay = np.maximum(0, 1 - np.abs(np.linspace(0, k - 1, h, dtype=np.float32)[:, None] - np.arange(k)))
        ax = np.maximum(0, 1 - np.abs(np.linspace(0, k - 1, w, dtype=np.float32)[:, None] - np.arange(k)))
        field = ay @ grid @ ax.T                             # [h, k] [k, k] [k, w] -> [h, w] bilinear upsampling
        return np.clip((field - 0.5) * rng.uniform(1.5, 4) + 0.5, 0, 1)
    span = max(float(u.max() - u.min()), 1.0)                # gradient
    return (u - u.min()) / span


def _hsv(h, s, v):
    """One colour from hue in degrees, saturation and value in [0, 1] -> float RGB [3] in 0..255."""
    return np.asarray(colorsys.hsv_to_rgb((h % 360) / 360, s, v)) * 255


def _object_colours(rng, h, w, cls):
    """An object's look, float32 [h, w, 3]: a busy texture between a saturated colour and a darker shade of it.

    The hue comes from the class's range (HUES; rings and patches: any hue) and the texture family is the
    class's own (FAMILY_OF) with probability FAMILY_P, else any object family (always any for rings, patches).
    """
    lo, hi = HUES.get(cls, (0, 360))
    c1 = _hsv(rng.uniform(lo, hi), rng.uniform(0.55, 1), rng.uniform(0.7, 1))
    c2 = c1 * rng.uniform(0.25, 0.55)
    kind = FAMILY_OF.get(cls)
    if kind is None or rng.random() >= FAMILY_P:
        kind = OBJECT_FAMILIES[int(rng.integers(len(OBJECT_FAMILIES)))]
    t = _texture(rng, h, w, kind)
    if rng.random() < 0.5:
        c1, c2 = c2, c1
    return (c1 + t[..., None] * (c2 - c1)).astype(np.float32)


def _background_colours(rng, size):
    """The backdrop, float32 [size, size, 3]: smooth blobs or a gradient between two nearby greyish colours."""
    c1 = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.3, 0.9))
    c2 = np.clip(c1 + rng.uniform(-30, 30, 3), 0, 255)
    t = _texture(rng, size, size, "blobs" if rng.random() < 0.6 else "gradient")
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
            colour = _object_colours(self.rng, y1 - y0, x1 - x0, cls)
        self.image[y0:y1, x0:x1][mask] = colour[mask]
        self.label[y0:y1, x0:x1][mask] = cls

    def shape(self, cls, cx, cy, size, angle, aspect=1.0):
        """Disc, square, triangle, bar (or a patch square) centred at (cx, cy), rotated by `angle` radians.

        `size`: disc radius, triangle circumradius, or rectangle half-height (half-width = size * aspect).
        """
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
        """An annulus; its hole is reset to the background, so that a patch in it sits on background."""
        where, dy, dx = self.box(cx, cy, r_out)
        d2 = dx * dx + dy * dy
        y0, y1, x0, x1 = where
        hole = d2 < r_in * r_in
        self.paint(where, hole, BACKGROUND, colour=self.background[y0:y1, x0:x1])
        self.paint(where, (d2 >= r_in * r_in) & (d2 <= r_out * r_out), RING)

    def only_background(self, cx, cy, reach):
        """Whether the square of half-side `reach` around (cx, cy) is all background so far."""
        y0, y1 = max(int(cy - reach), 0), min(int(math.ceil(cy + reach)) + 1, self.size)
        x0, x1 = max(int(cx - reach), 0), min(int(math.ceil(cx + reach)) + 1, self.size)
        return not self.label[y0:y1, x0:x1].any()


def generate(data_seed, split_tag, index, size=96):
    """One synthetic image: (rgb uint8 [size, size, 3], label uint8 [size, size]); see the module docstring."""
    rng = np.random.default_rng([data_seed, split_tag, index])
    k = size / 96                                     # every length below is for 96 x 96
    canvas = _Canvas(rng, size)

    def draw(bounds):
        return rng.uniform(*bounds) * k

    count = rng.integers(SHAPES_PER_IMAGE[0], SHAPES_PER_IMAGE[1] + 1)
    items = [int(cls) for cls in rng.integers(DISC, BAR + 1, count)]
    items += [RING] * int(rng.choice(len(RINGS_PER_IMAGE_P), p=RINGS_PER_IMAGE_P))
    rng.shuffle(items)
    rings = []
    for cls in items:
        angle = rng.uniform(0, math.pi)
        if cls == RING:
            r_in = draw(RING_INNER_RADIUS)
            r_out = r_in + draw(RING_THICKNESS)
            half = draw(PATCH_HALF_SIDE)
            cx, cy = rng.uniform(r_in, size - r_in, 2)       # the hole, and so its patch, is in the image
            canvas.ring(cx, cy, r_in, r_out)
            room = r_in - half * math.sqrt(2) - 2 * k        # the patch stays clear of the ring
            rho, phi = room * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            canvas.shape(PATCH_IN, cx + rho * math.cos(phi), cy + rho * math.sin(phi), half, angle)
            rings.append((cx, cy, r_out))
            continue
        cx, cy = rng.uniform(0, size, 2)                     # shapes may stick out of the image
        if cls == DISC:
            canvas.shape(cls, cx, cy, draw(DISC_RADIUS), angle)
        elif cls == SQUARE:
            canvas.shape(cls, cx, cy, draw(SQUARE_HALF_SIDE), angle)
        elif cls == TRIANGLE:
            canvas.shape(cls, cx, cy, draw(TRIANGLE_CIRCUMRADIUS), angle)
        else:
            half_width = draw(BAR_HALF_WIDTH)
            canvas.shape(cls, cx, cy, half_width, angle, aspect=draw(BAR_HALF_LENGTH) / half_width)

    for _ in range(int(rng.integers(LOOSE_PATCHES[0], LOOSE_PATCHES[1] + 1))):
        half = draw(PATCH_HALF_SIDE)
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
