import re

import pytest

from onnxcompress import OptionError, default_registry, parse_pipeline, parse_recipe
from onnxcompress.pipeline import format_pipeline


def test_parses_names_and_literal_options():
    steps = parse_pipeline("fold-bn, prune-weights(sparsity=0.5, scope='layer', exclude=['a', 'b,c'])")
    assert steps == [("fold-bn", {}), ("prune-weights", {"sparsity": 0.5, "scope": "layer", "exclude": ["a", "b,c"]})]


def test_format_round_trips():
    steps = [("fold-bn", {}), ("prune-weights", {"sparsity": 0.9, "exclude": ("x",)})]
    assert parse_pipeline(format_pipeline(steps)) == [("fold-bn", {}), ("prune-weights", {"sparsity": 0.9, "exclude": ["x"]})]


@pytest.mark.parametrize("spec, message", [
    ("", "empty pipeline"),
    ("prune-weights(0.5)", "key=value"),
    ("prune-weights(sparsity=__import__('os'))", "must be a literal"),
    ("prune-weights(sparsity=0.5", "unbalanced"),
    ("prune-weights)", "unbalanced"),
    ("fold-bn extra", "unexpected text"),
    ("(sparsity=1)", "expected a pass name"),
    ("prune-weights(**{'a': 1})", "key=value"),
    ("prune-weights(x={[1]: 2})", "must be a literal"),
])
def test_bad_pipelines(spec, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        parse_pipeline(spec)


def test_unknown_pass_names_known_ones():
    from onnxcompress.passes import BUILTIN

    known = ", ".join(sorted(p.name for p in BUILTIN))       # every registered pass, sorted
    with pytest.raises(OptionError, match=re.escape(f"unknown pass 'prune' (known: {known})")):
        default_registry().create("prune")


@pytest.mark.parametrize("options, message", [
    ({"ratio": 0.3}, "pass 'prune-weights' has no option 'ratio'"),
    ({"sparsity": "high"}, "option 'sparsity' must be float, got 'high'"),
    ({"sparsity": True}, "option 'sparsity' must be float"),
    ({"sparsity": 1.5}, r"sparsity must be in \[0, 1\)"),
    ({"scope": "world"}, "option 'scope' must be 'global'\\|'normalized'\\|'layer'"),
    ({"exclude": [1]}, "option 'exclude' must be list of str"),
])
def test_bad_options_fail_before_work(options, message):
    with pytest.raises(OptionError, match=message):
        default_registry().create("prune-weights", options)


def test_int_is_accepted_for_float_and_list_for_tuple():
    p = default_registry().create("prune-weights", {"sparsity": 0, "exclude": ["conv1"]})
    assert p.sparsity == 0.0 and isinstance(p.sparsity, float) and p.exclude == ("conv1",)


def test_recipe_tables_and_settings():
    recipe = parse_recipe('max_drop = 1\n[[pass]]\nname = "fold-bn"\n[[pass]]\nname = "prune-weights"\nsparsity = 0.9\n')
    assert recipe.steps == [("fold-bn", {}), ("prune-weights", {"sparsity": 0.9})]
    assert recipe.settings == {"max_drop": 1}


def test_recipe_pipeline_string():
    assert parse_recipe('pipeline = "fold-bn,prune-weights(sparsity=0.2)"').steps[1] == ("prune-weights", {"sparsity": 0.2})


@pytest.mark.parametrize("text, message", [
    ("pipeline = ", "not valid TOML"),
    ("max_drop = 1", "lists no passes"),
    ('pipeline = "fold-bn"\nspeed = 3', "unknown setting 'speed'"),
    ('pipeline = "fold-bn"\nmax_drop = "a"', "'max_drop' must be a float"),
    ("[[pass]]\nsparsity = 1", "needs a name"),
])
def test_bad_recipes(text, message):
    with pytest.raises(OptionError, match=message):
        parse_recipe(text)


import keyword  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

_names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
_values = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                    st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3))
_keys = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda k: not keyword.iskeyword(k))
_steps = st.lists(st.tuples(_names, st.dictionaries(_keys, _values,
                                                    max_size=3)), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(_steps)
def test_any_formatted_pipeline_parses_back(steps):
    parsed = parse_pipeline(format_pipeline(steps))
    assert parsed == [(n, {k: list(v) if isinstance(v, tuple) else v for k, v in o.items()}) for n, o in steps]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_never_crashes_the_parser(text):
    try:
        parse_pipeline(text)
    except OptionError:
        pass


def test_bundled_recipes_parse_and_build():
    from conftest import ROOT
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        recipe = parse_recipe(path.read_text(), str(path))
        passes = [default_registry().create(n, o) for n, o in recipe.steps]
        assert passes and recipe.settings["max_drop"] == 1.0
