"""Textual pipelines (`fold-bn,prune-weights(sparsity=0.5)`) and TOML recipes, parsed without eval."""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["parse_pipeline", "parse_recipe", "format_pipeline", "Recipe", "RECIPE_SETTINGS"]

_NAME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*")
# Run settings a recipe may carry besides its passes (the CLI's flags of the same name win).
RECIPE_SETTINGS = {"max_drop": float, "temperature": float, "alpha": float, "providers": list}


def _split_items(spec: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes."""
    items, depth, quote, start, escaped = [], 0, "", 0, False
    for i, ch in enumerate(spec):
        if escaped:
            escaped = False
        elif quote and ch == "\\":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise OptionError(f"unbalanced ')' at position {i} in pipeline '{spec}'")
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth or quote:
        raise OptionError(f"unbalanced brackets or quotes in pipeline '{spec}'")
    items.append(spec[start:])
    return items


def _parse_args(name: str, text: str) -> dict[str, Any]:
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise OptionError(f"cannot parse options of '{name}': ({text})") from None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise OptionError(f"options of '{name}' must be key=value pairs, got ({text})")
    options = {}
    for kw in call.keywords:
        try:
            options[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise OptionError(f"option '{kw.arg}' of '{name}' must be a literal (number, string, bool, list)") from None
    return options


def parse_pipeline(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """`"a,b(x=1, y='s')"` -> `[("a", {}), ("b", {"x": 1, "y": "s"})]`."""
    if not spec or not spec.strip():
        raise OptionError("empty pipeline")
    steps = []
    for item in _split_items(spec):
        m = _NAME.match(item)
        if not m:
            raise OptionError(f"expected a pass name in pipeline, got '{item.strip()}'")
        name, rest = m.group(1), item[m.end():].strip()
        if not rest:
            steps.append((name, {}))
        elif rest.startswith("(") and rest.endswith(")"):
            steps.append((name, _parse_args(name, rest[1:-1])))
        else:
            raise OptionError(f"unexpected text after pass '{name}': '{rest}'")
    return steps


def format_pipeline(steps: list[tuple[str, dict[str, Any]]]) -> str:
    def one(name: str, opts: dict[str, Any]) -> str:
        inner = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v!r}" for k, v in opts.items())
        return f"{name}({inner})" if inner else name
    return ",".join(one(n, o) for n, o in steps)


@dataclass
class Recipe:
    steps: list[tuple[str, dict[str, Any]]]
    settings: dict[str, Any] = field(default_factory=dict)


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """A TOML recipe: `pipeline = "..."` or `[[pass]]` tables (`name` plus options), and optional
    run settings (`max_drop`, `temperature`, `alpha`, `providers`)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"{source} is not valid TOML: {e}") from None
    steps: list[tuple[str, dict[str, Any]]] = []
    if "pipeline" in doc:
        if not isinstance(doc["pipeline"], str):
            raise OptionError(f"{source}: 'pipeline' must be a string")
        steps += parse_pipeline(doc.pop("pipeline"))
    for i, table in enumerate(doc.pop("pass", [])):
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise OptionError(f"{source}: [[pass]] number {i + 1} needs a name")
        table = dict(table)
        steps.append((table.pop("name"), table))
    if not steps:
        raise OptionError(f"{source} lists no passes (use pipeline = \"...\" or [[pass]] tables)")
    settings = {}
    for key, value in doc.items():
        if key not in RECIPE_SETTINGS:
            raise OptionError(f"{source}: unknown setting '{key}' (known: pipeline, pass, {', '.join(RECIPE_SETTINGS)})")
        if not isinstance(value, RECIPE_SETTINGS[key]) and not (RECIPE_SETTINGS[key] is float and isinstance(value, int)):
            raise OptionError(f"{source}: setting '{key}' must be a {RECIPE_SETTINGS[key].__name__}")
        settings[key] = value
    return Recipe(steps, settings)
