"""kernels/ifvd.py: IFVD's fused similarity-map MSE against its torch reference in float64, against a per-pixel
float64 transcription of the formula, and the weighted class sums its backward uses."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernel_testing import DEVICE, DTYPES, GO, LAYOUT_PAIRS, compare, force_backend, laid_out, layout_copies, randn
from kernels.ifvd import class_centre_mse, class_centre_mse_reference
from kernels.masked_avg_pool import class_weighted_sums, class_weighted_sums_reference

# (B, C_s, C_t, h, w, K): student and teacher widths differ; HW odd, 1, not a multiple of any block; batch 1
SHAPES = [(2, 19, 21, 5, 7, 4), (1, 11, 150, 9, 13, 19), (1, 171, 19, 3, 5, 11), (3, 7, 5, 1, 1, 3),
          (1, 6, 9, 11, 17, 21), (2, 40, 33, 8, 9, 150)]


def make_labels(b, h, w, k, seed=0, ignored=0.2):
    """Random classes (class k-1 absent everywhere, so absent classes occur), `ignored` of the pixels 255."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, max(k - 1, 1), (b, h, w), generator=g)
    lab[torch.rand(b, h, w, generator=g) < ignored] = 255
    return lab.to(DEVICE)


def features(b, c, h, w, dtype=torch.float32, seed=None):
    return (randn(b, c, h, w, seed=seed).relu() + 0.05 * randn(b, c, h, w, seed=seed)).to(dtype)


def per_pixel64(fs, ft, labels, k, ignore=255):
    """The formula one pixel at a time in float64: its class centre, cos(f, centre) (or cos(f, f) for a pixel of
    no class), the squared difference, mean over B*h*w."""
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        y = labels[b].flatten()
        maps = []
        for f in (fs[b].double().flatten(1), ft[b].double().flatten(1)):  # [C, hw]
            m = []
            for p in range(y.numel()):
                cls = int(y[p])
                v = f[:, p]
                if 0 <= cls < k and cls != ignore:
                    centre = f[:, y == cls].mean(1)
                    m.append(float(v @ centre / (max(v.norm(), 1e-8) * max(centre.norm(), 1e-8))))
                else:
                    m.append(float(v @ v / max(v.norm(), 1e-8) ** 2))
            maps.append(m)
        total += sum((a - c) ** 2 for a, c in zip(*maps))
        n += y.numel()
    return total / n


def test_reference_is_the_per_pixel_formula():
    fs, ft = features(2, 5, 4, 3, torch.float64, seed=1), features(2, 7, 4, 3, torch.float64, seed=2)
    lab = make_labels(2, 4, 3, 4, seed=3)
    fs[0, :, 0, 0] = 0  # an all-zero feature
    got = class_centre_mse_reference(fs, ft, lab, 4).item()
    assert got == pytest.approx(per_pixel64(fs, ft, lab, 4), rel=1e-12, abs=1e-15)


def test_by_hand():
    # 3 pixels, one class for the first two. Student: (1, 0), (0, 1) -> centre (.5, .5): cos = 1/sqrt2 each.
    # Teacher: (1, 1), (2, 2) -> centre along them: cos = 1. Third pixel ignored: 1 on both sides.
    fs = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0]]).reshape(1, 2, 1, 3)
    ft = torch.tensor([[1.0, 2.0, 5.0], [1.0, 2.0, 1.0]]).reshape(1, 2, 1, 3)
    lab = torch.tensor([[[0, 0, 255]]])
    want = 2 * (1 - 2 ** -0.5) ** 2 / 3
    assert class_centre_mse(fs, ft, lab, 2).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_matches_reference(fused, shape, dtype):
    b, cs, ct, h, w, k = shape
    fs, ft = features(b, cs, h, w, dtype), features(b, ct, h, w, dtype)
    compare(lambda s, t: class_centre_mse(s, t, make_labels(b, h, w, k), k),
            lambda s, t: class_centre_mse_reference(s, t, make_labels(b, h, w, k), k), [fs, ft])


@pytest.mark.parametrize("go", [1.0, -2.5])
def test_grad_output_and_zero_features(fused, go):
    fs, ft = features(2, 19, 6, 7), features(2, 21, 6, 7)
    fs[0, :, 0, 0] = 0  # a zero feature on some pixel (ReLU gives them): cos is 0 there
    fs[1, :, 2, 3] = 0
    lab = make_labels(2, 6, 7, 5)
    lab[0, 0, 0] = 1  # the zero feature on a valid pixel in image 0; image 1's may be ignored or not
    compare(lambda s, t: class_centre_mse(s, t, lab, 5), lambda s, t: class_centre_mse_reference(s, t, lab, 5),
            [fs, ft], go=go)


