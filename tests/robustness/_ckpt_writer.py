"""Kill-test writer: replaces a checkpoint with a larger one and can stall at a named phase.

    python _ckpt_writer.py MODE PATH SEED PHASE [fallback]

MODE: "save" (qjax.checkpoint.save, force=True), "adapters" (save_adapters, force=True) or
"resume" (ResumeManager, keep=1: step 2 after step 1). The parent wrote the old checkpoint with
`write(MODE, PATH, SEED, 0)`; this process writes version 1 and prints "START" before and "DONE"
after. PHASE "none" runs straight through (the parent kills after a random delay); otherwise the
process prints "PHASE <name>" and stalls there so the parent can SIGKILL it at a known point:
  written   every array written, the save not yet complete (save/adapters: before _QJAX_FILES;
            resume: before orbax renames the step directory into place)
  swap      save/adapters: the new checkpoint is complete, the swap has not started
  between   save/adapters with "fallback" (no renameat2): the old checkpoint moved aside, the new
            one not yet in place
  delete    the old checkpoint (resume: step 1) half deleted, the new one in place
"""

import os
import shutil
import sys
import time

import numpy as np

R_OLD, R_NEW, D = 8, 512, 2048  # the new checkpoint: 3 modules x (2048x512 + 512x2048) float32 = 24 MiB


def adapters(seed: int, version: int) -> dict:
    """{"layers_{i}": {"lora_a": (D, r), "lora_b": (r, D)}} float32; version 1 is tens of MB."""
    rng = np.random.default_rng([seed, version])
    r = R_NEW if version == 1 else R_OLD
    return {f"layers_{i}": {"lora_a": rng.standard_normal((D, r), np.float32),
                            "lora_b": rng.standard_normal((r, D), np.float32)} for i in range(3)}


def resume_state(seed: int, version: int) -> dict:
    """What ResumeManager saves as step version + 1: same shapes for both steps, other values."""
    rng = np.random.default_rng([seed, version, 7])
    return {"adapters": {f"layers_{i}": {"lora_a": rng.standard_normal((D, 256), np.float32),
                                         "lora_b": rng.standard_normal((256, D), np.float32)} for i in range(3)},
            "opt_state": {"mu": rng.standard_normal((4096,), np.float32)}, "data_position": {"index": version}}


def write(mode: str, path: str, seed: int, version: int) -> None:
    import qjax
    from qjax.checkpoint import ResumeManager
    if mode == "save":
        qjax.checkpoint.save(path, adapters(seed, version), force=True)
    elif mode == "adapters":
        cfg = qjax.LoraConfig(r=R_NEW if version == 1 else R_OLD)
        qjax.checkpoint.save_adapters(path, {"params": adapters(seed, version)}, cfg, force=True)
    else:
        st = resume_state(seed, version)
        with ResumeManager(path, save_every=1, keep=1) as mgr:
            mgr.save(version + 1, adapters=st["adapters"], opt_state=st["opt_state"],
                     data_position=st["data_position"])


def _stall(name: str) -> None:
    print("PHASE", name, flush=True)
    time.sleep(120)


def _half_delete(d: str) -> None:
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)
    for f in files[: len(files) // 2]:
        os.remove(f)


def _install(mode: str, phase: str, fallback: bool) -> None:
    from qjax._src.io import files as files
    if fallback:
        files.renameat2 = lambda src, dst, flags: False
    if mode == "resume":
        import orbax.checkpoint as ocp
        from orbax.checkpoint._src.path import atomicity
        if phase == "written":
            async def finalize(self, *args, **kwargs):
                _stall("written")
            for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
                cls.finalize = finalize
        elif phase == "delete":
            def delete(self, step):
                _half_delete(os.path.join(str(self.directory), str(step)))
                _stall("delete")
            ocp.CheckpointManager.delete = delete
        return
    if phase == "written":
        files.finish = lambda d: _stall("written")
    elif phase == "swap":
        swap = files.swap_in
        files.swap_in = lambda new, path: (_stall("swap"), swap(new, path))
    elif phase == "between":
        rename = os.rename

        def hooked(src, dst):
            rename(src, dst)
            if files.OLD_MARK in os.fspath(dst):
                _stall("between")
        os.rename = hooked
    elif phase == "delete":
        rmtree = shutil.rmtree

        def hooked_rmtree(d, *args, **kwargs):
            if files.TRASH_MARK in os.fspath(d):
                _half_delete(d)
                _stall("delete")
            rmtree(d, *args, **kwargs)
        shutil.rmtree = hooked_rmtree


if __name__ == "__main__":
    mode, path, seed, phase = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    _install(mode, phase, fallback=sys.argv[5:] == ["fallback"])
    print("START", flush=True)
    write(mode, path, seed, 1)
    print("DONE", flush=True)
