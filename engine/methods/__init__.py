"""Distillation methods: a plain dict from `--method` name to class, `build_method` for `a+b` sums, and the
run's MethodConfig assembled from every method's own settings dataclass.

Adding a method is one new module (the Method subclass and, if it has settings, its dataclass) and one line
in METHODS; its flags and its rows of the README's CLI table follow from its settings.
"""
import dataclasses

import torch.nn as nn

from engine.methods.adv import Adversarial
from engine.methods.angular import CAD, LAD, PAD
from engine.methods.apd import APD
from engine.methods.base import (POSITIONS, Method, NoDistillation, SharedSettings, SourceContext, TrainSource,
                                 segmentation_ce)
from engine.methods.cirkd import CIRKD
from engine.methods.cwd import CWD
from engine.methods.dfad import DFAD
from engine.methods.dfss import DFSS
from engine.methods.fitnet import FitNet
from engine.methods.ifvd import IFVD
from engine.methods.kd import KD
from engine.methods.md import MD
from engine.methods.skd import SKD

METHODS = {
    "none": NoDistillation,
    "kd": KD,
    "fitnet": FitNet,
    "md": MD,
    "lad": LAD,
    "cad": CAD,
    "pad": PAD,
    "apd": APD,
    "cwd": CWD,
    "dfad": DFAD,
    "dfss": DFSS,
    "adv": Adversarial,
    "ifvd": IFVD,
    "skd": SKD,
    "cirkd": CIRKD,
}


def assemble_config(methods):
    """The MethodConfig dataclass: SharedSettings' fields, then each method's settings fields in the order of
    `methods` (a settings class shared by several methods, as lad/cad/pad share theirs, counts once). Two
    methods declaring the same field name is a programming error, caught at import."""
    owner, fields, seen = {}, [], set()
    for name, settings in [("(shared)", SharedSettings)] + [(n, m.settings) for n, m in methods.items()]:
        if settings is None or settings in seen:
            continue
        seen.add(settings)
        for f in dataclasses.fields(settings):
            if f.name in owner:
                raise TypeError(f"method {name!r} declares setting {f.name!r}, already declared by {owner[f.name]!r}")
            owner[f.name] = name
            kept = ({"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING
                    else {"default": f.default})
            fields.append((f.name, f.type, dataclasses.field(metadata=f.metadata, **kept)))
    return dataclasses.make_dataclass("MethodConfig", fields, namespace={"__module__": __name__})


MethodConfig = assemble_config(METHODS)
MethodConfig.__doc__ = "Every method's settings: the shared ones, then each method's own (see assemble_config)."


class Combined(Method):
    """`a+b`: the sum of the distillation terms of several methods; each term is logged as `<method>/<term>`."""

    def __init__(self, parts):
        nn.Module.__init__(self)
        self.parts = nn.ModuleDict(parts)
        self.spec = "+".join(parts)
        self.needs_teacher = any(m.needs_teacher for m in parts.values())

    def forward(self, s, t, batch):
        return {f"{name}/{k}": v for name, m in self.parts.items() for k, v in m(s, t, batch).items()}

    def start_iteration(self, iteration, total_iters):
        for m in self.parts.values():
            m.start_iteration(iteration, total_iters)

    def separately_trained(self):
        return [mod for m in self.parts.values() for mod in m.separately_trained()]

    def optimizers(self):
        return [opt for m in self.parts.values() for opt in m.optimizers()]

    def train_source(self, ctx):
        """The one part's source (e.g. dfss+cad: dfss's pool, cad's terms on it); two sources are an error."""
        sources = {name: m.train_source(ctx) for name, m in self.parts.items()}
        sources = {name: s for name, s in sources.items() if s is not None}
        if len(sources) > 1:
            raise ValueError(f"--method {self.spec}: {' and '.join(sources)} each bring their own training inputs; "
                             "combine at most one data-free method with others")
        return next(iter(sources.values()), None)


def parse_method(spec):
    """'cad+kd' -> ['cad', 'kd'], with a clear error for unknown or repeated names."""
    names = [n.strip() for n in str(spec).split("+")]
    for n in names:
        if n not in METHODS:
            raise ValueError(f"unknown --method {n!r} (in {spec!r}); valid methods: {', '.join(METHODS)}, "
                             "or several joined by '+'")
    if len(set(names)) != len(names):
        raise ValueError(f"--method {spec!r} names a method twice")
    if "none" in names and len(names) > 1:
        raise ValueError(f"--method {spec!r}: 'none' cannot be combined with other methods")
    return names


def method_needs_teacher(spec):
    return any(METHODS[n].needs_teacher for n in parse_method(spec))


def method_brings_inputs(spec):
    """A data-free method among `spec`: one that trains on inputs of its own (a TrainSource), without labels."""
    return any(METHODS[n].train_source is not Method.train_source for n in parse_method(spec))


def build_method(cfg, student_channels, teacher_channels, num_classes, ignore_index=255):
    """cfg: MethodConfig. Returns one Method (a Combined one for `a+b`)."""
    names = parse_method(cfg.method)
    if cfg.position and not any(METHODS[n].positioned for n in names):
        raise ValueError(f"--position {cfg.position!r} has no effect on --method {cfg.method!r}: "
                         "kd and none always use the logits")
    parts = {n: METHODS[n](cfg, student_channels, teacher_channels, num_classes, ignore_index) for n in names}
    return Combined(parts)


__all__ = ["METHODS", "POSITIONS", "Method", "MethodConfig", "SourceContext", "TrainSource", "build_method",
           "method_brings_inputs", "method_needs_teacher", "parse_method", "segmentation_ce"]
