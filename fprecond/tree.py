"""Tree math on pytrees of tensors (dicts of parameters, state classes).

All helpers are pure and out of place, so they are safe under ``torch.func``
transforms. They are thin wrappers over :mod:`optree` in fprecond's own
namespace, so state classes declared with :func:`pytree_dataclass` are
traversed like NamedTuples and dicts.

Ordering: :func:`ravel` lays leaves out in *insertion* order of dicts, which for
a parameter dict built from ``module.named_parameters()`` is the order of
``named_parameters``; each tensor is flattened row-major. This is the order of
every dense curvature matrix in fprecond.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, NamedTuple, TypeVar

import optree
import torch
import torch.utils._pytree as torch_pytree
from typing_extensions import dataclass_transform

__all__ = [
    "NAMESPACE",
    "PyTree",
    "pytree_dataclass",
    "static_field",
    "tree_map",
    "tree_leaves",
    "tree_structure",
    "tree_flatten_ordered",
    "tree_flatten_with_names",
    "tree_unflatten_ordered",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_add_scaled",
    "tree_vdot",
    "tree_sum_squares",
    "tree_global_norm",
    "tree_zeros_like",
    "tree_ones_like",
    "tree_where",
    "tree_all_finite",
    "tree_size",
    "ravel",
    "unravel",
]

NAMESPACE = "fprecond"
PyTree = Any
T = TypeVar("T")


# --------------------------------------------------------------------------- state classes


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is metadata, not a leaf (e.g. a layer name or a shape).

    Static fields travel in the tree structure, so they must be hashable and are
    shared by all members of a ``vmap``. Use them sparingly: states hold tensor
    leaves only.
    """
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["static"] = True
    return dataclasses.field(metadata=metadata, **kwargs)


# How to take each pytree_dataclass apart and rebuild it, for the flattening under torch.compile.
_DATACLASS_NODES: dict[type, tuple[tuple[str, ...], Callable[[Any], Any], Callable[[Any, Any], Any]]] = {}


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, static_field))
def pytree_dataclass(cls: type[T]) -> type[T]:
    """Turn ``cls`` into a frozen dataclass registered as a pytree node with both
    :mod:`optree` (for :mod:`fprecond.tree`) and ``torch.utils._pytree`` (for
    ``torch.func.vmap``/``grad``, which reject classes known to optree only).

    Fields declared with :func:`static_field` are carried in the tree structure;
    all other fields are children (tensors or nested pytrees).

    Example::

        @pytree_dataclass
        class MomentumState:
            velocity: dict[str, torch.Tensor]
            count: torch.Tensor          # 0-dim step counter
    """
    cls = dataclasses.dataclass(frozen=True)(cls)  # type: ignore[assignment]
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    child_names = tuple(f.name for f in fields if not f.metadata.get("static", False))
    static_names = tuple(f.name for f in fields if f.metadata.get("static", False))

    def _split(obj: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        children = tuple(getattr(obj, name) for name in child_names)
        static = tuple(getattr(obj, name) for name in static_names)
        return children, static

    def _build(children: Any, static: tuple[Any, ...]) -> Any:
        kwargs = dict(zip(child_names, children))
        kwargs.update(zip(static_names, static))
        return cls(**kwargs)

    def _optree_flatten(obj: Any) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[str, ...]]:
        children, static = _split(obj)
        return children, static, child_names

    _DATACLASS_NODES[cls] = (child_names, _split, _build)
    optree.register_pytree_node(
        cls,  # type: ignore[arg-type]
        _optree_flatten,
        lambda static, children: _build(children, static),  # type: ignore[arg-type]
        namespace=NAMESPACE,
    )
    def _torch_flatten(obj: Any) -> tuple[list[Any], tuple[Any, ...]]:
        children, static = _split(obj)
        return list(children), static

    torch_pytree.register_pytree_node(
        cls,
        _torch_flatten,
        lambda children, static: _build(children, static),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
    )
    return cls


# --------------------------------------------------------------------------- traversal


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Apply ``fn`` leaf-wise to ``tree`` and trees of the same structure in ``rest``."""
    return optree.tree_map(fn, tree, *rest, namespace=NAMESPACE)


def tree_leaves(tree: PyTree) -> list[Any]:
    """Leaves of ``tree`` in insertion order of dicts (``named_parameters`` order)."""
    if torch.compiler.is_compiling():
        return tree_flatten_ordered(tree)[0]
    with optree.dict_insertion_ordered(True, namespace=NAMESPACE):
        return optree.tree_leaves(tree, namespace=NAMESPACE)


# Insertion-ordered flattening. Eagerly it is optree's, inside ``dict_insertion_ordered``.
# Under torch.compile that context manager cannot be traced (it takes a lock), and dynamo's
# optree polyfill sorts dict keys whatever the mode, so the tree is walked in Python there,
# in the same order and with the same paths; the structure is then a ``_Walked`` record.


class _Walked(NamedTuple):
    """A node's structure recorded by :func:`_walk`: ``rebuild(children)`` (None for a leaf)."""

    rebuild: Callable[[list[Any]], Any] | None
    children: tuple["_Walked", ...]


