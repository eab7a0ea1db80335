"""The config example the package installs as /etc/gossipfl/gossipfl.toml."""

from __future__ import annotations

import re
from pathlib import Path

from gossipfl.config import config_from_dict, load_config

EXAMPLE = Path(__file__).parent.parent / "packaging" / "gossipfl.toml.example"


def _uncommented(text: str) -> str:
    # A setting is commented as "#key = ...", with no space after the '#'; prose
    # comments have one.
    return re.sub(r"(?m)^#(?=[A-Za-z_\[])", "", text)


def test_the_example_as_shipped_loads_and_runs_in_a_mesh() -> None:
    config = load_config(EXAMPLE)
    assert config.mesh is not None
    assert config.control_socket == Path("/run/gossipfl/control.sock")
    assert config.node.state_dir == Path("/var/lib/gossipfl")


def test_every_commented_setting_is_a_known_key_with_its_default(tmp_path: Path
                                                                 ) -> None:
    import tomllib

    raw = tomllib.loads(_uncommented(EXAMPLE.read_text()))
    # examples rather than defaults: a seed (its key elided), a data file, a NIC
    assert raw["mesh"].pop("seeds") and raw["mesh"].pop("underlay_interfaces")
    assert raw["task"].pop("data").endswith(".npz")
    full = config_from_dict(raw, tmp_path)
    shipped = load_config(EXAMPLE)
    assert full.task == shipped.task
    assert full.gossip == shipped.gossip
    assert full.mesh == shipped.mesh
