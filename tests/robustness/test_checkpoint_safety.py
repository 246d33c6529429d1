"""Checkpoints never lose data: validated overwrites swapped in whole, kills mid-save, threads,
two processes, damaged files named, JSON and NaN checks before a write starts."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _ckpt_writer as writer
import qjax
from qjax._src.io import files as files
from qjax.checkpoint import CheckpointError, ResumeManager

WRITER = writer.__file__


def _tree(rng, n=3, shape=(16, 8)):
    return {"params": {f"d{i}": {"kernel": jnp.asarray(rng.standard_normal(shape).astype(np.float32)),
                                 "bias": jnp.asarray(rng.standard_normal(shape[-1:]).astype(np.float32))}
                       for i in range(n)}, "step": jnp.asarray(int(rng.integers(1000)), jnp.int32)}


def _bits(tree):
    leaves, struct = jax.tree_util.tree_flatten(tree)
    return struct, [(np.asarray(x).dtype, np.asarray(x).shape, np.asarray(x).tobytes()) for x in leaves]


def assert_same(a, b):
    assert _bits(a) == _bits(b)


def _litter(tmp_path, name="c"):
    """Everything beside the checkpoint `name` but itself (temporaries, lock files)."""
    return sorted(f for f in os.listdir(tmp_path) if f.startswith(name) and f != name)


def _adapters(rng, r=4, d=16, layers=2):
    return {"params": {f"layers_{i}": {"q_proj": {
        "lora_a": jnp.asarray(rng.standard_normal((d, r)).astype(np.float32)),
        "lora_b": jnp.asarray(rng.standard_normal((r, d)).astype(np.float32))}} for i in range(layers)}}


# ----------------------------------------------------------------------------- 1. overwrites


@pytest.mark.parametrize("bad, error, match", [
    (lambda t: dict(t, name="run-7"), TypeError, r"'name' \(type=str\): orbax saves arrays"),
    (lambda t: dict(t, ids=np.array([object()], dtype=object)), TypeError,
     r"'ids' \(shape=\(1,\) dtype=object\): orbax saves numeric and bool arrays only"),
    (lambda t: {}, ValueError, "empty tree"),
    (lambda t: dict(t, empty=np.zeros((0, 3), np.float32)), TypeError,
     r"'empty' \(shape=\(0, 3\) dtype=float32\): orbax cannot save zero-size arrays"),
    (lambda t: dict(t, abstract=jax.ShapeDtypeStruct((2, 3), jnp.float32)), TypeError,
     r"'abstract' \(shape=\(2, 3\) dtype=float32\): an abstract ShapeDtypeStruct"),
], ids=["str", "object", "empty", "zero_size", "abstract"])
def test_refused_overwrite_keeps_old_checkpoint(rng, tmp_path, bad, error, match):
    old = _tree(rng)
    qjax.checkpoint.save(tmp_path / "c", old)
    with pytest.raises(error, match=match):
        qjax.checkpoint.save(tmp_path / "c", bad(_tree(rng)), force=True)
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), old)
    assert _litter(tmp_path) == []


@pytest.mark.parametrize("where", ["orbax", "finish", "swap"])
def test_failed_write_keeps_old_checkpoint_and_cleans_up(rng, tmp_path, monkeypatch, where):
    """A full disk (ENOSPC) while orbax writes, while listing the files, or at the swap."""
    old = _tree(rng)
    qjax.checkpoint.save(tmp_path / "c", old)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def half_written(self, directory, *args, **kwargs):
        os.makedirs(f"{directory}.orbax-checkpoint-tmp-1/d")
        (tmp_path / f"{directory}.orbax-checkpoint-tmp-1" / "d" / "0").write_bytes(b"\0" * 100)
        full()
    import orbax.checkpoint as ocp
    target = {"orbax": (ocp.Checkpointer, "save", half_written), "finish": (files, "finish", full),
              "swap": (files, "renameat2", full)}[where]
    monkeypatch.setattr(*target)
    with pytest.raises(OSError, match="No space left on device"):
        qjax.checkpoint.save(tmp_path / "c", _tree(rng, n=4), force=True)
    monkeypatch.undo()
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), old)
    assert _litter(tmp_path) == []


def test_custom_metadata_is_checked_before_writing(rng, tmp_path):
    old, new = _tree(rng), _tree(rng)
    qjax.checkpoint.save(tmp_path / "c", old)
    with pytest.raises(TypeError, match=r"custom_metadata\['run'\]\['seed'\]: .* not JSON-serializable "
                                        r"\(type=object\)"):
        qjax.checkpoint.save(tmp_path / "c", new, force=True, custom_metadata={"run": {"seed": object()}})
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), old)
    qjax.checkpoint.save(tmp_path / "c", new, force=True, custom_metadata={"epoch": np.int64(3)})
    with open(tmp_path / "c" / "_CHECKPOINT_METADATA") as fh:
        assert json.load(fh)["custom_metadata"]["epoch"] == 3


def test_save_without_force_refuses_and_force_replaces(rng, tmp_path, monkeypatch):
    old, new, newer = _tree(rng), _tree(rng), _tree(rng, n=5, shape=(64, 32))
    qjax.checkpoint.save(tmp_path / "c", old)
    with pytest.raises(CheckpointError, match=r"a checkpoint exists at '.*/c': pass force=True"):
        qjax.checkpoint.save(tmp_path / "c", new)
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), old)
    qjax.checkpoint.save(tmp_path / "c", new, force=True)  # renameat2(RENAME_EXCHANGE)
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), new)
    monkeypatch.setattr(files, "renameat2", lambda src, dst, flags: False)  # two renames instead
    qjax.checkpoint.save(tmp_path / "c", newer, force=True)
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), newer)
    assert _litter(tmp_path) == []


def test_restore_reads_the_sibling_of_an_interrupted_swap(rng, tmp_path):
    """The state a kill between the two renames leaves: `c` missing, old and new beside it."""
    old, new, third = _tree(rng), _tree(rng), _tree(rng)
    qjax.checkpoint.save(tmp_path / "c", old)
    qjax.checkpoint.save(tmp_path / "n", new)
    os.rename(tmp_path / "c", tmp_path / f"c{files.OLD_MARK}1000-1")
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), old)  # only the old one is complete
    os.rename(tmp_path / "n", tmp_path / f"c{files.NEW_MARK}2000-1")
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), new)  # the complete new one wins
    with pytest.raises(CheckpointError, match="pass force=True"):  # the next save finishes the swap first
        qjax.checkpoint.save(tmp_path / "c", third)
    assert _litter(tmp_path) == []
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), new)


def test_leftover_temporaries_are_never_read_and_are_cleaned(rng, tmp_path):
    old, new = _tree(rng), _tree(rng)
    qjax.checkpoint.save(tmp_path / "c", old)
    for junk in (f"c{files.NEW_MARK}5-1", f"c{files.NEW_MARK}5-1.orbax-checkpoint-tmp-3", "c.orbax-checkpoint-tmp-9",
                 f"c{files.TRASH_MARK}7-1"):
        (tmp_path / junk).mkdir()
        (tmp_path / junk / "_METADATA").write_text("{")
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), old)
    qjax.checkpoint.save(tmp_path / "c", new, force=True)
    assert _litter(tmp_path) == []
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), new)
    # without `c`, an unfinished new directory is reported, never read
    (tmp_path / f"d{files.NEW_MARK}5-1").mkdir()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint at '.*/d': only an interrupted save"):
        qjax.checkpoint.restore(tmp_path / "d")


# ----------------------------------------------------------------------------- kills


def _expected(mode, seed):
    if mode == "resume":
        return [writer.resume_state(seed, v) for v in (0, 1)]
    return [writer.adapters(seed, v) if mode == "save" else {"params": writer.adapters(seed, v)} for v in (0, 1)]


def _read_back(mode, path):
    """(version found at path, tree as restored); raises when nothing readable is there."""
    if mode == "resume":
        with ResumeManager(path, save_every=1, keep=1) as mgr:
            steps = mgr.all_steps()
            t = writer.resume_state(0, 0)
            st = mgr.restore(adapters=jax.eval_shape(lambda: t["adapters"]),
                             opt_state=jax.eval_shape(lambda: t["opt_state"]))
        assert st.step == steps[-1]
        return st.step - 1, {"adapters": st.adapters, "opt_state": st.opt_state, "data_position": st.data_position}
    out = qjax.checkpoint.restore(path)
    r = np.shape(jax.tree.leaves(out)[0])[-1]
    if mode == "adapters":
        assert qjax.checkpoint.read_adapter_config(path).r == r
    return int(r == writer.R_NEW), out


def _second_writer(mode, path):
    if mode != "resume":
        qjax.checkpoint.save(path, {"x": jnp.ones(2)}, force=True)
        return
    with ResumeManager(path, save_every=1) as mgr:
        mgr.save(5, adapters=writer.resume_state(0, 0)["adapters"], opt_state={"mu": jnp.ones(2)})


def _kill_run(mode, tmp_path, seed, phase="none", fallback=False, delay=None):
    """Writes the old checkpoint, starts the writer, SIGKILLs it at `phase` (or after `delay` s);
    returns whether it was killed, and the version restore gives back (bit for bit)."""
    path = str(tmp_path / mode)
    writer.write(mode, path, seed, 0)
    args = [sys.executable, WRITER, mode, path, str(seed), phase] + (["fallback"] if fallback else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    killed = False
    try:
        assert proc.stdout.readline().strip() == "START"
        if delay is not None:
            time.sleep(delay)
        else:
            line = proc.stdout.readline().strip()
            assert line == f"PHASE {phase}", line
            with pytest.raises(CheckpointError, match=rf"/{mode}' is being written by process {proc.pid} on "):
                _second_writer(mode, path)  # turned away while the first holds the lock
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)  # a no-op when it already finished
    finally:
        proc.kill()
        proc.wait(timeout=60)
    version, got = _read_back(mode, path)
    assert_same(got, _expected(mode, seed)[version])
    _second_writer(mode, path)  # the dead writer's lock is stale: the next save takes it over (and tidies up)
    assert not os.path.exists(path + files.LOCK_SUFFIX)
    if mode != "resume":
        assert _litter(tmp_path, mode) == []
    return killed, version


def test_kill_between_renames_keeps_a_checkpoint(rng, tmp_path):
    """Fast variant: SIGKILL with the old checkpoint moved aside and the new one not yet in place."""
    killed, version = _kill_run("save", tmp_path, int(rng.integers(1 << 30)), "between", fallback=True)
    assert killed and version == 1


KILLS = [(mode, phase, fb) for mode in ("save", "adapters") for phase, fb in
         [("written", False), ("swap", False), ("delete", False), ("between", True), ("delete", True)]] + \
        [("resume", "written", False), ("resume", "delete", False)]


@pytest.mark.slow
@pytest.mark.parametrize("mode, phase, fallback", KILLS)
def test_kill_at_each_phase(rng, tmp_path, mode, phase, fallback):
    killed, version = _kill_run(mode, tmp_path, int(rng.integers(1 << 30)), phase, fallback)
    assert killed and version == (0 if phase in ("written", "swap") else 1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["save", "adapters", "resume"])
def test_kill_after_random_delays(rng, tmp_path, mode):
    """SIGKILL after random delays through the write (tens of MB); every run leaves old or new."""
    runs = []
    for run in range(5):
        d = tmp_path / str(run)
        d.mkdir()
        runs.append(_kill_run(mode, d, int(rng.integers(1 << 30)), delay=float(rng.uniform(0.2, 4.0))))
    print(f"{mode}: (killed, version restored) per run: {runs}")


# ----------------------------------------------------------------------------- 2. resume JSON / async


def _resume_args(rng):
    return dict(adapters=_adapters(rng), opt_state={"mu": jnp.asarray(rng.standard_normal(8).astype(np.float32))})


def test_resume_numpy_data_position_is_converted(rng, tmp_path):
    args = _resume_args(rng)
    pos = {"epoch": np.int64(2), "index": np.int32(5), "lr": np.float32(0.5), "order": np.arange(3), "t": (1, 2)}
    with ResumeManager(tmp_path, save_every=1) as mgr:
        assert mgr.save(1, data_position=np.int64(5), **args)
        assert mgr.save(2, data_position=pos, **args)
    with ResumeManager(tmp_path) as mgr:
        st1 = mgr.restore(1, **args)
        st2 = mgr.restore(**args)
    assert st1.data_position == 5 and type(st1.data_position) is int
    assert st2.data_position == {"epoch": 2, "index": 5, "lr": 0.5, "order": [0, 1, 2], "t": [1, 2]}


@pytest.mark.parametrize("pos, match", [
    ({"epoch": object()}, r"data_position\['epoch'\]: .* is not JSON-serializable \(type=object\)"),
    ({"it": [1, np.ones(2, np.complex64)]},
     r"data_position\['it'\]\[1\]: .* not JSON-serializable \(shape=\(2,\) dtype=complex64\)"),
    ({3: 1}, r"data_position: key 3 \(type=int\) is not a str"),
], ids=["object", "complex_array", "int_key"])
def test_resume_bad_data_position_fails_before_writing(rng, tmp_path, pos, match):
    args = _resume_args(rng)
    with ResumeManager(tmp_path, save_every=1) as mgr:
        with pytest.raises(TypeError, match=match):
            mgr.save(1, data_position=pos, **args)
        assert mgr.save(2, data_position=2, **args)  # the next step is neither blamed nor lost
        assert mgr.all_steps() == [2]


@pytest.fixture
def failing_async_writes(monkeypatch):
    """orbax's background thread fails to write step metadata (e.g. a full disk) until switched off."""
    from orbax.checkpoint._src.metadata import checkpoint as meta_mod
    write = meta_mod._MetadataStoreImpl.write
    state = {"on": True}

    def flaky(self, *args, **kwargs):
        if state["on"] and threading.current_thread() is not threading.main_thread():
            raise OSError(28, "No space left on device")
        return write(self, *args, **kwargs)
    monkeypatch.setattr(meta_mod._MetadataStoreImpl, "write", flaky)
    return state


