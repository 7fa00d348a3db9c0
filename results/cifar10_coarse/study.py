"""Train the networks of the CIFAR-10 coarse study (README.md beside this file), resumably.

  python results/cifar10_coarse/study.py train            # learning-rate grid, then every network
  python results/cifar10_coarse/study.py train --dry-run  # print the commands, run nothing
  python results/cifar10_coarse/study.py train --more     # and the second group (rule 5)
  python results/cifar10_coarse/study.py lrs              # the learning-rate selection table
  python results/cifar10_coarse/study.py analyze          # transfer, R^2, CKA of finished networks
  python results/cifar10_coarse/study.py report           # figures and report.md (make_figures)
  python results/cifar10_coarse/study.py control          # the learning-rate control -> control/

1. Learning rates (seed 0, 10 epochs, lr in {0.05, 0.1, 0.2} per 256, one factor 2 further past a
   winning edge) for each objective at its default hyperparameter, chosen by source validation
   top-1 of the EMA weights; the sweeps' values reuse their objective's rate. Grid runs go to
   lr_grid/ (outside runs/, so no analysis ever sees them). With --more, the second group's
   objectives (MORE_OBJECTIVES) get their own grids, starting nearer their likely choice (GRIDS).
2. Every network of the study (NETWORKS) at 30 epochs with its chosen rate: runs/train/NAME_sSEED.
Each run is train_imagenet.py; an interrupted study continues where it stopped (rerun the same
command), finished runs are skipped. A failed run is recorded in its folder's FAILED file (exit
status, error, log; the report names it) and the others go on; at the end every failure is
listed with its log and the study exits 2. JOBS runs at a time (default 2: one per core, one thread
and one loader worker each).
3. analyze, for every finished network (run it any time; what is done is skipped):
   linear probes of the pool features on the three targets (TARGETS; the clothing photos by
   5-fold cross-validation) and of block6 on the coarse-to-fine target -> runs/probe/; class
   separation on 1,000 source training images per coarse class -> runs/separation/NAME_sSEED/;
   fine-tuning of seed 0 of each objective at its default on the coarse-to-fine target ->
   runs/finetune/; CKA between the networks of CKA_SET on 1,000 source validation images ->
   runs/cka/ (once; it needs all their weights at once, so CKA_SET trains first).
4. report: make_figures.py over runs/ -> report.md and the figures beside this file.
5. control (README.md, "A learning-rate control"): softmax at lr 0.1 per 256 (CONTROLS), trained,
   probed on the three pool targets and class-separated into control/ (outside runs/, so no
   verdict of report.md sees it), then control/control.md: the table and the control's rule.
"""
import concurrent.futures
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while torch loads (1-2 s): one line and status 130, as later (common.run_main)
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted (Ctrl-C) while starting",
                                                   file=sys.stderr), os._exit(130)))

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def repo_module(name):
    """The repository's module NAME (common, linear_probe, make_figures), loaded from its file
    under ROOT once (then from sys.modules, where its own `import common` finds common too).
    Run as a script, this file has its own folder on the import path, not the repository root:
    naming the file here keeps that path as Python set it, for one_rate.py's `import study`."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(sys.modules[name])
        except BaseException:   # as `import` does: no half-loaded module left behind
            del sys.modules[name]
            raise
    return sys.modules[name]


common = repo_module("common")   # the scripts' argument parser and one-line errors
linear_probe = repo_module("linear_probe")   # after common, which it imports
SHARED = os.environ.get("SHARED", "../shared/data")  # relative to the repository root
SOURCE = f"npz:{SHARED}/cifar10@0+8,1+9,3+5,4+7,2+6,per_class=2000"
TRAIN = ["--data", SOURCE, "--arch", "resnet18", "--no-small-input", "--batch-size", "128",
         "--warmup-epochs", "1", "--ema-epochs", "0.5", "--log-every", "50"]
EPOCHS, GRID_EPOCHS = 30, 10
GRID = (0.05, 0.1, 0.2)
# squared_error at SPEC's kappa = 9, M = 60 with s = 0.005 instead of 10: s only scales the
# gradient, and s * lr at lr 0.1 per 256 then equals the known-good 10 * 5e-5 of the earlier
# studies (results/cifar10_small), while weight decay acts at the same lr as for the others.
OBJECTIVES = {  # objective -> flags at its default (the learning-rate grid runs these)
    "softmax": ["--objective", "softmax"],
    "label_smoothing": ["--objective", "label_smoothing", "--alpha", "0.1"],
    "cosine_softmax": ["--objective", "cosine_softmax", "--tau", "0.05"],
    "squared_error": ["--objective", "squared_error", "--loss-scale", "0.005"],
}


def probe_target(spec, layer="pool", folds=None):
    """A transfer target: (dataset spec, its linear_probe.py flags, the folder that
    linear_probe.py writes a network's probe into under probe/NAME/: the last part of
    linear_probe.pair_dir, e.g. cifar10@from_test+block6)."""
    flags = ([] if layer == "pool" else ["--layer", layer]) + \
        ([] if folds is None else ["--folds", str(folds)])
    folder = linear_probe.pair_dir("", "", common.dataset_label(spec), layer, folds)
    return spec, flags, os.path.basename(folder)


# Transfer targets (README.md): name -> (dataset spec, extra linear_probe flags, output folder name)
TARGETS = {
    "coarse_to_fine": probe_target(f"npz:{SHARED}/cifar10@from=test"),
    "clothing": probe_target(f"npz:{SHARED}/clothing_small", folds=5),
    "fashion_mnist": probe_target(f"npz:{SHARED}/fashion_mnist@per_class=1000"),
    "coarse_to_fine_block6": probe_target(f"npz:{SHARED}/cifar10@from=test", layer="block6"),
}
# Fine-tuning: lr per 256 from FT_LRS (extended by a factor 3 past a winning edge, as for
# training) x weight decay 8e-5, chosen on the target's val split, 6 epochs.
FT_LRS = (0.03, 0.1, 0.3)
FINETUNE = ["--wds", "8e-5", "--epochs", "6", "--batch-size", "128", "--warmup-epochs", "0.5",
            "--workers", "1"]
FINETUNED = ("softmax_s0", "label_smoothing_a0.1_s0", "cosine_softmax_t0.05_s0", "squared_error_s0")
# Checkpoints are not committed, and a session's machine keeps nothing uncommitted, so a network
# is analyzed in the session that trains it. These train first, so that one session holds all
# their weights at once: the fine-tuned networks plus a second softmax seed are the CKA set.
CKA_SET = FINETUNED + ("softmax_s1",)
NETWORKS = {  # name -> (objective whose learning rate it uses, flags, seeds)
    "softmax": ("softmax", OBJECTIVES["softmax"], (0, 1, 2, 3)),
    "label_smoothing_a0.1": ("label_smoothing", OBJECTIVES["label_smoothing"], (0, 1)),
    "label_smoothing_a0.2": ("label_smoothing", ["--objective", "label_smoothing",
                                                 "--alpha", "0.2"], (0, 1)),
    "label_smoothing_a0.4": ("label_smoothing", ["--objective", "label_smoothing",
                                                 "--alpha", "0.4"], (0, 1)),
    "cosine_softmax_t0.02": ("cosine_softmax", ["--objective", "cosine_softmax",
                                                "--tau", "0.02"], (0, 1)),
    "cosine_softmax_t0.05": ("cosine_softmax", OBJECTIVES["cosine_softmax"], (0, 1)),
    "cosine_softmax_t0.2": ("cosine_softmax", ["--objective", "cosine_softmax",
                                               "--tau", "0.2"], (0, 1)),
    "cosine_softmax_t0.5": ("cosine_softmax", ["--objective", "cosine_softmax",
                                               "--tau", "0.5"], (0, 1)),
    "squared_error": ("squared_error", OBJECTIVES["squared_error"], (0, 1, 2)),
}
# The second group (rule 5 of the README: trained with `train --more` only when the first group
# does not already refute a meaningful effect on every target): the other five objectives at
# SPEC's defaults, 2 seeds each, each with its own learning-rate grid. The grids start where
# their closest first-group objective's choice lies (softmax chose 1.6, cosine softmax 0.1), to
# spend fewer 10-epoch runs walking up from 0.05; an edge that wins still extends them.
MORE_OBJECTIVES = {
    "sigmoid": ["--objective", "sigmoid"],
    "logit_penalty": ["--objective", "logit_penalty"],
    "logit_normalization": ["--objective", "logit_normalization"],
    "extra_final_layer_l2": ["--objective", "extra_final_layer_l2"],
    "dropout": ["--objective", "dropout"],
}
GRIDS = {**{o: GRID for o in OBJECTIVES}, **{o: (0.8, 1.6, 3.2) for o in MORE_OBJECTIVES},
         "logit_normalization": (0.05, 0.1, 0.2)}
MORE_NETWORKS = {o: (o, flags, (0, 1)) for o, flags in MORE_OBJECTIVES.items()}
# The learning-rate control (README.md), added after the main results: softmax at the rate cosine
# softmax and squared error trained at (and SPEC's ImageNet rate). name -> (flags, lr, seeds)
CONTROLS = {"softmax_lr0.1": (OBJECTIVES["softmax"], 0.1, (0, 1))}
# What control.md compares it with: the study's networks at their default hyperparameters.
COMPARED = ("softmax", "label_smoothing_a0.1", "cosine_softmax_t0.05", "squared_error")


def grid_dir(objective, lr):
    return os.path.join(HERE, "lr_grid", f"{objective}_lr{lr:g}")


def val_top1(out):
    """A finished run's source validation top-1 (EMA weights), or None. results.json is written
    when a run finishes and is committed (final.pt is not): a fresh clone keeps the grid."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["val_top1"]


