"""The counting machinery of bench/traffic.py: a TorchDispatchMode that counts the kernel launches and the
device-memory bytes of whatever runs under it, on fake (or meta) tensors, and the pieces that make the CPU run the
step as the GPU would (CUDA's autocast policy, the fused loss ops, Triton launches read from the kernels' own pointer
comments). bench/traffic.py's docstring states the model's rules and its shortcuts; this file implements them.

    with traffic_model() as (counter, loss_ops):     # a FakeTensorMode: tensors made inside are fake
        s = torch.randn(8, 19, 64, 128)
        kernels.pixel_kl(s, s * 2)
    counter.events                                    # [Event(kernel, phase, row, op, launches, read, written, ...)]
"""
import contextlib
import dataclasses
import inspect
import os
import re
import sys
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import kernels
from engine.methods import base as methods_base
from kernels import _dispatch, conv_act

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FUSED_OPS = kernels.LOSS_OPS  # kernels' public loss ops: each call is a loss-op call of the model


# ----------------------------------------------------------------------------- CUDA's autocast policy on the CPU

AUTOCAST_HEADER = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}


@lru_cache(maxsize=None)
def cuda_autocast_lists():
    """{policy: [aten op names]} of CUDA's autocast, read from the installed torch's ATen/autocast_mode.h."""
    if not AUTOCAST_HEADER.is_file():
        raise FileNotFoundError(f"{AUTOCAST_HEADER} is missing: the traffic model reads CUDA's autocast op lists "
                                "from torch's installed headers")
    text = AUTOCAST_HEADER.read_text()

    def body(macro):
        m = re.search(rf"#define {macro}\(_\)(.*?)\n\s*\n", text, re.S)
        if m is None:
            raise ValueError(f"{AUTOCAST_HEADER}: no macro {macro}")
        return m.group(1)

    def names(macro):
        return [".".join(p.strip() for p in args.split(",")) for args in re.findall(r"_\(([^()]*)\)", body(macro))]

    lists = {"lower": names("AT_FORALL_LOWER_PRECISION_FP"), "fp32": names("AT_FORALL_FP32"),
             "set_opt_dtype": names("AT_FORALL_FP32_SET_OPT_DTYPE"), "promote": names("AT_FORALL_PROMOTE"),
             "append_dtype": re.findall(r'"([\w.]+)"', body("AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE"))}
    unknown = set(lists["append_dtype"]) - set(_APPEND_DTYPE)
    if unknown:
        raise ValueError(f"{AUTOCAST_HEADER}: fp32_append_dtype ops {sorted(unknown)} are new to this model")
    return lists


def _overload(name):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(x):
    """autocast's is_eligible: a floating tensor that is not float64."""
    return torch.is_tensor(x) and x.is_floating_point() and x.dtype != torch.float64


def _cast(x, dtype):
    """autocast's cached_cast (without its weight cache): eligible tensors, also inside lists, to dtype."""
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x.to(dtype) if _eligible(x) and x.dtype != dtype else x


