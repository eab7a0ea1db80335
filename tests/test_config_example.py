"""The config example the package installs as /etc/gossipfl/gossipfl.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "packaging" / "gossipfl.toml.example"
SECTIONS = {"node", "task", "gossip", "mesh", "membership", "peers"}


def _uncommented(text: str) -> str:
    # A setting or table header is commented as "#key = ..." or "#[table]", with no
    # space after the '#'; prose comments have one.
    return re.sub(r"(?m)^#(?=[A-Za-z_\[])", "", text)


def test_the_example_as_shipped_sets_nothing() -> None:
    config = tomllib.loads(EXAMPLE.read_text())
    assert all(not table for table in config.values())


def test_every_commented_setting_is_valid_toml_once_uncommented() -> None:
    config = tomllib.loads(_uncommented(EXAMPLE.read_text()))
    assert set(config) == SECTIONS
    assert config["task"]["name"] == "digits"
    assert config["gossip"]["compression"] == "topk-int8"
    assert len(config["peers"]) == 2
