"""engine/datafree/bn_hooks.py: the batch BN-statistics prior against DeepInversion's formula; the per-image
distances computed in the hooks against the keep-every-input path, and that they keep no input alive."""
import weakref

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kernels
from engine.datafree.bn_hooks import bn_distances, bn_inputs, bn_layers, layer_distance
from engine.models import build_model


def test_batch_bn_prior_matches_deepinversion_formula():
    from engine.datafree.bn_hooks import batch_prior

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 5, 3), torch.nn.BatchNorm2d(5))
    for m in net:
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(3, 3, 9, 11, requires_grad=True)
    with bn_inputs(net) as seen:
        net(x)
    got = batch_prior(seen, first_weight=10.0)
    want, h = 0.0, x.double()
    for i, m in enumerate(net):
        if isinstance(m, torch.nn.BatchNorm2d):
            flat = h.transpose(0, 1).reshape(h.shape[1], -1)
            r = (flat.mean(1) - m.running_mean.double()).norm() + (flat.var(1, unbiased=False)
                                                                    - m.running_var.double()).norm()
            want = want + (10.0 if i == 1 else 1.0) * r
        h = m.double()(h)
        m.float()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def random_stats(net, seed):
    """Non-trivial running statistics on every BN layer of `net` (in place); -> net in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in bn_layers(net):
        m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net.eval()


def conv_net(seed, widths=(3, 6, 5, 7)):
    """A random conv-BN-ReLU stack whose first layer is a convolution (so no BN input is the caller's tensor)."""
    torch.manual_seed(seed)
    layers = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]
    return random_stats(torch.nn.Sequential(*layers), seed)


RANDOM_MODELS = [("conv", 0), ("conv", 1), ("pspnet_tiny", 2), ("deeplabv3_small", 3)]


def random_model(name, seed):
    if name == "conv":
        return conv_net(seed)
    torch.manual_seed(seed)
    return random_stats(build_model(name, 8), seed)


@pytest.mark.parametrize("name,seed", RANDOM_MODELS, ids=str)
def test_hook_distances_equal_the_keep_every_input_path_in_float64(name, seed):
    """bn_distances (statistics inside each hook) against ADS's former path: keep every BN input through the
    forward, then kernels.bn_stat_distance of each; float64 models and inputs, so both round one float64 value."""
    net = random_model(name, seed).double()
    x = torch.randn(3, 3, 24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
    with torch.no_grad():
        with bn_inputs(net) as seen:
            net(x)
        old = [kernels.bn_stat_distance(x_l, mod.running_mean, mod.running_var) for mod, x_l in seen]  # L x [B]
        with bn_distances(net) as rows:
            net(x)
    assert len(rows) == len(old) == len(seen) > 2
    for got, want in zip(rows, old):
        assert got.shape == (3,) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2.5e-7, atol=0)  # float64 values, each rounded to fp32


@pytest.mark.parametrize("name,seed", RANDOM_MODELS, ids=str)
def test_hook_distances_keep_no_bn_input_alive(name, seed):
    """Inside bn_distances a no-grad forward frees each BN input before the next BN layer runs, and none is alive
    after it; inside bn_inputs every one is (so the check can see a kept input)."""
    net = random_model(name, seed)
    refs, alive_at_hook = [], []

    def watch(mod, args, out):  # registered after bn_distances' hooks: runs after each of them
        alive_at_hook.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(args[0]))

    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        with bn_distances(net) as rows:
            handles = [m.register_forward_hook(watch) for m in bn_layers(net)]
            net(x)
        for h in handles:
            h.remove()
        assert len(rows) == len(refs) > 2 and all(r() is None for r in refs)
        assert max(alive_at_hook) == 0
        with bn_inputs(net) as seen:
            refs.clear()
            handles = [m.register_forward_hook(watch) for m in bn_layers(net)]
            net(x)
            for h in handles:
                h.remove()
            assert all(r() is not None for r in refs)  # the check sees a kept input
            del seen[:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_layer_distance_no_full_fp32_copy(dtype):
    """One layer's distance allocates at most one image's worth of fp32 (the 16-bit path upcasts an image at a
    time on CPU), and matches the float64 formula on the same (rounded) values."""
    b, c, h, w = 4, 32, 48, 64
    x = (torch.randn(b, c, h, w) * 1.5 + 0.3).to(dtype)
    rm, rv = torch.rand(c) - 0.5, torch.rand(c) + 0.5
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = layer_distance(x, rm, rv)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert largest <= c * h * w * 4, f"an allocation of {largest} bytes: more than one image in fp32"
    x64 = x.double()
    want = (x64.mean((2, 3)) - rm.double()).norm(dim=1) + (x64.var((2, 3), unbiased=False) - rv.double()).norm(dim=1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_layer_distance_takes_the_cpp_kernel_under_segkd_kernels_cuda(layout, monkeypatch):
    """SEGKD_KERNELS=cuda: ADS scoring's per-layer distance runs kernels.bn_stat_distance's C++ kernel (the CPU twin
    here, reading a channels-last x in place) and equals the float64 formula."""
    from kernels import _cpp

    if _cpp.ops() is None:
        pytest.skip(f"the C++ kernels cannot be built here: {_cpp.ERROR!r}")
    monkeypatch.setenv("SEGKD_KERNELS", "cuda")
    called = []
    real = _cpp.ops()

    class Spy:
        def __getattr__(self, name):
            return lambda *a: called.append(name) or getattr(real, name)(*a)

    monkeypatch.setattr(_cpp, "ops", lambda: Spy())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, 7, generator=g) * 2 + 1
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5
    got = layer_distance(x, rm, rv)
    x64 = x.double()
    want = ((x64.mean((2, 3)) - rm.double()).norm(dim=1) + (x64.var((2, 3), unbiased=False) - rv.double()).norm(dim=1))
    assert called == ["bn_stat"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
