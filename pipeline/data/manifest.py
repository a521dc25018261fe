"""The loader's view of a shard folder: ``manifest.json`` loaded and checked (``docs/data_format.md``).

Names, dtypes and the fingerprint come from :mod:`pipeline.data.format`, which the writer uses too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.format import DTYPES, FORMAT, MANIFEST, SFT_MODE, manifest_fingerprint, sample_length
from pipeline.errors import ProsecoError


@dataclass(frozen=True)
class Shard:
    """One tar of a split: its manifest name, absolute path, exact sample count and sha256."""

    name: str
    path: Path
    samples: int
    sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A checked ``manifest.json``: use :meth:`load`, then :meth:`shards` for a split."""

    root: Path
    data: dict

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    @property
    def seq_len(self) -> int:
        return int(self.data["seq_len"])

    @property
    def sft(self) -> bool:
        """Prompt/response samples (``prep sft``): each carries its prompt length."""
        return self.data.get("mode") == SFT_MODE

    @property
    def sample_len(self) -> int:
        """Entries of one stored sample (:func:`pipeline.data.format.sample_length`)."""
        return sample_length(self.seq_len, str(self.data.get("mode")))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.data["dtype"]])

    @property
    def special(self) -> dict[str, int]:
        return dict(self.data["tokenizer"]["special"])

    @property
    def pad_id(self) -> int:
        return int(self.special["pad"])

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def shards(self, split: str) -> list[Shard]:
        """The split's shards in manifest order (split, partition, shard)."""
        if split not in self.data["splits"]:
            raise ProsecoError(f"{self.root / MANIFEST} has no split {split!r} "
                               f"(it has {', '.join(sorted(self.data['splits'])) or 'none'})")
        return [Shard(s["name"], self.root / s["name"], int(s["samples"]), s.get("sha256"))
                for s in self.data["splits"][split]["shards"]]

    @classmethod
    def load(cls, path: str | Path, verify_sha256: bool = False) -> Manifest:
        """Load ``path`` (a ``manifest.json`` or the folder holding it) and check it.

        Checks the format key, the fingerprint (recomputed, so a hand-edited manifest is
        refused), the split tables (per-shard counts sum to the split's count) and that every
        shard file exists; with ``verify_sha256`` also each shard's checksum (reads every byte).
        Any failure raises :class:`ProsecoError` naming the file and the fix.
        """
        path = Path(path)
        file = path / MANIFEST if path.is_dir() else path
        root = file.parent
        redo = f"re-run `proseco prep shards` to rewrite {root}"
        if not file.is_file():
            raise ProsecoError(f"no shard manifest at {file} (an incomplete prep writes none); {redo}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProsecoError(f"cannot read shard manifest {file}: {exc}; {redo}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ProsecoError(f"{file} is not a shard manifest of format {FORMAT!r} (format: {got!r}); {redo}")
        if "fingerprint" not in data:
            raise ProsecoError(f"{file} has no fingerprint; {redo}")
        if data["fingerprint"] != manifest_fingerprint(data):
            raise ProsecoError(f"{file} was modified after it was written (its fingerprint does not match "
                               f"its contents); {redo} rather than editing the manifest")
        try:
            np.dtype(DTYPES[data["dtype"]])
            int(data["seq_len"])
            int(data["tokenizer"]["special"]["pad"])
            splits = data["splits"]
            for split, table in splits.items():
                counts = [int(s["samples"]) for s in table["shards"]]
                if sum(counts) != int(table["samples"]) or min(counts, default=1) < 0:
                    raise ProsecoError(f"{file}: split {split!r} shard counts sum to {sum(counts)}, "
                                       f"but the split says {table['samples']}; {redo}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ProsecoError(f"{file} lacks or mangles a required field ({exc!r}); {redo}") from None
        manifest = cls(root, data)
        for split in manifest.splits:
            for shard, entry in zip(manifest.shards(split), splits[split]["shards"]):
                if not shard.path.is_file():
                    raise ProsecoError(f"shard {shard.path} listed in {file} is missing; {redo}")
                if verify_sha256 and "sha256" in entry:
                    digest = hashlib.sha256(shard.path.read_bytes()).hexdigest()
                    if digest != entry["sha256"]:
                        raise ProsecoError(f"shard {shard.path} does not match its sha256 in {file}; {redo}")
        return manifest