@pytest.mark.parametrize("surface", ["save", "wait", "close"])
def test_failed_async_save_is_reported_for_its_own_step(rng, tmp_path, failing_async_writes, surface):
    args = _resume_args(rng)
    mgr = ResumeManager(tmp_path, save_every=1, keep=1)
    failing_async_writes["on"] = False
    assert mgr.save(1, data_position=1, **args)
    mgr.wait_until_finished()
    failing_async_writes["on"] = True
    assert mgr.save(2, data_position=2, **args)  # returns at once; the write fails in the background
    call = {"save": lambda: mgr.save(3, data_position=3, **args), "wait": mgr.wait_until_finished,
            "close": mgr.close}[surface]
    with pytest.raises(CheckpointError, match=r"saving step 2 to .* failed, so it is not on disk \(complete "
                                              r"steps: \[1\]\).*No space left on device"):
        call()
    failing_async_writes["on"] = False
    if surface != "close":
        mgr.close()
    with ResumeManager(tmp_path, save_every=1, keep=1) as mgr2:  # keep=1 never deleted the only good step
        assert mgr2.all_steps() == [1]
        assert mgr2.restore(**args).data_position == 1
        assert mgr2.save(3, data_position=3, **args)
    assert ResumeManager(tmp_path).all_steps() == [3]


