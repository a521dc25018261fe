"""`proseco ckpt export --format hf`: transformers loads the folder (trust_remote_code) with logits equal
to ours, its tokenizer loads with AutoTokenizer and encodes like ours, every file is checksummed, and
the modelling file needs nothing but torch and transformers."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from test_tokenizer_hf import TEXTS, _train_bpe

from data_prep.tokenizer import Tokenizer, import_tokenizer
from data_prep.tokenizer_hf import HFTokenizer
from pipeline.artifact import load_model, write_export
from pipeline.checkpoint.hf_export import write_hf_export
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ProsecoError
from pipeline.model import Backbone

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden=32", "model.layers=2", "model.heads=2", "model.max_seq_len=32", "data.seq_len=32"]


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    """(proseco export folder of an untrained text model with a byte-level BPE tokenizer, its tokenizer)."""
    root = tmp_path_factory.mktemp("hfexport")
    import_tokenizer(_train_bpe(root / "bpe"), root / "tok")
    tok = Tokenizer.load(root / "tok")
    cfg = load_config(str(ROOT / "configs" / "text.yaml"), SMALL)
    torch.manual_seed(0)
    raw, ema = (Backbone(cfg.model, vocab_size=tok.vocab_size).state_dict() for _ in range(2))
    path = write_export(root / "m", {"raw": raw, "ema": ema}, cfg, tok.vocab_size, tok.mask_id,
                        tokenizer_dir=root / "tok", data={"tokenizer_sha256": tok.sha256})
    return path, tok


def _batch(vocab: int, seq: int = 20):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, seq), generator=gen)
    attention = torch.ones(3, seq, dtype=torch.long)
    attention[1, 12:] = 0  # padding keys hidden
    return ids, attention


def _sums(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def test_hf_export_loads_in_transformers_with_our_logits_and_tokenizer(text_export, tmp_path, capsys):
    path, tok = text_export
    out = tmp_path / "hf"
    assert main(["ckpt", "export", str(path), "--format", "hf", "--out", str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True).eval()
    ours, _, info = load_model(path)  # the export's default weights: EMA
    ids, attention = _batch(tok.vocab_size)
    with torch.no_grad():
        want = ours(ids, valid=attention.bool())
        got = hf(input_ids=ids, attention_mask=attention).logits
    assert info.weights == "ema" and got.shape == want.shape == (3, 20, tok.vocab_size)
    assert isinstance(info.tokenizer, HFTokenizer) and info.tokenizer.decode(tok.encode(TEXTS[4])) == TEXTS[4]
    assert (got - want).abs().max().item() <= 1e-6
    config = json.loads((out / "config.json").read_text())
    assert config["mask_token_id"] == tok.mask_id and config["proseco"]["weights"] == "ema"
    auto = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert auto.mask_token_id == tok.mask_id and auto.pad_token_id == tok.pad_id
    for text in TEXTS[:5]:
        assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    again = import_tokenizer(out, tmp_path / "reimported")  # the exported tokenizer imports back unchanged
    assert again["special"] == tok.special and again["vocab_size"] == tok.vocab_size
    # every file is listed in SHA256SUMS with its sha256 (computed here with hashlib)
    files = {p.name for p in out.iterdir()} - {"SHA256SUMS"}
    assert set(_sums(out)) == files >= {"config.json", "modeling_proseco.py", "model.safetensors", "tokenizer.json"}
    assert all(hashlib.sha256((out / n).read_bytes()).hexdigest() == h for n, h in _sums(out).items())
    # self-contained: the modelling file imports only torch, transformers and the standard library
    imports = re.findall(r"^\s*(?:from|import) ([\w.]+)", (out / "modeling_proseco.py").read_text(), re.MULTILINE)
    assert {name.split(".")[0] for name in imports} <= {"__future__", "contextlib", "math", "torch", "transformers"}


def test_raw_weights_and_a_tied_time_conditioned_model_round_trip(text_export, tmp_path):
    path, tok = text_export
    assert main(["ckpt", "export", str(path), "--format", "hf", "--weights", "raw", "--out", str(tmp_path / "r")]) == 0
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "r"), trust_remote_code=True).eval()
    ours = load_model(path, weights="raw")[0]
    ids, attention = _batch(tok.vocab_size)
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-6

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.tie_embeddings=true", "model.time_conditioning=true"])
    torch.manual_seed(2)
    model = Backbone(cfg.model, vocab_size=11).eval()
    with torch.no_grad():  # adaLN starts at zero: give it weights, so that t matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_hf_export(tmp_path / "tied", model, cfg.model, 11, 10)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "tied"), trust_remote_code=True).eval()
    ids, attention = _batch(10, seq=16)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        want = model(ids, t=t, valid=attention.bool())
        got = hf(ids, attention_mask=attention, t=t).logits
        assert (want - model(ids, t=1 - t, valid=attention.bool())).abs().max() > 1e-3  # t is used
    assert (got - want).abs().max().item() <= 1e-6
    assert torch.equal(hf.backbone.head.weight, hf.backbone.embed.weight)


def test_hf_export_mistakes_are_one_line_errors(text_export, tmp_path, capsys):
    path, _ = text_export
    (tmp_path / "taken").mkdir()
    assert main(["ckpt", "export", str(path), "--format", "hf", "--out", str(tmp_path / "taken")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["ckpt", "export", str(tmp_path / "nothing"), "--format", "hf"]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["ckpt", "info", str(path), "--format", "hf"]) == 2
    assert "--format applies to export only" in capsys.readouterr().err


def test_a_remote_code_diffusion_model_is_used_as_it_is(text_export, tmp_path):
    """``model.init=hf:FOLDER`` of a diffusion LM with its own modelling code (here a proseco HF
    export: auto_map + mask_token_id, the LLaDA / Dream shape) loads through its auto_map with its
    own mask id, unchanged (same logits, no row added), and trains: a ProSeCo step has finite gradients."""
    from pipeline.config import DiffusionConfig
    from pipeline.diffusion.objective import proseco_loss
    from pipeline.model import hf as hf_backbones

    path, tok = text_export
    out = tmp_path / "hf"
    assert main(["ckpt", "export", str(path), "--format", "hf", "--weights", "raw", "--out", str(out)]) == 0
    backbone = hf_backbones.build(f"hf:{out}")
    assert backbone.diffusion and backbone.mask_id == tok.mask_id == json.loads((out / "config.json").read_text())[
        "mask_token_id"]
    assert hf_backbones.vocab_info(f"hf:{out}") == (tok.vocab_size, tok.mask_id)
    ours, _, _ = load_model(path, weights="raw")
    ids, _ = _batch(tok.vocab_size)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(ids), ours(ids))
    x = ids.clamp(max=tok.mask_id - 1)
    terms = proseco_loss(lambda z, t, v: backbone.train()(z, t, v), x, DiffusionConfig(), tok.mask_id,
                         generator=torch.Generator().manual_seed(0))
    terms.loss.backward()
    grads = [p.grad for p in backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and terms.correction > 0
    import shutil

    broken = shutil.copytree(out, tmp_path / "broken")  # configs are cached per folder and process
    config = json.loads((broken / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": config["auto_map"]["AutoConfig"]}  # no model class registered
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ProsecoError, match="auto_map names none of AutoModelForMaskedLM, AutoModel"):
        hf_backbones.build(f"hf:{broken}")
