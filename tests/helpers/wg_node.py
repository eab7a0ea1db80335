"""One mesh node for the netns integration test: tunnel up, echo, checks, report.

Run inside a lab node. It brings up the userspace backend with the key and address
derived from the identity in ``--state``, adds every ``--peer`` (hex node key @
underlay ip:port), serves a TCP echo on its mesh address, then for each peer:
exchanges a line over the mesh address, checks the same port refuses on the
underlay address, and reads handshake and byte counters twice. It prints JSON lines
(``ready``, ``result``) and waits for ``quit`` on stdin before taking the tunnel down,
so peers can keep talking to its echo server until everyone is done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gossipfl import mesh
from gossipfl.errors import MeshError
from gossipfl.identity import load_identity


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    writer.write(line)
    await writer.drain()
    writer.close()


async def exchange(host: str, port: int, text: str, deadline: float) -> str:
    loop = asyncio.get_running_loop()
    while True:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), 2.0
            )
            writer.write(text.encode() + b"\n")
            await writer.drain()
            reply = await asyncio.wait_for(reader.readline(), 2.0)
            writer.close()
            return reply.decode().strip()
        except (OSError, TimeoutError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)  # the peer's echo server may not be up yet


async def underlay_refuses(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--mesh-pub", required=True)
    parser.add_argument("--ifname", default="gfl0")
    parser.add_argument("--listen-port", type=int, default=51820)
    parser.add_argument("--echo-port", type=int, default=7000)
    parser.add_argument("--peer", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    identity = load_identity(args.state)
    mesh_pub = bytes.fromhex(args.mesh_pub)
    interface = mesh.mesh_interface(mesh_pub, identity.public_key)
    backend = mesh.UserspaceBackend()
    await backend.up(
        args.ifname, mesh.wg_private_key(identity), args.listen_port, interface
    )
    try:
        server = await asyncio.start_server(echo, str(interface.ip), args.echo_port)
        peers = []
        for spec in args.peer:
            key_hex, _, endpoint = spec.partition("@")
            host, _, port = endpoint.rpartition(":")
            node_pub = bytes.fromhex(key_hex)
            address = mesh.mesh_address(mesh_pub, node_pub)
            wg_pub = mesh.wg_public_key(node_pub)
            await backend.set_peer(wg_pub, (host, int(port)), [f"{address}/128"], 25)
            peers.append((node_pub, wg_pub, str(address), host))
        emit(event="ready", address=str(interface.ip), kind=backend.kind)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        results = []
        for node_pub, wg_pub, address, underlay in peers:
            text = f"hello from {identity.short_id}"
            reply = await exchange(address, args.echo_port, text, deadline)
            before = {p.public_key: p for p in await backend.peers()}[wg_pub]
            await exchange(address, args.echo_port, "again", deadline)
            after = {p.public_key: p for p in await backend.peers()}[wg_pub]
            results.append(
                {
                    "peer": node_pub.hex(),
                    "echo_ok": reply == text,
                    "handshake": before.last_handshake_s is not None,
                    "endpoint": list(before.endpoint or ()),
                    "rx_grew": after.rx_bytes > before.rx_bytes > 0,
                    "tx_grew": after.tx_bytes > before.tx_bytes > 0,
                    "underlay_refused": await underlay_refuses(
                        underlay, args.echo_port
                    ),
                }
            )
        emit(event="result", peers=results)

        await loop.run_in_executor(None, sys.stdin.readline)  # "quit" or EOF
        server.close()
        await server.wait_closed()
    finally:
        await backend.down()
    emit(event="down")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except MeshError as exc:
        emit(event="error", error=str(exc))
        sys.exit(1)
