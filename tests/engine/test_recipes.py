"""engine/recipes.py: --recipe, --recipe list, --dry-run, and a few iterations of every recipe on tiny models."""
import dataclasses
import json

import pytest

from engine import recipes
from engine.config import SECTIONS, parse_config
from engine.recipes import RECIPES, get_recipe, resolved_settings
from engine.train import main

FIELDS = {f.name: (section, f) for section, klass in SECTIONS.items() for f in dataclasses.fields(klass)}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_settings_reach_the_config_and_flags_override_them(name, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = get_recipe(name)
    assert recipe.name == name and recipe.doc and recipe.summary
    cfg = parse_config(["--recipe", name])
    for key, value in recipe.settings.items():
        section, f = FIELDS[key]  # every setting a recipe names is a flag
        assert getattr(getattr(cfg, section), key) == value, key
    batch = "gen_batch" if recipe.settings.get("method") == "dfad" else "batch_size"
    assert getattr(cfg.method if batch == "gen_batch" else cfg.data, batch) == recipe.global_batch
    # an explicit flag wins over the recipe, in either order on the command line
    assert parse_config(["--lr", "0.123", "--recipe", name]).optim.lr == 0.123
    assert parse_config(["--recipe", name, "--iters", "7"]).optim.iters == 7
    for flag, what in recipe.needs:
        assert flag.startswith("--") and what
    for method, figure in recipe.paper.items():
        assert figure is None or 0 < figure < 100, (method, figure)


def test_global_batch_is_split_over_the_processes(monkeypatch):
    recipe = get_recipe("apd_cityscapes_r18")  # global batch 8 over the authors' 4 GPUs
    assert resolved_settings(recipe, processes=4)["batch_size"] == 2
    assert resolved_settings(recipe, processes=1)["batch_size"] == 8
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_config(["--recipe", "apd_cityscapes_r18"]).data.batch_size == 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"--recipe apd_cityscapes_r18: its global batch 8 does not split over 3"):
        parse_config(["--recipe", "apd_cityscapes_r18"])
    assert parse_config(["--recipe", "apd_cityscapes_r18", "--batch-size", "3"]).data.batch_size == 3
    monkeypatch.setenv("WORLD_SIZE", "2")  # dfad's batch is the generator's
    cfg = parse_config(["--recipe", "dfad_camvid"])
    assert cfg.method.gen_batch == 32 and cfg.data.batch_size == 8


def test_epochs_become_the_codes_iterations():
    # APD's Cityscapes config: 200 epochs of 2975 images over 4 ranks (DistributedSampler: ceil(2975 / 4) = 744
    # each) in batches of 2, the last incomplete one dropped: 372 an epoch (not floor(2975 / 8) = 371)
    assert recipes.epochs_to_iters(200, 2975, 8, gpus=4) == 200 * 372
    assert recipes.epochs_to_iters(200, 2975, 8) == 200 * 371
    assert get_recipe("apd_cityscapes_r18").settings["iters"] == 74400
    assert get_recipe("apd_ade20k_r18").settings["iters"] == 100 * 2526
    assert get_recipe("apd_context_r18").settings["iters"] == 100 * 416
    assert get_recipe("dfad_camvid").settings["iters"] == 300 * 50 * 5  # epochs x epoch_itrs x 5 student steps


def test_unknown_recipe_is_one_line_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"--recipe 'apd_mars' is not a recipe; valid: apd_cityscapes_r18"):
        main(["--recipe", "apd_mars", "--out", str(tmp_path / "x")])


