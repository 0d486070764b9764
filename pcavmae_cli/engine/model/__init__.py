"""PCAV-MAE model: blocks, embeddings, masking, backbone, decoder, momentum encoder, classifier."""

from pcavmae_cli.engine.model.backbone import Backbone, Embeddings, EncoderOutput, check_config
from pcavmae_cli.engine.model.classifier import Classifier, LoadReport, load_pretrained, load_pretraining_state
from pcavmae_cli.engine.model.momentum import MomentumEncoder
from pcavmae_cli.engine.model.pcavmae import PARTS, PCAVMAE, DecoderOutput, PCAVMAEOutput

__all__ = [
    "PARTS",
    "PCAVMAE",
    "Backbone",
    "Classifier",
    "DecoderOutput",
    "Embeddings",
    "EncoderOutput",
    "LoadReport",
    "MomentumEncoder",
    "PCAVMAEOutput",
    "check_config",
    "load_pretrained",
    "load_pretraining_state",
]