def next_lr(objective):
    """('train', [lrs to run]) while the grid is incomplete or an edge wins, else ('chosen', lr).
    Ties go to the smaller rate."""
    tried = tried_lrs(objective)
    missing = [lr for lr, v in tried.items() if v is None]
    if missing:
        return "train", missing
    best = max(sorted(tried), key=lambda lr: tried[lr])
    if best == max(tried):
        return "train", [best * 2]
    if best == min(tried):
        return "train", [best / 2]
    return "chosen", best


def command(flags, lr, seed, epochs, out):
    """A train_imagenet.py command line, run from the repository root (paths relative to it)."""
    return [sys.executable, "train_imagenet.py", *TRAIN, *flags, "--lr", f"{lr:g}",
            "--seed", str(seed), "--epochs", str(epochs), "--out", os.path.relpath(out, ROOT)]


def run_logged(cmd, out):
    """Run a train_imagenet.py command with its output appended to OUT/train.log: (exit status,
    None) or, for a failure, (status, its one-line record), the record also in OUT/FAILED (demo.sh's format: the exit status,
    the log's last `error:` line, else its last line, and the log), which make_figures' report
    names. A rerun removes the old FAILED first."""
    os.makedirs(out, exist_ok=True)
    log, failed = os.path.join(out, "train.log"), os.path.join(out, "FAILED")
    if os.path.exists(failed):
        os.remove(failed)
    with open(log, "a") as f:
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if status == 0:
        return 0, None
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    why = next((line for line in reversed(lines) if line.startswith("error: ")),
               lines[-1] if lines else "no output")
    record = f"exit {status}: {why} (log: {rel(log)})"
    with open(failed, "w") as f:
        f.write(record + "\n")
    return status, record


