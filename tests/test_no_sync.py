"""The training hot loop reads nothing back from the device between flush points.

A read of a device value (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, an op whose output
size depends on the values: ``nonzero``, ``unique``, boolean-mask indexing ...) makes the host wait
for the GPU, so the loop can no longer run ahead of it. There is no GPU here, so the reads are
counted on the CPU: ``SyncCounter`` records the aten ops that would force such a read on CUDA and
the Python-level reads (``tolist``, ``numpy``, ``cpu``) that dispatch no op on the CPU. Loader
fetches, the E-step, the epoch end (validation, the epoch line) and checkpoint writes are not
counted: they are not the per-batch path. What is left may read at most once per flush point
(one ``.tolist()`` every ``train.log_every`` optimiser steps and one at the end of each epoch).

Blocking host-to-device copies of values drawn on the CPU (the augmentations' random draws) also
make the host wait on CUDA; they are invisible on a CPU run, so the augmentations are run on the
``meta`` device and every copy onto it must be ``non_blocking``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pcavmae_cli.engine import config
from pcavmae_cli.engine.train import augment
from pcavmae_cli.engine.train.finetune import FineTuner
from pcavmae_cli.engine.progress import SilentReporter
from pcavmae_cli.engine.train.pretrain import Trainer
from tests.test_pretrain import TINY, corpus  # noqa: F401 - the module-scoped corpus fixture
from tests.tiny_corpus import TINY_FINETUNE, write_corpus

# ops whose result the host must read (or whose output size it must know) before going on
READ_OPS = {
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
}  # fmt: skip
PYTHON_READS = ("tolist", "numpy", "cpu")


def forces_read(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in READ_OPS:
        return True
    if name == "repeat_interleave":  # the output size is read from the repeats unless given
        return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_"):  # a boolean mask is a nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype == torch.bool for t in indices)
    return False


class SyncCounter(TorchDispatchMode):
    """Records every device read; ``paused()`` leaves the parts of a run that are not counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        super().__init__()
        self.reads: list[str] = []
        self.depth = 0
        for name in PYTHON_READS:
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, _name=name, **kwargs):
                if not self.depth:
                    self.reads.append(_name)
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.depth and forces_read(func, args, kwargs):
            self.reads.append(func.overloadpacket.__name__)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def pause(self, obj, *names: str) -> None:
        """Run methods ``names`` of ``obj`` uncounted."""
        for name in names:
            real = getattr(obj, name)

            def uncounted(*args, _real=real, **kwargs):
                with self.paused():
                    return _real(*args, **kwargs)

            setattr(obj, name, uncounted)


class UncountedLoader:
    """A loader whose fetches (decoding on the CPU, in this process) are not counted."""

    def __init__(self, loader, counter: SyncCounter):
        self.loader, self.counter = loader, counter

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        with self.counter.paused():
            batches = iter(self.loader)
        while True:
            with self.counter.paused():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


def counted_run(runner, monkeypatch: pytest.MonkeyPatch, *uncounted: str) -> list[str]:
    """``runner.run()`` under a ``SyncCounter``; the device reads of its hot loop."""
    counter = SyncCounter(monkeypatch)
    counter.pause(runner, "_save", "_end_epoch", *uncounted)
    runner.loader = UncountedLoader(runner.loader, counter)
    with counter:
        runner.run()
    return counter.reads


def flush_points(steps_per_epoch: int, epochs: int, log_every: int) -> int:
    """Step lines plus epoch ends: where the loop may read the logged losses."""
    return (steps_per_epoch * epochs) // log_every + epochs


def test_pretraining_reads_the_device_only_at_flush_points(corpus, tmp_path, monkeypatch):  # noqa: F811
    # 10 clips, batches of 2, 2 per step: 5 micro-batches and 3 steps per epoch; 2 + 1 epochs,
    # prototypes (L_PJE, L_PCPE) from epoch 1: 15 micro-batches, 9 steps, 4 step lines, 3 epoch ends.
    cfg = config.load_recipe("demo", [*TINY, f"data.train_manifest={corpus}", f"train.run_dir={tmp_path / 'run'}",
                                      "train.log_every=2"])  # fmt: skip
    trainer = Trainer(cfg, SilentReporter(), None)
    reads = counted_run(trainer, monkeypatch, "_prototypes")  # the E-step is not the hot loop
    assert trainer.state.step == 9
    assert len(reads) <= flush_points(3, 3, 2), reads


def test_fine_tuning_reads_the_device_only_at_flush_points(tmp_path, monkeypatch):
    # 12 clips, batches of 2, 2 per step: 6 micro-batches and 3 steps per epoch, 3 epochs, with
    # mixup, SpecAugment and the fbank noise.
    root = tmp_path / "corpus"
    train = write_corpus(root, 3, 4)
    cfg = config.load_recipe("finetune_demo", [
        *TINY_FINETUNE, f"data.train_manifest={train}", f"data.label_csv={root / 'labels.csv'}",
        "data.eval_manifest=null", "finetune.init_from=null", f"train.run_dir={tmp_path / 'run'}",
        "finetune.epochs=3", "finetune.mixup=0.5", "finetune.audio_noise=true", "train.log_every=2",
    ])  # fmt: skip
    tuner = FineTuner(cfg, SilentReporter(), None)
    reads = counted_run(tuner, monkeypatch)
    assert tuner.state.step == 9
    assert len(reads) <= flush_points(3, 3, 2), reads


class CopyRecorder(TorchDispatchMode):
    """Every copy between devices, and whether it was asked not to block."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_to_copy" and "device" in kwargs and kwargs["device"] != args[0].device:
            self.copies.append((f"{args[0].device}->{kwargs['device']}", bool(kwargs.get("non_blocking"))))
        elif name == "copy_" and args[0].device != args[1].device:
            self.copies.append((f"{args[1].device}->{args[0].device}", bool(args[2] if len(args) > 2 else kwargs.get("non_blocking"))))
        return func(*args, **kwargs)


def test_the_augmentations_copy_their_cpu_draws_without_blocking():
    B, T, Fq, S, C = 4, 32, 8, 16, 3
    meta = torch.device("meta")
    fbank, frames = torch.empty(B, T, Fq, device=meta), torch.empty(B, 3, S, S, device=meta)
    targets = torch.empty(B, C, device=meta)
    with CopyRecorder() as rec:
        augment.mixup(fbank, frames, targets, 0.5, 10.0)
        augment.spec_augment(fbank, 3, 8)
        augment.fbank_noise(fbank)
    assert rec.copies, "the augmentations draw on the CPU: some copy must be seen"
    assert all(non_blocking for _, non_blocking in rec.copies), rec.copies
