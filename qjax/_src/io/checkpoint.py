"""orbax checkpoints of qjax trees: static metadata beside the arrays, restore with or without a target.

orbax saves a quantized array's leaves (a QuantizedArray's packed codes, absmax, nested absmax,
offset) as ordinary arrays, in their packed form, and restores them bit for bit onto a target.
What it cannot know are the static fields (format, blocksize, shape, dtype, transposed): qjax
stores each array's `metadata()` as JSON in the step's `custom_metadata` under "qjax", with a
CRC32 of every array, so `restore(path)` rebuilds quantized arrays without a target (the
family named by the entry's "family"; none means QuantizedArray) and detects corrupted data.

`save` never deletes the old checkpoint before the new one is complete: it validates the tree
first, then writes beside `path` and swaps the new directory in whole (`ckpt_files`).
"""

from __future__ import annotations

import json
import os
import time
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src.paths import json_key, lookup, path_keys, path_str, set_in
from qjax._src.io import files as files
from qjax._src.core.family import QuantizedBase, family, is_quantized
from qjax._src.core.qarray import QuantizedArray
from qjax._src.errors import CheckpointError, describe, named

METADATA_KEY = "qjax"
# how long `restore` keeps reading again while saves keep replacing the checkpoint under it
_RACE_SECONDS = 120.0
FORMAT_VERSION = 1
_TREE_METADATA_FILE = "_METADATA"


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


# ----------------------------------------------------------------------------- metadata


def _crc(x) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(x)).view(np.uint8).reshape(-1))


def _fully_addressable(x) -> bool:
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def tree_metadata(tree, *, checksums: bool = False) -> dict:
    """JSON-able static metadata of a qjax tree, to store beside it in orbax's custom metadata.

    Returns {"qjax": {"format_version", "quantized": [{"path", **q.metadata()}, ...],
    "checksums": {"a/b/packed": crc32, ...}}}; a QuantizedArray's metadata is {"format",
    "blocksize", "shape", "dtype", "transposed", "double_quant"}, another family's starts with "family".
    Pass it as `custom_metadata=` to `StandardCheckpointer.save` or `CheckpointManager.save`.
    checksums: also CRC32 every array (copies it to the host once); `restore` verifies them.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    quantized, sums = [], {}
    for p, x in leaves:
        path = [json_key(k) for k in path_keys(p)]
        if is_quantized(x):
            quantized.append({"path": path, **x.metadata()})
            children = x.leaves()
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


# ----------------------------------------------------------------------------- validation


def _unsavable(x) -> str | None:
    """Why orbax cannot save leaf `x`, or None when it can."""
    if isinstance(x, (bool, int, float)):
        return None
    if isinstance(x, jax.ShapeDtypeStruct):
        return "an abstract ShapeDtypeStruct holds no data"
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        if not (jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or x.dtype == np.bool_
                or jnp.issubdtype(x.dtype, np.number)):
            return "orbax saves numeric and bool arrays only"
        return "orbax cannot save zero-size arrays" if x.size == 0 else None
    return "orbax saves arrays and Python numbers only"


def check_tree(tree, what: str = "tree") -> None:
    """Raises before anything touches disk when orbax cannot save `tree`.

    Raises ValueError for a tree without leaves, TypeError naming every leaf (path, shape,
    dtype or type) that is not a non-empty numeric / bool array or a Python number.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(f"{what} has no arrays to save (an empty tree): orbax cannot write it")
    bad = [f"{named(path_str(p), x)}: {why}" for p, x in leaves if (why := _unsavable(x)) is not None]
    if bad:
        raise TypeError(f"{what} cannot be saved: " + "; ".join(bad[:10])
                        + (f"; ... and {len(bad) - 10} more" if len(bad) > 10 else "")
                        + ". Drop these leaves or turn them into arrays")


