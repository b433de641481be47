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
from kernel_testing import randn
from kernels import _cpp, _dispatch
from kernels.channel_kl import channel_kl_reference
from kernels.pixel_kl import pixel_kl_reference

ROOT = Path(__file__).resolve().parents[2]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
HAS_TOOLCHAIN = shutil.which("c++") is not None and shutil.which("ninja") is not None


def test_the_extension_builds_where_a_compiler_is():
    if not HAS_TOOLCHAIN:
        pytest.skip("no C++ compiler or ninja on this machine: the C++ backend is optional")
    assert _cpp.ops() is not None, f"the C++ kernels failed to build: {_cpp.ERROR!r}"
    assert all(hasattr(torch.ops.segkd_cpp, name) for name in ("pixel_kl", "channel_kl", "scale_grad_"))


@pytest.mark.parametrize("op", ["pixel_kl", "channel_kl"])
def test_segkd_kernels_cuda_runs_the_cpp_kernel(op, monkeypatch):
    """SEGKD_KERNELS=cuda: the op calls torch.ops.segkd_cpp.<op> (its CPU twin here), not Triton nor the reference."""
    if _cpp.ops() is None:
        pytest.skip(f"the C++ kernels cannot be built here: {_cpp.ERROR!r}")
    monkeypatch.setenv("SEGKD_KERNELS", "cuda")
    calls, real = [], _cpp.ops()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            return (lambda *a: calls.append(name) or fn(*a)) if name == op else fn

    monkeypatch.setattr(_cpp, "ops", lambda: Spy())
    s, t = randn(2, 19, 5, 7).requires_grad_(), randn(2, 19, 5, 7)
    loss = getattr(kernels, op)(s, t)
    (loss * 0.5).backward()
    ref = (pixel_kl_reference if op == "pixel_kl" else channel_kl_reference)(s.detach().double(), t.double())
    assert calls == [op]
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-5, atol=1e-7)


def test_other_ops_keep_their_auto_choice_under_segkd_kernels_cuda(monkeypatch):
    monkeypatch.setenv("SEGKD_KERNELS", "cuda")
    x = torch.zeros(2, 3, 4, 4)
    assert not _dispatch.use_triton(x, op="angular_loss")  # CPU tensors: auto picks the reference
    assert not _dispatch.use_triton(x, op="pixel_kl")  # the C++ kernel's (or the reference's)


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


@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_every_cuda_source_compiles_for_sm80_and_sm90(path, tmp_path):
    if nvcc() is None:
        pytest.skip("nvcc not found: the CUDA sources are compiled where a CUDA toolkit is")
    code, out = compile_cu(path, tmp_path)
    assert code == 0, f"nvcc failed on {path.name}:\n{out[-4000:]}"
    report = re.findall(r"ptxas info\s*: (Compiling entry function .*|Used \d+ registers.*|.*spill.*)", out)
    print(f"\n{path.name}:\n" + "\n".join(report))  # registers and spills (pytest -s shows them)
    kernels_seen = set(re.findall(r"Compiling entry function '\S+' for '(sm_\d+)'", out))
    assert kernels_seen == {"sm_80", "sm_90"}, f"{path.name}: no kernel compiled for {kernels_seen ^ {'sm_80', 'sm_90'}}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", out)]
    assert not any(spills), f"{path.name}: register spills {spills}"


def test_cuda_tensors_with_a_library_built_without_cuda_fall_back_with_one_warning(monkeypatch):
    """A CUDA torch without nvcc builds the CPU twins alone: CUDA tensors then keep Triton (one warning)."""
    from types import SimpleNamespace

    monkeypatch.setattr(_cpp, "HAS_CUDA", False)
    monkeypatch.setattr(_cpp, "_state", dict(_cpp._state))
    on_gpu = SimpleNamespace(is_cuda=True)
    with pytest.warns(RuntimeWarning, match="built without CUDA.*run the Triton kernels"):
        assert not _cpp.supports(on_gpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _cpp.supports(on_gpu) and _cpp.supports(torch.zeros(1))


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
