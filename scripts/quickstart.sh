#!/usr/bin/env bash
# The one-command quickstart of README.md: captions to pictures on a CPU (docs/quickstart.md).
#
#   scripts/quickstart.sh [WORK_DIR]      WORK_DIR: argument, else $QUICKSTART_DIR, else runs/quickstart
#
# Builds trainer and data-prep (release), writes the synthetic shapes (training set and held-out
# captions from another seed, none of them a training caption), packs them into image shards,
# trains a caption BPE, a dVAE (configs/quickstart-dvae.yaml) and a transformer
# (configs/quickstart-transformer.yaml) on the dVAE's codes, draws pictures for the held-out
# captions (trainer sample) and judges whether they show what the captions ask for
# (data-prep judge: colour, shape, background and position match rates beside chance).
#
# Resumable: after an interruption (Ctrl-C, kill, a crash) rerun the same command. A step is
# skipped only when its marker WORK_DIR/steps/NAME.done exists, which is written after the step's
# command succeeded, and the tool's own record of a complete output is there (synth.json,
# stats.json, every shard's .done marker, the final checkpoint's DONE, index.json). Any other
# step runs again, and the tools resume inside it: ingest and encode per shard, training from
# its newest checkpoint (SIGINT and SIGTERM make `trainer train` write one before it exits).
# Once a step runs, the markers of the steps after it are dropped, so nothing downstream reads
# an older output.
#
# Sizes, from the environment (for a quick try or a test; a work directory keeps the sizes it
# was started with, and another size needs another directory):
#   QS_TRAIN_COUNT (4096) training images, QS_HELDOUT (32) held-out captions,
#   QS_PER_CAPTION (4) pictures per caption, QS_DVAE_STEPS and QS_TRANSFORMER_STEPS (the
#   configs' train.steps), QS_RESOLUTION (64; the dVAE's model.resolution and 8 × the
#   transformer's model.grid must agree with it).
# QS_SKIP_BUILD=1 uses the binaries in QS_BIN (default target/release) without building.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-${QUICKSTART_DIR:-$root/runs/quickstart}}
mkdir -p "$work"
work=$(cd "$work" && pwd)
cd "$root"

train_count=${QS_TRAIN_COUNT:-4096}
heldout=${QS_HELDOUT:-32}
per_caption=${QS_PER_CAPTION:-4}
resolution=${QS_RESOLUTION:-64}
dvae_config=configs/quickstart-dvae.yaml
transformer_config=configs/quickstart-transformer.yaml
dvae_steps=${QS_DVAE_STEPS:-}
transformer_steps=${QS_TRANSFORMER_STEPS:-}
bin=${QS_BIN:-$root/target/release}
# The training set's seed, and the held-out captions' (another stream of the same generator).
train_seed=0
heldout_seed=1

log() { printf 'quickstart: %s\n' "$*"; }
die() {
  printf 'quickstart: error: %s\n' "$*" >&2
  exit 1
}

# The sizes this work directory was started with; another size would mix two data sets.
sizes="train_count=$train_count heldout=$heldout per_caption=$per_caption resolution=$resolution"
sizes+=" dvae_steps=${dvae_steps:-config} transformer_steps=${transformer_steps:-config}"
if [[ -f $work/sizes ]]; then
  [[ $(cat "$work/sizes") == "$sizes" ]] ||
    die "$work was started with sizes '$(cat "$work/sizes")', not '$sizes': use another work directory"
else
  printf '%s\n' "$sizes" >"$work/sizes.tmp"
  mv "$work/sizes.tmp" "$work/sizes"
fi

# The final step of a config's training (train.steps, or the override).
final_step() { # CONFIG OVERRIDE
  if [[ -n $2 ]]; then
    echo "$2"
  else
    "$bin/trainer" config --config "$1" |
      awk '/^train:/ { t = 1; next } /^[^ ]/ { t = 0 } t && $1 == "steps:" { print $2 }'
  fi
}

# Whether a run directory holds the complete checkpoint of its final step.
trained() { # RUN_DIR CONFIG OVERRIDE
  local steps
  steps=$(final_step "$2" "$3") || return 1
  [[ -n $steps && -f $1/checkpoints/$(printf 'step_%08d' "$steps")/DONE ]]
}

