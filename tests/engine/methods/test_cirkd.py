"""cirkd: each term against a float64 transcription of the authors' code (winycg/CIRKD 2d8ad0f), the enqueue
rule, gradient routes, and CLI runs with an exact resume of the queues."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import load_checkpoint
from engine.config import MethodConfig
from engine.methods import build_method
from engine.methods.cirkd import PIXEL_UPDATE, minibatch_pixel_kl
from speed_testing import run, teacher  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[3]
K = 5
S_CH = {"backbone": 8, "decoder": 6, "logits": K}
T_CH = {"backbone": 12, "decoder": 10, "logits": K}
SHAPES = [(1, 3, 5), (2, 6, 7), (3, 4, 9)]  # (B, h, w): batch 1, odd pixel counts


def feats(b, c, h, w, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    return x.requires_grad_(grad)


def labels(b, h, w, seed, ignore_rows=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (b, h, w), generator=g)
    y[:, :ignore_rows] = 255
    return y


def minibatch_reference(fs, ft, tau):
    """losses/cirkd_mini_batch.py:58-83 in float64, its B x B loop of torch.mm."""
    fs, ft = F.normalize(fs.double(), dim=1), F.normalize(ft.double(), dim=1)
    b = fs.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            def sim(f):
                return torch.mm(f[i].reshape(f.shape[1], -1).T, f[j].reshape(f.shape[1], -1))
            p_s = F.log_softmax(sim(fs) / tau, dim=1)
            p_t = F.softmax(sim(ft) / tau, dim=1)
            total = total + F.kl_div(p_s, p_t, reduction="batchmean")
    return total / (b * b)


def enqueue_reference(pq, pp, rq, rp, t, y, keys, ignore=255):
    """cirkd_memory.py:74-111 in float64, image by image, class by class; the m pixels of class k are the first
    by `keys` (ties by index) among the pixels of class k (see the module's deviation note)."""
    m_p, m_r = pq.shape[1], rq.shape[1]
    for bs in range(t.shape[0]):
        f = t[bs].reshape(t.shape[1], -1)
        lab = y[bs].reshape(-1)
        for lb in [int(v) for v in torch.unique(lab) if v != ignore and 0 <= v < pq.shape[0]]:
            idxs = (lab == lb).nonzero()[:, 0]
            rq[lb, int(rp[lb])] = F.normalize(f[:, idxs].mean(1), dim=0)
            rp[lb] = (rp[lb] + 1) % m_r
            chosen = idxs[torch.sort(keys[bs, idxs], stable=True).indices]
            n = min(len(idxs), PIXEL_UPDATE)
            feat = F.normalize(f[:, chosen[:n]].T, dim=1)
            ptr = int(pp[lb])
            if ptr + n >= m_p:
                pq[lb, -n:] = feat
                pp[lb] = 0
            else:
                pq[lb, ptr:ptr + n] = feat
                pp[lb] = ptr + n


class Out(NamedTuple):  # the part of SegOutput cirkd reads at its default position
    decoder: torch.Tensor


def method(**kw):
    torch.manual_seed(0)
    return build_method(MethodConfig(method="cirkd", **kw), S_CH, T_CH, K).parts["cirkd"]


def draws(m, step, n_img, n_pix):
    """The random draws of forward number `step`: the enqueue's keys, then the pixel and region slots."""
    g = torch.Generator().manual_seed(m.seed + step)
    keys = torch.rand((n_img, n_pix), generator=g)
    pixel_slots = torch.randperm(m.pixel_queue.shape[1], generator=g)
    region_slots = torch.randperm(m.region_queue.shape[1], generator=g)
    return keys, pixel_slots, region_slots


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.7])
def test_minibatch_term_matches_code_loop(shape, tau):
    b, h, w = shape
    fs, ft = feats(b, 6, h, w, 1), feats(b, 10, h, w, 2)
    got = minibatch_pixel_kl(fs, ft, tau)
    want = minibatch_reference(fs, ft, tau)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_two_forwards_enqueue_what_the_code_does(shape):
    """Small memories so that both pointers wrap around within two forwards."""
    b, h, w = shape
    m = method(cirkd_pixel_memory=PIXEL_UPDATE + 4, cirkd_region_memory=2)
    pq, pp = m.pixel_queue.double().clone(), m.pixel_ptr.clone()
    rq, rp = m.region_queue.double().clone(), m.region_ptr.clone()
    for step in range(2):
        fs, ft = feats(b, 6, h, w, 10 + step), feats(b, 10, h, w, 20 + step)
        y = labels(b, h * 8, w * 8, 30 + step)
        keys, _, _ = draws(m, step, b, h * w)
        m(Out(fs), Out(ft), {"label": y})
        y_small = F.interpolate(y[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        enqueue_reference(pq, pp, rq, rp, F.normalize(ft.double(), dim=1), y_small, keys)
    assert torch.equal(m.pixel_ptr, pp) and torch.equal(m.region_ptr, rp)
    torch.testing.assert_close(m.pixel_queue.double(), pq, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.region_queue.double(), rq, rtol=0, atol=1e-6)
    assert int(m.forwards) == 2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kd_tau", [1.0, 2.0])
def test_memory_terms_match_code(shape, kd_tau):
    """cirkd_memory.py:121-177 in float64 on the queues as they are after the forward's enqueue."""
    b, h, w = shape
    m = method(cirkd_pixel_memory=64, cirkd_region_memory=8, cirkd_pixel_contrast=12, cirkd_region_contrast=7,
               cirkd_kd_tau=kd_tau)
    fs, ft = feats(b, 6, h, w, 3), feats(b, 10, h, w, 4)
    y = labels(b, h * 8, w * 8, 5)
    _, pixel_slots, region_slots = draws(m, 0, b, h * w)
    terms = m(Out(fs), Out(ft), {"label": y})
    with torch.no_grad():  # the projector in train mode (BN on batch statistics), as in the forward
        s = F.normalize(copy.deepcopy(m.projector).double()(fs.double()), dim=1)
    t = F.normalize(ft.double(), dim=1)
    lab = F.interpolate(y[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().reshape(-1)
    idxs = lab != 255
    s_rows = s.permute(0, 2, 3, 1).reshape(-1, 10)[idxs]
    t_rows = t.permute(0, 2, 3, 1).reshape(-1, 10)[idxs]

    def kd(queue, slots, n):
        x = queue.double()[:, slots[:n]].reshape(-1, 10)
        p_s = F.log_softmax(s_rows @ x.T / 0.1 / kd_tau, dim=1)
        p_t = F.softmax(t_rows @ x.T / 0.1 / kd_tau, dim=1)
        return F.kl_div(p_s, p_t, reduction="batchmean") * kd_tau ** 2

    want_p = 0.1 * kd(m.pixel_queue, pixel_slots, 12 // K + 1)
    want_r = 0.1 * kd(m.region_queue, region_slots, 7 // K + 1)
    torch.testing.assert_close(terms["memory_pixel"].double(), want_p, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["memory_region"].double(), want_r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["minibatch_pixel"].double(), minibatch_reference(fs, ft, 0.1),
                               rtol=1e-4, atol=1e-6)


def test_all_ignored_gives_zero_memory_terms():
    m = method(cirkd_pixel_memory=32, cirkd_region_memory=4)
    fs = feats(2, 6, 3, 4, 1, grad=True)
    y = torch.full((2, 24, 32), 255)
    terms = m(Out(fs), Out(feats(2, 10, 3, 4, 2)), {"label": y})
    assert terms["memory_pixel"].item() == 0 and terms["memory_region"].item() == 0
    assert torch.equal(m.pixel_ptr, torch.zeros(K, dtype=torch.long))  # nothing enqueued


def test_gradients_reach_student_and_projector_not_teacher():
    m = method(cirkd_pixel_memory=32, cirkd_region_memory=4)
    fs, ft = feats(2, 6, 3, 4, 1, grad=True), feats(2, 10, 3, 4, 2, grad=True)
    terms = m(Out(fs), Out(ft), {"label": labels(2, 24, 32, 3)})
    for name in ("minibatch_pixel", "memory_pixel", "memory_region"):
        grads = torch.autograd.grad(terms[name], [fs, ft, *m.projector.parameters()], allow_unused=True,
                                    retain_graph=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0, name
        assert grads[1] is None, f"{name}: a gradient reached the teacher"
        if name != "minibatch_pixel":  # the mini-batch term compares raw features, without the projector
            assert all(gp is not None and gp.abs().sum() > 0 for gp in grads[2:]), name
    assert not any(b.requires_grad for b in m.buffers())


def test_queues_are_saved_buffers():
    m = method(cirkd_pixel_memory=32, cirkd_region_memory=4)
    state = m.state_dict()
    for name in ("pixel_queue", "pixel_ptr", "region_queue", "region_ptr", "forwards"):
        assert name in state
    assert m.param_groups() and all(p in set(m.projector.parameters()) for p in m.param_groups()[0]["params"])


@pytest.mark.parametrize("spec", ["cirkd", "kd+cirkd"])
def test_cli_trains(spec, teacher, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run(tmp_path, "--method", spec, "--teacher-ckpt", teacher, "--iters", "3", "--out", str(out),
        "--cirkd-pixel-memory", "40", "--cirkd-region-memory", "5")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    terms = [r for r in records if r["kind"] == "train"][-1]["terms"]
    for name in ("minibatch_pixel", "memory_pixel", "memory_region"):
        assert f"cirkd/{name}" in terms and terms[f"cirkd/{name}"] >= 0
    state = load_checkpoint(out / "last.pt")["method_state"]
    assert int(state[next(k for k in state if k.endswith("forwards"))]) == 3


def test_resume_is_exact_with_queues(teacher, tmp_path):  # noqa: F811
    common = ["--method", "cirkd", "--teacher-ckpt", teacher, "--iters", "6", "--ckpt-interval", "3",
              "--keep-ckpts", "5", "--cirkd-pixel-memory", "40", "--cirkd-region-memory", "5"]
    run(tmp_path, *common, "--out", str(tmp_path / "straight"))
    mid = tmp_path / "straight" / "ckpt_0000003.pt"
    run(tmp_path, *common, "--out", str(tmp_path / "resumed"), "--resume", str(mid))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key in ("model", "method_state"):
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), f"{key}.{name} differs after resume"
    m = load_checkpoint(mid)["method_state"]
    assert any(not torch.equal(m[k], a["method_state"][k]) for k in m if k.endswith("queue"))


DDP_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from engine.config import MethodConfig
from engine.methods import build_method
from test_cirkd import K, S_CH, T_CH, Out, feats, labels

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
m = build_method(MethodConfig(method="cirkd", cirkd_pixel_memory=20, cirkd_region_memory=2), S_CH, T_CH, K)
m = m.parts["cirkd"]
for step in range(2):  # each rank its own half of the global batch of 4
    fs, ft, y = feats(4, 6, 3, 5, 10 + step), feats(4, 10, 3, 5, 20 + step), labels(4, 24, 40, 30 + step)
    half = slice(2 * rank, 2 * rank + 2)
    m(Out(fs[half]), Out(ft[half]), {"label": y[half]})
flat = torch.cat([b.double().reshape(-1) for n, b in m.named_buffers() if "projector" not in n])
parts = [torch.empty_like(flat) for _ in range(2)]
dist.all_gather(parts, flat)
if rank == 0:
    json.dump({"difference": float((parts[0] - parts[1]).abs().max()), "queues": flat.tolist()},
              open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


def test_two_gloo_ranks_hold_identical_queues_equal_to_one_process(tmp_path):
    """Each rank enqueues the teacher embeddings of the global batch (all_gather): both ranks end with the same
    queues, and these are the queues of one process fed the whole batch."""
    script = tmp_path / "ddp_cirkd.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           str(tmp_path / "out.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent), str(ROOT / "tests"),
                                          os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["difference"] == 0.0
    m = method(cirkd_pixel_memory=20, cirkd_region_memory=2)
    for step in range(2):
        y = labels(4, 24, 40, 30 + step)
        m(Out(feats(4, 6, 3, 5, 10 + step)), Out(feats(4, 10, 3, 5, 20 + step)), {"label": y})
    single = torch.cat([b.double().reshape(-1) for n, b in m.named_buffers() if "projector" not in n])
    torch.testing.assert_close(torch.tensor(report["queues"], dtype=torch.float64), single, rtol=0, atol=1e-6)
