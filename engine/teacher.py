"""The frozen teacher: loading it from a file, keeping it frozen, and its forward as the training step runs it.

The step's teacher forward has a module of its own because it is the largest single cost of a distillation
step (a ResNet-101 forward per student step): how it runs (folded BatchNorm, precision, channels-last, compile,
a CUDA graph) is decided here and nowhere else.
"""
import copy
from pathlib import Path

import torch
import torch.nn as nn

import kernels
from engine.checkpoint import FORMAT, describe_names, nonfinite_tensors
from engine.compile import compile_backend
from engine.errors import first_line
from engine.models import SegOutput, build_model, without_aux
from engine.models.resnet import BasicBlock, Bottleneck, ResNet


class Frozen(nn.Module):
    """A teacher: eval mode whatever .train() is called on, no gradients, run without autograd."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.channels = model.channels

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):
        return self.model(images)


def load_teacher(path, arch, num_classes, dataset_name=""):
    """A trained teacher from a segkd checkpoint (its architecture is read from it) or a raw state dict of
    `arch` -> (model, arch). The class count must match the dataset's; errors name the file and both counts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--teacher-ckpt {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--teacher-ckpt {path} could not be read ({first_line(e)})") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        arch, state, k = obj["arch"], obj["model"], obj["num_classes"]
    else:
        state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
        if not isinstance(state, dict):
            raise ValueError(f"--teacher-ckpt {path} holds neither a segkd checkpoint nor a state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        cls_w = [v for k, v in state.items() if k.startswith("classifier") and k.endswith("weight")]
        k = cls_w[-1].shape[0] if cls_w else num_classes
    if k != num_classes:
        raise ValueError(f"--teacher-ckpt {path} predicts {k} classes but dataset {dataset_name or ''} has "
                         f"{num_classes}: distil with a teacher trained on this dataset")
    bad = nonfinite_tensors(state)
    if bad:
        raise ValueError(f"--teacher-ckpt {path} holds non-finite weights ({describe_names(bad)}): distil from a "
                         "checkpoint taken before training diverged")
    model = build_model(arch, num_classes)
    try:
        model.load_state_dict(without_aux(state))  # a teacher trained with --aux-weight runs without its head
    except RuntimeError as e:
        raise ValueError(f"--teacher-ckpt {path} does not fit architecture {arch!r} (--teacher): {e}") from e
    return model, arch


def _conv_bn_pairs(model):
    """(parent, conv name, bn name) of every BatchNorm2d that directly follows a Conv2d: the next element of an
    nn.Sequential, or `bnX` beside `convX` in the same module (the torchvision-style blocks of engine/models, whose
    forward applies bnX to convX's output and nothing between)."""
    for parent in model.modules():
        names = list(parent._modules)
        for i, name in enumerate(names):
            bn = parent._modules[name]
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            if isinstance(parent, nn.Sequential):
                conv = names[i - 1] if i > 0 else None
            else:
                conv = "conv" + name[2:] if name.startswith("bn") else None
            if conv is not None and isinstance(parent._modules.get(conv), nn.Conv2d):
                yield parent, conv, name


def fold_batchnorm(model):
    """A copy of `model` for inference with every BatchNorm2d that follows a convolution folded into it and
    replaced by nn.Identity (exact in eval mode, up to rounding):

        W' = W * g,   b' = beta + (b - running_mean) * g,   g = gamma / sqrt(running_var + eps)   (per out channel)

    computed in float64, stored in the conv's dtype. The copy keeps the model's memory format. BatchNorms that
    follow no convolution stay as they are. `model` itself is untouched (the data-free methods read its BN
    statistics)."""
    lean = copy.deepcopy(model).eval()
    for parent, conv_name, bn_name in list(_conv_bn_pairs(lean)):
        conv, bn = parent._modules[conv_name], parent._modules[bn_name]
        g = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(g)
        with torch.no_grad():
            w = conv.weight.double() * g.reshape(-1, *([1] * (conv.weight.dim() - 1)))
            conv.weight.copy_(w.to(conv.weight.dtype))  # copy_: the weight keeps its memory format
            conv.bias = nn.Parameter((bn.bias.double() + (bias - bn.running_mean.double()) * g).to(conv.weight.dtype),
                                     requires_grad=False)
        parent._modules[bn_name] = nn.Identity()
    return lean


class ConvReLU(nn.Module):
    """relu(conv(x) [+ residual]) as one kernels.conv_bias_relu call on a (folded) nn.Conv2d, which it holds."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x, residual=None):
        c = self.conv
        return kernels.conv_bias_relu(x, c.weight, c.bias, residual, c.stride, c.padding, c.dilation, c.groups)


class LeanBasicBlock(nn.Module):
    """A folded BasicBlock: relu(conv1(x)) fused, then conv2 + identity + ReLU fused."""

    def __init__(self, block):
        super().__init__()
        self.conv1, self.conv2, self.downsample = ConvReLU(block.conv1), ConvReLU(block.conv2), block.downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), identity)


class LeanBottleneck(nn.Module):
    """A folded Bottleneck: conv1 and conv2 each fused with their ReLU, conv3 with the residual add and ReLU."""

    def __init__(self, block):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = ConvReLU(block.conv1), ConvReLU(block.conv2), ConvReLU(block.conv3)
        self.downsample = block.downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), identity)


def _fusable(conv):
    return isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def fuse_relu(model):
    """`model` (folded by fold_batchnorm, changed in place and returned) with every conv -> ReLU and every residual
    block's conv -> add -> ReLU run as one kernels.conv_bias_relu call:

    - BasicBlock / Bottleneck (engine/models/resnet.py) -> LeanBasicBlock / LeanBottleneck;
    - a ResNet stem (conv1 [conv2 conv3], each followed by its folded BN and the trunk's ReLU) -> ConvReLU, and the
      trunk's ReLU (used by the stem alone) -> Identity;
    - in an nn.Sequential, Conv2d, folded BN (Identity), ReLU -> ConvReLU, Identity, Identity (the heads'
      conv_bn_relu, the pyramid pooling and ASPP branches).
    The same function, other rounding where the device fuses; ReLU6 (MobileNetV2) and a conv whose BN was not
    folded stay as they are."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is BasicBlock and isinstance(child.bn1, nn.Identity) and isinstance(child.bn2, nn.Identity):
                parent._modules[name] = LeanBasicBlock(child)
            elif (type(child) is Bottleneck
                  and all(isinstance(b, nn.Identity) for b in (child.bn1, child.bn2, child.bn3))):
                parent._modules[name] = LeanBottleneck(child)
        if isinstance(parent, ResNet):
            stem = ["1"] + (["2", "3"] if parent.stem == "deep" else [])
            if all(_fusable(getattr(parent, "conv" + i)) and isinstance(getattr(parent, "bn" + i), nn.Identity)
                   for i in stem):
                for i in stem:
                    setattr(parent, "conv" + i, ConvReLU(getattr(parent, "conv" + i)))
                parent.relu = nn.Identity()
        if isinstance(parent, nn.Sequential):
            seq = parent._modules
            names = list(seq)
            for a, b, c in zip(names, names[1:], names[2:]):
                if (_fusable(seq[a]) and isinstance(seq[b], nn.Identity) and type(seq[c]) is nn.ReLU):
                    seq[a], seq[c] = ConvReLU(seq[a]), nn.Identity()
    return model


def lean_copy(model):
    """The inference copy of `model` the step runs: BatchNorm folded (fold_batchnorm), then conv + ReLU and
    conv + residual + ReLU fused (fuse_relu). `model` itself is untouched."""
    return fuse_relu(fold_batchnorm(model))


def _cast_(model, dtype):
    """Every floating parameter and buffer of `model` in `dtype`, in place, each keeping its memory format (new
    Parameter objects rather than Module.to, which cannot swap tensor subclasses such as the traffic model's
    fake tensors)."""
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point():
                m._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)


class TeacherForward:
    """The frozen teacher's forward as the training step runs it: a lean inference copy of the teacher.

    - BatchNorm folded into the convolutions (`fold_batchnorm`): at the workload the teacher's BN layers move
      about 15 GB per step (bench/results/traffic_*.md), a quarter of its forward traffic; the Frozen model itself
      stays unfolded, for evaluation and for the data-free methods, which read its BN statistics;
    - its weights held in the step's precision once (bf16 or fp16): no autocast re-cast of every weight per step
      (autocast's cast cache must stay off for the CUDA graph); the input is cast once, every op then runs in
      that dtype, as autocast runs a convolution network (fp32: the weights stay fp32, no cast);
    - torch.no_grad rather than inference mode, so the outputs are ordinary tensors that a loss can save for
      backward: nothing is cloned (a CUDA graph's static outputs are, as the next replay overwrites them);
    - every conv -> ReLU and every residual block's conv -> add -> ReLU as one kernels.conv_bias_relu call
      (`fuse_relu`): cuDNN's fused convolution on CUDA, which writes each block's output once instead of passing
      over it again for the add and the ReLU (27.9 GB per forward at the workload, by the traffic model); the
      plain ops elsewhere;
    - optionally channels-last, torch.compile'd (the fused convolution is a custom op with a fake kernel: no graph
      break), or replayed as a CUDA graph (static input shape; the fused op's first-call checks happen in the
      graph's warm-up calls, before capture).
    """

    def __init__(self, frozen, device, dtype, channels_last=False, compile_model=False, cuda_graph=False):
        if cuda_graph and device.type != "cuda":
            raise ValueError("--teacher-cuda-graph needs CUDA (it captures the teacher's forward as a CUDA graph)")
        self.device, self.dtype = device, dtype
        if channels_last:
            frozen.model.to(memory_format=torch.channels_last)  # evaluation and the data-free passes run it too
        self.model = lean_copy(frozen.model)
        if dtype is not None:
            _cast_(self.model, dtype)
        self.run = torch.compile(self.model, backend=compile_backend()) if compile_model else self.model
        self.graph = CudaGraphed(self.run) if cuda_graph else None

    def __call__(self, images):
        if self.dtype is not None:
            images = images.to(self.dtype)
        with torch.no_grad():
            if self.graph is not None:
                return SegOutput(*(t.clone() for t in self.graph(images)[:3]))  # replay buffers: copied out
            return SegOutput(*self.run(images)[:3])  # eval mode: no auxiliary logits


class CudaGraphed:
    """Replays a CUDA graph of `fn` for inputs of the captured shape; any other shape runs `fn` eagerly.

    Capture (first call of a shape): three warm-up calls on a side stream (cuDNN picks its algorithms, lazy
    allocations happen), then one captured call into a static input buffer. A replay copies the input into
    that buffer and returns the static outputs, overwritten by the next replay: callers clone them.
    """

    def __init__(self, fn, warmup=3):
        self.fn, self.warmup = fn, warmup
        self.key, self.graph, self.static_in, self.static_out = None, None, None, None

    def __call__(self, x):
        key = (tuple(x.shape), x.dtype, x.stride())
        if self.key is None:
            self._capture(x, key)
        if key != self.key:
            return self.fn(x)
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out

    def _capture(self, x, key):
        self.static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.fn(self.static_in)
        self.key = key
