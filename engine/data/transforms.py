"""Joint image/label augmentation of the training pipeline, split into a parameter sampler and pure functions.

A training sample is `augment(rgb, label, params, crop)`, where `params = sample_params(rng, ...)` is drawn
from an RNG seeded with `(seed, key)` (see `engine/data/base.py`). Applying fixed parameters is deterministic
and has no randomness of its own, so another pipeline (the DALI one) reproduces a sample by feeding the same
`AugParams` to its own operators. The semantics it must match, step by step, for an image of size H x W and a
crop of size ch x cw (pixel centres sit at integer + 0.5; positions count from the top-left corner):

1. Rescale to (H', W') = (round(H * s), round(W * s)), each at least 1.
   Image: bilinear with a triangle filter widened by 1/s when shrinking (PIL `BILINEAR`, which antialiases
   like DALI `resize(antialias=True)`). Label: nearest, source row `min(floor((y + 0.5) * H / H'), H - 1)`
   and likewise for columns, so no new label value can appear.
2. Normalise the image: `(rgb / 255 - mean) / std`, per channel (ImageNet mean/std).
3. Pad to at least the crop size on the bottom and right (image with 0, i.e. the mean colour once normalised;
   label with 255), then crop the ch x cw window whose top-left corner is (top, left),
   0 <= top <= max(H' - ch, 0), 0 <= left <= max(W' - cw, 0).
4. If `flip`: mirror the crop left-right.
5. If `angle != 0`: rotate the crop by `angle` degrees counter-clockwise (as displayed, y pointing down) about
   its centre (cw / 2, ch / 2). Output pixel centre p takes the source point q = c + R(-angle) (p - c);
   the image is sampled bilinearly at q, a neighbour outside the crop counting as 0; the label takes the pixel
   containing q, or 255 when q lies outside the crop.

Steps 1-5 only ever copy label values or write 255, never blend them.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


@dataclass(frozen=True)
class AugParams:
    """Everything that decides one augmented sample; see the module docstring for how each is applied."""
    scale: float  # rescale factor s of step 1
    top: int      # crop row offset in the rescaled, padded image (step 3)
    left: int     # crop column offset
    flip: bool    # left-right mirror (step 4)
    angle: float  # rotation in degrees, counter-clockwise (step 5); 0 = none


def scaled_size(hw, scale):
    """(H, W) -> (round(H * s), round(W * s)), at least 1 each (half rounds up, not to even)."""
    return tuple(max(1, int(math.floor(v * scale + 0.5))) for v in hw)


def sample_params(rng, image_hw, crop_hw, scale_range=(0.5, 2.0), flip=True, rotate=0.0):
    """Draw AugParams for an image of size `image_hw` from `rng` (a numpy Generator).

    The draws happen in a fixed order (scale, top, left, flip, angle) so that a given RNG state always gives
    the same parameters: s ~ U[scale_min, scale_max], offsets uniform over the valid range, flip with
    probability 1/2 when enabled, angle ~ U[-rotate, rotate] when rotate > 0.
    """
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale range must satisfy 0 < min <= max, got {scale_range}")
    scale = float(rng.uniform(lo, hi))
    h, w = scaled_size(image_hw, scale)
    top = int(rng.integers(0, max(h - crop_hw[0], 0) + 1))
    left = int(rng.integers(0, max(w - crop_hw[1], 0) + 1))
    flipped = bool(rng.random() < 0.5) if flip else False
    angle = float(rng.uniform(-rotate, rotate)) if rotate > 0 else 0.0
    return AugParams(scale=scale, top=top, left=left, flip=flipped, angle=angle)


def resize_image(rgb, hw):
    """uint8 [H, W, 3] -> uint8 [h, w, 3], bilinear (antialiased when shrinking)."""
    if rgb.shape[:2] == tuple(hw):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.BILINEAR))


def nearest_indices(n, m):
    """int64 [m]: the source index of each of m outputs resampled from n, floor((j + .5) n / m) capped at n - 1."""
    return np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(np.int64), n - 1)


def resize_label(label, hw):
    """[H, W] -> [h, w], nearest: output pixel (y, x) copies source (floor((y+.5) H/h), floor((x+.5) W/w))."""
    H, W = label.shape
    h, w = hw
    if (H, W) == (h, w):
        return label
    return label[nearest_indices(H, h)][:, nearest_indices(W, w)]  # two 1-D gathers: faster than a 2-D index


def short_side_size(hw, short):
    """(H, W) -> the size whose shorter side is `short`, the longer scaled alike and truncated (torchvision's
    Resize(int), which DFAD's ExtResize(256) is)."""
    h, w = hw
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def long_side_size(hw, long):
    """(H, W) -> the size whose longer side is `long`, the shorter scaled alike and rounded (semseg's test.py:
    new_h = round(long / W * H) for a landscape image)."""
    h, w = hw
    if h >= w:
        return long, max(1, round(long * w / h))
    return max(1, round(long * h / w)), long


def resize_for_eval(rgb, label, size, side="short"):
    """--val-resize: uint8 [H, W, 3] + [H, W] resized for evaluation.
    short: both to a shorter side of `size` (image bilinear, label nearest), as DFAD's ExtResize(256);
    long:  the image alone to a longer side of `size`, the label kept (scored at its own size), as semseg's and
           APD's test with base_size."""
    if side == "long":
        return resize_image(rgb, long_side_size(rgb.shape[:2], size)), label
    hw = short_side_size(rgb.shape[:2], size)
    return resize_image(rgb, hw), resize_label(label, hw)


def crop_label(label, params, crop_hw):
    """Steps 1, 3 and 4 for the label alone, touching only the crop window: [H, W] -> [ch, cw].

    Equal to rescaling the whole label, padding, cropping and flipping (as `augment` does) because nearest
    resampling is a gather; a pipeline that resamples the image elsewhere (DALI) builds the label with this.
    """
    H, W = label.shape
    h, w = scaled_size((H, W), params.scale)
    ch, cw = crop_hw
    rows = nearest_indices(H, h)[params.top:params.top + ch]  # the identity when h == H
    cols = nearest_indices(W, w)[params.left:params.left + cw]
    out = np.full((ch, cw), IGNORE_INDEX, label.dtype)
    out[:len(rows), :len(cols)] = label[rows][:, cols]
    return out[:, ::-1] if params.flip else out


def rotation_matrix(angle, hw):
    """float64 [2, 3]: the output -> source map of `rotate` for an H x W crop, in pixel-edge coordinates.

    q = M @ (x + .5, y + .5, 1) is the source point read by output pixel (y, x); this is the matrix
    convention of DALI's warp_affine (and of OpenCV's warpAffine with WARP_INVERSE_MAP).
    """
    H, W = hw
    t = math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    # q = c + R^T (p - c) with c = (W/2, H/2), as in `rotate`
    return np.array([[cos, -sin, W / 2 - cos * W / 2 + sin * H / 2],
                     [sin, cos, H / 2 - sin * W / 2 - cos * H / 2]])


def normalize(rgb, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 [H, W, 3] -> float32 [H, W, 3]: (rgb / 255 - mean) / std."""
    scale = np.asarray([1 / (255 * s) for s in std], np.float32)
    shift = np.asarray([m / s for m, s in zip(mean, std)], np.float32)
    return rgb.astype(np.float32) * scale - shift


def pad_crop(rgb, label, top, left, crop_hw, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Normalised float32 [ch, cw, 3] image and [ch, cw] label of the window at (top, left).

    Only the part of the window inside the image is normalised; the rest is the padding (image 0, label 255),
    which is why normalisation happens here rather than on the whole rescaled image.
    """
    ch, cw = crop_hw
    h = min(rgb.shape[0] - top, ch)
    w = min(rgb.shape[1] - left, cw)
    if top < 0 or left < 0 or h <= 0 or w <= 0:
        raise ValueError(f"crop offset ({top}, {left}) is outside the {rgb.shape[:2]} image")
    image = np.zeros((ch, cw, 3), np.float32)
    out = np.full((ch, cw), IGNORE_INDEX, label.dtype)
    image[:h, :w] = normalize(rgb[top:top + h, left:left + w], mean, std)
    out[:h, :w] = label[top:top + h, left:left + w]
    return image, out


def hflip(image, label):
    """Mirror left-right: [H, W, ...] image and [H, W] label."""
    return image[:, ::-1], label[:, ::-1]


def rotate(image, label, angle):
    """Rotate float32 [H, W, C] image and [H, W] label by `angle` degrees counter-clockwise about the centre.

    One affine map for both: output pixel centre p = (x + .5, y + .5) reads source q = c + R(-angle)(p - c),
    c = (W/2, H/2). Image: bilinear at q, with out-of-image neighbours counting as 0 (the mean colour).
    Label: the pixel containing q (floor), 255 outside. Returns the image as float32 [C, H, W] (the layout
    grid_sample works in) and the label [H, W].
    """
    H, W = label.shape
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # [C, H, W] view
    if angle == 0:
        return chw.numpy(), label
    t = math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    # Counter-clockwise on screen with y down is R = [[cos, sin], [-sin, cos]] acting on (x, y);
    # the output -> source map uses its inverse, the transpose.
    px = np.arange(W, dtype=np.float32) + 0.5 - W / 2            # [W]
    py = np.arange(H, dtype=np.float32)[:, None] + 0.5 - H / 2   # [H, 1]
    qx = cos * px - sin * py + W / 2                             # [H, W] source x, pixel-edge coordinates
    qy = sin * px + cos * py + H / 2

    lx, ly = np.floor(qx).astype(np.int64), np.floor(qy).astype(np.int64)
    inside = (lx >= 0) & (lx < W) & (ly >= 0) & (ly < H)
    lab = np.full((H, W), IGNORE_INDEX, label.dtype)
    lab[inside] = label[ly[inside], lx[inside]]

    # grid_sample with align_corners=False puts pixel centres at the same half-integer positions, and
    # padding_mode="zeros" makes out-of-image neighbours 0: exactly the bilinear rule above.
    grid = np.stack([qx * (2 / W) - 1, qy * (2 / H) - 1], -1)   # [H, W, 2] in [-1, 1] = image extent
    out = torch.nn.functional.grid_sample(chw[None], torch.from_numpy(grid)[None], mode="bilinear",
                                          padding_mode="zeros", align_corners=False)  # [1, C, H, W]
    return out[0].numpy(), lab


def augment(rgb, label, params, crop_hw, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Apply fixed AugParams: uint8 [H, W, 3] + [H, W] -> float32 [3, ch, cw] normalised image, [ch, cw] label."""
    hw = scaled_size(rgb.shape[:2], params.scale)
    rgb, label = resize_image(rgb, hw), resize_label(label, hw)
    image, label = pad_crop(rgb, label, params.top, params.left, crop_hw, mean, std)
    if params.flip:
        image, label = hflip(image, label)
    image, label = rotate(image, label, params.angle)  # -> [3, ch, cw]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def eval_transform(rgb, label, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """No augmentation: uint8 [H, W, 3] + [H, W] -> float32 [3, H, W] normalised image, [H, W] label."""
    return np.ascontiguousarray(normalize(rgb, mean, std).transpose(2, 0, 1)), label
