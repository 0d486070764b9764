"""Data for pre-training: the training order, per-sample seeds, and the two loaders.

Exact resume needs every random choice of the data path to be a function of the run, not of
the process that happens to make it:

- the order of an epoch is a permutation drawn from a generator seeded with (seed, epoch);
- the random training frame of a clip is drawn from a generator seeded with
  (seed, epoch, clip index): the sampler hands the dataset ``(index, sample_seed)`` pairs
  (``AudioVisualDataset.__getitem__``), so neither the global RNG nor the worker that loads the
  clip matters, and persistent workers need no ``set_epoch`` of their dataset copy;
- a resumed epoch starts at the batch where the checkpoint stopped (``set_epoch(epoch, start)``).

So neither the worker that loads a clip nor the number of workers (from one up) changes a
result, and ``loader_workers`` caps the recipe's ``data.loader.num_workers`` at the CPUs the
process may use. With none (0: the training process loads) the losses of the demo recipe on real
media differed from those with workers at float rounding (the 7th digit, from the second step;
the same with forked workers before the fork server), for a cause not found yet.

Workers start from a fresh server process (``forkserver``), not as forks of the training
process. A fork shares the parent's pages until one side writes them; the training process
rewrites its heap every step (freed memory stays in it, ``allocator.py``), and each page it
rewrites left the old copy to the workers: forked after the model, the memory estimate and the
health pass, four workers of the paper's model held 3.5-4.4 GB each, and with the 20.8 GB of
the training process the kernel killed a 48-clip run that fits alone (21.8 GB, no workers).
The server imports this module, not the caller's ``__main__``, so a script without an
``if __name__ == "__main__"`` guard is not run again in it.

Several processes: every rank draws the same epoch order and the same global batches (the
recipe's ``data.loader.batch_size`` clips); rank r keeps its contiguous slice of each
(``distributed.split``), so the global batch, the per-clip seeds and a resume position (in
global batches) are the same at any world size.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from pcavmae_cli.engine.schema import LoaderConfig
from pcavmae_cli.engine.train.distributed import bounds
from pcavmae_cli.engine.train.runtime import Runtime
from pcavmae_cli.engine.train.threads import usable_cpus

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct (seed, epoch, index) give distinct seeds


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s training order."""
    return (seed * _MIX + epoch) % 2**63


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the random choices (the training frame) of clip ``index`` in epoch ``epoch``."""
    return (epoch_seed(seed, epoch) * _MIX + index + 1) % 2**63


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(clip index, sample seed)`` in a seeded random order per epoch.

    Args:
        n: clips in the manifest.
        batch_size: clips per batch; the last batch of an epoch may be smaller.
        seed: the recipe's seed.
        max_batches: at most this many batches per epoch (``train.max_steps_per_epoch`` times
            the accumulation steps); ``None``: all.
        weights: ``(n,)`` sampling weights (balanced sampling, ``finetune.balanced_sampling``):
            an epoch is then ``n`` clips drawn with replacement with probability proportional
            to the weights, as torch's ``WeightedRandomSampler``; ``None``: a permutation.
        rank, world_size: this process keeps its slice of every global batch.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, max_batches: int | None = None, weights: torch.Tensor | None = None,
        rank: int = 0, world_size: int = 1,
    ):  # fmt: skip
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        if weights is not None and weights.shape != (n,):
            raise ValueError(f"weights must be ({n},), got {tuple(weights.shape)}")
        self.weights = None if weights is None else weights.double()
        full = math.ceil(n / batch_size)
        self.batches_per_epoch = full if max_batches is None else min(full, max_batches)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate over epoch ``epoch`` from its batch ``start`` (a resumed epoch skips the done ones)."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> torch.Tensor:
        """The clip order of ``epoch``: a permutation of ``range(n)``, or ``n`` weighted draws."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch).tolist()
        for b in range(self.start, self.batches_per_epoch):
            first = b * self.batch_size
            chunk = order[first : first + self.batch_size]
            if self.weights is None:
                batch = [(i, sample_seed(self.seed, self.epoch, i)) for i in chunk]
            else:  # a clip may be drawn twice: seed by position, so its two visits differ
                batch = [(i, sample_seed(self.seed, self.epoch, first + j)) for j, i in enumerate(chunk)]
            start, stop = bounds(len(batch), self.world_size, self.rank)
            yield batch[start:stop]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)

    def global_size(self, b: int) -> int:
        """Clips of global batch ``b`` of an epoch (all ranks together)."""
        return max(0, min(self.batch_size, self.n - b * self.batch_size))

    def smallest_batch(self) -> int:
        """The fewest clips a global batch of an epoch holds (the last one may be short)."""
        return min(self.global_size(b) for b in range(self.batches_per_epoch))


