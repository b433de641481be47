"""csrc/: the C++ backend builds where a compiler is, SEGKD_KERNELS=cuda routes to it (and a failed build falls back
with one warning), and every CUDA source compiles with nvcc for sm_80 and sm_90 without warnings (compile only: no
GPU here), with its registers and spills reported. The ops' numerics are checked in the ops' own test files, which
run every fused-op test on the CPU twins too (their `fused` fixture)."""
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kernels
from kernel_testing import compare, force_backend, randn
from kernels import _cpp, _dispatch
from kernels.angular import angular_loss_reference
from kernels.bn_stat import bn_stat_distance_reference
from kernels.channel_kl import channel_kl_reference
from kernels.masked_avg_pool import masked_avg_pool_reference
from kernels.pairwise import pairwise_similarity_reference
from kernels.pixel_kl import pixel_kl_reference
from kernels.upsampled_ce import upsampled_cross_entropy_reference

ROOT = Path(__file__).resolve().parents[2]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
HAS_TOOLCHAIN = shutil.which("c++") is not None and shutil.which("ninja") is not None


def test_the_extension_builds_where_a_compiler_is():
    if not HAS_TOOLCHAIN:
        pytest.skip("no C++ compiler or ninja on this machine: the C++ backend is optional")
    assert _cpp.ops() is not None, f"the C++ kernels failed to build: {_cpp.ERROR!r}"
    assert all(hasattr(torch.ops.segkd_cpp, name) for name in ("pixel_kl", "channel_kl", "scale_grad_"))


# op -> (its public call on (student, teacher-like input), its reference, the C++ ops it must call)
def _labels(s):
    return (torch.arange(s.shape[0] * s.shape[2] * s.shape[3]) % 5).reshape(s.shape[0], *s.shape[2:])


def _upsampled_labels(s):  # [B, 3h - 1, 2w + 1]: not a multiple of the logits' size
    b, _, h, w = s.shape
    return (torch.arange(b * (3 * h - 1) * (2 * w + 1)) % 23).reshape(b, 3 * h - 1, 2 * w + 1)  # 19..22 ignored


CALLS = {
    "pixel_kl": (lambda s, t: kernels.pixel_kl(s, t), pixel_kl_reference, ["pixel_kl", "scale_grad_"]),
    "channel_kl": (lambda s, t: kernels.channel_kl(s, t), channel_kl_reference, ["channel_kl", "scale_grad_"]),
    "angular_loss": (lambda s, t: kernels.angular_loss(s, t, "channel"),
                     lambda s, t: angular_loss_reference(s, t, "channel"), ["angular_stats", "angular_apply"]),
    "bn_stat_distance": (lambda s, t: kernels.bn_stat_distance(s, t[0, :, 0, 0], t[0, :, 0, 1].abs()).sum(),
                         lambda s, t: bn_stat_distance_reference(s, t[0, :, 0, 0], t[0, :, 0, 1].abs()).sum(),
                         ["bn_stat", "bn_stat_apply"]),
    "masked_avg_pool": (lambda s, t: kernels.masked_avg_pool(s, _labels(s), 5)[0].pow(2).sum(),
                        lambda s, t: masked_avg_pool_reference(s, _labels(s), 5)[0].pow(2).sum(),
                        ["class_sums", "class_gather"]),
    "upsampled_cross_entropy": (lambda s, t: kernels.upsampled_cross_entropy(s, _upsampled_labels(s)),
                                lambda s, t: upsampled_cross_entropy_reference(s, _upsampled_labels(s)),
                                ["upsampled_ce", "upsampled_ce_backward"]),
    "pairwise_similarity_loss": (lambda s, t: kernels.pairwise_similarity_loss(s, t[:, :7]) * 100,
                                 lambda s, t: pairwise_similarity_reference(s, t[:, :7]) * 100,
                                 ["gram", "gram_apply", "unnormalise"]),
}


@pytest.mark.parametrize("op", sorted(CALLS))
def test_segkd_kernels_cuda_runs_the_cpp_kernels(op, monkeypatch):
    """SEGKD_KERNELS=cuda: every op of kernels._cpp.CPP_OPS calls its torch.ops.segkd_cpp kernels (the CPU twins here),
    forward and backward, not Triton nor the reference, and gives the reference's loss and gradient."""
    if _cpp.ops() is None:
        pytest.skip(f"the C++ kernels cannot be built here: {_cpp.ERROR!r}")
    assert op in _cpp.CPP_OPS
    call, reference, expected = CALLS[op]
    monkeypatch.setenv("SEGKD_KERNELS", "cuda")
    calls, real = [], _cpp.ops()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            return lambda *a: calls.append(name) or fn(*a)

    monkeypatch.setattr(_cpp, "ops", lambda: Spy())
    s, t = randn(2, 19, 5, 7).requires_grad_(), randn(2, 19, 5, 7)
    loss = call(s, t)
    (loss * 0.5).backward()
    s64 = s.detach().double().requires_grad_()
    want = reference(s64, t.double())
    (want * 0.5).backward()
    assert set(calls) == set(expected), calls
    torch.testing.assert_close(loss.double(), want.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6 * s64.grad.abs().max().item())


