"""The memory a training run reports: the process's peak, the limit it may reach, the warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from pcavmae_cli.engine.train import memory
from pcavmae_cli.engine.train.metrics import read_metrics
from pcavmae_cli.engine.train.pretrain import pretrain
from tests.test_pretrain import corpus, recipe  # noqa: F401

CPU = torch.device("cpu")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("cgroup, name, text, limit", [
    ("0::/\n", "memory.max", "max\n", None),  # cgroup v2, no limit
    ("0::/\n", "memory.max", "8589934592\n", 8589934592),  # v2, 8 GiB
    ("0::/job/step\n", "job/memory.max", "8589934592\n", 8589934592),  # v2, on a parent of the process's cgroup
    ("9:memory:/\n", "memory/memory.limit_in_bytes", "9223372036854771712\n", None),  # v1, unlimited
    ("9:memory:/\n", "memory/memory.limit_in_bytes", "4294967296\n", 4294967296),  # v1, 4 GiB
])  # fmt: skip
def test_the_cgroup_limit_is_read_from_v2_or_v1(tmp_path, cgroup, name, text, limit):
    write(tmp_path / "proc_cgroup", cgroup)
    write(tmp_path / "fs" / name, text)
    assert memory.cgroup_limit(tmp_path / "fs", tmp_path / "proc_cgroup") == limit


def test_no_cgroup_files_means_no_limit(tmp_path):
    write(tmp_path / "proc_cgroup", "0::/\n")
    assert memory.cgroup_limit(tmp_path / "fs", tmp_path / "proc_cgroup") is None


def test_proc_fields_are_read_in_bytes(tmp_path):
    write(tmp_path / "self" / "status", "Name:\tpython\nVmHWM:\t 2048 kB\nVmRSS:\t 1024 kB\n")
    write(tmp_path / "meminfo", "MemTotal:  4096 kB\nMemAvailable:  3072 kB\n")
    assert memory._status_kib("VmHWM", tmp_path) == 2048 * 1024
    assert memory._status_kib("VmRSS", tmp_path) == 1024 * 1024
    assert memory._meminfo("MemAvailable", tmp_path) == 3072 * 1024
    assert memory._status_kib("VmHWM", tmp_path / "absent") is None  # off Linux: unknown, not an error


def test_the_limit_is_the_machine_or_the_cgroup_whichever_is_lower(monkeypatch):
    fields = {"VmRSS": 2 * 10**9, "MemAvailable": 6 * 10**9}
    monkeypatch.setattr(memory, "_status_kib", lambda f, proc=memory.PROC: fields.get(f))
    monkeypatch.setattr(memory, "_meminfo", lambda f, proc=memory.PROC: fields.get(f))
    monkeypatch.setattr(memory, "cgroup_limit", lambda *a: None)
    assert memory.limit_bytes(CPU) == 8 * 10**9  # what this process holds plus what is available
    monkeypatch.setattr(memory, "cgroup_limit", lambda *a: 5 * 10**9)
    assert memory.limit_bytes(CPU) == 5 * 10**9
    monkeypatch.setattr(memory, "cgroup_limit", lambda *a: None)
    fields["MemTotal"] = 7 * 10**9  # shared pages count in the resident set and in what is available
    assert memory.limit_bytes(CPU) == 7 * 10**9


def test_this_process_reports_a_peak_and_a_limit_on_linux():
    peak, limit = memory.peak_bytes(CPU), memory.limit_bytes(CPU)
    assert peak is not None and limit is not None and 0 < peak < 2 * limit
    assert memory.gigabytes(peak) == round(peak / 1e9, 2) and memory.gigabytes(None) is None


def test_the_warning_comes_past_the_headroom_only_and_names_the_way_out():
    assert memory.headroom_warning(80 * 10**8, 10**10, CPU) is None  # 80 %
    assert memory.headroom_warning(None, 10**10, CPU) is None and memory.headroom_warning(10**10, None, CPU) is None
    message = memory.headroom_warning(9 * 10**9, 10**10, CPU)
    assert message.startswith("memory: the first step peaked at 9.0 GB of what this process may use 10.0 GB")
    assert "killed without a message" in message
    assert "data.loader.batch_size" in message and "train.activation_checkpointing=true" in message
    gpu = memory.headroom_warning(9 * 10**9, 10**10, torch.device("cuda", 0))
    assert "of the GPU's 10.0 GB" in gpu and "killed" not in gpu


def test_kept_bytes_counts_saved_tensors_and_the_explicit_attention_weights():
    """The explicit bf16 CPU attention keeps q, k, v in one saved tensor and each head's (N, N)
    weights on its node, which saved-tensor hooks do not see: both count, by hand."""
    from pcavmae_cli.engine.model.cpu_attention import grouped_attention

    B, N, H, D = 2, 10, 2, 4
    qkv = torch.randn(B, N, 3, H, D, dtype=torch.bfloat16, requires_grad=True)
    kept = memory.kept_bytes(lambda: grouped_attention(qkv, 0))
    assert kept == 3 * B * H * N * D * 2 + B * H * N * N * 2
    assert memory.kept_bytes(lambda: grouped_attention(qkv.detach(), 0)) == 0  # no gradient wanted: nothing kept


def test_the_step_estimate_adds_gradients_moments_and_clips_and_leaves_the_rng(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    model[2].weight.requires_grad_(False)
    weights = sum(p.numel() for p in model.parameters())
    trainable = weights - 32 * 4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def forward(clips: int) -> torch.Tensor:
        return model(torch.rand(clips, 8)).sum()  # draws from the global RNG, as masking does

    torch.manual_seed(3)
    expected_next = torch.rand(2)
    torch.manual_seed(3)
    est = memory.estimate_step(model, forward, 10, CPU, threads=2, bf16=True, optimizer=optimizer)
    assert torch.equal(torch.rand(2), expected_next)
    assert est.state == 4 * trainable * 2 + 8 * trainable + 2 * weights
    # per clip, fp32: the input row (saved by the first product for its weight's gradient) and
    # the first layer's output (saved by GELU); GELU's output is not kept: the last weight is frozen
    assert est.per_clip == (8 + 32) * 4
    assert est.total == est.now + est.state + est.fixed + 10 * est.per_clip and est.now > 0
    forward(1).backward()
    optimizer.step()  # made the moments: no longer to come
    est = memory.estimate_step(model, forward, 10, CPU, threads=1, bf16=False, optimizer=optimizer)
    assert est.state == 4 * trainable


def test_the_estimate_warns_past_the_headroom_with_its_figures():
    est = memory.StepEstimate(now=2 * 10**9, state=3 * 10**9, fixed=0, per_clip=3 * 10**8, micro_batch=64)
    assert est.total == 24.2 * 10**9
    message = memory.estimate_warning(est, 25 * 10**9, CPU)
    assert message.startswith("memory: a step of 64 clips (data.loader.batch_size) needs about 24.2 GB")
    assert "97 % of what this process may use, 25.0 GB" in message and "without a message" in message
    assert memory.estimate_warning(est, 30 * 10**9, CPU) is None  # 81 %
    assert memory.estimate_warning(None, 10**9, CPU) is None


def test_the_memory_check_warns_once_and_only_on_rank_0(monkeypatch):
    monkeypatch.setattr(memory, "peak_bytes", lambda device: 95)
    monkeypatch.setattr(memory, "limit_bytes", lambda device: 100)
    small = memory.StepEstimate(now=10, state=10, fixed=0, per_clip=1, micro_batch=10)  # 30 %
    large = memory.StepEstimate(now=50, state=30, fixed=0, per_clip=1, micro_batch=10)  # 90 %
    said: list[str] = []
    check = memory.MemoryCheck(CPU, True, said.append)
    assert check.before_first_step(lambda: small) is small and said == []
    for _ in range(3):  # the measured peak (95 %) warns, once
        check.after_step()
    assert len(said) == 1 and said[0].startswith("memory: the first step peaked")
    said.clear()
    check = memory.MemoryCheck(CPU, True, said.append)
    check.before_first_step(lambda: large)
    check.before_first_step(lambda: large)
    check.after_step()  # the estimate said it already
    assert len(said) == 1 and said[0].startswith("memory: a step of 10 clips")
    other_rank: list[str] = []
    check = memory.MemoryCheck(CPU, False, other_rank.append)
    assert check.before_first_step(lambda: large) is None
    check.after_step()
    assert other_rank == []


def test_a_run_near_its_limit_says_so_once_and_logs_its_peak(corpus, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(memory, "HEADROOM", 0.0)  # any peak is past it
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain(recipe(corpus, run, "stages.0.epochs=1", "stages.1.epochs=1"), None)
    said = [str(w.message) for w in caught if str(w.message).startswith("memory: ")]
    assert len(said) == 1 and said[0].startswith("memory: a step of 2 clips")  # the estimate, before the step
    epochs = read_metrics(run / "metrics.jsonl", "epoch")
    assert epochs and all(e["peak_memory_gb"] > 0 for e in epochs)
