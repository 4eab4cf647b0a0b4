"""Interrupt ``anomalib train`` (SIGKILL, SIGTERM) and resume it with ``ResumableCheckpoint``.

The two end-to-end tests run the stock ``anomalib`` command in a subprocess, as a user would, on tiny
generated data, kill it mid-epoch, resume it with ``--ckpt_path <run>/latest/weights/lightning/model.ckpt``
and check that the resumed run starts from the checkpoint's step with the checkpoint's optimizer and
learning-rate scheduler states (recorded inside the process by ``tests.resume_probe.ResumeProbe``), that it
finishes at the planned step, that its test scores the fitted weights and that its final checkpoint loads.
The other two kill or break a save half-way and check the checkpoint on disk stays whole.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_kd.components.checkpoint import ResumableCheckpoint, replace_atomically

from .helpers import console_script
from .resume_probe import fingerprint

REPO = Path(__file__).resolve().parents[1]
CALLBACK = "anomalib_kd.components.checkpoint.ResumableCheckpoint"
NUM_TRAIN = 24
SIZE = 64


def _data_args(root: Path, batch_size: int) -> list[str]:
    return [
        "--data", "anomalib_kd.data.Textures", f"--data.root={root}", "--data.category=brick",
        f"--data.image_size={SIZE}", f"--data.num_train={NUM_TRAIN}", "--data.num_test_good=2",
        "--data.num_test_defect=2", f"--data.train_batch_size={batch_size}", "--data.eval_batch_size=4",
        "--data.num_workers=0",
    ]  # fmt: skip


def _start(args: list[str], workdir: Path, probe: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RESUME_PROBE_DIR": str(probe), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with log.open("w") as out:
        return subprocess.Popen(
            [console_script(), "train", *args, f"--default_root_dir={workdir}", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", "--trainer.callbacks+=tests.resume_probe.ResumeProbe"],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _wait(condition: object, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert process.poll() is None, (
            f"training exited early ({process.returncode}):\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _progress(probe: Path) -> int:
    try:
        return int((probe / "progress").read_text() or -1)
    except (FileNotFoundError, ValueError):
        return -1


def _assert_same(actual: object, expected: object, where: str) -> None:
    """Nested dicts/lists of tensors and numbers are exactly equal."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where  # type: ignore[arg-type]
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):  # type: ignore[call-overload]
            _assert_same(a, e, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where  # type: ignore[arg-type]
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _interrupt_and_resume(
    tmp_path: Path,
    model_args: list[str],
    batch_size: int,
    every_n_train_steps: int,
    kill: signal.Signals,
    final_step: int,
    model_class: type,
) -> dict[str, object]:
    """Train, kill with ``kill`` mid-epoch once a checkpoint exists, resume, check; returns the evidence."""
    root, workdir = tmp_path / "data", tmp_path / "runs"
    workdir.mkdir()
    callback = [
        f"--trainer.callbacks+={CALLBACK}",
        f"--trainer.callbacks.every_n_train_steps={every_n_train_steps}",
    ]
    args = [*model_args, *_data_args(root, batch_size), *callback]
    first_probe, log = tmp_path / "probe0", tmp_path / "train0.log"
    process = _start(args, workdir, first_probe, log)
    run0 = (
        workdir / model_class.__name__ / "Textures" / "brick" / "v0" / "weights" / "lightning" / "model.ckpt"
    )
    try:
        if kill == signal.SIGKILL:
            # kill between two periodic saves, after the first one
            _wait(run0.exists, process, log)
            between_saves = lambda: (step := _progress(first_probe)) > 0 and step % every_n_train_steps != 0  # noqa: E731
            _wait(between_saves, process, log)
        else:  # SIGTERM before any periodic save (every_n_train_steps is larger): the SIGTERM save is the one
            _wait(lambda: _progress(first_probe) >= 3, process, log)
            assert not run0.exists()
        killed_after = _progress(first_probe)
        process.send_signal(kill)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    # SIGKILL: -9; SIGTERM: 143, set by the callback (Lightning's own exit status after SIGTERM is 0)
    assert process.returncode == (-kill if kill == signal.SIGKILL else 128 + kill), process.returncode
    assert not (first_probe / "test.pt").exists(), "the run finished before it was interrupted"
    saved = torch.load(run0, map_location="cpu", weights_only=False)
    saved_step = saved["global_step"]
    if kill == signal.SIGTERM:  # saved on SIGTERM, at the step Lightning finished after the signal
        assert saved_step >= killed_after >= 3, (saved_step, killed_after)
    else:
        # the last step the killed process finished (a step may have ended between reading and killing)
        stopped_at = _progress(first_probe)
        assert 0 < saved_step <= stopped_at, (saved_step, killed_after, stopped_at)
    assert saved_step < final_step, "killed too late to test a resume"

    latest = run0.parents[3] / "latest" / "weights" / "lightning" / "model.ckpt"
    resume_probe, resume_log = tmp_path / "probe1", tmp_path / "train1.log"
    process = _start([*args, f"--ckpt_path={latest}"], workdir, resume_probe, resume_log)
    try:
        assert process.wait(timeout=300) == 0, resume_log.read_text()[-5000:]
    finally:
        if process.poll() is None:
            process.kill()

    start = torch.load(resume_probe / "start.pt", weights_only=False)
    assert start["global_step"] == saved_step
    _assert_same(start["optimizer_states"], saved["optimizer_states"], "optimizer_states")
    _assert_same(start["lr_schedulers"], saved.get("lr_schedulers", []), "lr_schedulers")
    assert any(state["state"] for state in start["optimizer_states"]), (
        "restored optimizers hold no Adam state"
    )

    final = run0.parents[3] / "v1" / "weights" / "lightning" / "model.ckpt"
    final_state = torch.load(final, map_location="cpu", weights_only=False)
    assert final_state["global_step"] == final_step
    assert not list(final.parent.glob("*.partial")), "a partial checkpoint was left behind"
    # anomalib train tests with --ckpt_path (the resumed-from state): the callback puts the fitted state back
    tested = torch.load(resume_probe / "test.pt", weights_only=False)
    assert tested == fingerprint(final_state["state_dict"]) != fingerprint(saved["state_dict"])
    model = model_class.load_from_checkpoint(final, map_location="cpu")
    assert sum(p.numel() for p in model.parameters()) > 0
    return {"saved_step": saved_step, "killed_after": killed_after, "start": start, "final_step": final_step}


def _first_adam_step(optimizer_state: dict) -> float:
    return float(next(iter(optimizer_state["state"].values()))["step"])


@pytest.mark.slow
@pytest.mark.heavy  # two anomalib CLI runs with 270 MB checkpoints: minutes on a 2-core CPU
def test_urd_resumes_after_sigkill(tmp_path: Path) -> None:
    """URD (two manually stepped Adams, two Lightning steps an iteration), SIGKILL between two saves."""
    from anomalib_kd.models.urd import URD

    iterations = 8  # 4 images a batch: 6 iterations (12 Lightning steps) an epoch; ends after epoch 2
    model_args = ["--model", "anomalib_kd.URD", "--model.backbone=resnet18", "--model.pre_trained=false",
                  f"--model.iterations={iterations}", "--model.foreground_mask=null"]  # fmt: skip
    evidence = _interrupt_and_resume(tmp_path, model_args, 4, 8, signal.SIGKILL, 2 * 6 * 2, URD)
    teacher, student = evidence["start"]["optimizer_states"]
    # each optimizer made one step an iteration: Adam's step counter equals the iteration count at resume
    assert _first_adam_step(teacher) == _first_adam_step(student) == evidence["saved_step"] // 2
    print("URD resume evidence:", {k: v for k, v in evidence.items() if k != "start"},
          "adam steps", _first_adam_step(teacher), _first_adam_step(student))  # fmt: skip


@pytest.mark.slow
@pytest.mark.heavy  # two anomalib CLI runs: minutes on a 2-core CPU
def test_dhkd_resumes_after_sigterm(tmp_path: Path) -> None:
    """DHKD (Adam, per-step StepLR) stopped by SIGTERM: Lightning ends the step, the callback saves it."""
    from anomalib_kd.models.dhkd import DHKD

    steps = 22  # one epoch: 24 images minus the seeded 10 % quantile hold-out (2), batches of 1
    model_args = ["--model", "anomalib_kd.DHKD", "--model.pre_trained=false", f"--model.image_size={SIZE}",
                  "--trainer.max_epochs=1", "--model.lr_step_fraction=0.25"]  # fmt: skip
    evidence = _interrupt_and_resume(tmp_path, model_args, 1, 1000, signal.SIGTERM, steps, DHKD)
    (scheduler,) = evidence["start"]["lr_schedulers"]
    (optimizer,) = evidence["start"]["optimizer_states"]
    assert scheduler["last_epoch"] == evidence["saved_step"] == _first_adam_step(optimizer)
    evidence.pop("start")
    print("DHKD resume evidence:", evidence, "scheduler", scheduler, "lr", optimizer["param_groups"][0]["lr"])


def test_checkpoint_replace_is_atomic(tmp_path: Path) -> None:
    """A save that dies half-way leaves the previous checkpoint whole; a finished one replaces it at once."""
    target = tmp_path / "model.ckpt"
    torch.save({"global_step": 1}, target)

    class DyingTrainer:
        """Writes half a checkpoint to the path it is given, then dies (as SIGKILL would, mid-write)."""

        is_global_zero = True

        def save_checkpoint(self, filepath: str, weights_only: bool = False) -> None:
            del weights_only
            buffer = torch.serialization.io.BytesIO()
            torch.save({"global_step": 2, "weights": torch.zeros(1000)}, buffer)
            Path(filepath).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ResumableCheckpoint(dirpath=tmp_path)._save_checkpoint(DyingTrainer(), str(target))  # type: ignore[arg-type]
    assert torch.load(target, weights_only=False) == {"global_step": 1}

    partial = tmp_path / "model.ckpt.partial"
    torch.save({"global_step": 3}, partial)
    replace_atomically(partial, target)
    assert torch.load(target, weights_only=False) == {"global_step": 3} and not partial.exists()


_SAVE_LOOP = """
import sys, torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from anomalib_kd.components.checkpoint import ResumableCheckpoint

class Trainer:  # what ResumableCheckpoint._save_checkpoint uses of a trainer; Lightning's real CheckpointIO
    is_global_zero, loggers, global_step = True, [], 0
    class strategy:
        @staticmethod
        def barrier(name=None):
            pass
    def save_checkpoint(self, filepath, weights_only=False):
        TorchCheckpointIO().save_checkpoint({"global_step": self.global_step, "w": self.weights}, filepath)

trainer, callback = Trainer(), ResumableCheckpoint(dirpath=sys.argv[1])
trainer.weights = torch.randn(40_000_000)  # 160 MB: a save takes long enough to be killed in the middle
while True:
    trainer.global_step += 1
    callback._save_checkpoint(trainer, sys.argv[1] + "/model.ckpt")
"""


@pytest.mark.heavy  # three kill-and-check rounds, ~25-60 s: run by `.ci/run` after the README's command
def test_sigkill_during_a_save_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    """SIGKILL while a checkpoint is being written (Lightning's temporary file in $TMPDIR exists): the file
    on disk is the previous or the new complete checkpoint. $TMPDIR is a tmpfs (/dev/shm) where there is one,
    so Lightning's own move from $TMPDIR is a copy onto the target, which a kill can cut short."""
    shm = Path("/dev/shm")
    scratch = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path))
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    target, steps = tmp_path / "model.ckpt", []
    try:
        for attempt in range(3):
            process = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(tmp_path)], env=env)
            try:
                log = tmp_path / "none.log"
                log.touch()
                _wait(target.exists, process, log)
                _wait(lambda: any(scratch.iterdir()), process, log)  # the next save has begun
                time.sleep(0.05 * attempt)
                process.kill()
                process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
            saved = torch.load(target, weights_only=False)  # a cut-short file raises here
            assert saved["w"].numel() == 40_000_000
            steps.append(saved["global_step"])
            for leftover in scratch.iterdir():  # Lightning's temporary file of the killed save
                leftover.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("steps on disk after each SIGKILL:", steps)


