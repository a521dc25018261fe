"""Shared test set-up: one CPU thread (other jobs may share the machine) and a tiny backbone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model import Backbone

torch.set_num_threads(1)
# DeepSpeed JIT-builds its CPU shared-memory op (two C++ compiles, ~1 min of both cores) into
# TORCH_EXTENSIONS_DIR: one folder for the in-process runs and every subprocess (they inherit it), so
# a checkout builds it once (the default, ~/.cache, is shared by every checkout's venv and rebuilt
# whenever another checkout used it)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))


@pytest.fixture(autouse=True)
def _one_thread_after_each_test():
    """A stage run in-process with parallel.threads=N sets torch's threads for the whole worker:
    put it back, or every later test on that worker would share 2 cores with the other worker
    at N threads (oversubscribed, several times slower)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks into node ids
def pytest_collection_modifyitems(config, items):
    """Groups for ``pytest -n 2 --dist loadgroup`` (``make test``): each test file runs in one worker, so
    its module fixtures (reference runs) are built once; every SLURM test runs in one worker, so two
    jobs never wait for each other's nodes on the 2-node test cluster. Without pytest-xdist the marks
    are inert."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.path.stem
        if group == "test_train" and ("deepspeed" in item.name or "megatron" in item.name):
            group = "test_train_engines"  # the longest file in two (both build the DDP reference)
        item.add_marker(pytest.mark.xdist_group(group))
    # The longest groups first, so that neither worker is left with one of them at the end: the SLURM
    # tests (mostly waiting on the cluster) and the science test (a few minutes of training).
    first = ("slurm", "test_science", "test_train_engines", "test_train")
    items.sort(key=lambda item: next((i for i, g in enumerate(first)
                                      if item.get_closest_marker("xdist_group").args[0] == g), len(first)))


def pytest_collection_finish(session):
    """Refuse to run when ``--dist loadgroup`` did not group: pytest-xdist 3.8 writes the group into a
    private node-id field that pytest 9.2 no longer reads, so the tests would silently spread over
    both workers (SLURM jobs then wait on each other's nodes and time out)."""
    if getattr(session.config.option, "loadgroup", False) and session.items and "@" not in session.items[0].nodeid:
        raise pytest.UsageError("pytest-xdist's --dist loadgroup did not group the tests on this pytest "
                                f"({pytest.__version__}); install the versions pinned in pyproject.toml's dev extra")


# The tiny model used across the model / objective / sampling tests: tokens 0..4 are "real",
# 5 is the mask id (the last row of the embedding).
TINY = {"vocab_size": 6, "hidden": 32, "layers": 2, "heads": 2, "max_seq_len": 12, "learned_positions": True}


def build_tiny(seed: int = 0, **overrides) -> Backbone:
    """A freshly initialised float64 tiny Backbone in eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    return Backbone(ModelConfig(**{**TINY, **overrides})).double().eval()


@pytest.fixture
def tiny_model() -> Backbone:
    return build_tiny()


@pytest.fixture
def tiny_factory():
    """``tiny_factory(seed=0, **ModelConfig overrides)`` -> float64 Backbone in eval mode."""
    return build_tiny


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Tokenizer + shards of the bundled corpus (vocab 512, 32-token sequences), once per session."""
    from train_utils import ROOT, _env

    root = tmp_path_factory.mktemp("text")
    prep = ["--config", "text", f"prep.tokenizer_dir={root / 'tok'}", f"data.shards={root / 'shards'}",
            "model.vocab_size=512", "data.seq_len=32", "model.max_seq_len=32"]
    for target in ("tokenizer", "shards"):
        subprocess.run([sys.executable, "-m", "pipeline", "prep", target, *prep], cwd=ROOT, env=_env(),
                       check=True, capture_output=True)
    return root / "shards"


