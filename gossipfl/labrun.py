"""``gossipfl lab``: gossipfl nodes in the namespaces of ``gossipfl.lab``.

``lab`` builds the network (namespaces, bridge, private /run/wireguard); this module
puts a node in each: a mesh key for the lab, and for node i an identity, a
certificate signed by that key, and a config for shard i of the digits data with a
``[mesh]`` section. Each node then runs ``gossipfl up`` exactly as a box would, and
the host watches them through their control sockets (the state directories are on
the shared filesystem), with the same screen as ``gossipfl demo``.

Blocking, root only: for the CLI and the integration tests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import lab as labmod
from . import membership as mb
from .demo import toml_value
from .identity import Identity, load_or_create_identity, write_private_file

MESH_DIR = "mesh"
CONFIG_FILE = "gossipfl.toml"
LOG_FILE = "node.log"


def mesh_dir(lab: labmod.Lab) -> Path:
    return Path(lab.root) / MESH_DIR


def node_config(lab: labmod.Lab, index: int, shards: int,
                gossip: dict[str, Any], mesh: dict[str, Any]) -> str:
    node = lab.node(index)
    lines = ["[node]", f'name = "node{index}"', f'state_dir = "{node.state_dir}"',
             "", "[task]", 'name = "digits"', f"shard_index = {index % shards}",
             f"shard_count = {shards}", "", "[gossip]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in gossip.items()]
    lines += ["", "[mesh]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in mesh.items()]
    return "\n".join(lines) + "\n"


def prepare_node(lab: labmod.Lab, index: int, shards: int, *,
                 gossip: dict[str, Any] | None = None,
                 mesh: dict[str, Any] | None = None,
                 mesh_keys: Path | None = None,
                 identity: Identity | None = None) -> Path:
    """State dir, identity, certificate and config of node ``index``; the config.

    ``mesh_keys`` signs the certificate (another mesh's key makes a stranger);
    ``identity`` forces a key (a copy of another node's makes a duplicate).
    """
    state = Path(lab.node(index).state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    if identity is not None:
        write_private_file(state / "identity.key", identity.seed)
    identity, _ = load_or_create_identity(state)
    keys = mesh_keys or mesh_dir(lab)
    cert = mb.sign_node(keys, identity.public_key.hex(), f"node{index}")
    mesh_pub = (keys / "mesh.pub").read_text().strip()
    mb.join_mesh(state, identity, cert.to_text(), mesh_pub)
    path = state / CONFIG_FILE
    defaults = {"max_rounds": 150, "checkpoint_interval_s": 5.0}
    path.write_text(node_config(lab, index, shards, {**defaults, **(gossip or {})},
                                mesh or {}))
    return path


def make_mesh_key(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (directory / "mesh.key").exists():
        mb.create_mesh(directory)


def start_node(lab: labmod.Lab, index: int) -> subprocess.Popen[bytes]:
    """``gossipfl up`` in node ``index``, its output in the node's log file."""
    state = Path(lab.node(index).state_dir)
    with open(state / LOG_FILE, "ab") as log:
        return labmod.lab_spawn(
            lab, index,
            [sys.executable, "-m", "gossipfl", "up", "--config",
             str(state / CONFIG_FILE)], stdout=log, stderr=subprocess.STDOUT)


def control_socket(lab: labmod.Lab, index: int) -> Path:
    return Path(lab.node(index).state_dir) / "control.sock"


def lab_up_nodes(count: int, root: Path, name: str = "lab",
                 gossip: dict[str, Any] | None = None) -> tuple[
                     labmod.Lab, list[subprocess.Popen[bytes]]]:
    """A lab of ``count`` member nodes, each running ``gossipfl up``."""
    lab = labmod.lab_up(count, root, name)
    try:
        make_mesh_key(mesh_dir(lab))
        for i in range(count):
            prepare_node(lab, i, count, gossip=gossip)
        procs = [start_node(lab, i) for i in range(count)]
    except BaseException:
        lab_down_all(root)
        raise
    return lab, procs


def lab_down_all(root: Path) -> None:
    """``lab_down`` plus what this module added under the lab root."""
    created = labmod.load_lab(root).created_root
    labmod.lab_down(root)
    shutil.rmtree(root / MESH_DIR, ignore_errors=True)
    for extra in root.glob("mesh-*"):
        shutil.rmtree(extra, ignore_errors=True)
    if created and root.exists() and not any(root.iterdir()):
        root.rmdir()


# --- the CLI ------------------------------------------------------------------------


def cli_up(nodes: int, rounds: int, root: Path, watch: bool) -> int:
    import asyncio

    from .demo import DemoOptions, summary_table
    from .demo import watch as watch_nodes

    lab, procs = lab_up_nodes(nodes, root, gossip={"max_rounds": rounds})
    print(f"lab {lab.name}: {nodes} nodes under {root}, each running 'gossipfl up'")
    if not watch:
        return 0
    opts = DemoOptions(nodes=nodes, rounds=rounds, title="gossipfl lab")
    sockets = [control_socket(lab, i) for i in range(nodes)]
    try:
        report = asyncio.run(watch_nodes(opts, sockets, procs))
    except KeyboardInterrupt:
        print("\nstopped watching; the lab keeps running ('gossipfl lab down')")
        return 130
    report["target"] = opts.target
    print(summary_table(report))
    print(f"\nthe lab keeps running: 'gossipfl lab status --root {root}', "
          f"'gossipfl lab down --root {root}'")
    return 0


def cli_status(root: Path) -> int:
    import asyncio

    from .control import NotRunning, fetch_status

    status = labmod.lab_status(root)
    print("\n".join(status.lines()))
    lab = labmod.load_lab(root)
    healthy = all(n.exists and n.link_up for n in status.nodes) and all(
        p.alive for p in status.processes)
    for i in range(len(lab.nodes)):
        try:
            s = asyncio.run(fetch_status(control_socket(lab, i), timeout_s=3))
        except NotRunning as exc:
            print(f"  node {i}  gossipfl not answering: {exc}")
            healthy = False
            continue
        healthy = healthy and bool(s["healthy"])
        mesh = s.get("mesh", {})
        live = sum(p["state"] == "live" for p in s["peers"])
        acc = s["accuracy"] or 0.0
        print(f"  node {i}  {s['node']['short_id']}  {mesh.get('address', '-'):<28} "
              f"round {s['round']:<5} acc {acc:.4f}  {live} live peer(s)  "
              f"{'healthy' if s['healthy'] else 'degraded'}")
    return 0 if healthy else 1


def cli_down(root: Path) -> int:
    lab_down_all(root)
    print(f"lab under {root} removed")
    return 0
