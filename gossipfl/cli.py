"""The ``gossipfl`` command. Each subcommand's ``--help`` is its reference."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from . import __version__
from .config import load_config
from .control import (
    EXIT_NOT_RUNNING,
    NotRunning,
    exit_code,
    fetch_status,
    render_status,
)
from .errors import ConfigError, GossipflError

DEFAULT_CONFIG = Path("/etc/gossipfl/gossipfl.toml")
MAX_VALID_DAYS = 36500  # a certificate lasts at most a hundred years

EPILOG = """\
exit codes: 0 success (status: healthy), 1 degraded, 2 error (bad config, bad state),
3 not running (status), 130 interrupted.
documentation: README.md and docs/ (architecture, algorithm, configuration)."""


def add_config(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"{what} (default {DEFAULT_CONFIG})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gossipfl", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serverless federated learning: every node trains on its own "
                    "data and gossips compressed model deltas with its peers.")
    parser.add_argument("--version", action="version",
                        version=f"gossipfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon = sub.add_parser(
        "daemon", help="run one node in the foreground",
        description="Run one node: train on the local data, gossip with the peers "
                    "in the config, serve status on the control socket. Stops "
                    "cleanly (with a checkpoint) on SIGINT or SIGTERM.")
    add_config(daemon, "config file")

    status = sub.add_parser(
        "status", help="show a running node's status",
        description="Ask a running node, through its control socket, for its round, "
                    "accuracy, peers and refused messages. Exit code 0 healthy, "
                    "1 degraded, 3 not running.")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, default=None,
                       help=f"the node's config file (default {DEFAULT_CONFIG})")
    where.add_argument("--socket", type=Path, default=None,
                       help="the node's control socket, instead of --config")
    status.add_argument("--json", action="store_true",
                        help="print the status document (has a 'schema' version)")

    demo = sub.add_parser(
        "demo", help="run N nodes on loopback and watch them learn",
        description="Start N real daemon processes on 127.0.0.1, each with its own "
                    "non-IID shard of the bundled digits data, and show their "
                    "progress until every node has run --rounds rounds.")
    demo.add_argument("--nodes", type=int, default=8, help="node count (default 8)")
    demo.add_argument("--rounds", type=int, default=150,
                      help="rounds each node runs (default 150)")
    demo.add_argument("--compression", default="topk-int8",
                      choices=["topk-int8", "topk-int4", "none"],
                      help="delta codec (default topk-int8)")
    demo.add_argument("--topk-fraction", type=float, default=0.05,
                      help="share of entries a message keeps (default 0.05)")
    demo.add_argument("--consensus-step", type=float, default=None,
                      help="consensus step size (default 0.5, or 1.0 with "
                           "--compression none)")
    demo.add_argument("--alpha", type=float, default=0.5,
                      help="Dirichlet alpha of the label split (default 0.5)")
    demo.add_argument("--seed", type=int, default=0, help="data and model seed")
    demo.add_argument("--target", type=float, default=0.92,
                      help="accuracy whose first crossing is reported (default 0.92)")
    demo.add_argument("--report", type=Path, default=None,
                      help="write the summary as JSON to this file")
    demo.add_argument("--dir", type=Path, default=None,
                      help="keep configs, state and logs here (default: a temporary "
                           "directory, removed afterwards)")
    init = sub.add_parser(
        "init", help="make this box's identity, state directory and config",
        description="Make the node's Ed25519 key pair in the state directory (0700, "
                    "key 0600) if there is none, and write a config file (0600) if "
                    "there is none. Prints the node id to have signed with 'gossipfl "
                    "mesh sign'. Never overwrites a key or a config.")
    add_config(init, "config file to write when missing")
    init.add_argument("--state-dir", type=Path, default=None,
                      help="state directory (default: the config's, else "
                           "/var/lib/gossipfl)")
    init.add_argument("--name", default=None, help="node name (default: host name)")

    mesh_cmd = sub.add_parser(
        "mesh", help="membership: make a mesh key, sign and join nodes",
        description="A mesh key signs one certificate per node; only nodes holding "
                    "a certificate from it are added as WireGuard peers or accepted "
                    "as gossip senders. Keep the mesh key on an operator's box.")
    mesh_sub = mesh_cmd.add_subparsers(dest="mesh_command", required=True,
                                       metavar="ACTION")
    create = mesh_sub.add_parser("create", help="make a new mesh key pair",
                                 description="Write mesh.key (0600, secret) and "
                                             "mesh.pub into --dir and print the "
                                             "public key. Refuses to overwrite.")
    create.add_argument("--dir", type=Path, default=Path("mesh"),
                        help="where the mesh key goes (default ./mesh)")
    sign = mesh_sub.add_parser("sign", help="sign a node's public key",
                               description="Print a certificate for NODE_KEY (the "
                                           "node id 'gossipfl init' printed) to "
                                           "hand to that node's 'gossipfl mesh join'.")
    sign.add_argument("node_key", metavar="NODE_KEY")
    sign.add_argument("--name", required=True, help="the node's name (<= 32 bytes)")
    sign.add_argument("--dir", type=Path, default=Path("mesh"),
                      help="where the mesh key is (default ./mesh)")
    sign.add_argument("--valid-days", type=float, default=None,
                      help=f"expiry in days, at most {MAX_VALID_DAYS} (default: "
                           "no expiry)")
    join = mesh_sub.add_parser("join", help="install this node's certificate",
                               description="Check CERT against this node's key and "
                                           "the mesh public key, then store both in "
                                           "the state directory.")
    join.add_argument("cert", metavar="CERT", help="certificate text, or @FILE")
    join.add_argument("--mesh-key", default=None,
                      help="the mesh public key to trust (default: the one stored, "
                           "else the one the certificate names)")
    add_config(join, "the node's config")

    up = sub.add_parser(
        "up", help="bring up the WireGuard mesh and run the node (foreground)",
        description="Create the WireGuard interface (kernel module, else "
                    "wireguard-go), advertise and browse mDNS on the underlay, add "
                    "verified members as peers, and run the node with gossip served "
                    "on the mesh address only. Runs until SIGINT/SIGTERM; then "
                    "removes the interface. Tells systemd READY=1 once up.")
    add_config(up, "config file with a [mesh] section")
    down = sub.add_parser(
        "down", help="stop 'gossipfl up' and remove what it made",
        description="Stop a running 'gossipfl up' (SIGTERM, then SIGKILL after "
                    "20 s) and remove its interface, wireguard-go process and UAPI "
                    "socket, also after a crash.")
    add_config(down, "the config 'gossipfl up' ran with")

    lab = sub.add_parser(
        "lab", help="N nodes in network namespaces, each running 'gossipfl up'",
        description="Root only. A lab is N network namespaces on one bridge "
                    "(198.51.100.0/24), each with a private /run/wireguard, a "
                    "member certificate and a digits shard, each running "
                    "'gossipfl up'. 'lab down' removes everything.")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    lab_up = lab_sub.add_parser(
        "up", help="make the lab and start the nodes",
        description="Make N namespaces, a mesh key, and for each node an "
                    "identity, a certificate and a config; start 'gossipfl up' in "
                    "each and show their progress until every node has run "
                    "--rounds rounds. The lab keeps running afterwards.")
    lab_up.add_argument("--nodes", type=int, default=4, help="node count (default 4)")
    lab_up.add_argument("--rounds", type=int, default=150,
                        help="rounds each node trains (default 150)")
    lab_up.add_argument("--root", type=Path, default=LAB_ROOT,
                        help=f"the lab's directory (default {LAB_ROOT})")
    lab_up.add_argument("--no-watch", action="store_true",
                        help="return once the nodes are started")
    helps = {"status": "namespaces, processes and each node's round, accuracy and "
                       "peers; exit 1 if any part is down or degraded",
             "down": "stop every node and remove every namespace, interface, "
                     "process and file the lab made"}
    for action, text in helps.items():
        p = lab_sub.add_parser(action, help=text, description=text)
        p.add_argument("--root", type=Path, default=LAB_ROOT,
                       help=f"the lab's directory (default {LAB_ROOT})")

    wg_export = sub.add_parser(
        "wg-export", help="print the running mesh as a wg-quick config",
        description="Print the node's current WireGuard interface and peers in "
                    "wg-quick(8) format, for inspection with wg(8). The private key "
                    "is left out unless --with-private-key.")
    add_config(wg_export, "the running node's config")
    wg_export.add_argument("--with-private-key", action="store_true")
    return parser


LAB_ROOT = Path("/tmp/gossipfl-lab")


def cmd_init(args: argparse.Namespace) -> int:
    import socket

    from .identity import load_or_create_identity
    from .mesh import wg_key_text, wg_public_key

    config_path: Path = args.config
    if config_path.exists():
        config = load_config(config_path)
        state_dir = args.state_dir or config.node.state_dir
        wrote = False
    else:
        state_dir = args.state_dir or Path("/var/lib/gossipfl")
        name = args.name or socket.gethostname()
        config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        from .identity import write_private_file

        write_private_file(config_path, INIT_CONFIG.format(
            name=name, state_dir=state_dir).encode())
        wrote = True
    identity, made = load_or_create_identity(state_dir)
    print(f"node id     {identity.node_id}")
    print(f"wireguard   {wg_key_text(wg_public_key(identity.public_key))}")
    print(f"state dir   {state_dir} ({'new key' if made else 'key kept'})")
    print(f"config      {config_path} ({'written' if wrote else 'kept'})")
    print("next: on the operator's box run 'gossipfl mesh sign "
          f"{identity.node_id} --name NAME', then here 'gossipfl mesh join CERT'")
    return 0


INIT_CONFIG = """\
# gossipfl node configuration; every key: docs/configuration.md
[node]
name = "{name}"
state_dir = "{state_dir}"

