"""The loss math of kernels/ (the path engine/ calls) against independent float64 numpy formulas, on random
inputs and on small cases checked by hand."""
import math

import numpy as np
import pytest
import torch

import kernels

RNG = np.random.default_rng


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_pixel_kl(s, t, T, valid=None):
    ps, pt = softmax(s / T, 1), softmax(t / T, 1)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(1)  # [B, H, W]
    if valid is None:
        return T * T * kl.mean()
    return T * T * kl[valid].sum() / max(valid.sum(), 1)


def np_channel_kl(s, t, T):
    b, c = s.shape[:2]
    qs, qt = softmax(s.reshape(b, c, -1) / T, 2), softmax(t.reshape(b, c, -1) / T, 2)
    return T * T * (qt * (np.log(qt) - np.log(qs))).sum() / (b * c)


def unit(v):
    n = np.sqrt((v * v).sum())
    return v / max(n, 1e-6)


def np_angular(s, t, mode):
    b, c, h, w = s.shape
    per = []
    for i in range(b):
        if mode == "layer":
            per.append(((unit(s[i].ravel()) - unit(t[i].ravel())) ** 2).sum())
        elif mode == "channel":
            per.append(sum(((unit(s[i, k].ravel()) - unit(t[i, k].ravel())) ** 2).sum() for k in range(c)) / c)
        else:
            per.append(sum(((unit(s[i, :, y, x]) - unit(t[i, :, y, x])) ** 2).sum()
                           for y in range(h) for x in range(w)) / (h * w))
    return np.mean(per)


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a))


SHAPES = [(2, 5, 3, 4), (1, 11, 5, 7), (3, 19, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_pixel_kl_random(shape, T):
    r = RNG(sum(shape))
    s, t = r.normal(0, 3, shape), r.normal(0, 3, shape)
    valid = r.random((shape[0],) + shape[2:]) > 0.3
    got = kernels.pixel_kl(t64(s).float(), t64(t).float(), T)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(np_pixel_kl(s, t, T), rel=1e-4, abs=1e-6)
    got_v = kernels.pixel_kl(t64(s).float(), t64(t).float(), T, valid=t64(valid))
    assert got_v.item() == pytest.approx(np_pixel_kl(s, t, T, valid), rel=1e-4, abs=1e-6)


def test_pixel_kl_by_hand():
    # 2 classes, one pixel: p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    s = torch.zeros(1, 2, 1, 1)
    t = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kernels.pixel_kl(s, t).item() == pytest.approx(want, rel=1e-6)
    # T = 2 scales logits by 1/2 and the result by 4
    p = 1 / (1 + math.exp(-math.log(3.0) / 2))
    want2 = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert kernels.pixel_kl(s, t, 2.0).item() == pytest.approx(want2, rel=1e-6)


def test_pixel_kl_no_valid_pixel_is_zero():
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = kernels.pixel_kl(s, t, 1.0, valid=torch.zeros(2, 3, 3, dtype=torch.bool))
    assert out.item() == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_kl_random(shape):
    r = RNG(7 + sum(shape))
    s, t = r.normal(0, 2, shape), r.normal(0, 2, shape)
    got = kernels.channel_kl(t64(s).float(), t64(t).float(), 4.0)
    assert got.item() == pytest.approx(np_channel_kl(s, t, 4.0), rel=1e-4, abs=1e-7)


def test_channel_kl_by_hand():
    # one channel over 2 positions, T = 1: q_t = (3/4, 1/4), q_s uniform; B*C = 1
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([math.log(3.0), 0.0]).reshape(1, 1, 1, 2)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kernels.channel_kl(s, t, 1.0).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("mode", ["layer", "channel", "point"])
@pytest.mark.parametrize("shape", SHAPES)
def test_angular_random(mode, shape):
    r = RNG(11 + sum(shape))
    s, t = r.normal(0, 1, shape), r.normal(0, 1, shape)
    got = kernels.angular_loss(t64(s).float(), t64(t).float(), mode)
    assert got.item() == pytest.approx(np_angular(s, t, mode), rel=1e-4)


def test_angular_by_hand():
    # one sample, C = 2, one pixel: s = (1, 0), t = (0, 1) -> ||e1 - e2||^2 = 2 in every mode where the vector
    # is the pixel (point, layer); per channel each 1-vector normalises to +-1 or 0.
    s = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    t = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    assert kernels.angular_loss(s, t, "point").item() == pytest.approx(2.0)
    assert kernels.angular_loss(s, t, "layer").item() == pytest.approx(2.0)
    # channel: c0: n(1)=1 vs n(0)=0 -> 1; c1: 0 vs 1 -> 1; mean over C -> 1
    assert kernels.angular_loss(s, t, "channel").item() == pytest.approx(1.0)
    # magnitude is ignored: scaling the student changes nothing
    assert kernels.angular_loss(5 * s + 0, s, "layer").item() == pytest.approx(0.0, abs=1e-7)


def test_angular_zero_norm_no_nan():
    s = torch.zeros(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4)
    for mode in ("layer", "channel", "point"):
        loss = kernels.angular_loss(s, t, mode)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        s.grad = None


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


def test_bn_stat_distance_random_and_by_hand():
    r = RNG(5)
    x = r.normal(1, 2, (3, 4, 5, 6))
    rm, rv = r.normal(0, 1, 4), r.random(4) + 0.5
    got = kernels.bn_stat_distance(t64(x).float(), t64(rm).float(), t64(rv).float())
    mean = x.mean((2, 3))
    var = ((x - mean[..., None, None]) ** 2).mean((2, 3))
    want = np.linalg.norm(mean - rm, axis=1) + np.linalg.norm(var - rv, axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # by hand: one channel, values 0 and 2 -> mean 1, biased var 1; running stats (0, 0) -> 1 + 1
    x1 = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)
    assert kernels.bn_stat_distance(x1, torch.zeros(1), torch.zeros(1)).item() == pytest.approx(2.0)


def test_prototype_observation_kl_matches_formula():
    r = RNG(9)
    b, d, h, w, k, tau = 2, 4, 3, 5, 4, 0.1
    fs, ft = r.normal(0, 1, (b, d, h, w)), r.normal(0, 1, (b, d, h, w))
    a_s, a_t = r.normal(0, 1, (b, k, d)), r.normal(0, 1, (b, k, d))
    present = np.array([[True, False, True, True], [False, True, True, False]])
    got = kernels.prototype_kl(t64(fs).float(), t64(ft).float(), t64(a_s).float(), t64(a_t).float(),
                               t64(present), tau)
    total = 0.0
    for i in range(b):
        idx = np.flatnonzero(present[i])
        for y in range(h):
            for x in range(w):
                def obs(f, a):
                    cos = np.array([unit(f[i, :, y, x]) @ unit(a[i, j]) for j in idx]) / tau
                    return softmax(cos, 0)
                pt, ps = obs(ft, a_t), obs(fs, a_s)
                total += (pt * (np.log(pt) - np.log(ps))).sum()
    assert got.item() == pytest.approx(total / (b * h * w), rel=1e-4)


def test_zero_when_student_equals_teacher():
    x = torch.randn(2, 7, 4, 5)
    assert kernels.pixel_kl(x, x.clone(), 2.0).abs().item() < 1e-6
    assert kernels.channel_kl(x, x.clone()).abs().item() < 1e-6
    for mode in ("layer", "channel", "point"):
        assert kernels.angular_loss(x, x.clone(), mode).abs().item() < 1e-6