def run_parallel(todo, one, jobs):
    """one(item) -> (outcome, failure record or None) for every item, `jobs` at a time, each
    outcome printed as it ends. A failure does not stop the others: at the end every failure is
    listed with its log, and the study stops with status 2 (a rerun tries the failed ones
    again and skips the finished)."""
    failures = []
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for outcome, failure in pool.map(one, todo):
            print(outcome, flush=True)
            if failure:
                failures.append(failure)
    if failures:
        print(f"{len(failures)} of {len(todo)} runs failed:", *failures, sep="\n  ", flush=True)
        raise common.UserError(f"{len(failures)} of {len(todo)} runs failed (listed above, with "
                               f"their logs); the others finished. Fix the cause and rerun")


def run_all(commands, jobs, dry_run):
    """Run train_imagenet.py commands, `jobs` at a time, each with one CPU thread; log files
    beside each run. A failed run is recorded (run_logged) and the others go on (run_parallel)."""
    todo = [(c, os.path.join(ROOT, c[c.index("--out") + 1])) for c in commands]
    todo = [(c, out) for c, out in todo if val_top1(out) is None]
    for c, _ in todo:
        print(" ".join(c), flush=True)
    if dry_run or not todo:
        return

    def one(item):
        _, failure = run_logged(*item)
        return f"{'FAILED' if failure else 'done'}: {rel(item[1])}", failure and \
            f"{rel(item[1])}: {failure}"
    run_parallel(todo, one, jobs)


