#!/usr/bin/env bash
# Install the Debian packages for the throw-away test cluster (slurm/cluster/start.sh):
# slurmctld, slurmd, the SLURM clients, munge, slurmdbd and MariaDB (for sacct).
#
# Non-interactive, and starts no daemons: when the host has no /usr/sbin/policy-rc.d, a
# temporary one that denies every service start is put in place for the duration of the install.
# Skips everything when all the needed binaries are already on PATH.
#
#   bash slurm/cluster/install.sh        # needs root (or passwordless sudo)
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
NEEDED=(slurmctld slurmd slurmdbd sbatch srun sinfo squeue sacct sacctmgr scontrol scancel
        munged mariadbd mariadb mariadb-install-db)
MINIMAL=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
FALLBACK=(slurm-wlm munge slurmdbd mariadb-server)

missing() {
  local b out=()
  for b in "${NEEDED[@]}"; do command -v "$b" >/dev/null 2>&1 || out+=("$b"); done
  echo "${out[*]:-}"
}

miss=$(missing)
if [ -z "$miss" ]; then
  echo "install.sh: SLURM, munge, slurmdbd and MariaDB are already installed; nothing to do."
  exit 0
fi
echo "install.sh: missing: $miss"

SUDO=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install.sh: error: need root (or passwordless sudo) to run apt-get." >&2
    exit 1
  fi
fi

# Keep package post-install scripts from starting slurmctld/slurmd/munge/mariadb.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  "${SUDO[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
  trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
  echo "install.sh: temporary $POLICY in place (no service starts during the install)"
fi

APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q
     -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }

t0=$EPOCHREALTIME
"${APT[@]}" update -qq
t1=$EPOCHREALTIME
echo "install.sh: apt-get update: $(secs "$t0" "$t1") s"

if ! "${APT[@]}" install --no-install-recommends "${MINIMAL[@]}"; then
  echo "install.sh: minimal package set failed; falling back to: ${FALLBACK[*]}" >&2
  "${APT[@]}" install --no-install-recommends "${FALLBACK[@]}"
fi
miss=$(missing)
if [ -n "$miss" ]; then
  echo "install.sh: minimal package set lacks: $miss; installing: ${FALLBACK[*]}" >&2
  "${APT[@]}" install --no-install-recommends "${FALLBACK[@]}"
  miss=$(missing)
fi
t2=$EPOCHREALTIME
if [ -n "$miss" ]; then
  echo "install.sh: error: still missing after install: $miss" >&2
  exit 1
fi
echo "install.sh: apt-get install: $(secs "$t1" "$t2") s"
echo "install.sh: done: $(dpkg-query -W -f='${Package} ${Version}\n' slurmctld munge slurmdbd mariadb-server 2>/dev/null | paste -sd, -)"
