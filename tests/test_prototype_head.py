"""The prototype head and the faithfulness measures: exact explanations, gradients where the
recipe says, a fine-tuning run whose checkpoint evaluate and explain load, a deletion test whose
answer is known by construction, and the prototype share on hand-computed cases."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from pcavmae_cli.engine.data.manifest import read_manifest
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.runner import evaluate
from pcavmae_cli.engine.model import PCAVMAE, Classifier
from pcavmae_cli.engine.model.classifier import load_pretraining_state
from pcavmae_cli.engine.model.prototype_head import PrototypeHeadSpec
from pcavmae_cli.engine.prototypes.step import joint_embedding, load_prototypes
from pcavmae_cli.engine.tensor_io import read_safetensors
from pcavmae_cli.engine.train.finetune import finetune
from pcavmae_cli.engine.viz.contributions import prototype_head_decomposition, prototype_head_matrix
from pcavmae_cli.engine.viz.explain import Explainer
from pcavmae_cli.engine.viz.faithfulness import deletion_test, explained_share
from tests.test_finetune import corpus, ft_recipe, pretrained, tiny_model_cfg  # noqa: F401 (fixtures)

SIZES = (2, 3)


def tiny_prototype_classifier(mode: str, trainable: bool = False, temperature: float = 0.1) -> Classifier:
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = Classifier(cfg, 4, mode, PrototypeHeadSpec(SIZES, trainable, temperature))
    load_pretraining_state(model, PCAVMAE(cfg).state_dict(), "a fresh PCAV-MAE")
    model.head.set_prototypes(F.normalize(torch.randn(sum(SIZES), cfg.proj_dim), dim=1))
    torch.nn.init.normal_(model.head.linear.bias)
    return model


def tiny_inputs(cfg, batch: int = 3):
    torch.manual_seed(1)
    return torch.randn(batch, cfg.audio_frames, cfg.mel_bins), torch.randn(batch, 3, cfg.image_size, cfg.image_size)


# ---------------------------------------------------------------- the head itself


@pytest.mark.parametrize("mode", ["av", "a", "v", "sum"])
def test_the_prototype_heads_logits_are_exactly_bias_plus_contributions(mode):
    model = tiny_prototype_classifier(mode).eval()
    fbank, frames = tiny_inputs(model.cfg)
    with torch.no_grad():
        logits = model(fbank, frames)
        a = model.encode_audio(fbank) if model.uses_audio else None
        v = model.encode_video(frames) if model.uses_video else None
        s = model.head_input(a, v)  # (B, P)
        # The similarities are the E-step's: cos of the clip's embedding to the prototypes, over T.
        z_a = F.normalize(model.proj_a(model.joint(a, "a").mean(1)), dim=-1) if a is not None else None
        z_v = F.normalize(model.proj_v(model.joint(v, "v").mean(1)), dim=-1) if v is not None else None
        e = joint_embedding(z_a, z_v) if mode in ("av", "sum") else (z_a if mode == "a" else z_v)
        assert torch.allclose(s, e @ model.head.prototypes.T / 0.1, atol=1e-5)
    W, b = model.head.linear.weight.detach(), model.head.linear.bias.detach()
    for i in range(len(fbank)):
        matrix = prototype_head_matrix(s[i], W)  # (P, C)
        assert torch.allclose(matrix.sum(0) + b.double(), logits[i].double(), atol=1e-5)
        for c in range(4):
            for level, cols in enumerate(model.head.level_slices()):
                d = prototype_head_decomposition(s[i], W[c], float(b[c]), cols, listed=2)
                assert d.residual == 0.0 and d.base == pytest.approx(float(b[c]))
                assert d.base + sum(d.contributions) + d.other + d.residual == pytest.approx(float(logits[i, c]), abs=1e-5)
                assert d.logit == pytest.approx(float(logits[i, c]), abs=1e-5)
                assert len(d.contributions) == min(2, SIZES[level])
                assert explained_share(d.explained, d.residual) == 1.0


@pytest.mark.parametrize("trainable", [False, True])
def test_gradient_reaches_the_weights_and_the_prototypes_only_when_trainable(trainable):
    model = tiny_prototype_classifier("av", trainable=trainable).train()
    fbank, frames = tiny_inputs(model.cfg)
    F.cross_entropy(model(fbank, frames), torch.tensor([0, 1, 2])).backward()
    assert model.head.linear.weight.grad is not None and model.head.linear.weight.grad.abs().sum() > 0
    assert model.proj_a.weight.grad.abs().sum() > 0  # the projections fine-tune with the encoders
    names = {n for n, _ in model.named_parameters()}
    if trainable:
        assert "head.prototypes" in names and model.head.prototypes.grad.abs().sum() > 0
    else:
        assert "head.prototypes" not in names and model.head.prototypes.grad is None
    assert "head.prototypes" in model.state_dict() and "head.sizes" in model.state_dict()  # saved either way


def test_a_linear_classifier_still_drops_the_projections():
    cfg = tiny_model_cfg()
    model = Classifier(cfg, 3, "av")
    report = load_pretraining_state(model, PCAVMAE(cfg).state_dict(), "x")
    assert not hasattr(model, "proj_a") and any(k.startswith("backbone.proj_a.") for k in report.dropped)


# ---------------------------------------------------------------- faithfulness


def test_deletion_of_the_only_two_prototypes_that_matter_drops_the_logit_to_the_bias():
    """Class 0's logit depends on prototypes 2 and 7 only: removing them leaves the bias; removing
    any two others changes nothing, in every random draw."""
    P, C = 10, 3
    s = torch.linspace(0.5, 1.4, P)
    W = torch.zeros(C, P)
    W[0, 2], W[0, 7] = 1.0, 3.0  # contributions 0.7 and 3.0 * 1.2 = 3.6
    W[1] = 0.1  # class 1 depends on all of them a little
    b = torch.tensor([0.5, 0.0, -1.0])
    contributions = prototype_head_matrix(s, W)
    logits = contributions.sum(0) + b.double()
    result = deletion_test(logits, contributions, 0, n=2, draws=7, ids=list(range(100, 110)))
    assert result.deleted == [107, 102] and result.n == 2 and result.draws == 7
    assert result.top_logit_drop == pytest.approx(float(logits[0]) - 0.5)  # back to the bias
    assert result.random_logit_drop == 0.0
    p_before = torch.softmax(logits, 0)[0]
    after = logits - contributions[[2, 7]].sum(0)
    assert result.top_probability_drop == pytest.approx(float(p_before - torch.softmax(after, 0)[0]))
    assert result.top_probability_drop > 0
    # Removing others lowers class 1's logit by 0.1 x s, so class 0's probability can only rise.
    assert result.random_probability_drop < 0

    multi = deletion_test(logits, contributions, 0, n=2, label_mode="multi_hot")
    assert multi.top_probability_drop == pytest.approx(float(torch.sigmoid(logits[0]) - torch.sigmoid(logits[0] - 4.3)))
    assert multi.random_probability_drop == 0.0


def test_deletion_with_no_other_prototype_has_no_random_draw():
    contributions = torch.tensor([[1.0], [2.0]])
    result = deletion_test(contributions.sum(0), contributions, 0, n=2)
    assert result.deleted == [1, 0] and result.top_logit_drop == 3.0
    assert result.draws == 0 and result.random_logit_drop is None and result.random_probability_drop is None


@pytest.mark.parametrize(
    "explained, residual, share",
    [(3.0, 1.0, 0.75), (-3.0, 1.0, 0.75), (3.0, -1.0, 0.75), (-0.13, 2.86, 0.13 / 2.99), (0.0, 2.0, 0.0), (2.0, 0.0, 1.0),
     (0.0, 0.0, None)],
)  # fmt: skip
def test_prototype_share_on_hand_computed_cases(explained, residual, share):
    got = explained_share(explained, residual)
    assert got == share if share is None else got == pytest.approx(share)


# ---------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def prototype_run(corpus, pretrained, tmp_path_factory):  # noqa: F811 (fixtures)
    run_dir = tmp_path_factory.mktemp("ft_proto") / "run"
    cfg = ft_recipe(corpus, pretrained, run_dir, "finetune.head=prototype", "finetune.epochs=2")
    return run_dir, finetune(cfg)


def test_fine_tuning_with_the_prototype_head_saves_the_prototypes_evaluate_and_explain_load(
    corpus, pretrained, prototype_run, tmp_path  # noqa: F811 (fixtures)
):  # fmt: skip
    run_dir, result = prototype_run
    weights = read_safetensors(result.last / "model.safetensors")
    levels = load_prototypes(pretrained / "prototypes", 2)  # the last epoch's: frozen, saved as they were
    assert torch.equal(weights["head.prototypes"], torch.cat([p.centroids.float() for p in levels]))
    assert weights["head.sizes"].tolist() == [len(p.counts) for p in levels]
    assert "proj_a.weight" in weights and weights["head.linear.weight"].shape == (3, sum(len(p.counts) for p in levels))

    ev = evaluate("classification", run_dir, corpus["eval"], out=tmp_path / "eval")
    assert 0 <= ev.metrics["top1"] <= 1 and json.loads((tmp_path / "eval/metrics.json").read_text())["n_clips"] == 6

    explainer = Explainer(run_dir, data=corpus["eval"], device="cpu", top=1, exemplars=1, candidates=4)
    ex = explainer.explain(read_manifest(corpus["eval"])[0].id)
    p = ex.prediction
    assert p.head == "prototype" and len(p.decompositions) == len(p.faithfulness) == len(levels)
    for d, f in zip(p.decompositions, p.faithfulness):
        assert d.residual == 0.0 and d.base + d.explained == pytest.approx(d.logit, abs=1e-5)
        assert f.share == 1.0 and f.deletion.n == min(3, len(d.contributions))
    data = ex.to_json()["prediction"]
    assert data["faithfulness"][0]["share"] == 1.0 and "top_logit_drop" in data["faithfulness"][0]["deletion"]


def test_the_linear_heads_explanation_reports_its_faithfulness(corpus, pretrained, tmp_path):  # noqa: F811
    run_dir = tmp_path / "linear"
    finetune(ft_recipe(corpus, pretrained, run_dir, "finetune.epochs=1"))
    ex = Explainer(run_dir, data=corpus["eval"], device="cpu", top=1, exemplars=1, candidates=4).explain(read_manifest(corpus["eval"])[0].id)
    p = ex.prediction
    assert p.head == "linear" and len(p.faithfulness) == len(p.decompositions)
    for d, f in zip(p.decompositions, p.faithfulness):
        assert f.share == pytest.approx(explained_share(d.explained, d.residual)) and d.other == 0.0
        assert f.deletion.n == min(3, len(d.prototypes)) and set(f.deletion.deleted) <= set(d.prototypes)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.init_from=null"], "key 'finetune.head' is 'prototype', which needs 'finetune.init_from'"),
        (["finetune.prototype_head=null"], "needs the section 'finetune.prototype_head'"),
        (["finetune.prototype_head.temperature=0"], "key 'finetune.prototype_head.temperature' must be > 0"),
    ],
)
def test_the_prototype_head_refuses_what_it_cannot_use_naming_the_key(corpus, pretrained, tmp_path, overrides, message):  # noqa: F811
    cfg = ft_recipe(corpus, pretrained, tmp_path / "run", "finetune.head=prototype", *overrides)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_prototype_head_refuses_a_run_without_prototypes(corpus, pretrained, tmp_path):  # noqa: F811
    bare = tmp_path / "bare"
    shutil.copytree(pretrained, bare)
    shutil.rmtree(bare / "prototypes")
    with pytest.raises(UserError, match="key 'finetune.head' is 'prototype' but the pre-training run .* has no prototypes"):
        finetune(ft_recipe(corpus, bare, tmp_path / "run", "finetune.head=prototype"))
