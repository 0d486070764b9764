"""The E-step of PCAV-MAE: prototypes of the joint clip embedding (paper sec. 2.2, eq. 2).

- ``kmeans``: shard-parallel spherical k-means (``spherical_kmeans`` = ``assign`` +
  ``accumulate`` + an all-reduce), PCL's clustering.
- ``density_peaks``: xDNN / ADP density peaks, the paper's clustering.
- ``concentration``: member means and gamma of eq. 2.
- ``step``: ``estep``, one ``Prototypes`` per granularity, and their per-epoch files.
- ``comm``: the single collective (sum all-reduce) all of them use.
"""

from pcavmae_cli.engine.prototypes.comm import Comm, TorchComm, default_comm
from pcavmae_cli.engine.prototypes.concentration import (
    cluster_means,
    concentration,
    normalise_concentration,
    raw_concentration,
)
from pcavmae_cli.engine.prototypes.density_peaks import cauchy_density, density_peaks
from pcavmae_cli.engine.prototypes.step import (
    Prototypes,
    build_prototypes,
    estep,
    joint_embedding,
    load_prototypes,
    prototypes_active,
    save_prototypes,
)
from pcavmae_cli.engine.prototypes.kmeans import accumulate, assign, kmeans_step, spherical_kmeans

__all__ = [
    "Comm",
    "Prototypes",
    "TorchComm",
    "accumulate",
    "assign",
    "build_prototypes",
    "cauchy_density",
    "cluster_means",
    "concentration",
    "default_comm",
    "density_peaks",
    "estep",
    "joint_embedding",
    "kmeans_step",
    "load_prototypes",
    "normalise_concentration",
    "prototypes_active",
    "raw_concentration",
    "save_prototypes",
    "spherical_kmeans",
]
