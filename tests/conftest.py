"""Shared fixtures: the netns lab, and skipping netns tests where they cannot run."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gossipfl import lab as labmod


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "netns tests need root (network namespaces, tun devices)"
    for tool in ("ip", "unshare", "wireguard-go"):
        if shutil.which(tool) is None:
            return f"netns tests need {tool} on PATH"
    if not os.path.exists("/dev/net/tun"):
        return "netns tests need /dev/net/tun for wireguard-go"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _netns_unavailable()
    if reason is None:
        return
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[[int], labmod.Lab]]:
    """Factory for a lab of n nodes; every lab made is taken down afterwards."""
    roots: list[Path] = []

    def make(n: int) -> labmod.Lab:
        root = tmp_path / f"lab{len(roots)}"
        roots.append(root)
        return labmod.lab_up(n, root, name="t" + secrets.token_hex(3))

    yield make
    for root in roots:
        if (root / labmod.STATE_FILE).exists():
            labmod.lab_down(root)
