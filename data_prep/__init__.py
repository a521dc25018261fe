"""Data preparation: turn raw corpora into verified files for training.

Training and evaluation read only what this package (or a task's own preparer, see
:mod:`pipeline.tasks`) wrote, never regenerate data on the fly, so a run can always be traced back
to exact bytes (each output folder carries a ``manifest.json`` with per-file sha256 hashes and a
fingerprint of the settings). Readers, the tokenizer, the shard writer, partition merging and
``verify`` live here; :mod:`data_prep.stages` holds the ``proseco prep`` verbs, ``prep sudoku``
included (it calls :func:`pipeline.tasks.sudoku.main`).
"""
