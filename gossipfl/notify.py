"""Tell the service manager how the daemon is doing, by the sd_notify datagram protocol.

The naive way is to link libsystemd (or a binding of it) and call ``sd_notify()``.
That brings a C dependency for what is one datagram: the manager passes a socket
address in ``$NOTIFY_SOCKET`` and reads newline-separated ``KEY=VALUE`` assignments
sent to it over ``AF_UNIX``/``SOCK_DGRAM``. This module speaks that protocol itself,
as described in sd_notify(3) and systemd.service(5) (``Type=notify``, ``WatchdogSec=``).

The address is a filesystem path, or an abstract-namespace name written with a
leading ``@`` (sent as a leading NUL byte). Other address kinds (``vsock:`` from
systemd 254 on) are not understood; the notifier then stays silent and says so once.

The watchdog: when ``WatchdogSec=`` is set the manager exports ``$WATCHDOG_USEC``
(and ``$WATCHDOG_PID``, the process it is meant for). The daemon must send
``WATCHDOG=1`` more often than that; :meth:`Notifier.keep_alive` does it every half
interval from the event loop, so a stalled loop stops the pings and the manager
restarts the daemon.

Left out on purpose: passing file descriptors (``FDSTORE=1``), ``MAINPID=``,
``RELOADING=1`` and the ``BARRIER=1`` handshake; gossipfl uses none of them.

Threading: a :class:`Notifier` holds no socket (each message opens and closes one),
so it may be called from any thread. :meth:`Notifier.keep_alive` is a coroutine for
the daemon's event loop. Sending never blocks: a message the manager's queue cannot
take right now is dropped and logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Protocol values (sd_notify(3)).
_ABSTRACT_PREFIX = "@"
# Tuning values.
_PINGS_PER_WATCHDOG_INTERVAL = 2  # systemd.service(5) advises half the interval


@dataclass
class Notifier:
    """Sends state changes to the service manager; silent when there is none.

    ``address`` is the socket address as the kernel takes it (``None`` when the
    process was not started with ``$NOTIFY_SOCKET``). ``watchdog_interval_s`` is how
    long the manager waits for a ``WATCHDOG=1`` before it acts, or ``None`` when the
    watchdog is off or meant for another process.
    """

    address: str | bytes | None = None
    watchdog_interval_s: float | None = None
    _warned: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier that ``environ`` (default ``os.environ``) describes."""
        env = os.environ if environ is None else environ
        return cls(
            address=_parse_address(env.get("NOTIFY_SOCKET", "")),
            watchdog_interval_s=_parse_watchdog(
                env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
            ),
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_period_s(self) -> float | None:
        """How often :meth:`keep_alive` pings, or ``None`` if it need not."""
        if self.watchdog_interval_s is None:
            return None
        return self.watchdog_interval_s / _PINGS_PER_WATCHDOG_INTERVAL

    def ready(self, status: str | None = None) -> bool:
        """Start-up is finished: the mesh is up and the daemon serves peers."""
        return self._send([("READY", "1"), *_status_field(status)])

    def status(self, text: str) -> bool:
        """A one-line state for ``systemctl status``, e.g. ``"round 12, 4 peers"``."""
        return self._send(_status_field(text))

    def watchdog(self) -> bool:
        """The daemon is alive; resets the manager's watchdog timer."""
        return self._send([("WATCHDOG", "1")])

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self._send([("STOPPING", "1"), *_status_field(status)])

    async def keep_alive(
        self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep
    ) -> None:
        """Ping the watchdog every half interval until cancelled.

        Returns at once when the watchdog is off. Run it as a task on the daemon's
        event loop, so the pings stop when the loop stops making progress.
        ``sleep`` is injected so tests need no real time.
        """
        period_s = self.watchdog_period_s
        if period_s is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await sleep(period_s)

    def _send(self, fields: list[tuple[str, str]]) -> bool:
        """Send one datagram; True when the manager's socket took it."""
        if self.address is None or not fields:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields).encode()

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            self._log_failure(fields[0][0], exc)
            return False
        logger.debug("told the service manager %s", message)
        return True

    def _log_failure(self, key: str, exc: OSError) -> None:
        # The same failure repeats with every watchdog ping: warn once, then debug.
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        logger.log(
            level,
            "could not send %s to the service manager at %r: %s; "
            "the daemon goes on without telling it",
            key,
            self.address,
            exc,
        )


def _status_field(text: str | None) -> list[tuple[str, str]]:
    # A newline would end the assignment early and start a bogus one.
    if text is None:
        return []
    return [("STATUS", " ".join(text.splitlines()))]


def _parse_address(raw: str) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith(_ABSTRACT_PREFIX):
        return b"\0" + os.fsencode(raw[len(_ABSTRACT_PREFIX) :])
    if raw.startswith("/"):
        return raw
    logger.warning(
        "NOTIFY_SOCKET=%r is neither a path nor an abstract '@' name; "
        "the service manager will not hear from this daemon",
        raw,
    )
    return None


def _parse_watchdog(usec: str, pid: str) -> float | None:
    # WATCHDOG_PID names the process the watchdog is for; a child that inherited
    # the variables must not ping on its parent's behalf.
    if pid and pid != str(os.getpid()):
        return None
    try:
        interval_us = int(usec)
    except ValueError:
        return None
    if interval_us <= 0:
        return None
    return interval_us / 1_000_000
