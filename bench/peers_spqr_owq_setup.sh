#!/usr/bin/env bash
# The local checkouts of the SpQR and OWQ peers (bench/peers_spqr_owq.py): their authors' repositories at pinned
# commits, outside this repository (neither has a PyPI package; nothing of their code is vendored here). The adapter
# imports their quantization modules from these checkouts; it needs no package beyond sensiquant's own.
#   bash bench/peers_spqr_owq_setup.sh [SPQR_GIT [OWQ_GIT]]
#   SPQR_GIT / OWQ_GIT: where to clone from (argument or env var): a URL, or a local git directory or bare mirror
#     (a machine without GitHub access); default the GitHub repositories
#   env: SENSIQUANT_SPQR_SRC / SENSIQUANT_OWQ_SRC: the checkouts (default $SENSIQUANT_PEERS_CACHE/SpQR and .../owq,
#     SENSIQUANT_PEERS_CACHE default ~/.cache/sensiquant-peers); the adapter reads the same variables
# Sparse checkouts: their calibration-data files and bundled copies of lm-evaluation-harness are left out (the
# adapter uses neither; GitHub's snapshots on some machines lack those large blobs). Idempotent: an existing
# checkout is moved to the pinned commit (fetched from the source when it lacks it).
set -euo pipefail
root="${SENSIQUANT_PEERS_CACHE:-$HOME/.cache/sensiquant-peers}"
spqr_git="${1:-${SPQR_GIT:-https://github.com/Vahe1994/SpQR}}"
owq_git="${2:-${OWQ_GIT:-https://github.com/xvyaward/owq}}"
SPQR_COMMIT=543d10e56f921e5eeb10d5f0aaaccd30b6662d0e  # 2026-02-08, "Update README to remove note on inference code"
OWQ_COMMIT=03cfc9941cfbe951ca7dbc614c66bc625fbb9857   # 2024-03-07, "fix poor llama ptb"

checkout() {  # source, destination, commit
  local src="$1" dest="$2" commit="$3"
  if [ ! -d "$dest/.git" ]; then
    mkdir -p "$(dirname "$dest")"
    git clone -q --no-checkout "$src" "$dest"
    git -C "$dest" sparse-checkout set --no-cone '/*' '!/data/' '!/lm_eval/' '!/lm-evaluation-harness/'
  fi
  if ! git -C "$dest" cat-file -e "$commit^{commit}" 2>/dev/null; then
    git -C "$dest" fetch -q "$src"
  fi
  git -C "$dest" -c advice.detachedHead=false checkout -q "$commit"
  echo "$dest at $(git -C "$dest" log -1 --format='%h %cs %s')"
}

checkout "$spqr_git" "${SENSIQUANT_SPQR_SRC:-$root/SpQR}" "$SPQR_COMMIT"
checkout "$owq_git" "${SENSIQUANT_OWQ_SRC:-$root/owq}" "$OWQ_COMMIT"
