"""orbax checkpoints of qjax trees: static metadata beside the arrays, restore with or without a target.

orbax saves a QuantizedArray's children (packed codes, absmax, nested absmax, offset) as
ordinary arrays, in their packed form, and restores them bit for bit onto a target. What it
cannot know are the static fields (format, blocksize, shape, dtype, transposed): qjax stores
them as JSON in the step's `custom_metadata` under "qjax", with a CRC32 of every array, so
`restore(path)` rebuilds QuantizedArrays without a target and detects corrupted data.
"""

from __future__ import annotations

import json
import os
import zlib

import jax
import numpy as np

from qjax._src.adapters import key_path, lookup
from qjax._src.bnb import _dtype_name, _parse_dtype
from qjax._src.qarray import QuantizedArray, check_leaves, is_quantized
from qjax._src.errors import describe

METADATA_KEY = "qjax"
FORMAT_VERSION = 1
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_TREE_METADATA_FILE = "_METADATA"
_TMP_MARK = ".orbax-checkpoint-tmp"
_CHILDREN = ("packed", "absmax", "nested_absmax", "offset")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted or does not fit the target."""


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


# ----------------------------------------------------------------------------- metadata


def _json_key(k):
    return k if isinstance(k, (int, str)) else str(k)


def _crc(x) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(x)).view(np.uint8).reshape(-1))


def _fully_addressable(x) -> bool:
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def tree_metadata(tree, *, checksums: bool = False) -> dict:
    """JSON-able static metadata of a qjax tree, to store beside it in orbax's custom metadata.

    Returns {"qjax": {"format_version", "quantized": [{"path", "format", "blocksize", "shape",
    "dtype", "transposed", "double_quant"}, ...], "checksums": {"a/b/packed": crc32, ...}}}.
    Pass it as `custom_metadata=` to `StandardCheckpointer.save` or `CheckpointManager.save`.
    checksums: also CRC32 every array (copies it to the host once); `restore` verifies them.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    quantized, sums = [], {}
    for p, x in leaves:
        path = [_json_key(k) for k in key_path(p)]
        if is_quantized(x):
            quantized.append({"path": path, "format": x.format, "blocksize": x.blocksize,
                              "shape": list(x.shape), "dtype": _dtype_name(x.dtype),
                              "transposed": bool(x.transposed), "double_quant": x.double_quant})
            children = {c: getattr(x, c) for c in _CHILDREN if getattr(x, c) is not None}
        else:
            children = {None: x}
        if checksums:
            for c, leaf in children.items():
                if hasattr(leaf, "dtype") and _fully_addressable(leaf):
                    sums["/".join(map(str, path + ([c] if c else [])))] = _crc(leaf)
    meta = {"format_version": FORMAT_VERSION, "quantized": quantized}
    if checksums:
        meta["checksums"] = sums
    return {METADATA_KEY: meta}


