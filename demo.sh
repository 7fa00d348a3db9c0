#!/usr/bin/env bash
# The whole study, end to end: train every objective with several seeds on a source dataset,
# linear-probe and fine-tune every network on target datasets, CKA between all networks, class
# separation, then figures and report.md. `make demo` runs it on the built-in digits data (CPU,
# a few minutes); the same script runs the paper's study with other variables:
#
#   bash demo.sh                                              # digits@0-4 -> digits@5-9
#   DATA=npz:../shared/data/cifar10@0-4 TARGETS="npz:../shared/data/cifar10@5-9" \
#       ARCH=resnet18 EPOCHS=15 OUT=results/cifar bash demo.sh
#   DATA=imagenet:/data/imagenet GPUS=8 SEEDS="0 1 2 3 4 5 6 7" OUT=results/imagenet \
#       TARGETS="food101:/data cifar10:/data cifar100:/data birdsnap:/data/birdsnap \
#                sun397:/data stanford_cars:/data oxford_pets:/data flowers102:/data" \
#       FT_ARGS="--steps 20000 --batch-size 256" bash demo.sh
#   CHECKPOINTS="runs/tf/*.pt" EVAL_ARGS="--eval-preprocessing tf" DATA=imagenet:/data/imagenet \
#       TARGETS="cifar10:/data flowers102:/data" OUT=results/paper_networks bash demo.sh
#
# Variables (defaults in brackets):
#   DATA [digits@0-4]        source dataset spec for training, CKA and class separation
#   TARGETS [digits@5-9]     transfer dataset specs for the linear probe (space separated)
#   FT_TARGETS [first of TARGETS]  transfer datasets for fine-tuning ("" to skip fine-tuning)
#   OBJECTIVES [all nine]    objectives to train
#   SEEDS [0 1]              seeds per objective
#   ARCH, EPOCHS, BATCH, LR  training overrides (empty: train_imagenet.py's data preset)
#   GPUS [0]                 >1: training and fine-tuning run under torchrun --nproc_per_node
#   JOBS [number of CPU cores, 1 with GPUS]  trainings / fine-tunings run at once, one thread each
#   OUT [results/demo]       report.md and figures here; runs (checkpoints, json) in $OUT/runs
#   TRAIN_ARGS PROBE_ARGS FT_ARGS CKA_ARGS SEP_ARGS   extra flags for each script
#   PYTHON [python3]         the interpreter (make demo passes the project's .venv)
#   CHECKPOINTS [empty]      checkpoint files (globs allowed) to analyse INSTEAD of training,
#                            e.g. the paper's networks from import_tf_checkpoint.py: step 1 then
#                            scores each on DATA's test split (train_imagenet.py --evaluate, the
#                            source top-1 of the report); OBJECTIVES, SEEDS and training flags
#                            are ignored
#   EVAL_ARGS                extra flags for --evaluate (e.g. --eval-preprocessing tf)
# Every step resumes or skips what is already done, so an interrupted demo continues on rerun.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
DATA=${DATA:-digits@0-4}
TARGETS=${TARGETS:-digits@5-9}
FT_TARGETS=${FT_TARGETS-${TARGETS%% *}}
OBJECTIVES=${OBJECTIVES:-softmax label_smoothing sigmoid extra_final_layer_l2 dropout logit_penalty logit_normalization cosine_softmax squared_error}
SEEDS=${SEEDS:-0 1}
GPUS=${GPUS:-0}
if [ "$GPUS" -gt 0 ]; then JOBS=${JOBS:-1}; else JOBS=${JOBS:-$(nproc 2>/dev/null || echo 1)}; fi
OUT=${OUT:-results/demo}
RUNS=$OUT/runs
if [ "$DATA" = "digits@0-4" ] && [ "$TARGETS" = "digits@5-9" ]; then
    # small defaults for the built-in demo: a short fine-tuning grid
    FT_ARGS=${FT_ARGS:---lrs 0.2 0.8 --wds 1e-4 --epochs 4 --batch-size 32}
    CKA_ARGS=${CKA_ARGS:---split test --batch-size 226}
fi

if [ "$GPUS" -gt 1 ]; then
    run() { torchrun --standalone --nproc_per_node="$GPUS" "$@"; }
else
    run() { "$PYTHON" "$@"; }
fi
train_flags=()
[ -n "${ARCH:-}" ] && train_flags+=(--arch "$ARCH")
[ -n "${EPOCHS:-}" ] && train_flags+=(--epochs "$EPOCHS")
[ -n "${BATCH:-}" ] && train_flags+=(--batch-size "$BATCH")
[ -n "${LR:-}" ] && train_flags+=(--lr "$LR")

stamp() { echo "== $(date +%H:%M:%S) $*"; }
start=$(date +%s)
mkdir -p "$RUNS/logs"