def check_finite(tree, what: str) -> None:
    """Raises ValueError naming every float leaf of `tree` that holds NaN or inf: path, shape, dtype, count."""
    leaves = [(p, x if hasattr(x, "dtype") else np.asarray(x))
              for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    floats = [(p, x) for p, x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    counts = jax.device_get([jnp.count_nonzero(~jnp.isfinite(x)) for _, x in floats])  # one sync for all
    bad = [f"{named(path_str(p), x)} has {int(n)} non-finite value(s) (NaN or inf) of {x.size}"
           for (p, x), n in zip(floats, counts) if n]
    if bad:
        raise ValueError(f"{what} hold non-finite values (did the loss diverge?): " + "; ".join(bad)
                         + ". Save an earlier step, or pass allow_nonfinite=True to save them anyway")


def to_json(value, name: str):
    """`value` with numpy / jax numbers and arrays turned into Python numbers and lists (tuples too).

    Raises TypeError naming the field (e.g. "data_position['epoch']") and its type when a value
    is not JSON-serializable or a dict key is not a str (JSON would give it back as a str).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        if value.dtype == np.bool_ or jnp.issubdtype(value.dtype, np.integer):
            return np.asarray(value).tolist()
        if jnp.issubdtype(value.dtype, np.floating):  # bfloat16 too: its tolist() gives no Python floats
            return np.asarray(value, np.float64).tolist()
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{name}: key {k!r} (type={type(k).__name__}) is not a str, so JSON would give "
                                f"it back as {str(k)!r}: use str keys")
            out[k] = to_json(v, f"{name}[{k!r}]")
        return out
    raise TypeError(f"{name}: {str(value)[:80]!r} is not JSON-serializable ({describe(value)}): "
                    "use numbers, strings, lists and dicts with str keys")


def _family_of(entry: dict, where: str) -> type:
    """The class of a metadata entry: its "family", or QuantizedArray for entries without one."""
    try:
        return family(entry["family"]) if "family" in entry else QuantizedArray
    except KeyError as e:
        raise CheckpointError(f"{where}: {'/'.join(map(str, entry['path']))!r}: {e.args[0]}") from None


def _rebuild(raw, entry: dict, where: str) -> QuantizedBase:
    name = "/".join(map(str, entry["path"]))
    try:
        node = lookup(raw, entry["path"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(f"{where}: metadata names {name!r}, which the stored arrays do not hold") from None
    cls = _family_of(entry, where)
    if not isinstance(node, dict) or not any(n in node for n in cls.leaf_names):
        raise CheckpointError(f"{where}: {name!r} is not a stored {cls.__name__}")
    try:
        q = cls.from_metadata(entry, node)
        q.check_leaves(name, stacked=True)  # scanned layers
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    return q


# ----------------------------------------------------------------------------- locating


def _interrupted(path: str) -> list[str]:
    return [os.path.basename(d) for d in files.siblings(path, files.TMP_MARK, files.NEW_MARK)]


def locate(path, item: str | None) -> tuple[str, str | None]:
    """(item directory holding _METADATA, step directory holding _CHECKPOINT_METADATA or None)."""
    path = os.path.abspath(os.fspath(path))  # orbax reads a relative path's metadata as an empty tree
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise CheckpointError(f"{path!r} is a file, not a checkpoint directory")
        moved = files.displaced(path)
        tmp = _interrupted(path)
        if moved is not None:
            path = moved
        elif tmp:
            raise CheckpointError(f"no complete checkpoint at {path!r}: only an interrupted save "
                                  f"({', '.join(tmp)}) exists; restore an earlier checkpoint")
        else:
            raise CheckpointError(f"no checkpoint at {path!r}: the directory does not exist")
    if item is not None:
        item_dir = os.path.join(path, item)
        if not os.path.isdir(item_dir):
            raise CheckpointError(f"checkpoint {path!r} has no item {item!r}; items: {_items(path)}")
    elif os.path.exists(os.path.join(path, _TREE_METADATA_FILE)):
        item_dir = path
    else:
        items = _items(path)
        if not items and os.path.exists(os.path.join(path, files.STEP_METADATA_FILE)):
            raise CheckpointError(f"checkpoint {path!r} is missing its orbax tree metadata file "
                                  f"{_TREE_METADATA_FILE!r} (deleted or an incomplete copy?)")
        if len(items) != 1:
            raise CheckpointError(f"{path!r} is not an orbax pytree checkpoint (no {_TREE_METADATA_FILE} file)"
                                  + (f"; pass item= one of {items}" if items else ""))
        item_dir = os.path.join(path, items[0])
    for d in (item_dir, os.path.dirname(os.path.normpath(item_dir))):
        if os.path.exists(os.path.join(d, files.STEP_METADATA_FILE)):
            return item_dir, d
    return item_dir, None


def _items(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path)
                  if os.path.exists(os.path.join(path, d, _TREE_METADATA_FILE)))


def _read_qmeta(step_dir: str | None) -> dict | None:
    if step_dir is None:
        return None
    f = os.path.join(step_dir, files.STEP_METADATA_FILE)
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"metadata file {f!r} is unreadable (truncated or corrupted?): {e}") from None
    return (meta.get("custom_metadata") or {}).get(METADATA_KEY)


def read_metadata(path, item: str | None = None) -> dict | None:
    """The "qjax" metadata stored with a checkpoint, or None if it has none.

    Raises CheckpointError when the checkpoint is missing or its metadata file is unreadable.
    """
    return _read_qmeta(locate(path, item)[1])


def _damaged_files(d: str) -> list[str]:
    """Files of checkpoint `d` that are missing or changed size since `save` listed them in _QJAX_FILES,
    and, for any orbax checkpoint, missing or empty OCDBT manifests."""
    problems = []
    try:
        with open(os.path.join(d, files.FILES)) as fh:
            sizes = json.load(fh)
    except FileNotFoundError:
        sizes = {}
    except (OSError, ValueError) as e:
        return [f"{files.FILES!r} is unreadable ({e})"]
    for rel, size in sorted(sizes.items()):
        try:
            have = os.path.getsize(os.path.join(d, rel))
        except FileNotFoundError:
            problems.append(f"file {rel!r} is missing")
            continue
        if have != size:
            problems.append(f"file {rel!r} is {'truncated' if have < size else 'damaged'}: {have} bytes, "
                            f"{size} when saved")
    procs = sorted(f for f in os.listdir(d) if f.startswith("ocdbt.process_"))
    manifests = ["manifest.ocdbt"] + [os.path.join(p, "manifest.ocdbt") for p in procs] if procs else []
    for rel in (m for m in manifests if m not in sizes):  # an OCDBT checkpoint cannot be read without them
        if not os.path.isfile(os.path.join(d, rel)):
            problems.append(f"file {rel!r} is missing")
        elif os.path.getsize(os.path.join(d, rel)) == 0:
            problems.append(f"file {rel!r} is empty")
    return problems


def _check_files(d: str, where: str) -> None:
    problems = _damaged_files(d)
    if problems:
        raise CheckpointError(f"checkpoint {where!r} is damaged or incomplete: " + "; ".join(problems[:10])
                              + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else "")
                              + ". Restore another checkpoint")


def stored_arrays(item_dir: str, qmeta: dict | None = None) -> dict:
    """{path tuple: array metadata} of the arrays orbax stored; checks the files they live in first.

    qmeta: the step's qjax metadata; arrays it checksummed but _METADATA lacks mean a damaged _METADATA.
    """
    f = os.path.join(item_dir, _TREE_METADATA_FILE)
    if not os.path.exists(f):
        raise CheckpointError(f"checkpoint {item_dir!r} is missing its orbax tree metadata file {f!r}")
    _check_files(item_dir, item_dir)
    try:
        with open(f) as fh:
            json.load(fh)
        meta = _ocp().StandardCheckpointer().metadata(item_dir)
    except Exception as e:  # orbax raises assorted types for a damaged _METADATA
        raise CheckpointError(f"orbax tree metadata file {f!r} is damaged (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    stored = {path_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    names = {"/".join(map(str, p)) for p in stored}
    lost = sorted(set((qmeta or {}).get("checksums") or {}) - names)
    if lost:
        raise CheckpointError(f"orbax tree metadata file {f!r} is damaged: it lacks {lost[:10]}, which were saved")
    return stored


# ----------------------------------------------------------------------------- save / restore


def _check_replaceable(path: str, force: bool) -> None:
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} exists and is not a directory: save replaces only checkpoint "
                              "directories; choose another path")
    entries = sorted(os.listdir(path))
    if not entries:
        return
    if not (files.complete(path) or _TREE_METADATA_FILE in entries or _items(path)):
        raise CheckpointError(f"{path!r} holds files that are not a checkpoint (e.g. {entries[:3]}): save "
                              "replaces only checkpoints, even with force=True; choose another path")
    if not force:
        raise CheckpointError(f"a checkpoint exists at {path!r}: pass force=True to replace it (the old one "
                              "stays readable until the new one is complete)")


def save(path, tree, *, force: bool = False, custom_metadata: dict | None = None) -> None:
    """Saves a qjax tree with orbax, plus its static metadata and checksums.

    The tree is validated before anything touches disk, written beside `path` and moved into
    place when complete: `restore(path)` gives the old or the new tree at every instant, a
    killed save included. An existing empty directory is replaced.
    force: replace an existing checkpoint at `path` (never a file or a directory of other files).
    custom_metadata: JSON-able dict stored beside the "qjax" metadata (numpy numbers converted).
    Raises TypeError / ValueError for leaves orbax cannot save (named by path, shape, dtype) or an
    empty tree, CheckpointError when `path` exists (without force), is not a checkpoint, or is
    being written by another thread or process.
    """
    check_tree(tree)
    meta = to_json(dict(custom_metadata or {}), "custom_metadata")
    meta.update(tree_metadata(tree, checksums=True))
    path = os.path.realpath(os.fspath(path))  # a symlink: replace what it points to, keep the link
    if jax.process_count() > 1:  # every process writes its shards; orbax coordinates the rename
        ck = _ocp().StandardCheckpointer()
        ck.save(path, tree, force=force, custom_metadata=meta)
        ck.wait_until_finished()
        ck.close()
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"cannot save to {path!r}: a parent of it is a file") from None
    with files.exclusive(path):
        files.tidy(path)
        _check_replaceable(path, force)
        new = files.fresh(path, files.NEW_MARK)
        try:
            with files.WRITE_LOCK:
                ck = _ocp().Checkpointer(_ocp().StandardCheckpointHandler())
                ck.save(new, args=_ocp().args.StandardSave(tree), custom_metadata=meta)
                ck.close()
            files.finish(new)
            files.swap_in(new, path)
        except BaseException:
            for d in files.siblings(path, files.NEW_MARK):
                shutil.rmtree(d, ignore_errors=True)
            raise


def _static(value):
    """A metadata value comparable with its JSON round trip (lists as tuples)."""
    return tuple(_static(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_target(stored: dict, qmeta: dict | None, target, where: str) -> None:
    problems = []
    target_leaves = {path_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
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
        qtarget = {norm(path_keys(p)): x for p, x in
                   jax.tree_util.tree_flatten_with_path(target, is_leaf=is_quantized)[0] if is_quantized(x)}
        for e in qmeta.get("quantized", []):
            t = qtarget.get(norm(e["path"]))
            if t is None:
                continue
            keys = ("family",) + type(t).static_names
            saved = tuple(_static(e.get(k, QuantizedArray.family if k == "family" else None)) for k in keys)
            have = tuple(_static(t.metadata().get(k, t.family if k == "family" else None)) for k in keys)
            if saved != have:
                problems.append(f"{'/'.join(norm(e['path']))}: checkpoint holds ({', '.join(keys)})={saved}, "
                                f"target has {have}")
    if problems:
        raise CheckpointError(f"checkpoint {where!r} does not fit the target:\n  " + "\n  ".join(problems[:20])
                              + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def verify_checksums(tree, qmeta: dict | None, where: str) -> None:
    sums = (qmeta or {}).get("checksums")
    if not sums:
        return
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    bad = []
    for p, x in leaves:
        name = "/".join(map(str, path_keys(p)))
        if name in sums and _fully_addressable(x) and _crc(x) != sums[name]:
            bad.append(name)
    if bad:
        raise CheckpointError(f"checkpoint {where!r} is corrupted: the data of {bad} does not match the "
                              "checksums recorded at save time")


def with_orbax_errors(fn, where: str):
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:  # tensorstore / orbax raise assorted types for damaged data files
        inner = e.__cause__ or e  # tensorstore's own error names the array ("a/0": array a, chunk 0)
        raise CheckpointError(f"could not read the arrays of checkpoint {where!r}: a data file is damaged or "
                              f"missing: {type(inner).__name__}: {str(inner)[:500]}") from None


def _identity(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def restore(path, target=None, *, item: str | None = None, verify: bool = True):
    """Restores a qjax tree saved by `save` or by plain orbax.

    path: a `StandardCheckpointer` directory, or a `CheckpointManager` step directory (pick
      the item with `item=` when it has several).
    target: optional tree of arrays or `jax.ShapeDtypeStruct`s (QuantizedArrays included, e.g.
      from `jax.eval_shape`); their shardings are kept. Without it, QuantizedArrays are rebuilt
      from the stored metadata.
    verify: check the CRC32 checksums recorded by `save` (arrays fully on this host only).
    A save that replaces `path` meanwhile makes it read again, so the result is the old or the new tree.
    Raises CheckpointError naming the problem: no or interrupted checkpoint, damaged or missing
    files (named), leaves whose shape/dtype/format differ from the target, missing metadata, bad checksums.
    """
    where = os.fspath(path)
    deadline = time.monotonic() + _RACE_SECONDS
    while True:
        before = _identity(where)
        try:
            out = _restore_once(where, target, item, verify)
        except Exception:  # a swap mid-read mixes two checkpoints' files: whatever fails, read again
            if _identity(where) != before and time.monotonic() < deadline:
                continue
            raise
        if _identity(where) == before or time.monotonic() >= deadline:
            return out


def _restore_once(where: str, target, item: str | None, verify: bool):
    item_dir, step_dir = locate(where, item)
    qmeta = _read_qmeta(step_dir)
    stored = stored_arrays(item_dir, qmeta)
    ck = _ocp().StandardCheckpointer()
    if target is not None:
        check_target(stored, qmeta, target, where)
        abstract = jax.tree_util.tree_map(_ocp().utils.to_shape_dtype_struct, target)
        out = with_orbax_errors(lambda: ck.restore(os.path.abspath(item_dir), abstract), where)
    else:
        raw = with_orbax_errors(lambda: ck.restore(os.path.abspath(item_dir)), where)
        if qmeta is None:
            looks = sorted({"/".join(map(str, p[:-1])) for p in stored if str(p[-1]) == "packed"})
            if looks:
                raise CheckpointError(f"checkpoint {where!r} has no qjax metadata, so {looks} cannot be rebuilt "
                                      "as QuantizedArrays: pass target=, or save with qjax.checkpoint.save / "
                                      "custom_metadata=qjax.checkpoint.tree_metadata(tree)")
            return raw
        out = raw
        for entry in qmeta.get("quantized", []):
            set_in(out, entry["path"], _rebuild(out, entry, where))
    if verify:
        verify_checksums(out, qmeta, where)
    return out
