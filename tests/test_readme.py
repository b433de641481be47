"""The README is the front door: keep what it states true."""
import re
from pathlib import Path

from engine.config import markdown_reference
from engine.methods import METHODS
from engine.models import MODELS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_cli_reference_matches_the_flags():
    a, b = "<!-- cli-reference:start -->\n", "\n<!-- cli-reference:end -->"
    section = README[README.index(a) + len(a):README.index(b)]
    assert section == markdown_reference(), "README CLI reference is stale: regenerate with python engine/config.py"


def test_recipe_table_matches_the_recipes():
    from engine.recipes import markdown_table

    a, b = "<!-- recipes:start -->\n", "\n<!-- recipes:end -->"
    section = README[README.index(a) + len(a):README.index(b)]
    assert section == markdown_table(), "README recipe table is stale: regenerate with engine.recipes.markdown_table()"


def test_every_method_and_model_is_documented():
    for name in METHODS:
        assert f"| `{name}` |" in README, f"method {name} missing from the README's table"
    for name in MODELS:
        assert f"`{name}`" in README, f"model {name} missing from the README"


def test_main_job_and_test_command_are_stated():
    assert "torchrun --nproc-per-node=2 engine/train.py --method cad\n" in README
    cmd = re.search(r"<!-- test-command -->\n```\n(.+)\n```", README)
    assert cmd and cmd.group(1) == "python -m pytest -q"
