"""Run configuration: a few dataclasses, one documented default per field, argparse flags generated from them.

Every field `foo_bar` of every section becomes the flag `--foo-bar`; its help text is the field's doc. The
method section is assembled from every method's own settings (engine/methods/__init__.py: MethodConfig).
"""
import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.methods import MethodConfig
from engine.settings import at_least, one_of, parse_size, positive, size_at_least
from engine.settings import setting as _f  # short, so that each field stays on its line


@dataclass
class ModelConfig:
    teacher: str = _f("pspnet_small", "teacher architecture (see README: model names)")
    student: str = _f("pspnet_tiny", "student architecture")
    teacher_ckpt: str = _f("", "trained teacher checkpoint; empty: train one first (cached by settings) and use it")
    pretrained_backbone: str = _f("", "ImageNet state dict loaded into the backbone of the model being trained "
                                      "(torchvision's; the deep-stem resnet*-imagenet.pth / resnet*_v2.pth of CIRKD, "
                                      "APD and semseg for the *d models)")
    sync_bn: bool = _f(False, "convert the student's BatchNorm layers to SyncBatchNorm under DDP")
    aux_weight: float = _f(0.0, "weight of the cross-entropy of an auxiliary FCN head (3x3 conv-BN-ReLU-dropout 0.1-"
                                "1x1 conv) on the student's layer3 (MobileNetV2: features.13), trained with the "
                                "student and not used at evaluation or export; 0: no auxiliary head (semseg's and "
                                "APD's code: 0.4)", check=at_least(0))


@dataclass
class DataConfig:
    dataset: str = _f("synthetic", "dataset name: synthetic (built in, no download), camvid, cityscapes, ade20k, "
                                   "voc, pascal_context (60 classes), pascal_context59 or nyuv2 (13 classes)")
    data_root: str = _f("", "dataset folder (not needed for synthetic)")
    crop: tuple = _f((64, 64), "training crop HEIGHT,WIDTH (or one number for a square)", parse=parse_size,
                     check=size_at_least(8))
    batch_size: int = _f(8, "images per process per iteration", check=at_least(2))
    workers: int = _f(2, "data workers per process: DataLoader worker processes, or DALI CPU threads and Python "
                         "reader processes", check=at_least(0))
    loader: str = _f("auto", "data loader: dali (NVIDIA DALI pipeline, GPU decoding where CUDA is), torch "
                             "(DataLoader), or auto (dali when it is importable and CUDA is available, else torch)",
                             check=one_of("auto", "dali", "torch"))
    skip_bad_samples: bool = _f(False, "skip unreadable or truncated image/label files (each is named and counted) "
                                       "instead of stopping at the first")
    scale_min: float = _f(0.5, "smallest random rescale factor of the training augmentation", check=positive)
    scale_max: float = _f(2.0, "largest random rescale factor", check=positive)
    flip: bool = _f(True, "random horizontal flip")
    rotate: float = _f(0.0, "largest random rotation in degrees (0: off; 10 is the usual setting)", check=at_least(0))
    val_size: int = _f(0, "evaluate on the first N validation images only (0: the whole split)", check=at_least(0))
    val_split: str = _f("val", "the split the trainer evaluates on: val, or test where the dataset has one (CamVid's "
                               "233 test images, as the DFAD paper reports; NYUv2's val is its 654-image test split)")
    val_resize: int = _f(0, "evaluate on images resized so that the side --val-resize-side is N (bilinear; read by "
                            "the torch DataLoader whatever --loader); 0: as they are", check=at_least(0))
    val_resize_side: str = _f("short", "--val-resize: short (image and label, nearest, resized to a shorter side of "
                                       "N: DFAD's ExtResize(256)) or long (the image alone to a longer side of N, "
                                       "the logits scored at the label's own size, one image a batch: semseg's and APD's "
                                       "base_size)",
                              check=one_of("short", "long"))


@dataclass
class OptimConfig:
    iters: int = _f(800, "training iterations", check=at_least(1))
    lr: float = _f(0.05, "base learning rate of SGD (poly schedule, power 0.9, per iteration); 0.05 suits the "
                   "built-in data from scratch, pretrained backbones on real data usually want 0.01", check=positive)
    momentum: float = _f(0.9, "SGD momentum", check=at_least(0))
    weight_decay: float = _f(1e-4, "SGD weight decay", check=at_least(0))
    poly_power: float = _f(0.9, "exponent of the poly learning-rate schedule", check=at_least(0))
    schedule: str = _f("poly", "learning-rate schedule, per iteration: poly (1 - it / iters)^power, or step (times "
                               "--step-gamma at the start of each of --step-parts equal parts of the run but the "
                               "first, for the student and a data-free method's generator: DFAD's --scheduler; the parts follow "
                               "--iters, so extending a run moves them)",
                       check=one_of("poly", "step"))
    step_parts: int = _f(3, "--schedule step: equal parts of the run (DFAD: 300 epochs, StepLR step 100: 3)",
                         check=at_least(1))
    step_gamma: float = _f(0.1, "--schedule step: learning-rate factor at each step (DFAD: 0.1 on CamVid, 0.3 on "
                                "NYUv2)", check=positive)
    head_lr_mult: float = _f(1.0, "learning-rate multiplier of everything the student's SGD trains outside its "
                                  "backbone (decoder head, classifier, auxiliary head, the method's connectors); "
                                  "semseg's and APD's code: 10", check=positive)


