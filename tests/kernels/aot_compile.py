"""Compile every Triton kernel of `kernels/` for a GPU target, without a GPU (run as a script).

Each launcher runs on small CPU tensors with its kernels swapped for recorders; every recorded launch
(argument types, constexprs, num_warps) is then compiled ahead of time to a cubin for the target with
`triton.compile`, which needs only the ptxas bundled with triton. This catches what the interpreter
forgives (loop-carried type changes, tl.dot shape or dtype rules, unsupported ops) on a CPU-only CI.
With --ptxas-info it also prints registers and spills per kernel, the first thing to look at when tuning.
These are compiled without the JIT's argument specialisation (no divisibility by 16, no unit-stride
constants) at small odd shapes, so they overstate registers and show scalar loads: bench/aot_report.py
compiles the trainer's launches at the workload shapes as the JIT does.

    python tests/kernels/aot_compile.py [--arch 90] [--ptxas-info]

Must run without TRITON_INTERPRET (the kernels have to be JITFunctions, not interpreted ones).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

import kernels._dispatch as dispatch  # noqa: E402
import importlib  # noqa: E402

# importlib: `kernels.pixel_kl` etc. are shadowed by the functions of the same name that kernels/__init__ exports.
_grad_scale, angular, bn_stat, channel_kl, masked_avg_pool, pixel_kl, prototype = (
    importlib.import_module(f"kernels.{m}")
    for m in ("_grad_scale", "angular", "bn_stat", "channel_kl", "masked_avg_pool", "pixel_kl", "prototype"))
MODULES = (_grad_scale, angular, bn_stat, channel_kl, masked_avg_pool, pixel_kl, prototype)


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the call instead of running it."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, args, kwargs))
        return launch


def compile_call(fn, args, kwargs, target):
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    names = fn.arg_names
    signature, constexprs = {}, {}
    for name, value in zip(names, args):
        signature[name] = mangle_type(value)
    for name, value in kwargs.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    for name in names:  # every parameter must be named in the signature
        signature.setdefault(name, "constexpr")
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target, options=opts)


def launches():
    """Run each launcher on representative small shapes (16-bit and fp32) with recorders installed."""
    calls = []
    for mod in MODULES:
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction):
                setattr(mod, name, Recorder(obj, calls))
    dispatch.INTERPRETED = False  # dot dtypes as on a GPU
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for c in (19, 300):  # one-tile and chunked class axis
            s = torch.randn(2, c, 9, 11, generator=g).to(dtype)
            valid = torch.rand(2, 9, 11, generator=g) > 0.5
            pixel_kl.pixel_kl_forward(s, s, valid, 2.0, True)
            pixel_kl.pixel_kl_forward(s, s, None, 1.0, False)
        for h, w in ((33, 35), (64, 128), (100, 100)):  # one pass (a row in registers, up to 8192), split rows
            s = torch.randn(1, 19, h, w, generator=g).to(dtype)
            channel_kl.channel_kl_forward(s, s, 4.0, True)
        f = torch.randn(2, 40, 9, 11, generator=g).to(dtype)
        for mode in angular.MODES:
            _, stats = angular.angular_forward(f, f, mode)
            angular.angular_backward(f, f, mode, stats, torch.ones(()))
        _, mean, var = bn_stat.bn_stat_forward(f, torch.zeros(40), torch.ones(40))
        bn_stat.bn_stat_backward(f, torch.zeros(40), torch.ones(40), mean, var, torch.ones(2))
        lab = torch.randint(0, 19, (2, 9, 11), generator=g)
        for k in (19, 150):
            protos, counts = masked_avg_pool.masked_avg_pool_forward(f, lab, k, 255)
            masked_avg_pool.masked_avg_pool_backward(protos, lab, counts, f.shape, f.dtype, 255)
            masked_avg_pool.masked_avg_pool_forward(f, lab, k, 255, normalize=True)
            masked_avg_pool.masked_avg_pool_backward(protos, lab, counts, f.shape, f.dtype, 255, feat=f)
            a = torch.randn(2, k, 40, generator=g)
            present = torch.ones(2, k, dtype=torch.bool)
            prototype.prototype_kl_forward(f, f, a, a, present, 0.1, True, True)
            prototype.prototype_kl_forward(f, f, a, a, present, 0.1, True, True, torch.ones(()), lab)  # prototype_ce
            logits, norms = prototype.prototype_logits_forward(f, a, present, 0.1)
            prototype.prototype_logits_backward(f, a, present, 0.1, logits, norms, logits, True, True)
        _grad_scale.scale_grad_(f.clone(), torch.ones(()))
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--ptxas-info", action="store_true", help="print registers and spills per kernel")
    args = parser.parse_args()
    if not dispatch.HAS_TRITON:
        sys.exit(f"triton cannot be imported: {dispatch.TRITON_ERROR!r}")
    target = GPUTarget("cuda", args.arch, 32)
    seen, failures = set(), 0
    for fn, a, kw in launches():
        key = (fn.__name__, tuple(mangle_type(x) for x in a), tuple(sorted(kw.items())))
        if key in seen:
            continue
        seen.add(key)
        label = f"{fn.__name__} {','.join(key[1][:3])} {dict(kw)}"
        try:
            compiled = compile_call(fn, a, dict(kw), target)
        except Exception as err:  # report every failing kernel, not just the first
            failures += 1
            print(f"FAIL {label}\n  {type(err).__name__}: {str(err)[:2000]}")
            continue
        info = ""
        if args.ptxas_info:
            info = ptxas_info(compiled.asm["ptx"], args.arch)
        print(f"ok   {label} {info}")
    print(f"{len(seen)} kernel variants, {failures} failed")
    sys.exit(1 if failures else 0)


def ptxas_info(ptx, arch):
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    ptxas = get_ptxas(arch).path
    out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"[regs {regs.group(1) if regs else '?'}, spill {spill.group(1) if spill else '?'} B]"


if __name__ == "__main__":
    main()
