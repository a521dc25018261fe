"""The lm-eval adapter ``proseco`` (pipeline/lmeval): a tiny random text model on a local generation
task and a local multiple-choice task, through lm-eval's Python API and its CLI, and as
``lm_eval:NAME`` items of ``proseco eval`` (shards, resume, report)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("sentencepiece")

import lm_eval
from lm_eval.api.instance import Instance

import pipeline.lmeval  # noqa: F401  (registers the model "proseco")
from pipeline import cli
from pipeline.artifact import load_model, write_export
from pipeline.config import load_config
from pipeline.errors import ProsecoError
from pipeline.evaluation import report
from pipeline.lmeval import items as lm_items
from pipeline.lmeval.adapter import ProsecoLM
from pipeline.lmeval.likelihood import mc_masks
from pipeline.lmeval.requests import batches, cut_at_stops, encode_pair, occurrences, request_seed
from pipeline.model import Backbone

ROOT = Path(__file__).resolve().parents[1]
GSM8K_SAMPLE = ROOT / "tests" / "data" / "gsm8k_sample.jsonl"
MC_ROWS = [{"question": "What is two plus two?", "choices": [" 4", " 5", " 22"], "label": 0},
           {"question": "Which is a colour?", "choices": [" red", " seven"], "label": 0},
           {"question": "How many legs has a cat?", "choices": [" three", " four", " ten"], "label": 1},
           {"question": "What comes after one?", "choices": [" two", " zero"], "label": 0}]
GEN_TASK = """task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Question:"]
  max_gen_toks: 16
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
MC_TASK = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ARGS = {"block_length": 8, "mc_samples": 4, "corrector_steps": 1, "corrector_every": 2, "pad_to": 16}


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing may come from the hub."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A random tiny text model exported with its tokenizer, and a folder of two local task YAMLs."""
    from data_prep.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("lmeval")
    texts = [f"Question: {p['question']}\nAnswer: {p['answer']}"
             for p in map(json.loads, GSM8K_SAMPLE.read_text().splitlines())]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer([str(root / "corpus.jsonl")], root / "tok", vocab_size=400, num_threads=1)
    tok = Tokenizer.load(root / "tok")
    cfg = load_config(str(ROOT / "configs" / "text.yaml"), ["model.hidden=32", "model.layers=2", "model.heads=2",
                                                           "model.max_seq_len=64", "data.seq_len=64"])
    torch.manual_seed(0)
    state = Backbone(cfg.model, vocab_size=tok.vocab_size).state_dict()
    model = write_export(root / "model", {"raw": state}, cfg, tok.vocab_size, tok.mask_id, tokenizer_dir=root / "tok",
                         data={"tokenizer_sha256": tok.sidecar["sha256"]})
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "local_gen.yaml").write_text(GEN_TASK.format(data=GSM8K_SAMPLE))
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (tasks / "local_mc.yaml").write_text(MC_TASK.replace("mc.jsonl", str(tasks / "mc.jsonl")))
    return {"model": model, "tasks": tasks, "tok": tok, "loaded": load_model(model)}


class Counting(torch.nn.Module):
    """The model, counting the rows it is called on (one row = one NFE)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, tokens, t=None, valid=None):
        self.rows += tokens.shape[0]
        return self.inner(tokens, t, valid)


@pytest.fixture(scope="module")
def api_runs(env) -> dict:
    """The two local tasks through lm-eval's Python API at batch sizes 1 and 8: (results, adapter, model rows)."""
    return {b: _evaluate(env, b) for b in (1, 8)}


def _evaluate(env, batch_size: int, **args):
    model, cfg, info = env["loaded"]
    counting = Counting(model)
    lm = ProsecoLM(loaded=(counting, cfg, info), batch_size=batch_size, **{**ARGS, **args})
    manager = lm_items.task_manager(load_config(str(ROOT / "configs" / "tiny.yaml"),
                                                [f"eval.lm_eval_include={env['tasks']}"]), ["local_gen", "local_mc"])
    out = lm_eval.simple_evaluate(model=lm, tasks=["local_gen", "local_mc"], task_manager=manager,
                                  bootstrap_iters=0, log_samples=True)
    return out, lm, counting.rows


def _responses(out) -> dict:
    return {task: [(s["doc_id"], s["resps"]) for s in rows] for task, rows in out["samples"].items()}


# ------------------------------------------------------------------ pure pieces


