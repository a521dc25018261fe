# Environment for proseco jobs; sourced by every job script (the launcher's and the templates here).
# Edit for your cluster (module loads, conda/venv activation) or add lines with cluster.setup=[...].

# The repository's venv, when there is one (make venv); otherwise the python on PATH.
_proseco_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$_proseco_root/.venv/bin/python" ]; then
    export PATH="$_proseco_root/.venv/bin:$PATH"
fi

# One BLAS/OpenMP thread pool per task, sized to its CPUs (oversubscription makes torch much slower).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export PYTHONUNBUFFERED=1
# DeepSpeed's JIT-built ops (the CPU shared-memory allreduce) are cached here, not in $HOME.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$_proseco_root/.cache/torch_extensions}"
# sbatch passes the submitting shell's environment on: a rank layout set there (a shell inside
# torchrun or another job) would clash with the one each task sets for itself.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
# Multi-node GPU runs: uncomment what your fabric needs.
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_DEBUG=WARN
unset _proseco_root
