"""Lab pieces that need no root: naming, addressing, the command wrapper, state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gossipfl import lab as labmod
from gossipfl.errors import ConfigError, StateError


def test_node_addresses_are_in_test_net_2_from_dot_10() -> None:
    assert labmod.node_address(0) == "198.51.100.10/24"
    assert labmod.node_address(5) == "198.51.100.15/24"
    assert labmod.netns_name("demo", 3) == "gfl-demo-3"


def test_node_command_gets_a_private_run_wireguard() -> None:
    lab = labmod.Lab("demo", "/tmp/x", "gfl-demo-hub")
    lab.nodes.append(labmod.LabNode(0, "gfl-demo-0", "198.51.100.10/24", "/s", "p0"))
    argv = labmod.node_command(lab, 0, ["wireguard-go", "-f", "gfl0"])
    assert argv[:4] == ["ip", "netns", "exec", "gfl-demo-0"]
    assert "--mount" in argv and "private" in argv
    assert "mount -t tmpfs" in argv[argv.index("-c") + 1]
    assert argv[-3:] == ["wireguard-go", "-f", "gfl0"]
    with pytest.raises(ConfigError, match=r"node 1 not in 0\.\.0"):
        labmod.node_command(lab, 1, ["true"])


@pytest.mark.skipif(os.geteuid() != 0, reason="lab_up checks its arguments as root")
@pytest.mark.parametrize(
    ("n", "name", "why"), [(0, "ok", "0 nodes"), (2, "Bad_Name", "lab name")]
)
def test_lab_up_refuses_bad_arguments(
    tmp_path: Path, n: int, name: str, why: str
) -> None:
    with pytest.raises(ConfigError, match=why):
        labmod.lab_up(n, tmp_path / "lab", name)
    assert not (tmp_path / "lab").exists()


def test_load_lab_without_or_with_a_corrupt_state_file(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no lab"):
        labmod.load_lab(tmp_path)
    (tmp_path / labmod.STATE_FILE).write_text("{not json")
    with pytest.raises(StateError, match="corrupt"):
        labmod.load_lab(tmp_path)
    (tmp_path / labmod.STATE_FILE).write_text('{"name": "x"}')
    with pytest.raises(StateError, match="does not describe a lab"):
        labmod.load_lab(tmp_path)
