"""Training tasks: what a node learns, on which local data, and how it is scored.

A task is three things: a model factory, local training steps on the node's own
data, and evaluation on a held-out split that every node shares. The gossip layer
never sees torch: ``FlatModel`` binds every floating parameter and floating buffer of
the model into one contiguous float32 numpy vector (the tensors become views into
it), so a merge writes straight into the live model with no copy.

Integer buffers (BatchNorm's ``num_batches_tracked``) are not in the vector: they are
local counters, never sent and never merged. They only matter for BatchNorm with
``momentum=None``, where each node then averages over its own batches.

Built-in tasks:

* ``digits``: a two-layer MLP on scikit-learn's bundled 8x8 handwritten digits
  (1,797 images). 20% is held out, the same split on every node; the rest is shared
  out non-IID: for each label, a Dirichlet(alpha) draw over the nodes says what
  fraction of that label's images each node holds (Hsu et al., 2019), deterministic
  in (seed, node count), so node ``i`` of ``n`` always gets the same shard.
* ``npz``: the same MLP on the operator's own data: an ``.npz`` file with a float
  array ``x`` of shape (samples, features) and an integer array ``y`` of labels
  ``0..classes-1``; an optional pair ``x_test``/``y_test`` is the held-out split
  (otherwise 20% of the file is held out).

A user's own task is ``package.module:attribute`` in the config, where the attribute
is a callable taking a ``TaskContext`` and returning a ``Task``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import zipfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from .compress import F32
from .errors import ConfigError

MIN_SHARD = 8  # a node's shard holds at least this many training samples
TEST_FRACTION = 0.2
MAX_LABEL = 65535  # at most 65536 classes: the output layer is hidden x classes
F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class TaskContext:
    """What a task factory is told about the node it runs on."""

    shard_index: int
    shard_count: int
    seed: int = 0
    alpha: float = 0.5
    data: Path | None = None
    batch_size: int = 32
    lr: float = 0.2
    hidden: int = 64
    options: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A learning problem as one node sees it."""

    name: str

    @abstractmethod
    def make_model(self) -> nn.Module:
        """A fresh model; every node of a mesh must build the same one."""

    @abstractmethod
    def train(self, model: nn.Module, steps: int, round_: int) -> float:
        """Run ``steps`` local optimisation steps; return the mean loss."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> float:
        """Accuracy (0..1) on the held-out split shared by all nodes."""

    def describe(self) -> str:
        """A stable text naming the task, hashed into the model manifest."""
        return self.name


def mlp(features: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def portable_init(model: nn.Module, seed: int) -> None:
    """Re-draw every Linear layer with numpy, so that torch versions agree.

    The distribution is torch's default for ``nn.Linear``: weights and biases uniform
    in +-1/sqrt(fan_in). Drawing it from numpy's PCG64 makes the initial model, and
    so the manifest, identical on every node whatever torch it runs.
    """
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                for tensor in (module.weight, module.bias):
                    if tensor is None:
                        continue
                    drawn = rng.uniform(-bound, bound, size=tuple(tensor.shape))
                    tensor.copy_(torch.from_numpy(drawn.astype(np.float32)))


class SupervisedTask(Task):
    """Classification with an MLP on in-memory arrays, trained by minibatch SGD."""

    def __init__(self, name: str, x: F32, y: npt.NDArray[np.int64], x_test: F32,
                 y_test: npt.NDArray[np.int64], ctx: TaskContext,
                 classes: int) -> None:
        if x.shape[0] == 0:
            raise ConfigError(f"task {name}: shard {ctx.shard_index} has no samples")
        self.name = name
        self.ctx = ctx
        self.classes = classes
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        self.x_test = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
        self.y_test = torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64))
        self.loss = nn.CrossEntropyLoss()
        self._optimizers: dict[int, torch.optim.Optimizer] = {}

    @property
    def samples(self) -> int:
        return int(self.x.shape[0])

    def describe(self) -> str:
        return (f"{self.name}:features={self.x.shape[1]}:classes={self.classes}:"
                f"hidden={self.ctx.hidden}:seed={self.ctx.seed}")

    def make_model(self) -> nn.Module:
        model = mlp(int(self.x.shape[1]), self.ctx.hidden, self.classes)
        portable_init(model, self.ctx.seed)
        return model

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        key = id(model)
        if key not in self._optimizers:
            self._optimizers[key] = torch.optim.SGD(model.parameters(), lr=self.ctx.lr)
        return self._optimizers[key]

    def train(self, model: nn.Module, steps: int, round_: int) -> float:
        generator = torch.Generator().manual_seed(
            hash_seed(self.ctx.seed, self.ctx.shard_index, round_))
        optimizer = self._optimizer(model)
        model.train()
        total = 0.0
        batch = min(self.ctx.batch_size, self.samples)
        for _ in range(steps):
            pick = torch.randint(0, self.samples, (batch,), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss(model(self.x[pick]), self.y[pick])
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        return total / max(steps, 1)

    def evaluate(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            predicted = model(self.x_test).argmax(dim=1)
        return float((predicted == self.y_test).float().mean())


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and versions."""
    digest = hashlib.blake2b(b",".join(str(p).encode() for p in parts), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def dirichlet_shards(labels: npt.NDArray[np.int64], count: int, alpha: float,
                     seed: int) -> list[npt.NDArray[np.int64]]:
    """Split sample positions over ``count`` nodes, Dirichlet(alpha) per label.

    Deterministic in (labels, count, alpha, seed). Draws are repeated (with the next
    seed) until every shard holds at least ``MIN_SHARD`` samples.
    """
    if count < 1:
        raise ConfigError(f"shard count {count} must be at least 1")
    if alpha <= 0:
        raise ConfigError(f"dirichlet alpha {alpha} must be positive")
    if labels.size < count * MIN_SHARD:
        raise ConfigError(f"{labels.size} samples cannot give {count} shards of at "
                          f"least {MIN_SHARD}")
    for attempt in range(1000):
        rng = np.random.default_rng(hash_seed(seed, count, attempt))
        shards: list[list[int]] = [[] for _ in range(count)]
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            rng.shuffle(members)
            share = rng.dirichlet(np.full(count, alpha))
            cuts = (np.cumsum(share)[:-1] * members.size).astype(int)
            for node, part in enumerate(np.split(members, cuts)):
                shards[node].extend(int(i) for i in part)
        if min(len(s) for s in shards) >= MIN_SHARD:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ConfigError(f"no Dirichlet({alpha}) split gives every one of {count} "
                      f"shards {MIN_SHARD} samples")


def held_out_split(n: int, seed: int) -> tuple[npt.NDArray[np.int64],
                                                npt.NDArray[np.int64]]:
    """Positions of the training pool and of the held-out test split."""
    order = np.random.default_rng(hash_seed(seed, n, 7)).permutation(n)
    cut = round(n * TEST_FRACTION)
    return np.sort(order[cut:]), np.sort(order[:cut])


def _shard_task(name: str, x: F32, y: npt.NDArray[np.int64], x_test: F32 | None,
                y_test: npt.NDArray[np.int64] | None, ctx: TaskContext) -> Task:
    if x_test is None or y_test is None:
        pool, test = held_out_split(x.shape[0], ctx.seed)
        x_test, y_test = x[test], y[test]
        x, y = x[pool], y[pool]
    if not 0 <= ctx.shard_index < ctx.shard_count:
        raise ConfigError(f"shard index {ctx.shard_index} is outside 0.."
                          f"{ctx.shard_count - 1}")
    shard = dirichlet_shards(y, ctx.shard_count, ctx.alpha, ctx.seed)[ctx.shard_index]
    classes = int(max(y.max(), y_test.max())) + 1
    return SupervisedTask(name, x[shard], y[shard], x_test, y_test, ctx, classes)


def digits_task(ctx: TaskContext) -> Task:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    return _shard_task("digits", x, y, None, None, ctx)


def load_npz(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Arrays of a user's data file, checked; refuses pickled objects."""
    try:
        # Our own file object: np.load leaks the one it opens when the zip is bad.
        with open(path, "rb") as file:
            loaded = np.load(file, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ConfigError(f"data file {path} is a single array (.npy), not "
                                  "an .npz archive of x and y")
            with loaded as data:
                arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise ConfigError(f"data file {path} does not exist") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise ConfigError(f"data file {path} is not a plain .npz "
                          f"({type(exc).__name__}: {exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise ConfigError(f"data file {path} has no array {key!r} "
                              f"(found {sorted(arrays)})")
    for xs, ys in (("x", "y"), ("x_test", "y_test")):
        if xs not in arrays:
            continue
        x, y = arrays[xs], arrays.get(ys)
        if y is None:
            raise ConfigError(f"data file {path} has {xs!r} but no {ys!r}")
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ConfigError(f"data file {path}: {xs} has shape {x.shape} and {ys} "
                              f"{y.shape}; need (n, features) and (n,)")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ConfigError(f"data file {path}: {xs} has shape {x.shape}; need at "
                              "least 1 sample and 1 feature")
        if x.shape[1] != arrays["x"].shape[1]:
            raise ConfigError(f"data file {path}: {xs} has {x.shape[1]} features, "
                              f"x has {arrays['x'].shape[1]}")
        if x.dtype.kind not in "biuf":
            raise ConfigError(f"data file {path}: {xs} has dtype {x.dtype}; need "
                              "numbers (float or int)")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ConfigError(f"data file {path}: {ys} must hold integer labels "
                              f"0..C-1 (dtype {y.dtype})")
        if int(y.max()) > MAX_LABEL:
            raise ConfigError(f"data file {path}: {ys} label {int(y.max())} exceeds "
                              f"max {MAX_LABEL}")
        wide = x.astype(np.float64)
        if not np.isfinite(wide).all():
            raise ConfigError(f"data file {path}: {xs} holds NaN or Inf")
        biggest = float(np.abs(wide).max())
        if biggest > F32_MAX:
            raise ConfigError(f"data file {path}: {xs} holds {biggest:g}, beyond "
                              f"float32's max {F32_MAX:g}")
    return arrays


def npz_task(ctx: TaskContext) -> Task:
    if ctx.data is None:
        raise ConfigError("task 'npz' needs [task] data = \"/path/to/file.npz\"")
    arrays = load_npz(ctx.data)
    x_test = arrays.get("x_test")
    y_test = arrays.get("y_test")
    return _shard_task("npz", _as_f32(arrays["x"]), _as_i64(arrays["y"]),
                       None if x_test is None else _as_f32(x_test),
                       None if y_test is None else _as_i64(y_test), ctx)


def _as_f32(array: npt.NDArray[Any]) -> F32:
    return np.asarray(array, dtype=np.float32)


def _as_i64(array: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    return np.asarray(array, dtype=np.int64)


BUILTIN_TASKS = {"digits": digits_task, "npz": npz_task}


def load_task(name: str, ctx: TaskContext) -> Task:
    """A built-in task by name, or a user's ``package.module:attribute``."""
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name](ctx)
    if ":" not in name:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise ConfigError(f"task {name!r} is neither built in ({known}) nor "
                          "'package.module:attribute'")
    module_name, _, attribute = name.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise ConfigError(f"task {name!r}: {module_name!r} is not an absolute "
                          "module name like 'package.module'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"task module {module_name!r} cannot be imported: "
                          f"{exc}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"task {name!r}: {module_name} has no callable "
                          f"{attribute!r}")
    try:
        inspect.signature(factory).bind(ctx)
    except TypeError as exc:
        raise ConfigError(f"task {name!r} cannot be called with a TaskContext: "
                          f"{exc}") from None
    except ValueError:
        pass  # no signature to check (some built-ins): the call itself will tell
    task = factory(ctx)
    if not isinstance(task, Task):
        raise ConfigError(f"task {name!r} returned {type(task).__name__}, not a "
                          "gossipfl.train.Task")
    return task


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class FlatModel:
    """A torch model whose floating tensors live in one float32 numpy vector."""

    def __init__(self, model: nn.Module, task_description: str) -> None:
        self.model = model
        tensors: list[tuple[str, torch.Tensor, bool]] = []
        for name, param in model.named_parameters():
            tensors.append((name, param, True))
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                tensors.append((name, buffer, False))
        for name, tensor, _ in tensors:
            if tensor.dtype != torch.float32:
                raise ConfigError(f"model tensor {name} is {tensor.dtype}; gossipfl "
                                  "averages float32 models only")
        total = sum(t.numel() for _, t, _ in tensors)
        self.vector: F32 = np.zeros(total, dtype=np.float32)
        self.entries: list[ManifestEntry] = []
        offset = 0
        for name, tensor, is_param in tensors:
            size = tensor.numel()
            view = self.vector[offset: offset + size]
            view[:] = tensor.detach().reshape(-1).numpy()
            bound = torch.from_numpy(view).view(tensor.shape)
            if is_param:
                tensor.data = bound
            else:
                _rebind_buffer(model, name, bound)
            self.entries.append(ManifestEntry(name, tuple(tensor.shape), offset))
            offset += size
        digest = hashlib.blake2b(digest_size=16)
        digest.update(task_description.encode())
        for entry in self.entries:
            digest.update(f"\n{entry.name}:{entry.shape}".encode())
        digest.update(self.vector.tobytes())  # the shared starting point x0
        self.manifest = digest.digest()

    @property
    def dim(self) -> int:
        return int(self.vector.size)


def _rebind_buffer(model: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._buffers[leaf] = tensor
