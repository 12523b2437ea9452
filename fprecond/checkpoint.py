"""Saving and restoring pytrees of tensors: parameters, optimizer states, ensembles.

A checkpoint is a file written by ``torch.save`` that ``torch.load(path,
weights_only=True)`` reads: a dict of plain data and tensors only, no pickled
classes, so loading it runs no code from the file. It holds

- ``format`` (``"fprecond.checkpoint"``) and ``version`` (:data:`FORMAT_VERSION`);
- ``paths``: every tensor leaf's path in the tree, in traversal order (dicts in
  insertion order), written like Python accessors, e.g.
  ``.inner_state['precondition'].estimator.curvature.blocks[0].input_factor``;
- ``shapes`` and ``dtypes`` (``"float32"``...) of those leaves;
- ``tensors``: a flat dict path -> tensor;
- ``checksums``: the CRC-32 of each tensor's bytes (from version 2), so that a file
  damaged on disk or in transfer is rejected instead of loaded with wrong values.

The tree's classes are not stored: :func:`load_state` rebuilds the values into
the structure of a template (``like``), e.g. ``transform.init(params)`` or
``torch.func.vmap(transform.init)(stacked_params)``, after checking that the file
holds exactly the template's leaves with the same shapes and dtypes. Static
metadata of state classes (layer names, layouts) comes from the template too.

Leaves must be tensors. ``None`` entries are structure, not leaves (they hold
nothing and come back from the template); Python numbers, strings and other
objects as leaves are rejected with a ``TypeError``: states in fprecond hold
0-dim tensors for counters.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import optree
import torch

from fprecond.tree import NAMESPACE, PyTree

__all__ = ["save_state", "load_state", "FORMAT_VERSION"]

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 files have no checksums
_FORMAT = "fprecond.checkpoint"
_KEYS = ("format", "version", "paths", "shapes", "dtypes", "tensors")


def _flatten(tree: PyTree, owner: str) -> tuple[list[str], list[torch.Tensor], Any]:
    """Leaf paths (accessor strings), leaves and the tree spec, dicts in insertion order."""
    with optree.dict_insertion_ordered(True, namespace=NAMESPACE):
        accessors, leaves, spec = optree.tree_flatten_with_accessor(tree, namespace=NAMESPACE)
    paths = [accessor.codify("") for accessor in accessors]
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{owner}: the leaf at {path or '<root>'} is a {type(leaf).__name__}; checkpoints hold "
                            "tensors only (store a count as a 0-dim tensor)")
    if len(set(paths)) != len(paths):  # e.g. two dict keys whose reprs coincide
        raise ValueError(f"{owner}: the tree has leaves whose paths cannot be told apart")
    return paths, leaves, spec


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of the tensor's elements in row-major order (any dtype, any device)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.numpy().tobytes()) if flat.numel() else 0


def save_state(path: str | os.PathLike[str], tree: PyTree) -> None:
    """Write every tensor of ``tree`` (any pytree of tensors) to ``path``.

    Tensors are detached copies on their own device; views keep their strides
    (``clone``), so a restored state computes exactly what the saved one would.
    The file is written next to ``path`` and renamed into place, so an interrupted
    save never leaves a truncated checkpoint under ``path``.
    """
    paths, leaves, _ = _flatten(tree, "save_state")
    payload = {
        "format": _FORMAT,
        "version": FORMAT_VERSION,
        "paths": paths,
        "shapes": [list(leaf.shape) for leaf in leaves],
        "dtypes": [_dtype_name(leaf.dtype) for leaf in leaves],
        # clone() keeps the layout of dense tensors (eigh/cholesky outputs are column-major)
        # and stores only the leaf's own elements, not the whole storage of a view.
        "tensors": {p: leaf.detach().clone() for p, leaf in zip(paths, leaves)},
        "checksums": [_checksum(leaf) for leaf in leaves],
    }
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked payload of a checkpoint file (ValueError if it is not one)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"load_state: no checkpoint file at {str(path)!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, random bytes, a pickle weights_only refuses
        raise ValueError(f"load_state: cannot read checkpoint {str(path)!r} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no message'})") from error
    problem = _payload_problem(payload)
    if problem is not None:
        raise ValueError(f"load_state: cannot read checkpoint {str(path)!r}: {problem}")
    return payload


def _payload_problem(payload: Any) -> str | None:
    if not isinstance(payload, dict) or any(key not in payload for key in _KEYS):
        return "not an fprecond checkpoint (written by fprecond.save_state)"
    if payload["format"] != _FORMAT:
        return f"format {payload['format']!r}, expected {_FORMAT!r}"
    if payload["version"] not in _READABLE_VERSIONS:
        return (f"format version {payload['version']!r}, this fprecond reads versions "
                f"{', '.join(map(str, _READABLE_VERSIONS))}")
    paths, shapes, dtypes, tensors = payload["paths"], payload["shapes"], payload["dtypes"], payload["tensors"]
    if not (isinstance(paths, list) and isinstance(shapes, list) and isinstance(dtypes, list)
            and isinstance(tensors, dict) and len(paths) == len(shapes) == len(dtypes) == len(tensors)):
        return "its index (paths, shapes, dtypes, tensors) is inconsistent"
    for path, shape, dtype in zip(paths, shapes, dtypes):
        tensor = tensors.get(path)
        if not isinstance(tensor, torch.Tensor) or list(tensor.shape) != shape or _dtype_name(tensor.dtype) != dtype:
            return f"the tensor at {path} does not match its index entry"
    if payload["version"] >= 2:
        checksums = payload.get("checksums")
        if not isinstance(checksums, list) or len(checksums) != len(paths):
            return "its checksums are missing"
        for path, checksum in zip(paths, checksums):
            if _checksum(tensors[path]) != checksum:
                return f"the data of the tensor at {path} is corrupted (its checksum does not match)"
    return None


def _mismatch(saved: dict[str, Any], paths: list[str], leaves: list[torch.Tensor]) -> str | None:
    """The first difference between the file's leaves and the template's, in words."""
    index = {path: (shape, dtype) for path, shape, dtype in zip(saved["paths"], saved["shapes"], saved["dtypes"])}
    for path, leaf in zip(paths, leaves):
        if path not in index:
            return f"leaf {path} is missing from the checkpoint"
        shape, dtype = index[path]
        if list(leaf.shape) != shape:
            return f"leaf {path} has shape {tuple(shape)} in the checkpoint, the template has {tuple(leaf.shape)}"
        if _dtype_name(leaf.dtype) != dtype:
            return f"leaf {path} has dtype {dtype} in the checkpoint, the template has {_dtype_name(leaf.dtype)}"
    expected = set(paths)
    for path in saved["paths"]:
        if path not in expected:
            return f"the checkpoint has an unexpected leaf {path} that the template lacks"
    return None


def load_state(path: str | os.PathLike[str], like: PyTree) -> PyTree:
    """Read the tree saved at ``path`` into the structure of the template ``like``.

    ``like`` gives the structure, the classes and their static metadata, and each
    leaf's device (its values are not used): e.g. ``transform.init(params)`` for a
    state, ``model.params()`` for parameters, or the vmapped versions of these for
    an ensemble. Every leaf path, shape and dtype of the file must equal the
    template's; all of them are checked before anything is built, so a mismatch
    never gives a half-loaded tree.

    Raises:
        ValueError: the file is not a readable checkpoint (``"cannot read
            checkpoint"``: truncated, corrupted, another format), or it does not
            fit ``like``; the message names the first leaf that is missing,
            unexpected, or of another shape or dtype.
        FileNotFoundError: there is no file at ``path``.
        TypeError: ``like`` has a leaf that is not a tensor.
    """
    paths, leaves, spec = _flatten(like, "load_state")
    saved = _read(path)
    problem = _mismatch(saved, paths, leaves)
    if problem is not None:
        raise ValueError(f"load_state: checkpoint {str(path)!r} does not fit the template: {problem}")
    tensors = saved["tensors"]
    restored = [tensors[p].to(leaf.device) for p, leaf in zip(paths, leaves)]
    with optree.dict_insertion_ordered(True, namespace=NAMESPACE):
        return optree.tree_unflatten(spec, restored)
