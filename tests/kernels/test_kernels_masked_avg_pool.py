"""kernels/masked_avg_pool.py: the fused op against its torch reference and against float64 numpy formulas."""
import numpy as np
import pytest
import torch

import kernels
from kernel_testing import DEVICE, DTYPES, RNG, compare, laid_out, layout_copies, randn, t64
from kernel_testing import both_kernels  # noqa: F401  (the `fused` fixture: Triton and C++ kernels)
from kernels import masked_avg_pool
from kernels.masked_avg_pool import masked_avg_pool_reference

# (B, C, H, W, K): feature widths that are and are not multiples of the channel block, the awkward class counts.
SHAPES = [(2, 40, 5, 7, 19), (1, 11, 3, 33, 11), (2, 21, 4, 4, 21), (1, 24, 3, 5, 150), (1, 9, 2, 9, 171)]


def labels_for(b, h, w, k, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, k, (b, h, w), generator=g)
    lab[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    return lab.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(fused, shape, dtype):
    b, c, h, w, k = shape
    lab = labels_for(b, h, w, k)
    compare(lambda f: masked_avg_pool(f, lab, k), lambda f: masked_avg_pool_reference(f, lab, k),
            [randn(b, c, h, w, dtype=dtype)])


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64], ids=str)
def test_label_dtypes_and_out_of_range_values(fused, label_dtype):
    lab = labels_for(2, 5, 7, 19)
    lab[0, 0, :3] = 25  # outside [0, K): excluded like the ignore index
    if label_dtype != torch.uint8:
        lab[1, 1, :2] = -1
    lab = lab.to(label_dtype)
    compare(lambda f: masked_avg_pool(f, lab, 19), lambda f: masked_avg_pool_reference(f, lab, 19),
            [randn(2, 16, 5, 7)])


def test_absent_classes_and_all_ignored_image(fused):
    lab = labels_for(2, 5, 7, 4)  # classes 4..18 never occur
    lab[1] = 255  # every pixel of image 1 ignored
    (protos, counts), _ = compare(lambda f: masked_avg_pool(f, lab, 19),
                                  lambda f: masked_avg_pool_reference(f, lab, 19), [randn(2, 16, 5, 7)])
    assert torch.equal(counts[:, 4:], torch.zeros_like(counts[:, 4:])) and torch.equal(counts[1], torch.zeros(19))
    assert torch.equal(protos[1], torch.zeros_like(protos[1])) and torch.isfinite(protos).all()


def test_counts_are_a_histogram(fused):
    lab = labels_for(2, 6, 5, 19)
    _, counts = masked_avg_pool(randn(2, 8, 6, 5), lab, 19)
    expected = torch.stack([torch.bincount(l[l != 255], minlength=19) for l in lab.reshape(2, -1)]).float()
    assert torch.equal(counts, expected)


def test_ignore_index_inside_class_range(fused):
    lab = labels_for(1, 5, 7, 19, ignore_frac=0)
    compare(lambda f: masked_avg_pool(f, lab, 19, ignore_index=3),
            lambda f: masked_avg_pool_reference(f, lab, 19, ignore_index=3), [randn(1, 16, 5, 7)])


def test_float_labels_are_refused():
    with pytest.raises(ValueError, match="integer"):
        masked_avg_pool(randn(1, 4, 3, 3), torch.zeros(1, 3, 3, device=DEVICE), 19)


# ---------------------------------------------------------------- memory layouts (issue 12)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 40, 5, 7, 19), (1, 24, 3, 5, 150)], ids=str)
def test_layouts_match_reference(fused, shape, dtype, layout):
    b, c, h, w, k = shape
    lab = labels_for(b, h, w, k)
    f = laid_out(randn(b, c, h, w, dtype=dtype), layout)
    _, (g,) = compare(lambda f: masked_avg_pool(f, lab, k), lambda f: masked_avg_pool_reference(f, lab, k), [f])
    assert g.stride() == f.stride()  # the gradient comes back in the features' memory format


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_layouts_are_read_in_place(fused, layout):
    f = laid_out(randn(2, 40, 5, 7), layout).requires_grad_()
    with layout_copies() as copies:
        protos, _ = masked_avg_pool(f, labels_for(2, 5, 7, 19), 19)
        (protos * randn(*protos.shape)).sum().backward()
    assert f.shape not in copies and f.grad.stride() == f.stride()  # the [B, K, C] prototypes may be copied


def test_views_without_a_pixel_stride_are_copied_and_correct(fused):
    f_full = randn(2, 40, 5, 9).requires_grad_()
    lab = labels_for(2, 5, 7, 19)
    w = randn(2, 19, 40)
    (masked_avg_pool(f_full[..., :7], lab, 19)[0] * w).sum().backward()
    f_ref = f_full.detach().double().requires_grad_()
    (masked_avg_pool_reference(f_ref[..., :7], lab, 19)[0] * w).sum().backward()
    torch.testing.assert_close(f_full.grad, f_ref.grad.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [19, 150])
