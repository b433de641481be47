"""Deep-stem ResNets: the key layout of CIRKD's / APD's ImageNet checkpoints, their dilation rules, loading.

The expected keys and dilations are written here from the reference code, not from engine code:
  keys       hszhao/semseg model/resnet.py ResNet(deep_base=True) (= dvlab-research/APD model/resnet.py),
             CSAILVision/semantic-segmentation-pytorch mit_semseg/models/resnet.py,
             winycg/CIRKD models/base_models/resnetv1b.py ResNetV1b(deep_stem=True)
  dilations  winycg/CIRKD models/base_models/resnetv1b.py ResNetV1b._make_layer (the `*d` models),
             dvlab-research/APD model/pspnet.py / hszhao/semseg model/pspnet.py module surgery (`*d_apd`)
"""
import json
import os

import pytest
import torch

from engine.models import MODELS, build_model, load_pretrained_backbone
from models_testing import load_error
from engine.models.resnet import pspnet_dilations, resnet18d, resnet50d, resnet101d

LAYERS = {"resnet18d": (False, (2, 2, 2, 2)), "resnet50d": (True, (3, 4, 6, 3)),
          "resnet101d": (True, (3, 4, 23, 3))}
DEEP_MODELS = [n for n in MODELS if n.endswith(("_r18d", "_r50d", "_r101d", "d_apd"))]


def _bn(keys, prefix, c):
    for stat in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.{stat}"] = [c]
    keys[f"{prefix}.num_batches_tracked"] = []


def reference_keys(name):
    """Every key of the reference ImageNet checkpoint, with its shape, `fc.*` included.

    Stem: conv1 3x3 3->64 s2, bn1, conv2 3x3 64->64, bn2, conv3 3x3 64->128, bn3, so layer1 starts from
    inplanes = 128. Blocks: torchvision's names; a block's downsample (1x1 conv + BN) exists when
    stride != 1 or inplanes != planes * expansion, which with inplanes 128 includes layer1.0 of ResNet-18.
    """
    bottleneck, layers = LAYERS[name]
    expansion = 4 if bottleneck else 1
    keys = {"conv1.weight": [64, 3, 3, 3]}
    _bn(keys, "bn1", 64)
    keys["conv2.weight"] = [64, 64, 3, 3]
    _bn(keys, "bn2", 64)
    keys["conv3.weight"] = [128, 64, 3, 3]
    _bn(keys, "bn3", 128)
    inplanes = 128
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            if bottleneck:
                keys[p + ".conv1.weight"] = [planes, inplanes, 1, 1]
                _bn(keys, p + ".bn1", planes)
                keys[p + ".conv2.weight"] = [planes, planes, 3, 3]
                _bn(keys, p + ".bn2", planes)
                keys[p + ".conv3.weight"] = [planes * 4, planes, 1, 1]
                _bn(keys, p + ".bn3", planes * 4)
            else:
                keys[p + ".conv1.weight"] = [planes, inplanes, 3, 3]
                _bn(keys, p + ".bn1", planes)
                keys[p + ".conv2.weight"] = [planes, planes, 3, 3]
                _bn(keys, p + ".bn2", planes)
            if i == 0 and (stage > 1 or inplanes != planes * expansion):
                keys[p + ".downsample.0.weight"] = [planes * expansion, inplanes, 1, 1]
                _bn(keys, p + ".downsample.1", planes * expansion)
            inplanes = planes * expansion
    keys["fc.weight"] = [1000, 512 * expansion]
    keys["fc.bias"] = [1000]
    return keys


# An anchor for the rule above, counted another way: torchvision's documented parameter totals
# (resnet18 11689512, resnet50 25557032, resnet101 44549160), minus the 7x7 stem conv (64*3*49), plus the
# three 3x3 stem convs (64*3*9 + 64*64*9 + 128*64*9) and the affine parameters of bn2 (64) and bn3 (128),
# plus what inplanes 128 instead of 64 adds to layer1.0: ResNet-18 conv1 64*64*9 more and a new downsample
# (64*128 conv + 2*64 BN); ResNet-50/101 conv1 64*64 more and downsample.0 256*64 more.
STEM_DELTA = -64 * 3 * 49 + 64 * 3 * 9 + 64 * 64 * 9 + 128 * 64 * 9 + 2 * 64 + 2 * 128
PARAMS = {"resnet18d": 11689512 + STEM_DELTA + 64 * 64 * 9 + 64 * 128 + 2 * 64,
          "resnet50d": 25557032 + STEM_DELTA + 64 * 64 + 256 * 64,
          "resnet101d": 44549160 + STEM_DELTA + 64 * 64 + 256 * 64}

