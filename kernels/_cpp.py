"""segkd's C++ kernels (csrc/): built on first use, cached, optional.

    SEGKD_KERNELS=cuda    the C++ backend: csrc/cuda/ kernels on CUDA tensors, their CPU twins (csrc/cpu/) on CPU
                          tensors, for the ops it has (`CPP_OPS`); every other op keeps its `auto` choice

Why built on first use (torch.utils.cpp_extension.load, ninja) rather than at `pip install`: the install stays pure
Python (seconds, no compiler, nothing to break on a machine without nvcc or a C++ toolchain); the extension is
compiled against the torch that imports it (a binary built at install breaks when torch is upgraded); the CPU twins
can be compiled for the machine they run on (-march=native: vector exp and the widest SIMD the CPU has; the build
is cached per CPU model, under torch's extension cache or $SEGKD_EXT_DIR); and a build that fails is one warning
at run time, with the torch reference taking over, rather than a failed install. The CUDA sources are compiled
only when torch has CUDA, a device is present and nvcc is found (CUDA_HOME); otherwise the build holds the CPU
twins alone. The first build takes about a minute (the CPU twins) and more with CUDA; later processes load the
cached library.

`ops()` returns torch.ops.segkd_cpp after loading the library, or None when it cannot be built (the reason is in
`ERROR`, and was warned once).
"""
import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# the public ops with a C++ kernel (scale_grad_ serves the backward of pixel_kl and channel_kl)
CPP_OPS = ("pixel_kl", "channel_kl", "angular_loss", "bn_stat_distance", "masked_avg_pool", "upsampled_cross_entropy",
           "pairwise_similarity_loss")
# -fopenmp: at::parallel_for is serial without it (ATen's ParallelOpenMP.h needs _OPENMP)
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-associative-math", "-fno-reciprocal-math", "-fopenmp"]
CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr"]

_lock = threading.Lock()
_state = {"ops": None, "tried": False}
ERROR = None
HAS_CUDA = False  # whether the built library holds the CUDA kernels (set by build)


def with_cuda():
    """Whether the build includes the CUDA kernels: a CUDA torch with a device, and nvcc."""
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(torch.version.cuda) and torch.cuda.is_available() and CUDA_HOME is not None


def sources(cuda):
    cpu = [CSRC / "ops.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]
    return [str(p) for p in cpu + (sorted((CSRC / "cuda").glob("*.cu")) if cuda else [])]


def cpu_tag():
    """A short tag of this CPU (model and flags): -march=native code must not be loaded on another CPU."""
    info = platform.processor() + platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info += "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return hashlib.sha256(info.encode()).hexdigest()[:8]


def build(verbose=False):
    """Compile (or load from the cache) and register torch.ops.segkd_cpp; raises on failure."""
    from torch.utils.cpp_extension import load

    global HAS_CUDA
    cuda = with_cuda()
    name = f"segkd_cpp_{'cuda' if cuda else 'cpu'}_{cpu_tag()}"
    directory = os.environ.get("SEGKD_EXT_DIR")
    if directory:
        directory = os.path.join(directory, name)
        os.makedirs(directory, exist_ok=True)
    define = ["-DSEGKD_WITH_CUDA"] if cuda else []
    load(name=name, sources=sources(cuda), extra_cflags=CFLAGS + define, extra_cuda_cflags=CUDA_CFLAGS + define,
         extra_ldflags=["-lm", "-fopenmp"], extra_include_paths=[str(CSRC)], build_directory=directory, with_cuda=cuda,
         is_python_module=False,
         verbose=verbose)
    HAS_CUDA = cuda
    return torch.ops.segkd_cpp


def labels(y):
    """Labels as the C++ kernels take them: int64, int32 or uint8 (another integer dtype is converted)."""
    return y if y.dtype in (torch.int64, torch.int32, torch.uint8) else y.long()


def supports(*tensors):
    """Whether the built library has kernels for these tensors' devices (CPU always; CUDA if built with nvcc).
    Warns once when CUDA tensors meet a library built without its CUDA kernels."""
    if HAS_CUDA or not any(t.is_cuda for t in tensors):
        return True
    if not _state.get("warned_cuda"):
        _state["warned_cuda"] = True
        warnings.warn("SEGKD_KERNELS=cuda: segkd's C++ kernels were built without CUDA (no nvcc found: set CUDA_HOME); "
                      "CUDA tensors take the `auto` path instead (the Triton kernels, or the torch reference without "
                      "triton)", RuntimeWarning, stacklevel=4)
    return False


def ops():
    """torch.ops.segkd_cpp, built on the first call; None (after one warning) when it cannot be built."""
    if _state["tried"]:  # no lock once built: torch.compile traces this lookup
        return _state["ops"]
    return _build_once()


@torch.compiler.disable  # the first call may come from a compiled function: built outside the trace
def _build_once():
    global ERROR
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _state["ops"] = build()
                except Exception as err:  # no compiler, no ninja, a compile error: the reference takes over
                    ERROR = err
                    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                    warnings.warn(f"SEGKD_KERNELS=cuda: segkd's C++ kernels (csrc/) could not be built "
                                  f"({type(err).__name__}: {first[:200]}); the torch reference runs instead",
                                  RuntimeWarning, stacklevel=3)
                _state["tried"] = True
    return _state["ops"]
