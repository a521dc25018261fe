"""pipeline/runlog.py: metrics.jsonl as the source of truth, wandb as a mirror that never stops training;
pipeline/rundir.py: the run folder's layout, run.json and last_exit.

The step rule and the failure paths run against a fake ``wandb`` module (milliseconds); the real
wandb (offline, and online without a network) runs in subprocesses whose HOME / XDG folders point
into tmp_path, so the test sees every file wandb writes outside the run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.rundir import RunDir
from pipeline.runlog import INIT_TIMEOUT_ENV, RunLogger, read_metrics

ROOT = Path(__file__).resolve().parents[1]
WANDB_ENV = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")


def _cfg(mode: str = "disabled") -> Config:
    cfg = Config()
    cfg.log.wandb = mode
    cfg.run.name = "unit"
    return cfg


def _info(logger_id: str = "abc123def456") -> dict:
    return {"run_id": logger_id, "logger_id": logger_id, "name": "unit"}


def _row(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 1e-3}


# ---------------------------------------------------------------------------------------- run folder
def test_run_folder_layout_run_json_and_last_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg()
    run = RunDir.of(cfg)
    assert run.path == Path("runs/unit") and run.metrics == Path("runs/unit/metrics.jsonl")
    assert run.last_exit == Path("runs/unit/logs/last_exit.json") and run.slurm.name == "slurm"
    assert run.read_last_exit() is None
    info = run.start(cfg, lambda: ({}, None))
    assert run.start(cfg, lambda: ({}, None)) == info and info["run_id"] == info["logger_id"]
    run.run_json.write_text("{")  # torn by a crash: rebuilt from the ids a checkpoint kept
    assert run.start(cfg, lambda: (info, "step_00000004")) == info
    assert "rebuilt it from the ids kept in step_00000004" in capsys.readouterr().out
    run.write_last_exit(7, 3, "SIGUSR2")
    assert {k: run.read_last_exit()[k] for k in ("step", "exit_code", "reason")} == \
        {"step": 7, "exit_code": 3, "reason": "SIGUSR2"}
    run.last_exit.write_text("[")
    assert run.read_last_exit() is None
    (run.checkpoints / "step_00000002").mkdir(parents=True)
    assert RunDir.holding(run.checkpoints / "step_00000002").path == run.path
    assert RunDir.holding("runs/unit").eval == run.eval and RunDir.holding(tmp_path) is None


# ---------------------------------------------------------------------------------------- metrics.jsonl
def test_rows_appended_and_read_back(tmp_path):
    with RunLogger(tmp_path, _cfg(), _info()) as log:
        for s in (1, 2):
            log.log(_row(s))
    with RunLogger(tmp_path, _cfg(), _info()) as log:
        assert log.resume_step == 2
        log.log(_row(3))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert read_metrics(tmp_path / "metrics.jsonl")[2] == _row(3)


def test_torn_last_line_is_cut_on_reopen(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_row(1)) + "\n" + json.dumps(_row(2)) + "\n" + '{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]  # the reader skips the torn line
    with RunLogger(tmp_path, _cfg(), _info()) as log:
        assert log.resume_step == 2
        assert path.read_text().endswith("}\n")
        log.log(_row(3))
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    path.write_text('{"step": 1, "lo')  # only a torn line
    with RunLogger(tmp_path, _cfg(), _info()) as log:
        assert log.resume_step is None
    assert path.read_text() == ""


def test_disabled_rank_writes_nothing(tmp_path):
    folder = tmp_path / "run"
    with RunLogger(folder, _cfg("offline"), _info(), enabled=False) as log:
        log.log(_row(1))
    assert not folder.exists()


def test_disabled_mode_never_imports_wandb(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from pipeline.config import Config
        from pipeline.runlog import RunLogger
        cfg = Config(); cfg.log.wandb = "disabled"
        with RunLogger({str(tmp_path)!r}, cfg, {{"logger_id": "x"}}) as log:
            log.log({{"step": 1, "loss": 0.5}})
        print(sorted(m for m in sys.modules if m == "wandb" or m.startswith("wandb.")))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert not (tmp_path / "wandb").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ---------------------------------------------------------------------------------------- a fake wandb
class _FakeRun:
    def __init__(self, kwargs: dict, fail_log_at: int | None):
        self.kwargs, self.logged, self.finished, self.fail_log_at = kwargs, [], None, fail_log_at
        self.id = kwargs["id"]

    def log(self, data: dict, step: int) -> None:
        if step == self.fail_log_at:
            raise RuntimeError("socket closed")
        self.logged.append((step, data))

    def finish(self, exit_code: int = 0) -> None:
        self.finished = exit_code


def _fake_wandb(monkeypatch, *, init_error: Exception | None = None, logged_in: bool = True,
                fail_log_at: int | None = None) -> types.SimpleNamespace:
    calls = types.SimpleNamespace(runs=[], teardowns=0, env=None)

    def init(**kwargs):
        calls.env = {k: os.environ.get(k) for k in WANDB_ENV}
        if init_error is not None:
            raise init_error
        calls.runs.append(_FakeRun(kwargs, fail_log_at))
        return calls.runs[-1]

    def teardown():
        calls.teardowns += 1

    module = types.ModuleType("wandb")
    module.Settings = lambda **kw: kw
    module.setup = lambda settings=None: None
    module.login = lambda **kw: logged_in
    module.init, module.teardown = init, teardown
    monkeypatch.setitem(sys.modules, "wandb", module)
    for var in WANDB_ENV:
        monkeypatch.delenv(var, raising=False)
    return calls


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_init_arguments_and_env_restored(tmp_path, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_DATA_DIR", "/user/choice")
    with RunLogger(tmp_path, _cfg("offline"), _info("myid")) as log:
        log.log(_row(1))
    kw = calls.runs[0].kwargs
    assert (kw["id"], kw["resume"], kw["mode"], kw["name"], kw["project"]) == ("myid", "allow", "offline", "unit",
                                                                               "proseco")
    assert kw["entity"] is None and kw["dir"] == str(tmp_path.resolve()) and kw["config"]["log"]["wandb"] == "offline"
    assert calls.env["WANDB_DIR"] == str(tmp_path.resolve())
    assert calls.env["WANDB_CACHE_DIR"] == str(tmp_path.resolve() / "wandb" / "cache")
    assert calls.env["WANDB_DATA_DIR"] == "/user/choice"  # set by the user: left alone
    assert {k: os.environ.get(k) for k in WANDB_ENV} == {**dict.fromkeys(WANDB_ENV), "WANDB_DATA_DIR": "/user/choice"}
    assert calls.runs[0].logged == [(1, {"loss": 1.0, "lr": 1e-3})] and calls.runs[0].finished == 0
    assert calls.teardowns == 1


def test_steps_replayed_after_resume_go_to_wandb_once(tmp_path, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    with RunLogger(tmp_path, _cfg("offline"), _info()) as log:
        for s in (1, 2, 3, 4):
            log.log(_row(s))
    with RunLogger(tmp_path, _cfg("offline"), _info()) as log:  # resumed from a checkpoint at step 2
        for s in (3, 4, 5, 5, 4, 6):
            log.log(_row(s))
    assert [s for s, _ in calls.runs[0].logged] == [1, 2, 3, 4]
    assert [s for s, _ in calls.runs[1].logged] == [5, 5, 6]  # <= 4: already sent; 4 after 5: backwards
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 3, 4, 5, 5, 4, 6]


def test_exception_in_block_finishes_with_exit_code_1(tmp_path, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    with pytest.raises(ValueError), RunLogger(tmp_path, _cfg("offline"), _info()) as log:
        log.log(_row(1))
        raise ValueError("boom")
    assert calls.runs[0].finished == 1
    with RunLogger(tmp_path, _cfg("offline"), _info()) as log:
        log.exit_code = 3  # e.g. stopped for a requeue
    assert calls.runs[1].finished == 3


def test_init_failure_warns_once_and_keeps_metrics(tmp_path, monkeypatch, capsys):
    calls = _fake_wandb(monkeypatch, init_error=RuntimeError("Failed to get resume status\nwhile retrying"))
    with RunLogger(tmp_path, _cfg("online"), _info()) as log:
        log.log(_row(1))
    err = capsys.readouterr().err
    assert len(_warnings(err)) == 1 and "wandb.init" in err and "log.wandb=offline" in err
    assert "wandb login" in err and read_metrics(tmp_path / "metrics.jsonl") == [_row(1)]
    assert calls.teardowns == 1 and all(os.environ.get(k) is None for k in WANDB_ENV)


def test_online_without_credentials_warns_once(tmp_path, monkeypatch, capsys):
    calls = _fake_wandb(monkeypatch, logged_in=False)
    with RunLogger(tmp_path, _cfg("online"), _info()) as log:
        log.log(_row(1))
    err = capsys.readouterr().err
    assert len(_warnings(err)) == 1 and "wandb login" in err and "log.wandb=offline" in err
    assert calls.runs == [] and read_metrics(tmp_path / "metrics.jsonl") == [_row(1)]


def test_log_failure_stops_mirroring_not_training(tmp_path, monkeypatch, capsys):
    calls = _fake_wandb(monkeypatch, fail_log_at=2)
    with RunLogger(tmp_path, _cfg("offline"), _info()) as log:
        for s in (1, 2, 3):
            log.log(_row(s))
    assert len(_warnings(capsys.readouterr().err)) == 1
    assert [s for s, _ in calls.runs[0].logged] == [1] and calls.runs[0].finished == 1
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_wandb_not_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with RunLogger(tmp_path, _cfg("offline"), _info()) as log:
        log.log(_row(1))
    err = capsys.readouterr().err
    assert len(_warnings(err)) == 1 and "pip install wandb" in err and "log.wandb=disabled" in err
    assert read_metrics(tmp_path / "metrics.jsonl") == [_row(1)]


# ---------------------------------------------------------------------------------------- the real wandb
def _isolated_env(tmp_path: Path, **extra: str) -> tuple[dict, Path]:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and not k.startswith("XDG_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local" / "share"), OMP_NUM_THREADS="1", **extra)
    return env, home


_SCRIPT = """
import sys
from pipeline.config import Config
from pipeline.runlog import RunLogger
folder, mode = sys.argv[1], sys.argv[2]
cfg = Config(); cfg.log.wandb = mode; cfg.run.name = "unit"
info = {"run_id": "abc123def456", "logger_id": "abc123def456"}
for steps in ([1, 2, 3, 2], [2, 3, 4]):  # the second logger resumes (replays 2, 3)
    with RunLogger(folder, cfg, info) as log:
        for s in steps:
            log.log({"step": s, "loss": 1.0 / s})
        print("RUN_ID", log.wandb_run.id if log.wandb_run is not None else None, flush=True)
