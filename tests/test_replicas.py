"""A micro-batch split over threads of one process (``train.replicas``): the whole batch's losses,
its gradients to rounding, the same masks and RNG, deterministic, and resumable to the bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.train import objective
from pcavmae_cli.engine.train.pretrain import pretrain
from pcavmae_cli.engine.train.replicas import Replicas, replica_count
from pcavmae_cli.engine.train.runtime import Runtime
from pcavmae_cli.engine.train.stop import Interrupted
from tests.test_pretrain import corpus, fixed_batch, fixed_prototypes, recipe, stop_at, tensors_of, tiny_model  # noqa: F401

CPU = Runtime(torch.device("cpu"), None)


def gradients(model, batch, protos, loss, replicas, micro_batches=1):
    """Gradients of ``micro_batches`` forward/backward passes of ``batch`` (masks from seed 1),
    the losses of the last one, and the global RNG's next draw."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    for _ in range(micro_batches):
        total, logged = objective.batch_losses(model, batch, loss, protos, CPU, replicas=replicas)
        total.backward()
        if replicas is not None:
            replicas.backward()
    if replicas is not None:
        replicas.collect_grads()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, objective.loss_values(logged), torch.rand(3)


def test_each_thread_runs_its_rows_in_slices_of_at_most_slice_clips(monkeypatch):
    model = torch.nn.Linear(2, 2)
    replicas = Replicas(model, 2, 2)
    try:
        assert replicas._slices(7) == [(0, 4, 0), (4, 7, 1)]
        assert replicas._slices(48) == [(0, 8, 0), (8, 16, 0), (16, 24, 0), (24, 32, 1), (32, 40, 1), (40, 48, 1)]
        assert replicas._slices(1) == [(0, 1, 0)]  # no empty slice
        monkeypatch.setattr("pcavmae_cli.engine.train.replicas.SLICE_CLIPS", 2)
        assert replicas._slices(7) == [(0, 2, 0), (2, 4, 0), (4, 6, 1), (6, 7, 1)]
    finally:
        replicas.close()


def test_an_error_in_one_thread_is_raised_and_the_others_do_not_wait_for_it():
    """The threads leave their context together (``_on_threads``); a slice that fails must not
    leave the other threads waiting for it."""
    replicas = Replicas(torch.nn.Linear(2, 2), 2, 2)

    def fn(i: int) -> int:
        if i == 1:
            raise ValueError("slice 1 failed")
        return i

    try:
        with pytest.raises(ValueError, match="slice 1 failed"):
            replicas._on_threads(fn, [0, 0, 1, 1])
        assert replicas._on_threads(lambda i: 10 * i, [0, 0, 1, 1]) == [0, 10, 20, 30]  # the threads still serve
    finally:
        replicas.close()