def test_request_seeds_depend_only_on_the_request():
    assert request_seed(0, "a", "b") == request_seed(0, "a", "b")
    assert len({request_seed(0, "a", "b"), request_seed(1, "a", "b"), request_seed(0, "a", "c")}) == 3
    assert 0 <= request_seed(7, "x") < 2 ** 63
    assert occurrences(["a", "b", "a", "a"]) == [0, 0, 1, 2]
    assert batches([3, 1, 3, 3, 1], 2) == [[1, 4], [0, 2], [3]]  # one length per batch, sorted, stable
    assert cut_at_stops("12\nQuestion: next", ["Question:", "\n"]) == "12"
    assert cut_at_stops("no stop", []) == "no stop"


def test_encode_pair_splits_where_the_context_ends(env):
    tok = env["tok"]
    ctx, cont = encode_pair(tok, "Question: how many muffins? Answer: ", "18 muffins", bos=True)
    assert ctx[0] == tok.bos_id
    assert ctx[1:] + cont == tok.encode("Question: how many muffins? Answer: 18 muffins")  # the trailing space moved
    assert tok.decode(cont).strip() == "18 muffins"
    assert encode_pair(tok, "", "muffins", bos=True)[0] == [tok.bos_id]


def test_mc_masks_are_stratified_and_reproducible():
    n, per = 5, 3
    masks = mc_masks(n, n * per, torch.Generator().manual_seed(1))
    counts = masks.sum(-1).tolist()
    assert sorted(counts) == sorted(list(range(1, n + 1)) * per)  # every l in 1..n equally often
    assert torch.equal(masks, mc_masks(n, n * per, torch.Generator().manual_seed(1)))


