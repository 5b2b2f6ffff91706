#!/usr/bin/env bash
# Table 1 on bundled data (docs/probes.md, protocol probes_v2) with the surrogates of the natural_v1 protocol
# (trained on natural photos held out by photo; scripts/natural_protocol.sh), the teacher, the untied k=12 ceiling
# at the same budget and the raw-pixel baseline; 3 probe seeds. Runs go to runs/probes_v2 (features cached there);
# results.jsonl, the tables and the curves are copied to docs/results/probes_v2. The older docs/results/probes
# (first-recipe digit surrogates) stays as it was.   Usage: scripts/probes_v2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/raptor
O=runs/probes_v2
D=docs/results/probes_v2
for r in k2_s0 k3dp_s0 ctrl_untied_k12_s0; do
  [ -f runs/natural_v1/$r/model.safetensors ] || { echo "error: runs/natural_v1/$r is not trained here (scripts/natural_protocol.sh $r)" >&2; exit 2; }
done
mkdir -p $O
# most informative first (dense tasks, then classification), so that a cut-short run still answers something
for t in "seg bundled:digit-seg" "depth bundled:motorcycle" "cls bundled:lfw" "depth bundled:scenes" "cls bundled:digits"; do
  for bb in bundled:dinov2-s pixels:14 runs/natural_v1/k2_s0 runs/natural_v1/k3dp_s0 runs/natural_v1/ctrl_untied_k12_s0; do
    set -- $t
    key="$bb $1 $2"
    grep -qxF "$key" $O/done.txt 2>/dev/null && continue
    echo "== $R probe --task $1 --backbone $bb --data $2 --out $O --seeds 0,1,2"
    $R probe --task "$1" --backbone "$bb" --data "$2" --out $O --seeds 0,1,2 --no-progress
    echo "$key" >> $O/done.txt
  done
done
$R table $O --out $O/table
mkdir -p $D
cp $O/results.jsonl $D/
cp $O/table.md $O/table.csv $D/
cp -r $O/curves $D/