# --set arguments for a run: its directory, and the step count when overridden.
run_sets() { # RUN_DIR OVERRIDE
  printf '%s\n' "--set" "run.out_dir=$1"
  if [[ -n $2 ]]; then printf '%s\n' "--set" "train.steps=$2"; fi
}

# Every image shard has its token shard and the token shard's done marker.
encoded() {
  local tis n=0
  for tis in "$work"/images/images-*.tis; do
    [[ -f $tis ]] || return 1
    local tts=$work/tokens/$(basename "${tis%.tis}").tts
    [[ -f $tts && -f $tts.done ]] || return 1
    n=$((n + 1))
  done
  ((n > 0))
}

steps=(build synth heldout ingest tokenizer dvae encode transformer sample judge)
declare -A seconds
ran_earlier=0
total_start=$(date +%s.%N)

# step NAME: skipped when its marker and complete_NAME say it is done, else do_NAME runs, its
# output is checked by complete_NAME, and the marker is written.
step() {
  local name=$1 marker=$work/steps/$1.done
  mkdir -p "$work/steps"
  # The build always runs: cargo itself skips what is up to date.
  if [[ $name != build ]] && ((ran_earlier == 0)) && [[ -f $marker ]] && "complete_$name"; then
    log "[$name] done earlier, skipped"
    seconds[$name]=skipped
    return
  fi
  rm -f "$marker"
  # What comes after this step was made from its earlier output: drop those markers.
  if [[ $name != build ]]; then ran_earlier=1; fi
  log "[$name] running"
  local t0 t1
  t0=$(date +%s.%N)
  "do_$name"
  "complete_$name" || die "step $name finished but its output is incomplete"
  t1=$(date +%s.%N)
  seconds[$name]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  date -u +%FT%TZ >"$marker.tmp"
  mv "$marker.tmp" "$marker"
  log "[$name] done in ${seconds[$name]} s"
}

# 1. Release build of the two programs (cargo skips what is up to date).
do_build() {
  if [[ ${QS_SKIP_BUILD:-0} == 1 ]]; then
    log "QS_SKIP_BUILD=1: using $bin"
  else
    cargo build --release --locked -p trainer -p data-prep
  fi
}
complete_build() { [[ -x $bin/trainer && -x $bin/data-prep ]]; }

# 2. The training set (synth.json is written after every sample).
do_synth() {
  "$bin/data-prep" synth --count "$train_count" --resolution "$resolution" --seed "$train_seed" \
    --out "$work/shapes"
}
complete_synth() { grep -qs "\"count\":$train_count[,}]" "$work/shapes/synth.json"; }

# 3. Held-out captions: another seed, minus any caption that is also a training caption.
do_heldout() {
  "$bin/data-prep" synth --count $((4 * heldout)) --resolution "$resolution" \
    --seed "$heldout_seed" --out "$work/heldout" --quiet
  find "$work/shapes" -name '*.txt' -print0 | sort -z | xargs -0 awk 1 >"$work/train-captions.txt"
  find "$work/heldout" -name '*.txt' -print0 | sort -z | xargs -0 awk 1 |
    grep -Fvx -f "$work/train-captions.txt" | awk '!seen[$0]++' | head -n "$heldout" \
    >"$work/heldout-captions.txt.tmp" || true
  local n
  n=$(wc -l <"$work/heldout-captions.txt.tmp")
  ((n == heldout)) || die "only $n held-out captions differ from every training caption"
  mv "$work/heldout-captions.txt.tmp" "$work/heldout-captions.txt"
}
complete_heldout() { [[ -s $work/heldout-captions.txt && -f $work/heldout/synth.json ]]; }

# 4. Image shards (stats.json is written after every shard and its marker).
do_ingest() {
  "$bin/data-prep" ingest --input "$work/shapes" --out "$work/images" --resolution "$resolution"
}
complete_ingest() { [[ -f $work/images/stats.json ]]; }

# 5. The caption BPE (written through a temporary file and a rename).
do_tokenizer() {
  "$bin/data-prep" tokenizer train --input "$work/shapes" --vocab-size 1024 \
    --out "$work/tokenizer.json"
}
complete_tokenizer() { [[ -f $work/tokenizer.json ]]; }

