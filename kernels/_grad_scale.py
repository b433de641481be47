"""Backward of a loss whose forward kernel already wrote d loss / d input: scale it by grad_output in place.

    grad_input = grad_output * g        (g written by the forward for grad_output = 1)

The kernel reads grad_output from device memory and leaves g untouched when it equals 1, so backward
costs nothing then and never synchronises with the host (the Liger-Kernel trick, without its
`torch.equal` host sync). Because g is scaled in place, a second backward through the same graph
(`retain_graph=True`) raises autograd's "modified by an inplace operation" error instead of
returning a gradient scaled twice.
"""
import torch

from kernels import _cpp, _dispatch
from kernels._dispatch import triton, tl


@triton.jit
def _scale_grad_kernel(
    g_ptr,  # [N] gradient written by a forward kernel (input dtype), scaled in place
    go_ptr,  # [] grad_output of the scalar loss
    N,
    BLOCK: tl.constexpr,
):
    go = tl.load(go_ptr).to(tl.float32)
    if go != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        g = tl.load(g_ptr + offs, mask=m).to(tl.float32)
        tl.store(g_ptr + offs, (g * go).to(g_ptr.dtype.element_ty), mask=m)


@torch.library.custom_op("segkd::scale_grad_", mutates_args=("g",))
def scale_grad_(g: torch.Tensor, grad_output: torch.Tensor) -> None:
    """g *= grad_output (a 0-dim tensor), in place, skipped on device when grad_output == 1."""
    n = g.numel()
    if n == 0:
        return
    if _dispatch.mode() == "cuda" and _cpp.ops() is not None and _cpp.supports(g):  # as the C++ forward
        _cpp.ops().scale_grad_(g, grad_output)
        return
    block = 4096
    _scale_grad_kernel[(triton.cdiv(n, block),)](g, grad_output.reshape(()).contiguous(), n, BLOCK=block,
                                                 num_warps=8)


@scale_grad_.register_fake
def _(g, grad_output):
    return None


def scale_grad(g, grad_output):
    """scale_grad_ for the ops' backward: the C++ kernel called directly when the forward took the C++ path eagerly
    (no torch.library wrapper: its Python costs as much as the CPU twin's kernel at small shapes; the in-place
    write is made known to autograd by hand, so a second backward through it still fails), else the custom op."""
    if _dispatch.eager_cpp(g):
        _cpp.ops().scale_grad_(g, grad_output)
        torch.autograd.graph.increment_version(g)
    else:
        scale_grad_(g, grad_output)
