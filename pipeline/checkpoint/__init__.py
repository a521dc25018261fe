"""Training checkpoints: the engine's resumable checkpoint folders (``manager``) and the
``proseco ckpt`` tools that inspect, convert and read them (``tools``).

Models are loaded through :func:`pipeline.artifact.load_model` (checkpoint, run or export folder).
"""