class Factorised(torch.nn.Module):
    """Logits that do not depend on the input: the bound is then exact in expectation, and exact
    for every sample when the continuation repeats one token."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, tokens, t=None, valid=None):
        return self.logits.expand(*tokens.shape, -1).clone()


def _request(kind: str, *args, doc: int = 0) -> Instance:
    return Instance(kind, {}, args, 0, ("t", doc, 1))


def test_loglikelihood_is_the_masked_diffusion_bound_of_a_hand_computable_model(env):
    _, cfg, info = env["loaded"]
    tok = env["tok"]
    _, aaaa = encode_pair(tok, "Question:", "aaaa", bos=True)
    assert len(aaaa) == 4 and len(set(aaaa)) == 1  # one repeated piece
    torch.manual_seed(3)
    logits = torch.randn(info.vocab_size)
    logits[aaaa[0]] = 6.0  # the model's argmax
    hidden = [info.mask_id] + ([] if cfg.diffusion.loss_on_pad else [tok.pad_id])  # ids the model never emits
    logp = torch.log_softmax(logits.double().index_fill(0, torch.tensor(hidden), -math.inf), -1)
    # every Monte Carlo term of a repeated token is exact: (n / l) * l * log p(a); greedy decoding finds it
    lm = ProsecoLM(loaded=(Factorised(logits), cfg, info), mc_samples=3)
    (ll, greedy), = lm.loglikelihood([_request("loglikelihood", "Question:", "aaaa")])
    assert ll == pytest.approx(4 * float(logp[aaaa[0]]), abs=1e-5) and greedy is True
    # mixed tokens: the estimate's expectation is the exact log-likelihood (many samples), not greedy
    _, cont = encode_pair(tok, "Question:", " 18 muffins", bos=True)
    exact = float(sum(logp[t] for t in cont))
    lm = ProsecoLM(loaded=(Factorised(logits), cfg, info), mc_samples=len(cont) * 50)
    (ll, greedy), = lm.loglikelihood([_request("loglikelihood", "Question:", " 18 muffins")])
    assert ll == pytest.approx(exact, rel=0.03) and greedy is False
    # rolling: the windows' bounds add up to the whole text's (exact for a factorised model in expectation)
    text = "aaaa" * 20
    (rolled,) = ProsecoLM(loaded=(Factorised(logits), cfg, info), mc_samples=64).loglikelihood_rolling(
        [_request("loglikelihood_rolling", text)])
    ids = tok.encode(text)
    assert len(ids) > cfg.model.max_seq_len  # several windows
    assert rolled == pytest.approx(float(sum(logp[t] for t in ids)), rel=0.02)


def test_generation_stops_early_at_eos_and_counts_the_nfe_it_spent(env):
    """A model whose argmax is always EOS: with eos_stop the first block (8 steps, one token each)
    ends with EOS and the request stops there; without it every block runs. The text ends at EOS."""
    _, cfg, info = env["loaded"]
    logits = torch.zeros(info.vocab_size)
    logits[env["tok"].eos_id] = 5.0
    request = _request("generate_until", "Question:", {"until": ["Question:"], "max_gen_toks": 24})
    for eos_stop, nfe in ((True, 8), (False, 24)):
        lm = ProsecoLM(loaded=(Factorised(logits), cfg, info), block_length=8, eos_stop=eos_stop)
        assert lm.generate_until([request]) == [""]
        (stats,) = lm.request_stats
        assert stats["nfe"] == stats["nfe_predictor"] == nfe and stats["tokens"] == 0


def test_pad_to_left_pads_a_prompt_by_its_own_length(env):
    lm = ProsecoLM(loaded=env["loaded"], pad_to=8)
    pad = env["tok"].pad_id
    assert lm._pad_left([1, 2, 3, 4, 5], gen=16) == [pad] * 3 + [1, 2, 3, 4, 5]
    assert lm._pad_left(list(range(8)), gen=16) == list(range(8))
    assert lm._pad_left(list(range(45)), gen=16) == [pad] * 3 + list(range(45))  # capped at 64 - 16
    assert ProsecoLM(loaded=env["loaded"])._pad_left([1, 2], gen=16) == [1, 2]


def test_user_errors_are_one_line(env):
    model, cfg, info = env["loaded"]
    with pytest.raises(ProsecoError, match="unknown key 'stepz'"):
        ProsecoLM(loaded=env["loaded"], stepz=3)
    with pytest.raises(ProsecoError, match="batch_size must be a positive integer.*auto"):
        ProsecoLM(loaded=env["loaded"], batch_size="auto")
    with pytest.raises(ProsecoError, match="corrector_steps must be a int"):
        ProsecoLM(loaded=env["loaded"], corrector_steps="two")
    with pytest.raises(ProsecoError, match="unknown sampler 'greedy'"):
        ProsecoLM(loaded=env["loaded"], sampler="greedy")
    with pytest.raises(ProsecoError, match="give path="):
        ProsecoLM()
    info_no_tok = type(info)(**{**info.__dict__, "tokenizer": None})
    with pytest.raises(ProsecoError, match="has no tokenizer"):
        ProsecoLM(loaded=(model, cfg, info_no_tok))
    lm = ProsecoLM(loaded=env["loaded"], gen_length=64)
    with pytest.raises(ProsecoError, match="leaves no room for a prompt"):
        lm.generate_until([_request("generate_until", "Question:", {"until": ["\n"]})])
    lm = ProsecoLM(loaded=env["loaded"], gen_length=12, steps=5, block_length=4)
    with pytest.raises(ProsecoError, match="multiple of the number of blocks"):
        lm.generate_until([_request("generate_until", "Question:", {"until": ["\n"]})])


# ------------------------------------------------------------------ through lm-eval


def test_python_api_batch_size_does_not_change_outputs_and_nfe_counts_model_calls(env, api_runs):
    (one, lm1, rows1), (eight, lm8, rows8) = api_runs[1], api_runs[8]
    assert _responses(one) == _responses(eight)
    for out in (one, eight):
        assert 0.0 <= out["results"]["local_mc"]["acc,none"] <= 1.0
        assert 0.0 <= out["results"]["local_gen"]["exact_match,none"] <= 1.0
    # NFE: every row through the network, summed per request, equals the rows the model saw
    for lm, rows in ((lm1, rows1), (lm8, rows8)):
        totals = lm.totals()
        assert totals["all"]["nfe"] == rows == sum(s["nfe"] for s in lm.request_stats)
        gen = totals["generate_until"]
        assert gen["requests"] == 5 and gen["nfe_corrector"] > 0 and gen["nfe_predictor"] == 5 * 16
        assert totals["loglikelihood"]["nfe"] == sum(len(r["choices"]) for r in MC_ROWS) * ARGS["mc_samples"]
        assert gen["tokens_per_s"] > 0 and gen["nfe_per_token"] == gen["nfe"] / gen["tokens"]
    assert rows8 == rows1
    info = eight["config"]["proseco"]
    assert info["lm_eval_version"] == lm_eval_version() and info["sampler"]["block_size"] == 8
    assert info["sampler"]["corrector_steps"] == 1 and info["model"]["identity"] == env["loaded"][2].identity
    # another seed draws other Monte Carlo masks: the scores of the choices change
    other, _, _ = _evaluate(env, 8, seed=5)
    assert _responses(other)["local_mc"] != _responses(eight)["local_mc"]


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def test_lm_eval_cli_runs_the_proseco_model(env, api_runs, tmp_path):
    """lm-eval's own CLI (through ``python -m pipeline.lmeval``, which registers the model)."""
    args = ",".join(f"{k}={v}" for k, v in {"path": env["model"], **ARGS}.items())
    cmd = [sys.executable, "-m", "pipeline.lmeval", "run", "--model", "proseco", "--model_args", args,
           "--tasks", "local_mc", "local_gen", "--include_path", str(env["tasks"]), "--batch_size", "8",
           "--device", "cpu", "--output_path", str(tmp_path / "out"), "--log_samples"]
    env_vars = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, cwd=tmp_path, env=env_vars, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    cli_out = json.loads(results_file.read_text())
    api_out = api_runs[8][0]
    for task, metric in (("local_mc", "acc,none"), ("local_gen", "exact_match,none")):
        assert cli_out["results"][task][metric] == api_out["results"][task][metric]
    info = cli_out["config"]["proseco"]
    assert info["totals"]["all"]["nfe"] == api_out["config"]["proseco"]["totals"]["all"]["nfe"]
    assert info["lm_eval_version"] == lm_eval_version() and info["sampler"]["name"] == "confidence"


