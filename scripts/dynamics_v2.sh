#!/usr/bin/env bash
# Dynamics verdicts against their nulls (docs/dynamics.md, protocol dynamics_v2): the bundled DINOv2-S and the
# natural_v1 k=3 surrogate (scripts/natural_protocol.sh k3dp_s0) on the 54 bundled natural photos at 112 px (the
# surrogate's size), natural images first; then the labelled digits (class basins need labels). 4 random-weight
# teachers are the null. Runs go to docs/results/dynamics_v2/<name> (a finished one is skipped); the older
# docs/results/dynamics runs stay as they were.   Usage: scripts/dynamics_v2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/raptor
O=docs/results/dynamics_v2
S=runs/natural_v1/k3dp_s0
[ -f $S/model.safetensors ] || { echo "error: $S is not trained here (scripts/natural_protocol.sh k3dp_s0)" >&2; exit 2; }
mkdir -p $O
run() { local name=$1; shift; [ -f $O/$name/dynamics.json ] || $R dynamics "$@" --out $O/$name --no-progress; }
run natural112 --data bundled:natural --image-size 112 --surrogate $S --perturb-images 32 --rank-images 54
run digits112 --data bundled:digits --image-size 112 --limit 300 --surrogate $S --perturb-images 32
