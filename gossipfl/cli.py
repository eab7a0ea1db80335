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
from .errors import GossipflError

DEFAULT_CONFIG = Path("/etc/gossipfl/gossipfl.toml")

EPILOG = """\
exit codes: 0 success (status: healthy), 1 degraded, 2 error (bad config, bad state),
3 not running (status), 130 interrupted.
documentation: README.md and docs/ (architecture, algorithm, configuration)."""


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
    daemon.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"config file (default {DEFAULT_CONFIG})")

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
    return parser


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


COMMANDS = {"daemon": cmd_daemon, "status": cmd_status, "demo": cmd_demo}


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
