"""Training checkpoints: the engine's resumable checkpoint folders (``manager``), the sharded
format written through torch.distributed.checkpoint (``sharded``, ``checkpoint.format: sharded``)
and the ``proseco ckpt`` tools that inspect, convert and read them (``tools``).

Models are loaded through :func:`pipeline.artifact.load_model` (checkpoint, run or export folder).
"""