def train(jobs, dry_run, more=False):
    objectives = {**OBJECTIVES, **(MORE_OBJECTIVES if more else {})}
    networks = {**NETWORKS, **(MORE_NETWORKS if more else {})}
    while True:  # 1. the learning-rate grid, extended past winning edges
        state = {o: next_lr(o) for o in objectives}
        pending = [command(objectives[o], lr, 0, GRID_EPOCHS, grid_dir(o, lr))
                   for o, (what, lrs) in state.items() if what == "train" for lr in lrs]
        if not pending or dry_run:
            run_all(pending, jobs, dry_run)
            break
        run_all(pending, jobs, dry_run)
    chosen = {o: s[1] for o, s in state.items() if s[0] == "chosen"}
    print_lrs()
    runs = [command(flags, chosen[o], seed, EPOCHS,
                    os.path.join(HERE, "runs", "train", f"{name}_s{seed}"))
            for name, (o, flags, seeds) in networks.items() if o in chosen for seed in seeds]
    runs.sort(key=lambda c: os.path.basename(c[-1]) not in CKA_SET)   # stable: CKA_SET first
    run_all(runs, jobs, dry_run)  # 2. every network at its chosen rate


def finished_networks(names=None, folder="runs"):
    """{NAME_sSEED: its final.pt} of the networks in FOLDER/train whose training finished
    (default: the study's networks)."""
    if names is None:
        names = [f"{name}_s{seed}" for name, (_, _, seeds) in
                 {**NETWORKS, **MORE_NETWORKS}.items() for seed in seeds]
    runs = {n: os.path.join(HERE, folder, "train", n) for n in names}
    done = {n: os.path.join(out, "final.pt") for n, out in runs.items()
            if val_top1(out) is not None}
    gone = sorted(n for n, ckpt in done.items() if not os.path.exists(ckpt))
    if gone:   # trained elsewhere: their committed results stand; new analyses need the weights
        print(f"note: no final.pt for {', '.join(gone)} (trained on another machine); analyses "
              f"they lack need it: delete {folder}/train/NAME/results.json and rerun the "
              f"stage that trains it", flush=True)
    return {n: ckpt for n, ckpt in done.items() if n not in gone}


def run_step(what, cmd, dry_run):
    """Run one analysis command from the repository root; stop the study on failure."""
    print(f"{what}: {' '.join(cmd)}", flush=True)
    if not dry_run and subprocess.run(cmd, cwd=ROOT).returncode:
        raise common.UserError(f"{what} failed (command above); fix it and rerun "
                               f"`study.py analyze`")


def rel(path):
    return os.path.relpath(path, ROOT)


