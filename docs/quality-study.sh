#!/usr/bin/env bash
# The image-quality study of docs/quality.md: each configuration trained for 150 kimg on
# Fashion-MNIST 32x32, then Inception FID (2,000 G-EMA samples against a seeded random
# 2,000 of the 10,000 test images) and domain FID (n = 10,000).
# Run alone on the machine: bash docs/quality-study.sh [NAME ...] (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
DCGAN=.venv/bin/dcgan
OUT=${OUT:-runs/quality}
RES=docs/quality
mkdir -p "$OUT" "$RES"
declare -A CFG=(
  [canonical]="--ngf 64 --ndf 64 --ema-kimg 0"
  [fmnist32]=""
  [hinge]="--loss hinge"
  [lsgan]="--loss lsgan"
  [wgan-gp]="--loss wgan-gp --d-steps 5 --lr 1e-4 --beta1 0 --beta2 0.9"
  [spectral-norm]="--d-spectral-norm"
  [r1]="--r1-gamma 0.1"
  [diffaug]="--diffaug translation,cutout"
  [r1-diffaug]="--r1-gamma 0.1 --diffaug translation,cutout"
  [r1-strong]="--r1-gamma 1"
  [r1-hinge]="--r1-gamma 0.1 --loss hinge"
  [tuned]="--config runs/tune-fm2/best.json"
  [fmnist32-fp32]="--precision fp32 --channels-last on"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(canonical fmnist32 hinge lsgan wgan-gp spectral-norm r1 diffaug)
for entry in "${names[@]}"; do
  name=${entry%@*}; seed=0; [[ $entry == *@* ]] && seed=${entry#*@}
  flags=${CFG[$name]:-${EXTRA:-}}
  run="$OUT/$name-s$seed"
  start=$(date +%s)
  # the rows are options on top of fmnist32 as it was before the tuned preset replaced it
  base="--ngf 32 --ndf 32 --lr 2e-4 --beta1 0.5 --r1-gamma 0 --ema-kimg 2"
  [[ $flags == --config* ]] && base=""
  # shellcheck disable=SC2086
  $DCGAN train --preset fmnist32 $base --kimg 150 --seed "$seed" $flags --out "$run" --force \
      --quiet
  trained=$(date +%s)
  $DCGAN eval "$run" fashion-mnist:test --features inception --n 2000 --metrics fid,kid \
      --quiet --json "$RES/$name-s$seed-inception.json" > /dev/null
  $DCGAN eval "$run" fashion-mnist:test --features domain --n 10000 --metrics fid,kid,pr \
      --quiet --json "$RES/$name-s$seed-domain.json" > /dev/null
  done_=$(date +%s)
  cp "$run"/samples/"$(ls "$run"/samples | tail -1)" "$RES/$name-s$seed-grid.png"
  python3 - "$run" "$name" "$seed" "$flags" "$((trained - start))" "$((done_ - trained))" <<'PY'
import json, statistics, sys
run, name, seed, flags, train_s, eval_s = sys.argv[1:]
rows = [json.loads(x) for x in open(f"{run}/stats.jsonl")]
inc = json.load(open(f"docs/quality/{name}-s{seed}-inception.json"))
dom = json.load(open(f"docs/quality/{name}-s{seed}-domain.json"))
first = json.loads(open(f"{run}/events.jsonl").readline())
print(json.dumps({"name": name, "seed": int(seed), "flags": flags, "kimg": rows[-1]["kimg"],
                  "inception_fid": inc["fid"], "domain_fid": dom["fid"],
                  "domain_precision": dom.get("precision"), "domain_recall": dom.get("recall"),
                  "train_s": int(train_s), "eval_s": int(eval_s),
                  "img_per_s": statistics.median(r["img_per_s"] for r in rows),
                  "precision": first.get("precision"), "channels_last": first.get("channels_last")}))
PY
done | tee -a "$RES/results.jsonl"
