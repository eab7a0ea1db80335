"""A stand-in for ``wireguard-go -f IF`` that serves the UAPI socket only.

Used by unit tests of the userspace backend: no tun device, no root. It keeps the
configuration it is sent and reports it back on ``get=1``, with byte counters that
grow on each get. ``--exit-before-socket CODE`` makes it die at start, printing a
line first, to test how the backend reports a child that never came up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path


class Device:
    def __init__(self) -> None:
        self.private_key = ""
        self.listen_port = "0"
        self.peers: dict[str, dict[str, list[str]]] = {}
        self.gets = 0

    def apply(self, lines: list[str]) -> None:
        peer: dict[str, list[str]] | None = None
        for line in lines:
            key, _, value = line.partition("=")
            if key == "private_key":
                self.private_key = value
            elif key == "listen_port":
                self.listen_port = value
            elif key == "replace_peers":
                self.peers.clear()
            elif key == "public_key":
                peer = self.peers.setdefault(value, {})
                peer["public_key"] = [value]
            elif peer is not None and key == "remove":
                del self.peers[peer["public_key"][0]]
                peer = None
            elif peer is not None and key == "replace_allowed_ips":
                peer["allowed_ip"] = []
            elif peer is not None:
                peer.setdefault(key, []).append(value)

    def dump(self) -> str:
        self.gets += 1
        out = [f"private_key={self.private_key}", f"listen_port={self.listen_port}"]
        for peer in self.peers.values():
            for key, values in peer.items():
                out += [f"{key}={v}" for v in values]
            out += [
                "last_handshake_time_sec=1700000000",
                "last_handshake_time_nsec=5",
                f"rx_bytes={100 * self.gets}",
                f"tx_bytes={200 * self.gets}",
            ]
        return "\n".join(out) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket-dir", required=True)
    parser.add_argument("--exit-before-socket", type=int)
    parser.add_argument("-f", dest="ifname", required=True)
    args = parser.parse_args()
    if args.exit_before_socket is not None:
        print("fake: cannot create tun", flush=True)
        sys.exit(args.exit_before_socket)
    device = Device()
    path = Path(args.socket_dir) / f"{args.ifname}.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await reader.readuntil(b"\n\n")
            except asyncio.IncompleteReadError:
                break
            lines = request.decode().strip("\n").split("\n")
            if lines[0] == "get=1":
                writer.write((device.dump() + "errno=0\n\n").encode())
            elif lines[0] == "set=1":
                device.apply(lines[1:])
                writer.write(b"errno=0\n\n")
            else:
                writer.write(b"errno=22\n\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    print(f"fake: serving {path} pid {os.getpid()}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    path.unlink(missing_ok=True)


if __name__ == "__main__":
    asyncio.run(main())
