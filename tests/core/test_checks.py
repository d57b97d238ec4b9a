"""core/checks: the field and name rules every file reader applies."""

import math

import pytest

from artscale.core.checks import BadFile, class_names, field, mapping, printable, safe_component
from artscale.core.errors import UserError


def test_field_type_range_and_finite():
    rec = {"lr": 0.001, "steps": 10, "flag": True, "bad": float("nan"), "big": 1e308, "s": "62"}
    assert field(rec, "lr", float, "f.json", low=0, low_open=True) == 0.001
    assert field(rec, "steps", int, "f.json", low=1) == 10
    assert field(rec, "steps", float, "f.json") == 10.0  # an int where a float is asked for
    assert field(rec, "absent", int, "f.json", default=None) is None
    with pytest.raises(BadFile, match=r"^f.json: count must be int, not str '62'$"):
        field({"count": "62"}, "count", int, "f.json")
    with pytest.raises(BadFile, match="flag must be int, not bool"):
        field(rec, "flag", int, "f.json")
    with pytest.raises(BadFile, match="bad must be a finite number"):
        field(rec, "bad", float, "f.json")
    with pytest.raises(BadFile, match=r"big must be <= 1000000"):
        field(rec, "big", float, "f.json", high=1e6)
    with pytest.raises(BadFile, match="lr must be > 0"):
        field({"lr": 0.0}, "lr", float, "f.json", low=0, low_open=True)
    with pytest.raises(BadFile, match=r"shards\[2\].name is missing"):
        field({}, "name", str, "m.json", where="shards[2].")
    assert issubclass(BadFile, UserError) and math.isfinite(field(rec, "big", float, "f"))


def test_mapping_refuses_lists_and_non_string_keys():
    assert mapping({"a": 1}, "x") == {"a": 1}
    for bad in ([1], "s", {1: 2}):
        with pytest.raises(BadFile, match="is not a mapping"):
            mapping(bad, "x")


@pytest.mark.parametrize(
    "name", ["../../X", "/abs/X", "a/b", "a\\b", "..", ".", "", " pad", ".hidden", "red\x1b[31m", "a\nb", "x" * 201]
)
def test_unsafe_component_refused(name):
    with pytest.raises(BadFile, match=r"^manifest.json: class name "):
        safe_component(name, "manifest.json")


@pytest.mark.parametrize("name", ["painting", "ukiyo-e", "Gemälde", "名画", "a b", "x" * 200])
def test_safe_component_kept(name):
    assert safe_component(name, "manifest.json") == name


def test_printable_escapes_control_characters():
    assert printable("red\x1b[31mX\n") == "red\\x1b[31mX\\n"
    assert printable("plain") == "plain"


def test_class_names_a_list_of_distinct_safe_names():
    assert class_names(["a", "b c"], "m.json") == ["a", "b c"]
    for bad, message in (
        ("a", r"^m.json: classes must be a list of class names, not str$"),
        (["a", 1], r"^m.json: classes\[1\] must be a string, not int$"),
        (["a", "a"], r"^m.json: classes\[1\] 'a' is listed twice$"),
        (["ok", "../x"], r"^m.json: classes\[1\] '../x' must be one folder name"),
    ):
        with pytest.raises(BadFile, match=message):
            class_names(bad, "m.json")
