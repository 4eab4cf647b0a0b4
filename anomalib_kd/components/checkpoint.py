"""A checkpoint callback that makes an ``anomalib train`` run resumable after SIGTERM or SIGKILL.

anomalib's default :class:`~anomalib.callbacks.ModelCheckpoint` writes ``weights/lightning/model.ckpt`` once
an epoch, and its Engine turns ``--ckpt_path last`` into the file ``./last`` (``Path(...).resolve()``), so
Lightning's ``"last"`` lookup never runs; every run also writes to a new version folder (``v0``, ``v1``, ...).
:class:`ResumableCheckpoint` keeps anomalib's file (same folder, same name) and adds what resuming needs:

* a save every ``every_n_train_steps`` optimizer steps as well as at every epoch end (so ``model.ckpt`` is
  always the latest state, and the final state at the end);
* each save written to a temporary file in the same folder, flushed to disk, then renamed over
  ``model.ckpt`` (``os.replace``): a kill at any moment leaves the old or the new complete file. Lightning's
  own save renames from ``$TMPDIR``, which is a copy (not atomic) when ``$TMPDIR`` is another file system,
  e.g. a tmpfs ``/tmp``;
* a save on SIGTERM (Lightning finishes the current step, then stops with ``SIGTERMException``), and exit
  status 143 then (Lightning's is 0, as if the run had finished);
* on resume, the checkpoint resumed from is copied into the new version folder at once, so
  ``latest/weights/lightning/model.ckpt`` always exists (a run killed before its first save is resumable too);
* after a resumed fit, ``anomalib train``'s test step restores the ``--ckpt_path`` checkpoint (the state the
  run resumed from); the callback puts the weights the fit ended with back before testing.

Resume: the same ``anomalib train`` command (same ``--trainer.callbacks``) plus
``--ckpt_path <root>/<Model>/<Data>/<category>/latest/weights/lightning/model.ckpt`` (anomalib resolves
``latest`` before it makes the new version folder).
"""

from __future__ import annotations

import os
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
from anomalib.callbacks import ModelCheckpoint
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["ResumableCheckpoint", "replace_atomically"]

_PARTIAL_SUFFIX = ".partial"


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder entry) to disk; folders cannot be opened on Windows."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_atomically(partial: str | Path, target: str | Path) -> None:
    """Move the complete file ``partial`` over ``target`` in one step (same folder: ``os.replace`` is atomic).

    The data are flushed first, so after a crash ``target`` holds the old or the new bytes, never a mix.
    """
    partial, target = Path(partial), Path(target)
    _fsync(partial)
    os.replace(partial, target)
    _fsync(target.parent)


class ResumableCheckpoint(ModelCheckpoint):
    """anomalib's ``weights/lightning/model.ckpt``, saved atomically every ``every_n_train_steps`` steps,
    at every epoch end and on SIGTERM, so an interrupted run resumes from its last step.

    Args:
        dirpath: folder of the checkpoint. Default: ``<run>/weights/lightning``, as anomalib's own callback.
        filename: checkpoint name without ``.ckpt`` (anomalib's ``model``).
        every_n_train_steps: optimizer steps between saves (Lightning's ``global_step``: URD counts two a
            training iteration, teacher and student, so use an even number for URD).
        save_on_sigterm: save the state of the last finished step when the process gets SIGTERM.
        save_last, verbose: as Lightning's ``ModelCheckpoint`` (``save_last=True`` adds a ``last.ckpt``, for
            ``Trainer.fit(ckpt_path="last")`` outside anomalib's Engine). The file name is never versioned:
            ``model.ckpt`` is overwritten, as anomalib's.

    Example:
        ``anomalib train --model anomalib_kd.URD --data ... --trainer.callbacks+=ResumableCheckpoint
        --trainer.callbacks.every_n_train_steps=100`` (class path
        ``anomalib_kd.components.checkpoint.ResumableCheckpoint``).
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str = "model",
        every_n_train_steps: int = 100,
        save_on_sigterm: bool = True,
        save_last: bool | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            every_n_train_steps=every_n_train_steps,
            save_on_exception=save_on_sigterm,
            save_last=save_last,
            verbose=verbose,
            auto_insert_metric_name=False,
            enable_version_counter=False,  # one model.ckpt, overwritten, as anomalib's
        )
        # Lightning refuses step and epoch triggers together; an epoch-end save as well keeps the final state
        # (and anomalib's once-an-epoch file) when the last step is not a multiple of every_n_train_steps.
        self._every_n_epochs = 1
        self._resumed_from: str | None = None
        self._fitted_state: dict[str, torch.Tensor] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Default folder: anomalib's ``<run>/weights/lightning`` (the Engine's versioned run folder)."""
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "weights" / "lightning")
        super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        """Write to ``<name>.partial`` beside the target, then rename it over the target (rank 0)."""
        if not _is_local_file_protocol(filepath):  # object stores: a whole-object upload is already atomic
            super()._save_checkpoint(trainer, filepath)
            return
        partial = f"{filepath}{_PARTIAL_SUFFIX}"
        trainer.save_checkpoint(partial, self.save_weights_only)  # hooks, strategy and CheckpointIO as usual
        if trainer.is_global_zero:
            replace_atomically(partial, filepath)
        trainer.strategy.barrier("ResumableCheckpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        """Lightning's step-triggered save. With manual optimisation (URD) Lightning warns at each save that
        the state is the one after the optimizer steps: the state a resume needs, so it is silenced."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validation fits the post-processor's thresholds and normalisation: the epoch-end save must run even
        when a step-triggered save already wrote this step (before validation), or the file keeps old ones."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._last_global_step_saved = -1
        super().on_validation_end(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """On SIGTERM: save, and make the process exit with status 143 (128 + SIGTERM), not Lightning's 0,
        so a script or scheduler running ``anomalib train`` sees the run as interrupted, not finished.

        Only SIGTERM saves: Lightning raises it between steps, so the state is consistent (another exception,
        Ctrl-C included, can stop a step half-done, e.g. URD's teacher updated and its student not).
        """
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn == "fit":
            super().on_exception(trainer, pl_module, exception)
        exception.code = 128 + signal.SIGTERM

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resumed run: copy the checkpoint resumed from into this run's folder (``latest`` then points at a
        resumable file before the first save)."""
        super().on_fit_start(trainer, pl_module)
        self._resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else None
        self._fitted_state = None
        if self._resumed_from is None or not _is_local_file_protocol(self._resumed_from):
            return
        target = Path(self.format_checkpoint_name({}))
        source = Path(self._resumed_from)
        if trainer.is_global_zero and source.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(f"{target}{_PARTIAL_SUFFIX}")
            shutil.copyfile(source, partial)
            replace_atomically(partial, target)
        trainer.strategy.barrier("ResumableCheckpoint.copy")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the fitted weights of a resumed run for the test that ``anomalib train`` runs next."""
        super().on_fit_end(trainer, pl_module)
        if self._resumed_from is not None:
            self._fitted_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``Engine.train(ckpt_path=X)`` tests with ``ckpt_path=X``, which restores the state the run resumed
        from: put the fitted weights back, so the test scores the model the run trained."""
        super().on_test_start(trainer, pl_module)
        if self._fitted_state is not None and str(trainer.ckpt_path) == self._resumed_from:
            pl_module.load_state_dict(self._fitted_state)
        self._fitted_state = None
