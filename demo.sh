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
# A network that fails (e.g. a loss that turns nan/inf: exit 2, one line) does not stop the
# study: its folder gets a file FAILED (the error and the log), the console a line, the later
# steps go on without it and report.md names it. At the end every failure is listed and the
# demo exits 1; a rerun tries the failed ones again.
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

# A failure, in DIR/FAILED and on the console: the exit status, the error (the log's last
# "error: " line, else its last line) and the log. Arguments: status dir log.
record_failure() {
    local why
    why=$(grep -E "^error: " "$3" | tail -n 1 || true)
    [ -n "$why" ] || why=$(grep -v "^[[:space:]]*$" "$3" | tail -n 1 || true)
    mkdir -p "$2"
    echo "exit $1: ${why:-no output} (log: $3)" >"$2/FAILED"
    echo "FAILED: $2: exit $1: ${why:-no output} (log: $3)" >&2
}
# Run "$@" for the network folder DIR in the background with its output in a log file, at most
# $JOBS at a time; `finish` waits for all. Each job gets 1 CPU thread when JOBS > 1.
job() {
    local dir=$1 log=$2; shift 2
    rm -f "$dir/FAILED"   # tried again
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    if [ "$JOBS" -gt 1 ]; then
        ( export OMP_NUM_THREADS=1; "$@" >"$log" 2>&1 || record_failure $? "$dir" "$log" ) &
    else
        "$@" >"$log" 2>&1 || record_failure $? "$dir" "$log"
    fi
}
finish() {
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || true; done
    wait || true
}
# A step over all networks (probe, CKA, ...) in the foreground: a failure is a line and the
# demo goes on. Arguments: name command...
step_failures=()
step() {
    local name=$1; shift
    "$@" || { local status=$?; echo "FAILED: $name (exit $status, its error above)" >&2
              step_failures+=("$name (exit $status)"); }
}
# The networks whose results file exists: the others failed and later steps skip them.
# Arguments: checkpoint results.json checkpoint results.json ...
keep_done() {
    checkpoints=()
    while [ $# -gt 0 ]; do [ -f "$2" ] && checkpoints+=("$1"); shift 2; done
}

# Each checkpoint's short name, into label_of[CHECKPOINT]: common.checkpoint_label's rule (one
# rule; runs/x/final.pt -> x, tf/a_s0.pt -> a_s0), one interpreter start for all of them.
declare -A label_of=()
find_labels() {
    local names ckpt i=0
    mapfile -t names < <("$PYTHON" -c "import common, sys
print(*map(common.checkpoint_label, sys.argv[1:]), sep='\\n')" "$@")
    [ "${#names[@]}" -eq $# ] || { echo "error: could not name the checkpoints (see above)" >&2
                                   exit 2; }
    for ckpt in "$@"; do label_of[$ckpt]=${names[i]}; i=$((i + 1)); done
}

checkpoints=()
if [ -n "${CHECKPOINTS:-}" ]; then
    # shellcheck disable=SC2206
    checkpoints=($CHECKPOINTS)   # word splitting and globbing wanted
    for ckpt in "${checkpoints[@]}"; do
        [ -f "$ckpt" ] || { echo "error: CHECKPOINTS: $ckpt is not a file" >&2; exit 2; }
    done
    stamp "1/6 evaluating ${#checkpoints[@]} given checkpoints on $DATA (no training)"
    pairs=()
    find_labels "${checkpoints[@]}"
    for ckpt in "${checkpoints[@]}"; do
        label=${label_of[$ckpt]}
        dir=$RUNS/evaluate/$label
        pairs+=("$ckpt" "$dir/results.json")
        [ -f "$dir/results.json" ] && continue
        job "$dir" "$RUNS/logs/evaluate_${label}.log" run train_imagenet.py --evaluate "$ckpt" \
            --data "$DATA" --out "$dir" ${EVAL_ARGS:-}
    done
    finish
    keep_done "${pairs[@]}"
    grep -h "^evaluate:" "$RUNS"/logs/evaluate_*.log 2>/dev/null | sed 's/^/   /' || true
else
    stamp "1/6 training: ${OBJECTIVES// /, } x seeds ${SEEDS// /, } on $DATA ($JOBS at a time)"
    pairs=()
    for objective in $OBJECTIVES; do
        for seed in $SEEDS; do
            dir=$RUNS/train/${objective}_s${seed}
            pairs+=("$dir/final.pt" "$dir/results.json")
            [ -f "$dir/final.pt" ] && [ -f "$dir/results.json" ] && continue
            job "$dir" "$RUNS/logs/train_${objective}_s${seed}.log" run train_imagenet.py \
                --data "$DATA" --objective "$objective" --seed "$seed" --out "$dir" \
                "${train_flags[@]}" ${TRAIN_ARGS:-}
        done
    done
    finish
    keep_done "${pairs[@]}"
    grep -h "^done:" "$RUNS"/logs/train_*.log 2>/dev/null | sed 's/^/   /' || true
fi

if [ "${#checkpoints[@]}" -eq 0 ]; then
    stamp "2/6 to 5/6 skipped: no network finished"
else
    find_labels "${checkpoints[@]}"
    stamp "2/6 linear probe on $TARGETS"
    # shellcheck disable=SC2086
    step "linear probe" "$PYTHON" linear_probe.py --checkpoint "${checkpoints[@]}" \
        --data $TARGETS --out "$RUNS/probe" ${PROBE_ARGS:-}

    if [ -n "$FT_TARGETS" ]; then
        stamp "3/6 fine-tuning on $FT_TARGETS ($JOBS at a time)"
        for target in $FT_TARGETS; do
            name=$("$PYTHON" -c "import common, sys; print(common.dataset_label(sys.argv[1]))" \
                   "$target")
            for ckpt in "${checkpoints[@]}"; do
                label=${label_of[$ckpt]}
                dir=$RUNS/finetune/$label/$name
                [ -f "$dir/results.json" ] && continue
                job "$dir" "$RUNS/logs/finetune_${label}_${name}.log" run finetune.py \
                    --checkpoint "$ckpt" --data "$target" --out "$dir" ${FT_ARGS:-}
            done
        done
        finish
        grep -h "^finetune: .* -> " "$RUNS"/logs/finetune_*.log 2>/dev/null | sed 's/^/   /' || true
    else
        stamp "3/6 fine-tuning skipped (FT_TARGETS is empty)"
    fi

    stamp "4/6 CKA between all networks on $DATA"
    # shellcheck disable=SC2086
    step "CKA" "$PYTHON" cka_analysis.py --checkpoint "${checkpoints[@]}" --data "$DATA" \
        --out "$RUNS/cka" ${CKA_ARGS:-}

    stamp "5/6 class separation on $DATA"
    # shellcheck disable=SC2086
    step "class separation" "$PYTHON" class_separation.py --checkpoint "${checkpoints[@]}" \
        --data "$DATA" --out "$RUNS/class_separation" ${SEP_ARGS:-}
fi

stamp "6/6 figures and report"
step "figures and report" "$PYTHON" make_figures.py --runs "$RUNS" --out "$OUT"

# Every failure, this run's and any left from an earlier one (a FAILED beside a results.json is
# stale: that network finished since); make_figures.py's report names the same networks.
failures=()
while IFS= read -r f; do
    dir=$(dirname "$f")
    [ -f "$dir/results.json" ] || failures+=("${dir#"$RUNS"/}: $(head -n 1 "$f")")
done < <(find "$RUNS" -name FAILED -type f | sort)
failures+=("${step_failures[@]/#/step: }")
if [ "${#failures[@]}" -gt 0 ]; then
    for f in "${failures[@]}"; do echo "   $f" >&2; done
    stamp "done in $(( $(date +%s) - start )) s with ${#failures[@]} failure(s), listed above" \
          "(the notes of $OUT/report.md name the failed networks)" >&2
    exit 1
fi
stamp "done in $(( $(date +%s) - start )) s: $OUT/report.md"
