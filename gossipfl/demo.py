"""``gossipfl demo``: N real daemon processes on loopback, one progress screen.

Each node is a separate ``gossipfl daemon`` process with its own identity, state
directory, port and Dirichlet shard of the digits data; they know each other from a
static peer list. The demo only watches (through each node's control socket) and
never touches a model. It stops when every node has run ``--rounds`` rounds, prints a
summary and, with ``--report``, writes it as JSON. Ctrl-C, SIGTERM and SIGHUP stop
every child.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .compress import CompressionSpec
from .config import config_from_dict
from .control import NotRunning, fetch_model, fetch_status
from .errors import ConfigError
from .identity import Identity, ensure_private_dir, write_private_file

POLL_S = 0.25
START_TIMEOUT_S = 120.0


@dataclass
class DemoOptions:
    nodes: int = 8
    rounds: int = 150
    compression: str = "topk-int8"
    topk_fraction: float = 0.05
    consensus_step: float = 0.5
    alpha: float = 0.5
    seed: int = 0
    target: float = 0.92
    report: Path | None = None
    workdir: Path | None = None
    keep: bool = False
    timeout_s: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)
    title: str = "gossipfl demo"


@dataclass
class Sample:
    t: float
    mean_round: float
    acc_mean: float
    acc_min: float
    bytes_mean: float
    consensus: float


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def toml_value(value: Any) -> str:
    """A TOML literal for a bool, number, string or list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def node_tables(opts: DemoOptions, i: int, state_dir: Path, port: int
                ) -> dict[str, dict[str, Any]]:
    """Node ``i``'s [node], [task] and [gossip] tables; its peers are added apart."""
    return {
        "node": {"name": f"node{i}", "state_dir": str(state_dir),
                 "listen": f"127.0.0.1:{port}"},
        "task": {"name": "digits", "shard_index": i, "shard_count": opts.nodes,
                 "seed": opts.seed, "alpha": opts.alpha},
        "gossip": {"compression": opts.compression,
                   "topk_fraction": opts.topk_fraction,
                   "consensus_step": opts.consensus_step, "max_rounds": opts.rounds,
                   "checkpoint_interval_s": 5.0, **opts.extra},
    }


def check_options(opts: DemoOptions) -> None:
    """Refuse options no node would start with, before any child is started."""
    if opts.nodes < 2:
        raise ConfigError(f"--nodes {opts.nodes}: a demo needs at least 2 nodes")
    if opts.rounds < 1:
        raise ConfigError(f"--rounds {opts.rounds}: a demo needs at least 1 round")
    config = config_from_dict(node_tables(opts, 0, Path("node0"), 0), Path.cwd())
    gossip = config.gossip
    CompressionSpec.from_name(gossip.compression, gossip.topk_fraction,
                              gossip.block_size)


def write_configs(opts: DemoOptions, root: Path) -> list[Path]:
    """One state directory and config per node, each listing all the others."""
    root = root.resolve()
    ports = free_ports(opts.nodes)
    identities = []
    for i in range(opts.nodes):
        state = root / f"node{i}"
        ensure_private_dir(state)
        identity = Identity.generate()
        write_private_file(state / "identity.key", identity.seed)
        identities.append(identity)
    paths = []
    for i in range(opts.nodes):
        lines = []
        for section, table in node_tables(opts, i, root / f"node{i}",
                                          ports[i]).items():
            lines += [f"[{section}]", *(f"{k} = {toml_value(v)}"
                                        for k, v in table.items()), ""]
        for j in range(opts.nodes):
            if j != i:
                lines += ["[[peers]]", f'name = "node{j}"',
                          f'public_key = "{identities[j].public_key.hex()}"',
                          f'address = "http://127.0.0.1:{ports[j]}"', ""]
        path = root / f"node{i}.toml"
        path.write_text("\n".join(lines))
        paths.append(path)
    return paths


