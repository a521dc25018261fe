"""Data preparation: turn task generators and raw corpora into verified files for training.

Training and evaluation read only what this package wrote, never regenerate data on the
fly, so a run can always be traced back to exact bytes (each output folder carries a
``manifest.json`` with per-file sha256 hashes and a fingerprint of the settings).

Today it holds :mod:`data_prep.sudoku`, which materialises the 4x4 Sudoku demo task. Corpus
tokenization and webdataset sharding for the language-model runs will live here as well.
"""