def _rebuild_mapping(node: dict, keys: list[Any]) -> Callable[[list[Any]], Any]:
    def rebuild(values: list[Any]) -> Any:
        if isinstance(node, collections.defaultdict):
            return collections.defaultdict(node.default_factory, zip(keys, values))
        return type(node)(zip(keys, values)) if isinstance(node, collections.OrderedDict) else dict(zip(keys, values))

    return rebuild


def _rebuild_sequence(node: Any) -> Callable[[list[Any]], Any]:
    def rebuild(values: list[Any]) -> Any:
        if isinstance(node, list):
            return list(values)
        if isinstance(node, collections.deque):
            return collections.deque(values, maxlen=node.maxlen)
        if hasattr(type(node), "_fields"):  # a NamedTuple
            return type(node)(*values)
        return tuple(values) if type(node) is tuple else type(node)(values)  # torch.return_types

    return rebuild


def _walk(node: Any, path: tuple[Any, ...], paths: list[tuple[Any, ...]], leaves: list[Any]) -> _Walked:
    if node is None:  # a node without children, as in optree
        return _Walked(lambda values: None, ())
    dataclass_node = _DATACLASS_NODES.get(type(node))
    if dataclass_node is not None:
        names, split, build = dataclass_node
        children, static = split(node)
        specs = [_walk(child, path + (name,), paths, leaves) for child, name in zip(children, names)]
        return _Walked(lambda values: build(values, static), tuple(specs))
    if isinstance(node, dict):
        keys = list(node.keys())
        specs = [_walk(node[key], path + (key,), paths, leaves) for key in keys]
        return _Walked(_rebuild_mapping(node, keys), tuple(specs))
    if isinstance(node, (tuple, list, collections.deque)):
        specs = [_walk(child, path + (index,), paths, leaves) for index, child in enumerate(node)]
        return _Walked(_rebuild_sequence(node), tuple(specs))
    paths.append(path)
    leaves.append(node)
    return _Walked(None, ())


def _flatten_with_paths(tree: PyTree) -> tuple[list[tuple[Any, ...]], list[Any], Any]:
    if torch.compiler.is_compiling():
        paths: list[tuple[Any, ...]] = []
        leaves: list[Any] = []
        spec = _walk(tree, (), paths, leaves)
        return paths, leaves, spec
    with optree.dict_insertion_ordered(True, namespace=NAMESPACE):
        return optree.tree_flatten_with_path(tree, namespace=NAMESPACE)  # type: ignore[return-value]


def tree_flatten_ordered(tree: PyTree) -> tuple[list[Any], Any]:
    """``(leaves, spec)``: the leaves in insertion order of dicts (``named_parameters``
    order) and the structure, for :func:`tree_unflatten_ordered`. Traceable by
    ``torch.compile(fullgraph=True)``, unlike optree's ``dict_insertion_ordered``."""
    _, leaves, spec = _flatten_with_paths(tree)
    return leaves, spec