def test_recipe_list_prints_one_name_a_line(capsys):
    assert main(["--recipe", "list"]) is None
    assert capsys.readouterr().out.split() == list(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_prints_every_setting_and_what_is_missing_and_builds_nothing(name, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    assert main(["--recipe", name, "--dry-run", "--teacher-ckpt", "t.pt", "--out", str(out)]) is None
    text = capsys.readouterr().out
    recipe = get_recipe(name)
    assert f"recipe {name}: {recipe.summary}" in text
    for key in FIELDS:
        assert f"--{key.replace('_', '-')} " in text, key
    assert "--teacher-ckpt: " in text and "(given: t.pt)" in text
    if any(flag == "--data-root" for flag, _ in recipe.needs):
        assert "needs --data-root: " in text and "(NOT GIVEN)" in text
    lr_line = next(line for line in text.splitlines() if line.strip().startswith("--lr "))
    assert float(lr_line.split()[1]) == recipe.settings.get("lr", 0.05)
    assert not out.exists()  # nothing built, nothing written


def test_dry_run_marks_what_differs_from_the_defaults(capsys):
    main(["--dry-run", "--lr", "0.5"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")}
    assert lines["--lr"].rstrip().endswith("*") and not lines["--iters"].rstrip().endswith("*")


TINY = {"teacher": "pspnet_small", "student": "pspnet_tiny"}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    main(["--method", "none", "--student", TINY["teacher"], "--crop", "32", "--batch-size", "2", "--iters", "2",
          "--workers", "0", "--val-size", "2", "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "t")])
    return str(tmp / "t" / "last.pt")


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_a_few_iterations_on_tiny_models(name, tiny_teacher, tmp_path, capsys, monkeypatch):
    """The recipe as it is but for tiny models, the built-in data and a few iterations: its schedule, loss
    conventions, auxiliary head, learning-rate multiplier and evaluation all run; the closing table prints the
    source's figures beside ours."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = get_recipe(name)
    method = recipe.settings["method"]
    args = ["--recipe", name, "--dataset", "synthetic", "--data-root", "", "--teacher", TINY["teacher"],
            "--student", TINY["student"], "--crop", "32", "--batch-size", "2", "--iters", "3", "--val-split", "val",
            "--teacher-ckpt", tiny_teacher,
            "--workers", "0", "--val-size", "2", "--log-interval", "1", "--pretrained-backbone", "",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    if recipe.settings.get("val_resize"):  # the recipe's resizing side, at the tiny scale
        args += ["--val-resize", "48"]
    if method == "dfad":
        args += ["--gen-batch", "2", "--gen-size", "32", "--gen-every", "2"]
    if method == "dfss":
        pool = tmp_path / "pool"
        pool.mkdir()
        from PIL import Image
        import numpy as np

        rng = np.random.default_rng(0)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(pool / f"{i}.png")
        args += ["--aux-data", str(pool)]
    result = main(args)
    assert 0 <= result["miou"] <= 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["run"]["recipe"] == name and config["optim"]["schedule"] == recipe.settings.get("schedule", "poly")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    terms = set(next(r for r in records if r["kind"] == "train")["terms"])
    assert ("aux" in terms) == (recipe.settings.get("aux_weight", 0) > 0)
    assert "(paper)" not in capsys.readouterr().out  # other models than the recipe's: no figures beside them


def test_paper_rows_and_the_closing_table():
    """The closing table prints the source's teacher, student-alone and method figures beside ours, for the
    recipe's own models and data only."""
    from engine.runs import summary

    recipe = get_recipe("cirkd_cityscapes_r18")
    # CIRKD's CWD row trained CWD on feature and logits plus KD and the adversarial term: not segkd's `cwd`
    assert recipes.paper_rows(recipe, "cwd") == [("teacher (paper)", 78.07), ("student alone (paper)", 74.21)]
    assert recipes.paper_rows(get_recipe("skd_cityscapes_r18"), "kd+skd+adv")[-1] == ("kd+skd+adv (paper)", 75.42)
    assert recipes.paper_rows(get_recipe("ifvd_cityscapes_r18"), "kd+ifvd+adv")[-1] == ("kd+ifvd+adv (paper)", 75.59)
    assert recipes.paper_rows(recipe, "none") == [("teacher (paper)", 78.07), ("student alone (paper)", 74.21)]
    assert recipes.paper_rows(recipe, "kd") == recipes.paper_rows(recipe, "none")  # no kd figure in CIRKD's table
    assert recipes.paper_rows(recipe, "kd+cirkd")[-1] == ("kd+cirkd (paper)", 76.38)
    assert recipes.paper_rows(get_recipe("apd_ade20k_r18"), "none") == [("student alone (paper)", 37.19)]
    cfg = parse_config(["--recipe", "cirkd_cityscapes_r18", "--method", "cwd", "--crop", "64"])
    result = {"miou": 0.5, "class_names": ["c"] * 19, "run_dir": "r", "teacher": cfg.model.teacher,
              "teacher_miou": 0.6}
    text = summary(cfg, result, None)
    for label, figure in recipes.paper_rows(recipe, "cwd"):
        line = next(line for line in text.splitlines() if label in line)
        assert f"{figure:5.1f}" in line
    cfg.model.student = "pspnet_tiny"
    assert recipes.paper_rows(recipe, "cwd", cfg) == [] and "(paper)" not in summary(cfg, result, None)
