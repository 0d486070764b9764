"""The CUDA paths, checked on a machine with a GPU (skipped elsewhere, with that reason).

CI has no GPU, so these run where a GPU is lent (``benchmarks/gpu_check.sh``). They hold the
CUDA side to what the CPU tests show: the compact loader inputs normalise to the same bits on the
GPU, the model and its losses give the CPU's values and gradients when the masks are the same,
bf16 autocast stays close to fp32, fused AdamW and torch.compile give the eager updates, a
pre-training run through pinned-memory workers stops and resumes to the uninterrupted run's
weights, its checkpoints load on a CPU, fine-tuning runs on top, and k-means finds the CPU's
clusters. Tolerances are float32 rounding over a few steps: CUDA kernels sum in other orders
(and some backward passes use atomics), so GPU results are close to, not equal to, the CPU's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.model import PCAVMAE, MomentumEncoder, masking
from pcavmae_cli.engine.prototypes import Comm, load_prototypes
from pcavmae_cli.engine.prototypes.kmeans import spherical_kmeans
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.train.fast import FallbackCompiled
from pcavmae_cli.engine.train.finetune import finetune
from pcavmae_cli.engine.train.metrics import read_metrics
from pcavmae_cli.engine.train.objective import batch_losses
from pcavmae_cli.engine.train.optim import build_optimizer
from pcavmae_cli.engine.train.pretrain import pretrain
from pcavmae_cli.engine.train.runtime import Runtime
from pcavmae_cli.engine.train.stop import Interrupted
from tests.test_distributed import WEIGHT_TOL
from tests.test_model_inputs import corpus as compact_corpus  # noqa: F401
from tests.test_pretrain import (  # noqa: F401 - corpus: the module-scoped fixture
    N_CLIPS, corpus, fixed_batch, fixed_prototypes, recipe, stop_at, tensors_of,
)
from tests.test_prototypes import sphere_blobs
from tests.tiny_corpus import TINY_FINETUNE, write_corpus

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CPU, GPU = torch.device("cpu"), torch.device("cuda")
ON_GPU = ["train.device=cuda", "train.precision=fp32"]


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 matrix products in full precision (no TF32), as on the CPU, for every test here."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("layout", ["plain", "packed"])
@pytest.mark.parametrize("frames", ["random", "all"])
def test_compact_batches_normalise_on_the_gpu_to_the_cpus_bits(compact_corpus, layout, frames):  # noqa: F811
    manifests, data, labels = compact_corpus
    compact = AudioVisualDataset(manifests[layout], data, frames, labels, compact=True)
    keys = [(i, 500 + i) for i in range(len(compact))]
    raw = next(iter(DataLoader(compact, batch_sampler=[keys])))
    on_cpu = model_inputs(raw, data, CPU)
    on_gpu = model_inputs(raw, data, GPU)
    assert on_gpu["fbank"].device.type == on_gpu["frames"].device.type == "cuda"
    for key in on_cpu:
        assert on_gpu[key].dtype == on_cpu[key].dtype and torch.equal(on_gpu[key].cpu(), on_cpu[key]), key


# ---------------------------------------------------------------- model, losses, optimiser


def tiny(corpus, tmp_path):  # noqa: F811
    cfg = recipe(corpus, tmp_path / "unused")
    torch.manual_seed(0)
    return cfg, PCAVMAE(cfg.model)


def losses_and_grads(model, cfg, device, dtype=None):
    """One forward/backward of the fixed batch on ``device``; the masks come from the CPU's RNG."""
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(device) for k, v in fixed_batch(cfg).items()}
    protos = [p.to(device) for p in fixed_prototypes(cfg)]
    torch.manual_seed(0)
    total, logged = batch_losses(model, batch, cfg.stages[0].loss, protos, Runtime(device, dtype))
    total.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in logged.items()}, grads


@pytest.fixture
def cpu_masks(monkeypatch):
    """Masking noise drawn on the CPU and copied over: the same masks on both devices."""
    draw = masking._noise
    monkeypatch.setattr(masking, "_noise", lambda B, N, device: draw(B, N, CPU).to(device))


def test_the_losses_and_gradients_on_the_gpu_are_the_cpus(corpus, tmp_path, cpu_masks):  # noqa: F811
    cfg, model = tiny(corpus, tmp_path)
    want, want_grads = losses_and_grads(model, cfg, CPU)
    got, got_grads = losses_and_grads(model, cfg, GPU)
    assert got.keys() == want.keys() and len(want_grads) > 10 and got_grads.keys() == want_grads.keys()
    for part in want:
        assert got[part] == pytest.approx(want[part], rel=1e-5, abs=1e-6), part
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6), name


def test_bf16_autocast_on_the_gpu_stays_close_to_fp32(corpus, tmp_path, cpu_masks):  # noqa: F811
    cfg, model = tiny(corpus, tmp_path)
    fp32, fp32_grads = losses_and_grads(model, cfg, GPU)
    bf16, bf16_grads = losses_and_grads(model, cfg, GPU, torch.bfloat16)
    for part in fp32:
        assert bf16[part] == pytest.approx(fp32[part], rel=3e-2, abs=1e-3), part
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    assert torch.isfinite(flat(bf16_grads)).all()
    assert F.cosine_similarity(flat(bf16_grads), flat(fp32_grads), dim=0) > 0.99


def test_fused_adamw_on_the_gpu_makes_the_plain_update(corpus, tmp_path):  # noqa: F811
    cfg, model = tiny(corpus, tmp_path)
    model = model.to(GPU)
    twin = type(model)(cfg.model).to(GPU)
    twin.load_state_dict(model.state_dict())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain, fused = build_optimizer(model, cfg.optim, fused=False), build_optimizer(twin, cfg.optim)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g).to(GPU)
            q.grad = p.grad.clone()
        plain.step()
        fused.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    assert sum(not torch.equal(p, start[n]) for n, p in model.named_parameters()) > 10


