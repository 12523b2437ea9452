"""Collectives on pytrees of tensors, through an explicit :class:`Communicator`.

Every function takes the communicator as an argument; ``None`` means a single
process and returns its input unchanged (the very same object), so code written
for data-parallel training runs as is without ``torch.distributed``. A
communicator of world size 1 does the same, after the checks.

Bucketing (as DDP does): the tensor leaves of a tree are flattened in a fixed
order (optree's, dict keys sorted, so that processes agree whatever the
insertion order of their dicts), grouped by dtype and device, and packed into
flat buffers of at most ``bucket_bytes`` each (a larger leaf gets a buffer of
its own). One collective runs per buffer; all are posted before the first is
waited on, so transfers overlap. Buffers are fresh copies: inputs are never
modified, and outputs are new tensors.

Failures: a collective that raises (a peer process died and closed its
connection, or the process group's timeout ran out) raises :class:`PeerFailure`,
naming the rank that reported an error through the communicator's store (see
:func:`propagate_failures`) and its message. So a rank that raises makes the
others fail with that rank's error within the time the transport needs to see
the closed connection (well under a second with gloo on one machine), or at
worst the process group's timeout. A rank that hangs (stops calling
collectives without failing) makes the others' next collective fail once the
process group's timeout has run out; when the communicator knows that timeout
(``Communicator.timeout``, set by :func:`~fprecond.distributed.init_from_env` and
:func:`~fprecond.distributed.launch`), the :class:`PeerFailure` says so: the
collective, the time it waited and the timeout.

Collectives cannot run under ``torch.func.vmap``/``grad`` (each member of a
``vmap`` would need its own process); they raise a ``RuntimeError`` saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from typing import Any, Callable, Iterator, Sequence

import optree
import torch
import torch.distributed as dist
from torch._C import _functorch

from fprecond.tree import NAMESPACE, PyTree

__all__ = [
    "Communicator",
    "PeerFailure",
    "DEFAULT_BUCKET_BYTES",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast",
    "check_in_sync",
    "plan_buckets",
    "propagate_failures",
]

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket size (25 MiB)."""

_FAILURE_KEY = "fprecond/failed/"
_FAILURE_GRACE_S = 2.0


class PeerFailure(RuntimeError):
    """A collective failed because another process failed or stopped answering."""


