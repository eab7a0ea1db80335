"""One mDNS discovery node for the netns integration test.

Run inside a lab node whose state directory holds identity.key, mesh.pub and
node.cert. Prints every sink call as a JSON line, and the discovery status when it
reads ``status`` on stdin; ``quit`` (or EOF) stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import zeroconf

from gossipfl import membership as mb
from gossipfl.discovery import DiscoveredPeer, DiscoveryConfig, MdnsDiscovery
from gossipfl.identity import load_identity


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


class PrintingSink:
    def peer_seen(self, peer: DiscoveredPeer) -> None:
        emit(
            event="peer_seen",
            pk=peer.public_key.hex(),
            endpoint=peer.endpoint,
            endpoints=peer.endpoints,
            how=peer.how,
            gossip_port=peer.gossip_port,
        )

    def peer_lost(self, public_key: bytes) -> None:
        emit(event="peer_lost", pk=public_key.hex())

    def stranger_seen(self, public_key: bytes, why: str, address: str = "") -> None:
        emit(event="stranger_seen", pk=public_key.hex(), why=why)

    def duplicate_identity(self, address: str) -> None:
        emit(event="duplicate_identity", address=address)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)

    identity = load_identity(args.state)
    membership = mb.load_membership(args.state, identity)
    config = DiscoveryConfig(grace_s=args.grace, address_poll_s=0.5, tick_s=0.2)
    discovery = MdnsDiscovery(identity, membership, PrintingSink(), 51820, 8080, config)
    await discovery.start()
    emit(event="started", instance=discovery.instance, zeroconf=zeroconf.__version__)
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "status":
                emit(event="status", **asdict(discovery.status()))
            else:
                break
    finally:
        await discovery.stop()
    emit(event="stopped")


if __name__ == "__main__":
    asyncio.run(main())
