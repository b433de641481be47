"""kernels/upsampled_ce.py: the fused upsampled cross-entropy against its torch reference (float64 ground truth),
its edge cases, layouts, determinism, torch.compile, and the absence of any full-resolution tensor."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import kernels.upsampled_ce as uce
from kernel_testing import DEVICE, DTYPES, GO, compare, laid_out, layout_copies, randn
from kernel_testing import both_kernels  # noqa: F401  (the `fused` fixture: Triton and C++ kernels)
from kernels import upsampled_cross_entropy
from kernels.upsampled_ce import upsampled_cross_entropy_reference

# (B, K, h, w, H, W): labels not a multiple of the logits (5x7 -> 17x23), H == h, K = 150 (chunked classes),
# downsampling, more than one backward tile per image (h > 8, w > 16), batch 1, odd sizes everywhere.
SHAPES = [(2, 19, 5, 7, 17, 23), (1, 11, 4, 6, 4, 6), (1, 150, 3, 5, 9, 16), (2, 11, 9, 8, 4, 5),
          (1, 19, 10, 18, 21, 37)]


def make_labels(b, k, hh, ww, seed=0, ignored=0.15, outside=0.05):
    """[b, hh, ww] int64 labels: classes in [0, k), a fraction `ignored` of 255, a fraction `outside` of values
    outside [0, k) that are not 255 (k, k + 7, -1), which the op ignores too."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, k, (b, hh, ww), generator=g)
    r = torch.rand(b, hh, ww, generator=g)
    lab[r < ignored] = 255
    bad = torch.tensor([k, k + 7, -1])[torch.randint(0, 3, (b, hh, ww), generator=g)]
    lab = torch.where((r >= ignored) & (r < ignored + outside), bad, lab)
    return lab.to(DEVICE)


def ce(labels, ignore_index=255):
    return (lambda x: upsampled_cross_entropy(x, labels, ignore_index),
            lambda x: upsampled_cross_entropy_reference(x, labels, ignore_index))


@pytest.fixture(params=["default", "small"])
def tiles(request, monkeypatch):
    """The shipped tiling, and the smallest one (16-class chunks, 2x16 backward tiles, 16-pixel row segments) so
    that small tensors go through several class chunks, tiles and segments of every loop."""
    if request.param == "small":
        monkeypatch.setattr(uce, "FWD_K_BLOCK", 16)
        monkeypatch.setattr(uce, "FWD_TILE", 256)
        monkeypatch.setattr(uce, "BWD_K_BLOCK", 16)
        monkeypatch.setattr(uce, "BWD_TILE", (2, 16, 16))
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(fused, shape, dtype):
    b, k, h, w, hh, ww = shape
    fn, ref = ce(make_labels(b, k, hh, ww, seed=k))
    compare(fn, ref, [randn(b, k, h, w, dtype=dtype, scale=3)])


def test_small_tiles_reach_every_loop(fused, tiles):
    b, k, h, w, hh, ww = 1, 19, 5, 18, 11, 37  # small tiles: 2 class chunks, 3 x 2 backward tiles
    fn, ref = ce(make_labels(b, k, hh, ww, seed=1))
    compare(fn, ref, [randn(b, k, h, w, scale=3)])


@pytest.mark.parametrize("go", [1.0, -2.5])
def test_grad_output(fused, go):
    fn, ref = ce(make_labels(2, 19, 11, 13))
    compare(fn, ref, [randn(2, 19, 4, 5, scale=2)], go=go)


def test_all_pixels_ignored_gives_zero_and_zero_gradient(fused):
    x = randn(2, 19, 4, 5).requires_grad_()
    lab = torch.full((2, 9, 11), 255, dtype=torch.int64, device=DEVICE)
    lab[0, 0, :4] = torch.tensor([19, 40, -1, -7])  # outside [0, K): ignored too
    loss = upsampled_cross_entropy(x, lab)
    (loss * GO).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert upsampled_cross_entropy_reference(x.detach(), lab).item() == 0.0


def test_labels_outside_the_classes_count_as_ignored(fused):
    x = randn(1, 11, 5, 6, scale=2)
    lab = make_labels(1, 11, 13, 14, outside=0.3)
    ignored = torch.where((lab >= 0) & (lab < 11), lab, 255)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = upsampled_cross_entropy(xa, lab), upsampled_cross_entropy(xb, ignored)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(xa.grad, xb.grad)


def test_other_ignore_index_and_uint8_labels(fused):
    lab = make_labels(2, 19, 9, 10, ignored=0.0)
    lab = torch.where(lab < 0, 3, lab).to(torch.uint8)  # uint8 cannot hold -1
    fn, ref = ce(lab, ignore_index=3)
    compare(fn, ref, [randn(2, 19, 4, 5, scale=2)])