@dataclasses.dataclass(frozen=True)
class Communicator:
    """A handle on a process group, passed explicitly to every communicating step.

    Attributes:
        rank: this process's rank in ``group``.
        world_size: the number of processes in ``group``.
        group: a ``torch.distributed`` process group, or None for the default (world) group.
        store: a ``torch.distributed.Store`` shared by the processes, where a failing
            rank leaves its error for the others to report (optional: without it,
            peers still fail, with the transport's message).
        bucket_bytes: the largest buffer of one collective.
        timeout: the process group's collective timeout in seconds, if known (only used to
            word errors: a collective that failed after waiting that long timed out).

    Build one with :meth:`from_group` after ``torch.distributed.init_process_group``,
    or with :func:`fprecond.distributed.init_from_env` under ``torchrun``.
    """

    rank: int
    world_size: int
    group: Any = None
    store: Any = None
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "bucket_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Communicator: {name} must be an int, got {type(value).__name__}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"Communicator: need 0 <= rank < world_size, got rank {self.rank} of {self.world_size}")
        if self.bucket_bytes < 1:
            raise ValueError(f"Communicator: bucket_bytes must be >= 1, got {self.bucket_bytes}")
        if self.timeout is not None and (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                                         or not self.timeout > 0):
            raise ValueError(f"Communicator: timeout must be a number of seconds > 0 or None, got {self.timeout!r}")

    @classmethod
    def from_group(cls, group: Any = None, *, store: Any = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                   timeout: float | None = None) -> "Communicator":
        """The communicator of an initialised process group (``None``: the world group);
        ``timeout``: the group's collective timeout in seconds, if known."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Communicator.from_group: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first (or fprecond.distributed.init_from_env "
                               "under torchrun)")
        return cls(dist.get_rank(group), dist.get_world_size(group), group, store, bucket_bytes, timeout)

    # ---- failures ------------------------------------------------------------------------------
    def report_failure(self, error: BaseException) -> None:
        """Leave ``error`` in the store for the other ranks' :class:`PeerFailure` messages."""
        if self.store is None:
            return
        message = f"{type(error).__name__}: {error}".strip()
        with contextlib.suppress(Exception):  # the store may be gone too; the peers still fail
            self.store.set(f"{_FAILURE_KEY}{self.rank}", message.splitlines()[0] if message else "?")

    def reported_failures(self, wait_s: float = 0.0) -> dict[int, str]:
        """The errors other ranks left in the store (waiting up to ``wait_s`` for a first one)."""
        if self.store is None:
            return {}
        deadline = time.monotonic() + wait_s
        while True:
            found: dict[int, str] = {}
            for rank in range(self.world_size):
                key = f"{_FAILURE_KEY}{rank}"
                with contextlib.suppress(Exception):
                    if rank != self.rank and self.store.check([key]):
                        found[rank] = self.store.get(key).decode(errors="replace")
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def timed_out(self, waited: float | None) -> bool:
        """Whether a collective that failed after ``waited`` seconds ran into the timeout."""
        # The transport starts its clock after ours, so a timeout is never shorter than
        # ``timeout``; a closed connection fails at once. 5% covers clock granularity.
        return waited is not None and self.timeout is not None and waited >= 0.95 * self.timeout

    def peer_failure(self, what: str, error: BaseException, waited: float | None = None) -> PeerFailure:
        """The :class:`PeerFailure` for a collective ``what`` that raised ``error`` after
        waiting ``waited`` seconds (if measured)."""
        timed_out = self.timed_out(waited)
        # A rank that raised left its error before its connections closed: after a closed
        # connection the report may still be on its way, after a timeout it is there already.
        reported = self.reported_failures(wait_s=0.0 if timed_out else _FAILURE_GRACE_S)
        if reported:
            causes = "; ".join(f"rank {rank} failed with {message}" for rank, message in sorted(reported.items()))
            return PeerFailure(f"{what} on rank {self.rank} of {self.world_size} stopped: {causes}")
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if timed_out:
            return PeerFailure(f"{what} on rank {self.rank} of {self.world_size} timed out after {waited:.1f} s (the "
                               f"process group's timeout is {self.timeout:g} s) and no rank reported an error: "
                               f"another rank is hung (or was killed) before reaching {what}: {first}")
        return PeerFailure(f"{what} on rank {self.rank} of {self.world_size} failed and no rank reported an error "
                           f"(a peer was killed, or the process group's timeout ran out): {first}")


@contextlib.contextmanager
def propagate_failures(communicator: Communicator | None) -> Iterator[None]:
    """Run a block of data-parallel code so that an error in it reaches the other ranks.

    An exception raised inside (other than a :class:`PeerFailure`, which is already a
    consequence) is left in the communicator's store before it propagates; the other
    ranks' next collective then fails with a :class:`PeerFailure` naming this rank and
    its error, instead of waiting for the process group's timeout. Example::

        with propagate_failures(comm):
            train(comm)
    """
    try:
        yield
    except PeerFailure:
        raise
    except BaseException as error:
        if communicator is not None:
            communicator.report_failure(error)
        raise


# ---- packing ------------------------------------------------------------------------------------
def plan_buckets(sizes: Sequence[int], kinds: Sequence[Any], bucket_bytes: int,
                 item_bytes: Sequence[int]) -> list[list[int]]:
    """Group leaf indices into buckets: leaves of one kind (dtype and device) in their
    order, a new bucket whenever the next leaf would push the bucket past
    ``bucket_bytes`` (a leaf larger than that is a bucket of its own).

    Args:
        sizes: number of entries of each leaf.
        kinds: a hashable kind per leaf; only leaves of one kind share a bucket.
        bucket_bytes: the largest bucket, in bytes.
        item_bytes: bytes per entry of each leaf.
    """
    buckets: list[list[int]] = []
    open_bucket: dict[Any, tuple[list[int], int]] = {}
    for index, (size, kind, width) in enumerate(zip(sizes, kinds, item_bytes)):
        nbytes = size * width
        current = open_bucket.get(kind)
        if current is not None and current[1] + nbytes <= bucket_bytes:
            current[0].append(index)
            open_bucket[kind] = (current[0], current[1] + nbytes)
            continue
        bucket = [index]
        buckets.append(bucket)
        open_bucket[kind] = (bucket, nbytes)
    return buckets


def _check_eager(owner: str, leaves: Sequence[torch.Tensor]) -> None:
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{owner}: every leaf must be a tensor, got {type(leaf).__name__}")
        if _functorch.is_functorch_wrapped_tensor(leaf):
            raise RuntimeError(f"{owner}: collectives cannot run under torch.func transforms (vmap, grad): each "
                               "ensemble member would need its own processes. Use data-parallel training without "
                               "vmap, or vmap without a communicator (communicator=None)")