def _policy_kernel(name, policy, low):
    op = _overload(name)
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    dtype_at = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(keys):
            if policy in ("lower", "fp32"):
                to = low if policy == "lower" else torch.float32
                return op(*_cast(args, to), **{k: _cast(v, to) for k, v in kwargs.items()})
            if policy == "promote":
                widest = low
                for t in tree_flatten((args, kwargs))[0]:
                    if _eligible(t):
                        widest = torch.promote_types(widest, t.dtype)
                return op(*_cast(args, widest), **{k: _cast(v, widest) for k, v in kwargs.items()})
            if policy == "append_dtype":
                out = torch.float32 if _eligible(args[0]) else args[0].dtype
                return _overload(_APPEND_DTYPE[name])(*args, **kwargs, dtype=out)
            # set_opt_dtype: an eligible first argument and no dtype given -> the op computes in fp32
            if _eligible(args[0]):
                if dtype_at is not None and dtype_at < len(args):
                    if args[dtype_at] is None:
                        args = args[:dtype_at] + (torch.float32,) + args[dtype_at + 1:]
                elif kwargs.get("dtype") is None:
                    kwargs = dict(kwargs, dtype=torch.float32)
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy(low=torch.bfloat16):
    """While active, torch.autocast("cpu") casts as torch.autocast("cuda") does: CUDA's lists replace the CPU's
    kernels of AutocastCPU (the CPU's lower-precision kernels stay where CUDA's list has the op: the same
    policy, with autocast's weight cache), and ops only the CPU's list names fall through."""
    lists = cuda_autocast_lists()
    policy = {n: p for p, ns in lists.items() for n in ns}
    cpu_ops = {n.removeprefix("aten::") for n in torch._C._dispatch_get_all_op_names()
               if n.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCPU")}
    lib = torch.library.Library("aten", "IMPL")
    try:
        for name, p in policy.items():
            if p == "lower" and name in cpu_ops:
                continue
            lib.impl(name, _policy_kernel(name, p, low), "AutocastCPU")
        for name in cpu_ops - set(policy):
            lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        yield
    finally:
        lib._destroy()


# ----------------------------------------------------------------------------- Triton launches

_POINTER = re.compile(r"^\s*(\w+_ptr),\s*#\s*(.*)$")


@lru_cache(maxsize=None)
def kernel_roles(fn):
    """{pointer argument: (role, constexpr flag or None)} from a @triton.jit function's pointer comments.

    role "r" (read), "w" ("out"), "rw" ("in place", "atomic", "accumulated"); "when FLAG": only when the
    constexpr FLAG is true ("unless FLAG": only when it is false; the flag is then given as "!FLAG"). STYLE.md asks
    for a comment on every pointer: a pointer without one is an error."""
    pointers = [p for p in inspect.signature(fn).parameters if p.endswith("_ptr")]
    roles = {}
    for line in inspect.getsource(fn).splitlines():
        m = _POINTER.match(line)
        if m and m.group(1) in pointers:
            text = m.group(2)
            role = ("rw" if re.search(r"in place|atomic|accumulated", text) else
                    "w" if re.search(r"\bout\b", text) else "r")
            flag = re.search(r"\b(when|unless) ([A-Z_][A-Z0-9_]*)", text)
            roles[m.group(1)] = (role, None if not flag else flag.group(2) if flag.group(1) == "when"
                                 else "!" + flag.group(2))
    missing = [p for p in pointers if p not in roles]
    if missing:
        raise ValueError(f"{fn.__module__}.{fn.__name__}: pointer argument(s) {missing} have no comment saying "
                         "what they hold; the traffic model reads whether a kernel reads or writes them from it")
    return roles


def _flag_set(bound, flag):
    """Whether a launch's constexpr `flag` ("FLAG", or "!FLAG" for its negation) holds."""
    return not bound.get(flag[1:]) if flag.startswith("!") else bool(bound.get(flag))


def _scale_grad_touches_g(args, counter):
    """_scale_grad_kernel reads and writes g only when grad_output != 1 (a value tracked when computable)."""
    return counter.value_of(args["go_ptr"]) != 1.0


# kernels whose memory traffic depends on a value: kernel name -> (pointer arguments, predicate of the launch)
DATA_DEPENDENT = {"_scale_grad_kernel": (("g_ptr",), _scale_grad_touches_g)}


# ----------------------------------------------------------------------------- the counter

def nbytes(t):
    """Bytes a tensor covers: numel * itemsize, or the storage span of an expanded (stride-0) tensor."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


def _tensors(x):
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


@dataclasses.dataclass
class Event:
    kernel: str            # aten op (e.g. "aten.convolution.default") or Triton kernel name
    phase: str             # the step's clock phase when it ran
    row: str               # the table row it is attributed to (phase, loss term, backward owner)
    op: str = None         # the loss-op call it belongs to ("pixel_kl#0"), if any
    launches: int = 1
    read: int = 0
    written: int = 0
    reads: list = dataclasses.field(default_factory=list)    # [(storage key, bytes)]
    writes: list = dataclasses.field(default_factory=list)
    deps: list = dataclasses.field(default_factory=list)     # events that last wrote what it reads
    sync: str = None       # where a host sync came from (file:line), for syncs


ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
OVERWRITE = {"copy_", "fill_", "zero_", "uniform_", "normal_", "bernoulli_", "random_", "exponential_",
             "geometric_", "cauchy_", "log_normal_", "_foreach_zero_", "_foreach_copy_"}
NOT_WRITTEN = {("_fused_sgd_", "grads"), ("_fused_adam_", "grads"), ("_fused_adamw_", "grads")}
METADATA = {"as_strided_", "resize_", "squeeze_", "unsqueeze_", "transpose_", "t_", "detach_", "set_",
            "_coalesced_"}  # in place, but on sizes and strides only
CONSTANT = {"lift_fresh", "lift_fresh_copy"}
SYNC = {"_local_scalar_dense", "equal", "nonzero", "masked_select", "is_nonzero", "_unique", "_unique2",
        "unique_dim", "unique_consecutive", "bincount", "repeat_interleave"}
VALUE_FREE = {"ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full", "full", "ones", "zeros",
              "scalar_tensor", "fill_", "zero_"}


class Counter(TorchDispatchMode):
    """Counts the launches and bytes of every op dispatched while active; see the module docstring.

    `fake`: the device's tensors are FakeTensors (else meta tensors); any other tensor lives on the host.
    """

    def __init__(self, fake=True):
        super().__init__()
        self.fake = fake
        self.recording = True
        self.events = []
        self.phase, self.node_row, self.op_call = "step", None, None
        self.last_writer = {}      # storage key -> index of the event that last wrote it
        self.host = set()          # storage keys of host tensors (optimizer step counters, Python constants)
        self.values = {}           # storage key -> value of a scalar computed from constants
        self.storages = []         # keeps every storage seen alive, so that no key is reused within a run
        self.custom_ops = {}       # segkd:: op -> its Python implementation (the launcher)

    # ---- storages and values
    def key(self, t):
        s = t.untyped_storage()
        self.storages.append(s)
        return StorageWeakRef(s)

    def device_kind(self, t):
        """A tensor of the kind that stands for device memory: fake CPU (fake=True) or meta (fake=False)."""
        return isinstance(t, FakeTensor) and t.device.type == "cpu" if self.fake else t.is_meta

    def on_device(self, t):
        return self.device_kind(t) and self.key(t) not in self.host

    def value_of(self, t):
        return self.values.get(self.key(t)) if t.numel() == 1 else None

    def _track_values(self, func, args, kwargs, outs):
        """The values of `outs` (the op's one-element results) when every tensor it read has a known value: the
        op runs again on real one-element tensors. Otherwise their values become unknown."""
        if not outs:
            return
        packet = func._overloadpacket.__name__
        known = True

        def real(x):
            nonlocal known
            if not isinstance(x, torch.Tensor):
                return x
            v = self.values.get(self.key(x)) if x.numel() == 1 else None
            if v is None and packet not in VALUE_FREE:
                known = False
                return None
            return torch.full((1,) * x.dim(), 0 if v is None else v, dtype=x.dtype).expand(x.shape)

        result = None
        try:
            with unset_fake_temporarily():
                rargs, rkwargs = tree_map(real, args), tree_map(real, kwargs)
                if "device" in rkwargs:
                    rkwargs["device"] = "cpu"
                if known:
                    result = [t.item() for t in _tensors(func(*rargs, **rkwargs)) if t.numel() == 1]
        except Exception:  # a scalar op the CPU cannot run on these stand-ins: its value stays unknown
            result = None
        for i, o in enumerate(outs):
            k = self.key(o)
            if result is not None and len(result) == len(outs):
                self.values[k] = result[i]
            else:
                self.values.pop(k, None)

    # ---- recording
    def record(self, kernel, reads, writes, launches=1, sync=None):
        """reads / writes: [tensor]; returns the Event (None while not recording)."""
        if not self.recording:
            return None
        row = (self.node_row or "backward") if self.phase == "backward" else self.phase
        e = Event(kernel, self.phase, row, self.op_call, launches=launches, sync=sync)
        for t in reads:
            k, b = self.key(t), nbytes(t)
            e.reads.append((k, b))
            e.read += b
            if k in self.last_writer:
                e.deps.append(self.last_writer[k])
        idx = len(self.events)
        for t in writes:
            k, b = self.key(t), nbytes(t)
            e.writes.append((k, b))
            e.written += b
            self.last_writer[k] = idx
        self.events.append(e)
        return e

    def launch(self, kernel, grid, args, kwargs):
        """A Triton launch `kernel[grid](*args, **kwargs)`: recorded, not run."""
        fn = kernel.fn
        bound = dict(zip(kernel.arg_names, args), **kwargs)
        skip = ()
        if fn.__name__ in DATA_DEPENDENT:
            names, touches = DATA_DEPENDENT[fn.__name__]
            skip = () if touches(bound, self) else names
        reads, writes = [], []
        for name, (role, flag) in kernel_roles(fn).items():
            t = bound.get(name)
            if not isinstance(t, torch.Tensor) or name in skip or (flag is not None and not _flag_set(bound, flag)):
                continue
            if "r" in role:
                reads.append(t)
            if "w" in role:
                writes.append(t)
                self.values.pop(self.key(t), None)
        self.record(fn.__name__, reads, writes)

    def _sync_site(self):
        """file:line of the innermost frame in this repository outside this file: where the sync was asked."""
        frame = sys._getframe(2)
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if path.startswith(ROOT + os.sep) and "site-packages" not in path and path != os.path.abspath(__file__):
                return f"{os.path.relpath(path, ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
        return "?"

    # ---- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket.__name__
        if func.namespace == "segkd":  # a fused op: its launcher runs on the fake tensors, counted
            impl = self.custom_ops.get(func)
            if impl is None:
                from torch._library.custom_ops import OPDEFS
                impl = self.custom_ops[func] = OPDEFS[func._schema.name]._init_fn
            with self:
                return impl(*args, **kwargs)
        if packet in SYNC or (packet == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])):
            return self._sync(func, packet, args, kwargs)

        ins = _tensors((args, kwargs))
        on_device = [t for t in ins if self.on_device(t)]
        out = func(*args, **kwargs)
        outs = _tensors(out)
        changed = [t for t in outs if t.numel() == 1]  # scalars whose value _track_values recomputes
        if packet in CONSTANT or not (on_device if ins else any(self.on_device(t) for t in outs)):
            # host work: a Python constant, an optimizer's step counter, what is computed from them
            self.host.update(self.key(t) for t in outs if self.device_kind(t))
            self._track_values(func, args, kwargs, changed)
            return out
        if packet in ALLOC or packet in METADATA:
            return out
        reads, writes = [], []
        for i, arg in enumerate(func._schema.arguments):
            v = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
            ts = [t for t in _tensors(v) if self.on_device(t)]
            written = (arg.alias_info is not None and arg.alias_info.is_write
                       and (packet, arg.name) not in NOT_WRITTEN)
            if written:
                writes += ts
                changed += [t for t in ts if t.numel() == 1]
            if not written or not (arg.is_out or packet in OVERWRITE):
                reads += ts
        self._track_values(func, args, kwargs, list({self.key(t): t for t in changed}.values()))
        in_keys = {self.key(t) for t in ins}
        fresh = [t for t in outs if self.key(t) not in in_keys and self.on_device(t)]
        if writes or fresh:  # else a view, or an op that only reads metadata: no launch, no bytes
            self.record(str(func), reads, writes + fresh)
        return out

    def _sync(self, func, packet, args, kwargs):
        """A host sync: recorded, and answered with a stand-in (a tracked value, else 1; masks all-true)."""
        x = args[0]
        device = self.on_device(x)
        if packet in ("_local_scalar_dense", "is_nonzero", "equal"):
            if device:
                self.record(str(func), _tensors(args), [], sync=self._sync_site())
            if packet == "equal":
                return True
            v = self.value_of(x)
            if v is None:
                v = True if x.dtype == torch.bool else 1 if not x.is_floating_point() else 1.0
            return v
        if packet == "index":  # x[mask]: nonzero(mask) on the host, then a gather
            idx = [[torch.zeros(i.numel(), dtype=torch.long, device=x.device)] * i.dim()
                   if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) else [i] for i in args[1]]
            out = func(x, [j for group in idx for j in group], *args[2:], **kwargs)
            if device:
                self.record("aten.nonzero (boolean-mask index)", [i for i in args[1] if isinstance(i, torch.Tensor)],
                            [], sync=self._sync_site())
                self.record(str(func), [x], [out])
            return out
        if packet == "nonzero":
            out = torch.zeros((x.numel(), x.dim()), dtype=torch.long, device=x.device)
            if device:
                self.record(str(func), [x], [out], sync=self._sync_site())
            return out
        raise NotImplementedError(f"traffic model: {func} has a data-dependent output the model cannot stand in "
                                  "for; add it to Counter._sync")


# ----------------------------------------------------------------------------- loss ops and autograd nodes

def _graph(roots, stop=frozenset()):
    """Autograd nodes reachable from `roots` (nodes), not crossing `stop` nor AccumulateGrad."""
    seen, todo = set(), [n for n in roots if n is not None]
    while todo:
        n = todo.pop()
        if n in seen or n in stop or type(n).__name__ == "AccumulateGrad":
            continue
        seen.add(n)
        todo.extend(nxt for nxt, _ in n.next_functions if nxt is not None)
    return seen


def _leaf_nodes(nodes):
    """The AccumulateGrad nodes next to `nodes` (parameters' gradient accumulation)."""
    return {nxt for n in nodes for nxt, _ in n.next_functions
            if nxt is not None and type(nxt).__name__ == "AccumulateGrad"}


class LossOps:
    """Wraps kernels' public loss functions and segmentation_ce while active: each call is a loss-op call
    ("pixel_kl#0"), and its forward ops and the autograd nodes it creates (its backward, through hooks on them)
    carry that name."""

    def __init__(self, counter):
        self.counter = counter
        self.calls = []      # (call, name)
        self.handles = []    # the hooks on the loss ops' autograd nodes

    def wrap(self, name, fn):
        def call(*args, **kwargs):
            c = self.counter
            if c.op_call is not None or not c.recording:
                return fn(*args, **kwargs)
            call_id = f"{name}#{sum(n == name for _, n in self.calls)}"
            self.calls.append((call_id, name))
            c.op_call = call_id
            try:
                out = fn(*args, **kwargs)
            finally:
                c.op_call = None
            stop = {t.grad_fn for t in _tensors((args, kwargs)) if t.grad_fn is not None}
            for n in _graph([t.grad_fn for t in _tensors(out)], stop):
                self.handles.append(n.register_prehook(lambda *_, call=call_id: setattr(c, "op_call", call)))
                self.handles.append(n.register_hook(lambda *_: setattr(c, "op_call", None)))
            return out

        return call

    def remove(self):
        for h in self.handles:
            h.remove()

    def patches(self):
        """mock.patch objects: kernels.<op> for every public op, and segmentation_ce wherever it was imported."""
        out = [mock.patch.object(kernels, n, self.wrap(n, getattr(kernels, n))) for n in FUSED_OPS]
        ce = methods_base.segmentation_ce
        wrapped = self.wrap("segmentation_ce", ce)
        for name, mod in list(sys.modules.items()):
            if (name.startswith("engine") or name == "__main__") and getattr(mod, "segmentation_ce", None) is ce:
                out.append(mock.patch.object(mod, "segmentation_ce", wrapped))
        return out


def _route_to_fused_ops():
    """Every kernels op module answers use_triton() with True, as it does for CUDA tensors."""
    return [mock.patch.object(mod, "use_triton", lambda *tensors, **kwargs: True)
            for name, mod in list(sys.modules.items()) if name.startswith("kernels.") and hasattr(mod, "use_triton")]


class _Verified(dict):
    """kernels.conv_act's per-configuration verdicts as the model sees them: every configuration already checked
    and fused (the first call's check against the reference is once per run, not per step)."""

    def get(self, key, default=None):
        return True


def _modelled_fused_conv(counter):
    """kernels.conv_bias_relu's CUDA backend (cuDNN's fused convolution, which has no fake kernel) as one kernel:
    it reads x, W, b and the residual once and writes the output once."""
    def conv(x, weight, bias, residual, stride, padding, dilation, groups):
        h, w = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(x.shape[-2:], padding, dilation, weight.shape[-2:], stride))
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = torch.empty(x.shape[0], weight.shape[0], h, w, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        reads = [t for t in (x, weight, bias, residual) if t is not None and counter.on_device(t)]
        counter.record("segkd.conv_bias_relu (cuDNN fused conv+bias+add+relu)", reads, [out])
        return out
    return conv


@contextlib.contextmanager
def traffic_model(fake=True, mode=None, dtype=torch.bfloat16):
    """Count what runs inside: yields (counter, loss_ops). fake=True: under a FakeTensorMode (`mode`, or a new one;
    tensors made inside are fake CPU tensors, the model's device memory) with CUDA's autocast policy;
    fake=False: meta tensors stand for device memory, and there is no autocast."""
    if not _dispatch.HAS_TRITON:
        raise RuntimeError(f"the traffic model intercepts Triton launches: triton is not importable "
                           f"({_dispatch.TRITON_ERROR!r})")
    from triton.runtime.jit import KernelInterface

    counter = Counter(fake)
    ops = LossOps(counter)
    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(mode or FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(cuda_autocast_policy(dtype or torch.bfloat16))
        fused_conv = [mock.patch.dict(conv_act.BACKENDS, dict.fromkeys(("cpu", "meta"), _modelled_fused_conv(counter))),
                      mock.patch.object(conv_act, "_verdicts", _Verified())]
        for p in _route_to_fused_ops() + ops.patches() + fused_conv + [mock.patch.object(
                KernelInterface, "__getitem__",
                lambda kernel, grid: lambda *a, **k: counter.launch(kernel, grid, a, k))]:
            stack.enter_context(p)
        stack.enter_context(counter)
        stack.callback(ops.remove)
        yield counter, ops


# ----------------------------------------------------------------------------- phases of segkd's step

class CountingClock:
    """The clock the step marks its phases on (engine/profile.py's interface): sets the counter's phase, and
    at "backward" labels the loss phase's ops by loss term and hooks every autograd node of the step."""

    def __init__(self, counter, distiller):
        self.counter = counter
        self.student_out, self.terms, self.handles = None, {}, []
        self.handles.append(distiller.register_forward_hook(self._captured))

    def _captured(self, module, args, output):
        self.student_out, self.terms = output

    def begin(self, name):
        self.counter.phase = name
        if name == "backward":
            self._label_loss_forward()
            self._hook_backward()

    def end(self):
        pass

    def remove(self):
        for h in self.handles:
            h.remove()

    def _label_loss_forward(self):
        """Each loss-phase op goes to the terms whose values depend on it (data flow through storages)."""
        c = self.counter
        owners = defaultdict(set)
        for term, value in self.terms.items():
            todo = [c.last_writer.get(c.key(value))]
            while todo:
                i = todo.pop()
                if i is None or term in owners[i] or c.events[i].phase != "loss":
                    continue
                owners[i].add(term)
                todo.extend(c.events[i].deps)
        for i, e in enumerate(c.events):
            if e.phase == "loss":
                e.row = "loss forward: " + ("+".join(t for t in self.terms if t in owners[i]) or "total")

    def _hook_backward(self):
        """Student nodes (reachable from the student's outputs) -> "student backward"; a loss node -> the terms
        that reach it (the rows of the events its execution dispatches)."""
        c = self.counter
        student = _graph([t.grad_fn for t in self.student_out if t is not None])  # aux: None without a head
        student |= _leaf_nodes(student)
        owners = defaultdict(set)
        for term, value in self.terms.items():
            nodes = _graph([value.grad_fn], stop=student)
            for n in nodes | (_leaf_nodes(nodes) - student):
                owners[n].add(term)
        rows = {n: "student backward" for n in student}
        rows.update({n: "loss backward: " + "+".join(t for t in self.terms if t in ts) for n, ts in owners.items()})
        c.node_row = "loss backward: total"
        for n, row in rows.items():  # the row stays set after the node: the engine then adds its outputs up
            self.handles.append(n.register_prehook(lambda *_, row=row: setattr(c, "node_row", row)))


# ----------------------------------------------------------------------------- regions and their minimum

def boundary(events, region, persistent):
    """{region: minimum bytes}: what each region reads from outside (once) plus what it writes that is read
    outside it later or kept (`persistent` storage keys) (once). region(event) -> name or None."""
    ins, outs, wrote = defaultdict(dict), defaultdict(dict), {}
    last = {}
    for i, e in enumerate(events):
        r = region(e)
        for k, b in e.reads:
            w = last.get(k)
            rw = region(events[w]) if w is not None else None
            if r is not None and (w is None or rw != r):
                ins[r][k] = max(ins[r].get(k, 0), b)
            if w is not None and rw is not None and rw != r:
                outs[rw][k] = max(outs[rw].get(k, 0), wrote[(rw, k)])
        for k, b in e.writes:
            last[k] = i
            if r is not None:
                wrote[(r, k)] = max(wrote.get((r, k), 0), b)
    for k, w in last.items():
        rw = region(events[w])
        if k in persistent and rw is not None:
            outs[rw][k] = max(outs[rw].get(k, 0), wrote[(rw, k)])
    return {r: sum(ins[r].values()) + sum(outs[r].values()) for r in set(ins) | set(outs)}


def persistent_keys(counter, modules, optimizers):
    """Storage keys of what outlives the step: parameters, their gradients, buffers, optimizer state."""
    ts = []
    for m in modules:
        ts += [p for p in m.parameters()] + [p.grad for p in m.parameters() if p.grad is not None]
        ts += list(m.buffers())
    for opt in optimizers:
        ts += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return {counter.key(t) for t in ts}


# ----------------------------------------------------------------------------- segkd's step on fake tensors

def fakeify(module, mode):
    """Replace a meta module's parameters and buffers by fake CPU tensors of the same shapes and strides."""
    conv = mode.fake_tensor_converter
    cpu = torch.device("cpu")
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(conv.from_meta_and_device(mode, p.data, cpu),
                                                           requires_grad=p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = conv.from_meta_and_device(mode, b, cpu)
    return module
