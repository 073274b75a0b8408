"""Every tdproxy config shown in the README and docs/ is a valid config (catches key drift)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tdproxy.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def config_blocks() -> list[tuple[str, str]]:
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for index, block in enumerate(re.findall(r"```yaml\n(.*?)```", text, re.S)):
            data = yaml.safe_load(block)
            # Only whole tdproxy configs (fragments and other tools' YAML are left out).
            if isinstance(data, dict) and "backends" in data:
                blocks.append((f"{document.name}#{index}", block))
    return blocks


BLOCKS = config_blocks()


def test_the_documents_show_configs() -> None:
    assert len(BLOCKS) >= 5, [name for name, _ in BLOCKS]


@pytest.mark.parametrize(("name", "block"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_documented_config_is_valid(name: str, block: str) -> None:
    parse_config(yaml.safe_load(block), name)
