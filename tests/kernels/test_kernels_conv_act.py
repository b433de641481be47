"""kernels/conv_act.py: relu(conv + bias [+ residual]) against float64, and its backend machinery: the first call of a
configuration checks the fused backend against the reference, a backend that raises or disagrees is dropped (one
warning) and the reference answers, SEGKD_KERNELS=torch never calls it, a gradient runs the reference, and
torch.compile traces the op without a graph break."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from kernels import conv_act, conv_bias_relu
from kernels.conv_act import conv_bias_relu_reference

# (B, C_in, H, W, C_out, k, stride, padding, dilation, groups): 1x1, strided 3x3, dilated 3x3 (padding = dilation,
# as the dilated ResNets), grouped, odd sizes, batch 1, a 7x7 stem conv
CONVS = [(2, 8, 9, 11, 16, 1, 1, 0, 1, 1), (1, 6, 13, 10, 12, 3, 2, 1, 1, 1), (2, 5, 12, 9, 7, 3, 1, 2, 2, 1),
         (1, 8, 7, 7, 8, 3, 1, 4, 4, 2), (2, 3, 17, 15, 4, 7, 2, 3, 1, 1)]


def make(case, dtype=torch.float32, residual=True, channels_last=False, seed=0):
    b, cin, h, w, cout, k, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g)
    weight = torch.randn(cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5
    bias = torch.randn(cout, generator=g)
    ho, wo = ((n + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for n in (h, w))
    z = torch.randn(b, cout, ho, wo, generator=g) if residual else None
    tensors = [t if t is None else t.to(dtype) for t in (x, weight, bias, z)]
    if channels_last:
        tensors = [t if t is None or t.dim() != 4 else t.contiguous(memory_format=torch.channels_last)
                   for t in tensors]
    return tensors, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def float64(tensors, args):
    x, weight, bias, z = (t if t is None else t.double() for t in tensors)
    y = F.conv2d(x, weight, bias, args["stride"], args["padding"], args["dilation"], args["groups"])
    return (y if z is None else y + z).clamp_min(0)


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Each test starts with no configuration checked and no warning given."""
    monkeypatch.setattr(conv_act, "_verdicts", {})
    monkeypatch.setattr(conv_act, "_warned", set())


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_float64(case, residual, dtype, tol):
    tensors, args = make(case, dtype, residual)
    want = float64(tensors, args)
    got = conv_bias_relu(*tensors, **args)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.double() - want).norm() <= tol * want.norm()
    assert (got >= 0).all() and (want == 0).any()  # the ReLU clamps something in every case


def test_no_bias_and_channels_last_keep_their_layout():
    tensors, args = make(CONVS[1], channels_last=True)
    tensors[2] = None
    got = conv_bias_relu(*tensors, **args)
    torch.testing.assert_close(got.double(), float64(tensors, args), rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)


class Backend:
    """A stand-in fused backend for CPU tensors: the reference times `scale`, or raising; counts its calls."""

    def __init__(self, scale=1.0, raises=False):
        self.scale, self.raises, self.calls = scale, raises, 0

    def __call__(self, *args):
        self.calls += 1
        if self.raises:
            raise RuntimeError("no execution plan for this configuration")
        return conv_bias_relu_reference(*args) * self.scale


