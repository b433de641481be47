"""Write torchvision_backbone_keys.json: every state_dict key, with its shape, of torchvision's
resnet18 / resnet50 / resnet101 / mobilenet_v2 (ImageNet classifiers, 1000 classes).

Written from torchvision's model definitions (torchvision/models/resnet.py, mobilenetv2.py), not from
engine code, so that tests compare our backbones against an independent description. Run once:
    python tests/data/make_torchvision_backbone_keys.py
Sanity anchor: the trainable-parameter totals equal torchvision's documented num_params
(resnet18 11689512, resnet50 25557032, resnet101 44549160, mobilenet_v2 3504872).
"""
import json
import os


def bn(keys, prefix, c):
    keys[prefix + ".weight"] = [c]
    keys[prefix + ".bias"] = [c]
    keys[prefix + ".running_mean"] = [c]
    keys[prefix + ".running_var"] = [c]
    keys[prefix + ".num_batches_tracked"] = []


def resnet(bottleneck, layers):
    expansion = 4 if bottleneck else 1
    keys = {}
    keys["conv1.weight"] = [64, 3, 7, 7]
    bn(keys, "bn1", 64)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            if bottleneck:
                keys[p + ".conv1.weight"] = [planes, inplanes, 1, 1]
                bn(keys, p + ".bn1", planes)
                keys[p + ".conv2.weight"] = [planes, planes, 3, 3]
                bn(keys, p + ".bn2", planes)
                keys[p + ".conv3.weight"] = [planes * 4, planes, 1, 1]
                bn(keys, p + ".bn3", planes * 4)
            else:
                keys[p + ".conv1.weight"] = [planes, inplanes, 3, 3]
                bn(keys, p + ".bn1", planes)
                keys[p + ".conv2.weight"] = [planes, planes, 3, 3]
                bn(keys, p + ".bn2", planes)
            # torchvision: downsample when stride != 1 or inplanes != planes * expansion (first block only)
            if i == 0 and (stage > 1 or inplanes != planes * expansion):
                keys[p + ".downsample.0.weight"] = [planes * expansion, inplanes, 1, 1]
                bn(keys, p + ".downsample.1", planes * expansion)
            inplanes = planes * expansion
    keys["fc.weight"] = [1000, 512 * expansion]
    keys["fc.bias"] = [1000]
    return keys


def mobilenet_v2():
    keys = {}
    keys["features.0.0.weight"] = [32, 3, 3, 3]
    bn(keys, "features.0.1", 32)
    setting = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]  # t, c, n
    inp, idx = 32, 1
    for t, c, n in setting:
        for _ in range(n):
            hidden = int(round(inp * t))
            p, j = f"features.{idx}.conv", 0
            if t != 1:
                keys[f"{p}.{j}.0.weight"] = [hidden, inp, 1, 1]
                bn(keys, f"{p}.{j}.1", hidden)
                j += 1
            keys[f"{p}.{j}.0.weight"] = [hidden, 1, 3, 3]  # depthwise
            bn(keys, f"{p}.{j}.1", hidden)
            keys[f"{p}.{j + 1}.weight"] = [c, hidden, 1, 1]
            bn(keys, f"{p}.{j + 2}", c)
            inp, idx = c, idx + 1
    keys[f"features.{idx}.0.weight"] = [1280, inp, 1, 1]
    bn(keys, f"features.{idx}.1", 1280)
    keys["classifier.1.weight"] = [1000, 1280]
    keys["classifier.1.bias"] = [1000]
    return keys


def main():
    out = {
        "resnet18": resnet(False, [2, 2, 2, 2]),
        "resnet50": resnet(True, [3, 4, 6, 3]),
        "resnet101": resnet(True, [3, 4, 23, 3]),
        "mobilenet_v2": mobilenet_v2(),
    }
    documented = {"resnet18": 11689512, "resnet50": 25557032, "resnet101": 44549160, "mobilenet_v2": 3504872}
    for name, keys in out.items():
        n = 0
        for k, shape in keys.items():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue
            size = 1
            for s in shape:
                size *= s
            n += size
        assert n == documented[name], (name, n, documented[name])
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_backbone_keys.json")
    # One key per line: readable diffs when torchvision's definition is re-checked.
    lines = ["{"]
    for i, (name, keys) in enumerate(out.items()):
        lines.append(f"  {json.dumps(name)}: {{")
        items = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items()]
        lines.append(",\n".join(items))
        lines.append("  }" + ("," if i < len(out) - 1 else ""))
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(path, {k: len(v) for k, v in out.items()})


if __name__ == "__main__":
    main()