class _SigtermAt(Callback):
    """Sends this process SIGTERM after optimizer step ``step`` (as a scheduler or ``kill`` would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class _StateAtStart(Callback):
    """Keeps global step, optimizer and scheduler states as the (resumed) training starts, whether the run's
    own folder already holds a checkpoint then, and a fingerprint of the weights its test step scores."""

    state: dict | None = None

    def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
        # the first batch: after every on_train_start hook (callbacks' and the model's), before any update
        if self.state is not None:
            return
        own = Path(trainer.default_root_dir) / "weights" / "lightning" / "model.ckpt"
        self.state = {
            "global_step": trainer.global_step,
            "optimizer_states": copy.deepcopy([o.state_dict() for o in trainer.optimizers]),
            "lr_schedulers": copy.deepcopy([c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]),
            "own_checkpoint_step": torch.load(own, weights_only=False)["global_step"]
            if own.exists()
            else None,
        }

    def on_test_epoch_start(self, trainer: Trainer, module: LightningModule) -> None:
        self.tested = fingerprint(module.state_dict())


def test_pdd_resumes_after_sigterm_in_process(tmp_path: Path) -> None:
    """PDD (Adam, cosine schedule stepped per step) through anomalib's Engine: SIGTERM after step 3 saves
    step 3, exit status 143; ``train(ckpt_path=latest/...)`` starts at step 3 with the saved Adam and cosine
    and tests the weights it fitted."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    from anomalib_kd.models.pdd import PDD

    from .models.test_anomalib_sequence import CATEGORY, SIZE, _write_mvtec

    root = _write_mvtec(tmp_path / "data")

    def train(callbacks: list[Callback], ckpt_path: Path | None = None) -> None:
        model = PDD(
            pre_trained=False, backbone="resnet18", vmamba_depths=(1, 1, 1, 1), vmamba_dims=(8, 16, 32, 64),
            lr_t_max=None, pre_processor=PDD.configure_pre_processor((SIZE, SIZE)),
        )  # fmt: skip
        datamodule = MVTecAD(
            root=root, category=CATEGORY, train_batch_size=1, eval_batch_size=4, num_workers=0
        )
        engine = Engine(
            max_steps=6, default_root_dir=tmp_path / "runs", logger=False, enable_progress_bar=False,
            accelerator="cpu", devices=1, callbacks=[ResumableCheckpoint(), *callbacks],
        )  # fmt: skip
        engine.train(model, datamodule=datamodule, ckpt_path=ckpt_path)  # fit, then test

    with pytest.raises(SystemExit) as stopped:
        train([_SigtermAt(3)])
    assert stopped.value.code == 128 + signal.SIGTERM
    weights = tmp_path / "runs" / "PDD" / "MVTecAD" / CATEGORY
    saved = torch.load(weights / "v0/weights/lightning/model.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3  # mid-epoch (4 batches of 1 an epoch), saved on SIGTERM

    start = _StateAtStart()
    train([start], ckpt_path=weights / "latest/weights/lightning/model.ckpt")
    assert start.state["global_step"] == 3
    assert start.state["own_checkpoint_step"] == 3, "the resumed run's folder (latest) holds no checkpoint"
    _assert_same(start.state["optimizer_states"], saved["optimizer_states"], "optimizer_states")
    _assert_same(start.state["lr_schedulers"], saved["lr_schedulers"], "lr_schedulers")
    assert (
        start.state["lr_schedulers"][0]["last_epoch"] == 3 and start.state["lr_schedulers"][0]["T_max"] == 6
    )
    assert _first_adam_step(start.state["optimizer_states"][0]) == 3
    final = torch.load(weights / "v1/weights/lightning/model.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 6 and final["lr_schedulers"][0]["last_epoch"] == 6
    # anomalib's train tests with ckpt_path (the step-3 state): the callback has the fitted weights tested
    assert start.tested == fingerprint(final["state_dict"]) != fingerprint(saved["state_dict"])
    PDD.load_from_checkpoint(weights / "v1/weights/lightning/model.ckpt", map_location="cpu")