# ----------------------------------------------------------------------------- 3. threads, processes


def _run_threads(fns, timeout=120):
    errors, threads = [None] * len(fns), []

    def run(i):
        try:
            fns[i]()
        except Exception as e:  # noqa: BLE001 - collected for the assertions
            errors[i] = e
    for i in range(len(fns)):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a save hung"
    return errors


def test_threads_save_distinct_paths(rng, tmp_path):
    cfg = qjax.LoraConfig(r=4)
    for rnd in range(3):
        trees = [_tree(rng) for _ in range(3)]
        ad = _adapters(rng)
        fns = [lambda i=i: qjax.checkpoint.save(tmp_path / f"{rnd}_{i}", trees[i]) for i in range(3)]
        fns.append(lambda: qjax.checkpoint.save_adapters(tmp_path / f"{rnd}_ad", ad, cfg))
        assert _run_threads(fns) == [None] * 4
        for i in range(3):
            assert_same(qjax.checkpoint.restore(tmp_path / f"{rnd}_{i}"), trees[i])
        assert_same(qjax.checkpoint.restore(tmp_path / f"{rnd}_ad"), ad)


def test_same_path_writers_loser_fails_winner_intact(rng, tmp_path):
    old, new = _tree(rng), _tree(rng)
    qjax.checkpoint.save(tmp_path / "c", old)
    with files.exclusive(str(tmp_path / "c")):  # another thread holds the lock
        errors = _run_threads([lambda: qjax.checkpoint.save(tmp_path / "c", new, force=True)])
    assert isinstance(errors[0], CheckpointError)
    assert "/c' is being written by this process (another thread" in str(errors[0])
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), old)
    # a real race: each writer wins or is turned away; what is on disk is one winner's tree, bit for bit
    trees = [_tree(rng) for _ in range(4)]
    errors = _run_threads([lambda t=t: qjax.checkpoint.save(tmp_path / "c", t, force=True) for t in trees])
    assert all(e is None or isinstance(e, CheckpointError) and "is being written" in str(e) for e in errors)
    winners = [_bits(t) for t, e in zip(trees, errors) if e is None]
    assert winners and _bits(qjax.checkpoint.restore(tmp_path / "c")) in winners
    assert _litter(tmp_path) == []


