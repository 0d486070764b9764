"""The fast step's switches: compile with an eager fallback, activation checkpointing, fused AdamW."""

from __future__ import annotations

import json

import pytest
import torch
import torch._inductor.config as inductor

from pcavmae_cli.engine import config
from pcavmae_cli.engine.model import blocks, cpu_attention
from pcavmae_cli.engine.train.fast import FallbackCompiled, set_activation_checkpointing
from pcavmae_cli.engine.train.finetune import FineTuner
from pcavmae_cli.engine.train.metrics import read_metrics
from pcavmae_cli.engine.train.objective import batch_losses
from pcavmae_cli.engine.train.optim import build_optimizer
from pcavmae_cli.engine.progress import SilentReporter
from pcavmae_cli.engine.train.pretrain import pretrain
from pcavmae_cli.engine.train.runtime import Runtime
from tests.test_pretrain import corpus, fixed_batch, fixed_prototypes, recipe, tiny_model  # noqa: F401
from tests.tiny_corpus import TINY_FINETUNE, write_corpus

CPU = Runtime(torch.device("cpu"), None)


def no_compiler(module, **options):
    """What torch.compile does on a machine that cannot compile: fails at the first call."""

    def call(*args, **kwargs):
        raise RuntimeError("InductorError: no C++ compiler found\nlong traceback ...")

    return call


def test_a_failing_compile_warns_once_and_runs_eager(corpus, tmp_path):  # noqa: F811
    cfg, model = tiny_model(corpus, tmp_path)
    batch = fixed_batch(cfg)
    step = FallbackCompiled(model, compile_fn=no_compiler)
    with pytest.warns(RuntimeWarning, match=r"^train.compile: torch.compile failed \(RuntimeError: InductorError"):
        torch.manual_seed(0)
        out = step(batch["fbank"], batch["frames"])
    torch.manual_seed(0)
    assert torch.equal(out.z_a, model(batch["fbank"], batch["frames"]).z_a)
    assert step.compiled is None  # eager from now on: no second warning
    with warnings_as_errors():
        step(batch["fbank"], batch["frames"])


def test_a_compile_error_at_wrap_time_falls_back_too(corpus, tmp_path):  # noqa: F811
    _, model = tiny_model(corpus, tmp_path)

    def refuses(module):
        raise RuntimeError("Dynamo is not supported on Python 3.99")

    with pytest.warns(RuntimeWarning, match="Dynamo is not supported"):
        step = FallbackCompiled(model, compile_fn=refuses)
    assert step.compiled is None


def test_pretrain_with_compile_on_a_machine_that_cannot_compile_finishes(corpus, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch, "compile", no_compiler)
    cfg = recipe(corpus, tmp_path / "run", "train.compile=true", "stages.0.epochs=1", "stages.1.epochs=1")
    with pytest.warns(RuntimeWarning, match="train.compile") as caught:
        result = pretrain(cfg)
    assert sum("train.compile" in str(w.message) for w in caught) == 1
    assert result.steps == 6
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["loss_total"] > 0 for line in lines)


def losses_and_grads(model, cfg, checkpointed: bool):
    set_activation_checkpointing(model, checkpointed)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same masks in both runs
    total, _ = batch_losses(model, fixed_batch(cfg), cfg.stages[0].loss, fixed_prototypes(cfg), CPU)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients(corpus, tmp_path):  # noqa: F811
    cfg, model = tiny_model(corpus, tmp_path)
    assert set_activation_checkpointing(model, True) == 2 + 1 + 1  # 1 block per modality, 1 joint, 1 decoder
    loss_plain, grads_plain = losses_and_grads(model, cfg, checkpointed=False)
    loss_ckpt, grads_ckpt = losses_and_grads(model, cfg, checkpointed=True)
    assert torch.allclose(loss_plain, loss_ckpt, rtol=1e-6, atol=1e-7)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) > 10
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_ckpt[name], rtol=1e-5, atol=1e-7), name