[task]
name = "digits"

[gossip]
compression = "topk-int8"

[mesh]
interface = "gfl0"
listen_port = 51820
gossip_port = 7400
"""


def cmd_mesh(args: argparse.Namespace) -> int:
    from . import membership as mb
    from .identity import load_identity

    if args.mesh_command == "create":
        public = mb.create_mesh(args.dir)
        print(f"mesh key    {args.dir / 'mesh.key'} (secret: keep it on this box)")
        print(f"public key  {mb.encode_key(public)}")
        return 0
    if args.mesh_command == "sign":
        valid = None
        if args.valid_days is not None:
            if not 0 < args.valid_days <= MAX_VALID_DAYS:
                raise ConfigError(f"--valid-days {args.valid_days:g} is outside "
                                  f"(0, {MAX_VALID_DAYS}]")
            valid = int(args.valid_days * 86400)
        print(mb.sign_node(args.dir, args.node_key, args.name, valid).to_text())
        return 0
    cert = args.cert
    if cert.startswith("@"):
        try:
            cert = Path(cert[1:]).read_text()
        except OSError as exc:
            raise ConfigError(f"certificate file {cert[1:]} cannot be read: "
                              f"{exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"certificate file {cert[1:]} is not text") from None
    config = load_config(args.config)
    identity = load_identity(config.node.state_dir)
    joined = mb.join_mesh(config.node.state_dir, identity, cert.strip(),
                          args.mesh_key)
    print(f"joined mesh {mb.encode_key(joined.mesh_public_key)} as "
          f"{joined.cert.name!r}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .up import main_up

    return main_up(load_config(args.config))


def cmd_down(args: argparse.Namespace) -> int:
    from .up import main_down

    return main_down(load_config(args.config))


def cmd_lab(args: argparse.Namespace) -> int:
    from . import labrun

    if args.lab_command == "up":
        return labrun.cli_up(args.nodes, args.rounds, args.root, not args.no_watch)
    if args.lab_command == "status":
        return labrun.cli_status(args.root)
    return labrun.cli_down(args.root)


def cmd_wg_export(args: argparse.Namespace) -> int:
    from .wgexport import export

    print(export(load_config(args.config), args.with_private_key), end="")
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from .node import run_daemon

    return run_daemon(load_config(args.config))


def cmd_status(args: argparse.Namespace) -> int:
    socket = args.socket or load_config(args.config or DEFAULT_CONFIG).control_socket
    try:
        status = asyncio.run(fetch_status(socket))
    except NotRunning as exc:
        print(f"gossipfl status: not running: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return exit_code(status)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo, summary_table

    step = args.consensus_step
    if step is None:
        step = 1.0 if args.compression == "none" else 0.5
    opts = DemoOptions(nodes=args.nodes, rounds=args.rounds,
                       compression=args.compression,
                       topk_fraction=args.topk_fraction, consensus_step=step,
                       alpha=args.alpha, seed=args.seed, target=args.target,
                       report=args.report, workdir=args.dir)
    report = run_demo(opts)
    print(summary_table(report))
    return 0


COMMANDS = {"daemon": cmd_daemon, "status": cmd_status, "demo": cmd_demo,
            "init": cmd_init, "mesh": cmd_mesh, "up": cmd_up, "down": cmd_down,
            "lab": cmd_lab, "wg-export": cmd_wg_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except GossipflError as exc:
        print(f"gossipfl {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gossipfl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
