"""YAML recipes with command-line overrides and resolved-config saving.

A training script's arguments are dataclasses parsed by ``transformers.HfArgumentParser``.
A recipe is a YAML mapping of the same ``key: value`` pairs; it is turned into
``--key value`` arguments placed *before* the real command line, so anything given on
the command line overrides the recipe (argparse keeps the last occurrence).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from models.files import atomic_write_text


class RecipeError(ValueError):
    """A recipe file or a command-line override is unusable; the message says why."""


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe: a flat mapping of argument names to values."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(recipe, dict):
        raise RecipeError(
            f"recipe {path} must be a mapping of `key: value`, not {type(recipe).__name__}"
        )
    return recipe


def _as_cli_value(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    if isinstance(value, dict):
        # Dict-valued training arguments (e.g. lr_scheduler_kwargs) are parsed from JSON.
        import json

        return [json.dumps(value)]
    return [str(value)]


def recipe_to_args(recipe: dict[str, Any], known: set[str], source: str = "recipe") -> list[str]:
    """Turn a recipe mapping into ``--key value`` strings; unknown keys are a :class:`RecipeError`."""
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(
            f"{source}: unknown key(s) {unknown}; see --help for the accepted arguments"
        )
    args: list[str] = []
    for key, value in recipe.items():
        if value is None or value == []:
            continue  # `key:` with no value (or an empty list) means "use the default"
        args += [f"--{key}", *_as_cli_value(value)]
    return args


def _known_keys(parser: HfArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest != "help"}


def parse_recipe_and_overrides(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[tuple[Any, ...], Path | None]:
    """Parse ``[RECIPE.yaml] [--key value ...]`` into instances of ``dataclass_types``.

    Returns the dataclass instances and the recipe path (``None`` without a recipe).
    Unknown recipe keys raise :class:`RecipeError`; unknown command-line options make
    argparse exit with status 2 and a usage message, like any CLI.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, prog=prog)
    recipe_path = None
    prefix: list[str] = []
    if argv and not argv[0].startswith("-"):
        recipe_path = Path(argv.pop(0))
        prefix = recipe_to_args(load_recipe(recipe_path), _known_keys(parser), str(recipe_path))
    try:
        *outputs, remaining = parser.parse_args_into_dataclasses(
            prefix + argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as exc:  # a dataclass __post_init__ rejected a combination of values
        raise RecipeError(f"invalid arguments: {exc}") from exc
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return tuple(outputs), recipe_path


def resolved_config(*instances: Any) -> dict[str, Any]:
    """One flat mapping of every argument's final value, for ``resolved_config.yaml``."""
    config: dict[str, Any] = {}
    for instance in instances:
        values = (
            instance.to_dict() if hasattr(instance, "to_dict") else dataclasses.asdict(instance)
        )
        for key, value in values.items():
            # Enums and paths become plain strings so the YAML can be fed back as a recipe.
            if hasattr(value, "value") and not isinstance(value, int | float | str | bool):
                value = value.value
            config[key] = (
                value
                if isinstance(value, int | float | str | bool | list | dict | None)
                else str(value)
            )
    return config


def write_yaml(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Atomically write ``data`` as YAML, keys in insertion order."""
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
