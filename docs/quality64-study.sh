#!/usr/bin/env bash
# The 64x64 colour study of docs/quality.md: the paper's model (`dcgan64`) beside the
# fmnist32 lessons carried to 64x64 (`color64`), with and without DiffAugment, each
# trained for the same kimg on the emoji set (3,780 glyphs, no test split), then
# Inception FID of 2,000 G-EMA samples against a seeded random 2,000 of the glyphs.
# Run alone on the machine: bash docs/quality64-study.sh [NAME[@SEED] ...] (default:
# all, seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
DCGAN=.venv/bin/dcgan
OUT=${OUT:-runs/quality64}
RES=docs/quality
KIMG=${KIMG:-60}
mkdir -p "$OUT" "$RES"
declare -A CFG=(
  [dcgan64]="--preset dcgan64"
  [color64-nodiffaug]="--preset color64 --diffaug ''"
  [color64]="--preset color64"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(dcgan64 color64-nodiffaug color64)
for entry in "${names[@]}"; do
  name=${entry%@*}; seed=0; [[ $entry == *@* ]] && seed=${entry#*@}
  run="$OUT/$name-s$seed"
  start=$(date +%s)
  # shellcheck disable=SC2086
  eval $DCGAN train ${CFG[$name]} --kimg "$KIMG" --tick-kimg 5 --seed "$seed" --out "$run" \
      --force --quiet
  trained=$(date +%s)
  $DCGAN eval "$run" emoji --features inception --n 2000 --metrics fid,kid \
      --quiet --json "$RES/64-$name-s$seed-inception.json" > /dev/null
  done_=$(date +%s)
  cp "$run"/samples/"$(ls "$run"/samples | tail -1)" "$RES/64-$name-s$seed-grid.png"
  python3 - "$run" "$name" "$seed" "$((trained - start))" "$((done_ - trained))" <<'PY'
import json, statistics, sys
run, name, seed, train_s, eval_s = sys.argv[1:]
rows = [json.loads(x) for x in open(f"{run}/stats.jsonl")]
inc = json.load(open(f"docs/quality/64-{name}-s{seed}-inception.json"))
first = json.loads(open(f"{run}/events.jsonl").readline())
print(json.dumps({"name": name, "seed": int(seed), "kimg": rows[-1]["kimg"], "inception_fid": inc["fid"],
                  "train_s": int(train_s), "eval_s": int(eval_s),
                  "img_per_s": statistics.median(r["img_per_s"] for r in rows),
                  "precision": first.get("precision"),
                  "channels_last": first.get("channels_last")}))
PY
done | tee -a "$RES/results64.jsonl"