@pytest.mark.parametrize("n, slice_clips", [(2, 8), (3, 8), (2, 2)])
def test_threads_give_the_whole_batchs_losses_and_gradients(corpus, tmp_path, n, slice_clips, monkeypatch):  # noqa: F811
    monkeypatch.setattr("pcavmae_cli.engine.train.replicas.SLICE_CLIPS", slice_clips)  # 2: two slices per thread
    cfg, model = tiny_model(corpus, tmp_path)
    batch, protos, loss = fixed_batch(cfg, n=7), fixed_prototypes(cfg, n=7), cfg.stages[0].loss
    whole, whole_losses, whole_rng = gradients(model, batch, protos, loss, None)
    replicas = Replicas(model, n, n)
    try:
        split, split_losses, split_rng = gradients(model, batch, protos, loss, replicas)
    finally:
        replicas.close()
    assert torch.equal(split_rng, whole_rng)  # the masks took the global RNG as one pass of the batch
    assert set(split_losses) == set(whole_losses) >= {"pje", "pcpe", "infonce", "r", "total"}
    for part, value in whole_losses.items():  # same masks: the losses differ by rounding only
        assert split_losses[part] == pytest.approx(value, rel=1e-5, abs=1e-6), part
    assert split.keys() == whole.keys()
    for name, g in whole.items():
        assert torch.allclose(split[name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item()), name
    assert all(p.grad is None for c in replicas.copies for p in c.parameters())  # collected, not kept


def test_a_threads_slices_share_one_autocast_context(corpus, tmp_path, monkeypatch):  # noqa: F811
    """In bf16 a thread casts each weight once per pass however many slices it runs: autocast's
    cache lasts for one context, and the graph keeps each context's bf16 copy of the weights for
    the backward pass (a context per slice held a copy per slice)."""
    from contextlib import ExitStack

    from torch.utils._python_dispatch import TorchDispatchMode

    cfg, model = tiny_model(corpus, tmp_path)
    batch, protos, loss = fixed_batch(cfg, n=8), fixed_prototypes(cfg, n=8), cfg.stages[0].loss
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    casts: list[tuple[int, ...]] = []

    class CountCasts(TorchDispatchMode):  # entered in each thread: dispatch modes are per thread
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy" and tuple(args[0].shape) in weight_shapes:
                casts.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    class CountingRuntime(Runtime):
        def autocast(self):
            stack = ExitStack()
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            stack.enter_context(CountCasts())
            return stack

    bf16 = CountingRuntime(torch.device("cpu"), torch.bfloat16)
    counts = []
    for slice_clips, slices in ((8, 2), (2, 4)):  # one slice per thread (4 clips each), then two
        monkeypatch.setattr("pcavmae_cli.engine.train.replicas.SLICE_CLIPS", slice_clips)
        replicas = Replicas(model, 2, 2)
        try:
            casts.clear()
            torch.manual_seed(1)
            total, _ = objective.batch_losses(model, batch, loss, protos, bf16, replicas=replicas)
            assert len(replicas._graph_threads) == slices
            total.backward()
            replicas.backward()
        finally:
            replicas.close()
        counts.append(len(casts))
    assert counts[0] > 0 and counts[1] == counts[0]


@pytest.mark.parametrize("slice_clips", [8, 2])
def test_threads_are_deterministic_and_accumulate_micro_batches(corpus, tmp_path, slice_clips, monkeypatch):  # noqa: F811
    monkeypatch.setattr("pcavmae_cli.engine.train.replicas.SLICE_CLIPS", slice_clips)
    cfg, model = tiny_model(corpus, tmp_path)
    batch, protos, loss = fixed_batch(cfg), fixed_prototypes(cfg), cfg.stages[0].loss
    replicas = Replicas(model, 2, 2)
    try:
        first, _, _ = gradients(model, batch, protos, loss, replicas)
        for _ in range(6):  # threads racing for shared state would show here (the joint layer runs 3 times a pass)
            again, _, _ = gradients(model, batch, protos, loss, replicas)
            assert all(torch.equal(again[k], first[k]) for k in first)
        twice, _, _ = gradients(model, batch, protos, loss, replicas, micro_batches=2)
    finally:
        replicas.close()
    # the second micro-batch draws other masks: the sum is of two different passes, not 2 x the first
    assert any(not torch.allclose(twice[k], 2 * first[k]) for k in first)
    one, _, _ = gradients(model, batch, protos, loss, None, micro_batches=2)
    for name, g in one.items():
        assert torch.allclose(twice[name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item()), name


def test_a_stage_that_freezes_parts_gives_them_no_gradient(corpus, tmp_path):  # noqa: F811
    cfg, model = tiny_model(corpus, tmp_path)
    batch, protos = fixed_batch(cfg), fixed_prototypes(cfg)
    encoders_only = cfg.stages[-1]
    replicas = Replicas(model, 2, 2)
    try:
        gradients(model, batch, protos, cfg.stages[0].loss, replicas)
        model.set_trainable(encoders_only.trainable)
        grads, _, _ = gradients(model, batch, protos, encoders_only.loss, replicas)
    finally:
        replicas.close()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(grads)
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= set(grads)


def test_replica_count_applies_to_one_cpu_process_only(corpus, tmp_path):  # noqa: F811
    train = recipe(corpus, tmp_path).train
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert replica_count(train, cpu, 1, 2, 8) == 2  # null: two on two compute threads, 4+ clips each
    assert replica_count(train, cpu, 1, 2, 7) == 1  # too few clips per thread to gain
    assert replica_count(train, cpu, 1, 4, 16) == 1  # not measured there: one
    assert replica_count(train, cuda, 1, 2, 8) == 1
    assert replica_count(train, cpu, 2, 2, 8) == 1  # DDP splits the batch already
    assert replica_count(dataclasses.replace(train, compile=True), cpu, 1, 2, 8) == 1
    assert replica_count(dataclasses.replace(train, replicas=4), cpu, 1, 2, 4) == 2  # no more than threads
    assert replica_count(dataclasses.replace(train, replicas=1), cpu, 1, 2, 8) == 1
    with pytest.raises(UserError, match="'train.replicas' must be >= 1"):
        replica_count(dataclasses.replace(train, replicas=0), cpu, 1, 2, 8)


def test_a_run_on_threads_stopped_and_resumed_ends_with_the_uninterrupted_weights(corpus, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr("pcavmae_cli.engine.train.replicas.SLICE_CLIPS", 1)  # 2 clips a thread: two slices each
    threads = ("train.threads=2", "train.replicas=2", "data.loader.batch_size=4")
    whole = pretrain(recipe(corpus, tmp_path / "whole", *threads))
    with pytest.raises(Interrupted):
        pretrain(recipe(corpus, tmp_path / "resumed", *threads), on_step=stop_at(5))
    resumed = pretrain(recipe(corpus, tmp_path / "resumed", *threads, "train.resume=true"))
    assert resumed.resumed_from_step == 5 and resumed.steps == whole.steps
    mine, theirs = tensors_of(tmp_path / "resumed/checkpoints/last"), tensors_of(tmp_path / "whole/checkpoints/last")
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
    # against one thread on the whole batch: the same run to rounding
    single = pretrain(
        recipe(corpus, tmp_path / "single", "train.threads=2", "train.replicas=1", "data.loader.batch_size=4")
    )
    for mine_epoch, single_epoch in zip(whole.epochs, single.epochs):
        assert mine_epoch["loss_total"] == pytest.approx(single_epoch["loss_total"], rel=1e-3)



def test_the_run_header_names_the_split(corpus, tmp_path):  # noqa: F811
    from pcavmae_cli.engine.train.runtime import describe_runtime

    train = dataclasses.replace(recipe(corpus, tmp_path).train, device="cpu", threads=2)
    assert describe_runtime(train, 8).endswith(", each micro-batch split over 2 threads of 1")
    assert "split" not in describe_runtime(train, 4) and "split" not in describe_runtime(train)
