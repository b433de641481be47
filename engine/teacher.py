"""The frozen teacher: loading it from a file, keeping it frozen, and its forward as the training step runs it.

The step's teacher forward has a module of its own because it is the largest single cost of a distillation
step (a ResNet-101 forward per student step): how it runs (inference mode, autocast, channels-last, compile,
a CUDA graph) is decided here and nowhere else.
"""
from pathlib import Path

import torch
import torch.nn as nn

from engine.checkpoint import FORMAT, describe_names, nonfinite_tensors
from engine.compile import compile_backend
from engine.errors import first_line
from engine.models import SegOutput, build_model, without_aux
from engine.precision import autocast


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


class TeacherForward:
    """The frozen teacher's forward as the training step runs it.

    - torch.inference_mode: no autograd records, no version counters;
    - autocast to the step's low precision (bf16, or fp16 with --precision fp16); its weights stay fp32, so
      evaluation and the data-free methods' differentiable teacher passes see the same model;
    - optionally channels-last, torch.compile'd, or replayed as a CUDA graph (static input shape).
    Outputs are cloned out of inference mode: losses may save a teacher tensor for backward (an MSE target,
    say), which autograd refuses for inference tensors. The clone is at feature resolution (1/64 of the
    input's pixels), small beside the forward.
    """

    def __init__(self, frozen, device, dtype, channels_last=False, compile_model=False, cuda_graph=False):
        if cuda_graph and device.type != "cuda":
            raise ValueError("--teacher-cuda-graph needs CUDA (it captures the teacher's forward as a CUDA graph)")
        self.model, self.device, self.dtype = frozen.model, device, dtype
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.run = torch.compile(self.model, backend=compile_backend()) if compile_model else self.model
        self.graph = CudaGraphed(self.run) if cuda_graph else None

    def __call__(self, images):
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture
        with torch.inference_mode(), autocast(self.device, self.dtype, cache_enabled=False):
            out = self.graph(images) if self.graph is not None else self.run(images)
        return SegOutput(*(t.clone() for t in out[:3]))  # eval mode: no auxiliary logits


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