@dataclass
class RunConfig:
    recipe: str = _f("", "a published setting (engine/recipes.py; README: Recipes): sets models, data, optimisation, "
                         "loss weights and evaluation as the authors' code did, the batch split over the processes; "
                         "explicit flags override it; 'list' prints the names")
    dry_run: bool = _f(False, "print the resolved settings (after --recipe and every flag) and what the run still "
                              "needs, then exit without building anything")
    out: str = _f("", "run directory (empty: runs/<dataset>-<student>-<method>)")
    resume: str = _f("auto", "checkpoint to continue from: a file, 'auto' (the run directory's last checkpoint if any) or 'none'")
    seed: int = _f(0, "seed of initialisation, data order and augmentation")
    log_interval: int = _f(20, "iterations between log lines (the only host syncs of the loop)", check=at_least(1))
    eval_interval: int = _f(200, "iterations between validations (0: only at the end)", check=at_least(0))
    ckpt_interval: int = _f(200, "iterations between checkpoints (0: only the one always written at the end)",
                            check=at_least(0))
    keep_ckpts: int = _f(2, "numbered checkpoints kept besides last.pt", check=at_least(0))
    teacher_iters: int = _f(1200, "iterations of the teacher trained when no --teacher-ckpt is given",
                            check=at_least(1))
    baseline: bool = _f(False, "also train the student alone with the same settings (cached) for the closing table")
    precision: str = _f("auto", "auto|fp32|bf16|fp16: autocast dtype of the step; auto = bf16 on CUDA, fp32 on CPU; "
                                "fp16 adds a GradScaler. The teacher always runs in this precision too",
                                check=one_of("auto", "fp32", "bf16", "fp16"))
    channels_last: str = _f("auto", "auto|on|off: channels-last memory format of models and images (auto: on "
                                    "with CUDA)", check=one_of("auto", "on", "off"))
    compile: bool = _f(False, "torch.compile the student and the teacher (the fused loss kernels trace as custom ops)")
    optim_impl: str = _f("auto", "auto|fused|foreach|plain|apex: SGD implementation (auto = fused, measured fastest; "
                                 "apex = apex.optimizers.FusedSGD, when apex is importable)",
                                 check=one_of("auto", "fused", "foreach", "plain", "apex"))
    teacher_cuda_graph: bool = _f(False, "replay the teacher's forward as a CUDA graph (static input shape; CUDA only)")
    profile: int = _f(0, "profile N steps after --profile-warmup and print a per-phase table; writes a torch.profiler "
                         "trace and profile.json to <out>/profile and trains nothing else (0: off)")
    profile_warmup: int = _f(5, "--profile: untimed steps first (cuDNN autotuning, torch.compile, allocator warm-up)")
    sliding: bool = _f(False, "evaluate with sliding-window inference (crop-sized windows) instead of whole images")
    device: str = _f("auto", "auto|cpu|cuda", check=one_of("auto", "cpu", "cuda"))
    cache_dir: str = _f("", "where trained default teachers and baselines are cached (empty: $SEGKD_CACHE or ~/.cache/segkd)")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "method": MethodConfig, "optim": OptimConfig, "run": RunConfig}
# Sections of older configs whose fields now live elsewhere: a checkpoint written before the data-free settings
# moved into their methods' modules still loads them.
MOVED = {"datafree": "method"}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Inverse of to_dict; unknown keys are ignored so that older checkpoints still load."""
        sections = {}
        for name, klass in SECTIONS.items():
            known = {f.name: f for f in dataclasses.fields(klass)}
            values = {}
            given = dict(d.get(name) or {})
            for old, new in MOVED.items():
                if new == name:
                    given.update(d.get(old) or {})
            for k, v in given.items():
                if k in known:
                    parse = known[k].metadata.get("parse")
                    values[k] = parse(v) if parse else v
            sections[name] = klass(**values)
        return cls(**sections)

    def dumps(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def section_of():
    """{field name: its section}: every flag's place in a Config (flag names are unique across sections)."""
    return {f.name: section for section, klass in SECTIONS.items() for f in dataclasses.fields(klass)}


