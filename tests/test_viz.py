"""Figures: cluster metrics by hand, the logit decomposition, and every `pcav visualize` command on a
trained demo run (files exist, are PNGs of the expected size, HTML links only existing files)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from pcavmae_cli.engine.viz.cluster_metrics import label_makeup, majority_label, nmi, purity
from pcavmae_cli.engine.viz.contributions import decompose_logit, direction_coefficients
from pcavmae_cli.engine.viz.curves import curves_figure, plotted_keys
from tests.cli_helpers import pcav


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a valid PNG; fails on anything else."""
    assert path.is_file(), f"missing {path}"
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is {image.format}"
        image.verify()
    with Image.open(path) as image:
        return image.size


def html_links(path: Path) -> list[Path]:
    """Every src/href of an HTML page, resolved against its folder; asserts that each exists."""
    refs = re.findall(r'(?:src|href)="([^"]+)"', path.read_text(encoding="utf-8"))
    paths = [path.parent / ref for ref in refs]
    missing = [str(p) for p in paths if not p.is_file()]
    assert not missing, f"{path} links to missing files: {missing}"
    assert all("://" not in ref and not ref.startswith("/") for ref in refs)  # self-contained, relative
    return paths


# ----------------------------------------------------------------------------- cluster metrics


def test_purity_and_nmi_match_hand_computed_values():
    assignments = [0, 0, 0, 1, 1, 1]
    labels = [["a"], ["a"], ["b"], ["b"], ["b"], ["b"]]
    # Cluster 0 holds a, a, b (majority a: 2 hits), cluster 1 holds b, b, b (3 hits).
    assert purity(assignments, labels) == pytest.approx(5 / 6)
    # NMI by hand (natural logs): H(labels) = -(1/3 ln 1/3 + 2/3 ln 2/3), H(clusters) = ln 2,
    # MI = 2/6 ln(2/6 / (1/2 * 2/6)) + 1/6 ln(1/6 / (1/2 * 4/6)) + 3/6 ln(3/6 / (1/2 * 4/6)).
    h_y = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    h_c = math.log(2)
    mi = 1 / 3 * math.log(2) + 1 / 6 * math.log(1 / 2) + 1 / 2 * math.log(3 / 2)
    assert nmi(assignments, labels) == pytest.approx(mi / ((h_y + h_c) / 2))
    assert nmi(assignments, labels) == pytest.approx(0.47870, abs=1e-5)


def test_perfect_and_unlabelled_clusterings():
    assert purity([1, 1, 0, 0], [["x"], ["x"], ["y"], ["y"]]) == 1.0
    assert nmi([1, 1, 0, 0], [["x"], ["x"], ["y"], ["y"]]) == pytest.approx(1.0)
    # Unlabelled clips are left out; with none labelled there is nothing to measure.
    assert purity([0, 0, 1], [["x"], [], ["y"]]) == 1.0
    assert purity([0, 1], [[], []]) is None and nmi([0, 1], [[], []]) is None
    with pytest.raises(ValueError):
        purity([0, 1], [["x"]])


def test_multilabel_makeup_majority_and_purity():
    members = [["speech", "music"], ["music"], ["dog"], []]
    # Shares are over the 3 labelled members; a clip counts once per label.
    assert label_makeup(members) == [("music", 2 / 3), ("dog", 1 / 3), ("speech", 1 / 3)]
    assert majority_label(members) == "music"
    # One cluster: music is the majority, and 2 of the 3 labelled clips carry it.
    assert purity([0, 0, 0, 0], members) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- decomposition


