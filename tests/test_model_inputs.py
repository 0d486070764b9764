"""Compact samples (uint8 frames, un-normalised fbank) normalised by ``model_inputs``: the same
model inputs, to the bit, as the normalised samples of before, for both layouts and frame policies."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import read_label_csv
from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.data.pack import pack_manifest
from tests.tiny_corpus import TINY_MODEL, write_corpus

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=[(16, 32), (24, 128)], ids=["crop-cut", "resize-pad"])
def corpus(request, tmp_path_factory):
    """6 labelled clips of 1 s (98 fbank rows) with 20 px frames, and their pack. A 16 px crop and
    32 rows: cropped and cut; 24 px and 128 rows: resized up first, and padded with zero rows."""
    root = tmp_path_factory.mktemp("compact")
    manifest = write_corpus(root, classes=2, per_class=3)
    crop, rows = request.param
    data = config.load_recipe(
        "demo", [*TINY_MODEL, f"data.video.crop_size={crop}", f"data.audio.fbank.target_frames={rows}"]
    ).data
    index = pack_manifest(manifest, root / "train" / "pack", data).index
    return {"plain": manifest, "packed": index}, data, read_label_csv(root / "labels.csv")


def reference(dataset: AudioVisualDataset, i: int, ks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip ``i`` as the loader normalised it before compact samples: the float operations of the
    old ``frames.decode_frame`` and ``fbank.padded_normalised``, written out (Python-number divisor)."""
    record, data = dataset.records[i], dataset.cfg
    f = data.audio.fbank
    log_mel = dataset.store.log_mel(i, record).float()
    padded = torch.zeros(f.target_frames, log_mel.shape[1])
    n = min(f.target_frames, log_mel.shape[0])
    padded[:n] = log_mel[:n]
    fbank = padded.sub_(f.mean).div_(f.std * f.std_scale)
    mean, std = torch.tensor(data.video.mean).view(-1, 1, 1), torch.tensor(data.video.std).view(-1, 1, 1)
    pictures = []
    for k in ks:
        image = decode_jpeg(dataset.store.frame_bytes(i, record, k)[0], mode=ImageReadMode.RGB)
        if min(image.shape[-2:]) < data.video.crop_size:
            image = TF.resize(image, data.video.crop_size, antialias=True)
        image = TF.center_crop(image, [data.video.crop_size] * 2)
        pictures.append(image.to(torch.float32).mul_(1 / 255).sub_(mean).div_(std))
    return fbank, torch.stack(pictures)


@pytest.mark.parametrize("layout", ["plain", "packed"])
@pytest.mark.parametrize("frames", ["random", "middle", "all"])
def test_compact_batches_normalised_on_the_device_are_the_normalised_samples_bit_for_bit(corpus, layout, frames):
    manifests, data, labels = corpus
    normalised = AudioVisualDataset(manifests[layout], data, frames, labels)
    compact = AudioVisualDataset(manifests[layout], data, frames, labels, compact=True)
    keys = [(i, 500 + i) for i in range(len(compact))]  # seeded random frames: the same draws
    raw = next(iter(DataLoader(compact, batch_sampler=[keys])))
    batch = model_inputs(raw, data, CPU)
    expected = next(iter(DataLoader(normalised, batch_sampler=[keys])))
    assert batch.keys() == expected.keys() == {"fbank", "frames", "label", "index"}
    for key in expected:
        assert batch[key].dtype == expected[key].dtype and torch.equal(batch[key], expected[key]), key
    # ... and both are what the loader computed before samples were compact.
    n_frames = data.video.n_frames
    for row, (i, seed) in enumerate(keys):
        ks = list(range(n_frames)) if frames == "all" else compact._frame_indices(
            compact.records[i], torch.Generator().manual_seed(seed) if frames == "random" else None)  # fmt: skip
        fbank, pictures = reference(compact, i, ks)
        assert torch.equal(batch["fbank"][row], fbank)
        assert torch.equal(batch["frames"][row], pictures if frames == "all" else pictures[0])


@pytest.mark.parametrize("layout, fbank_dtype", [("plain", torch.float32), ("packed", torch.float16)])
def test_a_compact_sample_ships_uint8_frames_and_the_stores_fbank(corpus, layout, fbank_dtype):
    manifests, data, _ = corpus
    s, t, m = data.video.crop_size, data.audio.fbank.target_frames, data.audio.fbank.num_mel_bins
    one = AudioVisualDataset(manifests[layout], data, "middle", compact=True)[0]
    every = AudioVisualDataset(manifests[layout], data, "all", compact=True)[0]
    assert one["frames"].dtype == every["frames"].dtype == torch.uint8
    assert one["fbank"].dtype == fbank_dtype
    assert one["frames"].shape == (3, s, s) and every["frames"].shape == (data.video.n_frames, 3, s, s)
    # The bytes a worker sends: a regression to float32 frames (or a float32 pack fbank) fails here.
    assert one["frames"].nbytes == 3 * s * s
    # ... and holds no more than that: not a view into the whole decoded 20 px frame.
    assert one["frames"].untyped_storage().nbytes() == 3 * s * s
    assert one["fbank"].nbytes == t * m * fbank_dtype.itemsize
    assert sum(v.nbytes for v in one.values()) == 3 * s * s + t * m * fbank_dtype.itemsize + 8  # + index


def test_model_inputs_refuses_a_normalised_batch_and_leaves_its_input_alone(corpus):
    manifests, data, _ = corpus
    normalised = next(iter(DataLoader(AudioVisualDataset(manifests["plain"], data, "middle"), batch_size=3)))
    with pytest.raises(ValueError, match="already normalised"):
        model_inputs(normalised, data, CPU)
    raw = next(iter(DataLoader(AudioVisualDataset(manifests["plain"], data, "middle", compact=True), batch_size=3)))
    kept = {k: v.clone() for k, v in raw.items()}
    first = model_inputs(raw, data, CPU)
    with pytest.raises(ValueError, match="already normalised"):  # applying it twice
        model_inputs(first, data, CPU)
    assert all(torch.equal(raw[k], kept[k]) for k in raw)  # float32 fbank on the CPU: not normalised in place
    second = model_inputs(raw, data, CPU)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_fbank_normalise_still_matches_the_formula():
    cfg = config.load_recipe("demo").data.audio.fbank
    x = torch.randn(50, 128) * 4 - 6
    assert torch.equal(fb.normalise(x, cfg), (x - cfg.mean) / (cfg.std * cfg.std_scale))
    assert torch.equal(fb.normalise(x.half(), cfg), (x.half().float() - cfg.mean) / (cfg.std * cfg.std_scale))
