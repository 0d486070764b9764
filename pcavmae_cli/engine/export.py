"""``pcav export RUN OUT``: the encoders (+ head) as one ONNX graph or a ``torch.export`` program.

What is exported reads what a loader yields, so a deployment only has to compute the log-Mel
fbank and grab frames:

- inputs ``fbank`` ``(B, T, F)`` float32, the log-Mel filterbank *before* normalisation (the
  recipe's Kaldi settings, padded or cut to ``T``: ``export.json`` lists them), and ``frames``
  ``(B, K, 3, S, S)`` uint8 RGB, centre-cropped; the corpus normalisation is inside the graph;
- a fine-tuned run gives ``scores`` ``(B, C)`` (the frames' probabilities averaged, as ``pcav
  evaluate`` and ``pcav predict`` score) and ``logits`` ``(B, K, C)``; a pre-training run gives
  the features ``z_a``, ``z_v`` (averaged over K), ``joint``, ``audio``, ``video``.

The batch size B and the frame count K are dynamic. ``OUT/export.json`` records the inputs,
outputs, label names and the fbank / frame settings; ``export`` checks the written file
against pcav's own forward on a random batch and records the largest difference
(``max_abs_diff``), so an export that does not reproduce pcav fails here, not in deployment.
ONNX uses the TorchScript exporter (opset 17) and runs under onnxruntime (the ``export``
extra); ``--format torch`` writes ``model.pt2`` (``torch.export``), loadable with
``torch.export.load`` wherever the same torch runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.predict import activation, backbone_features
from pcavmae_cli.engine.files import atomic_write_text
from pcavmae_cli.engine.inference import Model, load

Format = Literal["onnx", "torch"]
OPSET = 17
TOLERANCE = 1e-4  # largest |exported - pcav| accepted on the check batch (float32 on the CPU)


class _Normalise(nn.Module):
    """The corpus normalisation of ``model_inputs``, as graph operations."""

    def __init__(self, model: Model):
        super().__init__()
        data = model.cfg.data
        f = data.audio.fbank
        self.fbank_mean, self.fbank_div = float(f.mean), float(f.std * f.std_scale)
        self.register_buffer("pix_mean", torch.tensor(data.video.mean).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("pix_std", torch.tensor(data.video.std).view(1, 1, 3, 1, 1), persistent=False)

    def forward(self, fbank: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        return (fbank - self.fbank_mean) / self.fbank_div, (frames.float() / 255.0 - self.pix_mean) / self.pix_std


class ExportedClassifier(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.norm, self.classifier, self.label_mode = _Normalise(model), model.classifier, model.cfg.data.label_mode

    def forward(self, fbank: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        x, f = self.norm(fbank, frames)
        logits = self.classifier.frame_logits(x, f)  # (B, K, C)
        return activation(logits, self.label_mode).mean(dim=1), logits


class ExportedEncoder(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.norm, self.backbone = _Normalise(model), model.backbone

    def forward(self, fbank: Tensor, frames: Tensor) -> tuple[Tensor, ...]:
        x, f = self.norm(fbank, frames)
        feats = backbone_features(self.backbone, x, f)
        return tuple(feats[name] for name in ENCODER_OUTPUTS)


ENCODER_OUTPUTS = ("z_a", "z_v", "joint", "audio", "video")
CLASSIFIER_OUTPUTS = ("scores", "logits")


@dataclass
class ExportResult:
    out: Path
    files: list[Path]
    format: str
    outputs: tuple[str, ...]
    max_abs_diff: float  # exported vs pcav on the check batch


def example_inputs(model: Model, batch: int = 2, frames: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random batch of the exported inputs: log-Mel-like fbank and uint8 frames."""
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.data
    fbank = d.audio.fbank.mean + d.audio.fbank.std * torch.randn(batch, d.audio.fbank.target_frames,
                                                                 d.audio.fbank.num_mel_bins, generator=g)  # fmt: skip
    pixels = torch.randint(0, 256, (batch, frames, 3, d.video.crop_size, d.video.crop_size), generator=g, dtype=torch.uint8)
    return fbank, pixels


