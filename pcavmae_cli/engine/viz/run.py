"""What the figures read from a run folder: recipe, weights, prototypes, clips and their labels.

A run folder (``runs/<name>/``) holds ``config.yaml``, ``checkpoints/{last,best}/`` and
``prototypes/prototypes-epochNNNN.safetensors``. Commands take either the run folder or one of
its checkpoint folders; ``open_run`` finds the other. Prototype assignments are rows of the
run's ``data.train_manifest`` (``engine/train/estep.py``), which is how member clips and
their labels are found.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pcavmae_cli.engine import run_folder
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import ClipRecord, read_label_csv, read_manifest
from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model import PCAVMAE, MomentumEncoder
from pcavmae_cli.engine.prototypes import Prototypes, joint_embedding, load_prototypes
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.train import checkpoint as ckpt

PROTO_FILE = re.compile(r"prototypes-epoch(\d{4,})\.(safetensors|pt)$")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def read_run_recipe(path: Path, overrides: Sequence[str] = ()) -> Recipe:
    """The resolved recipe a run (or checkpoint) folder stored as ``config.yaml``, its paths
    rebased to where the folder is now (``run_folder.read_run_recipe``), with ``overrides``."""
    return run_folder.read_run_recipe(path, overrides)


@dataclass
class RunView:
    """A run folder and, when it has one, a checkpoint of it."""

    run_dir: Path
    checkpoint: Path | None
    cfg: Recipe

    @property
    def plots(self) -> Path:
        return self.run_dir / "plots"

    def prototype_epochs(self) -> list[int]:
        """Epoch indices (0-based, as the trainer counts; the files are named by number) with a
        prototype file, ascending."""
        folder = self.run_dir / "prototypes"
        if not folder.is_dir():
            return []
        return sorted({int(m.group(1)) - 1 for p in folder.iterdir() if (m := PROTO_FILE.match(p.name))})

    def checkpoint_epoch(self) -> int | None:
        """The last epoch whose weights the checkpoint holds (``None`` without a checkpoint)."""
        if self.checkpoint is None:
            return None
        state = ckpt.load_state(self.checkpoint)["train"]
        return int(state["epoch"]) - (0 if state["position"] else 1)

    def latest_prototypes(self) -> tuple[int, list[Prototypes]]:
        """The prototypes of the checkpoint's epoch (or the latest before it); a clear error if none."""
        epochs = self.prototype_epochs()
        if not epochs:
            raise UserError(
                f"{self.run_dir} has no prototypes/ files: the run stopped in warm-up or its recipe has no "
                "prototypes"
            )
        limit = self.checkpoint_epoch()
        usable = [e for e in epochs if limit is None or e <= limit] or epochs
        epoch = usable[-1]
        return epoch, load_prototypes(self.run_dir / "prototypes", epoch)

    def train_clips(self) -> tuple[Path, list[ClipRecord]]:
        """The manifest the prototypes' assignments index, and its clips."""
        manifest = self.cfg.data.train_manifest
        if manifest is None:
            raise UserError(f"{self.run_dir / 'config.yaml'}: the run has no data.train_manifest")
        path = Path(manifest)
        if not path.is_absolute() and not path.is_file():
            path = self.run_dir / manifest
        if not path.is_file():
            raise UserError(f"{path}: the training manifest of {self.run_dir} (key 'data.train_manifest', whose clips "
                            "the prototypes group) is not found; pass data.train_manifest=PATH where it is now")
        return path, read_manifest(path)

    def label_names(self) -> dict[str, str]:
        """Label id -> display name from the run's label CSV (empty when there is none)."""
        csv = self.cfg.data.label_csv
        if not csv or not Path(csv).is_file():
            return {}
        labels = read_label_csv(csv)
        return dict(zip(labels.mids, labels.names))

    def load_model(self, device: torch.device) -> tuple[PCAVMAE, MomentumEncoder]:
        """The checkpoint's model and momentum encoder, loaded strictly, in eval mode."""
        if self.checkpoint is None:
            raise UserError(f"{self.run_dir} has no checkpoint (checkpoints/last)")
        if self.cfg.model is None:
            raise UserError(f"{self.checkpoint / 'config.yaml'}: the recipe has no model section")
        model = PCAVMAE(self.cfg.model).to(device)
        momentum = MomentumEncoder(model).to(device)
        ckpt.load_weights(self.checkpoint, model, momentum, device)
        return model.eval(), momentum.eval()


def open_run(path: str | Path, *, need_checkpoint: bool = True, overrides: Sequence[str] = ()) -> RunView:
    """A run folder or a checkpoint folder (``runs/x`` or ``runs/x/checkpoints/last``)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"not found: {path}")
    if all((path / f).is_file() for f in ckpt.FILES):  # a checkpoint folder
        checkpoint = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
        return RunView(run_dir, checkpoint, read_run_recipe(path / "config.yaml", overrides))
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is neither a run folder (with config.yaml) nor a checkpoint folder")
    checkpoint = ckpt.find_checkpoint(path, "last")
    if checkpoint is None and need_checkpoint:
        raise UserError(f"{path} has no complete checkpoints/last")
    source = checkpoint / "config.yaml" if checkpoint is not None else path / "config.yaml"
    return RunView(path, checkpoint, read_run_recipe(source, overrides))


def display(label: str, names: dict[str, str]) -> str:
    return names.get(label, label)


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """``range(n)``, or ``limit`` indices spread evenly over it."""
    if limit is None or n <= limit:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit).round()})


@dataclass
class ClipEmbeddings:
    """Unit-norm clip embeddings of the momentum encoder (the space prototypes live in)."""

    audio: torch.Tensor  # (N, proj_dim) z_a
    video: torch.Tensor  # (N, proj_dim) z_v
    joint: torch.Tensor  # (N, proj_dim) normalise(z_a + z_v), what the E-step clusters


@torch.no_grad()
def embed_clips(
    encoder: MomentumEncoder | PCAVMAE,
    dataset: AudioVisualDataset,
    indices: Sequence[int],
    device: torch.device,
    batch_size: int = 16,
) -> ClipEmbeddings:
    """Embed the clips ``indices`` of ``dataset`` (its frame policy; the E-step uses ``middle``),
    loaded as compact samples and normalised on ``device``, as the E-step does."""
    loader = DataLoader(Subset(dataset.compact_view(), list(indices)), batch_size=batch_size, shuffle=False)
    za, zv = [], []
    for batch in loader:
        batch = model_inputs(batch, dataset.cfg, device)
        emb = encoder.embed(batch["fbank"], batch["frames"])
        za.append(emb.z_a.float().cpu())
        zv.append(emb.z_v.float().cpu())
    if not za:
        empty = torch.zeros(0, 1)
        return ClipEmbeddings(empty, empty, empty)
    z_a, z_v = torch.cat(za), torch.cat(zv)
    return ClipEmbeddings(z_a, z_v, joint_embedding(z_a, z_v))


def find_clip(clip_id: str, manifests: Sequence[Path]) -> tuple[Path, int] | None:
    """The first manifest (and row) listing ``clip_id``."""
    for manifest in manifests:
        if manifest.is_file():
            for row, record in enumerate(read_manifest(manifest)):
                if record.id == clip_id:
                    return manifest, row
    return None