def test_logit_decomposition_adds_up_exactly():
    g = torch.Generator().manual_seed(0)
    d, r = 24, 5
    h, w, mu = torch.randn(d, generator=g), torch.randn(d, generator=g), torch.randn(d, generator=g)
    centres = torch.randn(r, d, generator=g)
    pi = torch.softmax(torch.randn(r, generator=g), 0) * 0.9  # any coefficients: the residual takes the rest
    dec = decompose_logit(h, w, 0.3, pi, centres, mu, [4, 0, 2, 1, 3])
    assert dec.logit == pytest.approx(float(w.double() @ h.double()) + 0.3, abs=1e-9)
    assert dec.base + dec.explained + dec.residual == pytest.approx(dec.logit, abs=1e-9)
    assert dec.contributions[0] == pytest.approx(float(pi[0] * w @ (centres[0] - mu)), rel=1e-6)
    # A clip sitting exactly on a prototype it fully belongs to leaves no residual.
    one = decompose_logit(centres[2], w, 0.3, torch.tensor([1.0]), centres[2:3], mu, [2])
    assert one.residual == pytest.approx(0.0, abs=1e-9)
    assert one.contributions[0] == pytest.approx(float(w @ (centres[2] - mu)), rel=1e-6)


def test_direction_coefficients_scale_the_posterior_mix():
    g = torch.Generator().manual_seed(1)
    mu, centres = torch.randn(16, generator=g), torch.randn(4, 16, generator=g)
    pi = torch.tensor([0.1, 0.5, 0.3, 0.1])
    mix = (pi[:, None] * (centres - mu)).sum(0)
    # A clip twice as far out as its posterior mix, plus something orthogonal to it.
    other = torch.randn(16, generator=g)
    other -= (other @ mix) / (mix @ mix) * mix
    a = direction_coefficients(mu + 2 * mix + other, centres, mu, pi)
    assert a.tolist() == pytest.approx((2 * pi).tolist(), rel=1e-6)
    dec = decompose_logit(mu + 2 * mix + other, other, 0.0, a, centres, mu, [0, 1, 2, 3])
    assert dec.residual == pytest.approx(float(other.double() @ other.double()), rel=1e-6)
    # A clip on the far side of the average clip from its mix gets no prototype at all.
    assert direction_coefficients(mu - mix, centres, mu, pi).tolist() == [0.0] * 4


# ----------------------------------------------------------------------------- curves


def test_curves_panels_skip_null_parts_and_keep_unknown_metrics(tmp_path):
    rows = [
        {"kind": "step", "step": s, "epoch": s // 2, "stage": "a" if s < 4 else "b", "lr": 0.1 * s,
         "loss_total": 2.0 / s, "loss_r": 1.0 / s, "loss_r_a": 0.4 / s, "loss_r_v": 0.6 / s, "loss_pcpe": None,
         "prototypes": s > 2, "time": 1.0}
        for s in range(1, 7)
    ] + [
        {"kind": "epoch", "step": 2 * e + 2, "epoch": e, "stage": "a" if e < 2 else "b", "lr": 0.1, "loss_total": 1.0,
         "loss_r": 0.5, "loss_r_a": 0.2, "loss_r_v": 0.3, "loss_pcpe": None, "prototypes": e > 0,
         "num_prototypes": [2, 4] if e > 0 else None, "top1": 0.5 + 0.1 * e}
        for e in range(3)
    ]  # fmt: skip
    panels, empty = plotted_keys(rows)
    assert panels[:2] == [["loss_total"], ["loss_r", "loss_r_a", "loss_r_v"]]
    assert ["top1"] in panels and ["num_prototypes"] in panels
    assert empty == ["loss_pcpe"]
    # 5 panels in 3 columns and 2 rows: 18 x (3.6 x 2 + 2) inches at 100 dpi.
    assert png_size(curves_figure(rows, tmp_path / "c.png")) == (1800, 920)


# ----------------------------------------------------------------------------- on a trained demo run


