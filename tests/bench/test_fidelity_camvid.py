"""bench/fidelity_camvid.py: the statistics and verdicts on fake results, the report's rows, DFSS's pool (train
frames and foreign images, never a val frame), and (slow) the --quick run end to end."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fake_datasets import make_camvid

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import fidelity_camvid as fc  # noqa: E402
from datafree_camvid import downscale_camvid  # noqa: E402

# val mIoU per seed (fractions, as results.json holds them)
FAKE = {"teacher": [0.45], "alone": [0.30, 0.32, 0.34], "kd": [0.36, 0.37, 0.38], "cwd": [0.31, 0.33, 0.32],
        "dfad": [0.05, 0.04, 0.06], "fitnet": [0.33, 0.34, 0.335]}


def fake_results():
    runs = {name: [{"seed": s, "miou": v, "wall": 60.0 * (s + 1)} for s, v in enumerate(vals)]
            for name, vals in FAKE.items() if name != "teacher"}
    return {"teacher": {"miou": FAKE["teacher"][0], "wall": 300.0}, "runs": runs}


def test_summary_gap_deltas_and_verdicts():
    s = fc.summarize(fake_results())
    assert s["teacher"] == pytest.approx(45.0)
    assert s["alone"] == pytest.approx(32.0) and s["alone_sd"] == pytest.approx(2.0)
    assert s["gap"] == pytest.approx(13.0)
    kd = s["rows"]["kd"]
    assert kd["delta"] == pytest.approx(5.0) and kd["sd"] == pytest.approx(1.0)
    assert kd["se"] == pytest.approx((1 / 3 + 4 / 3) ** 0.5)
    assert kd["t"] == pytest.approx(5.0 / (5 / 3) ** 0.5)
    assert s["rows"]["kd"]["wall_min"] == pytest.approx(2.0)  # mean of 1, 2, 3 minutes
    # fitnet: +1.5, more than its own sd (0.5) but not the student alone's (2.0): within the spread
    assert s["rows"]["fitnet"]["delta"] == pytest.approx(1.5) and s["rows"]["fitnet"]["spread"] == pytest.approx(2.0)
    assert s["verdicts"] == {"above": ["kd"], "within spread": ["cwd", "fitnet"], "below": ["dfad"]}
    # seed by seed: cwd - alone = +1, +1, -2
    assert s["rows"]["cwd"]["paired"] == pytest.approx({"mean": 0.0, "sd": 3 ** 0.5, "n": 3})


def test_compare_uses_the_larger_seed_spread():
    # +3 over an alone of sd 1, but the method's own sd is 4: within its spread
    r = fc.compare([30.0, 38.0, 34.0, 42.0], [30.0, 31.0, 32.0])
    assert r["delta"] == pytest.approx(5.0) and r["spread"] == pytest.approx(r["sd"])
    assert r["verdict"] == "within spread"
    assert fc.compare([36.0, 37.0, 38.0], [30.0, 31.0, 32.0])["verdict"] == "above"


def test_report_has_a_row_per_method_with_numbers_that_parse():
    s = fc.summarize(fake_results())
    setting = {"title": "t", "device": "CPU", "command": "c", "description": "d", "teacher": "pspnet_small",
               "teacher_iters": 1500, "lanes": 2, "what": {n: w for n, (w, _) in fc.METHODS.items()}, "ads": "",
               "digest": "0123456789ab", "teacher_curve": "250: 30.0"}
    timing = {"teacher_min": 5.0, "runs_min": 20.0, "elapsed_min": 12.0, "load": "mean 2.0"}
    lines = fc.render(s, setting, timing)
    text = "\n".join(lines)
    assert "Gap teacher - student alone: **13.0** (meets" in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines if line.startswith("| ")
            and not line.startswith("| method") and not line.startswith("| ---")}
    assert set(rows) == set(FAKE) - {"teacher"}
    for name, cells in rows.items():
        mean = float(re.match(r"([\d.]+)", cells[3]).group(1))
        assert mean == pytest.approx(s["rows"][name]["mean"], abs=0.05)
        if name != "alone":
            assert float(cells[4].split(" ± ")[0]) == pytest.approx(s["rows"][name]["delta"], abs=0.05)
            assert cells[6] == s["rows"][name]["verdict"]
            assert float(cells[7].split(" ± ")[0]) == pytest.approx(s["rows"][name]["paired"]["mean"], abs=0.05)
    assert "Above the student alone by more than the seed spread: kd." in text
    missing = set(fc.METHODS) - set(FAKE)
    assert all(m in text.split("Not run yet: ")[1] for m in missing)
    # a gap under 8 is called out
    short = fake_results()
    short["teacher"]["miou"] = 0.39
    assert "does NOT meet" in "\n".join(fc.render(fc.summarize(short), setting, timing))


def test_dfss_pool_holds_the_train_frames_and_no_val_frame(tmp_path):
    src = make_camvid(tmp_path, splits=(("train", 4), ("val", 3)), size=(24, 32))
    data = downscale_camvid(src, tmp_path / "x1", 1.0)
    pool = fc.build_train_pool(data, tmp_path / "pool")
    frames = sorted(p.name for p in pool.rglob("*.png") if "foreign" not in p.parts)
    assert frames == sorted(p.name for p in (data / "train").glob("*.png"))
    for f in (pool / "train").iterdir():
        assert f.read_bytes() == (data / "train" / f.name).read_bytes()
    val = {(data / "val" / f.name).read_bytes() for f in (data / "val").glob("*.png")}
    assert not any(p.read_bytes() in val for p in pool.rglob("*.png"))
    foreign = list((pool / "foreign").rglob("*.png"))
    assert len(foreign) == 4 and all(Image.open(p).size == (32, 24) for p in foreign)
    assert not (tmp_path / "pool.view").exists() and not (tmp_path / "pool.partial").exists()
    assert fc.build_train_pool(data, tmp_path / "pool") == pool  # cached


@pytest.mark.slow
def test_quick_run_reports_every_method(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "bench" / "fidelity_camvid.py"), "--quick", "--work", str(tmp_path)],
                   check=True, env=env, cwd=ROOT, timeout=600)
    record = json.loads((tmp_path / "quick" / "results" / "fidelity_camvid_quick.json").read_text())
    assert set(record["summary"]["rows"]) == set(fc.METHODS)
    text = (tmp_path / "quick" / "results" / "fidelity_camvid_quick.md").read_text()
    assert all(f"| {m} |" in text for m in fc.METHODS)


def test_a_run_is_keyed_by_its_flags_and_the_engine_source(tmp_path):
    argv = ["--method", "kd", "--seed", "0"]
    key = fc.run_dir(tmp_path, "kd-s0", argv, "abc")
    assert key == fc.run_dir(tmp_path, "kd-s0", list(argv), "abc")
    assert key != fc.run_dir(tmp_path, "kd-s0", ["--method", "kd", "--seed", "1"], "abc")
    assert key != fc.run_dir(tmp_path, "kd-s0", argv, "abd")  # a changed method or default runs anew
    assert fc.run_dir(tmp_path, "cad+kd-s0", argv, "abc").name.startswith("cad_kd-s0-")