def test_cli_user_error_is_one_line(env, monkeypatch, capsys):
    """An adapter error inside lm-eval's CLI is one line and exit code 2 (lm-eval's CLI is replaced by
    the adapter's constructor here: the real CLI first indexes lm-eval's ~15 000 task configs)."""
    import lm_eval.__main__

    from pipeline.lmeval.__main__ import main

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: ProsecoLM(path="/nonexistent/model"))
    assert main(["run", "--model", "proseco"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model at /nonexistent/model") and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ inside proseco eval


def test_proseco_eval_runs_lm_eval_items_sharded_resumable_and_reported(env, tmp_path, capsys):
    common = ["parallel.threads=1", "eval.tasks=[lm_eval:local_mc,lm_eval:local_gen]",
              f"eval.lm_eval_include={env['tasks']}", "eval.samplers=[confidence]", "eval.steps=[16]",
              "eval.corrector_steps=[0,1]", "eval.corrector_every=[2]", "sampler.block_size=8",
              "sampler.temperature=0", "eval.lm_eval_mc_samples=4", "eval.batch_size=8", "eval.lm_eval_pad_to=16"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli.main(["eval", str(env["model"]), "--out", str(whole), *common, "eval.lm_eval_limit=2", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "lm_eval" in line and "[" in line]
    assert len(listed) == 4 and all(line.endswith(", 2 documents]") for line in listed), listed  # not "N samples"
    assert cli.main(["eval", str(env["model"]), "--out", str(whole), *common]) == 0
    assert "4 done, 0 already done, 0 failed" in capsys.readouterr().out
    for i in (1, 0):
        assert cli.main(["eval", str(env["model"]), "--out", str(parts), "--shard", f"{i}/2", *common]) == 0
    a, b = report.load_results(whole), report.load_results(parts)
    assert len(a) == 4 and all(r["status"] == "ok" for r in a)
    keys = ("key", "metrics", "nfe", "nfe_predictor", "nfe_corrector", "primary")
    assert {r["_path"]: [r[k] for k in keys] for r in a} == {r["_path"]: [r[k] for k in keys] for r in b}
    for r in a:
        samples = (whole / r["_path"]).with_suffix("").with_suffix(".samples.jsonl")
        assert samples.read_text() == (parts / r["_path"]).with_suffix("").with_suffix(".samples.jsonl").read_text()
        assert r["lm_eval"]["lm_eval_version"] == lm_eval_version()
        assert r["determinants"]["sampler"]["corrector_steps"] == r["setting"]["corrector_steps"]
        if r["task"] == "lm_eval:local_gen":  # likelihoods never run the corrector
            assert (r["nfe_corrector"] > 0) == (r["setting"]["corrector_steps"] > 0)
    mc = next(r for r in a if r["task"] == "lm_eval:local_mc")
    assert mc["primary"] == "acc" and 0 <= mc["metrics"]["acc"] <= 1 and mc["num_samples"] == len(MC_ROWS)
    assert cli.main(["eval", str(env["model"]), "--out", str(whole), *common]) == 0  # resumable: all done
    assert "0 done, 4 already done" in capsys.readouterr().out
    md, _ = report.build(whole)
    text = md.read_text()
    assert "lm_eval:local_mc" in text and "lm_eval:local_gen" in text and "confidence + corrector" in text
    # a bad lm-eval task name fails before any work, in one line
    assert cli.main(["eval", str(env["model"]), "--out", str(tmp_path / "x"), *common,
                     'eval.tasks=["lm_eval:"]']) == cli.EXIT_USER_ERROR
    assert "'lm_eval:' needs a task name" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_task_names_are_looked_up_in_the_include_folders_first_then_in_lm_evals_own(env, monkeypatch):
    """(lm-eval's ~15 000 built-in task configs take seconds to index: a stand-in index here.)"""
    built = []

    class Index:
        def __init__(self, include, defaults):
            built.append(defaults)
            self.all_tasks = ["local_gen", "local_mc"] + (["gsm8k"] if defaults else [])

    monkeypatch.setattr(lm_items, "_manager", Index)
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"eval.lm_eval_include={env['tasks']}"])
    lm_items.check_names(["lm_eval:local_mc", "sudoku4"], cfg)
    assert built == [False]  # the local folder has it: the built-in tasks are not indexed
    lm_items.check_names(["lm_eval:local_mc", "lm_eval:gsm8k"], cfg)
    assert built == [False, False, True]
    with pytest.raises(ProsecoError, match=r"unknown lm-eval task\(s\) local_mcq \(looked in .*tasks and lm-eval's"):
        lm_items.check_names(["lm_eval:local_mcq"], cfg)
    missing = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"eval.lm_eval_include={env['tasks'] / 'none'}"])
    with pytest.raises(ProsecoError, match="is not a folder of lm-eval task YAML"):
        lm_items.check_names(["lm_eval:local_mc"], missing)