@torch.no_grad()
def reference_outputs(model: Model, fbank: Tensor, frames: Tensor) -> tuple[Tensor, ...]:
    """pcav's own forward on the same inputs (``Model.scores`` / ``Model.features``)."""
    if model.kind == "finetune":
        logits = model.frame_logits(fbank, frames)
        return model.probabilities(logits), logits
    feats = model.features(fbank, frames)
    return tuple(feats[name] for name in ENCODER_OUTPUTS)


def _run_onnx(path: Path, fbank: Tensor, frames: Tensor) -> list[Tensor]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("checking the ONNX file needs onnxruntime: pip install 'pcavmae-cli[export]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {"fbank": fbank.numpy(), "frames": frames.numpy()})]


def export(run: str | Path, out: str | Path, *, fmt: Format = "onnx", labels: str | Path | None = None) -> ExportResult:
    """Export ``run`` (a fine-tuned or pre-training run folder or checkpoint) into the folder ``out``."""
    if fmt not in ("onnx", "torch"):
        raise UserError(f"--format: expected onnx or torch, got '{fmt}'")
    model = load(run, device="cpu", labels=labels, overrides=["train.precision=fp32"])
    module = (ExportedClassifier(model) if model.kind == "finetune" else ExportedEncoder(model)).eval()
    outputs = CLASSIFIER_OUTPUTS if model.kind == "finetune" else ENCODER_OUTPUTS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fbank, frames = example_inputs(model)
    check_fbank, check_frames = example_inputs(model, batch=3, frames=3, seed=1)  # other B and K than traced
    if fmt == "onnx":
        path = out / "model.onnx"
        tmp = out / ".model.onnx.tmp"
        try:
            with torch.no_grad():
                torch.onnx.export(module, (fbank, frames), str(tmp), input_names=["fbank", "frames"],
                                  output_names=list(outputs), opset_version=OPSET, dynamo=False,
                                  dynamic_axes={"fbank": {0: "batch"}, "frames": {0: "batch", 1: "frames"},
                                                **{name: {0: "batch"} for name in outputs}})  # fmt: skip
        except ImportError as exc:  # torch's exporter imports onnx
            raise UserError(f"--format onnx needs {exc.name or 'onnx'}: pip install 'pcavmae-cli[export]'") from None
        tmp.replace(path)
        got = _run_onnx(path, check_fbank, check_frames)
    else:
        path = out / "model.pt2"
        batch, k = torch.export.Dim("batch", min=1), torch.export.Dim("frames", min=1)
        with torch.no_grad():
            program = torch.export.export(module, (fbank, frames), dynamic_shapes={"fbank": {0: batch}, "frames": {0: batch, 1: k}})
        tmp = out / ".model.tmp.pt2"
        torch.export.save(program, str(tmp))
        tmp.replace(path)
        with torch.no_grad():
            got = list(torch.export.load(str(path)).module()(check_fbank, check_frames))
    want = reference_outputs(model, check_fbank, check_frames)
    diff = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
    if diff > TOLERANCE:
        raise UserError(f"{path}: the exported model differs from pcav's forward by {diff:.2e} (> {TOLERANCE:g}); "
                        "please report it with the run's config.yaml")  # fmt: skip
    d = model.cfg.data
    meta = {
        "format": fmt, "file": path.name, "source": str(model.checkpoint.folder.resolve()), "kind": model.kind,
        "inputs": {"fbank": ["batch", d.audio.fbank.target_frames, d.audio.fbank.num_mel_bins, "float32, log-Mel, "
                             "not normalised"],
                   "frames": ["batch", "frames", 3, d.video.crop_size, d.video.crop_size, "uint8 RGB"]},
        "outputs": list(outputs), "label_mode": d.label_mode, "labels": model.labels,
        "fbank": {**asdict(d.audio.fbank), "sample_rate": d.audio.sample_rate},
        "frames": {"fps": d.video.fps, "short_side": d.video.short_side, "crop_size": d.video.crop_size},
        "max_abs_diff": diff, "tolerance": TOLERANCE,
    }  # fmt: skip
    files = [path, atomic_write_text(out / "export.json", json.dumps(meta, indent=2) + "\n")]
    if model.label_set is not None and model.cfg.data.label_csv:
        shutil.copyfile(model.cfg.data.label_csv, out / "labels.csv")
        files.append(out / "labels.csv")
    return ExportResult(out, files, fmt, outputs, diff)