def add_flags(parser, sections=SECTIONS):
    """Add one flag per dataclass field, grouped by section."""
    for name, klass in sections.items():
        group = parser.add_argument_group(name)
        for f in dataclasses.fields(klass):
            flag = "--" + f.name.replace("_", "-")
            doc = f.metadata.get("doc", "")
            default = f.default
            if isinstance(default, bool):
                group.add_argument(flag, dest=f"{name}.{f.name}", action=argparse.BooleanOptionalAction,
                                   default=default, help=doc)
            else:
                kind = f.metadata.get("parse") or type(default)
                shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
                group.add_argument(flag, dest=f"{name}.{f.name}", type=kind, default=default,
                                   metavar=f.name.upper(), help=f"{doc} (default: {shown!r})")
    return parser


def markdown_reference(sections=SECTIONS):
    """The CLI reference table of the README, generated from the dataclasses (a test keeps the two equal)."""
    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for name, klass in sections.items():
        for f in dataclasses.fields(klass):
            d = f.default
            shown = ",".join(map(str, d)) if isinstance(d, tuple) else ("(empty)" if d == "" else d)
            if isinstance(d, bool):
                shown = "on" if d else "off"
            doc = f.metadata.get("doc", "").replace("|", "\\|")
            lines.append(f"| `--{f.name.replace('_', '-')}` | {shown} | {doc} |")
    return "\n".join(lines)


def config_from_args(args):
    """Build a Config from an argparse namespace filled by add_flags."""
    values = {name: {} for name in SECTIONS}
    for key, v in vars(args).items():
        if "." in key:
            section, fname = key.split(".", 1)
            if section in values:
                values[section][fname] = v
    return Config(**{name: SECTIONS[name](**values[name]) for name in SECTIONS})


def validate(cfg):
    """Check every field that declares a `check` (engine/settings.py), and the few rules between fields; raise a
    ValueError naming the first bad flag and its value. Run when the flags are parsed and when a Trainer is built."""
    for section in SECTIONS:
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            check = f.metadata.get("check")
            problem = check(getattr(values, f.name)) if check else None
            if problem:
                raise ValueError(f"--{f.name.replace('_', '-')} {problem}")
    d = cfg.data
    if d.scale_min > d.scale_max:
        raise ValueError(f"--scale-min {d.scale_min} is above --scale-max {d.scale_max}")
    if cfg.model.aux_weight:  # before any default teacher is trained for a run that cannot start
        from engine.methods import method_brings_inputs

        if method_brings_inputs(cfg.method.method):
            raise ValueError(f"--aux-weight {cfg.model.aux_weight}: --method {cfg.method.method} trains without "
                             "labels, so the auxiliary head would have nothing to learn from (give --aux-weight 0)")
    return cfg


def cache_dir(cfg):
    """Where trained default teachers, baselines and ADS scores are cached: --cache-dir, else $SEGKD_CACHE, else
    ~/.cache/segkd."""
    return Path(cfg.run.cache_dir or os.environ.get("SEGKD_CACHE") or Path.home() / ".cache" / "segkd")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, a value of the wrong type) are raised, so that they end in the one
    `segkd: error:` line of engine/errors.py like every other; --help still prints and exits. No abbreviated
    flags: --recipe must see which flags were given explicitly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise ValueError(message)


def parse_config(argv=None, description=None):
    """Flags -> a validated Config. With --recipe NAME the recipe's settings become the defaults and the flags are
    read again, so that every flag given explicitly overrides the recipe ('list' is kept for the caller)."""
    parser = add_flags(ArgumentParser(description=description))
    args = parser.parse_args(argv)
    name = getattr(args, "run.recipe")
    if name and name != "list":
        from engine.recipes import get_recipe, resolved_settings

        sections = section_of()
        recipe = get_recipe(name)
        batch_flag = "--gen-batch" if recipe.settings.get("method") == "dfad" else "--batch-size"
        given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)]
        settings = resolved_settings(recipe, batch_given=batch_flag in given)
        unknown = sorted(set(settings) - set(sections))
        if unknown:  # a recipe naming a setting that does not exist is segkd's bug, not the user's
            raise RuntimeError(f"recipe {name} sets unknown settings: {', '.join(unknown)}")
        parser.set_defaults(**{f"{sections[k]}.{k}": v for k, v in settings.items()})
        args = parser.parse_args(argv)
    return validate(config_from_args(args))


if __name__ == "__main__":
    print(markdown_reference())
