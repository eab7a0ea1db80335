"""The sd_notify sender against a real datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gossipfl.notify import Notifier


class FakeManager:
    """A bound AF_UNIX datagram socket, read the way systemd reads NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def notifier(self, **extra: str) -> Notifier:
        return Notifier.from_environ({"NOTIFY_SOCKET": self.env_value, **extra})

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    def pending(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeManager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    if request.param == "path":
        path = tmp_path / "notify"
        sock.bind(str(path))
        env_value = str(path)
    else:
        name = f"gossipfl-test-notify-{os.getpid()}-{id(sock)}"
        sock.bind(b"\0" + name.encode())
        env_value = "@" + name
    with sock:
        yield FakeManager(sock, env_value)


def test_ready_sends_ready_and_status_in_one_datagram(manager: FakeManager) -> None:
    assert manager.notifier().ready("joined the mesh")
    assert manager.receive() == {"READY": "1", "STATUS": "joined the mesh"}


def test_status_watchdog_and_stopping_each_send_their_assignment(
    manager: FakeManager,
) -> None:
    notifier = manager.notifier()
    assert notifier.status("round 3, 2 peers")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert manager.receive() == {"STATUS": "round 3, 2 peers"}
    assert manager.receive() == {"WATCHDOG": "1"}
    assert manager.receive() == {"STOPPING": "1"}


def test_a_newline_in_status_cannot_inject_an_assignment(manager: FakeManager) -> None:
    manager.notifier().status("peer lost\nREADY=1")
    assert manager.receive() == {"STATUS": "peer lost READY=1"}


def test_without_notify_socket_every_call_is_a_silent_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("anything")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    asyncio.run(notifier.keep_alive())


def test_an_unknown_address_kind_disables_the_notifier(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="gossipfl.notify"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "neither a path nor an abstract" in caplog.text


def test_a_missing_socket_is_warned_about_once_and_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.DEBUG, logger="gossipfl.notify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG]


@pytest.mark.parametrize(
    ("usec", "pid", "interval_s"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),
        ("", None, None),
        ("0", None, None),
        ("-5", None, None),
        ("thirty", None, None),
    ],
)
def test_watchdog_interval_comes_from_watchdog_usec_for_this_pid_only(
    usec: str, pid: str | None, interval_s: float | None
) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": usec}
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid() if pid == "self" else os.getpid() + 1)
    assert Notifier.from_environ(env).watchdog_interval_s == interval_s


def test_keep_alive_pings_every_half_interval(manager: FakeManager) -> None:
    notifier = manager.notifier(WATCHDOG_USEC="8000000")
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(notifier.keep_alive(sleep=fake_sleep))
    assert slept == [4.0, 4.0, 4.0]
    assert [manager.receive() for _ in slept] == [{"WATCHDOG": "1"}] * 3


def test_keep_alive_returns_at_once_without_a_watchdog(manager: FakeManager) -> None:
    async def no_sleep(seconds: float) -> None:
        raise AssertionError("keep_alive slept although the watchdog is off")

    asyncio.run(manager.notifier().keep_alive(sleep=no_sleep))
    assert not manager.pending()
