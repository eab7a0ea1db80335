"""Bad inputs end in a named error (exit code 2), never in a traceback.

Each case here once escaped as a Python exception (EOFError, TypeError, KeyError, a
numpy or torch error later on) or was silently accepted. The data files, keys and
links the tests make are checked to be left on disk as they were.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gossipfl import cli, demo
from gossipfl.config import config_from_dict
from gossipfl.errors import ConfigError, StateError
from gossipfl.identity import (
    IDENTITY_FILE,
    Identity,
    ensure_private_dir,
    load_or_create_identity,
)
from gossipfl.train import TaskContext, load_npz, load_task, npz_task

# --- the npz data file ------------------------------------------------------------


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


RNG = np.random.default_rng(0)
X = RNG.standard_normal((100, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 100)
GOOD = npz_bytes(x=X, y=Y)


def _with_x(x: Any) -> bytes:
    return npz_bytes(x=x, y=Y)


BAD_DATA = {
    "empty file": (b"", "EOFError"),
    "truncated zip": (GOOD[: len(GOOD) // 2], "BadZipFile"),
    "an .npy": (npy_bytes(X), "single array"),
    "string x": (_with_x(np.array([["a"] * 4] * 100)), "x has dtype <U1"),
    "x_test with other features": (
        npz_bytes(x=X, y=Y, x_test=X[:10, :3], y_test=Y[:10]),
        "x_test has 3 features, x has 4"),
    "empty test split": (
        npz_bytes(x=X, y=Y, x_test=X[:0], y_test=Y[:0]), "x_test has shape (0, 4)"),
    "huge label": (npz_bytes(x=X, y=np.r_[Y[:-1], 1 << 40]),
                   "label 1099511627776 exceeds max 65535"),
    "huge test label": (
        npz_bytes(x=X, y=Y, x_test=X[:10], y_test=np.r_[Y[:9], 70000]),
        "y_test label 70000 exceeds max 65535"),
    "x beyond float32": (_with_x(np.r_[X[:-1].astype(np.float64),
                                        [[1e300, 0, 0, 0]]]),
                         "x holds 1e+300, beyond float32's max 3.40282e+38"),
    "x with no features": (_with_x(np.zeros((100, 0), np.float32)),
                           "x has shape (100, 0)"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_a_bad_data_file_is_a_config_error_naming_file_and_array(tmp_path: Path,
                                                                 case: str) -> None:
    data, expected = BAD_DATA[case]
    path = tmp_path / "data.npz"
    path.write_bytes(data)
    ctx = TaskContext(0, 2, data=path)

    with pytest.raises(ConfigError) as caught:
        npz_task(ctx)

    assert str(path) in str(caught.value)
    assert expected in str(caught.value)
    assert path.read_bytes() == data


def test_a_good_data_file_still_makes_a_task(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(npz_bytes(x=X, y=Y, x_test=X[:10], y_test=Y[:10]))

    task = npz_task(TaskContext(1, 2, data=path))

    assert task.describe().startswith("npz:features=4:classes=3")
    assert sorted(load_npz(path)) == ["x", "x_test", "y", "y_test"]


def test_a_truncated_member_is_a_config_error(tmp_path: Path) -> None:
    # A zip whose directory is intact but whose x member is cut short.
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", npy_bytes(X)[:200])
        archive.writestr("y.npy", npy_bytes(Y))

    with pytest.raises(ConfigError, match=re.escape("data.npz is not a plain .npz")):
        load_npz(path)


# --- the task name ------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [
    (":make", "is not an absolute module name"),
    (".relative:make", "is not an absolute module name"),
    ("os:getcwd", "cannot be called with a TaskContext"),
    ("os:", "has no callable ''"),
])
def test_a_task_name_that_cannot_make_a_task_is_a_config_error(
        name: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_task(name, TaskContext(0, 1))


# --- the config file ----------------------------------------------------------------

SEED_KEY = Identity.from_seed(b"\x07" * 32).public_key.hex()


@pytest.mark.parametrize("raw,fragments", [
    ({"task": {"seed": -1}}, ["task.seed = -1 is outside 0..9223372036854775807"]),
    ({"task": {"seed": 1 << 63}}, ["task.seed = 9223372036854775808 is outside"]),
    ({"gossip": {"max_message_bytes": 10}},
     ["gossip.max_message_bytes = 10 is below the minimum 1024"]),
    ({"gossip": {"max_message_bytes": 1023}}, ["1023 is below the minimum 1024"]),
    ({"mesh": {"seeds": [f"{SEED_KEY}@192.0.2.1:51820", "nonsense"]}},
     ["mesh.seeds[1]: seed 'nonsense' is not"]),
    ({"mesh": {"seeds": [f"{SEED_KEY}@host.example:51820"]}},
     ["mesh.seeds[0]: seed '", "'host.example' is not an IP address"]),
    ({"mesh": {"seeds": ["zz@192.0.2.1:51820"]}}, ["mesh.seeds[0]: seed node key"]),
    ({"mesh": {"seeds": [f"{SEED_KEY}@192.0.2.1:0"]}},
     ["mesh.seeds[0]: seed '", "port 0 not in 1..65535"]),
])
def test_config_values_out_of_range_are_refused_at_load(
        tmp_path: Path, raw: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, tmp_path)

    assert all(f in str(caught.value) for f in fragments), str(caught.value)


def test_config_values_at_the_new_limits_are_accepted(tmp_path: Path) -> None:
    config = config_from_dict({
        "task": {"seed": (1 << 63) - 1},
        "gossip": {"max_message_bytes": 1024},
        "mesh": {"seeds": [f"{SEED_KEY}@192.0.2.1:51820", f"{SEED_KEY}@[::1]:1"]},
    }, tmp_path)
    assert config.task.seed == (1 << 63) - 1
    assert config_from_dict({"gossip": {"max_message_bytes": 0}}, tmp_path)


# --- the state directory and the identity ------------------------------------------


@pytest.mark.parametrize("path", ["/proc/gossipfl", "/etc/passwd/x"])
def test_an_unusable_state_dir_is_a_state_error_with_the_os_reason(path: str
                                                                   ) -> None:
    reason = "No such file or directory" if "proc" in path else "Not a directory"
    with pytest.raises(StateError,
                       match=re.escape(f"{path} as a private directory: {reason}")):
        ensure_private_dir(Path(path))


def test_a_dangling_identity_link_is_refused_and_never_replaced(tmp_path: Path
                                                                ) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    link = state / IDENTITY_FILE
    link.symlink_to(tmp_path / "unmounted" / "identity.key")

    with pytest.raises(StateError, match=re.escape("identity.key is a dangling link")):
        load_or_create_identity(state)

    assert link.is_symlink()
    assert os.readlink(link) == str(tmp_path / "unmounted" / "identity.key")
    assert not (tmp_path / "unmounted").exists()
    assert sorted(p.name for p in state.iterdir()) == [IDENTITY_FILE]


# --- the command line ----------------------------------------------------------------


def test_mesh_join_of_a_missing_certificate_file_exits_2(tmp_path: Path, capsys
                                                         ) -> None:
    missing = tmp_path / "missing.cert"

    code = cli.main(["mesh", "join", f"@{missing}", "--config",
                     str(tmp_path / "none.toml")])

    err = capsys.readouterr().err
    assert code == 2
    assert f"certificate file {missing} cannot be read: No such file" in err


@pytest.mark.parametrize("days", ["1e30", "0", "-1", "36500.5", "nan", "inf"])
def test_mesh_sign_refuses_a_validity_outside_100_years(tmp_path: Path, capsys,
                                                        days: str) -> None:
    assert cli.main(["mesh", "create", "--dir", str(tmp_path / "mesh")]) == 0
    capsys.readouterr()

    code = cli.main(["mesh", "sign", "11" * 32, "--name", "n", "--dir",
                     str(tmp_path / "mesh"), "--valid-days", days])

    err = capsys.readouterr().err
    assert code == 2, err
    assert "--valid-days" in err and "is outside (0, 36500]" in err


def test_mesh_sign_accepts_the_longest_validity(tmp_path: Path, capsys) -> None:
    assert cli.main(["mesh", "create", "--dir", str(tmp_path / "mesh")]) == 0
    code = cli.main(["mesh", "sign", "11" * 32, "--name", "n", "--dir",
                     str(tmp_path / "mesh"), "--valid-days", "36500"])
    assert code == 0


# --- gossipfl demo -------------------------------------------------------------------


@pytest.fixture
def no_children(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"the demo started a child: {args}")

    monkeypatch.setattr(demo.subprocess, "Popen", refuse)


@pytest.mark.parametrize("argv,expected", [
    (["--topk-fraction", "2"], "gossip.topk_fraction = 2.0 is outside"),
    (["--alpha", "0"], "task.alpha = 0.0 is outside"),
    (["--consensus-step", "1.5"], "gossip.consensus_step = 1.5 is outside"),
    (["--seed", "-1"], "task.seed = -1 is outside"),
    (["--nodes", "1"], "--nodes 1: a demo needs at least 2 nodes"),
    (["--rounds", "0"], "--rounds 0: a demo needs at least 1 round"),
])
def test_bad_demo_options_exit_2_before_any_child_starts(
        tmp_path: Path, capsys, no_children: None, argv: list[str],
        expected: str) -> None:
    workdir = tmp_path / "run"

    code = cli.main(["demo", "--dir", str(workdir), *argv])

    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and err.count("\n") == 1
    assert not workdir.exists()


def test_a_bad_compression_in_demo_options_is_refused(no_children: None) -> None:
    with pytest.raises(ConfigError, match="compression 'zip' is not one of"):
        demo.run_demo(demo.DemoOptions(compression="zip"))


def test_a_child_that_exits_points_at_its_log_file(tmp_path: Path) -> None:
    import asyncio

    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    sockets = [tmp_path / "node0" / "control.sock"]

    with pytest.raises(RuntimeError) as caught:
        asyncio.run(demo.watch(demo.DemoOptions(nodes=1), sockets, [proc]))

    assert str(caught.value) == (f"node0 exited with code 3; see its log "
                                 f"{tmp_path / 'node0.log'}")


def test_progress_lines_off_a_terminal_come_after_one_header(capsys,
                                                              monkeypatch) -> None:
    clock = iter(range(100, 1000, 10))
    monkeypatch.setattr(demo.time, "monotonic", lambda: float(next(clock)))
    screen = demo.Screen()
    assert not screen.tty
    sample = demo.Sample(1.0, 3.0, 0.5, 0.4, 2048.0, 0.1)

    for _ in range(3):
        screen.show(demo.render(demo.DemoOptions(nodes=2), [], sample))

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["round", "mean", "acc", "min", "acc", "consensus",
                                "KB", "sent/node"]
    assert len(lines) == 4 and lines[1] == lines[2] == lines[3]
    assert lines[1].split()[0] == "3.0"


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_stops_every_demo_child_and_removes_the_temp_dir(
        tmp_path: Path, signum: signal.Signals) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gossipfl", "demo", "--nodes", "2", "--rounds",
         "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(children) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            children = _children(proc.pid)
        assert len(children) == 2, "the demo did not start its two daemons"

        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:  # orphans, should the demo have left any
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert code == 130, err
    assert err == "gossipfl demo: interrupted\n"
    assert not any(_alive(pid) for pid in children)
    assert list(tmp_path.iterdir()) == []


def test_generated_configs_write_lists_as_toml_arrays() -> None:
    import tomllib

    from gossipfl.demo import toml_value

    text = f"seeds = {toml_value(['a@198.51.100.1:1', 'b'])}\nx = {toml_value(2)}\n"
    assert tomllib.loads(text) == {"seeds": ["a@198.51.100.1:1", "b"], "x": 2}