def test_larger_shapes(fused, dtype, k):
    lab = labels_for(2, 33, 65, k)
    compare(lambda f: masked_avg_pool(f, lab, k), lambda f: masked_avg_pool_reference(f, lab, k),
            [randn(2, 130, 33, 65, dtype=dtype)])


# ---------------------------------------------------------------- against float64 numpy formulas
def test_masked_avg_pool_random_and_absent():
    r = RNG(3)
    b, c, h, w, k = 2, 6, 5, 7, 5
    f = r.normal(0, 1, (b, c, h, w))
    lab = r.integers(0, k - 1, (b, h, w))  # class k-1 never appears
    lab[0, 0, :] = 255
    protos, counts = kernels.masked_avg_pool(t64(f).float(), t64(lab), k)
    for i in range(b):
        for cls in range(k):
            m = lab[i] == cls
            assert counts[i, cls].item() == m.sum()
            want = f[i][:, m].mean(1) if m.any() else np.zeros(c)
            np.testing.assert_allclose(protos[i, cls].numpy(), want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(protos).all()


def test_masked_avg_pool_by_hand():
    f = torch.tensor([[1.0, 3.0], [10.0, 20.0]]).reshape(1, 1, 2, 2)  # values 1, 3, 10, 20
    lab = torch.tensor([[0, 0], [1, 255]]).reshape(1, 2, 2)
    protos, counts = kernels.masked_avg_pool(f, lab, 3)
    assert protos[0, :, 0].tolist() == [2.0, 10.0, 0.0]
    assert counts[0].tolist() == [2.0, 1.0, 0.0]


# ---------------------------------------------------------------- normalize=True: prototypes of n(f) (APD, issue 12)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normalised_matches_reference(fused, shape, dtype):
    b, c, h, w, k = shape
    lab = labels_for(b, h, w, k)
    compare(lambda f: masked_avg_pool(f, lab, k, normalize=True),
            lambda f: masked_avg_pool_reference(f, lab, k, normalize=True), [randn(b, c, h, w, dtype=dtype, scale=3.0)])


def test_normalised_zero_pixels_and_ignored_labels(fused):
    """A zero feature vector normalises to zero (the norm clamps at EPS), in value and gradient, as F.normalize."""
    lab = labels_for(2, 5, 7, 19)
    lab[0, 1, 1] = 3
    f = randn(2, 40, 5, 7)
    f[0, :, 1, 1] = 0
    (protos, _), (g,) = compare(lambda f: masked_avg_pool(f, lab, 19, normalize=True),
                                lambda f: masked_avg_pool_reference(f, lab, 19, normalize=True), [f])
    assert torch.isfinite(protos).all() and torch.isfinite(g).all()
    assert torch.equal(g[1].permute(1, 2, 0)[lab[1] == 255], torch.zeros_like(g[1].permute(1, 2, 0)[lab[1] == 255]))


def test_normalised_prototypes_are_means_of_unit_vectors():
    """Against the definition in float64 numpy: per class, the mean of f / ||f|| over its pixels."""
    r = RNG(5)
    b, c, h, w, k = 2, 6, 5, 7, 5
    f = r.normal(0, 2, (b, c, h, w))
    lab = r.integers(0, k - 1, (b, h, w))
    lab[1, 0, :] = 255
    protos, _ = kernels.masked_avg_pool(t64(f), t64(lab), k, normalize=True)
    for i in range(b):
        for cls in range(k):
            m = lab[i] == cls
            unit_cols = f[i][:, m] / np.linalg.norm(f[i][:, m], axis=0, keepdims=True)
            want = unit_cols.mean(1) if m.any() else np.zeros(c)
            np.testing.assert_allclose(protos[i, cls].numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_normalised_layouts_match_reference_and_are_read_in_place(fused, dtype, layout):
    lab = labels_for(2, 5, 7, 19)
    f = laid_out(randn(2, 40, 5, 7, dtype=dtype), layout)
    _, (g,) = compare(lambda f: masked_avg_pool(f, lab, 19, normalize=True),
                      lambda f: masked_avg_pool_reference(f, lab, 19, normalize=True), [f])
    assert g.stride() == f.stride()
    f = f.detach().requires_grad_()
    with layout_copies() as copies:
        protos, _ = masked_avg_pool(f, lab, 19, normalize=True)
        (protos * randn(*protos.shape)).sum().backward()
    assert f.shape not in copies and f.grad.stride() == f.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_normalised_gradient_is_orthogonal_to_each_pixel(fused, dtype):
    """d/df of a function of f / ||f|| is orthogonal to f at every pixel (scaling f changes nothing); float64
    features are accepted on every path (computed in fp32 by the kernels)."""
    f = randn(2, 16, 5, 7).to(dtype).requires_grad_()
    lab = labels_for(2, 5, 7, 19)
    protos, _ = masked_avg_pool(f, lab, 19, normalize=True)
    (protos * randn(2, 19, 16).to(dtype)).sum().backward()
    cos = (f.grad * f.detach()).sum(1) / (f.grad.norm(dim=1) * f.detach().norm(dim=1)).clamp_min(1e-30)
    assert cos.abs().max() < 1e-5, cos.abs().max()
