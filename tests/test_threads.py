"""Compute threads follow the CPUs a process may use: recipe, OMP_NUM_THREADS, cgroup quota, affinity."""

from __future__ import annotations

import os

import pytest
import torch

from pcavmae_cli.engine.train.threads import cgroup_cpu_limit, thread_plan, usable_cpus


def _tree(tmp_path, proc: str, files: dict[str, str]):
    for rel, text in files.items():
        (tmp_path / "cg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / rel).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return {"root": tmp_path / "cg", "proc_cgroup": tmp_path / "proc_cgroup"}


def test_a_cgroup_v2_quota_anywhere_above_the_process_caps_the_cpus(tmp_path):
    where = _tree(tmp_path, "0::/job/step\n", {"job/cpu.max": "150000 100000\n", "job/step/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(**where) == 1.5
    cpus, why = usable_cpus(**where)
    affinity = len(os.sched_getaffinity(0))
    assert cpus == min(2, affinity) and (affinity <= 2 or "cgroup CPU quota 1.5" in why)
    unlimited = _tree(tmp_path / "u", "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(**unlimited) is None


def test_a_cgroup_v1_quota_is_read_from_the_cpu_controller(tmp_path):
    where = _tree(tmp_path, "2:cpuacct:/\n1:cpu:/slurm/job7\n0::/\n",
                  {"cpu/slurm/job7/cpu.cfs_quota_us": "200000\n", "cpu/slurm/job7/cpu.cfs_period_us": "100000\n",
                   "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})  # fmt: skip
    assert cgroup_cpu_limit(**where) == 2.0


def test_the_recipe_then_omp_num_threads_then_the_usable_cpus_decide(tmp_path):
    where = _tree(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})  # a quota of 1 CPU
    assert thread_plan(3, {"OMP_NUM_THREADS": "2"}, **where).threads == 3
    plan = thread_plan(None, {"OMP_NUM_THREADS": "2"}, **where)
    assert (plan.threads, plan.reason) == (2, "OMP_NUM_THREADS")
    assert thread_plan(None, {}, **where).threads == 1
    shared = thread_plan(None, {"LOCAL_WORLD_SIZE": "4"}, **_tree(tmp_path / "b", "0::/\n", {"cpu.max": "800000 100000\n"}))
    expected = min(8, len(os.sched_getaffinity(0))) // 4
    assert shared.threads == max(1, expected) and "shared by 4 processes" in shared.reason


@pytest.mark.parametrize("bad", ["", "0", "x"])
def test_an_unusable_omp_num_threads_is_ignored(tmp_path, bad):
    where = _tree(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    assert thread_plan(None, {"OMP_NUM_THREADS": bad}, **where).threads == 1


def test_resolve_runtime_applies_the_plan_and_refuses_zero_threads():
    import dataclasses

    import torch

    from pcavmae_cli.engine import config
    from pcavmae_cli.engine.errors import UserError
    from pcavmae_cli.engine.train.runtime import describe_runtime, resolve_runtime

    train = config.load_recipe("demo").train
    before = torch.get_num_threads()
    try:
        resolve_runtime(dataclasses.replace(train, device="cpu", threads=1))
        assert torch.get_num_threads() == 1
        assert describe_runtime(dataclasses.replace(train, device="cpu", threads=1, precision="fp32")) == \
            "cpu, fp32, 1 compute thread (train.threads)"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="key 'train.threads' must be >= 1"):
        resolve_runtime(dataclasses.replace(train, device="cpu", threads=0))


def test_loader_workers_are_at_most_the_cpus_this_process_may_use(monkeypatch):
    """More worker processes than CPUs take turns on them and each holds memory (data.loader_workers)."""
    import dataclasses

    from pcavmae_cli.engine import config
    from pcavmae_cli.engine.train import data
    from pcavmae_cli.engine.train.runtime import Runtime

    monkeypatch.setattr(data, "usable_cpus", lambda: (2, "2 CPUs"))
    assert data.loader_workers(8, {}) == 2 and data.loader_workers(1, {}) == 1
    assert data.loader_workers(0, {}) == 0  # 0: the main process loads, as asked
    assert data.loader_workers(8, {"LOCAL_WORLD_SIZE": "2"}) == 1  # two torchrun processes share the 2 CPUs
    assert data.loader_workers(8, {"LOCAL_WORLD_SIZE": "4"}) == 1  # a cap never turns workers into none
    loader_cfg = dataclasses.replace(config.load_recipe("demo").data.loader, num_workers=8)
    loader = data.embed_loader(list(range(4)), loader_cfg, Runtime(torch.device("cpu"), None))
    assert loader.num_workers == 2
    # started from a fork server, not forked from the training process (data.worker_context)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    monkeypatch.setattr(data, "usable_cpus", lambda: (64, "64 CPUs"))
    assert data.loader_workers(8, {}) == 8