def test_item_key_follows_the_local_task_files(env, tmp_path):
    import shutil

    from pipeline.evaluation import runner

    tasks = shutil.copytree(env["tasks"], tmp_path / "tasks")
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"eval.lm_eval_include={tasks}"])
    files = lm_items.task_files(cfg)
    assert {str(tasks / "mc.jsonl"), str(env["tasks"] / "mc.jsonl"), str(GSM8K_SAMPLE.resolve())} <= set(files)
    item = runner.Item(runner.ModelRef("m", str(env["model"]), identity="abc"), "lm_eval:local_mc",
                       runner.Setting("confidence", 16, 0, 1))
    key = runner.item_key(runner.determinants(item, cfg))
    assert item.relpath == "m/lm_eval/local_mc/confidence_T16"
    assert runner.item_key(runner.determinants(item, cfg)) == key
    (tasks / "mc.jsonl").write_text((tasks / "mc.jsonl").read_text() + json.dumps(MC_ROWS[0]) + "\n")
    assert runner.item_key(runner.determinants(item, cfg)) != key  # a changed data file is a new item


def test_an_lm_eval_task_that_fails_is_a_failed_item_with_its_reason(env, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text(MC_TASK.replace("local_mc", "broken").replace("mc.jsonl",
                                                                                     str(tmp_path / "missing.jsonl")))
    out = tmp_path / "eval"
    assert cli.main(["eval", str(env["model"]), "--out", str(out), "parallel.threads=1", "eval.tasks=[lm_eval:broken]",
                     f"eval.lm_eval_include={tasks}", "eval.samplers=[confidence]", "eval.steps=[16]",
                     "eval.corrector_steps=[0]", "sampler.block_size=8"]) == 1
    (result,) = report.load_results(out)
    assert result["status"] == "failed" and result["error"].startswith("lm-eval task broken failed: ")
    assert "missing.jsonl" in result["error"] and "failed: lm-eval task broken" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("eval.lm_eval_mc_samples=0", "eval.lm_eval_mc_samples must be >= 1"),
    ("eval.lm_eval_fewshot=-2", "eval.lm_eval_fewshot must be >= -1"),
    ("eval.lm_eval_limit=-1", "eval.lm_eval_limit must be >= 0"),
    ("eval.lm_eval_pad_to=0", "eval.lm_eval_pad_to must be >= 1"),
])
def test_lm_eval_keys_are_validated_at_load(override, message):
    with pytest.raises(ProsecoError, match=message):
        load_config(str(ROOT / "configs" / "tiny.yaml"), [override])


def test_register_adds_proseco_and_every_lm_eval_models_entry_point(monkeypatch):
    """lm-eval 0.4.13 does not read the ``lm_eval.models`` entry-point group; register() does."""
    import importlib.metadata

    from lm_eval.api.registry import get_model, model_registry

    from pipeline.lmeval import ENTRY_POINT_GROUP, register

    assert get_model("proseco") is ProsecoLM
    plugin = importlib.metadata.EntryPoint("proseco-test-plugin", "pipeline.lmeval.adapter:ProsecoLM",
                                           ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [plugin] if group == ENTRY_POINT_GROUP else [])
    try:
        assert register() == ["proseco-test-plugin"] and get_model("proseco-test-plugin") is ProsecoLM
        assert register() == []  # idempotent
    finally:
        model_registry._objs.pop("proseco-test-plugin", None)  # lm-eval's registry has no public removal