# The first keys of resnet18-imagenet.pth written out, beside the rule.
R18_HEAD = {
    "conv1.weight": [64, 3, 3, 3], "bn1.weight": [64], "conv2.weight": [64, 64, 3, 3], "bn2.weight": [64],
    "conv3.weight": [128, 64, 3, 3], "bn3.weight": [128], "bn3.running_var": [128],
    "layer1.0.conv1.weight": [64, 128, 3, 3], "layer1.0.conv2.weight": [64, 64, 3, 3],
    "layer1.0.downsample.0.weight": [64, 128, 1, 1], "layer1.0.downsample.1.weight": [64],
    "layer1.1.conv1.weight": [64, 64, 3, 3], "layer2.0.downsample.0.weight": [128, 64, 1, 1],
    "layer4.1.conv2.weight": [512, 512, 3, 3], "fc.weight": [1000, 512], "fc.bias": [1000],
}
R101_HEAD = {
    "conv3.weight": [128, 64, 3, 3], "layer1.0.conv1.weight": [64, 128, 1, 1],
    "layer1.0.downsample.0.weight": [256, 128, 1, 1], "layer3.22.conv3.weight": [1024, 256, 1, 1],
    "layer4.0.downsample.0.weight": [2048, 1024, 1, 1], "fc.weight": [1000, 2048],
}

BUILD = {"resnet18d": resnet18d, "resnet50d": resnet50d, "resnet101d": resnet101d}
_built = {}


def backbone(name, dilations=None):
    """Built once per session (ResNet-101's initialisation costs about a second)."""
    key = (name, dilations)
    if key not in _built:
        torch.manual_seed(0)
        _built[key] = BUILD[name]() if dilations is None else BUILD[name](dilations)
    return _built[key]


# ------------------------------------------------------------------------------------------- key layout

@pytest.mark.parametrize("name", list(LAYERS))
def test_reference_rule_matches_parameter_count(name):
    keys = reference_keys(name)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(torch.Size(s).numel() for k, s in keys.items() if not k.endswith(stats)) == PARAMS[name]


def test_written_out_keys():
    r18, r101 = reference_keys("resnet18d"), reference_keys("resnet101d")
    assert {k: r18[k] for k in R18_HEAD} == R18_HEAD
    assert {k: r101[k] for k in R101_HEAD} == R101_HEAD
    # The stem is flat (conv1, bn1, conv2, ...), not an nn.Sequential (conv1.0, conv1.1, ...).
    assert [k for k in r18 if k.startswith("conv")] == ["conv1.weight", "conv2.weight", "conv3.weight"]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dilations", [None, pspnet_dilations])
def test_backbone_keys_and_shapes_match_reference(name, dilations):
    ours = {k: list(v.shape) for k, v in backbone(name, dilations).state_dict().items()}
    theirs = {k: v for k, v in reference_keys(name).items() if not k.startswith("fc.")}
    assert sorted(ours.keys() - theirs.keys()) == [] and sorted(theirs.keys() - ours.keys()) == []
    assert ours == theirs


@pytest.mark.parametrize("model_name", DEEP_MODELS)
def test_models_use_deep_stem_backbones(model_name):
    arch = "resnet" + model_name.split("_r")[1].split("_")[0]  # pspnet_r101d_apd -> resnet101d
    model = MODELS[model_name](3)
    theirs = {k: v for k, v in reference_keys(arch).items() if not k.startswith("fc.")}
    assert {k: list(v.shape) for k, v in model.backbone.state_dict().items()} == theirs
    assert model.backbone.out_channels == 512 * (4 if arch != "resnet18d" else 1)


def test_deep_model_names():
    assert sorted(DEEP_MODELS) == sorted(["pspnet_r18d", "pspnet_r50d", "pspnet_r101d", "deeplabv3_r18d",
                                          "deeplabv3_r50d", "deeplabv3_r101d", "pspnet_r18d_apd",
                                          "pspnet_r50d_apd", "pspnet_r101d_apd"])


# --------------------------------------------------------------------------------------------- dilation

# (stage, block) -> dilation of each 3x3 conv, BasicBlock (conv1, conv2) / Bottleneck (conv2,), read off the
# reference code. CIRKD ResNetV1b._make_layer(dilation=2): block 0 gets dilation=1, previous_dilation=2,
# others 2, 2; (dilation=4): block 0 gets 2, 4, others 4, 4. BasicBlockV1b: conv1 <- dilation,
# conv2 <- previous_dilation; BottleneckV1b: conv2 <- dilation.
# APD / semseg: every `key_conv` (BasicBlock conv1, Bottleneck conv2) of layer3 -> 2, of layer4 -> 4.
CIRKD_BASIC = {("layer3", 0): (1, 2), ("layer3", 1): (2, 2), ("layer4", 0): (2, 4), ("layer4", 1): (4, 4)}
APD_BASIC = {("layer3", 0): (2, 1), ("layer3", 1): (2, 1), ("layer4", 0): (4, 1), ("layer4", 1): (4, 1)}
CIRKD_R101 = {**{("layer3", i): (1 if i == 0 else 2,) for i in range(23)},
              **{("layer4", i): (2 if i == 0 else 4,) for i in range(3)}}
APD_R101 = {**{("layer3", i): (2,) for i in range(23)}, **{("layer4", i): (4,) for i in range(3)}}


def _three_by_three(block):
    return [c for c in (block.conv1, block.conv2) if c.kernel_size == (3, 3)]


