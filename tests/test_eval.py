"""`proseco eval` / `proseco report` (pipeline/evaluation): work list, skip-done, resume after a
real kill, sharding, per-item failures, the report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.artifact import load_model, write_export
from pipeline.checkpoint.manager import rewrite_meta
from pipeline.config import load_config
from pipeline.errors import ProsecoError
from pipeline.evaluation import report, runner
from pipeline.model import Backbone
from pipeline.tasks import sudoku

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_export(tmp_path_factory) -> Path:
    """An export folder of an untrained tiny Sudoku model (evaluation does not care how good it is)."""
    return _tiny_export(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def _tiny_export(path: Path, seed: int) -> Path:
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.layers=1", "model.hidden=32", "model.heads=2"])
    torch.manual_seed(seed)
    state = Backbone(cfg.model, vocab_size=sudoku.VOCAB_SIZE).state_dict()
    return write_export(path, {"raw": state}, cfg, sudoku.VOCAB_SIZE, sudoku.MASK_ID, force=True)


def _cfg(*overrides: str):
    return load_config(str(ROOT / "configs" / "tiny.yaml"), ["parallel.threads=1", *overrides])


def test_work_list_expands_settings_once_each_and_shards_cover_it_exactly_once(model_export):
    cfg = _cfg("eval.samplers=[ancestral,remdm]", "eval.steps=[4,8]", "eval.corrector_steps=[0,2]",
               "eval.corrector_every=[1,2]")
    st = runner.settings(cfg)
    # ancestral: T x (S=0, S=2 x omega 1/2) = 2 x 3; remdm: no corrector: 2
    assert len(st) == 8 and len(set(st)) == 8
    assert {s.label for s in st} == {"ancestral (MDM)", "ancestral + corrector S=2 w=1",
                                     "ancestral + corrector S=2 w=2", "remdm"}
    items = runner.work_list(runner.resolve_models(str(model_export)), ["sudoku4", "sudoku4-solve"], cfg)
    assert len(items) == 16 and items == sorted(items, key=lambda i: i.relpath)
    shards = [runner.shard(items, f"{i}/3") for i in range(3)]
    flat = [i for s in shards for i in s]
    assert sorted(flat, key=lambda i: i.relpath) == items and len(set(flat)) == len(items)
    with pytest.raises(Exception, match="i/n"):
        runner.shard(items, "3")


def test_eval_writes_results_skips_done_items_and_records_failures(model_export, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(model_export), "--out", str(out), "parallel.threads=1", "eval.steps=[2,4]",
            "eval.corrector_steps=[0,1]", "eval.samplers=[ancestral]", "eval.num_samples=16", "eval.batch_size=5",
            "eval.tasks=[sudoku4,sudoku4-solve,text]"]
    assert cli.main(args) == 1  # some items failed: the exit code says so
    printed = capsys.readouterr().out
    assert "8 done, 0 already done, 4 failed" in printed  # text needs a text model: a clear per-item failure
    results = report.load_results(out)
    ok = [r for r in results if r["status"] == "ok"]
    failed = [r for r in results if r["status"] == "failed"]
    assert len(ok) == 8 and len(failed) == 4
    assert all("needs" in r["error"] or "text" in r["error"] for r in failed)
    solve = [r for r in ok if r["task"] == "sudoku4-solve"]
    assert all(r["metrics"]["clue_violations"] == 0 for r in solve)
    corr = [r for r in ok if r["setting"]["corrector_steps"] == 1]
    assert all(r["nfe_corrector"] > 0 for r in corr)
    samples = out / "results" / ok[0]["model"]["key"] / ok[0]["task"] / ok[0]["samples_file"]
    assert len(samples.read_text().splitlines()) == 16
    assert cli.main(args) == 1  # a rerun skips what is done (and retries the failures)
    assert "0 done, 8 already done, 4 failed" in capsys.readouterr().out
    # batch size does not change results (one seeded generator per sample)
    out2 = tmp_path / "eval_b16"
    assert cli.main([*args[:-1], "eval.tasks=[sudoku4]", "eval.batch_size=16", "--out", str(out2)]) == 0
    a = {r["_path"]: r["metrics"] for r in results if r["task"] == "sudoku4"}
    b = {r["_path"]: r["metrics"] for r in report.load_results(out2)}
    assert a == b

    md, page = report.build(out)
    text = page.read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all(p in text for p in pngs) and "Failed items" in text
    assert "NFE-matched" in md.read_text() and "proseco eval" in md.read_text()


def test_overrides_of_what_the_model_carries_are_refused_not_ignored(model_export, tmp_path, capsys):
    # the tasks read data.* (e.g. the puzzles' clue count) from the model's own config: an override
    # would be dropped without a word and the results labelled as if it had applied
    for argv in (["eval", str(model_export), "data.puzzle_clues=3", "eval.steps=[2]"],
                 ["eval", str(model_export), "model.hidden=8"],
                 ["launch", "eval", "--target", str(model_export), "diffusion.corrector_start_step=5", "--dry-run"]):
        assert cli.main(argv) == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert "settings it was trained with" in err and "would change nothing" in err and "Traceback" not in err
    assert not (model_export / "eval").exists()
    assert cli.main(["eval", str(model_export), "sampler.seed=3", "eval.steps=[2]", "--dry-run"]) == 0


def test_unknown_task_and_incomplete_checkpoint_are_one_line_errors(model_export, tmp_path, capsys):
    assert cli.main(["eval", str(model_export), "eval.tasks=[sudoku16]", "--out", str(tmp_path)]) == cli.EXIT_USER_ERROR
    assert "unknown evaluation task(s) sudoku16" in capsys.readouterr().err
    partial = tmp_path / "run" / "checkpoints" / "step_00000010"
    partial.mkdir(parents=True)
    assert cli.main(["eval", str(partial)]) == cli.EXIT_USER_ERROR
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "nothing")]) == cli.EXIT_USER_ERROR
    assert "run `proseco eval` first" in capsys.readouterr().err


def test_eval_resumes_after_kill_9_and_ends_equal_to_an_uninterrupted_run(model_export, tmp_path):
    common = [sys.executable, "-m", "pipeline", "eval", str(model_export), "parallel.threads=1",
              "eval.steps=[2,4,8,16]", "eval.corrector_steps=[0,1,2,4]", "eval.samplers=[ancestral]",
              "eval.num_samples=128", "eval.tasks=[sudoku4,sudoku4-solve]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run([*common, "--out", str(ref)], cwd=ROOT, env=env, check=True, capture_output=True)
    total = len(list((ref / "results").rglob("*.json")))
    proc = subprocess.Popen([*common, "--out", str(run)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(list((run / "results").rglob("*.json"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((run / "results").rglob("*.json")))
    assert done < total, "the run finished before it could be killed"
    out = subprocess.run([*common, "--out", str(run)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert f"{done} already done" in out.stdout
    strip = lambda rows: {r["_path"]: (r["metrics"], r["nfe"]) for r in rows}
    assert strip(report.load_results(run)) == strip(report.load_results(ref))
    assert not list(run.rglob("*.tmp-*"))


def test_a_sampler_setting_the_model_cannot_run_fails_alone(model_export, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", str(model_export), "--out", str(out), "parallel.threads=1", "eval.tasks=[sudoku4]",
                     "eval.samplers=[ancestral,confidence]", "eval.steps=[3,4]", "eval.corrector_steps=[0]",
                     "sampler.block_size=8", "eval.num_samples=4"]) == 1
    rows = {r["_path"].split("/")[-1]: r for r in report.load_results(out)}
    assert rows["confidence_T3.json"]["status"] == "failed" and "multiple" in rows["confidence_T3.json"]["error"]
    assert all(r["status"] == "ok" for k, r in rows.items() if k != "confidence_T3.json") and len(rows) == 4
    assert "confidence_T3" in report.build(out)[1].read_text()  # the failure is in the report


def test_a_changed_setting_recomputes_and_the_same_settings_skip(model_export, tmp_path, capsys):
    """A result is keyed by everything that determines it: other settings are a new item."""
    out = tmp_path / "eval"
    base = ["eval", str(model_export), "--out", str(out), "parallel.threads=1", "eval.tasks=[sudoku4]",
            "eval.samplers=[ancestral]", "eval.steps=[2,4]", "eval.corrector_steps=[0]"]
    assert cli.main([*base, "eval.num_samples=8"]) == 0
    first = {r["_path"]: r for r in report.load_results(out)}
    capsys.readouterr()
    assert cli.main([*base, "eval.num_samples=8"]) == 0
    assert "0 done, 2 already done" in capsys.readouterr().out
    now = ["eval.num_samples=8"]
    for changed, what in (("eval.num_samples=12", "num_samples"), ("sampler.seed=7", "sampler.seed"),
                          ("sampler.temperature=0.5", "sampler.temperature")):
        now.append(changed)  # one more setting changed each time
        assert cli.main([*base, *now]) == 0
        printed = capsys.readouterr().out
        assert "2 done, 0 already done" in printed and "computed with other settings" in printed
        assert f"changed: {what})" in printed, printed
    assert cli.main([*base, *now, "eval.weights=raw"]) == 0  # other weights asked for: recomputed
    assert "2 done, 0 already done" in capsys.readouterr().out
    assert cli.main([*base, *now, "eval.weights=ema"]) == 1  # this export has raw weights only
    assert "has no ema weights" in capsys.readouterr().out
    rows = {r["_path"]: r for r in report.load_results(out)}
    assert all(r["num_samples"] == 12 and r["determinants"]["sampler"]["temperature"] == 0.5 for r in rows.values())
    assert {k: r["key"] for k, r in rows.items()} != {k: r["key"] for k, r in first.items()}
    assert len((out / next(iter(rows))).with_suffix(".samples.jsonl").read_text().splitlines()) == 12
    assert cli.main([*base, "eval.num_samples=12", "sampler.seed=7", "sampler.temperature=0.5", "--force"]) == 0
    assert "2 done, 0 already done" in capsys.readouterr().out


def test_another_model_at_the_same_path_is_a_new_item(model_export, tmp_path, capsys):
    out, model = tmp_path / "eval", tmp_path / "m"
    args = ["eval", str(model), "--out", str(out), "parallel.threads=1", "eval.tasks=[sudoku4]",
            "eval.samplers=[ancestral]", "eval.steps=[2]", "eval.corrector_steps=[0]", "eval.num_samples=4"]
    shutil.copytree(model_export, model)
    assert cli.main(args) == 0
    _tiny_export(model, seed=1)  # other weights, same folder name
    capsys.readouterr()
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "1 done, 0 already done" in printed and "model.identity" in printed


def test_all_failed_exits_non_zero_and_a_non_model_target_writes_nothing(model_export, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", str(model_export), "--out", str(out), "parallel.threads=1", "eval.tasks=[text]",
                     "eval.steps=[2]", "eval.corrector_steps=[0]", "eval.num_samples=4"]) == 1
    rows = report.load_results(out)
    assert rows and all(r["status"] == "failed" for r in rows)
    assert f"{len(rows)} item(s) failed" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    yaml = run / "config.yaml"
    yaml.write_text("model:\n  hidden: 32\n")
    assert cli.main(["eval", str(yaml)]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a model" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # no eval folder, no failed results


def test_dry_run_prints_the_work_list_and_writes_nothing(model_export, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(model_export), "--out", str(out), "parallel.threads=1", "eval.tasks=[sudoku4]",
            "eval.samplers=[ancestral]", "eval.steps=[2,4]", "eval.corrector_steps=[0,1]", "eval.num_samples=4"]
    assert cli.main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "4 to run, 0 already done" in printed and not out.exists()
    assert all(slug in printed for slug in ("sudoku4/ancestral_T2 ", "sudoku4/ancestral_T4_S1_w1 "))
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main([*args, "eval.num_samples=6", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "4 to run" in printed and "changed: num_samples" in printed


def test_an_export_evaluated_from_another_directory_equals_its_checkpoint(shards, tmp_path, monkeypatch, capsys):
    """A text run trained with relative paths, exported, then evaluated from elsewhere: the export
    brings its tokenizer and gives the metrics of the checkpoint it came from (EMA weights both)."""
    from train_utils import TINY

    monkeypatch.chdir(tmp_path)  # data.shards and run.dir relative to the training directory
    assert cli.main(["train", "--config", "text", f"data.shards={os.path.relpath(shards)}", "run.dir=run",
                     "optim.steps=2", *TINY]) == 0
    assert cli.main(["ckpt", "export", "run"]) == 0
    run = tmp_path / "run"
    export = run / "exports" / "step_00000002"
    assert sorted(p.name for p in (export / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer.model"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # no reference LM (its load would dominate; tests/test_eval_text.py covers it): the task still
    # decodes every sample through the model's tokenizer (mean_chars, out_of_vocab, distinct_n)
    common = ["parallel.threads=1", "eval.tasks=[text]", "eval.samplers=[ancestral]", "eval.steps=[4]",
              "eval.corrector_steps=[0,1]", "eval.num_samples=6", "eval.reference_lm=none"]
    capsys.readouterr()
    seen = []  # the sampler is given the model's padding rule and its tokenizer's pad / EOS ids
    real_sample = runner.sample
    monkeypatch.setattr(runner, "sample", lambda *a, **kw: seen.append(kw) or real_sample(*a, **kw))
    for name, model in (("ckpt", run / "checkpoints" / "step_00000002"), ("export", export)):
        assert cli.main(["eval", str(model), "--out", name, *common]) == 0, capsys.readouterr()
    tok = load_model(export)[2].tokenizer
    assert seen and all((kw["pad_id"], kw["eos_id"], kw["loss_on_pad"]) == (tok.pad_id, tok.eos_id, False)
                        for kw in seen)
    ckpt, exp = ({r["setting"]["corrector_steps"]: r for r in report.load_results(elsewhere / n)}
                 for n in ("ckpt", "export"))
    assert sorted(ckpt) == sorted(exp) == [0, 1]
    for s in ckpt:
        assert ckpt[s]["weights"] == exp[s]["weights"] == "ema"
        assert ckpt[s]["metrics"] == exp[s]["metrics"] and ckpt[s]["nfe"] == exp[s]["nfe"]
        assert ckpt[s]["metrics"]["mean_chars"] > 0  # the text task decoded the samples: the tokenizer loaded
    # `proseco sample` loads the run folder's latest checkpoint from here too, tokenizer included
    assert cli.main(["sample", str(run), "--num", "2", "sampler.steps=4"]) == 0
    assert "sample 1  NFE 4" in capsys.readouterr().out
    # a checkpoint written before checkpoints recorded where their data is cannot find its tokenizer
    old = tmp_path / "old" / "checkpoints" / "step_00000002"
    shutil.copytree(run / "checkpoints" / "step_00000002", old)
    meta = json.loads((old / "meta.json").read_text())
    rewrite_meta(old, {k: v for k, v in meta.items() if k != "data"})
    with pytest.raises(ProsecoError, match="records its shards as the relative path"):
        load_model(old)
