"""Data parallelism inside one CPU process: each micro-batch split over threads, one model.

Pre-training (``forward``, below) and fine-tuning (``forward_rows``: the classifier's logits,
each row its own clip's) both use it.

On a 2-core CPU a matrix product split over two threads runs about 8 points further from the
peak than one thread running it alone (docs/benchmarks.md, "One thread per process"), and DDP
across one-thread processes gives that back in its all-reduce. ``Replicas`` keeps one process
and one copy of the weights: ``n`` threads of one compute thread each (or ``threads // n``) each
run the forward and backward pass of a contiguous slice of the micro-batch, and the losses are
computed once, by the caller, on the whole batch put back together:

1. ``forward``: thread t runs its own copy of the model on its rows (in slices of at most
   ``SLICE_CLIPS`` clips, one after the other in one autocast context, when it has more), a
   copy whose parameters are leaves on the model's storage (no copy of the weights, an own
   ``.grad``), its masks drawn as rows of the whole batch's from noise the threads share
   (``masking.shared_noise``), so the masks and the RNG are those of one forward pass of the
   whole batch; the slices' outputs come back as leaves concatenated into one ``PCAVMAEOutput``;
2. the caller computes the losses on it as in one thread (the contrastive losses see the whole
   batch) and back-propagates to those leaves (cheap: the losses' own graph);
3. ``backward``: thread t back-propagates its leaves' gradients through its slices' graphs into
   its own parameter leaves, where gradients also accumulate over micro-batches;
4. ``collect_grads`` (before the optimiser step): the threads' gradients are summed in thread
   order into the parameters' ``.grad``.

The sum has a fixed order and each thread computes alone, so a run is deterministic and a resumed
run equals an uninterrupted one; against one thread on the whole batch it differs by rounding
(products of other shapes, sums in another order). The autograd engine runs a CPU backward
pass on the thread that calls it, so the threads' backward passes run in parallel.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier, BrokenBarrierError

import torch
from torch import Tensor, nn

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model.masking import SharedNoise, global_batch_rows, shared_noise
from pcavmae_cli.engine.model.pcavmae import PCAVMAEOutput
from pcavmae_cli.engine.schema import TrainConfig
from pcavmae_cli.engine.train.distributed import bounds
from pcavmae_cli.engine.train.runtime import Runtime


MIN_CLIPS_PER_THREAD = 4  # below this a thread's products are too small to gain (docs/benchmarks.md)
# At most this many clips per pass of a thread: a thread with more runs its rows in slices of
# this size one after the other, whose activations stay in cache longer (pre-training's micro-batch
# of 48 on two threads: 24 clips per pass ran about 10 % slower per clip than 8 or 12).
SLICE_CLIPS = 8


def replica_count(train: TrainConfig, device: torch.device, world_size: int, threads: int, micro_batch: int) -> int:
    """How many threads split a training micro-batch: ``train.replicas``, where it applies.

    Only a CPU process running alone uses them: on GPUs, under torchrun (DDP already splits the
    batch) and with ``train.compile`` (the compiled module runs whole batches) it is one.
    ``null`` is two on exactly two compute threads when each gets at least
    ``MIN_CLIPS_PER_THREAD`` clips of the ``micro_batch``, else one: measured on 2 cores (bf16,
    the paper's model), pre-training micro-batches of 8 ran 1.05-1.21x faster in two threads and
    micro-batches of 4 0.92-0.95x as fast; fine-tuning (all tokens, no masking) 1.30x with 8 clips
    in bf16 and 1.11x in fp32, 0.98x with 4. More replicas than compute threads are not useful.
    """
    if train.replicas is not None and train.replicas < 1:
        raise UserError(f"key 'train.replicas' must be >= 1 or null, got {train.replicas}")
    if device.type != "cpu" or world_size > 1 or train.compile:
        return 1
    if train.replicas is None:
        return 2 if threads == 2 and micro_batch >= 2 * MIN_CLIPS_PER_THREAD else 1
    return min(train.replicas, threads)


def replicas_for(
    model: nn.Module, train: TrainConfig, device: torch.device, world_size: int, micro_batch: int
) -> Replicas | None:
    """The threads that split ``model``'s micro-batches (``replica_count`` on this process's
    compute threads), or ``None`` where the whole micro-batch runs in one pass."""
    threads = torch.get_num_threads()
    n = replica_count(train, device, world_size, threads, micro_batch)
    return Replicas(model, n, threads) if n > 1 else None


def set_compute_threads(n: int) -> None:
    """This thread's compute threads, leaving the ones of threads already running as they are."""
    torch.get_num_threads()  # ATen's per-thread set-up first: done later, it resets the count to the process's
    torch.set_num_threads(n)


