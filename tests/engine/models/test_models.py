"""engine/models: output shapes, torchvision key compatibility, dilation, pretrained loading, gradients."""
import json
import math
import os

import pytest
import torch

from engine.models import MODELS, SegOutput, build_model, load_pretrained_backbone
from engine.models.mobilenetv2 import MobileNetV2
from models_testing import load_error
from engine.models.resnet import resnet18, resnet50, resnet101

# Written from torchvision's definitions by tests/data/make_torchvision_backbone_keys.py (no engine code).
KEYS_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "data", "torchvision_backbone_keys.json")
with open(KEYS_FILE) as f:
    TORCHVISION_KEYS = json.load(f)

BACKBONES = {"resnet18": resnet18, "resnet50": resnet50, "resnet101": resnet101, "mobilenet_v2": MobileNetV2}
DROPPED = {"resnet18": ("fc.",), "resnet50": ("fc.",), "resnet101": ("fc.",),
           "mobilenet_v2": ("classifier.", "features.18.")}
# torchvision's documented num_params of the ImageNet classifiers: an anchor for the key file itself.
DOCUMENTED_PARAMS = {"resnet18": 11689512, "resnet50": 25557032, "resnet101": 44549160, "mobilenet_v2": 3504872}
FULL_SIZE = [n for n in MODELS if "_r50" in n or "_r101" in n]  # incl. the deep-stem *_r50d, *_r101d(_apd)

_backbones = {}


def backbone(name):
    """Built once per session: ResNet-101's initialisation costs about a second."""
    if name not in _backbones:
        torch.manual_seed(0)
        _backbones[name] = BACKBONES[name]()
    return _backbones[name]


def expected_keys(name):
    return {k: v for k, v in TORCHVISION_KEYS[name].items() if not k.startswith(DROPPED[name])}


# ---------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", list(MODELS))
def test_output_shapes_and_channels(name):
    torch.manual_seed(0)
    model = build_model(name, 11).eval()
    # Full-size ResNet-50/101 models only see a tiny image: forward cost, not coverage, is the limit.
    sizes = [(17, 23)] if name in FULL_SIZE else [(65, 97), (64, 64), (9, 1)]
    for H, W in sizes:
        with torch.no_grad():
            out = model(torch.randn(1, 3, H, W))
        assert isinstance(out, SegOutput)
        h, w = math.ceil(H / 8), math.ceil(W / 8)
        assert out.aux is None  # no auxiliary head unless asked for
        for field in ("backbone", "decoder", "logits"):
            assert getattr(out, field).shape == (1, model.channels[field], h, w), (name, field, H, W)
            assert torch.isfinite(getattr(out, field)).all()
    assert model.channels["logits"] == model.num_classes == 11
    assert model.classifier.out_channels == 11 and model.classifier.in_channels == model.channels["decoder"]


@pytest.mark.parametrize("name", ["pspnet_tiny", "deeplabv3_small", "pspnet_mbv2", "pspnet_r18d_apd"])
def test_auxiliary_head_reads_layer3_in_training_mode_only(name):
    """--aux-weight: an FCN head on layer3 (MobileNetV2: features.13) gives logits at the main logits' size in
    training mode, nothing in eval mode, and leaves the main outputs as the model without it computes them."""
    torch.manual_seed(0)
    plain = build_model(name, 5)
    model = build_model(name, 5, aux=True)
    model.load_state_dict(plain.state_dict(), strict=False)  # the same trunk, head and classifier
    assert {k.split(".")[0] for k in model.state_dict().keys() - plain.state_dict().keys()} == {"aux"}
    x = torch.randn(2, 3, 33, 40)
    with torch.no_grad():  # eval mode: the head is not run, the outputs are the plain model's
        got, want = model.eval()(x), plain.eval()(x)
    assert got.aux is None
    for field in ("backbone", "decoder", "logits"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    out = model.train()(x)
    assert out.aux.shape == out.logits.shape == (2, 5, 5, 5)
    torch.testing.assert_close(out.backbone, plain.train()(x).backbone)  # before any dropout: the same trunk
    # the head reads layer3: its input channels are the backbone's aux_channels (ResNet-18: 256, MobileNetV2: 96)
    assert model.aux[0].in_channels == model.backbone.aux_channels
    mid = model.backbone.forward_with_mid(x)[0]
    assert mid.shape[1] == model.backbone.aux_channels
    out.aux.sum().backward()  # reaches the head and layer3, not layer4 (MobileNetV2: features.13, not .14)
    before, after = ((model.backbone.features[13], model.backbone.features[14]) if name.endswith("mbv2")
                     else (model.backbone.layer3, model.backbone.layer4))
    assert model.aux[0].weight.grad is not None
    assert all(p.grad is not None for p in before.parameters())
    assert all(p.grad is None for p in after.parameters())


def test_decoder_feature_is_the_classifier_input():
    # SegOutput.decoder is the feature before dropout + classifier: in eval mode classifier(decoder) == logits.
    torch.manual_seed(1)
    for name in ("pspnet_tiny", "deeplabv3_tiny"):
        model = build_model(name, 5).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 40, 56))
            torch.testing.assert_close(model.classifier(out.decoder), out.logits, rtol=0, atol=0)
            torch.testing.assert_close(model.head(out.backbone), out.decoder, rtol=0, atol=0)