# 6. Stage 1: the dVAE, resumed from its newest checkpoint when there is one.
do_dvae() {
  local sets
  mapfile -t sets < <(run_sets "$work/dvae" "$dvae_steps")
  "$bin/trainer" train --config "$dvae_config" "${sets[@]}" \
    --set "data.paths=['$work/images/images-*.tis']" --set "model.resolution=$resolution"
}
complete_dvae() { trained "$work/dvae" "$dvae_config" "$dvae_steps"; }

# 7. The transformer's data: the dVAE's codes and the captions' BPE ids (resumes per shard). The
# dVAE's EMA weights when it keeps them, as `trainer sample` decodes with those.
do_encode() {
  local ema=() steps
  steps=$(final_step "$dvae_config" "$dvae_steps")
  if [[ -f $work/dvae/checkpoints/$(printf 'step_%08d' "$steps")/ema.safetensors ]]; then
    ema=(--ema)
  fi
  "$bin/data-prep" encode --images "$work/images/images-*.tis" --tokenizer "$work/tokenizer.json" \
    --dvae "$work/dvae" "${ema[@]}" --config "$transformer_config" \
    --set "model.grid=$((resolution / 8))" --out "$work/tokens"
}
complete_encode() { encoded; }

# 8. Stage 2: the transformer, resumed from its newest checkpoint when there is one.
do_transformer() {
  local sets
  mapfile -t sets < <(run_sets "$work/transformer" "$transformer_steps")
  "$bin/trainer" train --config "$transformer_config" "${sets[@]}" \
    --set "data.paths=['$work/tokens/images-*.tts']" --set "data.tokenizer=$work/tokenizer.json" \
    --set "model.grid=$((resolution / 8))"
}
complete_transformer() { trained "$work/transformer" "$transformer_config" "$transformer_steps"; }

# 9. Pictures for the held-out captions (index.json is written after every picture).
do_sample() {
  rm -f "$work/samples/index.json"
  "$bin/trainer" sample --transformer "$work/transformer" --dvae "$work/dvae" \
    --prompts "$work/heldout-captions.txt" -n "$per_caption" --seed 0 --out "$work/samples"
}
complete_sample() { [[ -f $work/samples/index.json ]]; }

# 10. The judge: the held-out originals first (what the judge scores on true pictures), then the
# dVAE's reconstructions of them (what stage 1 keeps: the samples' ceiling), then the samples.
do_judge() {
  log "the judge on the held-out synth pictures themselves (its ceiling):"
  "$bin/data-prep" judge --images "$work/heldout" --out "$work/judge-heldout.json"
  local ema=() steps
  steps=$(final_step "$dvae_config" "$dvae_steps")
  if [[ -f $work/dvae/checkpoints/$(printf 'step_%08d' "$steps")/ema.safetensors ]]; then
    ema=(--ema)
  fi
  rm -rf "$work/heldout-images" "$work/reconstructions"
  "$bin/data-prep" ingest --input "$work/heldout" --out "$work/heldout-images" \
    --resolution "$resolution" --quiet >/dev/null
  log "the judge on the dVAE's reconstructions of them (stage 1: the samples' ceiling):"
  "$bin/trainer" reconstruct --weights "$work/dvae" "${ema[@]}" \
    --images "$work/heldout-images/images-*.tis" --count $((4 * heldout)) --batch 8 \
    --out "$work/reconstructions.png" --pictures "$work/reconstructions"
  "$bin/data-prep" judge --images "$work/reconstructions" --out "$work/judge-reconstructions.json"
  log "the judge on the samples:"
  "$bin/data-prep" judge --images "$work/samples" --out "$work/judge.json"
}
complete_judge() {
  [[ -f $work/judge.json && -f $work/judge-heldout.json && -f $work/judge-reconstructions.json ]]
}

for s in "${steps[@]}"; do
  step "$s"
done

total=$(awk -v a="$total_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
log "step times (s) of this invocation:"
for s in "${steps[@]}"; do
  printf '  %-12s %s\n' "$s" "${seconds[$s]}"
done
printf '  %-12s %s\n' total "$total"
if [[ ${seconds[judge]} == skipped ]]; then
  log "the judge's rates on the samples:"
  "$bin/data-prep" judge --images "$work/samples"
fi
log "pictures for the held-out captions: $work/samples (prompt_NNN.png: a caption's grid;"
log "  prompt_NNN_MM.png: each picture; index.json: captions and files); judge: $work/judge.json"