class _Exchange:
    """Flat buffers of a tree's leaves, posted to collectives and unpacked when done."""

    def __init__(self, leaves: Sequence[torch.Tensor], bucket_bytes: int) -> None:
        self.leaves = list(leaves)
        self.buckets = plan_buckets([leaf.numel() for leaf in self.leaves],
                                    [(leaf.dtype, leaf.device) for leaf in self.leaves], bucket_bytes,
                                    [leaf.element_size() for leaf in self.leaves])

    def buffers(self, fill: bool) -> list[torch.Tensor]:
        """One flat buffer per bucket: a copy of the leaves, or uninitialised (to receive)."""
        out = []
        for bucket in self.buckets:
            first = self.leaves[bucket[0]]
            if fill:
                out.append(torch.cat([self.leaves[i].reshape(-1) for i in bucket]))
            else:
                out.append(torch.empty(sum(self.leaves[i].numel() for i in bucket), dtype=first.dtype,
                                       device=first.device))
        return out

    def unpack(self, buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self.leaves)
        for bucket, buffer in zip(self.buckets, buffers):
            pieces = torch.split(buffer, [self.leaves[i].numel() for i in bucket])
            for i, piece in zip(bucket, pieces):
                out[i] = piece.reshape(self.leaves[i].shape)
        return out  # type: ignore[return-value]


def _run(communicator: Communicator, what: str, post: Callable[[], list[Any]]) -> None:
    """Post collectives (``post`` returns their works) and wait for them; a failure
    becomes a :class:`PeerFailure`."""
    start = time.monotonic()
    try:
        for work in post():
            work.wait()
    except (RuntimeError, dist.DistBackendError) as error:
        if isinstance(error, PeerFailure):
            raise
        raise communicator.peer_failure(what, error, time.monotonic() - start) from error


def _flatten(tree: PyTree) -> tuple[list[Any], Any]:
    leaves, spec = optree.tree_flatten(tree, namespace=NAMESPACE)
    return leaves, spec


def _unflatten(spec: Any, leaves: Sequence[Any]) -> PyTree:
    return optree.tree_unflatten(spec, list(leaves))


def _all_reduce(tree: PyTree, communicator: Communicator | None, op: Any, what: str,
                finish: Callable[[torch.Tensor], torch.Tensor]) -> PyTree:
    if communicator is None:
        return tree
    leaves, spec = _flatten(tree)
    _check_eager(what, leaves)
    if communicator.world_size == 1 or not leaves:
        return tree
    exchange = _Exchange(leaves, communicator.bucket_bytes)
    buffers = exchange.buffers(fill=True)
    _run(communicator, what, lambda: [dist.all_reduce(b, op=op, group=communicator.group, async_op=True)
                                      for b in buffers])
    return _unflatten(spec, exchange.unpack([finish(b) for b in buffers]))


def all_reduce_mean(tree: PyTree, communicator: Communicator | None) -> PyTree:
    """The mean over ranks of every leaf of ``tree`` (floating-point leaves only), in
    bucketed all-reduces. Every rank gets the same values. ``None``/world size 1: ``tree``.

    The mean of per-rank means over equal-size batches is the mean over the
    combined batch, so averaging gradients and curvature statistics of a mean
    loss this way gives what one process would compute on the concatenated batch
    (up to rounding).
    """
    if communicator is not None:
        for leaf in _flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor) and not (leaf.is_floating_point() or leaf.is_complex()):
                raise TypeError(f"all_reduce_mean: leaves must be floating point, got a {leaf.dtype} leaf of shape "
                                f"{tuple(leaf.shape)} (sum counts with all_reduce_sum)")
        world = communicator.world_size
        return _all_reduce(tree, communicator, dist.ReduceOp.SUM, "all_reduce_mean", lambda b: b / world)
    return tree


def all_reduce_sum(tree: PyTree, communicator: Communicator | None) -> PyTree:
    """The sum over ranks of every leaf (any dtype gloo/NCCL can sum). ``None``/world size 1: ``tree``."""
    return _all_reduce(tree, communicator, dist.ReduceOp.SUM, "all_reduce_sum", lambda b: b)


def broadcast(tree: PyTree, src: int, communicator: Communicator | None) -> PyTree:
    """Rank ``src``'s values of ``tree`` on every rank, in bucketed broadcasts.

    On the other ranks ``tree`` is only a template: its structure, shapes, dtypes and
    devices must match ``src``'s, its values are not read. ``src`` gets its ``tree`` back.
    """
    return broadcast_many([(tree, src)], communicator)[0]


