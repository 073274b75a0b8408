"""Change backend weights in the config file's text, and nothing else.

Theory of operation: the text is parsed into YAML *events* (not loaded into Python objects), which
carry the exact character offsets of every scalar, alias and collection. From them we build a small
tree, find each backend's ``weight`` value and splice the new number over exactly those characters;
a backend without a ``weight`` key gets one inserted in its mapping's own style. Every other
character of the file (comments, quoting, key order, flow or block style, blank lines) is copied
unchanged.

Invariants: only the weights asked for are touched; a weight that other places share through an
anchor or alias is never changed silently (:class:`EditError` instead); the caller validates the
resulting text before it is written anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import yaml
from yaml.events import (
    AliasEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)

WEIGHT_KEY = "weight"


class EditError(Exception):
    """The text cannot be edited safely; the message says why."""


@dataclass
class Node:
    """One YAML node with its character span in the text (``start`` includes anchor and tag)."""

    kind: str  # scalar | alias | mapping | sequence
    start: int
    end: int
    anchor: str | None = None
    value: str = ""  # a scalar's value, an alias's anchor name
    flow: bool = False
    children: list[Node] = field(default_factory=list)  # mappings: key, value, key, value...

    def pairs(self) -> Iterator[tuple[Node, Node]]:
        return zip(self.children[::2], self.children[1::2], strict=True)

    def get(self, key: str) -> Node | None:
        """The value of ``key`` (the last one: YAML loaders keep the last of duplicate keys)."""
        found = [v for k, v in self.pairs() if k.kind == "scalar" and k.value == key]
        return found[-1] if found else None


def parse_tree(text: str) -> tuple[Node | None, set[str]]:
    """The document's root node, and the anchor names that some alias refers to."""
    stack: list[Node] = [Node("sequence", 0, 0)]  # a holder for the root
    referenced: set[str] = set()
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            _apply(event, stack, referenced)
    except yaml.YAMLError as exc:
        raise EditError(f"not valid YAML: {exc}") from None
    root = stack[0].children
    return (root[0] if root else None), referenced


def _apply(event: Event, stack: list[Node], referenced: set[str]) -> None:
    start, end = _offset(event.start_mark), _offset(event.end_mark)
    anchor = getattr(event, "anchor", None)
    if isinstance(event, ScalarEvent):
        stack[-1].children.append(Node("scalar", start, end, anchor, event.value))
    elif isinstance(event, AliasEvent):
        referenced.add(str(anchor))
        stack[-1].children.append(Node("alias", start, end, None, str(anchor)))
    elif isinstance(event, MappingStartEvent | SequenceStartEvent):
        kind = "mapping" if isinstance(event, MappingStartEvent) else "sequence"
        node = Node(kind, start, end, anchor, flow=bool(event.flow_style))
        stack[-1].children.append(node)
        stack.append(node)
    elif isinstance(event, MappingEndEvent | SequenceEndEvent):
        stack.pop().end = end


def _offset(mark: object) -> int:
    index = getattr(mark, "index", None)
    if not isinstance(index, int):
        raise EditError("the YAML parser gave no position for a node")
    return index


def backend_nodes(root: Node | None) -> list[Node]:
    """The nodes of the ``backends`` list items, in order."""
    backends = root.get("backends") if root is not None and root.kind == "mapping" else None
    if backends is None or backends.kind != "sequence":
        raise EditError("backends: not found as a list written out in the file")
    return backends.children


def set_weights(text: str, weights: Mapping[int, int], names: Mapping[int, str]) -> str:
    """``text`` with ``backends[i].weight`` set to ``weights[i]``; ``names`` for messages."""
    root, referenced = parse_tree(text)
    items = backend_nodes(root)
    edits = []
    for index, weight in weights.items():
        if index >= len(items):
            raise EditError(f"backends[{index}]: not found in the file")
        edits.append(_edit(text, items[index], weight, referenced, names[index]))
    result = text
    for position, length, new in sorted(edits, reverse=True):  # from the end: offsets stay valid
        result = result[:position] + new + result[position + length :]
    return result


Edit = tuple[int, int, str]  # replace `length` characters at `position` with the string


def _edit(text: str, backend: Node, weight: int, referenced: set[str], name: str) -> Edit:
    if backend.kind != "mapping":
        raise EditError(
            f"backend {name}: written as an alias (*{backend.value}) of another backend; "
            "write its keys out to change its weight"
        )
    value = backend.get(WEIGHT_KEY)
    if value is None:
        return _insertion(text, backend, weight, name)
    if value.kind == "alias":
        raise EditError(
            f"backend {name}: its weight is an alias (*{value.value}) of a value used elsewhere; "
            "replace the alias with a number to change it"
        )
    if value.kind != "scalar":
        raise EditError(f"backend {name}: its weight is not a number")
    if value.anchor is not None and value.anchor in referenced:
        raise EditError(
            f"backend {name}: its weight carries the anchor &{value.anchor}, which other places "
            f"use (*{value.anchor}); changing it would change them too"
        )
    return _replacement(text, value, weight)


_LAST_TOKEN = re.compile(r"(?:^|\s)(\S+)\Z")


def _replacement(text: str, value: Node, weight: int) -> Edit:
    """Replace the scalar's own characters, after any anchor (``&w``) or tag (``!!int``)."""
    written = text[value.start : value.end]
    match = _LAST_TOKEN.search(written)
    if match is None:
        raise EditError(f"the weight at offset {value.start} has no value to replace")
    return value.start + match.start(1), len(match.group(1)), str(weight)


def _insertion(text: str, backend: Node, weight: int, name: str) -> Edit:
    pairs = list(backend.pairs())
    if backend.flow:
        return pairs[-1][1].end, 0, f", {WEIGHT_KEY}: {weight}"
    indent = " " * _column(text, pairs[0][0].start)
    line = f"{indent}{WEIGHT_KEY}: {weight}"
    newline = "\r\n" if "\r\n" in text else "\n"  # the file's own line ends
    keys = [key.value for key, _ in pairs]
    after = keys.index("url") + 1 if "url" in keys else len(keys)
    for key, _ in pairs[after:]:
        start = _line_start(text, key.start)
        if not text[start : key.start].strip():  # the key begins its own line
            return start, 0, line + newline
    last_key, last_value = pairs[-1]
    if last_value.kind in ("scalar", "alias") and "\n" not in text[last_key.start : last_value.end]:
        end = _line_end(text, last_value.end)
        return end, 0, newline + line
    raise EditError(f"backend {name}: cannot tell where to add a weight key; add one by hand")


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def _line_end(text: str, index: int) -> int:
    """Where the line holding ``index`` ends, before its ``\n`` or ``\r\n``."""
    end = text.find("\n", index)
    if end < 0:
        return len(text)
    return end - 1 if end > index and text[end - 1] == "\r" else end


def _column(text: str, index: int) -> int:
    return index - _line_start(text, index)
