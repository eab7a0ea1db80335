"""Shared fixtures: the netns lab, and skipping netns tests where they cannot run."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from wire import c_required

from gossipfl import lab as labmod
from gossipfl.merge import MergeFn, c_merge, merge_numpy


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "netns tests need root (network namespaces, tun devices)"
    for tool in ("ip", "unshare", "wireguard-go"):
        if shutil.which(tool) is None:
            return f"netns tests need {tool} on PATH"
    if not os.path.exists("/dev/net/tun"):
        return "netns tests need /dev/net/tun for wireguard-go"
    return None


def _packaging_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "packaging tests need root (debootstrap, chroot)"
    for tool in ("dpkg-buildpackage", "lintian", "debootstrap", "systemd-analyze",
                 "unshare"):
        if shutil.which(tool) is None:
            return f"packaging tests need {tool} on PATH"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("CI") == "true":
        return  # in CI these are part of what must pass: run them, let them fail
    for marker_name, probe in (("netns", _netns_unavailable),
                               ("packaging", _packaging_unavailable)):
        reason = probe()
        if reason is None:
            continue
        marker = pytest.mark.skip(reason=reason)
        for item in items:
            if marker_name in item.keywords:
                item.add_marker(marker)


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[Any]:
    """A failed test whose fixtures can ``describe_failure()`` (the daemons of
    ``tests/test_processes.py``) gets that description as a report section, e.g.
    the tail of each daemon's log."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        for candidate in getattr(value, "made_meshes", [value]):
            describe = getattr(candidate, "describe_failure", None)
            if callable(describe):
                report.sections.append((f"daemons of {name}", describe()))


@pytest.fixture(params=["numpy", "c"])
def merge_path(request: pytest.FixtureRequest) -> tuple[str, MergeFn]:
    """("numpy", reference) and ("c", kernel). The C case is skipped only where
    the kernel was not built and not required; see test_c_kernel_is_built."""
    if request.param == "numpy":
        return "numpy", merge_numpy
    merge = c_merge()
    if merge is None:
        if c_required():
            pytest.fail("the C merge kernel gossipfl._merge did not import")
        pytest.skip("C merge kernel not built (python setup.py build_ext --inplace)")
    return "c", merge