def test_wide_rows_and_many_tiles(fused):
    """Output rows wider than the C++ backward's 64-pixel chunks (csrc/upsampled_ce.h: ~130 output columns reach each
    8-column tile of 20), several row tiles, column tiles and 32-class chunks (K = 40), with grad_output != 1."""
    b, k, h, w, hh, ww = 1, 40, 9, 20, 13, 300
    fn, ref = ce(make_labels(b, k, hh, ww, seed=5))
    compare(fn, ref, [randn(b, k, h, w, scale=3)])


def test_more_classes_than_a_tile_holds(fused):
    """K = 300: two class groups of the C++ backward's tiles (at most 256 classes each, csrc/upsampled_ce.h), each
    recomputing the log-sum-exp over all 300; five 64-class chunks of the Triton kernels."""
    b, k, h, w, hh, ww = 1, 300, 3, 5, 7, 11
    fn, ref = ce(make_labels(b, k, hh, ww, seed=6))
    compare(fn, ref, [randn(b, k, h, w, scale=3)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_extreme_logits_finite(fused, dtype):
    # +-1e4: exp overflows without the max shift; interpolation between +1e4 and -1e4 neighbours too.
    x = (1e4 * torch.where(randn(2, 19, 4, 5, seed=1) > 0, 1.0, -1.0)).to(dtype)
    fn, ref = ce(make_labels(2, 19, 9, 11))
    (loss,), (grad,) = compare(fn, ref, [x])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and loss.item() > 1e2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_layouts_are_read_in_place(fused, layout, dtype):
    """Channels-last logits (the trainer's): no copy, the gradient in the input's layout."""
    x = laid_out(randn(2, 19, 5, 7, dtype=dtype, scale=3), layout)
    fn, ref = ce(make_labels(2, 19, 17, 23))
    with layout_copies() as copies:
        _, (g,) = compare(fn, ref, [x])
    assert not copies, copies
    assert g.stride() == x.stride()


def test_views_without_a_pixel_stride(fused):
    """A cropped map (copied once by strided_bchw) and a dense transposed one: the gradient is still right."""
    lab = make_labels(2, 11, 13, 17)
    fn, ref = ce(lab)
    compare(lambda x: fn(x[..., 1:7]), lambda x: ref(x[..., 1:7]), [randn(2, 11, 5, 9, scale=2)])
    compare(lambda x: fn(x.transpose(2, 3)), lambda x: ref(x.transpose(2, 3)), [randn(2, 11, 7, 5, scale=2)])


def test_deterministic(fused):
    x, lab = randn(1, 19, 9, 17, scale=3), make_labels(1, 19, 13, 25)  # 2 x 2 backward tiles
    runs = []
    for _ in range(2):
        xg = x.clone().requires_grad_()
        loss = upsampled_cross_entropy(xg, lab)
        (loss * GO).backward()
        runs.append((loss.detach(), xg.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])  # bitwise


def test_forward_only(fused):
    x, lab = randn(1, 19, 5, 7, dtype=torch.bfloat16), make_labels(1, 19, 17, 23)
    with torch.no_grad():
        loss = upsampled_cross_entropy(x.requires_grad_(), lab)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, upsampled_cross_entropy_reference(x.double(), lab), rtol=1e-5, atol=1e-6)


def test_compiles_through_the_custom_op(fused):
    x, lab = randn(2, 19, 5, 7, seed=3), make_labels(2, 19, 17, 23)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = lambda x: upsampled_cross_entropy(x, lab)
    torch.compile(fn, backend=recording_backend, fullgraph=True)(x.clone())
    called = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(c.startswith("segkd.upsampled_cross_entropy") for c in called), called
    eager_x, comp_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = fn(eager_x)
    eager.backward()
    comp = torch.compile(fn, backend="aot_eager", fullgraph=True)(comp_x)
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(comp_x.grad, eager_x.grad, rtol=1e-6, atol=1e-9)


class NewTensors(TorchDispatchMode):
    """Records (op, shape) of every tensor of at least `limit` elements that an op returns while active, except
    tensors sharing storage with `inputs` (views of them, the interpreter's copy back into them)."""

    def __init__(self, limit, inputs):
        super().__init__()
        self.limit, self.shapes = limit, []
        self.known = {x.untyped_storage().data_ptr() for x in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(o) and o.numel() >= self.limit and o.untyped_storage().data_ptr() not in self.known:
                self.shapes.append((str(func), tuple(o.shape)))
        return out


def test_no_full_resolution_tensor(fused):
    """Nothing of B*K*H*W elements, nor even of B*H*W (a full-resolution log-sum-exp), is allocated; the unfused
    reference does allocate them, so the check sees what it looks for."""
    b, k, h, w, hh, ww = 1, 5, 3, 4, 24, 32  # B*H*W = 768 > B*K*h*w = 60
    x, lab = randn(b, k, h, w).requires_grad_(), make_labels(b, k, hh, ww)
    with NewTensors(b * hh * ww, [x, lab]) as seen:
        upsampled_cross_entropy(x, lab).backward()
    assert not seen.shapes, seen.shapes
    assert x.grad is not None
    with NewTensors(b * k * hh * ww, [x, lab]) as seen:
        upsampled_cross_entropy_reference(x, lab).backward()
    assert (b, k, hh, ww) in [s for _, s in seen.shapes]


def test_reference_is_f_cross_entropy():
    """With every label valid the reference is exactly the unfused formula of the issue."""
    x, lab = torch.randn(2, 19, 5, 7), torch.randint(0, 19, (2, 17, 23))
    lab[0, :3] = 255
    want = F.cross_entropy(F.interpolate(x, size=(17, 23), mode="bilinear", align_corners=False), lab,
                           ignore_index=255)
    torch.testing.assert_close(upsampled_cross_entropy_reference(x, lab), want, rtol=1e-6, atol=0)


def test_cpu_tensors_take_the_reference_under_auto(monkeypatch):
    monkeypatch.delenv("SEGKD_KERNELS", raising=False)
    if DEVICE == "cuda":
        pytest.skip("auto picks Triton for the CUDA tensors of this machine")
    monkeypatch.setattr(uce, "upsampled_cross_entropy_forward", lambda *a: pytest.fail("Triton ran under auto"))
    x = randn(1, 19, 3, 5).requires_grad_()
    upsampled_cross_entropy(x, make_labels(1, 19, 7, 9)).backward()
    assert x.grad is not None


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="upsampled_cross_entropy"):
        upsampled_cross_entropy(randn(1, 19, 3, 5), make_labels(2, 19, 7, 9))
    with pytest.raises(ValueError, match="integer"):
        upsampled_cross_entropy(randn(1, 19, 3, 5), randn(1, 7, 9))


@pytest.mark.parametrize("x_shape, y_shape", [((1, 3, 0, 4), (1, 5, 5)), ((1, 3, 2, 0), (1, 5, 5)),
                                              ((1, 0, 2, 2), (1, 5, 5)), ((1, 3, 2, 2), (1, 0, 5))], ids=str)
def test_empty_maps_are_named(fused, x_shape, y_shape):
    """Zero-sized logits or labels: one clear error on every path (a zero-sized stencil would read out of bounds)."""
    with pytest.raises(ValueError, match="at least one class and one pixel"):
        upsampled_cross_entropy(randn(*x_shape), torch.zeros(y_shape, dtype=torch.long, device=DEVICE))


def test_exported():
    assert kernels.upsampled_cross_entropy is upsampled_cross_entropy and "upsampled_cross_entropy" in kernels.__all__


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [19, 150, 171])
def test_larger_shapes(fused, k, dtype):
    fn, ref = ce(make_labels(2, k, 64, 128, seed=k))
    compare(fn, ref, [randn(2, k, 8, 16, dtype=dtype, scale=4)])