def test_stale_and_live_lock_files(rng, tmp_path):
    tree = _tree(rng)
    lock = tmp_path / f"c{files.LOCK_SUFFIX}"
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    lock.write_text(json.dumps({"pid": int(dead), "host": host, "token": "x"}))
    qjax.checkpoint.save(tmp_path / "c", tree)  # the writer died: its lock is taken over
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": host, "token": "y"}))  # a live process
    with pytest.raises(CheckpointError, match=rf"/c' is being written by process {os.getppid()} on {host} "
                                              rf"\(lock file '.*c{files.LOCK_SUFFIX}'\)"):
        qjax.checkpoint.save(tmp_path / "c", _tree(rng), force=True)
    lock.write_text("")  # a writer killed between creating the lock and writing its pid
    with pytest.raises(CheckpointError, match=r"/c' is being written by another writer"):
        qjax.checkpoint.save(tmp_path / "c", _tree(rng), force=True)
    os.utime(lock, (time.time() - 60, time.time() - 60))
    qjax.checkpoint.save(tmp_path / "c", tree, force=True)
    assert not lock.exists() and _litter(tmp_path) == []
    assert_same(qjax.checkpoint.restore(tmp_path / "c"), tree)


def test_one_resume_manager_writes_a_directory_at_a_time(rng, tmp_path):
    args = _resume_args(rng)
    first = ResumeManager(tmp_path / "run", save_every=1, keep=1)
    assert first.save(1, data_position=1, **args)
    first.wait_until_finished()
    with ResumeManager(tmp_path / "run", save_every=1, keep=1) as second:  # e.g. the job started twice
        assert second.restore(**args).step == 1  # reading is fine
        with pytest.raises(CheckpointError, match=r"/run' is being written by this process \(another thread, "
                                                  r"or a ResumeManager not closed yet\)"):
            second.save(2, data_position=2, **args)
    first.close()
    with ResumeManager(tmp_path / "run", save_every=1, keep=1) as third:
        assert third.save(2, data_position=2, **args)
    assert ResumeManager(tmp_path / "run").all_steps() == [2]


