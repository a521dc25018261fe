"""``proseco launch | status | cancel``: run training (and array stages) as SLURM jobs through submitit.

``proseco launch train`` resolves the config, snapshots it with the code version (git sha plus the
uncommitted diff) and the rendered job script into ``RUN/launch/<time>/``, and submits one job of
``cluster.nodes x cluster.tasks_per_node`` tasks with submitit's ``SlurmExecutor`` (or its
``LocalExecutor`` with ``cluster.executor=local``). Each task is one training rank:

1. :class:`~pipeline.launch.tasks.TrainTask` exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
   MASTER_PORT from the SLURM environment (``submitit.helpers.TorchDistributedEnvironment``; no
   rank guessing) and calls :func:`pipeline.train.run`, which initialises the process group for
   the chosen backend and auto-resumes from the run folder's latest complete checkpoint.
2. Before the time limit SLURM sends SIGUSR2 to every task (``--signal=USR2@cluster.signal_delay_s``);
   the train loop's collective stop makes all ranks save at the same step and return 3. Rank 0
   then requeues the job (``scontrol requeue``) unless ``cluster.max_requeues`` restarts were used.
   SIGUSR1 (``scancel -s USR1 JOB``) does the same on demand. SIGTERM - ``scancel``, preemption,
   ``scontrol requeue`` - saves and stops; SLURM itself decides whether the job comes back.
3. A restart runs the same pickled task, which resumes under the same run id, appends to the same
   logs (``RUN/slurm/<job>_<task>_log.{out,err}``) and continues the same wandb run.
4. A rank that dies ends the job step at once (``srun --kill-on-bad-exit``, ``cluster.kill_on_bad_exit``),
   and ranks that do not all meet within ``cluster.startup_timeout_s`` stop with an error
   (:mod:`pipeline.distributed`), so a failure does not hold the allocation until the time limit.
   With ``cluster.retries_on_failure=N`` the job script requeues a failed step up to N times
   (:func:`pipeline.launch.slurm.requeue_on_failure`); the restart resumes from the latest checkpoint.

A run folder belongs to one job at a time: ``launch`` refuses a folder whose recorded job is still
queued or running (``RUN/slurm/job.json``). ``proseco launch prep --parts N`` tokenizes a corpus as
an array job of N partitions (``proseco prep shards --task i/N``), then one dependent job merges
them. ``--dry-run`` prints the job script(s) exactly as they would be submitted, what each task
runs and the resolved config, and submits nothing.

Modules: :mod:`~pipeline.launch.commands` (the verbs), :mod:`~pipeline.launch.slurm` (executor
parameters, job script, the one submit recipe, job state), :mod:`~pipeline.launch.tasks` (what
runs on the nodes), :mod:`~pipeline.launch.render` (dry-run output).
"""

from pipeline.launch.commands import cancel, launch_eval, launch_prep, launch_train, prep_jobs_dir, status
from pipeline.launch.render import gpu_warning
from pipeline.launch.slurm import job_script, job_state, requeue_on_failure, slurm_parameters, submit
from pipeline.launch.tasks import KILL_AT_START_ENV, EvalShardTask, PrepMergeTask, PrepPartTask, TrainTask

__all__ = ["KILL_AT_START_ENV", "EvalShardTask", "PrepMergeTask", "PrepPartTask", "TrainTask", "cancel",
           "gpu_warning", "job_script", "job_state", "launch_eval", "launch_prep", "launch_train", "prep_jobs_dir",
           "requeue_on_failure", "slurm_parameters", "status", "submit"]
