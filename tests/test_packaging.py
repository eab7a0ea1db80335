"""The shipping layer, checked the way an operator would meet it.

These run Debian's own tools (dpkg-buildpackage, lintian, debootstrap,
systemd-analyze) through the scripts in packaging/, which print what they checked.
They need root and those tools; outside CI a missing tool skips them (conftest), in
CI they must run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.packaging, pytest.mark.slow]


def run(script: str, *args: str, timeout_s: float) -> str:
    done = subprocess.run([str(TOP / "packaging" / script), *args],
                          capture_output=True, text=True, timeout=timeout_s)
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0, f"{script} failed:\n{output[-4000:]}"
    return output


def test_the_unit_verifies_clean_and_rates_3_or_better() -> None:
    output = run("check-unit", timeout_s=120)
    assert "verify: clean" in output and "exposure" in output


def test_the_deb_builds_lintian_clean_installs_upgrades_and_purges_on_debian_12(
        ) -> None:
    output = run("test-install-chroot", timeout_s=1500)
    assert "FAIL" not in output.split("results", 1)[-1]
    assert "PENDING" not in output