@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=str)
def test_layouts_are_read_in_place(fused, layouts):
    fs = laid_out(features(2, 19, 5, 7), layouts[0])
    ft = laid_out(features(2, 21, 5, 7), layouts[1])
    lab = make_labels(2, 5, 7, 6)
    compare(lambda s, t: class_centre_mse(s, t, lab, 6), lambda s, t: class_centre_mse_reference(s, t, lab, 6),
            [fs, ft])
    s = fs.clone().requires_grad_()
    with layout_copies() as copies:
        class_centre_mse(s, ft, lab, 6).backward()
    assert not [c for c in copies if len(c) == 4], copies  # the [B, K, C] centre tables may be; features never
    assert s.grad.stride() == fs.stride()  # the gradient takes the student's layout


def test_a_channel_slice_is_read_and_written_through_its_own_strides(fused):
    """fs[:, :k] of a larger map: non-dense but read in place; the gradient buffer has other strides."""
    big = features(2, 12, 4, 5).requires_grad_()
    ft = features(2, 9, 4, 5)
    lab = make_labels(2, 4, 5, 4)
    (class_centre_mse(big[:, 3:9], ft, lab, 4) * GO).backward()
    s64 = big.detach()[:, 3:9].double().requires_grad_()
    (class_centre_mse_reference(s64, ft.double(), lab, 4) * GO).backward()
    torch.testing.assert_close(big.grad[:, 3:9].double(), s64.grad, rtol=1e-4, atol=1e-5 * s64.grad.abs().max().item())
    assert torch.count_nonzero(big.grad[:, :3]) == 0 and torch.count_nonzero(big.grad[:, 9:]) == 0


def test_all_pixels_ignored_and_single_pixel_classes(fused):
    fs, ft = features(2, 9, 4, 5), features(2, 11, 4, 5)
    lab = torch.full((2, 4, 5), 255, device=DEVICE)
    s = fs.clone().requires_grad_()
    loss = class_centre_mse(s, ft, lab, 3)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and torch.count_nonzero(s.grad) == 0  # cos(f, f) = 1 twice
    lab = torch.arange(20, device=DEVICE).reshape(1, 4, 5).repeat(2, 1, 1)  # every pixel its own class: cos = 1
    assert class_centre_mse(fs, ft, lab, 20).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_gradient_takes_the_reference(fused):
    fs, ft = features(1, 6, 4, 5).requires_grad_(), features(1, 8, 4, 5).requires_grad_()
    lab = make_labels(1, 4, 5, 3)
    class_centre_mse(fs, ft, lab, 3).backward()
    s64, t64 = fs.detach().double().requires_grad_(), ft.detach().double().requires_grad_()
    class_centre_mse_reference(s64, t64, lab, 3).backward()
    torch.testing.assert_close(ft.grad.double(), t64.grad, rtol=1e-4, atol=1e-5 * t64.grad.abs().max().item())


def test_deterministic(fused):
    fs, ft = features(2, 33, 9, 10), features(2, 40, 9, 10)
    lab = make_labels(2, 9, 10, 7)
    runs = []
    for _ in range(2):
        s = fs.clone().requires_grad_()
        loss = class_centre_mse(s, ft, lab, 7)
        loss.backward()
        runs.append((loss.detach(), s.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_compiles_through_the_custom_op(fused):
    fs, ft = features(2, 7, 4, 5), features(2, 9, 4, 5)
    lab = make_labels(2, 4, 5, 3)
    fn = torch.compile(lambda s, t: class_centre_mse(s, t, lab, 3), backend="aot_eager", fullgraph=True)
    s = fs.clone().requires_grad_()
    fn(s, ft).backward()
    s64 = fs.double().requires_grad_()
    class_centre_mse_reference(s64, ft.double(), lab, 3).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-5 * s64.grad.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "cuda"])  # masked_avg_pool's class-sum pass: Triton and C++
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_weighted_sums(backend, dtype, monkeypatch):
    force_backend(backend, monkeypatch)
    b, c, h, w, k = 2, 21, 7, 9, 5
    f = features(b, c, h, w, dtype)
    lab = make_labels(b, h, w, k)
    a, e = randn(b, h * w, seed=4), randn(b, h * w, seed=5)
    sums, ek = class_weighted_sums(f, lab, k, 255, a, e)
    ref_s, ref_e = class_weighted_sums_reference(f.double(), lab, k, 255, a.double(), e.double())
    scale = (f.double().abs().flatten(2).sum(2).max() * a.abs().max()).item()
    assert (sums.double() - ref_s).abs().max().item() <= 1e-5 * scale
    torch.testing.assert_close(ek.double(), ref_e, rtol=1e-5, atol=1e-5)
    assert ek[:, k - 1].abs().max().item() == 0  # the absent class


def test_shape_and_label_errors():
    f = features(2, 3, 4, 5)
    with pytest.raises(ValueError, match="must be"):
        class_centre_mse(f, features(2, 3, 4, 6), make_labels(2, 4, 5, 3), 3)
    with pytest.raises(ValueError, match="integer"):
        class_centre_mse(f, f, make_labels(2, 4, 5, 3).float(), 3)


def test_exported():
    assert kernels.class_centre_mse is class_centre_mse