def test_restore_while_another_thread_overwrites(rng, tmp_path):
    trees = [_tree(rng), _tree(rng)]
    qjax.checkpoint.save(tmp_path / "c", trees[0])
    stop = threading.Event()

    def overwrite():
        i = 0
        while not stop.is_set():
            i += 1
            qjax.checkpoint.save(tmp_path / "c", trees[i % 2], force=True)
    t = threading.Thread(target=overwrite)
    t.start()
    try:
        seen = [_bits(qjax.checkpoint.restore(tmp_path / "c")) for _ in range(12)]
    finally:
        stop.set()
        t.join(120)
    assert all(s in (_bits(trees[0]), _bits(trees[1])) for s in seen)


# ----------------------------------------------------------------------------- 4. damaged files


def _files(root, part):
    return sorted((os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if part in os.path.join(r, f)),
                  key=os.path.getsize)


def _delete(f):
    os.remove(f)


def _truncate(f):
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 3)


@pytest.mark.parametrize("part, damage, match", [
    ("ocdbt.process_0/d/", _delete, r"file 'ocdbt.process_0/d/[0-9a-f]+' is missing"),
    ("ocdbt.process_0/d/", _truncate, r"file 'ocdbt.process_0/d/[0-9a-f]+' is truncated: \d+ bytes, \d+ when saved"),
    ("_METADATA", _truncate, r"file '_METADATA' is truncated: \d+ bytes"),
    ("manifest.ocdbt", _delete, r"file '(ocdbt.process_0/)?manifest.ocdbt' is missing"),
], ids=["data_deleted", "data_truncated", "METADATA_truncated", "manifest_deleted"])
@pytest.mark.parametrize("with_target", [True, False])
def test_damaged_file_is_named(rng, tmp_path, part, damage, match, with_target):
    tree = _tree(rng, shape=(64, 32))
    qjax.checkpoint.save(tmp_path / "c", tree)
    damage(_files(tmp_path / "c", part)[-1])
    with pytest.raises(CheckpointError, match="damaged or incomplete: " + match):
        qjax.checkpoint.restore(tmp_path / "c", tree if with_target else None)