@pytest.mark.parametrize("op", ["pixel_kl", "channel_kl"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_dense_permuted_student_gets_its_gradient(op, backend, monkeypatch):
    """A batch-transposed student (dense, H and W strides merged, neither NCHW nor channels-last): the gradient the
    forward writes in the student's layout is scaled in place by the backward (grad_output != 1)."""
    force_backend(backend, monkeypatch)
    s = randn(5, 2, 3, 4).transpose(0, 1)  # [2, 5, 3, 4], batch stride 12
    call, reference, _ = CALLS[op]
    compare(call, reference, [s, randn(2, 5, 3, 4)])


def test_segkd_kernels_cuda_leaves_other_ops_on_auto_and_cuda_tensors_on_triton_without_a_cuda_build(monkeypatch):
    from types import SimpleNamespace

    if _cpp.ops() is None:
        pytest.skip(f"the C++ kernels cannot be built here: {_cpp.ERROR!r}")
    monkeypatch.setenv("SEGKD_KERNELS", "cuda")
    monkeypatch.setattr(_dispatch, "HAS_TRITON", True)
    on_gpu = SimpleNamespace(is_cuda=True)  # stands for a CUDA tensor: `auto` answers Triton for it
    assert _dispatch.use_triton(on_gpu, op="prototype_kl")  # no C++ kernel: auto's choice
    monkeypatch.setattr(_cpp, "HAS_CUDA", True)
    assert not _dispatch.use_triton(on_gpu, op="pixel_kl") and _dispatch.use_cpp("pixel_kl", on_gpu)
    monkeypatch.setattr(_cpp, "HAS_CUDA", False)  # built without nvcc: CUDA tensors keep Triton
    monkeypatch.setattr(_cpp, "_state", dict(_cpp._state))
    with pytest.warns(RuntimeWarning, match="built without CUDA"):
        assert _dispatch.use_triton(on_gpu, op="pixel_kl") and not _dispatch.use_cpp("pixel_kl", on_gpu)


def test_a_failed_build_warns_once_and_the_reference_runs(monkeypatch):
    monkeypatch.setattr(_cpp, "_state", {"ops": None, "tried": False})
    monkeypatch.setattr(_cpp, "ERROR", None)

    def broken(verbose=False):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(_cpp, "build", broken)
    monkeypatch.setenv("SEGKD_KERNELS", "cuda")
    s, t = randn(1, 19, 3, 5), randn(1, 19, 3, 5)
    with pytest.warns(RuntimeWarning, match="could not be built .*Ninja is required.*torch reference runs"):
        got = kernels.pixel_kl(s, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = kernels.channel_kl(s, t)
    torch.testing.assert_close(got, pixel_kl_reference(s, t))
    torch.testing.assert_close(again, channel_kl_reference(s, t))


def test_an_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("SEGKD_KERNELS", "cudnn")
    with pytest.raises(ValueError, match="SEGKD_KERNELS='cudnn'.*auto, torch, triton, cuda"):
        kernels.pixel_kl(randn(1, 3, 2, 2), randn(1, 3, 2, 2))


def nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    return found if found and os.path.exists(found) else None


def compile_cu(path, out_dir):
    """nvcc -c for sm_80 and sm_90, warnings as errors, -Xptxas -v -> (returncode, output)."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{ROOT / 'csrc'}", f"-I{sys.prefix}/include"]
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = Path(include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not generated.exists():  # a CPU build of torch ships c10/cuda's headers but not this generated one
        shim = out_dir / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{out_dir / 'shim'}")
    cmd = [nvcc(), "-c", str(path), "-o", str(out_dir / (path.stem + ".o")), "-std=c++20", "-O3",
           "--expt-relaxed-constexpr", "-DSEGKD_WITH_CUDA", "-Xptxas", "-v", "-Werror", "all-warnings",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", *includes]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """{file name: (returncode, output)} of every .cu file, compiled concurrently (one nvcc per core)."""
    if nvcc() is None:
        pytest.skip("nvcc not found: the CUDA sources are compiled where a CUDA toolkit is")
    from concurrent.futures import ThreadPoolExecutor

    out_dir = tmp_path_factory.mktemp("nvcc")
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda p: compile_cu(p, out_dir / p.stem), CU_FILES)
        return {p.name: r for p, r in zip(CU_FILES, results)}


@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_every_cuda_source_compiles_for_sm80_and_sm90(path, nvcc_results):
    code, out = nvcc_results[path.name]
    assert code == 0, f"nvcc failed on {path.name}:\n{out[-4000:]}"
    report = re.findall(r"ptxas info\s*: (Compiling entry function .*|Used \d+ registers.*|.*spill.*)", out)
    print(f"\n{path.name}:\n" + "\n".join(report))  # registers and spills (pytest -s shows them)
    kernels_seen = set(re.findall(r"Compiling entry function '\S+' for '(sm_\d+)'", out))
    assert kernels_seen == {"sm_80", "sm_90"}, \
        f"{path.name}: no kernel compiled for {kernels_seen ^ {'sm_80', 'sm_90'}}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", out)]
    assert not any(spills), f"{path.name}: register spills {spills}"


def test_the_binding_file_compiles_with_its_cuda_registrations(tmp_path):
    """ops.cpp's CUDA block (SEGKD_WITH_CUDA) is compiled only where nvcc builds the library: check it here."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-DSEGKD_WITH_CUDA", "-Wall", "-Werror",
           str(ROOT / "csrc" / "ops.cpp"), f"-I{ROOT / 'csrc'}", *[f"-isystem{p}" for p in include_paths()]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
