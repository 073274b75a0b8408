"""Editing weights in the config text: only the weight values change, byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tdproxy.config.loader import parse_config_text
from tdproxy.config.yaml_edit import EditError, set_weights
from tdproxy.weights import edited_text, side_effects, weights_of

REPO = Path(__file__).resolve().parents[2]

FLOW = """\
# one line per backend, flow style
backends: [{name: blue, url: "http://127.0.0.1:8081", weight: 70},
           {name: green, url: 'http://127.0.0.1:8082', weight: 30, backup: false},   # canary
           {name: spare, url: http://127.0.0.1:8083, backup: true}]
admin: {port: 9901}
"""

ANCHORS = """\
backends:
  - &common                      # shared settings
    name: blue
    url: http://127.0.0.1:8081
    host_header: &host "app.example.com"
    weight: 70
  - <<: *common
    name: green
    url: "http://127.0.0.1:8082"
    weight:   30                 # the canary
  - name: red
    url: http://127.0.0.1:8083
    host_header: *host

    tls_verify: true
"""


def edit(text: str, **new: int) -> str:
    return edited_text(text, parse_config_text(text), new)


def masked(text: str) -> str:
    """The text with every weight value replaced by ``N``: what must not change."""
    return re.sub(r"(weight:\s*(?:&\w+\s+)?)\d+", r"\1N", text)


def assert_only_weights_changed(before: str, after: str, expected: dict[str, int]) -> None:
    assert masked(after) == masked(before)
    assert len(after) - len(before) == sum(
        len(str(w)) - len(str(o))
        for name, w in expected.items()
        for o in [weights_of(parse_config_text(before))[name]]
    )
    assert weights_of(parse_config_text(after)) == {
        **weights_of(parse_config_text(before)),
        **expected,
    }


def test_the_commented_example_config_keeps_every_other_byte() -> None:
    before = (REPO / "config" / "tdproxy.yaml").read_text(encoding="utf-8")
    after = edit(before, **{"primary-env": 100, "second-env": 0})
    assert_only_weights_changed(before, after, {"primary-env": 100, "second-env": 0})
    assert (
        before.replace("weight: 50\n", "weight: 100\n", 1).replace("weight: 50\n", "weight: 0\n", 1)
        == after
    )


def test_a_flow_style_file_keeps_every_other_byte() -> None:
    after = edit(FLOW, blue=0, green=100)
    assert_only_weights_changed(FLOW, after, {"blue": 0, "green": 100})
    assert '{name: blue, url: "http://127.0.0.1:8081", weight: 0},' in after


def test_a_file_with_anchors_keeps_every_other_byte() -> None:
    after = edit(ANCHORS, blue=5, green=95)
    assert_only_weights_changed(ANCHORS, after, {"blue": 5, "green": 95})
    assert "weight:   95                 # the canary\n" in after


def test_an_unchanged_weight_is_not_touched() -> None:
    assert edit(FLOW, blue=70) == FLOW


def test_a_block_backend_without_weight_gets_one_after_its_url() -> None:
    after = edit(ANCHORS, red=10)
    assert "    url: http://127.0.0.1:8083\n    weight: 10\n    host_header: *host\n" in after
    assert after.replace("    weight: 10\n", "", 1) == ANCHORS
    assert weights_of(parse_config_text(after))["red"] == 10


def test_a_block_backend_ending_with_its_url_gets_the_weight_on_a_new_line() -> None:
    text = "backends:\n- name: a\n  url: http://a   # first\n- name: b\n  url: http://b"
    after = edit(text, b=3)
    assert after == text + "\n  weight: 3"
    after = edit(text, a=0, b=3)
    assert after == (
        "backends:\n- name: a\n  url: http://a   # first\n  weight: 0\n"
        "- name: b\n  url: http://b\n  weight: 3"
    )


def test_a_file_with_crlf_line_ends_keeps_them() -> None:
    text = "backends:\r\n- name: a\r\n  url: http://a # x\r\n- name: b\r\n  url: http://b\r\n"
    assert edit(text, a=2, b=3) == (
        "backends:\r\n- name: a\r\n  url: http://a # x\r\n  weight: 2\r\n"
        "- name: b\r\n  url: http://b\r\n  weight: 3\r\n"
    )


def test_a_flow_backend_without_weight_gets_one_at_its_end() -> None:
    after = edit(FLOW, spare=2)
    assert "{name: spare, url: http://127.0.0.1:8083, backup: true, weight: 2}]" in after
    assert after.replace(", weight: 2}", "}", 1) == FLOW


def test_an_inherited_weight_is_overridden_in_the_backend_itself() -> None:
    text = ANCHORS.replace("    weight:   30                 # the canary\n", "")
    assert weights_of(parse_config_text(text))["green"] == 70  # from the merge key
    after = edit(text, green=30)
    assert '    url: "http://127.0.0.1:8082"\n    weight: 30\n' in after
    assert weights_of(parse_config_text(after)) == {"blue": 70, "green": 30, "red": 1}


def test_changing_a_weight_that_others_inherit_is_caught() -> None:
    text = ANCHORS.replace("    weight:   30                 # the canary\n", "")
    before = parse_config_text(text)
    after = parse_config_text(edit(text, blue=10))
    problems = side_effects(before, after, {"blue": 10})
    assert len(problems) == 1
    assert problems[0].startswith("backend green: its weight would become 10 rather than 70")


def test_a_weight_that_is_an_alias_is_refused() -> None:
    text = (
        "backends:\n  - {name: a, url: http://a, weight: &w 5}\n"
        "  - {name: b, url: http://b, weight: *w}\n"
    )
    with pytest.raises(EditError, match=r"backend b: its weight is an alias \(\*w\)"):
        edit(text, b=1)
    with pytest.raises(EditError, match=r"backend a: its weight carries the anchor &w"):
        edit(text, a=1)


def test_an_anchor_nobody_uses_is_kept_and_the_value_changed() -> None:
    text = "backends:\n  - name: a\n    url: http://a\n    weight: &w !!int 5  # x\n"
    assert edit(text, a=12) == text.replace("!!int 5", "!!int 12")


def test_a_backend_that_is_an_alias_is_refused() -> None:
    text = "backends:\n  - &a {name: a, url: http://a, weight: 1}\n  - *a\n"
    with pytest.raises(EditError, match=r"backend a2: written as an alias \(\*a\)"):
        set_weights(text, {1: 3}, {1: "a2"})