# Run "$@" in the background with its output in a log file, at most $JOBS at a time; `finish`
# waits for all and stops the demo if any failed. Each job gets 1 CPU thread when JOBS > 1.
failed=0
job() {
    local log=$1; shift
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || failed=1; done
    if [ "$JOBS" -gt 1 ]; then
        ( export OMP_NUM_THREADS=1; "$@" >"$log" 2>&1 || { echo "FAILED: see $log" >&2
          tail -n 3 "$log" >&2; exit 1; } ) &
    else
        "$@" >"$log" 2>&1 || { echo "FAILED: see $log" >&2; tail -n 3 "$log" >&2; exit 1; }
    fi
}
finish() {
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
    wait || failed=1
    [ "$failed" -eq 0 ] || { echo "demo stopped: $1 failed (logs in $RUNS/logs)" >&2; exit 1; }
}

# a checkpoint's short name, as common.checkpoint_label: runs/x/final.pt -> x, tf/a_s0.pt -> a_s0
label_of() {
    local base; base=$(basename "$1" .pt)
    case $base in final|last|best) basename "$(dirname "$1")" ;; *) echo "$base" ;; esac
}

checkpoints=()
if [ -n "${CHECKPOINTS:-}" ]; then
    # shellcheck disable=SC2206
    checkpoints=($CHECKPOINTS)   # word splitting and globbing wanted
    for ckpt in "${checkpoints[@]}"; do
        [ -f "$ckpt" ] || { echo "error: CHECKPOINTS: $ckpt is not a file" >&2; exit 2; }
    done
    stamp "1/6 evaluating ${#checkpoints[@]} given checkpoints on $DATA (no training)"
    for ckpt in "${checkpoints[@]}"; do
        label=$(label_of "$ckpt")
        dir=$RUNS/evaluate/$label
        [ -f "$dir/results.json" ] && continue
        job "$RUNS/logs/evaluate_${label}.log" run train_imagenet.py --evaluate "$ckpt" \
            --data "$DATA" --out "$dir" ${EVAL_ARGS:-}
    done
    finish evaluation
    grep -h "^evaluate:" "$RUNS"/logs/evaluate_*.log 2>/dev/null | sed 's/^/   /' || true
else
    stamp "1/6 training: ${OBJECTIVES// /, } x seeds ${SEEDS// /, } on $DATA ($JOBS at a time)"
    for objective in $OBJECTIVES; do
        for seed in $SEEDS; do
            dir=$RUNS/train/${objective}_s${seed}
            checkpoints+=("$dir/final.pt")
            [ -f "$dir/final.pt" ] && [ -f "$dir/results.json" ] && continue
            job "$RUNS/logs/train_${objective}_s${seed}.log" run train_imagenet.py \
                --data "$DATA" --objective "$objective" --seed "$seed" --out "$dir" \
                "${train_flags[@]}" ${TRAIN_ARGS:-}
        done
    done
    finish training
    grep -h "^done:" "$RUNS"/logs/train_*.log 2>/dev/null | sed 's/^/   /' || true
fi

stamp "2/6 linear probe on $TARGETS"
# shellcheck disable=SC2086
"$PYTHON" linear_probe.py --checkpoint "${checkpoints[@]}" --data $TARGETS --out "$RUNS/probe" \
    ${PROBE_ARGS:-}

if [ -n "$FT_TARGETS" ]; then
    stamp "3/6 fine-tuning on $FT_TARGETS ($JOBS at a time)"
    for target in $FT_TARGETS; do
        name=$("$PYTHON" -c "import common, sys; print(common.dataset_label(sys.argv[1]))" "$target")
        for ckpt in "${checkpoints[@]}"; do
            label=$(label_of "$ckpt")
            dir=$RUNS/finetune/$label/$name
            [ -f "$dir/results.json" ] && continue
            job "$RUNS/logs/finetune_${label}_${name}.log" run finetune.py --checkpoint "$ckpt" \
                --data "$target" --out "$dir" ${FT_ARGS:-}
        done
    done
    finish fine-tuning
    grep -h "^finetune: .* -> " "$RUNS"/logs/finetune_*.log 2>/dev/null | sed 's/^/   /' || true
else
    stamp "3/6 fine-tuning skipped (FT_TARGETS is empty)"
fi

stamp "4/6 CKA between all networks on $DATA"
# shellcheck disable=SC2086
"$PYTHON" cka_analysis.py --checkpoint "${checkpoints[@]}" --data "$DATA" --out "$RUNS/cka" \
    ${CKA_ARGS:-}

stamp "5/6 class separation on $DATA"
# shellcheck disable=SC2086
"$PYTHON" class_separation.py --checkpoint "${checkpoints[@]}" --data "$DATA" \
    --out "$RUNS/class_separation" ${SEP_ARGS:-}

stamp "6/6 figures and report"
"$PYTHON" make_figures.py --runs "$RUNS" --out "$OUT"
stamp "done in $(( $(date +%s) - start )) s: $OUT/report.md"