class Screen:
    """Redraws the progress block in place on a terminal, or prints now and then."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.height = 0
        self.last_print = 0.0
        self.header_printed = False

    def show(self, text: str) -> None:
        if self.tty:
            if self.height:
                sys.stdout.write(f"\x1b[{self.height}F\x1b[J")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            self.height = text.count("\n") + 1
        elif time.monotonic() - self.last_print >= 5.0:
            lines = text.splitlines()
            if not self.header_printed:
                print(lines[1])  # the column header, once
                self.header_printed = True
            print(lines[2], flush=True)
            self.last_print = time.monotonic()


def consensus_distance(models: list[np.ndarray]) -> float:
    """Mean squared distance of the models from their average."""
    stack = np.stack([m.astype(np.float64) for m in models])
    return float(((stack - stack.mean(axis=0)) ** 2).sum(axis=1).mean())


def render(opts: DemoOptions, statuses: list[dict[str, Any]], sample: Sample) -> str:
    head = (f"{opts.title}: {opts.nodes} nodes, digits, Dirichlet alpha "
            f"{opts.alpha}, compression {opts.compression}      {sample.t:6.1f} s")
    lines = [head,
             f"{'round':>7}{'mean acc':>10}{'min acc':>9}{'consensus':>11}"
             f"{'KB sent/node':>14}",
             f"{sample.mean_round:7.1f}{sample.acc_mean:10.4f}{sample.acc_min:9.4f}"
             f"{sample.consensus:11.4f}{sample.bytes_mean / 1024:14.1f}", "",
             f"{'node':10}{'name':8}{'round':>6}{'acc':>8}{'live peers':>11}"
             f"{'KB out':>9}{'KB in':>9}  state"]
    for s in statuses:
        live = sum(p["state"] == "live" for p in s["peers"])
        acc = s["accuracy"] or 0.0
        lines.append(f"{s['node']['short_id']:10}{s['node']['name']:8}{s['round']:6}"
                     f"{acc:8.4f}{live:11}{s['bytes_sent'] / 1024:9.1f}"
                     f"{s['bytes_received'] / 1024:9.1f}  {s['state']}")
    return "\n".join(lines)


async def watch(opts: DemoOptions, sockets: list[Path],
                procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    screen = Screen()
    started = time.monotonic()
    history: list[Sample] = []
    first_reach: dict[str, Any] | None = None
    while True:
        for i, proc in enumerate(procs):
            if proc.poll() is not None:
                log = sockets[i].parent.with_name(f"node{i}.log")
                raise RuntimeError(f"node{i} exited with code {proc.returncode}; see "
                                   f"its log {log}")
        try:
            statuses = await asyncio.gather(*(fetch_status(s) for s in sockets))
            models = await asyncio.gather(*(fetch_model(s) for s in sockets))
        except NotRunning:
            if time.monotonic() - started > START_TIMEOUT_S:
                raise
            await asyncio.sleep(POLL_S)
            continue
        accs = [s["accuracy"] or 0.0 for s in statuses]
        sample = Sample(time.monotonic() - started,
                        float(np.mean([s["round"] for s in statuses])),
                        float(np.mean(accs)), float(np.min(accs)),
                        float(np.mean([s["bytes_sent"] for s in statuses])),
                        consensus_distance(list(models)))
        history.append(sample)
        if first_reach is None and sample.acc_mean >= opts.target:
            first_reach = {"target": opts.target, "seconds": round(sample.t, 3),
                           "mean_round": sample.mean_round,
                           "bytes_per_node": sample.bytes_mean}
        screen.show(render(opts, statuses, sample))
        if all(s["state"] == "finished" for s in statuses):
            return summarize(opts, statuses, history, first_reach)
        if sample.t > opts.timeout_s:
            raise RuntimeError(f"demo did not finish within {opts.timeout_s:g} s")
        await asyncio.sleep(POLL_S)


def summarize(opts: DemoOptions, statuses: list[dict[str, Any]],
              history: list[Sample], first_reach: dict[str, Any] | None
              ) -> dict[str, Any]:
    accs = [float(s["accuracy"]) for s in statuses]
    last = history[-1]
    return {
        "nodes": opts.nodes,
        "rounds": opts.rounds,
        "compression": opts.compression,
        "topk_fraction": opts.topk_fraction,
        "consensus_step": opts.consensus_step,
        "alpha": opts.alpha,
        "seed": opts.seed,
        "merge_path": statuses[0]["merge_path"],
        "parameters": statuses[0]["parameters"],
        "final_accuracy": {"mean": float(np.mean(accs)), "min": min(accs),
                           "max": max(accs)},
        "bytes_sent_per_node": {s["node"]["name"]: s["bytes_sent"] for s in statuses},
        "dense_equivalent_bytes_per_node": {
            s["node"]["name"]: s["dense_equivalent_sent"] for s in statuses},
        "consensus_distance": last.consensus,
        "wall_seconds": round(last.t, 3),
        "first_reach": first_reach,
        "refused": {s["node"]["name"]: s["refused"] for s in statuses},
        "history": [vars(h) for h in history],
    }


def summary_table(report: dict[str, Any]) -> str:
    acc = report["final_accuracy"]
    sent = list(report["bytes_sent_per_node"].values())
    dense = list(report["dense_equivalent_bytes_per_node"].values())
    reach = report["first_reach"]
    ratio = np.mean(dense) / max(float(np.mean(sent)), 1.0)
    lines = [
        "",
        f"nodes {report['nodes']}, rounds {report['rounds']}, compression "
        f"{report['compression']}, merge path {report['merge_path']}, "
        f"{report['parameters']} parameters",
        f"final held-out accuracy   mean {acc['mean']:.4f}   min {acc['min']:.4f}   "
        f"max {acc['max']:.4f}",
        f"consensus distance        {report['consensus_distance']:.6f}",
        f"sent per node             {np.mean(sent) / 1024:.1f} KB (dense would be "
        f"{np.mean(dense) / 1024:.1f} KB, {ratio:.1f}x)",
        f"wall time                 {report['wall_seconds']:.1f} s",
    ]
    if reach:
        lines.append(f"first reached {reach['target']:.2f}      after "
                     f"{reach['seconds']:.1f} s, round {reach['mean_round']:.0f}, "
                     f"{reach['bytes_per_node'] / 1024:.1f} KB sent per node")
    else:
        lines.append(f"mean accuracy never reached {report.get('target', 0.92)}")
    return "\n".join(lines)


def stop_all(procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            proc.kill()
            proc.wait()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the demo to the end; returns the report.

    SIGTERM and SIGHUP stop it like Ctrl-C (KeyboardInterrupt): every child is
    stopped, and the temporary work directory removed (one given with ``--dir``
    is kept).
    """
    check_options(opts)
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="gossipfl-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():  # else not allowed
        previous = {s: signal.signal(s, _interrupt) for s in STOP_SIGNALS}
    procs: list[subprocess.Popen[bytes]] = []
    ok = interrupted = False
    try:
        configs = write_configs(opts, root)
        for i, cfg in enumerate(configs):
            log = open(root / f"node{i}.log", "wb")  # noqa: SIM115 (child owns it)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gossipfl", "daemon", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()
        sockets = [root / f"node{i}" / "control.sock" for i in range(opts.nodes)]
        report = asyncio.run(watch(opts, sockets, procs))
        ok = True
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        # A second SIGTERM must not cut the stopping short.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        stop_all(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if (ok or interrupted) and not opts.keep and opts.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            print(f"\nlogs and state kept in {root}", file=sys.stderr)
    report["target"] = opts.target
    if opts.report is not None:
        opts.report.write_text(json.dumps(report, indent=2) + "\n")
    return report