def test_a_backend_that_agrees_is_checked_once_then_used(monkeypatch):
    backend = Backend(scale=1.0 + 1e-6)  # within fp32's tolerance, but not bitwise the reference
    monkeypatch.setitem(conv_act.BACKENDS, "cpu", backend)
    tensors, args = make(CONVS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            got = conv_bias_relu(*tensors, **args)
    assert backend.calls == 3 and list(conv_act._verdicts.values()) == [True]
    torch.testing.assert_close(got, conv_bias_relu_reference(*tensors, **args) * backend.scale)
    tensors2, args2 = make(CONVS[1])  # another configuration: checked on its own first call
    conv_bias_relu(*tensors2, **args2)
    assert len(conv_act._verdicts) == 2


@pytest.mark.parametrize("backend,why", [(Backend(scale=1.1), "disagreed"), (Backend(raises=True), "raised")])
def test_a_backend_that_disagrees_or_raises_is_dropped_with_one_warning(monkeypatch, backend, why):
    monkeypatch.setitem(conv_act.BACKENDS, "cpu", backend)
    tensors, args = make(CONVS[2])
    want = float64(tensors, args)
    with pytest.warns(RuntimeWarning, match=f"fused cpu convolution {why}"):
        first = conv_bias_relu(*tensors, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, for this configuration or another
        later = conv_bias_relu(*tensors, **args)
        other = make(CONVS[3])
        conv_bias_relu(*other[0], **other[1])
    assert backend.calls == 2  # the first call of each configuration only
    for got in (first, later):
        assert (got.double() - want).norm() <= 1e-5 * want.norm()


def test_segkd_kernels_torch_never_calls_the_backend(monkeypatch):
    backend = Backend()
    monkeypatch.setitem(conv_act.BACKENDS, "cpu", backend)
    monkeypatch.setenv("SEGKD_KERNELS", "torch")
    tensors, args = make(CONVS[0])
    conv_bias_relu(*tensors, **args)
    assert backend.calls == 0 and not conv_act._verdicts


def test_inputs_that_need_a_gradient_run_the_differentiable_reference(monkeypatch):
    backend = Backend()
    monkeypatch.setitem(conv_act.BACKENDS, "cpu", backend)
    tensors, args = make(CONVS[1])
    x = tensors[0].requires_grad_()
    conv_bias_relu(x, *tensors[1:], **args).sum().backward()
    x64 = tensors[0].detach().double().requires_grad_()
    float64([x64, *tensors[1:]], args).sum().backward()
    assert backend.calls == 0
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_without_a_fused_backend_the_plain_ops_run_outside_the_custom_op(monkeypatch):
    """CPU tensors (no fused backend): the reference's ops directly, which torch.compile sees and can fuse."""
    seen = []
    monkeypatch.setattr(conv_act, "_run", lambda *a: seen.append(a) or conv_bias_relu_reference(*a))
    tensors, args = make(CONVS[0])
    conv_bias_relu(*tensors, **args)
    assert not seen
    monkeypatch.setitem(conv_act.BACKENDS, "cpu", Backend())
    conv_bias_relu(*tensors, **args)
    assert len(seen) == 1


def test_the_fake_kernel_gives_the_output_shape_and_layout(monkeypatch):
    backend = Backend()
    monkeypatch.setitem(conv_act.BACKENDS, "cpu", backend)
    tensors, args = make(CONVS[1], channels_last=True)
    with FakeTensorMode() as mode:
        fake = [t if t is None else mode.from_tensor(t) for t in tensors]
        out = conv_bias_relu(*fake, **args)
    want = conv_bias_relu_reference(*tensors, **args)
    assert out.shape == want.shape and out.stride() == want.stride() and backend.calls == 0


def test_compiles_without_a_graph_break(monkeypatch):
    backend = Backend()
    monkeypatch.setitem(conv_act.BACKENDS, "cpu", backend)
    tensors, args = make(CONVS[0])
    fn = torch.compile(lambda *t: conv_bias_relu(*t, **args) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(*tensors), conv_bias_relu_reference(*tensors, **args) * 2)
    assert backend.calls == 1  # the custom op ran, with the fused backend


def test_exported_from_kernels_as_an_inference_op():
    assert kernels.conv_bias_relu is conv_bias_relu
    assert "conv_bias_relu" in kernels.INFERENCE_OPS and "conv_bias_relu" not in kernels.LOSS_OPS


def test_string_padding_is_refused():
    tensors, args = make(CONVS[0])
    with pytest.raises(ValueError, match="padding='same'"):
        conv_bias_relu(*tensors, **{**args, "padding": "same"})