def cli(*args: str):
    """``pcav ARGS`` in this process (Typer's runner): the commands' wiring without a new interpreter."""
    from typer.testing import CliRunner

    from pcavmae_cli.cli.app import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_visualize_commands_write_their_files(trained_demo_run, tmp_path):
    run, train = trained_demo_run.run_dir, trained_demo_run.train_manifest

    cli("visualize", "curves", str(run))
    # 19 panels (total, InfoNCE, r, PJE, PCPE, the validation's kNN, retrieval, purity and NMI,
    # lr, throughput, prototypes, the largest prototype's share, gamma, epoch time, and the
    # health quantities: mean cosine, effective rank, prototype spread, agreement): 3 x 7.
    assert png_size(run / "plots/curves.png") == (1800, 2720)

    tsne = cli("visualize", "tsne", "--checkpoint", str(run), "--data", str(train), "--out", str(tmp_path / "t.png"))
    assert "15 clips, 3 classes, 6 prototypes shown" in tsne
    assert png_size(tmp_path / "t.png") == (1800, 760)

    cli("visualize", "reconstruct", "--checkpoint", str(run / "checkpoints/last"), "--n", "2")
    # 15 in wide; per clip 3.4 + 2.0 + 0.45 in, plus 1.5 in of titles.
    assert png_size(run / "plots/reconstruct.png") == (1500, round(100 * (2 * 5.85 + 1.5)))

    protos = cli("visualize", "prototypes", str(run), "--top", "3", "--members", "2")
    assert re.search(r"granularity 1: 6 prototypes, purity \d\.\d{3}, NMI \d\.\d{3}", protos)
    folder = run / "plots/prototypes"
    linked = html_links(folder / "index.html")
    assert {p.name for p in linked} == {"gallery-granularity0.png", "gallery-granularity1.png", "evolution.png"}
    # (4.2 + 2.3 x members) in wide; 3.1 in per prototype row plus 1.6 in of titles.
    assert png_size(folder / "gallery-granularity0.png") == (880, 1090)
    assert png_size(folder / "evolution.png") == (1800, 460)

    # The real entry point: a user error is one line and exit status 1.
    bad = pcav("visualize", "tsne", "--checkpoint", str(tmp_path), "--data", str(train))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "neither a run folder" in bad.stderr


def test_demo_figures_returns_every_file(trained_demo_run, tmp_path):
    from pcavmae_cli.engine.viz.report import demo_figures

    files = demo_figures(trained_demo_run.run_dir, trained_demo_run.train_manifest, device="cpu")
    names = [p.relative_to(trained_demo_run.run_dir / "plots").as_posix() for p in files]
    assert names == [
        "curves.png", "tsne.png", "reconstruct.png", "prototypes/gallery-granularity0.png",
        "prototypes/gallery-granularity1.png", "prototypes/evolution.png", "explain/demo0015_0/explain.png",
        "prototypes/index.html", "explain/demo0015_0/explain.html", "explain/demo0015_0/explain.json",
    ]  # fmt: skip
    for path in files:
        if path.suffix == ".png":
            width, height = png_size(path)
            assert width >= 800 and height >= 400
        elif path.suffix == ".html":
            html_links(path)


def test_a_figure_is_written_in_the_format_its_name_asks_for(tmp_path):
    """-o x.pdf gives a PDF and -o x.svg an SVG (papers want vector figures), a .jpg is refused
    before any work, in one line."""
    rows = [{"kind": "epoch", "step": 2 * e + 2, "epoch": e, "stage": "a", "lr": 0.1, "loss_total": 1.0 / (e + 1),
             "samples_per_s": 10.0, "time": 1.0} for e in range(3)]  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heads = {"x.pdf": b"%PDF", "x.svg": b"<?xml", "x.png": b"\x89PNG"}
    for name, head in heads.items():
        result = pcav("visualize", "curves", str(metrics), "-o", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        assert (tmp_path / name).read_bytes().startswith(head), name
    bad = pcav("visualize", "curves", str(metrics), "-o", str(tmp_path / "x.jpg"))
    assert bad.returncode == 1 and ".png, .pdf or .svg" in bad.stderr and bad.stderr.count("\n") == 1
    assert not (tmp_path / "x.jpg").exists()


def test_a_class_keeps_its_colour_whichever_classes_a_figure_shows():
    from pcavmae_cli.engine.viz import draw

    order = ["dog", "cat", "bird"]  # the run's label CSV
    two, one = draw.class_palette(order, ["bird", "dog"]), draw.class_palette(order, ["bird"])
    assert two["bird"] == one["bird"] and two["dog"] != two["bird"]
    assert draw.class_palette(order, ["zebra"])["zebra"] not in draw.class_palette(order, order).values()
    audioset = [f"class {i}" for i in range(527)]
    some = draw.class_palette(audioset, audioset[:30])
    assert len(set(some.values())) == 30 and some["class 3"] == draw.class_palette(audioset, ["class 3"])["class 3"]
