"""The node's configuration file (TOML), read once at start and validated whole.

Every key, its default and its limits are listed in docs/configuration.md; this
module is the one place they are defined. Unknown sections and keys are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_PORT = 7400
MIN_MESSAGE_BYTES = 1024  # a smaller cap is a typo: header and signature are 188


@dataclass(frozen=True)
class NodeSection:
    name: str = "gossipfl"
    state_dir: Path = Path("/var/lib/gossipfl")
    runtime_dir: Path | None = None  # control socket; defaults to state_dir
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    log_level: str = "info"


@dataclass(frozen=True)
class TaskSection:
    name: str = "digits"
    data: Path | None = None
    shard_index: int = 0
    shard_count: int = 1
    seed: int = 0
    alpha: float = 0.5
    lr: float = 0.2
    batch_size: int = 32
    hidden: int = 64
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GossipSection:
    compression: str = "topk-int8"
    topk_fraction: float = 0.05
    block_size: int = 64
    consensus_step: float = 0.5
    local_steps: int = 5
    fanout: int = 1
    round_interval_s: float = 0.0
    max_rounds: int = 0
    settle_rounds: int = 10
    exchange_timeout_s: float = 10.0
    max_message_bytes: int = 0
    max_edges: int = 16
    checkpoint_interval_s: float = 30.0
    eval_interval_rounds: int = 1
    stale_after_s: float = 60.0


@dataclass(frozen=True)
class MeshSection:
    """``gossipfl up``: the WireGuard mesh and discovery (absent: no mesh)."""

    interface: str = "gfl0"
    listen_port: int = 51820  # WireGuard, UDP, on the underlay
    gossip_port: int = DEFAULT_PORT  # HTTP, on the mesh address only
    mtu: int = 1420
    backend: str = "auto"
    seeds: tuple[str, ...] = ()
    underlay_interfaces: tuple[str, ...] = ()
    mdns: bool = True
    lost_after_s: float = 30.0
    keepalive_s: int = 25
    record_interval_s: float = 30.0


@dataclass(frozen=True)
class PeerEntry:
    public_key: bytes
    address: str
    name: str = ""


@dataclass(frozen=True)
class Config:
    node: NodeSection
    task: TaskSection
    gossip: GossipSection
    peers: tuple[PeerEntry, ...]
    path: Path | None = None
    mesh: MeshSection | None = None

    @property
    def control_socket(self) -> Path:
        return (self.node.runtime_dir or self.node.state_dir) / "control.sock"


LIMITS: dict[str, tuple[float, float]] = {
    "task.shard_count": (1, 1 << 20),
    "task.seed": (0, (1 << 63) - 1),
    "task.alpha": (1e-6, 1e6),
    "task.lr": (1e-9, 100.0),
    "task.batch_size": (1, 1 << 20),
    "task.hidden": (1, 1 << 16),
    "gossip.topk_fraction": (1e-9, 1.0),
    "gossip.block_size": (1, 65535),
    "gossip.consensus_step": (1e-6, 1.0),
    "gossip.local_steps": (0, 1 << 20),
    "gossip.fanout": (1, 64),
    "gossip.round_interval_s": (0.0, 86400.0),
    "gossip.max_rounds": (0, 1 << 62),
    "gossip.settle_rounds": (0, 1 << 20),
    "gossip.exchange_timeout_s": (0.1, 3600.0),
    "gossip.max_message_bytes": (0, 1 << 32),
    "gossip.max_edges": (1, 1 << 16),
    "gossip.checkpoint_interval_s": (0.1, 86400.0),
    "gossip.eval_interval_rounds": (1, 1 << 20),
    "gossip.stale_after_s": (1.0, 86400.0),
    "mesh.listen_port": (1, 65535),
    "mesh.gossip_port": (1, 65535),
    "mesh.mtu": (1280, 65535),
    "mesh.lost_after_s": (1.0, 86400.0),
    "mesh.keepalive_s": (0, 65535),
    "mesh.record_interval_s": (1.0, 86400.0),
}


def _coerce(section: str, key: str, value: Any, default: Any, annotation: str,
            base: Path) -> Any:
    where = f"{section}.{key}"
    if "Path" in annotation:
        if value in ("", None):
            return None if "None" in annotation else default
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a path string, got {value!r}")
        path = Path(value)
        return path if path.is_absolute() else (base / path)
    if "tuple" in annotation:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    if "dict" in annotation:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return value
    expected: type = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
    if where in LIMITS:
        low, high = LIMITS[where]
        if isinstance(value, int | float) and not low <= value <= high:
            raise ConfigError(f"{where} = {value!r} is outside "
                              f"{_limit(low)}..{_limit(high)}")
    return value


def _limit(value: float) -> str:
    """A limit as the operator would write it: integers exactly."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _section(cls: type[Any], raw: dict[str, Any], name: str, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[{name}] has unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")
    defaults = cls()
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(name, key, value, getattr(defaults, key),
                              str(known[key].type), base)
    return cls(**values)


