"""YAML recipes with command-line overrides, and the resolved config written back."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from training.recipe import (
    RecipeError,
    atomic_write_text,
    load_recipe,
    parse_recipe_and_overrides,
    resolved_config,
    write_yaml,
)

pytestmark = pytest.mark.unit


@dataclass
class First:
    train_file: str | None = None
    max_length: int = 64
    tags: list[str] = field(default_factory=list)


@dataclass
class Second:
    learning_rate: float = 1e-4
    resume: bool = False


def test_cli_overrides_recipe_and_recipe_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train_file: a.csv\nmax_length: 32\nlearning_rate: 0.5\ntags: [x, y]\n")
    (first, second), path = parse_recipe_and_overrides(
        (First, Second), [str(recipe), "--max_length", "16", "--resume"]
    )
    assert path == recipe
    assert first == First(train_file="a.csv", max_length=16, tags=["x", "y"])
    assert second == Second(learning_rate=0.5, resume=True)


def test_no_recipe_uses_defaults_and_cli():
    (first, second), path = parse_recipe_and_overrides((First, Second), ["--learning_rate", "2"])
    assert path is None and first == First() and second.learning_rate == 2.0


def test_unknown_recipe_key_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_length: 8\nlerning_rate: 1\n")
    with pytest.raises(RecipeError, match="lerning_rate"):
        parse_recipe_and_overrides((First, Second), [str(recipe)])


def test_unknown_cli_option_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_recipe_and_overrides((First, Second), ["--nope", "1"])
    assert exc.value.code == 2
    assert "--nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"), [("- a\n- b\n", "mapping"), ("a: [unclosed\n", "not valid YAML")]
)
def test_bad_recipe_file_is_recipe_error(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_resolved_config_round_trips_as_recipe(tmp_path):
    config = resolved_config(First(train_file="t.csv", tags=["q"]), Second(learning_rate=0.25))
    path = write_yaml(tmp_path / "resolved.yaml", config)
    assert yaml.safe_load(path.read_text()) == config
    (first, second), _ = parse_recipe_and_overrides((First, Second), [str(path)])
    assert first == First(train_file="t.csv", tags=["q"]) and second.learning_rate == 0.25


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("task", ["intent", "summarizer"])
def test_every_committed_recipe_parses_with_its_training_script(task):
    from pathlib import Path

    from training import train_intent, train_summarizer

    script = {"intent": train_intent, "summarizer": train_summarizer}[task]
    types = (script.DataArguments, script.ModelArguments)
    types += (
        train_intent.IntentTrainingArguments
        if task == "intent"
        else train_summarizer.SummarizerTrainingArguments,
    )
    recipes = sorted((Path(__file__).parents[2] / "training/recipes" / task).glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        parsed, _ = parse_recipe_and_overrides(types, [str(recipe), "--output_dir", "elsewhere"])
        for key, value in load_recipe(recipe).items():
            (got,) = {getattr(p, key) for p in parsed if hasattr(p, key)}
            wanted = "elsewhere" if key == "output_dir" else value
            assert got == wanted or str(got).endswith(str(wanted)), (recipe.name, key)
