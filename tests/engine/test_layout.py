"""The shape of the code base that the other issues build on: one step object, one-way imports, method settings."""
import ast
import dataclasses
from pathlib import Path

import pytest

from engine.config import Config, add_flags, markdown_reference
from engine.methods import METHODS, Method, MethodConfig, assemble_config
from engine.methods.kd import KD
from engine.settings import setting

ROOT = Path(__file__).resolve().parents[2]


def imports_of(path):
    """Every module named by an import statement of `path` (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_nothing_imports_the_entry_point_and_kernels_import_nothing_of_engine():
    for path in (ROOT / "engine").rglob("*.py"):
        assert "engine.train" not in imports_of(path), f"{path} imports the entry point engine/train.py"
    for path in (ROOT / "kernels").rglob("*.py"):
        assert not any(n == "engine" or n.startswith("engine.") for n in imports_of(path)), path


def test_the_trainer_the_profiler_and_every_training_benchmark_call_train_step():
    assert "TrainStep" in (ROOT / "engine" / "trainer.py").read_text()
    assert "profile(step, batches" in (ROOT / "engine" / "profile.py").read_text()
    for bench in ("bench_data.py", "bench_optim.py", "train_throughput.py"):
        text = (ROOT / "bench" / bench).read_text()
        assert "TrainStep" in text or "trainer.step" in text, f"bench/{bench} does not use the TrainStep"
        assert ".backward()" not in text, f"bench/{bench} runs a step of its own"


def test_method_config_is_every_method_settings_after_the_shared_ones():
    names = [f.name for f in dataclasses.fields(MethodConfig)]
    assert names[:3] == ["method", "position", "temperature"]
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls.settings) if cls.settings else []:
            assert f.name in names, (name, f.name)
            assert getattr(MethodConfig(), f.name) == f.default, (name, f.name)
    assert len(names) == len(set(names))


def test_a_new_method_is_one_module_and_one_line():
    """A method with its own settings dataclass joins the flags, the README table and the method's cfg."""

    @dataclasses.dataclass
    class ScaledKDSettings:
        skd_scale: float = setting(2.5, "skd: a made-up weight, for this test")

    class ScaledKD(KD):
        settings = ScaledKDSettings

    config = assemble_config({**METHODS, "scaled": ScaledKD})
    import argparse
    parser = add_flags(argparse.ArgumentParser(), {"method": config})
    cfg = parser.parse_args(["--skd-scale", "4"])
    assert getattr(cfg, "method.skd_scale") == 4.0
    assert "| `--skd-scale` | 2.5 | skd: a made-up weight, for this test |" in markdown_reference({"method": config})


def test_two_methods_declaring_one_setting_is_an_error():
    @dataclasses.dataclass
    class Clash:
        kd_weight: float = setting(1.0, "clashes with kd's")

    class Other(Method):
        settings = Clash

    with pytest.raises(TypeError, match="method 'other' declares setting 'kd_weight', already declared by 'kd'"):
        assemble_config({**METHODS, "other": Other})


def test_a_config_written_before_the_data_free_settings_moved_still_loads():
    old = Config().to_dict()
    moved = {k: old["method"].pop(k) for k in ("gen_nz", "gen_size", "aux_data", "wdpd_alpha")}
    old["datafree"] = {**moved, "gen_nz": 32, "gen_size": [48, 64], "aux_data": "/pool"}
    cfg = Config.from_dict(old)
    assert (cfg.method.gen_nz, cfg.method.gen_size, cfg.method.aux_data) == (32, (48, 64), "/pool")
    assert cfg.method.wdpd_alpha == moved["wdpd_alpha"]