def _ignore_ctrl_c(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C (sent to the whole terminal group) to the main process, which
    stops cleanly. SIGTERM keeps its default: it is how workers are shut down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader_workers(asked: int, environ: dict[str, str] | None = None) -> int:
    """Worker processes per loader: ``data.loader.num_workers``, at most the CPUs this process
    may use (``threads.usable_cpus``, shared among the processes torchrun started on this
    machine). More workers than CPUs only take turns on them, and each persistent worker is a
    process with memory of its own: the paper's recipes ask 8 for each of up to three loaders,
    24 processes on a 2-CPU machine, where torch warns about them too."""
    env = os.environ if environ is None else environ
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(asked, max(1, usable_cpus()[0] // local)))


def worker_context() -> multiprocessing.context.BaseContext:
    """Where loader workers start (module docstring): a fork server that preloads this module
    (``spawn`` where there is none, as on Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # torch and the dataset's code, not __main__
    return context


def _loader_kwargs(cfg: LoaderConfig, rt: Runtime) -> dict:
    workers = loader_workers(cfg.num_workers)
    return dict(
        num_workers=workers,
        multiprocessing_context=worker_context() if workers > 0 else None,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        pin_memory=rt.device.type == "cuda",
        worker_init_fn=_ignore_ctrl_c if workers > 0 else None,
        # Its own generator: making an iterator then never draws from the global RNG.
        generator=torch.Generator().manual_seed(0),
    )


def train_loader(dataset: Dataset, sampler: EpochBatchSampler, cfg: LoaderConfig, rt: Runtime) -> DataLoader:
    """The training loader over ``sampler``'s batches (call ``sampler.set_epoch`` before each epoch)."""
    return DataLoader(dataset, batch_sampler=sampler, **_loader_kwargs(cfg, rt))


def embed_loader(dataset: Dataset, cfg: LoaderConfig, rt: Runtime) -> DataLoader:
    """The loader of embedding passes (E-step, health, validation, ``pcav embed / evaluate /
    predict``): every clip once, in manifest order, so row i of the embeddings is clip i.

    A batch holds ``data.loader.batch_size`` frames rather than clips (``clips_per_batch``):
    with every frame of a clip (``eval_frames: all``, 10 frames) a batch of the training
    micro-batch's 48 clips fed 480 frames to the model at once, and fine-tuning the paper's
    model, which peaked at 20.8 GB in its training step, reached 23.7 GB in validation and was
    killed by the kernel validating its averaged weights (docs/benchmarks.md)."""
    return DataLoader(dataset, batch_size=clips_per_batch(dataset, cfg.batch_size), shuffle=False,
                      **_loader_kwargs(cfg, rt))  # fmt: skip


def clips_per_batch(dataset: Dataset, frames: int) -> int:
    """Clips whose frames make at most ``frames`` (at least one clip): ``frames`` over the
    frames each of ``dataset``'s samples feeds the model (``frames_per_clip``; one for datasets
    without it), looked up through ``Subset``s."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return max(1, frames // getattr(dataset, "frames_per_clip", 1))


def close_loader(loader: DataLoader | None) -> None:
    """Stop a loader's persistent worker processes now, rather than whenever it is collected.

    torch has no public call for this; dropping the loader's iterator is what its ``__del__`` does.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if loader is not None:
        loader._iterator = None


def balanced_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Sampling weights from label frequencies (CAV-MAE's ``gen_weight_file``): ``(N,)`` float64.

    Clip i weighs ``sum_c y_ic / count_c``: the sum, over its labels, of one over the number of
    training clips with that label. Every class then contributes the same expected number of
    draws per epoch (a multi-label clip counts for each of its classes). CAV-MAE's
    ``1000 / (count + 0.01)`` is this up to a factor, which sampling ignores. A clip without
    labels weighs 0 and is never drawn.

    Args:
        targets: ``(N, C)`` multi-hot, or ``(N,)`` class indices (single-label).
    """
    if targets.dim() == 1:
        y = torch.nn.functional.one_hot(targets.long(), num_classes).double()
    else:
        y = targets.double()
    counts = y.sum(dim=0)
    per_class = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    return y @ per_class
