#!/usr/bin/env bash
# The fidelity protocol on natural photos, held out by photo (issue: evidence that discriminates).
# Train: random-resized crops of the 34 bundled natural photos that are not foolbox's ImageNet photos;
# validate: 6 seeded crops of each of the 20 held-out ImageNet photos (120 views). DINOv2-S at 112 px, bf16.
# Each run goes to runs/natural_v1/<name> (a finished run is skipped); its config, metrics, plots and log are
# copied to docs/results/natural_v1/<name>. A later protocol uses a new version directory: nothing here is
# ever overwritten by it.  Usage: scripts/natural_protocol.sh [name ...]   (default: every run, in order)
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/raptor
V=natural_v1
COMMON=(--teacher bundled:dinov2-s --data bundled:natural --val-data bundled:imagenet20 --val-crops 6
        --image-size 112 --autocast bfloat16 --probe-data none --no-progress)
declare -A RUN=(
  [k2_s0]="--phases 1-7/8-12 --seed 0"
  [k3dp_s0]="--k 3 --seed 0"
  [k4dp_s0]="--k 4 --seed 0"
  [ctrl_k2_1-11_12_s0]="--phases 1-11/12 --seed 0"
  [ctrl_k2_bal3_s0]="--phases 1-3/4-12 --seed 0"
  [ctrl_k2_bal4_s0]="--phases 1-4/5-12 --seed 0"
  [ctrl_k2_bal6_s0]="--phases 1-6/7-12 --seed 0"
  [planted_k2_s0]="--teacher planted:2,base=bundled:dinov2-s --phases 1-6/7-12 --seed 0"
  [k2_budget025_s0]="--phases 1-7/8-12 --seed 0 --steps1 112 --steps2 50"
  [k2_budget05_s0]="--phases 1-7/8-12 --seed 0 --steps1 225 --steps2 100"
  [planted_k2_budget025_s0]="--teacher planted:2,base=bundled:dinov2-s --phases 1-6/7-12 --seed 0 --steps1 112 --steps2 50"
  [planted_k2_budget05_s0]="--teacher planted:2,base=bundled:dinov2-s --phases 1-6/7-12 --seed 0 --steps1 225 --steps2 100"
  [k4dp_s1]="--k 4 --seed 1"
  [k2_s2]="--phases 1-7/8-12 --seed 2"
  [k3dp_s2]="--k 3 --seed 2"
  [k4dp_s2]="--k 4 --seed 2"
  [ctrl_untied_k12_s0]="--phases 1/2/3/4/5/6/7/8/9/10/11/12 --seed 0"
  [k2_s1]="--phases 1-7/8-12 --seed 1"
  [k3dp_s1]="--k 3 --seed 1"
  [k2_imgloss_s0]="--phases 1-7/8-12 --seed 0 --image-loss 1"
)
# balanced random k=2 partitions (every phase >= 3 layers): the cuts after layers 3, 4 and 6, drawn from
# {3, 4, 5, 6, 8, 9} (analyze's cut, 7, excluded) -- 4 by hand first, then random.Random(23).sample([3,5,6,8,9], 2).
# The budget curve: 1/4, 1/2 and 1 x the short recipe's 450 / 200 steps, for k=2 and for the planted control.
ORDER=(k2_s0 k3dp_s0 ctrl_untied_k12_s0 k2_imgloss_s0 ctrl_k2_1-11_12_s0 k4dp_s0 planted_k2_s0 ctrl_k2_bal4_s0
       ctrl_k2_bal3_s0 ctrl_k2_bal6_s0 k2_budget025_s0 k2_budget05_s0 k2_s1 k3dp_s1 planted_k2_budget025_s0
       planted_k2_budget05_s0 k4dp_s1 k2_s2 k3dp_s2 k4dp_s2)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")
for n in "${names[@]}"; do
  out=runs/$V/$n
  if [ ! -f "$out/metrics.json" ]; then
    mkdir -p runs/$V
    echo "== $n: $R fit ${COMMON[*]} ${RUN[$n]} --out $out"
    # shellcheck disable=SC2086
    $R fit "${COMMON[@]}" ${RUN[$n]} --out "$out" 2>&1 | tee "runs/$V/$n.log"
  fi
  mkdir -p docs/results/$V/$n
  cp "$out"/{config.yaml,metrics.json,surrogate.json,r2_per_layer.png,r2_image_specific_per_layer.png} docs/results/$V/$n/
  [ -f "$out/phases.json" ] && cp "$out/phases.json" docs/results/$V/$n/
  [ -f "runs/$V/$n.log" ] && cp "runs/$V/$n.log" docs/results/$V/$n/fit.log
done
