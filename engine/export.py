"""Export a segkd checkpoint (a distilled student, or any model segkd trained) for deployment.

    python engine/export.py --ckpt runs/camvid-pspnet_r18-cad/last.pt --format onnx --out student.onnx
    python engine/export.py --ckpt FILE --format torchscript --out student.pt --upsample

What the exported model takes and gives (also written next to it as <out>.json):
    input   "image": float32 [B, 3, H, W], RGB in [0, 1], normalised per channel with the ImageNet mean
            (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), as segkd's datasets feed it
    output  "logits": float32 [B, K, H/8, W/8] (output stride 8; ceil for sizes not divisible by 8), or
            [B, K, H, W] with --upsample (bilinear, align_corners=False, as segkd evaluates); argmax over K
            gives the class index of the checkpoint's class_names
The batch size is dynamic in both formats, the spatial size in TorchScript too. In ONNX the spatial size is
dynamic (multiples of 8) where the exported graph is right at another size (DeepLabV3), and fixed to
--height x --width where it is not (PSPNet: the exported adaptive pyramid pooling indexes for one size only);
<out>.json says which.

The export is checked before it is kept: the exported model and PyTorch run the same random inputs (two batch
sizes), and the export fails, naming both figures, if the largest logit difference exceeds --tolerance or the
argmax agrees on fewer than --min-agreement of the pixels. ONNX needs the optional packages onnx, onnxscript and
onnxruntime (`pip install -e ".[export]"`).
"""
import contextlib
import io
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python engine/export.py`: import `engine` from the checkout, not engine/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.checkpoint import load_model  # noqa: E402
from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

FORMATS = ("onnx", "torchscript")
OPSETS = range(17, 24)  # what torch's ONNX exporter writes and onnxruntime runs


class Deployed(nn.Module):
    """The model as it is deployed: image -> logits (at 1/8, or at the input size with upsample=True)."""

    def __init__(self, model, upsample=False):
        super().__init__()
        self.model, self.upsample = model.eval(), upsample

    def forward(self, image):
        logits = self.model(image).logits  # [B, K, h, w]
        if self.upsample:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def onnx_modules():
    """(onnx, onnxruntime), or one clear error naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise ValueError(f"--format onnx needs the optional package {e.name!r}: pip install -e \".[export]\" "
                         "(onnx, onnxscript, onnxruntime), or use --format torchscript") from None
    return onnx, onnxruntime


def export_onnx(deployed, example, out, opset, spatial=False):
    """Write the ONNX file; spatial=True also leaves height and width dynamic (multiples of 8)."""
    onnx, ort = onnx_modules()
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if spatial:
        dims.update({2: 8 * torch.export.Dim("h8", min=1, max=1024), 3: 8 * torch.export.Dim("w8", min=1, max=1024)})
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each of its passes
        program = torch.onnx.export(deployed, (example,), dynamo=True, input_names=["image"],
                                    output_names=["logits"], dynamic_shapes={"image": dims},
                                    opset_version=opset, verbose=False)
    program.save(str(out))
    onnx.checker.check_model(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def export_torchscript(deployed, example, out):
    with torch.no_grad():
        traced = torch.jit.trace(deployed, example, check_trace=False)
    traced.save(str(out))
    loaded = torch.jit.load(str(out), map_location="cpu")
    return lambda x: loaded(x)


def parity(run, deployed, shapes, seed=0):
    """Largest |logit difference| and argmax agreement of the export against PyTorch over `shapes`."""
    g = torch.Generator().manual_seed(seed)
    worst, agree, total = 0.0, 0, 0
    for shape in shapes:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            want = deployed(x)
            got = run(x)
        worst = max(worst, float((got.float() - want).abs().max()))
        agree += int((got.argmax(1) == want.argmax(1)).sum())
        total += want[:, 0].numel()
    return worst, agree / total


def main(argv=None):
    from engine.config import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint written by engine/train.py")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="file to write (its preprocessing goes to <out>.json)")
    p.add_argument("--height", type=int, default=512, help="example input height (ONNX: the fixed height)")
    p.add_argument("--width", type=int, default=512, help="example input width (ONNX: the fixed width)")
    p.add_argument("--upsample", action="store_true", help="output logits at the input size (default: 1/8)")
    p.add_argument("--opset", type=int, default=18, help=f"ONNX opset, {OPSETS.start}..{OPSETS.stop - 1}")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest |logit difference| accepted")
    p.add_argument("--min-agreement", type=float, default=0.999, help="smallest argmax agreement accepted")
    a = p.parse_args(argv)
    if a.format not in FORMATS:
        raise ValueError(f"--format {a.format!r} is not one of {', '.join(FORMATS)}")
    if a.format == "onnx" and a.opset not in OPSETS:
        raise ValueError(f"--opset {a.opset} is not supported: give {OPSETS.start}..{OPSETS.stop - 1}")
    if min(a.height, a.width) < 8:
        raise ValueError(f"--height and --width must be at least 8 (output stride 8), got {a.height}x{a.width}")
    out = Path(a.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file name")
    model, ckpt = load_model(a.ckpt)
    deployed = Deployed(model, a.upsample)
    shape = (1, 3, a.height, a.width)
    example = torch.randn(shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    shapes = [(1, 3, a.height, a.width), (3, 3, a.height, a.width)]  # two batch sizes
    other = (2, 3, a.height + 16, a.width + 8)  # and another spatial size, where the format takes it
    spatial = a.format == "torchscript"
    if a.format == "onnx":
        if a.height % 8 == 0 and a.width % 8 == 0:
            try:
                run = export_onnx(deployed, example, out, a.opset, spatial=True)
                spatial = parity(run, deployed, [other])[0] <= a.tolerance
            except Exception:  # the exporter, or the exported graph at another size: a fixed size then
                spatial = False
        if not spatial:
            run = export_onnx(deployed, example, out, a.opset)
    else:
        run = export_torchscript(deployed, example, out)
    worst, agreement = parity(run, deployed, shapes + ([other] if spatial else []))
    if worst > a.tolerance or agreement < a.min_agreement:
        out.unlink(missing_ok=True)
        raise ValueError(f"the {a.format} export of {a.ckpt} does not match PyTorch: largest logit difference "
                         f"{worst:.3g} (--tolerance {a.tolerance:g}), argmax agreement {agreement:.5f} "
                         f"(--min-agreement {a.min_agreement:g}); nothing was kept")
    h8, w8 = -(-a.height // 8), -(-a.width // 8)
    if spatial:
        out_hw = ["height", "width"] if a.upsample else ["ceil(height / 8)", "ceil(width / 8)"]
    else:
        out_hw = [a.height, a.width] if a.upsample else [h8, w8]
    spec = {
        "checkpoint": str(a.ckpt), "arch": ckpt["arch"], "iteration": ckpt["iteration"], "format": a.format,
        "num_classes": ckpt["num_classes"], "class_names": ckpt.get("class_names", []),
        "input": {"name": "image", "dtype": "float32", "layout": "NCHW, RGB in [0, 1], then (x - mean) / std",
                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "shape": ["batch", 3, "height" if spatial else a.height, "width" if spatial else a.width],
                  "spatial_size": "dynamic" + (" (multiples of 8)" if a.format == "onnx" else "") if spatial
                  else f"fixed at {a.height}x{a.width}"},
        "output": {"name": "logits", "dtype": "float32",
                   "shape": ["batch", ckpt["num_classes"], *out_hw],
                   "meaning": "class scores; argmax over dim 1 gives the class index of class_names"},
        "parity": {"max_abs_logit_difference": worst, "argmax_agreement": agreement},
    }
    Path(f"{out}.json").write_text(json.dumps(spec, indent=2))
    print(f"exported {ckpt['arch']} ({a.ckpt}, iteration {ckpt['iteration']}) as {a.format} to {out} (spatial "
          f"size {spec['input']['spatial_size']}); parity "
          f"with PyTorch: largest logit difference {worst:.2e}, argmax agreement {100 * agreement:.3f}%; "
          f"preprocessing and shapes in {out}.json")
    return spec


def cli(argv=None):
    """The command line: any failure ends in one line `segkd: error: ...` and its exit code (engine/errors.py)."""
    from engine.errors import run_cli

    run_cli(main, argv)


if __name__ == "__main__":
    cli()