def broadcast_many(trees: Sequence[tuple[PyTree, int]], communicator: Communicator | None) -> list[PyTree]:
    """:func:`broadcast` of several ``(tree, src)`` pairs, all posted before any is waited on."""
    if communicator is None:
        return [tree for tree, _ in trees]
    for _, src in trees:
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < communicator.world_size:
            raise ValueError(f"broadcast: src must be a rank in [0, {communicator.world_size}), got {src!r}")
    flat = [_flatten(tree) for tree, _ in trees]
    for leaves, _ in flat:
        _check_eager("broadcast", leaves)
    if communicator.world_size == 1:
        return [tree for tree, _ in trees]
    plans = []
    for (leaves, spec), (_, src) in zip(flat, trees):
        exchange = _Exchange(leaves, communicator.bucket_bytes)
        plans.append((exchange, spec, src, exchange.buffers(fill=src == communicator.rank)))

    def post() -> list[Any]:
        return [dist.broadcast(buffer, group=communicator.group, group_src=src, async_op=True)
                for _, _, src, buffers in plans for buffer in buffers]

    _run(communicator, "broadcast", post)
    return [tree if src == communicator.rank else _unflatten(spec, exchange.unpack(buffers))
            for (tree, _), (exchange, spec, src, buffers) in zip(trees, plans)]


def _fingerprint(leaf: torch.Tensor) -> torch.Tensor:
    """Two float64 numbers that equal ranks compute identically from identical tensors."""
    flat = leaf.detach().reshape(-1).to(torch.float64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    values = torch.stack([flat.sum(), (flat * weights.reciprocal()).sum()]) if flat.numel() else flat.new_zeros(2)
    # NaN compares unequal to itself: map it (and infinities) to sentinels first.
    return torch.nan_to_num(values, nan=-1.2345e300, posinf=1e300, neginf=-1e300)


def check_in_sync(tree: PyTree, communicator: Communicator | None, what: str = "tree") -> None:
    """Raise ``RuntimeError`` unless every rank holds the same ``tree`` (structure and values).

    A cheap check (two all-reduces of a few numbers per leaf): call it after
    initialisation, or every few hundred steps, to catch ranks that drifted apart
    (e.g. a transform whose statistics were not averaged). ``None``: nothing to check.
    """
    if communicator is None:
        return
    leaves, _ = _flatten(tree)
    _check_eager("check_in_sync", leaves)
    if communicator.world_size == 1:
        return
    device = leaves[0].device if leaves else torch.device("cpu")
    # The structure first (its size, then a checksum of it and the leaf sizes): a mismatch
    # there would make the collectives that follow mismatch too.
    paths = optree.tree_paths(tree, namespace=NAMESPACE)
    names = [".".join(str(part) for part in path) for path in paths]
    structure = torch.tensor([float(zlib.crc32("\n".join(names).encode()))] + [float(leaf.numel()) for leaf in leaves],
                             dtype=torch.float64, device=device)
    count = torch.tensor([float(len(leaves))], dtype=torch.float64, device=device)
    if not bool(_same_everywhere(communicator, count, "check_in_sync").all()) or \
            not bool(_same_everywhere(communicator, structure, "check_in_sync").all()):
        raise RuntimeError(f"check_in_sync: the {what} differs in structure between ranks (rank {communicator.rank} "
                           f"has {len(leaves)} leaves)")
    if not leaves:
        return
    prints = torch.stack([_fingerprint(leaf) for leaf in leaves]).reshape(-1)
    same = _same_everywhere(communicator, prints, "check_in_sync").reshape(len(leaves), 2).all(dim=1)
    if not bool(same.all()):
        first = int((~same).nonzero()[0, 0])
        name = names[first]
        raise RuntimeError(f"check_in_sync: the {what} differs between ranks, first at leaf {name!r} "
                           f"({int((~same).sum())} of {len(leaves)} leaves differ)")


def _same_everywhere(communicator: Communicator, values: torch.Tensor, what: str) -> torch.Tensor:
    """Per entry, whether all ranks hold the same value (max and min all-reduces)."""
    high, low = values.clone(), values.clone()
    _run(communicator, what, lambda: [dist.all_reduce(high, op=dist.ReduceOp.MAX, group=communicator.group,
                                                      async_op=True),
                                      dist.all_reduce(low, op=dist.ReduceOp.MIN, group=communicator.group,
                                                      async_op=True)])
    return high == low
