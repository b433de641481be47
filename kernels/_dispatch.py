"""Which implementation a public loss runs: the fused Triton kernels or the plain-torch reference.

    SEGKD_KERNELS=auto    (default) CUDA tensors -> Triton, anything else -> torch reference
    SEGKD_KERNELS=torch   always the torch reference (the fallback if a kernel misbehaves)
    SEGKD_KERNELS=triton  always Triton; CPU tensors then need TRITON_INTERPRET=1 (tests use this)
    SEGKD_KERNELS=cuda    the C++ kernels of csrc/ (kernels/_cpp.py, built on first use): CUDA kernels on CUDA
                          tensors, their CPU twins on CPU tensors, for the ops that have them (kernels._cpp.CPP_OPS);
                          the other ops run as under `auto`. If the extension cannot be built: one warning, then
                          the torch reference

The variable is read on every call, so a test or a user can switch paths without re-importing.

`triton` is imported here, once, when `kernels` is imported. Triton decides when a `@triton.jit`
function is defined (and when its own `tl.max`, `tl.sum`, ... are defined, at `import triton`) whether
it is compiled or interpreted, so `TRITON_INTERPRET=1` must be in the environment before the first
`import triton` of the process: `tests/conftest.py` sets it when no CUDA device is present. A missing
or broken triton install is not an error here: every op then runs its torch reference, and only
`SEGKD_KERNELS=triton` complains.
"""
import os

import torch