def probe_and_separate(nets, runs, targets, dry_run):
    """Linear probes of `nets` ({NAME_sSEED: final.pt}) on `targets` (names of TARGETS) into
    RUNS/probe/, class separation into RUNS/separation/NAME_sSEED/; what exists is skipped."""
    py, cache = sys.executable, os.path.join(runs, "cache")
    for target in targets:
        spec, flags, folder = TARGETS[target]
        todo = [c for n, c in sorted(nets.items())
                if not os.path.exists(os.path.join(runs, "probe", n, folder, "results.json"))]
        if todo:
            run_step(f"probe {target}", [py, "linear_probe.py", "--checkpoint", *map(rel, todo),
                                         "--data", spec, *flags, "--out", rel(os.path.join(
                                             runs, "probe")), "--cache", rel(cache),
                                         "--workers", "0"], dry_run)
    if not dry_run:
        shutil.rmtree(cache, ignore_errors=True)   # features are cheap to redo, 90 MB a network
    for n, ckpt in sorted(nets.items()):
        out = os.path.join(runs, "separation", n)
        if not os.path.exists(os.path.join(out, "class_separation.json")):
            run_step(f"class separation {n}", [py, "class_separation.py", "--checkpoint",
                                               rel(ckpt), "--data", SOURCE, "--split", "train",
                                               "--max-per-class", "1000", "--out", rel(out)],
                     dry_run)


def analyze(dry_run):
    nets = finished_networks()
    print(f"{len(nets)} finished networks: {', '.join(sorted(nets)) or 'none'}", flush=True)
    runs, py = os.path.join(HERE, "runs"), sys.executable
    probe_and_separate(nets, runs, TARGETS, dry_run)
    for n in FINETUNED:
        if n in nets:
            finetune(nets[n], os.path.join(runs, "finetune", n, TARGETS["coarse_to_fine"][2]),
                     dry_run)
    cka = os.path.join(runs, "cka", "cka.json")
    if os.path.exists(cka):
        return
    if all(n in nets for n in CKA_SET):
        run_step("CKA", [py, "cka_analysis.py", "--checkpoint", *(rel(nets[n]) for n in CKA_SET),
                         "--data", SOURCE, "--split", "val", "--max-images", "1000",
                         "--out", rel(os.path.dirname(cka))], dry_run)
    else:
        print(f"CKA waits for the weights of {', '.join(n for n in CKA_SET if n not in nets)} "
              f"(CKA_SET: all must be on this machine at once)", flush=True)


