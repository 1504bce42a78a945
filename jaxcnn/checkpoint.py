"""Checkpoints with orbax: save every N steps and at the end, keep the last K, resume.

A checkpoint holds the whole train state (step, params, batch_stats, opt_state, ema_params,
rng). The data order is a function of (seed, epoch) and the per-step randomness is folded
from (rng, step), so restoring the state is enough for a resumed run to continue exactly
where the interrupted one stopped.

Orbax writes each step to a temporary directory and renames it when complete, so a run
killed mid-save never leaves a half-written checkpoint in place of a good one. A checkpoint
damaged later (a truncated or missing file) is moved aside as ``<step>.corrupt`` on restore,
with one line saying why, and the newest one that still reads is used instead; nothing is
deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over ocp.CheckpointManager for one pytree (the train state)."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, keep), create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state) -> None:
        """Starts saving `state` under `step` (asynchronously; see wait())."""
        if step in self.manager.all_steps():
            return  # Already saved (e.g. the periodic save coincided with the final one).
        self.manager.save(int(step), args=ocp.args.StandardSave(state), force=True)

    def restore(self, template, step: int | None = None, log=None):
        """Restores into the structure, shapes, dtypes and shardings of `template`.

        Without `step`, the newest checkpoint that reads. The newer ones that fail to read are
        then moved aside to `<step>.corrupt`, each with one line through `log` (default: stderr);
        when none reads, they all stay where they are and a ValueError says what to do. A
        checkpoint that reads but does not fit `template` (another model or optimiser) is a
        ValueError too, and stays where it is."""
        if step is not None:
            return self._restore(step, template)
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f'No checkpoint in {self.directory}.')
        damaged = []
        for s in steps:
            try:
                state = self._restore(s, template)
            except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
                _drop_closed_loop_reports()
                if self._reads(s):
                    raise ValueError(
                        f'checkpoint step {s} in {self.directory} does not fit this run\'s model or '
                        f'optimiser ({_first_line(e)}); run the config that wrote it, or use another '
                        f'--workdir'
                    ) from None
                damaged.append((s, _damage(e, os.path.join(self.directory, str(s)))))
                continue
            for bad, why in damaged:
                log(
                    f'checkpoint step {bad} does not read ({why}); moved it to '
                    f'{self._move_aside(bad)} and resumed from step {s}.'
                )
            return state
        raise ValueError(
            f'no checkpoint in {self.directory} reads ('
            + '; '.join(f'step {bad}: {why}' for bad, why in damaged)
            + '); restore the directory from a backup, or start over with another '
            '--workdir'
        )

    def _restore(self, step, template):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        with _quiet_orbax():
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def _reads(self, step) -> bool:
        """Whether checkpoint `step` reads as saved, without a template."""
        try:
            with _quiet_orbax():
                self.manager.restore(step, args=ocp.args.StandardRestore())
            return True
        except Exception:  # noqa: BLE001
            return False

    def _move_aside(self, step) -> str:
        src = os.path.join(self.directory, str(step))
        dst, n = src + '.corrupt', 1
        while os.path.exists(dst):
            dst, n = f'{src}.corrupt.{n}', n + 1
        os.rename(src, dst)
        self.manager.reload()  # its list of steps no longer holds `step`
        return dst

    def restore_arrays(self, step: int | None = None):
        """Restores a checkpoint as it was saved, without a template: nested dicts of arrays
        (dataclass fields become dict keys). For inspection and tests."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'No checkpoint in {self.directory}.')
        return self.manager.restore(step, args=ocp.args.StandardRestore())

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax and absl log every failed read at ERROR with a traceback; the caller reports it in
    one line instead."""
    loggers = [logging.getLogger(n) for n in ('absl', 'orbax', 'jax._src.distributed')]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _drop_closed_loop_reports() -> None:
    """After a failed read, tensorstore's pending callbacks reach orbax's closed event loop and
    report 'Event loop is closed' as unraisable exceptions, a traceback each: drop those."""
    previous = sys.unraisablehook
    if getattr(previous, 'drops_closed_loop', False):
        return

    def hook(unraisable):
        if not (
            isinstance(unraisable.exc_value, RuntimeError)
            and 'Event loop is closed' in str(unraisable.exc_value)
        ):
            previous(unraisable)

    hook.drops_closed_loop = True
    sys.unraisablehook = hook


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# the files a checkpoint of one item cannot be read without (orbax's OCDBT layout)
REQUIRED_FILES = ('_CHECKPOINT_METADATA', 'default/_METADATA', 'default/manifest.ocdbt')


def _damage(e: BaseException, step_dir: str) -> str:
    """What is wrong, from a failed read: a required file that is missing, else the damaged file
    where the error names one."""
    missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(step_dir, f))]
    if missing:
        return f'{os.path.join(step_dir, missing[0])} is missing'
    text = str(e)
    m = re.search(r'(?:at|file) "?(' + re.escape(step_dir) + r'[^"\s]*)"?', text)
    where = f'{m.group(1)}: ' if m else ''
    if 'does not exist' in text or 'NOT_FOUND' in text:
        return where + 'a file is missing'
    if 'reading array' in text or 'DATA_LOSS' in text or 'OUT_OF_RANGE' in text:
        return where + 'a data file is truncated or damaged'
    return where + _first_line(e)


def check_workdir(workdir: str, min_free_bytes: int = 64 << 20) -> None:
    """One line, before any work, when `workdir` cannot hold a run: an existing file, a place
    that cannot be written (read-only, no permission) or a disk with less than `min_free_bytes`
    free."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(
            f'--workdir {workdir} is an existing file, not a directory; pass the path '
            f'of a directory (it is created if missing)'
        )
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f'.jaxcnn_write_test_{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f'--workdir {workdir} cannot be written ({e.strerror or e}); pass a writable directory'
        ) from None
    free = shutil.disk_usage(workdir).free
    if free < min_free_bytes:
        raise ValueError(
            f'--workdir {workdir} is on a disk with {free / 2**20:.0f} MiB free; free '
            f'some space or pass a directory on another disk'
        )


TRAIN_TIME_FILE = 'train_seconds.json'


def record_train_seconds(workdir: str, step: int, seconds: float, enabled: bool = True) -> None:
    """Notes the run's training seconds so far at checkpoint `step`, so that a resumed run's
    results.json counts the whole run (written atomically, beside the checkpoints)."""
    if not enabled:
        return
    path = os.path.join(workdir, TRAIN_TIME_FILE)
    table = _read_json(path)
    table[str(int(step))] = float(seconds)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(table, f)
    os.replace(tmp, path)


def train_seconds(workdir: str, step: int) -> float:
    """The training seconds noted at checkpoint `step` (0 for a fresh run)."""
    return float(_read_json(os.path.join(workdir, TRAIN_TIME_FILE)).get(str(int(step)), 0.0))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class StopSignal:
    """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag that the training loop polls.

    The loop then saves a checkpoint and exits (status 0 after SIGTERM, so a scheduler that kills
    and restarts the job loses no work; 130 after Ctrl-C, the shell's convention). A second
    Ctrl-C exits at once with one line. The previous handlers are restored by `restore()`.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.received == 'SIGINT':
            print(
                'Second Ctrl-C: exiting now without waiting for the checkpoint (the previous one '
                'is intact).',
                file=sys.stderr,
                flush=True,
            )
            os._exit(130)
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print(
                '\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to exit at once).',
                file=sys.stderr,
                flush=True,
            )

    def __bool__(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