MODES = ("auto", "torch", "triton", "cuda")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_ERROR = None
except Exception as err:  # ImportError, or a broken install failing on import; the references still work
    HAS_TRITON = False
    TRITON_ERROR = err

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so the op modules still define their kernels."""

        constexpr = None  # only ever evaluated as an annotation

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

# Whether the kernels defined at this import are interpreted (run on CPU tensors) or compiled for a GPU.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this to True so every buffer a kernel must fill starts as NaN (-1 for integers): an element
# the kernel forgets to write then fails the comparison instead of passing by luck.
POISON = False


def mode():
    """SEGKD_KERNELS, checked."""
    m = os.environ.get("SEGKD_KERNELS", "auto")
    if m not in MODES:
        raise ValueError(f"SEGKD_KERNELS={m!r}: expected one of {', '.join(MODES)}")
    return m


def use_cpp(op, *tensors):
    """True when `op` (a name in kernels._cpp.CPP_OPS) should run its C++ kernel on `tensors`: SEGKD_KERNELS=cuda,
    the extension builds (kernels/_cpp.py; a failed build warns once and answers False from then on) and has
    kernels for their device (CUDA tensors with a library built without nvcc: one warning, then Triton)."""
    from kernels import _cpp

    return mode() == "cuda" and op in _cpp.CPP_OPS and _cpp.ops() is not None and _cpp.supports(*tensors)


def eager_cpp(*tensors):
    """SEGKD_KERNELS=cuda with the extension built, outside torch.compile's tracing: the C++ ops then run through
    `eager_function`'s autograd.Function rather than their torch.library custom op, whose Python wrapper costs about
    0.1 ms per call (as much as the CPU twin's own kernel at the CPU benchmark's shapes). Under torch.compile the
    custom op is traced as always."""
    if mode() != "cuda" or torch.compiler.is_compiling():
        return False
    from kernels import _cpp

    return _cpp.ops() is not None and _cpp.supports(*tensors)


def eager_function(forward, setup_context, backward):
    """A torch.autograd.Function from a custom op's implementation and its autograd formula (the functions given
    to register_autograd): the same forward and backward, without the custom op's dispatch."""
    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return forward(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return Eager


def use_triton(*tensors, op=None):
    """True when the fused Triton kernels should run on these tensors (see the module docstring). `op`: the
    public op asking, so that SEGKD_KERNELS=cuda routes the ops that have a C++ kernel away from Triton and leaves
    the others on their `auto` choice."""
    m = mode()
    if m == "torch":
        return False
    if m == "cuda":
        from kernels import _cpp

        if op in _cpp.CPP_OPS and (_cpp.ops() is None or _cpp.supports(*tensors)):
            return False  # use_cpp's: the C++ kernel, or the reference if it cannot be built
        m = "auto"
    if m == "auto":
        return HAS_TRITON and all(t.is_cuda for t in tensors)
    if not HAS_TRITON:  # m == "triton"
        raise RuntimeError(f"SEGKD_KERNELS=triton but triton cannot be imported: {TRITON_ERROR!r}")
    if not INTERPRETED and not all(t.is_cuda for t in tensors):
        raise RuntimeError("SEGKD_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 in the environment "
                           "before `import kernels` (triton reads it when the kernels are defined)")
    return True


def upcast(x):
    """The dtype references compute in: fp32 for fp32/bf16/fp16 inputs, float64 kept, so that tests can run
    the references as true float64 ground truth (their results are still returned as float32)."""
    return x if x.dtype == torch.float64 else x.float()


def needs_grad(*tensors):
    """True when autograd will want a gradient for any of these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def empty(shape, dtype, device, memory_format=torch.contiguous_format):
    """torch.empty for a buffer a kernel fills completely; NaN-filled (-1 for integers) under POISON."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return out.fill_(float("nan") if dtype.is_floating_point else -1) if POISON else out


# `tl.dot` input precision for fp32 operands (ignored for 16-bit ones and by the interpreter): tf32x3 keeps
# ~fp32 accuracy on tensor cores; plain tf32 rounds operands to 10 mantissa bits (1e-3 relative), too coarse
# for a loss compared with fp32 torch.
DOT_PRECISION = "tf32x3"


def dot_dtype(dtype):
    """Dtype in which kernels feed `tl.dot`: the input's own 16-bit dtype on a GPU, else fp32.

    triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 bit patterns (a wrong result,
    not an error), so interpreted kernels always multiply in fp32.
    """
    if INTERPRETED or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def next_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


# Tiling of "row" kernels (channel_kl, angular layer/channel, bn_stat): a row of `length` contiguous
# elements is cut into splits of ROW_CHUNK elements, one program each, looping in ROW_BLOCK steps; the
# per-split partials are combined afterwards. Tests shrink both to reach every loop and split path
# with small tensors.
ROW_BLOCK = 1024
ROW_CHUNK = 8192
MAX_SPLITS = 1024


def row_tiling(length):
    """(block, chunk, n_splits) for rows of `length` elements; chunk is a multiple of block."""
    block = min(ROW_BLOCK, max(16, next_pow2(length)))
    chunk = max(block, min(ROW_CHUNK // block, triton.cdiv(length, block)) * block)
    n_splits = triton.cdiv(length, chunk)
    if n_splits > MAX_SPLITS:  # very long rows: longer chunks rather than more partials
        chunk = triton.cdiv(triton.cdiv(length, MAX_SPLITS), block) * block
        n_splits = triton.cdiv(length, chunk)
    return block, chunk, n_splits


def bchw_strides(x):
    """Element strides (batch, channel, pixel) of a [B, C, H, W] tensor read as [B, C, H*W], or None when its
    H and W strides do not merge into one pixel stride (a cropped view, say).

    NCHW-contiguous: (C*HW, HW, 1); channels-last: (HW*C, 1, C). Kernels index with these strides, so neither
    layout is copied; a tensor without a pixel stride is copied once by `strided_bchw`."""
    _, _, h, w = x.shape
    sb, sc, sh, sw = x.stride()
    if h == 1:
        return sb, sc, sw
    if w == 1 or sh == w * sw:
        return sb, sc, (sh if w == 1 else sw)
    return None


def pixel_vector_hint(hw, *strides):
    """(VEC, strides with the batch and channel strides / VEC, hw / VEC) for kernels reading NCHW tiles along the
    pixels: VEC is 4 or 2 (8 is never needed: see below) when every pixel stride is 1 and hw and the other strides are
    multiples of it but not all of 16; else 1 and everything unchanged.

    Why: Triton's JIT marks an int argument divisible by 16 only, so a pixel count like CamVid's 45x60 = 2700
    (= 4 * 675) or its strides leave every pixel-contiguous access a 2-byte scalar (bench/results/aot_sm90.md), and
    `tl.multiple_of` has no effect on a scalar argument. A kernel that takes VEC as a constexpr and multiplies the
    quotients back (HW = HW_V * VEC) gives the compiler the divisibility: 8-byte bf16 accesses at HW = 2700. When
    everything is already a multiple of 16 the JIT's own 16-byte accesses stay (VEC = 1). `strides`: (sb, sc, sp)
    triples, one per tensor."""
    triples = [strides[i:i + 3] for i in range(0, len(strides), 3)]
    values = [hw] + [v for sb, sc, _ in triples for v in (sb, sc)]
    if any(sp != 1 for _, _, sp in triples) or all(v % 16 == 0 for v in values):
        return 1, strides, hw
    vec = next((v for v in (4, 2) if all(x % v == 0 for x in values)), 1)
    if vec == 1:
        return 1, strides, hw
    return vec, tuple(x // vec if i % 3 != 2 else x for i, x in enumerate(strides)), hw // vec


def strided_bchw(x):
    """(x, its (batch, channel, pixel) strides): x itself whenever the strides merge (every dense layout),
    else an NCHW-contiguous copy of it."""
    strides = bchw_strides(x)
    if strides is None:
        x = x.contiguous()
        strides = bchw_strides(x)
    return x, strides


def empty_like(x, poison=True):
    """A buffer shaped like the [B, C, H, W] tensor x that a kernel fills completely through its (batch,
    channel, pixel) strides: x's own layout when those merge (NCHW, channels-last: a channels-last input gets
    a channels-last gradient), else NCHW-contiguous (a dense but transposed map, whose H and W do not merge,
    would keep its strides under torch.empty_like and be written with the wrong ones). NaN-filled under
    POISON. The ops' fake registrations call it with poison=False, so that both allocate alike."""
    out = torch.empty_like(x)
    if bchw_strides(out) is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out.fill_(float("nan")) if POISON and poison else out