def parse_public_key(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {text!r} is not a hex public key") from None
    if len(key) != 32:
        raise ConfigError(f"{where}: public key is {len(key)} bytes, expected 32")
    return key


def _peers(raw: Any, base: Path) -> tuple[PeerEntry, ...]:
    if not isinstance(raw, list):
        raise ConfigError("[[peers]] must be an array of tables")
    out = []
    for n, entry in enumerate(raw):
        where = f"peers[{n}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(entry) - {"public_key", "address", "name"})
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}")
        for key in ("public_key", "address"):
            if not isinstance(entry.get(key), str):
                raise ConfigError(f"{where}.{key} is missing or not a string")
        address = entry["address"]
        if not address.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.address {address!r} must be an http:// URL")
        out.append(PeerEntry(parse_public_key(entry["public_key"], where),
                             address.rstrip("/"), str(entry.get("name", ""))))
    return tuple(out)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) as a (host, port) pair."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"node.listen {listen!r} is not host:port")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"node.listen port {port} is outside 0..65535")
    return host.strip("[]"), port


def load_config(path: Path) -> Config:
    """Read and validate ``path``; relative paths in it are relative to its folder."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_dict(raw, path.parent.resolve(), path)


def config_from_dict(raw: dict[str, Any], base: Path, path: Path | None = None
                     ) -> Config:
    unknown = sorted(set(raw) - {"node", "task", "gossip", "mesh", "peers"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: node, "
                          "task, gossip, mesh, peers")
    node = _section(NodeSection, raw.get("node", {}), "node", base)
    task = _section(TaskSection, raw.get("task", {}), "task", base)
    gossip = _section(GossipSection, raw.get("gossip", {}), "gossip", base)
    parse_listen(node.listen)
    if 0 < gossip.max_message_bytes < MIN_MESSAGE_BYTES:
        raise ConfigError(f"gossip.max_message_bytes = {gossip.max_message_bytes} is "
                          f"below the minimum {MIN_MESSAGE_BYTES} (0: derived from "
                          "the model)")
    if not 0 <= task.shard_index < task.shard_count:
        raise ConfigError(f"task.shard_index {task.shard_index} is outside 0.."
                          f"{task.shard_count - 1} (task.shard_count)")
    if node.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"node.log_level {node.log_level!r} is not one of debug, "
                          "info, warning, error")
    mesh = None
    if "mesh" in raw:
        mesh = _section(MeshSection, raw["mesh"], "mesh", base)
        if mesh.backend not in ("auto", "kernel", "userspace"):
            raise ConfigError(f"mesh.backend {mesh.backend!r} is not one of auto, "
                              "kernel, userspace")
        _check_seeds(mesh)
    return Config(node, task, gossip, _peers(raw.get("peers", []), base), path, mesh)


def _check_seeds(mesh: MeshSection) -> None:
    """Parse every static seed now, so a typo stops the node at load time."""
    from .discovery import parse_seed  # discovery imports the mesh layer

    for n, seed in enumerate(mesh.seeds):
        try:
            parse_seed(seed, mesh.gossip_port)
        except ValueError as exc:
            raise ConfigError(f"mesh.seeds[{n}]: {exc}") from None