# ---------------------------------------------------------------- align_corners=True (APD's code convention, issue 12)
AC_SHAPES = SHAPES + [(2, 19, 1, 7, 8, 9), (1, 19, 5, 7, 1, 9), (1, 21, 8, 8, 8, 8)]  # h == 1, H == 1, identity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", AC_SHAPES, ids=str)
def test_align_corners_matches_reference(fused, shape, dtype):
    """align_corners=True against F.interpolate(..., align_corners=True) + cross-entropy in float64; the C++ backend
    has no such rule, so SEGKD_KERNELS=cuda takes the reference on CPU tensors (and Triton on CUDA ones)."""
    b, k, h, w, hh, ww = shape
    lab = make_labels(b, k, hh, ww, seed=k)
    compare(lambda x: upsampled_cross_entropy(x, lab, 255, align_corners=True),
            lambda x: upsampled_cross_entropy_reference(x, lab, 255, align_corners=True),
            [randn(b, k, h, w, dtype=dtype, scale=3)])


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_align_corners_small_tiles_and_layouts(tiles, layout, monkeypatch):
    """Every loop of the Triton kernels (class chunks, several backward tiles and row segments) with the
    align-corners rule, and both layouts read in place."""
    from kernel_testing import force_backend

    force_backend("triton", monkeypatch)
    b, k, h, w, hh, ww = 1, 19, 5, 18, 11, 37
    lab = make_labels(b, k, hh, ww, seed=2)
    x = laid_out(randn(b, k, h, w, scale=3), layout)
    _, (g,) = compare(lambda x: upsampled_cross_entropy(x, lab, 255, align_corners=True),
                      lambda x: upsampled_cross_entropy_reference(x, lab, 255, align_corners=True), [x])
    assert g.stride() == x.stride()