def _rebuild(raw, entry: dict, where: str) -> QuantizedArray:
    try:
        node = lookup(raw, entry["path"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(f"{where}: metadata names {'/'.join(map(str, entry['path']))!r}, "
                              "which the stored arrays do not hold") from None
    if not isinstance(node, dict) or "packed" not in node or "absmax" not in node:
        raise CheckpointError(f"{where}: {'/'.join(map(str, entry['path']))!r} is not a stored QuantizedArray")
    q = QuantizedArray(packed=node["packed"], absmax=node["absmax"], nested_absmax=node.get("nested_absmax"),
                       offset=node.get("offset"), format=entry["format"], blocksize=entry["blocksize"],
                       shape=tuple(entry["shape"]), dtype=_parse_dtype(entry["dtype"]),
                       transposed=bool(entry["transposed"]))
    try:
        check_leaves(q, "/".join(map(str, entry["path"])))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return q


def _set(tree, path, value):
    node = lookup(tree, path[:-1]) if len(path) > 1 else tree
    k = path[-1]
    if isinstance(node, list):
        node[int(k)] = value
    else:
        node[k if k in node else str(k)] = value


# ----------------------------------------------------------------------------- locating


def _interrupted(path: str) -> list[str]:
    parent, name = os.path.split(os.path.normpath(path))
    try:
        return sorted(f for f in os.listdir(parent or ".") if f.startswith(name + _TMP_MARK))
    except FileNotFoundError:
        return []


def _locate(path, item: str | None) -> tuple[str, str | None]:
    """(item directory holding _METADATA, step directory holding _CHECKPOINT_METADATA or None)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        tmp = _interrupted(path)
        if tmp:
            raise CheckpointError(f"no complete checkpoint at {path!r}: only an interrupted save "
                                  f"({', '.join(tmp)}) exists; restore an earlier checkpoint")
        raise CheckpointError(f"no checkpoint at {path!r}: the directory does not exist")
    if item is not None:
        item_dir = os.path.join(path, item)
        if not os.path.isdir(item_dir):
            raise CheckpointError(f"checkpoint {path!r} has no item {item!r}; items: {_items(path)}")
    elif os.path.exists(os.path.join(path, _TREE_METADATA_FILE)):
        item_dir = path
    else:
        items = _items(path)
        if not items and os.path.exists(os.path.join(path, _STEP_METADATA_FILE)):
            raise CheckpointError(f"checkpoint {path!r} is missing its orbax tree metadata file "
                                  f"{_TREE_METADATA_FILE!r} (deleted or an incomplete copy?)")
        if len(items) != 1:
            raise CheckpointError(f"{path!r} is not an orbax pytree checkpoint (no {_TREE_METADATA_FILE} file)"
                                  + (f"; pass item= one of {items}" if items else ""))
        item_dir = os.path.join(path, items[0])
    for d in (item_dir, os.path.dirname(os.path.normpath(item_dir))):
        if os.path.exists(os.path.join(d, _STEP_METADATA_FILE)):
            return item_dir, d
    return item_dir, None


def _items(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path)
                  if os.path.exists(os.path.join(path, d, _TREE_METADATA_FILE)))


def read_metadata(path, item: str | None = None) -> dict | None:
    """The "qjax" metadata stored with a checkpoint, or None if it has none.

    Raises CheckpointError when the checkpoint is missing or its metadata file is unreadable.
    """
    _, step_dir = _locate(path, item)
    if step_dir is None:
        return None
    f = os.path.join(step_dir, _STEP_METADATA_FILE)
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"metadata file {f!r} is unreadable (truncated or corrupted?): {e}") from None
    return (meta.get("custom_metadata") or {}).get(METADATA_KEY)


def _stored_arrays(item_dir: str):
    f = os.path.join(item_dir, _TREE_METADATA_FILE)
    if not os.path.exists(f):
        raise CheckpointError(f"checkpoint {item_dir!r} is missing its orbax tree metadata file {f!r}")
    try:
        meta = _ocp().StandardCheckpointer().metadata(item_dir)
    except Exception as e:  # orbax raises assorted types for a damaged _METADATA
        raise CheckpointError(f"orbax tree metadata {f!r} is unreadable (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {key_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- save / restore


def save(path, tree, *, force: bool = False, custom_metadata: dict | None = None) -> None:
    """Saves a qjax tree with `ocp.StandardCheckpointer`, plus its static metadata and checksums.

    The write is atomic (orbax writes a temporary directory and renames it when complete).
    force: overwrite an existing checkpoint at `path`.
    """
    meta = dict(custom_metadata or {})
    meta.update(tree_metadata(tree, checksums=True))
    ck = _ocp().StandardCheckpointer()
    ck.save(os.path.abspath(os.fspath(path)), tree, force=force, custom_metadata=meta)
    ck.wait_until_finished()
    ck.close()


def _check_target(stored: dict, qmeta: dict | None, target, where: str) -> None:
    problems = []
    target_leaves = {key_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    norm = lambda p: tuple(map(str, p))  # noqa: E731
    stored_n = {norm(p): x for p, x in stored.items()}
    target_n = {norm(p): x for p, x in target_leaves.items()}
    for p in sorted(set(target_n) - set(stored_n)):
        problems.append(f"{'/'.join(p)} is not in the checkpoint")
    for p in sorted(set(stored_n) - set(target_n)):
        problems.append(f"{'/'.join(p)} is in the checkpoint but not in the target")
    for p in sorted(set(stored_n) & set(target_n)):
        s, t = stored_n[p], target_n[p]
        if tuple(s.shape) != tuple(np.shape(t)) or np.dtype(s.dtype) != np.dtype(t.dtype):
            problems.append(f"{'/'.join(p)}: checkpoint has {describe(s)}, target has {describe(t)}")
    if qmeta is not None:
        qtarget = {norm(key_path(p)): x for p, x in
                   jax.tree_util.tree_flatten_with_path(target, is_leaf=is_quantized)[0] if is_quantized(x)}
        for e in qmeta.get("quantized", []):
            t = qtarget.get(norm(e["path"]))
            if t is None:
                continue
            saved = (e["format"], e["blocksize"], tuple(e["shape"]), e["dtype"], bool(e["transposed"]))
            have = (t.format, t.blocksize, tuple(t.shape), _dtype_name(t.dtype), bool(t.transposed))
            if saved != have:
                problems.append(f"{'/'.join(norm(e['path']))}: checkpoint holds (format, blocksize, shape, dtype, "
                                f"transposed)={saved}, target has {have}")
    if problems:
        raise CheckpointError(f"checkpoint {where!r} does not fit the target:\n  " + "\n  ".join(problems[:20])
                              + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _verify(tree, qmeta: dict | None, where: str) -> None:
    sums = (qmeta or {}).get("checksums")
    if not sums:
        return
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    bad = []
    for p, x in leaves:
        name = "/".join(map(str, key_path(p)))
        if name in sums and _fully_addressable(x) and _crc(x) != sums[name]:
            bad.append(name)
    if bad:
        raise CheckpointError(f"checkpoint {where!r} is corrupted: the data of {bad} does not match the "
                              "checksums recorded at save time")


def _with_orbax_errors(fn, where: str):
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:  # tensorstore / orbax raise assorted types for damaged data files
        raise CheckpointError(f"could not read the arrays of checkpoint {where!r} (a data file is truncated, "
                              f"corrupted or missing?): {type(e).__name__}: {str(e)[:500]}") from None


def restore(path, target=None, *, item: str | None = None, verify: bool = True):
    """Restores a qjax tree saved by `save` or by plain orbax.

    path: a `StandardCheckpointer` directory, or a `CheckpointManager` step directory (pick
      the item with `item=` when it has several).
    target: optional tree of arrays or `jax.ShapeDtypeStruct`s (QuantizedArrays included, e.g.
      from `jax.eval_shape`); their shardings are kept. Without it, QuantizedArrays are rebuilt
      from the stored metadata.
    verify: check the CRC32 checksums recorded by `save` (arrays fully on this host only).
    Raises CheckpointError naming the problem: no or interrupted checkpoint, unreadable files,
    leaves whose shape/dtype/format differ from the target, missing metadata, bad checksums.
    """
    where = os.fspath(path)
    item_dir, _ = _locate(path, item)
    qmeta = read_metadata(path, item)
    stored = _stored_arrays(item_dir)
    ck = _ocp().StandardCheckpointer()
    if target is not None:
        _check_target(stored, qmeta, target, where)
        abstract = jax.tree_util.tree_map(_ocp().utils.to_shape_dtype_struct, target)
        out = _with_orbax_errors(lambda: ck.restore(os.path.abspath(item_dir), abstract), where)
    else:
        raw = _with_orbax_errors(lambda: ck.restore(os.path.abspath(item_dir)), where)
        if qmeta is None:
            looks = sorted({"/".join(map(str, p[:-1])) for p in stored if str(p[-1]) == "packed"})
            if looks:
                raise CheckpointError(f"checkpoint {where!r} has no qjax metadata, so {looks} cannot be rebuilt "
                                      "as QuantizedArrays: pass target=, or save with qjax.checkpoint.save / "
                                      "custom_metadata=qjax.checkpoint.tree_metadata(tree)")
            return raw
        out = raw
        for entry in qmeta.get("quantized", []):
            _set(out, entry["path"], _rebuild(out, entry, where))
    if verify:
        _verify(out, qmeta, where)
    return out
