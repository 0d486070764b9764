"""PCAV-MAE model: blocks, embeddings, masking, backbone, decoder, momentum encoder."""

from pcavmae_cli.engine.model.backbone import Backbone, Embeddings, EncoderOutput, check_config
from pcavmae_cli.engine.model.momentum import MomentumEncoder
from pcavmae_cli.engine.model.pcavmae import PARTS, PCAVMAE, DecoderOutput, PCAVMAEOutput

__all__ = [
    "PARTS",
    "PCAVMAE",
    "Backbone",
    "DecoderOutput",
    "Embeddings",
    "EncoderOutput",
    "MomentumEncoder",
    "PCAVMAEOutput",
    "check_config",
]