def tree_flatten_with_names(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """``(names, leaves, spec)`` as :func:`tree_flatten_ordered`; a leaf's name is its
    path joined with dots (the dict key itself for a flat dict of parameters)."""
    paths, leaves, spec = _flatten_with_paths(tree)
    return [".".join([str(part) for part in path]) for path in paths], leaves, spec


def _unwalk(spec: _Walked, leaves: list[Any], position: list[int]) -> Any:
    if spec.rebuild is None:
        leaf = leaves[position[0]]
        position[0] += 1
        return leaf
    return spec.rebuild([_unwalk(child, leaves, position) for child in spec.children])


def tree_unflatten_ordered(spec: Any, leaves: list[Any]) -> PyTree:
    """The tree of structure ``spec`` (from :func:`tree_flatten_ordered`) holding ``leaves``."""
    if isinstance(spec, _Walked):
        position = [0]
        try:
            tree = _unwalk(spec, list(leaves), position)
        except IndexError:
            raise ValueError(f"tree_unflatten_ordered: the structure has more leaves than the {len(leaves)} "
                             "given") from None
        if position[0] != len(leaves):
            raise ValueError(f"tree_unflatten_ordered: the structure has {position[0]} leaves, got {len(leaves)}")
        return tree
    with optree.dict_insertion_ordered(True, namespace=NAMESPACE):
        return optree.tree_unflatten(spec, leaves)


def _reduce_leaves(fn: Callable[..., torch.Tensor], *trees: PyTree) -> list[torch.Tensor]:
    # Pair leaves through tree_map (by key, not by position) so two dicts with the
    # same keys in different insertion order still line up.
    return optree.tree_leaves(tree_map(fn, *trees), namespace=NAMESPACE)


def tree_structure(tree: PyTree) -> Any:
    """The structure of ``tree`` (comparable with ``==``)."""
    return optree.tree_structure(tree, namespace=NAMESPACE)


# --------------------------------------------------------------------------- arithmetic


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a + b``."""
    return tree_map(torch.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a - b``."""
    return tree_map(torch.sub, a, b)


def tree_scale(tree: PyTree, factor: float | torch.Tensor) -> PyTree:
    """Leaf-wise ``factor * tree`` (``factor`` a number or a 0-dim tensor)."""
    return tree_map(lambda x: x * factor, tree)


def tree_add_scaled(a: PyTree, b: PyTree, factor: float | torch.Tensor) -> PyTree:
    """Leaf-wise ``a + factor * b``."""
    return tree_map(lambda x, y: x + factor * y, a, b)


def tree_vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """Inner product ``Σ_leaves <a, b>`` as a 0-dim tensor."""
    products = _reduce_leaves(lambda x, y: torch.sum(x * y), a, b)
    return torch.stack(products).sum() if products else torch.zeros(())


def tree_sum_squares(tree: PyTree) -> torch.Tensor:
    """``Σ_leaves ||x||²`` as a 0-dim tensor."""
    return tree_vdot(tree, tree)


def tree_global_norm(tree: PyTree) -> torch.Tensor:
    """The Euclidean norm of all leaves taken together (``optax.global_norm``)."""
    return torch.sqrt(tree_sum_squares(tree))


def tree_zeros_like(tree: PyTree) -> PyTree:
    """A tree of zeros with the shapes, dtypes and devices of ``tree``."""
    return tree_map(torch.zeros_like, tree)


def tree_ones_like(tree: PyTree) -> PyTree:
    """A tree of ones with the shapes, dtypes and devices of ``tree``."""
    return tree_map(torch.ones_like, tree)


def tree_where(condition: torch.Tensor, a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``torch.where(condition, a, b)`` with a 0-dim boolean ``condition``.

    The selection is data-dependent without Python branching, so it is safe under
    ``vmap`` (each ensemble member picks its own branch).
    """
    return tree_map(lambda x, y: torch.where(condition, x, y), a, b)


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    # A finite sum proves every entry finite (NaN and ±Inf propagate through a sum) and
    # costs one fast reduction instead of a boolean copy of the leaf; only when the sum is
    # not finite (an overflow of large finite entries, or a real NaN/Inf) is every entry
    # checked. The result equals ``isfinite(x).all()`` either way.
    from fprecond.lazy import concrete  # fprecond.lazy builds on this module

    quick = torch.isfinite(x.sum())
    values = concrete(quick)
    if values is not None and bool(values.all()):
        return quick
    return quick | torch.isfinite(x).all()


def tree_all_finite(tree: PyTree) -> torch.Tensor:
    """A 0-dim boolean tensor: True when no leaf holds NaN or ±Inf."""
    flags = _reduce_leaves(_all_finite, tree)
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


def tree_size(tree: PyTree) -> int:
    """Total number of scalar entries in all leaves."""
    return sum(x.numel() for x in tree_leaves(tree))


# --------------------------------------------------------------------------- flat vectors


def ravel(tree: PyTree) -> tuple[torch.Tensor, Callable[[torch.Tensor], PyTree]]:
    """Flatten all leaves into one vector and return it with its inverse.

    Leaves are concatenated in insertion order of dicts (``named_parameters``
    order), each flattened row-major; all leaves must share a dtype.

    Returns:
        ``(flat, unravel_fn)`` where ``flat`` has shape ``(P,)`` and
        ``unravel_fn(flat)`` rebuilds a tree of the original structure.
    """
    leaves, spec = tree_flatten_ordered(tree)
    shapes = [leaf.shape for leaf in leaves]
    flat = torch.cat([leaf.reshape(-1) for leaf in leaves]) if leaves else torch.zeros(0)

    def unravel_fn(vector: torch.Tensor) -> PyTree:
        return unravel(vector, spec, shapes)

    return flat, unravel_fn


def unravel(vector: torch.Tensor, spec: Any, shapes: list[torch.Size]) -> PyTree:
    """Inverse of :func:`ravel` given the tree spec and the leaves' shapes."""
    sizes = [int(torch.Size(shape).numel()) for shape in shapes]
    if vector.shape[-1] != sum(sizes):
        raise ValueError(f"unravel: vector has {vector.shape[-1]} entries, the tree needs {sum(sizes)}")
    pieces = torch.split(vector, sizes)
    leaves = [piece.reshape(shape) for piece, shape in zip(pieces, shapes)]
    return tree_unflatten_ordered(spec, leaves)
