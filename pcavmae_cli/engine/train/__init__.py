"""Pre-training: the loop (``pretrain``), its schedule, checkpoints, metrics and runtime.

- ``pretrain``: stages, E-step, M-step, resume (``pretrain.pretrain``);
- ``checks``: start-up checks of a recipe, each naming its key;
- ``runtime``: device, precision (bf16 autocast), seeds and RNG states;
- ``schedule``: linear warm-up + cosine per optimiser step, one schedule over all stages;
- ``optim``: AdamW with weight decay on weight matrices only;
- ``data``: the seeded epoch order and per-clip seeds, the training and E-step loaders;
- ``estep``: the momentum encoder embeds the training set, ``prototypes.estep`` clusters it;
- ``objective``: the loss parts of one batch and their weighted sum;
- ``checkpoint``: atomic ``checkpoints/last`` and ``best`` (safetensors + a weights-only state);
- ``metrics``: ``metrics.jsonl``;
- ``stop``: Ctrl-C / SIGTERM stop the loop at a safe point.
"""