class Replicas:
    """``n`` threads running slices of each micro-batch of ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, n: int, compute_threads: int):
        if n < 2:
            raise ValueError("Replicas needs at least two threads")
        self.model, self.n = model, n
        per_thread = max(1, compute_threads // n)
        # one thread per slice, the same for its forward and backward pass: the memory a pass
        # frees goes back to the allocator's arena of the thread that took it (glibc keeps one per
        # thread), and a slice moving between threads made the arenas grow and shrink each step
        # (about 1 s of system time per step of the paper's model on 2 cores)
        self.threads = [
            ThreadPoolExecutor(1, thread_name_prefix=f"pcav-replica{t}",
                               initializer=set_compute_threads, initargs=(per_thread,))  # fmt: skip
            for t in range(n)
        ]
        # start every thread now, then give the process (this thread, threads started later) its
        # count back: torch.set_num_threads in a thread also sets the default of threads to come
        started = Barrier(n + 1)
        for thread in self.threads:
            thread.submit(started.wait)
        started.wait()
        torch.set_num_threads(compute_threads)
        self.copies: list[nn.Module] | None = None  # per thread (_replica_modules)
        self.fresh = False  # whether the copies' gradients are clear (until the next collect_grads)
        self._graphs: list[tuple[list[Tensor], list[Tensor]]] = []  # per slice: outputs, their leaves
        self._graph_threads: list[int] = []  # per slice: the thread that ran it

    def _leaves_on_storage(self) -> dict[int, object]:
        """A ``deepcopy`` memo that maps each parameter to a new leaf on the same storage."""
        return {id(p): nn.Parameter(p.detach(), p.requires_grad) for p in self.model.parameters()}

    def _replica_modules(self) -> list[nn.Module]:
        """One module per thread whose parameters are leaves on the model's storage, their
        gradients cleared and their ``requires_grad`` the model's (the stage may have changed it).

        A module per thread, not ``torch.func.functional_call`` on the shared model: that swaps
        the module's attributes for the duration of the call, and two threads calling it at once
        take each other's parameters."""
        if self.copies is None:
            buffers = {id(b): b for b in self.model.buffers()}  # shared, not copied
            self.copies = [copy.deepcopy(self.model, {**self._leaves_on_storage(), **buffers}) for _ in range(self.n)]
        if not self.fresh:
            for replica in self.copies:
                for rp, p in zip(replica.parameters(), self.model.parameters()):
                    rp.data = p.data  # the model's storage, even if something rebound it
                    rp.requires_grad_(p.requires_grad)
                    rp.grad = None
            self.fresh = True
        return self.copies

    def _slices(self, total: int) -> list[tuple[int, int, int]]:
        """``(start, stop, thread)`` of each slice of a batch of ``total``: each thread's contiguous
        rows (none empty), cut into slices of at most ``SLICE_CLIPS`` that it runs in turn."""
        slices = []
        for t in range(min(self.n, total)):
            start, stop = bounds(total, self.n, t)
            pieces = -(-(stop - start) // SLICE_CLIPS)
            slices += [(start + a, start + b, t) for a, b in (bounds(stop - start, pieces, i) for i in range(pieces))]
        return slices

    def forward(self, batch: dict[str, Tensor], rt: Runtime, **model_kwargs) -> PCAVMAEOutput:
        """The pre-training model's output on the whole ``batch``, computed in slices by the threads."""
        copies = self._replica_modules()
        total = batch["fbank"].shape[0]
        slices = self._slices(total)
        noise = SharedNoise()

        def run(i: int) -> PCAVMAEOutput:
            start, stop, t = slices[i]
            rows = slice(start, stop)
            with global_batch_rows(start, total), shared_noise(noise):
                return copies[t](batch["fbank"][rows], batch["frames"][rows], **model_kwargs)

        self._graph_threads = [t for _, _, t in slices]
        outs = self._on_threads(run, self._graph_threads, rt.autocast)
        self._graphs = []
        for out in outs:
            graph: tuple[list[Tensor], list[Tensor]] = ([], [])
            for field in dataclasses.fields(out):
                value = getattr(out, field.name)
                if isinstance(value, Tensor) and value.requires_grad:
                    setattr(out, field.name, _cut(value, graph))
            self._graphs.append(graph)
        return PCAVMAEOutput(**{
            f.name: None if getattr(outs[0], f.name) is None else torch.cat([getattr(o, f.name) for o in outs])
            for f in dataclasses.fields(PCAVMAEOutput)
        })  # fmt: skip

    def forward_rows(self, total: int, rt: Runtime, call: Callable[[nn.Module, slice], Tensor]) -> Tensor:
        """``call(module, rows)`` for each thread's rows of a batch of ``total``, concatenated: the
        output of a model whose rows depend on their own inputs only (the fine-tuning classifier's
        logits), with one leaf per slice for ``backward``."""
        copies = self._replica_modules()
        slices = self._slices(total)

        def run(i: int) -> Tensor:
            start, stop, t = slices[i]
            return call(copies[t], slice(start, stop))

        self._graph_threads = [t for _, _, t in slices]
        outs = self._on_threads(run, self._graph_threads, rt.autocast)
        self._graphs = [([], []) for _ in outs]
        return torch.cat([_cut(out, graph) for out, graph in zip(outs, self._graphs)])

    def backward(self) -> None:
        """Back-propagate the gradients the losses left on each slice's output leaves (call after
        ``backward`` of the loss), in the threads, into their parameter leaves."""

        def run(graph: tuple[list[Tensor], list[Tensor]]) -> None:
            pairs = [(out, leaf.grad) for out, leaf in zip(*graph) if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])

        graphs, self._graphs = self._graphs, []
        self._on_threads(lambda i: run(graphs[i]), self._graph_threads)

    def collect_grads(self) -> None:
        """Sum the threads' gradients, in thread order, into the parameters' ``.grad``; the next
        micro-batch starts from cleared ones."""
        if self.copies is None or not self.fresh:
            return
        for p, *replicas in zip(self.model.parameters(), *(c.parameters() for c in self.copies)):
            grads = [rp.grad for rp in replicas if rp.grad is not None]
            if not grads:
                continue
            summed = grads[0]
            for g in grads[1:]:
                summed.add_(g)
            p.grad = summed if p.grad is None else p.grad.add_(summed)
            for rp in replicas:
                rp.grad = None
        self.fresh = False

    def _on_threads(self, fn, threads: list[int], around: Callable[[], AbstractContextManager] = nullcontext) -> list:
        """``fn(i)`` for each slice ``i`` on its thread ``threads[i]``: the threads at once, each
        thread's slices in turn, in order, inside one ``around()`` context per thread that no
        thread leaves before every thread is done; their results in slice order.

        For autocast (``around=rt.autocast``): a weight is cast to bf16 once per context and the
        graph keeps that copy for the backward pass, so a context per slice cast the weights again
        for each slice and held a copy per slice (pre-training's micro-batch of 48 on two threads:
        six copies of the paper's 190 M weights, 2.3 GB, where two do). The cache of casts is one
        for the process and a thread leaving its outermost context empties it, the other threads'
        casts included: hence the threads leave together."""
        mine: dict[int, list[int]] = {}
        for i, t in enumerate(threads):
            mine.setdefault(t, []).append(i)
        together = Barrier(len(mine))

        def run(indices: list[int]) -> list:
            with around():
                try:
                    results = [fn(i) for i in indices]
                except BaseException:
                    together.abort()  # the other threads stop waiting
                    raise
                together.wait()
            return results

        futures = {t: self.threads[t].submit(run, indices) for t, indices in mine.items()}
        errors = [f.exception() for f in futures.values()]
        first = next((e for e in errors if e is not None and not isinstance(e, BrokenBarrierError)), None)
        if first is not None:
            raise first
        results = {i: out for t, indices in mine.items() for i, out in zip(indices, futures[t].result())}
        return [results[i] for i in range(len(threads))]

    def close(self) -> None:
        for thread in self.threads:
            thread.shutdown(wait=True)


def _cut(value: Tensor, graph: tuple[list[Tensor], list[Tensor]]) -> Tensor:
    """A new leaf with ``value``'s data, the pair noted in ``graph`` (outputs, leaves): the loss's
    backward pass stops at the leaf, and ``Replicas.backward`` carries its gradient on into the
    thread's graph."""
    leaf = value.detach().requires_grad_()
    graph[0].append(value)
    graph[1].append(leaf)
    return leaf