def test_checkpointing_saves_activations_in_training_only(corpus, tmp_path):  # noqa: F811
    cfg, model = tiny_model(corpus, tmp_path)
    set_activation_checkpointing(model, True)
    batch = fixed_batch(cfg)
    saved = {"n": 0}

    def count(t):
        saved["n"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        model(batch["fbank"], batch["frames"])
    with_ckpt = saved["n"]
    set_activation_checkpointing(model, False)
    saved["n"] = 0
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        model(batch["fbank"], batch["frames"])
    assert 0 < with_ckpt < saved["n"]


def test_fused_adamw_makes_the_same_update_as_the_plain_one(corpus, tmp_path):  # noqa: F811
    cfg, model = tiny_model(corpus, tmp_path)
    twin = type(model)(cfg.model)
    twin.load_state_dict(model.state_dict())
    plain, fused = build_optimizer(model, cfg.optim, fused=False), build_optimizer(twin, cfg.optim)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        plain.step()
        fused.step()
    moved = 0
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
        moved += int(not torch.equal(p, dict(tiny_model(corpus, tmp_path)[1].named_parameters())[name]))
    assert moved > 10  # the steps did change the weights


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@pytest.fixture
def eager_random():
    """Inductor draws random numbers as eager does (the same masks, dropout), for this test only
    (``config.patch``: monkeypatch would delete the config entry on undo)."""
    with inductor.patch(fallback_random=True):
        yield


def test_a_compiled_run_gives_the_eager_runs_losses_and_optimiser_state(corpus, tmp_path, eager_random, recwarn):  # noqa: F811
    """Real torch.compile (inductor), the whole pre-training run: warm-up (decoder, no L_PCPE),
    epochs with prototypes, the encoder-only stage. With inductor drawing eager's random masks
    (``fallback_random``) the compiled run is the eager one up to float rounding: step losses
    within 1e-4 and every AdamW slot counting the same steps. A parameter the loss does not use
    (the decoder projections during warm-up) must get no gradient, as in eager, not a zero one
    that AdamW would decay and count (which moved L_PCPE by 2e-2 once prototypes started)."""
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile_{compiled}"
        pretrain(recipe(corpus, run_dir, f"train.compile={str(compiled).lower()}"))
        state = torch.load(run_dir / "checkpoints/last/state.pt", weights_only=True)["optimizer"]["state"]
        losses = [(r["step"], r["loss_total"], r["loss_pcpe"]) for r in read_metrics(run_dir / "metrics.jsonl", "step")]
        runs[compiled] = losses, {pid: int(slots["step"]) for pid, slots in state.items()}
    assert not [w for w in recwarn if "train.compile" in str(w.message)]  # compiled, no eager fallback
    (eager_losses, eager_steps), (compiled_losses, compiled_steps) = runs[False], runs[True]
    assert len(eager_losses) == 9 and sum(pcpe is not None for _, _, pcpe in eager_losses) == 3
    for (step, total, pcpe), (_, c_total, c_pcpe) in zip(eager_losses, compiled_losses):
        assert c_total == pytest.approx(total, abs=1e-4), step
        assert (c_pcpe is None) == (pcpe is None) and (pcpe is None or c_pcpe == pytest.approx(pcpe, abs=1e-4)), step
    assert compiled_steps == eager_steps and len(set(eager_steps.values())) > 1  # dproj counts fewer steps


def test_fine_tuning_honours_compile_and_activation_checkpointing(tmp_path, eager_random, recwarn):
    """``train.compile`` and ``train.activation_checkpointing`` apply to fine-tuning too: each
    run gives the plain run's step losses (inductor drawing eager's random numbers), compile
    without falling back to eager, and AdamW counts the same steps for every parameter."""
    train, held_out = write_corpus(tmp_path, 3, 4, name="train"), write_corpus(tmp_path, 3, 2, seed=1, name="eval")
    runs = {}
    for name, switch in {"plain": [], "compiled": ["train.compile=true"],
                         "checkpointed": ["train.activation_checkpointing=true"]}.items():  # fmt: skip
        run_dir = tmp_path / name
        cfg = config.load_recipe("finetune_demo", [
            *TINY_FINETUNE, f"data.train_manifest={train}", f"data.eval_manifest={held_out}",
            f"data.label_csv={tmp_path / 'labels.csv'}", "finetune.init_from=null", f"train.run_dir={run_dir}",
            "finetune.epochs=2", *switch,
        ])  # fmt: skip
        tuner = FineTuner(cfg, SilentReporter(), on_step=None)
        compiler = tuner.compiler
        tuner.run()
        state = torch.load(run_dir / "checkpoints/last/state.pt", weights_only=True)["optimizer"]["state"]
        losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "step")]
        runs[name] = losses, {pid: int(slots["step"]) for pid, slots in state.items()}, compiler
    assert not [w for w in recwarn if "train.compile" in str(w.message)]
    compiled = [wrapper for _, wrapper in runs["compiled"][2]._wrapped.values()]
    assert len(compiled) == 1 and compiled[0].compiled is not None  # the step ran compiled
    assert not runs["plain"][2]._wrapped
    plain_losses, plain_steps, _ = runs["plain"]
    assert len(plain_losses) == 6
    for name in ("compiled", "checkpointed"):
        losses, steps, _ = runs[name]
        assert losses == pytest.approx(plain_losses, abs=1e-5), name
        assert steps == plain_steps, name