def test_align_corners_is_not_the_default_rule():
    """The two rules differ (a test that passes with the flag ignored would prove nothing)."""
    x, lab = randn(1, 19, 5, 7, scale=3), make_labels(1, 19, 17, 23)
    a = upsampled_cross_entropy_reference(x, lab, 255, align_corners=True)
    assert abs(a.item() - upsampled_cross_entropy_reference(x, lab, 255).item()) > 1e-3


# ---------------------------------------------------------------- upsampled_pixel_kl: KD at the label size (issue 12)
KD_SHAPES = [(2, 19, 5, 7, 17, 23), (1, 150, 3, 5, 9, 16), (2, 11, 9, 8, 4, 5), (2, 19, 1, 7, 8, 9),
             (1, 21, 8, 8, 8, 8)]


@pytest.fixture
def triton_path(monkeypatch):
    """upsampled_pixel_kl has Triton and torch paths only."""
    from kernel_testing import force_backend

    force_backend("triton", monkeypatch)


@pytest.mark.parametrize("align_corners", [False, True], ids=["half-pixel", "align_corners"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KD_SHAPES, ids=str)
def test_kd_matches_reference(triton_path, shape, dtype, align_corners):
    b, k, h, w, hh, ww = shape
    t = randn(b, k, h, w, dtype=dtype, scale=3, seed=7)
    compare(lambda s: kernels.upsampled_pixel_kl(s, t, (hh, ww), 2.0, scale=0.5, align_corners=align_corners),
            lambda s: uce.upsampled_pixel_kl_reference(s, t, (hh, ww), 2.0, 0.5, align_corners),
            [randn(b, k, h, w, dtype=dtype, scale=3)])


def test_kd_is_pixel_kl_of_the_upsampled_logits(triton_path):
    """Against the unfused form APD's code computes: interpolate both logits, then pixel_kl (T^2 KL pixel mean)."""
    s, t = randn(2, 19, 5, 7, scale=3), randn(2, 19, 5, 7, scale=3, seed=3)
    up = lambda x: F.interpolate(x, size=(17, 23), mode="bilinear", align_corners=True)
    compare(lambda s: kernels.upsampled_pixel_kl(s, t, (17, 23), 4.0, align_corners=True),
            lambda s: kernels.pixel_kl(up(s), up(t), 4.0), [s])


def test_kd_writes_no_label_size_tensor(triton_path):
    """Nothing of B*H*W elements is allocated forward or backward; the reference does allocate [B, K, H, W]."""
    b, k, h, w, hh, ww = 1, 5, 3, 4, 24, 32
    s, t = randn(b, k, h, w).requires_grad_(), randn(b, k, h, w, seed=4)
    with NewTensors(b * hh * ww, [s, t]) as seen:
        kernels.upsampled_pixel_kl(s, t, (hh, ww), 2.0, align_corners=True).backward()
    assert not seen.shapes and s.grad is not None, seen.shapes
    with NewTensors(b * k * hh * ww, [s, t]) as seen:
        uce.upsampled_pixel_kl_reference(s, t, (hh, ww), 2.0, 1.0, True).backward()
    assert (b, k, hh, ww) in [shape for _, shape in seen.shapes]


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_kd_small_tiles_and_layouts_read_in_place(triton_path, tiles, layout):
    b, k, h, w, hh, ww = 1, 19, 5, 18, 11, 37
    s, t = laid_out(randn(b, k, h, w, scale=3), layout), laid_out(randn(b, k, h, w, scale=3, seed=5), layout)
    _, (g,) = compare(lambda s: kernels.upsampled_pixel_kl(s, t, (hh, ww), 1.0, align_corners=True),
                      lambda s: uce.upsampled_pixel_kl_reference(s, t, (hh, ww), 1.0, 1.0, True), [s])
    assert g.stride() == s.stride()
    s = s.detach().requires_grad_()
    with layout_copies() as copies:
        kernels.upsampled_pixel_kl(s, t, (hh, ww), 1.0, align_corners=True).backward()
    assert s.shape not in copies


def test_kd_teacher_requiring_grad_takes_the_reference_and_bad_shapes_are_named(triton_path):
    s, t = randn(1, 19, 4, 5, scale=3), randn(1, 19, 4, 5, scale=3, seed=2)
    compare(lambda s, t: kernels.upsampled_pixel_kl(s, t, (9, 11), 1.0),
            lambda s, t: uce.upsampled_pixel_kl_reference(s, t, (9, 11), 1.0), [s, t], grad_idx=(0, 1))
    with pytest.raises(ValueError, match="upsampled_pixel_kl"):
        kernels.upsampled_pixel_kl(s, t[:, :5], (9, 11))
