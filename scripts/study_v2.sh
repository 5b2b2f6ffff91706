#!/usr/bin/env bash
# The small-scale study with its nulls (docs/study.md, protocol study_v2): balanced and shuffled partition nulls,
# depth-matched swaps, partial correlations given p, the validated fit recipe and the Figure 13 reference points.
# Runs go to docs/results/study_v2/<name>/ (report.md, study.json, figures; the ViTs and fits under runs/); the
# published docs/results/study stays as it was.   Usage: scripts/study_v2.sh [digits|fashion]
#   digits  : the bundled digits, p in {0, 0.1, 0.2, 0.3, 0.5}, seeds 0-2 (about 3 CPU-hours on 2 cores)
#   fashion : Fashion-MNIST (apt install dataset-fashion-mnist), the paper's grid p = 0..0.9, seeds 0-2, 28 px
#             ViTs trained 40 epochs on 12,000 images: a regime where stochastic depth can help (a GPU job)
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/raptor
O=docs/results/study_v2
which=${1:-digits}
mkdir -p $O runs/study_v2
copy() { mkdir -p $O/$1; cp runs/study_v2/$1/report.md runs/study_v2/$1/study.json runs/study_v2/$1/config.yaml $O/$1/;
         cp runs/study_v2/$1/*.png $O/$1/; }
case $which in
  digits)  $R study --data bundled:digits --out runs/study_v2/digits --seeds 0,1,2 --no-progress; copy digits ;;
  fashion) $R study --data fashion-mnist --limit 15000 --out runs/study_v2/fashion --sd 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 \
             --seeds 0,1,2 --image-size 28 --patch-size 4 --epochs 40 --no-progress; copy fashion ;;
  *) echo "error: unknown study $which (use digits or fashion)" >&2; exit 2 ;;
esac
