"""A tiny randomly initialised Llama with its own byte-level BPE tokenizer, and an SFT set for it:
what the Hugging Face backbone tests build once per module (no download, no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SEQ_LEN = 32


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/response pairs of one-digit sums (exact answers)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
    return out


def build_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE (``tokenizers``) trained on ``texts``, wrapped for transformers with BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_llama_folder(folder: Path, tokenizer, seed: int = 0, tie: bool = True) -> Path:
    """A 2-layer Llama (hidden 32, GQA 4/2 heads) with random weights, saved with ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