def test_torch_compile_on_the_gpu_compiles_and_gives_the_eager_forward(corpus, tmp_path, recwarn):  # noqa: F811
    import torch._inductor.config as inductor

    cfg, model = tiny(corpus, tmp_path)
    model = model.to(GPU)
    batch = {k: v.to(GPU) for k, v in fixed_batch(cfg).items()}
    step = FallbackCompiled(model)
    with inductor.patch(fallback_random=True):  # the compiled graph draws eager's masks
        torch.manual_seed(0)
        compiled = step(batch["fbank"], batch["frames"])
    assert step.compiled is not None, [str(w.message) for w in recwarn]  # no fallback to eager
    torch.manual_seed(0)
    eager = model(batch["fbank"], batch["frames"])
    for name in ("z_a", "z_v"):
        assert torch.allclose(getattr(compiled, name), getattr(eager, name), rtol=1e-4, atol=1e-5), name


# ---------------------------------------------------------------- the loops


@pytest.fixture(scope="module")
def gpu_reference(corpus, tmp_path_factory):  # noqa: F811
    """An uninterrupted tiny pre-training run on the GPU, clips loaded by 2 pinned-memory workers."""
    run_dir = tmp_path_factory.mktemp("gpu_reference") / "run"
    result = pretrain(recipe(corpus, run_dir, *ON_GPU, "data.loader.num_workers=2"))
    return run_dir, result


def test_a_gpu_run_writes_finite_losses_and_checkpoints_a_cpu_loads(gpu_reference):
    run_dir, result = gpu_reference
    assert result.steps == 9
    lines = read_metrics(run_dir / "metrics.jsonl", "step")
    assert [r["step"] for r in lines] == list(range(1, 10))
    assert all(torch.isfinite(torch.tensor(r["loss_total"])) and r["loss_total"] > 0 for r in lines)
    assert len(load_prototypes(run_dir / "prototypes", 1)[0].assignments) == N_CLIPS
    model = PCAVMAE(config.load_recipe(str(run_dir / "config.yaml")).model)
    ckpt.load_weights(run_dir / "checkpoints" / "last", model, MomentumEncoder(model), CPU)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())


def test_a_gpu_run_stopped_and_resumed_ends_with_the_uninterrupted_weights(corpus, gpu_reference, tmp_path):  # noqa: F811
    ref_dir, ref = gpu_reference
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):
        pretrain(recipe(corpus, run_dir, *ON_GPU, "data.loader.num_workers=2"), on_step=stop_at(5))
    result = pretrain(recipe(corpus, run_dir, *ON_GPU, "train.resume=true"))
    assert result.resumed_from_step == 5 and result.steps == 9
    mine, theirs = tensors_of(run_dir / "checkpoints" / "last"), tensors_of(ref_dir / "checkpoints" / "last")
    assert mine.keys() == theirs.keys()
    # Atomics in some CUDA backward kernels make two runs differ by rounding, and AdamW turns a
    # rounding-level gradient (an attention key bias has none) into a step of about lr: 2 lr.
    worst = {k: float((mine[k].float() - theirs[k].float()).abs().max()) for k in mine}
    assert max(worst.values()) < WEIGHT_TOL, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    for got, want in zip(result.epochs, ref.epochs):
        assert got["loss_total"] == pytest.approx(want["loss_total"], rel=1e-4)


def test_fine_tuning_on_the_gpu_runs_on_a_gpu_pretrained_model(gpu_reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_ft")
    train, held_out = write_corpus(root, 3, 4, name="train"), write_corpus(root, 3, 2, seed=1, name="eval")
    run_dir = root / "run"
    cfg = config.load_recipe("finetune_demo", [
        *TINY_FINETUNE, *ON_GPU, f"data.train_manifest={train}", f"data.eval_manifest={held_out}",
        f"data.label_csv={root / 'labels.csv'}", f"finetune.init_from={gpu_reference[0]}",
        f"train.run_dir={run_dir}", "finetune.epochs=2", "finetune.eval_every_epochs=1",
        "data.loader.num_workers=2",
    ])  # fmt: skip
    result = finetune(cfg)
    assert result.steps == 6
    epochs = read_metrics(run_dir / "metrics.jsonl", "epoch")
    assert len(epochs) == 2 and all(0 <= e["val_top1"] <= 1 and e["loss"] > 0 for e in epochs)


# ---------------------------------------------------------------- E-step


def test_kmeans_on_the_gpu_finds_the_cpus_clusters():
    """The same partition and centroids; compared up to the clusters' numbering, since a k-means++
    draw that falls within rounding of a boundary may pick another (equally good) start row."""
    x, _, _ = sphere_blobs(k=8, per=40, noise=0.3)
    want_centroids, want = spherical_kmeans(x, 8, iters=10, seed=3, comm=Comm())
    got_centroids, got = spherical_kmeans(x.to(GPU), 8, iters=10, seed=3, comm=Comm())
    assert got_centroids.device.type == "cuda"
    got, got_centroids = got.cpu(), got_centroids.cpu()
    same_as = {int(c): want[got == c].unique().tolist() for c in got.unique()}
    assert all(len(cpu) == 1 for cpu in same_as.values()), same_as  # each GPU cluster is one CPU cluster
    order = [same_as[c][0] for c in range(8)]
    assert sorted(order) == list(range(8))
    assert torch.allclose(got_centroids, want_centroids[order], atol=1e-5)