@pytest.mark.parametrize(
    "group_bytes",
    [0, 40 * 40 * 2, 2 * 40 * 40 * 2 + 1, 4 * 40 * 40 * 2],  # all heads; 1; 2 (a short last group); 4 (across samples)
)
@pytest.mark.parametrize("shape", [(3, 40, 3, 16), (1, 40, 1, 16)])
def test_grouped_bf16_cpu_attention_is_the_fused_kernel_within_bf16_rounding(group_bytes, shape):
    """``cpu_attention.grouped_attention`` on the packed qkv projection: the same attention as SDPA
    on the same bf16 inputs (taken in fp32 as the reference), forward and backward, however the
    heads are grouped."""
    torch.manual_seed(0)
    B, N, H, D = shape
    qkv = torch.randn(B, N, 3, H, D).bfloat16().requires_grad_()
    before = qkv.detach().clone()
    reference_qkv = qkv.detach().float().requires_grad_()
    grad = torch.randn(B, N, H * D)
    out = cpu_attention.grouped_attention(qkv, group_bytes)
    assert out.shape == (B, N, H * D) and out.dtype == torch.bfloat16
    out.float().backward(grad)
    q, k, v = reference_qkv.permute(2, 0, 3, 1, 4).unbind(0)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)
    reference.backward(grad)
    assert torch.allclose(out.float(), reference, atol=2e-2, rtol=2e-2)
    assert torch.allclose(qkv.grad.float(), reference_qkv.grad, atol=5e-2, rtol=5e-2)
    assert (qkv.grad.float() - reference_qkv.grad).abs().max() < 0.05 * reference_qkv.grad.abs().max()
    assert torch.equal(qkv.detach(), before)  # the input is not scaled in place


def test_only_bf16_on_the_cpu_takes_the_explicit_attention(monkeypatch):
    """fp32 (and every GPU) keeps SDPA: the module's fp32 output is SDPA's to the bit."""
    torch.manual_seed(0)
    attention = blocks.Attention(32, 4)
    x = torch.randn(2, 10, 32)
    assert blocks.explicit_attention(torch.zeros(1, dtype=torch.bfloat16))
    assert not blocks.explicit_attention(torch.zeros(1))
    monkeypatch.setattr(blocks, "EXPLICIT_CPU_BF16", False)
    assert not blocks.explicit_attention(torch.zeros(1, dtype=torch.bfloat16))
    q, k, v = attention.qkv(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    heads_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    expected = attention.proj(heads_out.transpose(1, 2).reshape(2, 10, 32))
    assert torch.equal(attention(x), expected)


def test_the_bf16_step_with_explicit_attention_gives_the_fused_kernels_losses_and_gradients(corpus, tmp_path, monkeypatch):  # noqa: F811
    cfg, model = tiny_model(corpus, tmp_path)
    batch, protos = fixed_batch(cfg), fixed_prototypes(cfg)
    rt = Runtime(device=torch.device("cpu"), dtype=torch.bfloat16)
    results = {}
    for explicit in (False, True):
        monkeypatch.setattr(blocks, "EXPLICIT_CPU_BF16", explicit)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same masks
        total, logged = batch_losses(model, batch, cfg.stages[0].loss, protos, rt)
        total.backward()
        results[explicit] = (total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_sdpa, grads_sdpa), (loss_explicit, grads_explicit) = results[False], results[True]
    assert loss_explicit == pytest.approx(loss_sdpa, rel=2e-2)
    assert grads_sdpa.keys() == grads_explicit.keys()
    for name, g in grads_sdpa.items():
        scale = g.abs().max().clamp_min(1e-6)
        assert (grads_explicit[name] - g).abs().max() / scale < 0.1, name