@pytest.mark.parametrize("part, damage, match", [
    ("_METADATA", _truncate, r"orbax tree metadata file .*_METADATA' is damaged"),
    ("manifest.ocdbt", _delete, r"file 'manifest.ocdbt' is missing"),
], ids=["METADATA_truncated", "manifest_deleted"])
def test_damaged_resume_step_is_named(rng, tmp_path, part, damage, match):
    """Orbax-written steps have no _QJAX_FILES: _METADATA and the OCDBT manifests are still checked."""
    args = _resume_args(rng)
    with ResumeManager(tmp_path, save_every=1) as mgr:
        mgr.save(1, **args)
    damage([f for f in _files(tmp_path / "1", part) if "ocdbt.process" not in f][-1])
    with ResumeManager(tmp_path) as mgr:
        with pytest.raises(CheckpointError, match=match):
            mgr.restore(**args)


# ----------------------------------------------------------------------------- 5. non-finite values


def test_save_adapters_refuses_nonfinite(rng, tmp_path):
    cfg = qjax.LoraConfig(r=4)
    good = _adapters(rng)
    qjax.checkpoint.save_adapters(tmp_path / "ad", good, cfg)
    bad = jax.tree.map(lambda x: x, good)
    b = np.array(bad["params"]["layers_1"]["q_proj"]["lora_b"])
    b[0, :3] = [np.nan, np.inf, np.nan]
    bad["params"]["layers_1"]["q_proj"]["lora_b"] = jnp.asarray(b)
    with pytest.raises(ValueError, match=r"'params/layers_1/q_proj/lora_b' \(shape=\(4, 16\) dtype=float32\) "
                                         r"has 3 non-finite value\(s\) \(NaN or inf\) of 64.*allow_nonfinite=True"):
        qjax.checkpoint.save_adapters(tmp_path / "ad", bad, cfg, force=True)
    assert_same(qjax.checkpoint.restore(tmp_path / "ad"), good)
    qjax.checkpoint.save_adapters(tmp_path / "ad", bad, cfg, force=True, allow_nonfinite=True)
    saved = qjax.checkpoint.restore(tmp_path / "ad")["params"]["layers_1"]["q_proj"]["lora_b"]
    assert np.isnan(np.asarray(saved)).sum() == 2 and np.isinf(np.asarray(saved)).sum() == 1


def test_resume_refuses_nonfinite_adapters_and_optimizer_state(rng, tmp_path):
    args = _resume_args(rng)
    nan_mu = dict(args, opt_state={"mu": args["opt_state"]["mu"].at[1].set(jnp.inf)})
    with ResumeManager(tmp_path, save_every=1, keep=1) as mgr:
        mgr.save(1, data_position=1, **args)
        with pytest.raises(ValueError, match=r"step 2.*'opt_state/mu' \(shape=\(8,\) dtype=float32\) has 1 "
                                             r"non-finite value\(s\)"):
            mgr.save(2, data_position=2, **nan_mu)
        assert mgr.all_steps() == [1]  # keep=1 did not delete the good step for a bad one
        assert mgr.save(3, data_position=3, allow_nonfinite=True, **nan_mu)
        assert mgr.all_steps() == [3]


# ----------------------------------------------------------------------------- paths


def test_force_never_replaces_a_file_or_a_directory_of_other_files(rng, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"/notes.txt' exists and is not a directory"):
        qjax.checkpoint.save(tmp_path / "notes.txt", _tree(rng), force=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text("keep me too")
    with pytest.raises(CheckpointError, match=r"/run' holds files that are not a checkpoint \(e.g. \['log.txt'\]\)"):
        qjax.checkpoint.save(tmp_path / "run", _tree(rng), force=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "run" / "log.txt").read_text() == "keep me too"
    with pytest.raises(CheckpointError, match=r"/notes.txt' is a file, not a checkpoint directory"):
        qjax.checkpoint.restore(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match=r"a parent of it is a file"):
        qjax.checkpoint.save(tmp_path / "notes.txt" / "c", _tree(rng))
    with pytest.raises(CheckpointError, match=r"ResumeManager directory '.*/notes.txt' is a file"):
        ResumeManager(tmp_path / "notes.txt")


def test_relative_nested_and_symlinked_paths(rng, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = _tree(rng), _tree(rng)
    qjax.checkpoint.save("new/parent/c/", a)  # parents created, trailing slash
    assert_same(qjax.checkpoint.restore(tmp_path / "new" / "parent" / "c"), a)
    os.symlink(tmp_path / "new" / "parent" / "c", tmp_path / "link")
    qjax.checkpoint.save("link", b, force=True)  # replaces what the link points to, keeps the link
    assert os.path.islink(tmp_path / "link")
    assert_same(qjax.checkpoint.restore("link"), b)
    assert_same(qjax.checkpoint.restore("new/parent/c"), b)
