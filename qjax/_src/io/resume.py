"""Exact resume: adapters, optimizer state, step, RNG key and data position over ocp.CheckpointManager."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from typing import Any, NamedTuple

import jax
import numpy as np

from qjax._src.adapters import tree as ad
from qjax._src import paths
from qjax._src.io import checkpoint as ck
from qjax._src.io import files as files
from qjax._src.io.adapter_io import config_from_json, config_to_json
from qjax._src.adapters.config import LoraConfig

RESUME_KEY = "qjax_resume"


class ResumeState(NamedTuple):
    """What `ResumeManager.restore` gives back.

    step: the saved step. adapters: the template passed to restore with its adapters replaced
    (Linen variables / adapters tree: a new tree; an NNX module: updated in place).
    opt_state: the optimizer state, structured like its template. rng: the key as saved (typed
    or raw uint32). data_position: the JSON value saved (an int, a dict, ...).
    lora_config: the LoraConfig saved with the run, or None.
    """

    step: int
    adapters: Any
    opt_state: Any
    rng: Any
    data_position: Any
    lora_config: LoraConfig | None


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class ResumeManager:
    """Saves what an exact resume needs every `save_every` steps and keeps the last `keep`.

    Frozen quantized weights are not saved: they are rebuilt from the base model by the same
    deterministic conversion. A run stopped after step s and resumed from here continues
    bit-identically, provided the training step, data order and RNG use are deterministic.

    Every step is an orbax checkpoint written atomically (a temporary directory renamed when
    complete), so a killed save never shows up as a step. Old steps beyond `keep` are deleted
    only once a newer step is complete on disk, so a failed save never costs the last good one.
    Use as a context manager or call `close()` so asynchronous saves finish; an asynchronous save
    that fails raises a CheckpointError naming its step from the next save / wait / close.
    One writer per directory: from its first save until `close()` a manager holds the lock file
    `<directory>.qjax-lock`, and another manager's save raises a CheckpointError naming the holder.

    directory: where step directories go. save_every: save when step % save_every == 0 (or
    force=True). keep: how many recent steps to keep. lora_config: stored with every step and
    checked on restore. async_save: write in a background thread (orbax's async checkpointing).
    """

    def __init__(self, directory, *, save_every: int = 1000, keep: int | None = 3,
                 lora_config: LoraConfig | None = None, async_save: bool = True):
        import orbax.checkpoint as ocp
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every!r}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None (keep all), got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ck.CheckpointError(f"ResumeManager directory {self.directory!r} is a file")
        self.save_every = save_every
        self.lora_config = lora_config
        self._keep = keep
        self._pending = None  # the step whose asynchronous write may still fail
        self._writer = None  # holds the directory's lock file from the first save until close()
        # max_to_keep=None: orbax would delete old steps when a new one starts, before it is known to succeed.
        self._options = ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=None,
                                                     enable_async_checkpointing=async_save, create=True)
        self._ocp = ocp
        self._async = async_save
        self._mngr = ocp.CheckpointManager(self.directory, options=self._options)

    # ------------------------------------------------------------------ save

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, *, adapters, opt_state, rng=None, data_position=None, force: bool = False,
             allow_nonfinite: bool = False) -> bool:
        """Saves one step when `should_save(step)` or force; returns whether it saved.

        adapters: Linen variables, adapters tree, `nnx.State` or NNX module (only its
        adapter leaves, those of the registered variants such as LoRA's `lora_a`/`lora_b`, are stored). opt_state: any pytree of arrays (optax state).
        rng: a jax key (typed or raw) or None. data_position: any JSON-able value (e.g. the
        index of the next batch, or {"epoch": e, "index": i}); numpy numbers and arrays become
        Python numbers and lists, tuples lists. allow_nonfinite: save NaN / inf adapters or
        optimizer state too.
        Everything is checked before the (asynchronous) write starts: raises TypeError naming
        the data_position field or the leaf orbax cannot save, ValueError naming every adapter /
        optimizer-state leaf holding NaN or inf (path, shape, dtype, count), CheckpointError when
        an earlier asynchronous save failed (naming that step; this step is then not saved).
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        flat = ad.flat_adapters(adapters)
        tree = {"adapters": ad.nest(flat), "opt_state": opt_state}
        if not allow_nonfinite:
            ck.check_finite(tree, f"step {step}: the adapters / optimizer state")
        meta = {"step": step, "data_position": ck.to_json(data_position, "data_position"),
                "adapter_paths": [[paths.json_key(k) for k in p] for p in flat],
                "lora_config": config_to_json(self.lora_config) if self.lora_config else None,
                "rng": None}
        if rng is not None:
            if _is_typed_key(rng):
                meta["rng"] = {"typed": True, "impl": str(jax.random.key_impl(rng))}
                tree["rng"] = jax.random.key_data(rng)
            else:
                meta["rng"] = {"typed": False}
                tree["rng"] = rng
        ck.check_tree(tree, f"step {step}")
        custom = ck.tree_metadata(tree, checksums=True)
        custom[RESUME_KEY] = meta
        self._finish_pending(f"step {step} was not saved")
        if self._writer is None:  # one writer per directory: a second run would interleave and prune steps
            writer = contextlib.ExitStack()
            writer.enter_context(files.exclusive(self.directory))
            self._writer = writer
        with files.WRITE_LOCK:  # orbax's checkpointers fail or hang when threads save at once
            saved = self._mngr.save(step, args=self._ocp.args.StandardSave(tree), custom_metadata=custom,
                                    force=True)
        self._pending = step if saved else None
        if not self._async:
            self._finish_pending()
        return saved

    def _finish_pending(self, consequence: str = "") -> None:
        """Waits for the pending save; raises for it if it failed, else deletes steps beyond `keep`."""
        step, self._pending = self._pending, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            self._discard(step)
            raise ck.CheckpointError(
                f"saving step {step} to {self.directory!r} failed, so it is not on disk (complete steps: "
                f"{self._mngr.all_steps()}){'; ' + consequence if consequence else ''}: "
                f"{type(e).__name__}: {str(e)[:500]}") from e
        if step is not None and self._keep is not None:
            for old in sorted(self._mngr.all_steps())[:-self._keep]:
                self._mngr.delete(old)

    def _discard(self, step: int | None) -> None:
        """After a failed save: lets orbax's other threads end, then deletes what the step left
        (orbax may still rename it into place, and would then list a broken step)."""
        with contextlib.suppress(Exception):
            self._mngr.close()
        if step is not None:
            for d in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")) + \
                    [os.path.join(self.directory, str(step))]:
                shutil.rmtree(d, ignore_errors=True)
        self._mngr = self._ocp.CheckpointManager(self.directory, options=self._options)

    # ------------------------------------------------------------------ restore

    def latest_step(self) -> int | None:
        """The newest complete step (waits for a pending save), or None."""
        self._finish_pending()
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """The complete steps on disk (waits for a pending save)."""
        self._finish_pending()
        return list(self._mngr.all_steps())

    def restore(self, step: int | None = None, *, adapters, opt_state) -> ResumeState | None:
        """Restores `step` (default: the latest); returns None when there is no checkpoint.

        adapters, opt_state: templates with the structure, shapes and dtypes to restore into
        (the freshly converted model and `tx.init(...)`); arrays or ShapeDtypeStructs.
        Raises CheckpointError naming what is wrong: another LoRA config, adapters missing or
        of another shape (rank), optimizer state of another structure, damaged files.
        """
        self._finish_pending()
        if step is None:
            step = self._mngr.latest_step()
            if step is None:
                return None
        if step not in self._mngr.all_steps():
            raise ck.CheckpointError(f"{self.directory!r} has no step {step}; steps: {self.all_steps()}")
        step_dir = os.path.join(self.directory, str(step))
        where = step_dir
        custom = _read_custom(step_dir)
        meta = custom.get(RESUME_KEY)
        if meta is None:
            raise ck.CheckpointError(f"step {step} in {self.directory!r} has no qjax resume metadata: "
                                     "it was not written by qjax.checkpoint.ResumeManager")
        saved_cfg = config_from_json(meta["lora_config"]) if meta.get("lora_config") else None
        if self.lora_config is not None and saved_cfg is not None and saved_cfg != self.lora_config:
            raise ck.CheckpointError(f"step {step} was saved with {saved_cfg}, this manager has {self.lora_config}")
        flat = ad.flat_adapters(adapters)
        target = {"adapters": ad.nest(flat), "opt_state": opt_state}
        stored = ck.stored_arrays(ck.locate(step_dir, None)[0], custom.get(ck.METADATA_KEY))
        rng_meta = meta.get("rng")
        if rng_meta is not None and ("rng",) in stored:
            target["rng"] = jax.ShapeDtypeStruct(tuple(stored[("rng",)].shape), np.dtype(stored[("rng",)].dtype))
        ck.check_target(stored, custom.get(ck.METADATA_KEY), target, where)
        abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, target)
        out = ck.with_orbax_errors(
            lambda: self._mngr.restore(step, args=self._ocp.args.StandardRestore(abstract)), where)
        ck.verify_checksums(out, custom.get(ck.METADATA_KEY), where)
        rng = out.get("rng")
        if rng_meta is not None and rng_meta.get("typed"):
            rng = jax.random.wrap_key_data(rng, impl=rng_meta["impl"])
        new = {p: paths.lookup(out["adapters"], p) for p in flat}
        return ResumeState(step=step, adapters=ad.replace_adapters(adapters, new), opt_state=out["opt_state"],
                           rng=rng, data_position=meta.get("data_position"), lora_config=saved_cfg)

    # ------------------------------------------------------------------ lifecycle

    def wait_until_finished(self) -> None:
        """Waits for the pending save; raises CheckpointError naming its step if it failed."""
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self._mngr.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def __enter__(self) -> "ResumeManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_custom(step_dir: str) -> dict:
    import json
    f = os.path.join(step_dir, files.STEP_METADATA_FILE)
    try:
        with open(f) as fh:
            return json.load(fh).get("custom_metadata") or {}
    except FileNotFoundError:
        raise ck.CheckpointError(f"step directory {step_dir!r} is missing its metadata file {f!r}") from None
    except (OSError, ValueError) as e:
        raise ck.CheckpointError(f"metadata file {f!r} is unreadable (truncated or corrupted?): {e}") from None