@pytest.mark.parametrize("name, dilations, table", [("resnet18d", None, CIRKD_BASIC),
                                                    ("resnet18d", pspnet_dilations, APD_BASIC),
                                                    ("resnet101d", None, CIRKD_R101),
                                                    ("resnet101d", pspnet_dilations, APD_R101)])
def test_dilations_follow_reference(name, dilations, table):
    net = backbone(name, dilations)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(net, stage)):
            convs = _three_by_three(block)
            expect = table.get((stage, i), (1,) * len(convs))
            assert tuple(c.dilation[0] for c in convs) == expect, (stage, i)
            for c in convs:
                assert c.dilation[0] == c.dilation[1] == c.padding[0] == c.padding[1], (stage, i)
            # Stride 2 only on the first block of layer2 (its strided conv and its downsample).
            stride = 2 if (stage, i) == ("layer2", 0) else 1
            assert convs[0].stride == (stride, stride), (stage, i)
            if block.downsample is not None:
                assert block.downsample[0].stride == (stride, stride), (stage, i)
    for conv, stride in ((net.conv1, 2), (net.conv2, 1), (net.conv3, 1)):
        assert conv.kernel_size == (3, 3) and conv.stride == (stride, stride) and conv.padding == (1, 1)


@pytest.mark.parametrize("name, dilations", [("resnet18d", None), ("resnet18d", pspnet_dilations),
                                             ("resnet101d", None)])
def test_output_stride_8_on_odd_sizes(name, dilations):
    net = backbone(name, dilations).eval()
    sizes = [(33, 33)] if name == "resnet101d" else [(57, 40), (9, 1)]
    for H, W in sizes:
        with torch.no_grad():
            y = net(torch.randn(1, 3, H, W))
        assert y.shape == (1, net.out_channels, -(-H // 8), -(-W // 8)), (H, W)
        assert torch.isfinite(y).all()


def test_dilation_rule_changes_the_output():
    # Same weights, different dilations: the outputs differ, so the rule is really applied in forward.
    a, b = backbone("resnet18d").eval(), backbone("resnet18d", pspnet_dilations).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


# --------------------------------------------------------------------------------------------- loading

def fake_checkpoint(name, seed=0):
    """A reference-layout state dict with random values, the ImageNet classifier fc.* included."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(1, 10_000, (), generator=g) if k.endswith("num_batches_tracked")
                else torch.randn(shape, generator=g)) for k, shape in reference_keys(name).items()}


@pytest.mark.parametrize("name, model_name, prefix", [("resnet18d", "pspnet_r18d", ""),
                                                      ("resnet18d", "pspnet_r18d_apd", "module."),
                                                      ("resnet101d", "deeplabv3_r101d", "")])
def test_load_reference_checkpoint_round_trip(tmp_path, name, model_name, prefix):
    # APD and CSAIL strip a "module." prefix from these files before loading; so does the loader.
    state = fake_checkpoint(name)
    assert "fc.weight" in state
    path = tmp_path / f"{name}-imagenet.pth"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    model = build_model(model_name, 5)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    load_pretrained_backbone(model, path)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, head_before[k]), k


def _load_error(tmp_path, state, model_name):
    return load_error(tmp_path, state, model_name, "resnet18-imagenet.pth")


def test_wrong_key_names_the_file_and_the_key(tmp_path):
    state = fake_checkpoint("resnet18d")
    state["stem.conv3.weight"] = state.pop("conv3.weight")
    msg = _load_error(tmp_path, state, "deeplabv3_r18d")
    assert "missing keys (1): conv3.weight" in msg
    assert "unexpected keys (1): stem.conv3.weight" in msg


def test_wrong_shape_names_the_key(tmp_path):
    state = fake_checkpoint("resnet18d")
    state["bn3.running_mean"] = torch.zeros(64)
    msg = _load_error(tmp_path, state, "pspnet_r18d")
    assert "bn3.running_mean file [64] vs model [128]" in msg


def test_deep_stem_file_into_torchvision_model_says_so(tmp_path):
    msg = _load_error(tmp_path, fake_checkpoint("resnet18d"), "pspnet_r18")
    assert "unexpected keys (18): bn2.bias" in msg  # conv2, bn2, conv3, bn3, layer1.0.downsample
    assert "conv1.weight file [64, 3, 3, 3] vs model [64, 3, 7, 7]" in msg
    assert "deep 3x3 stem" in msg and "*_r18d" in msg


def test_torchvision_file_into_deep_stem_model_says_so(tmp_path):
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "data", "torchvision_backbone_keys.json")) as f:
        torchvision_r18 = json.load(f)["resnet18"]
    msg = _load_error(tmp_path, {k: torch.randn(s) for k, s in torchvision_r18.items()}, "pspnet_r18d")
    assert "missing keys (" in msg and "conv1.weight file [64, 3, 7, 7] vs model [64, 3, 3, 3]" in msg
    assert "without the 'd' suffix" in msg


# ------------------------------------------------------------------------------------------- gradients

def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_model("pspnet_r18d_apd", 4).train()
    out = model(torch.randn(2, 3, 17, 23))
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
