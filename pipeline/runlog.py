"""The metrics logger of `proseco train` (rank 0): ``metrics.jsonl``, mirrored to Weights & Biases.

``<run folder>/metrics.jsonl`` is the source of truth: one JSON object per logged optimizer step
(``step`` plus flat numbers), appended and flushed row by row, so a crash loses at most the line
being written (a torn last line is cut off when the logger opens the file again). Read it with
:func:`read_metrics`. A resumed run replays the steps after its checkpoint, so a step may appear
twice; the later row wins (the values are equal: training is deterministic).

W&B (``log.wandb``) only mirrors that file:

* ``disabled``: wandb is not even imported.
* ``offline`` (default): no network, no account. Everything wandb writes stays under
  ``<run folder>/wandb/``: the run data in ``offline-run-<time>-<logger_id>/`` (one folder per
  process start; a requeued run adds one), its caches, settings and debug logs in ``cache/``,
  ``config/``, ``data/`` (``WANDB_DIR``, ``WANDB_CACHE_DIR``, ``WANDB_CONFIG_DIR`` and
  ``WANDB_DATA_DIR`` point there while the logger is open, each only if you have not set it
  yourself; nothing lands in ``~/.cache/wandb`` or ``~/.config/wandb``). Upload later, from a
  machine with network, with ``wandb sync <run folder>/wandb/offline-run-*``: the parts of a
  requeued run are synced in order of start time into one W&B run.
* ``online``: needs ``wandb login`` (or ``WANDB_API_KEY``). Since ``WANDB_CONFIG_DIR`` is
  redirected into the run folder, a self-hosted server needs ``WANDB_BASE_URL`` (or export your
  own ``WANDB_CONFIG_DIR``, which is then left alone).

The W&B run id is ``run.json``'s ``logger_id``, with ``resume="allow"``: a requeued job (same run
folder) continues the same W&B run. W&B wants increasing steps, while a resume replays the steps
between its checkpoint and the crash. Rule: a row goes to W&B only if its step is above the last
step that ``metrics.jsonl`` held when the logger opened (the earlier process already mirrored
those) and not below the last step sent by this process; the other rows still go to
``metrics.jsonl``. So W&B sees each step once, in order, and never warns.

W&B never stops training: if wandb is missing, ``wandb.init`` fails (no credentials, no network:
it gives up after ``PROSECO_WANDB_INIT_TIMEOUT`` seconds, default 60) or a later call raises, one
warning line goes to stderr and the run goes on with ``metrics.jsonl`` alone. ``wandb.finish``
gets exit code 1 when the ``with`` block raised (W&B shows the run as crashed), else
:attr:`RunLogger.exit_code` (0). wandb's console capture is off (``WANDB_CONSOLE`` overrides):
stdout and stderr stay untouched. On exit the wandb service process is shut down
(``wandb.teardown``), so no wandb process outlives the logger.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Config, to_dict
from pipeline.rundir import RunDir

INIT_TIMEOUT_ENV = "PROSECO_WANDB_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT_S = 60.0
_WANDB_DIRS = {"WANDB_DIR": "", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config", "WANDB_DATA_DIR": "data"}
_TAIL_BYTES = 1 << 16  # enough to hold the last few rows of metrics.jsonl


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl (a line that does not parse, e.g. cut by a crash, is skipped)."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():  # damaged bytes: that line is skipped
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _repair_metrics(path: Path) -> int | None:
    """Cut a torn last line (killed mid-write) off ``path``; the step of its last complete row, or None."""
    if not path.is_file():
        return None
    with open(path, "r+b") as f:
        size, chunk = f.seek(0, os.SEEK_END), _TAIL_BYTES
        while True:  # a tail holding at least one complete line (or the whole file)
            start = max(0, size - chunk)
            f.seek(start)
            tail = f.read()
            if start == 0 or tail.count(b"\n") >= 2:
                break
            chunk *= 8
        if tail and not tail.endswith(b"\n"):  # killed mid-line: drop the torn row
            cut = tail.rfind(b"\n") + 1
            f.truncate(start + cut)
            tail = tail[:cut]
    for line in reversed(tail.splitlines()):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return int(json.loads(line)["step"])
    return None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _init_timeout() -> float:
    text = os.environ.get(INIT_TIMEOUT_ENV, "").strip()
    try:
        return float(text) if text else DEFAULT_INIT_TIMEOUT_S
    except ValueError:
        _warn(f"{INIT_TIMEOUT_ENV}={text!r} is not a number; using {DEFAULT_INIT_TIMEOUT_S:g} s")
        return DEFAULT_INIT_TIMEOUT_S


class RunLogger:
    """``with RunLogger(folder, cfg, info, enabled=rank == 0) as log: log.log({"step": s, ...})``.

    ``info`` is the run folder's run.json (``logger_id`` names the W&B run). ``enabled=False``
    (ranks other than 0) makes every call a no-op that touches no file. Set :attr:`exit_code`
    before leaving the block to report a non-zero exit to W&B (an exception reports 1).
    """

    def __init__(self, folder: str | os.PathLike, cfg: Config, info: dict, enabled: bool = True):
        self.folder, self.cfg, self.info, self.enabled = Path(folder), cfg, info, enabled
        self.exit_code = 0
        self.resume_step: int | None = None  # last step in metrics.jsonl when opened
        self.wandb_run: Any = None  # the wandb Run while W&B mirrors the metrics
        self._file = None
        self._wandb: Any = None
        self._last_sent: int | None = None
        self._saved_env: dict[str, str | None] = {}

    # ---- context manager ----------------------------------------------------------------------
    def __enter__(self):
        if not self.enabled:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = RunDir(self.folder).metrics
        self.resume_step = _repair_metrics(path)
        self._file = open(path, "a")  # closed in __exit__
        mode = self.cfg.log.wandb
        if mode in ("offline", "online"):
            self._start_wandb(mode)
        elif mode != "disabled":
            _warn(f"log.wandb={mode!r} is not one of offline, online, disabled; logging to metrics.jsonl only")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            code = self.exit_code
            if exc_type is not None:
                code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
            try:
                self.wandb_run.finish(exit_code=code)
            except Exception as e:  # noqa: BLE001 (a mirror must not mask the training's outcome)
                _warn(f"wandb.finish failed ({type(e).__name__}: {e}); metrics.jsonl is complete")
            self.wandb_run = None
        self._stop_wandb()

    # ---- logging ------------------------------------------------------------------------------
    def log(self, row: dict) -> None:
        """Append ``row`` (``step`` plus flat numbers) to metrics.jsonl; mirror it to W&B (see module doc)."""
        if self._file is None:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb_run is None:
            return
        step = int(row["step"])
        if (self.resume_step is not None and step <= self.resume_step) or \
                (self._last_sent is not None and step < self._last_sent):
            return  # already in W&B (replayed after a resume) or out of order
        try:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step)
            self._last_sent = step
        except Exception as e:  # noqa: BLE001
            _warn(f"wandb.log failed ({type(e).__name__}: {e}); W&B mirroring stops here, "
                  f"metrics.jsonl goes on")
            with contextlib.suppress(Exception):
                self.wandb_run.finish(exit_code=1)
            self.wandb_run = None
            self._stop_wandb()

    # ---- wandb --------------------------------------------------------------------------------
    def _start_wandb(self, mode: str) -> None:
        fix = ("set log.wandb=offline (and `wandb sync` later) or log.wandb=disabled" if mode == "online"
               else "set log.wandb=disabled")
        try:
            import wandb
        except ImportError as e:
            _warn(f"log.wandb={mode} needs the wandb package ({e}): `pip install wandb`, or {fix}; "
                  "logging to metrics.jsonl only")
            return
        self._wandb = wandb
        root = self.folder.resolve() / "wandb"
        for var, sub in _WANDB_DIRS.items():
            if not os.environ.get(var):
                self._saved_env[var] = os.environ.get(var)
                os.environ[var] = str(root / sub) if sub else str(self.folder.resolve())
        timeout = _init_timeout()
        cfg = self.cfg
        try:
            root.mkdir(parents=True, exist_ok=True)
            # x_disable_viewer: no account look-up (it retries for ~5 s per call without network).
            wandb.setup(settings=wandb.Settings(x_disable_viewer=True, login_timeout=timeout))
            if mode == "online" and not wandb.login(prompt=False, verify=False):
                _warn(f"log.wandb=online but no W&B credentials were found: run `wandb login` (or set "
                      f"WANDB_API_KEY), or {fix}; logging to metrics.jsonl only")
                self._stop_wandb()
                return
            settings = {"init_timeout": timeout}
            if "WANDB_CONSOLE" not in os.environ:
                settings["console"] = "off"
            self.wandb_run = wandb.init(
                project=cfg.log.wandb_project, entity=cfg.log.wandb_entity or None,
                id=self.info.get("logger_id") or self.info.get("run_id"), resume="allow", name=cfg.run.name,
                dir=str(self.folder.resolve()), config=to_dict(cfg), mode=mode, allow_val_change=True,
                settings=wandb.Settings(**settings))
        except Exception as e:  # noqa: BLE001 (CommError, UsageError, AuthenticationError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            hint = "`wandb login`, check the network, or " if mode == "online" else ""
            _warn(f"wandb.init (log.wandb={mode}, {INIT_TIMEOUT_ENV}={timeout:g} s) failed: "
                  f"{type(e).__name__}: {first[:300]}; "
                  f"{hint}{fix}; logging to metrics.jsonl only")
            self.wandb_run = None
            self._stop_wandb()

    def _stop_wandb(self) -> None:
        """Shut the wandb service down and give the environment back."""
        if self._wandb is not None:
            with contextlib.suppress(Exception):
                self._wandb.teardown()
            self._wandb = None
        for var, old in self._saved_env.items():
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old
        self._saved_env = {}
