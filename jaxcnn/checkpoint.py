"""Checkpoints with orbax: save every N steps and at the end, keep the last K, resume.

A checkpoint holds the whole train state (step, params, batch_stats, opt_state, ema_params,
rng). The data order is a function of (seed, epoch) and the per-step randomness is folded
from (rng, step), so restoring the state is enough for a resumed run to continue exactly
where the interrupted one stopped.

Orbax writes each step to a temporary directory and renames it when complete, so a run
killed mid-save never leaves a half-written checkpoint in place of a good one.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager for one pytree (the train state)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, keep), create=True, enable_async_checkpointing=async_save)
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

  def restore(self, template, step: int | None = None):
    """Restores into the structure, shapes, dtypes and shardings of `template`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

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


class StopSignal:
  """Turns SIGTERM (preemption) into a flag that the training loop polls.

  The loop then saves a checkpoint and exits with status 0, so a scheduler that kills and
  restarts the job loses no work. The previous handler is restored by `restore()`.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.received = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __bool__(self) -> bool:
    return self.received is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
