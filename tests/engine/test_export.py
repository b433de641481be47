"""engine/export.py: ONNX and TorchScript exports of a segkd checkpoint, checked against PyTorch at export."""
import builtins
import json

import pytest
import torch

from engine import export as export_cli
from engine.train import main as train
from test_faults import FAST, USAGE, fails


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("student")
    train([*FAST, "--method", "none", "--iters", "2", "--out", str(tmp / "r"), "--cache-dir", str(tmp / "cache")])
    return tmp / "r" / "last.pt"


def test_torchscript_export_matches_pytorch_at_any_batch_and_size(student, tmp_path):
    out = tmp_path / "m.pt"
    spec = export_cli.main(["--ckpt", str(student), "--format", "torchscript", "--out", str(out), "--height", "40",
                            "--width", "56", "--upsample"])
    assert spec["parity"]["max_abs_logit_difference"] <= 1e-3 and spec["parity"]["argmax_agreement"] >= 0.999
    assert json.loads((tmp_path / "m.pt.json").read_text())["input"]["mean"] == [0.485, 0.456, 0.406]
    model = torch.jit.load(str(out))
    model_pt, _ = export_cli.load_model(student)
    x = torch.randn(2, 3, 72, 48)
    with torch.no_grad():
        want = export_cli.Deployed(model_pt, upsample=True)(x)
    assert model(x).shape == (2, 8, 72, 48)
    torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)


def test_onnx_export_with_a_dynamic_batch(student, tmp_path):
    """pspnet: the exported pyramid pooling is right at one size only, so the size is fixed."""
    pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install -e '.[export]')")
    pytest.importorskip("onnxscript", reason="the export extra is not installed (pip install -e '.[export]')")
    import onnxruntime

    out = tmp_path / "m.onnx"
    spec = export_cli.main(["--ckpt", str(student), "--format", "onnx", "--out", str(out), "--height", "64",
                            "--width", "48"])
    assert spec["output"]["shape"] == ["batch", 8, 8, 6] and spec["input"]["spatial_size"] == "fixed at 64x48"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 64, 48)
    model_pt, _ = export_cli.load_model(student)
    with torch.no_grad():
        want = model_pt(x).logits
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_export_bad_input_is_one_line(capfd, student, tmp_path, monkeypatch):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    base = ["--out", str(tmp_path / "m.onnx")]
    fails(capfd, tmp_path, ["--ckpt", str(tmp_path / "foreign.pt"), "--format", "torchscript", *base], USAGE,
          "foreign.pt is not a segkd checkpoint", command=export_cli)
    fails(capfd, tmp_path, ["--ckpt", str(student), "--format", "tflite", *base], USAGE,
          "--format 'tflite' is not one of onnx, torchscript", command=export_cli)
    fails(capfd, tmp_path, ["--ckpt", str(student), "--format", "onnx", "--opset", "7", *base], USAGE,
          "--opset 7 is not supported", command=export_cli)
    fails(capfd, tmp_path, ["--ckpt", str(student), "--format", "torchscript", "--tolerance", "-1", "--out",
                            str(tmp_path / "m.pt")], USAGE, "does not match PyTorch", "nothing was kept",
          command=export_cli)
    assert not (tmp_path / "m.pt").exists()
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    fails(capfd, tmp_path, ["--ckpt", str(student), "--format", "onnx", *base], USAGE, "'onnxruntime'",
          '.[export]', command=export_cli)


def test_onnx_export_of_deeplab_keeps_the_size_dynamic(tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install -e '.[export]')")
    pytest.importorskip("onnxscript", reason="the export extra is not installed (pip install -e '.[export]')")
    import onnxruntime

    train([*FAST, "--method", "none", "--student", "deeplabv3_tiny", "--iters", "1", "--out", str(tmp_path / "r"),
           "--cache-dir", str(tmp_path / "cache")])
    ckpt = tmp_path / "r" / "last.pt"
    spec = export_cli.main(["--ckpt", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "d.onnx"), "--height",
                            "32", "--width", "48"])
    assert spec["input"]["spatial_size"] == "dynamic (multiples of 8)"
    session = onnxruntime.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    model, _ = export_cli.load_model(ckpt)
    x = torch.randn(2, 3, 56, 24)
    with torch.no_grad():
        want = model(x).logits
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), want, atol=1e-4,
                               rtol=1e-4)