"""


def test_offline_files_stay_in_the_run_folder_and_resume_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    env, home = _isolated_env(tmp_path)
    folder = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(folder), "offline"], check=False, cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line for line in out.stdout.splitlines() if line.startswith("RUN_ID")] == ["RUN_ID abc123def456"] * 2
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all("-abc123def456" in r.name for r in runs)  # (a "-1" suffix within a second)
    assert all((r / "run-abc123def456.wandb").is_file() for r in runs)
    assert not _warnings(out.stderr) and "less than the current step" not in out.stderr
    assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2, 3, 2, 2, 3, 4]
    assert [p for p in home.rglob("*")] == []  # nothing in ~/.cache/wandb, ~/.config/wandb, ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]  # nor in the working directory


def test_online_without_network_gives_up_with_one_warning(tmp_path):
    pytest.importorskip("wandb")
    # A fake key and a server address that refuses connections: no traffic leaves the machine.
    env, home = _isolated_env(tmp_path, WANDB_API_KEY="f" * 40, WANDB_BASE_URL="http://127.0.0.1:9",
                              **{INIT_TIMEOUT_ENV: "2"})
    folder = tmp_path / "run"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(folder), "online"], check=False, cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line for line in out.stdout.splitlines() if line.startswith("RUN_ID")] == ["RUN_ID None"] * 2
    warnings = _warnings(out.stderr)
    assert len(warnings) == 2, out.stderr  # one per logger (two processes' worth in one script)
    assert all("wandb.init" in w and "log.wandb=offline" in w for w in warnings)
    assert elapsed < 30, f"online init took {elapsed:.1f} s to give up"
    assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2, 3, 2, 2, 3, 4]
    assert [p for p in home.rglob("*")] == []


def test_online_without_credentials_never_prompts(tmp_path):
    pytest.importorskip("wandb")
    env, home = _isolated_env(tmp_path, WANDB_BASE_URL="http://127.0.0.1:9", **{INIT_TIMEOUT_ENV: "2"})
    folder = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(folder), "online"], check=False, cwd=tmp_path, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = _warnings(out.stderr)
    assert len(warnings) == 2 and all("no W&B credentials" in w and "wandb login" in w for w in warnings)
    assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2, 3, 2, 2, 3, 4]
    assert [p for p in home.rglob("*")] == []