def finetune(ckpt, out, dry_run):
    """finetune.py on the coarse-to-fine target, its lr grid extended past a winning edge: the
    finished grid points are read back, only the final run (on train+val) is redone."""
    for _ in range(4):
        grid = os.path.join(out, "grid")
        lrs = set(FT_LRS) | {float(d[2:].split("_wd")[0]) for d in
                             (os.listdir(grid) if os.path.isdir(grid) else [])}
        path = os.path.join(out, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            best = done["best_lr"]
            scored = {float(k.split(",")[0][3:]) for k in done["grid"]}
            if lrs <= scored:    # every rate was tried: done unless an edge won
                if min(lrs) < best < max(lrs):
                    return
                lrs.add(best * 3 if best == max(lrs) else best / 3)
            if not dry_run:      # the final run and results are redone at the new best
                os.remove(path)
                shutil.rmtree(os.path.join(out, "final"), ignore_errors=True)
        run_step(f"fine-tune {rel(ckpt)}", [sys.executable, "finetune.py", "--checkpoint",
                                            rel(ckpt), "--data", TARGETS["coarse_to_fine"][0],
                                            "--lrs", *(f"{lr:g}" for lr in sorted(lrs)),
                                            *FINETUNE, "--out", rel(out)], dry_run)
        if dry_run:
            return


def report(dry_run):
    run_step("report", [sys.executable, "make_figures.py", "--runs", rel(os.path.join(HERE, "runs")),
                        "--out", rel(HERE), "--formats", "png"], dry_run)


POOL_TARGETS = ("coarse_to_fine", "clothing", "fashion_mnist")


def control(jobs, dry_run):
    """Train, probe and class-separate CONTROLS into control/, then write control/control.md."""
    folder = os.path.join(HERE, "control")
    names = [f"{name}_s{seed}" for name, (_, _, seeds) in CONTROLS.items() for seed in seeds]
    run_all([command(flags, lr, seed, EPOCHS, os.path.join(folder, "train", f"{name}_s{seed}"))
             for name, (flags, lr, seeds) in CONTROLS.items() for seed in seeds], jobs, dry_run)
    probe_and_separate(finished_networks(names, "control"), folder, POOL_TARGETS, dry_run)
    if not dry_run:
        with open(os.path.join(folder, "control.md"), "w") as f:
            f.write(control_report())
        print(f"wrote {rel(os.path.join(folder, 'control.md'))}", flush=True)


def network_numbers(folder, name):
    """One network's numbers in % (R^2, sparsity as fractions), or None until all exist."""
    base = os.path.join(HERE, folder)
    paths = {"train": os.path.join(base, "train", name, "results.json"),
             "args": os.path.join(base, "train", name, "args.json"),
             "sep": os.path.join(base, "separation", name, "class_separation.json"),
             **{t: os.path.join(base, "probe", name, TARGETS[t][2], "results.json")
                for t in POOL_TARGETS}}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    j = {k: json.load(open(p)) for k, p in paths.items()}
    pool = j["sep"]["results"][0]["layers"]["pool"]
    out = {"lr": j["args"]["lr"], "top1": 100 * j["train"]["top1"], "r2": pool["r2"],
           "sparsity": pool["sparsity"], "dim": pool["dim"],
           **{t: 100 * j[t]["test_accuracy"] for t in POOL_TARGETS}}
    out["mean"] = sum(out[t] for t in POOL_TARGETS) / len(POOL_TARGETS)
    return out


def control_report():
    """control.md: the control's networks beside the study's defaults, and the control's rule
    (README.md, fixed before its numbers existed)."""
    statistics = repo_module("make_figures")
    mean_se, welch_p = statistics.mean_se, statistics.welch_p
    groups = {}   # row label -> [numbers of each seed]
    for name in COMPARED:
        seeds = NETWORKS[name][2]
        groups[f"{name} (study)"] = [n for s in seeds if (n := network_numbers(
            "runs", f"{name}_s{s}"))]
    for name, (_, _, seeds) in CONTROLS.items():
        groups[f"{name} (control)"] = [n for s in seeds if (n := network_numbers(
            "control", f"{name}_s{s}"))]
    cols = [("lr", "lr per 256", None), ("top1", "source test top-1", 2), ("r2", "R^2 (pool)", 3),
            ("sparsity", "sparsity", 3), ("dim", "dimensionality", 1),
            *((t, f"probe {TARGETS[t][2]}", 2) for t in POOL_TARGETS), ("mean", "probe mean", 2)]

    def cell(vals, digits):
        m, se, n = mean_se(vals)
        if digits is None:   # the same for every seed: the learning rate
            return "-" if n == 0 else f"{m:g}"
        return "-" if n == 0 else f"{m:.{digits}f}" + (f" ± {se:.{digits}f}" if n > 1 else "")
    lines = ["# Learning-rate control (README.md, \"A learning-rate control\")", "",
             "Mean ± standard error over seeds; accuracies in %. Written by "
             "`python results/cifar10_coarse/study.py control`.", "",
             "| network | seeds | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for label, nums in groups.items():
        lines.append(f"| {label} | {len(nums)} | " + " | ".join(
            cell([n[k] for n in nums], d) for k, _, d in cols) + " |")
    ctrl = [n["mean"] for n in groups["softmax_lr0.1 (control)"]]
    soft = [n["mean"] for n in groups["softmax (study)"]]
    se = [n["mean"] for n in groups["squared_error (study)"]]
    if len(ctrl) < 2 or len(soft) < 2 or len(se) < 2:
        return "\n".join(lines + ["", "Rule: waits for at least 2 seeds of each side."]) + "\n"
    d_soft, p_soft = mean_se(ctrl)[0] - mean_se(soft)[0], welch_p(ctrl, soft)
    d_se, p_se = mean_se(ctrl)[0] - mean_se(se)[0], welch_p(ctrl, se)
    above = d_soft >= 1 and p_soft < 0.05
    below = d_se <= -1 and p_se < 0.05
    verdict = ("the deficit is the loss's" if not above else
               "both" if below else "the deficit is the learning rate's")
    lines += ["", f"Rule (probe mean): softmax at 0.1 minus softmax at 1.6: {d_soft:+.2f} points, "
              f"Welch p = {p_soft:.2g}; minus squared error (lr 0.1): {d_se:+.2f} points, "
              f"p = {p_se:.2g}. Verdict: **{verdict}**.", "",
              "The paper's mechanism, read beside it (R^2 lower -> transfer higher):", ""]
    c = {k: mean_se([n[k] for n in groups["softmax_lr0.1 (control)"]])[0] for k in ("r2", "mean")}
    for label, nums in groups.items():
        if "(study)" in label and nums:
            o = {k: mean_se([n[k] for n in nums])[0] for k in ("r2", "mean")}
            agrees = (c["r2"] < o["r2"]) == (c["mean"] > o["mean"])
            lines.append(f"- against {label}: R^2 {c['r2'] - o['r2']:+.3f}, probe mean "
                         f"{c['mean'] - o['mean']:+.2f} points: "
                         f"{'as the mechanism predicts' if agrees else 'against it'}")
    return "\n".join(lines) + "\n"


def tried_lrs(objective):
    """{lr: source val top-1 or None} of every grid run of `objective` started so far."""
    tried = {lr: val_top1(grid_dir(objective, lr)) for lr in GRIDS[objective]}
    folder = os.path.join(HERE, "lr_grid")
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith(f"{objective}_lr"):
            lr = float(name[len(objective) + 3:])
            tried[lr] = val_top1(grid_dir(objective, lr))
    return dict(sorted(tried.items()))


def print_lrs():
    """The selection table: source val top-1 (EMA, 10 epochs, seed 0) per learning rate."""
    print("| objective | source val top-1 by lr per 256 (10 epochs, seed 0) | chosen |")
    print("|---|---|---|")
    started = [o for o in MORE_OBJECTIVES if any(os.path.isdir(grid_dir(o, lr)) for lr in
                                                 tried_lrs(o))]
    for o in [*OBJECTIVES, *started]:
        cells = ", ".join(f"{lr:g}: {'running' if v is None else f'{100 * v:.1f}'}"
                          for lr, v in tried_lrs(o).items())
        what, lr = next_lr(o)
        print(f"| {o} | {cells} | {f'{lr:g}' if what == 'chosen' else '(grid running)'} |")


def main():
    p = common.argument_parser(__doc__)    # a bad argument: one line, exit status 2
    p.add_argument("stage", choices=("train", "lrs", "analyze", "report", "control"))
    p.add_argument("--jobs", type=common.positive_int, default=os.environ.get("JOBS", "2"),
                   help="training runs at a time (default: JOBS, else 2)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--more", action="store_true",
                   help="train: the second group too (rule 5 of README.md decides)")
    a = p.parse_args()
    if not os.path.isdir(os.path.join(ROOT, SHARED)):
        raise common.UserError(f"data folder not found: {SHARED}; set SHARED=DIR (the .npz data "
                               f"sets)")
    if a.stage == "lrs":
        print_lrs()
    elif a.stage == "analyze":
        analyze(a.dry_run)
    elif a.stage == "report":
        report(a.dry_run)
    elif a.stage == "control":
        control(a.jobs, a.dry_run)
    else:
        train(a.jobs, a.dry_run, a.more)


if __name__ == "__main__":
    common.run_main(main)
