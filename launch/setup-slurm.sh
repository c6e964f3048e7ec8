#!/usr/bin/env bash
# Install Debian's Slurm and munge for the tests that start a real 2-node Slurm cluster on
# this machine (tests/cluster/test_slurm.py). Needs root and apt; elsewhere those tests are skipped
# with the reason.
set -euo pipefail
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup-slurm] not root or no apt-get: Slurm tests will be skipped" >&2
  exit 0
fi
echo "[setup-slurm] installing slurm-wlm and munge with apt (about a minute)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