def test_small_variant_sizes():
    small, tiny = build_model("pspnet_small", 11), build_model("deeplabv3_tiny", 11)
    assert small.channels == {"backbone": 256, "decoder": 128, "logits": 11}
    assert [len(getattr(small.backbone, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert small.backbone.conv1.weight.shape == (32, 3, 7, 7)
    assert tiny.channels == {"backbone": 64, "decoder": 32, "logits": 11}
    assert [len(getattr(tiny.backbone, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert tiny.head[0].convs[0][0].out_channels == 32  # ASPP width follows the decoder width


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("pspnet_r34", 11)
    assert "pspnet_r34" in str(err.value)
    for name in MODELS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("pspnet_tiny", 0)


# ------------------------------------------------------------------------------- torchvision key lists

@pytest.mark.parametrize("name", list(TORCHVISION_KEYS))
def test_key_file_matches_documented_parameter_count(name):
    stats = ("running_mean", "running_var", "num_batches_tracked")
    n = sum(math.prod(shape) for k, shape in TORCHVISION_KEYS[name].items() if not k.endswith(stats))
    assert n == DOCUMENTED_PARAMS[name]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_keys_and_shapes_match_torchvision(name):
    ours = {k: list(v.shape) for k, v in backbone(name).state_dict().items()}
    theirs = expected_keys(name)
    assert sorted(ours.keys() - theirs.keys()) == [] and sorted(theirs.keys() - ours.keys()) == []
    assert ours == theirs


@pytest.mark.parametrize("name, model_name", [("resnet18", "pspnet_r18"), ("resnet18", "deeplabv3_r18"),
                                              ("mobilenet_v2", "pspnet_mbv2"), ("mobilenet_v2", "deeplabv3_mbv2")])
def test_models_use_torchvision_backbones(name, model_name):
    model = build_model(model_name, 3)
    assert {k: list(v.shape) for k, v in model.backbone.state_dict().items()} == expected_keys(name)


def test_initialisation_like_torchvision():
    # kaiming_normal_(mode="fan_out", relu gain): std = sqrt(2 / (C_out * k * k)); BN weight 1, bias 0.
    for name, conv in [("resnet50", backbone("resnet50").layer4[0].conv2),
                       ("resnet101", backbone("resnet101").layer3[5].conv3),
                       ("mobilenet_v2", backbone("mobilenet_v2").features[17].conv[0][0])]:
        w = conv.weight.detach().double()
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        assert abs(w.std().item() / math.sqrt(2 / fan_out) - 1) < 0.03, name
        assert abs(w.mean().item()) < 0.05 * math.sqrt(2 / fan_out), name
    for name in BACKBONES:
        for m in backbone(name).modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# -------------------------------------------------------------------------------------------- dilation

@pytest.mark.parametrize("name", list(BACKBONES))
def test_output_stride_8(name):
    net = backbone(name).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 57, 40)).shape[-2:] == (8, 5)


def test_resnet_dilations_follow_torchvision():
    r18, r50 = backbone("resnet18"), backbone("resnet50")
    # torchvision replace_stride_with_dilation=[False, True, True]: the first block of a dilated stage
    # keeps the previous dilation, the others use the new one; strides 2 survive only in layer2.
    expect = {"layer2": (2, [1, 1]), "layer3": (1, [1, 2]), "layer4": (1, [2, 4])}
    for stage, (stride, dilations) in expect.items():
        for net, convs in ((r18, ("conv1", "conv2")), (r50, ("conv2",))):
            blocks = getattr(net, stage)
            first = getattr(blocks[0], convs[0])
            assert first.stride == (stride, stride)
            for block, d in zip(blocks, dilations + [dilations[-1]] * len(blocks)):
                for c in convs:
                    conv = getattr(block, c)
                    assert conv.dilation == (d, d) and conv.padding == (d, d), (stage, c)


@pytest.mark.parametrize("stage, dilation", [("layer3", 2), ("layer4", 4)])
def test_dilated_basic_block_impulse_response(stage, dilation):
    # Both 3x3 convs of a dilated BasicBlock are dilated: with positive weights and identity BN, the
    # response to an impulse covers exactly the 5x5 lattice of offsets {-2d..2d} step d (two dilated
    # 3x3 convs), and the identity path adds nothing outside it.
    torch.manual_seed(0)
    block = getattr(resnet18(), stage)[1].eval()
    with torch.no_grad():
        for conv in (block.conv1, block.conv2):
            conv.weight.abs_()
    x = torch.zeros(1, block.conv1.in_channels, 25, 25)
    x[:, :, 12, 12] = 1.0
    with torch.no_grad():
        y = block(x).abs().sum(1)[0]
    offsets = {(i - 12, j - 12) for i, j in torch.nonzero(y > 0).tolist()}
    assert offsets == {(a * dilation, b * dilation) for a in range(-2, 3) for b in range(-2, 3)}


def test_mobilenet_v2_dilations():
    net = backbone("mobilenet_v2")
    for i, block in enumerate(net.features[1:], start=1):
        dw = block.conv[-3][0]  # the depthwise conv
        assert dw.groups == dw.in_channels
        stride = 2 if i in (2, 4) else 1
        d = 1 if i < 7 else 2 if i < 14 else 4
        assert dw.stride == (stride, stride) and dw.dilation == (d, d) and dw.padding == (d, d), i
    assert net.out_channels == 320 and len(net.features) == 18


# --------------------------------------------------------------------------------- pretrained loading

def fake_checkpoint(name, seed=0):
    """A torchvision-style state dict with random values of the documented shapes, classifier included."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in TORCHVISION_KEYS[name].items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.randint(1, 10_000, (), generator=g)
        else:
            state[k] = torch.randn(shape, generator=g)
    return state


def assert_backbone_equals(model, state):
    ours = model.backbone.state_dict()
    for k, v in ours.items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name, model_name", [("resnet18", "pspnet_r18"), ("mobilenet_v2", "deeplabv3_mbv2")])
def test_load_pretrained_round_trip(tmp_path, name, model_name):
    state = fake_checkpoint(name)
    assert any(k.startswith(DROPPED[name]) for k in state)  # the file carries the ImageNet classifier
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    model = build_model(model_name, 7)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    load_pretrained_backbone(model, path)
    assert_backbone_equals(model, state)
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, head_before[k])


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module.", "legacy"])
def test_load_pretrained_wrappers(tmp_path, wrap):
    state = fake_checkpoint("resnet18", seed=3)
    if wrap == "module.":
        saved = {"module." + k: v for k, v in state.items()}
    elif wrap == "legacy":  # pre-0.4.1 checkpoints have no num_batches_tracked
        saved = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:
        saved = {wrap: state, "epoch": torch.tensor(90)}
    path = tmp_path / "ckpt.pth"
    torch.save(saved, path)
    model = build_model("deeplabv3_r18", 4)
    load_pretrained_backbone(model, path)
    if wrap == "legacy":
        state = {k: (torch.zeros_like(v) if k.endswith("num_batches_tracked") else v) for k, v in state.items()}
    assert_backbone_equals(model, state)


def test_load_pretrained_missing_file(tmp_path):
    path = tmp_path / "nope" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match="resnet18.pth"):
        load_pretrained_backbone(build_model("pspnet_tiny", 3), path)


def test_load_pretrained_unreadable_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_pretrained_backbone(build_model("pspnet_tiny", 3), path)
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="list.pth.*not a state dict"):
        load_pretrained_backbone(build_model("pspnet_tiny", 3), path)


def _load_error(tmp_path, state, model_name="pspnet_r18"):
    return load_error(tmp_path, state, model_name)


def test_load_pretrained_wrong_keys(tmp_path):
    state = fake_checkpoint("resnet18")
    del state["layer3.1.bn2.running_var"]
    state["layer5.0.conv1.weight"] = torch.zeros(3)
    msg = _load_error(tmp_path, state)
    assert "missing keys (1): layer3.1.bn2.running_var" in msg
    assert "unexpected keys (1): layer5.0.conv1.weight" in msg


def test_load_pretrained_wrong_shape(tmp_path):
    state = fake_checkpoint("resnet18")
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    msg = _load_error(tmp_path, state)
    assert "layer2.0.conv1.weight file [128, 64, 1, 1] vs model [128, 64, 3, 3]" in msg


def test_load_pretrained_wrong_architecture_lists_first_keys(tmp_path):
    msg = _load_error(tmp_path, fake_checkpoint("mobilenet_v2"))  # a MobileNetV2 file into ResNet-18
    assert "missing keys (" in msg and "unexpected keys (" in msg and "more)" in msg
    assert "shape mismatches" not in msg  # no key in common
    assert msg.count("\n") == 2  # one line per kind, not hundreds of keys


# ------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", ["pspnet_tiny", "deeplabv3_tiny", "pspnet_small"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(name, 6).train()
    out = model(torch.randn(2, 3, 48, 40))
    # A random projection, not a plain sum: training-mode BN makes the sum of its outputs constant.
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    groups = {"backbone": model.backbone, "head": model.head, "classifier": model.classifier}
    for group, module in groups.items():
        for pname, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (group, pname)
            assert p.grad.abs().sum() > 0, (group, pname)
