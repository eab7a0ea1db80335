"""``gossipfl wg-export``: the running mesh as a wg-quick(8) configuration.

For operators who want to look at the mesh with the usual tools: the output is what
``wg-quick`` would need to recreate the interface by hand, peers included. It is read
from the running node's status (so it shows what discovery found), and the private
key is left out unless asked for, since it is derived from the node's identity key.
"""

from __future__ import annotations

import asyncio
import time

from .config import Config
from .control import NotRunning, fetch_status
from .errors import ConfigError, GossipflError
from .identity import load_identity
from .mesh import wg_key_text, wg_private_key, wg_public_key


def export(config: Config, with_private_key: bool = False) -> str:
    if config.mesh is None:
        raise ConfigError(f"{config.path}: no [mesh] section")
    try:
        status = asyncio.run(fetch_status(config.control_socket))
    except NotRunning as exc:
        raise GossipflError(f"'gossipfl up' is not running: {exc}") from None
    mesh = status.get("mesh")
    if mesh is None:
        raise GossipflError("the running node has no mesh ('gossipfl daemon', not "
                            "'gossipfl up')")
    identity = load_identity(config.node.state_dir)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = [f"# gossipfl mesh of {status['node']['name']} "
             f"({status['node']['short_id']}), exported {when}",
             f"# interface {mesh['interface']}, backend {mesh['backend']}",
             "[Interface]"]
    if with_private_key:
        lines.append(f"PrivateKey = {wg_key_text(wg_private_key(identity))}")
    else:
        lines.append("# PrivateKey is derived from the node's identity key; "
                     "--with-private-key prints it")
    lines += [f"Address = {mesh['address']}/64",
              f"ListenPort = {mesh['listen_port']}",
              f"MTU = {config.mesh.mtu}"]
    for peer in status["peers"]:
        info = peer.get("mesh")
        if info is None:
            continue
        key = bytes.fromhex(peer["id"])
        lines += ["", f"# {peer['name'] or peer['short_id']} ({peer['short_id']}), "
                      f"found by {', '.join(info['found_by'])}",
                  "[Peer]", f"PublicKey = {wg_key_text(wg_public_key(key))}",
                  f"AllowedIPs = {info['mesh_address']}/128"]
        if info["endpoint"]:
            lines.append(f"Endpoint = {info['endpoint']}")
        lines.append(f"PersistentKeepalive = {config.mesh.keepalive_s}")
    return "\n".join(lines) + "\n"
