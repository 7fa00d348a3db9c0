"""The paper's protocol at small scale (README.md beside this file, "The paper's protocol"): all
nine objectives at one learning rate, and the learning rate as a measured factor. Resumable:
rerun the same command to continue; what is finished is skipped.

  python results/cifar10_coarse/one_rate.py train --dry-run  # every command in order; runs nothing
  python results/cifar10_coarse/one_rate.py train            # the networks, JOBS (2) at a time
  python results/cifar10_coarse/one_rate.py analyze          # probes, separation, fine-tune, CKA
  python results/cifar10_coarse/one_rate.py report           # one_rate/report.md

Arms (README.md): A, the nine objectives at lr 0.1 per 256 and weight decay 8e-5, seeds 0-2;
B, lr 0.4 and 1.6 for softmax, label smoothing 0.1, cosine softmax 0.05, squared error, seeds
0-1 (0.1 is arm A); C, softmax at 0.1 with 16x the weight decay, seeds 0-1. Each network is
train_imagenet.py with the first protocol's recipe (study.TRAIN, 30 epochs) into
one_rate/FOLDER/train/NAME_sSEED, FOLDER = lr0.1, lr0.4, lr1.6 or lr0.1_wd0.00128. Committed
networks of the first protocol with exactly this recipe, seed and rate are reused (REUSED: their
JSON files are copied, not retrained), except where their weights are needed (CKA set).
Last (README, "Order" 5) the reused networks and the first protocol's other twelve are trained
again into one_rate/reruns/ for the weights their dead units need; a rerun counts only where it
reproduces its committed training record to the last digit (rerun_matches).

A run that stops on a non-finite loss, or ends at a source val top-1 of at most DIVERGED_TOP1,
is diverged: a result, recorded in its folder as diverged.json, never dropped. Any other failure
is recorded in its folder's FAILED file (the exit status, the error, the log) and the others go
on; at the end every failure is listed with its log and the study exits 2, and the report names
every network that is missing and why. A rerun tries the failed ones again.

ONE_RATE_DIR (default: one_rate/ beside this file) moves every output, e.g. to a clone that
holds the checkpoints while the study runs.
"""
import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import study  # the first protocol's driver, beside this file: recipe, targets, probes
from study import common  # noqa: E402  (study loads it from the repository root)

HERE, ROOT = study.HERE, study.ROOT
OUT = os.path.abspath(os.environ.get("ONE_RATE_DIR", os.path.join(HERE, "one_rate")))
WD = 8e-5                       # SPEC's weight decay (train_imagenet.py's default)
DIVERGED_TOP1 = 0.25            # 5 classes: chance is 0.2
# objective -> (network name, flags at SPEC's hyperparameters; squared error at the first
# protocol's loss scale 0.005, the value it used at lr 0.1)
SPEC_NETS = {
    "softmax": ("softmax", study.OBJECTIVES["softmax"]),
    "label_smoothing": ("label_smoothing_a0.1", study.OBJECTIVES["label_smoothing"]),
    "cosine_softmax": ("cosine_softmax_t0.05", study.OBJECTIVES["cosine_softmax"]),
    "squared_error": ("squared_error", study.OBJECTIVES["squared_error"]),
    **{o: (o, flags) for o, flags in study.MORE_OBJECTIVES.items()},
}
ARM_B = ("softmax", "label_smoothing", "cosine_softmax", "squared_error")
# Committed networks of the first protocol trained with exactly this recipe, seed and rate:
# (folder, NAME_sSEED) -> its folder under results/cifar10_coarse (train/, probe/, separation/)
REUSED = {
    **{("lr0.1", f"squared_error_s{s}"): ("runs", f"squared_error_s{s}") for s in (0, 1, 2)},
    **{("lr0.1", f"cosine_softmax_t0.05_s{s}"): ("runs", f"cosine_softmax_t0.05_s{s}")
       for s in (0, 1)},
    **{("lr0.1", f"softmax_s{s}"): ("control", f"softmax_lr0.1_s{s}") for s in (0, 1)},
    **{("lr1.6", f"softmax_s{s}"): ("runs", f"softmax_s{s}") for s in (0, 1, 2, 3)},
}


@dataclasses.dataclass(frozen=True)
class Net:
    objective: str
    lr: float
    seed: int
    wd: float = WD
    rerun: bool = False     # a reused network trained again for its weights (README, "Order" 5)
    variant: str = ""       # a first-protocol network at other hyperparameters (study.NETWORKS)

    @property
    def folder(self):       # one make_figures.py runs folder per rate (and weight decay)
        return f"lr{self.lr:g}" + ("" if self.wd == WD else f"_wd{self.wd:g}")

    @property
    def base(self):         # where its train/, probe/, separation/ live
        return os.path.join(OUT, "reruns" if self.rerun else "", self.folder)

    @property
    def name(self):
        return f"{self.variant or SPEC_NETS[self.objective][0]}_s{self.seed}"

    @property
    def out(self):
        return os.path.join(self.base, "train", self.name)

    def command(self):
        flags = study.NETWORKS[self.variant][1] if self.variant else SPEC_NETS[self.objective][1]
        flags = flags + ([] if self.wd == WD else ["--weight-decay", f"{self.wd:g}"])
        return study.command(flags, self.lr, self.seed, study.EPOCHS, self.out)


# CKA needs the weights of all of these at once, so they train first: arm A's seed 0 of every
# objective and softmax seed 1 (the different-seed baseline). Fine-tuning uses arm A's seed 0.
CKA_SET = [Net(o, 0.1, 0) for o in SPEC_NETS] + [Net("softmax", 0.1, 1)]


def networks():
    """Every network of the protocol, in training order (README.md, "Order")."""
    order = [*CKA_SET,
             *(Net(o, 0.1, s) for s in (1, 2) for o in SPEC_NETS),          # arm A
             *(Net(o, lr, s) for lr in (0.4, 1.6) for s in (0, 1) for o in ARM_B),  # arm B
             *(Net("softmax", 1.6, s) for s in (2, 3)),    # committed already: reused, free
             *(Net("softmax", 0.1, s, wd=16 * WD) for s in (0, 1))]          # arm C
    order = list(dict.fromkeys(order))
    # 5: the reused networks again, for the weights their dead units need (class separation
    # only), then the first protocol's other networks; each must reproduce its committed
    # training record (rerun_matches)
    return order + [dataclasses.replace(n, rerun=True) for n in order if reused_source(n)] + \
        first_protocol_reruns(order)


def first_protocol_reruns(order):
    """The first protocol's networks (study.NETWORKS, at the rates its grid chose) that are no
    network of ORDER, as reruns: label smoothing 0.1, 0.2, 0.4 at 0.8 and cosine softmax 0.02,
    0.2, 0.5 at 0.1, seeds 0 and 1. Only their dead units come from here; report.md stays."""
    lrs = {o: study.next_lr(o) for o in study.OBJECTIVES}   # ('chosen', lr): the committed grid
    nets = [Net(o, lrs[o][1], s, rerun=True, variant="" if name == SPEC_NETS[o][0] else name)
            for name, (o, _, seeds) in study.NETWORKS.items() for s in seeds]
    nets = [n for n in nets if dataclasses.replace(n, rerun=False) not in order]
    return sorted(nets, key=lambda n: n.seed)   # stable: one seed of each network first


def needs_weights(net):
    return net in CKA_SET


def reused_source(net):
    """The committed folder a network is copied from, or None (it trains)."""
    key = REUSED.get((net.folder, net.name))
    return None if key is None or needs_weights(net) or net.rerun else key


def rerun_matches(net):
    """Whether a rerun reproduced its reused record (source test loss and top-1 exactly), or
    None while either is missing."""
    mine = os.path.join(net.out, "results.json")
    theirs = os.path.join(OUT, net.folder, "train", net.name, "results.json") if \
        (net.folder, net.name) in REUSED else os.path.join(HERE, "runs", "train", net.name,
                                                           "results.json")
    if not (os.path.exists(mine) and os.path.exists(theirs)):
        return None
    a, b = (json.load(open(p)) for p in (mine, theirs))
    return (a["test_loss"], a["top1"]) == (b["test_loss"], b["top1"])


def status(net):
    """'done', 'diverged' or None (to train)."""
    if os.path.exists(os.path.join(net.out, "diverged.json")):
        return "diverged"
    path = os.path.join(net.out, "results.json")
    return "done" if os.path.exists(path) else None


def copy_reused(net, dry_run):
    """Copy a reused network's committed JSON files into this protocol's layout."""
    where, name = reused_source(net)
    src, dst = os.path.join(HERE, where), os.path.join(OUT, net.folder)
    print(f"reuse {net.folder}/{net.name} <- {where}/.../{name}", flush=True)
    if dry_run:
        return
    for part in ("train", "probe", "separation"):
        s, d = os.path.join(src, part, name), os.path.join(dst, part, net.name)
        if os.path.isdir(s) and not os.path.exists(d):
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("*.pt", "*.npz", "cache"))
    with open(os.path.join(OUT, "REUSED.md"), "a") as f:
        f.write(f"- {net.folder}/{net.name}: {where}/*/{name}\n")


def mark_diverged(net, returncode):
    """Record a diverged run: from the log's nan/inf message, or from its chance-level top-1."""
    log = os.path.join(net.out, "train.log")
    lines = open(log, errors="replace").read().splitlines() if os.path.exists(log) else []
    message = next((l for l in reversed(lines) if "nan/inf" in l), None)
    results = os.path.join(net.out, "results.json")
    if returncode == 0 and os.path.exists(results):
        top1 = json.load(open(results))["val_top1"]
        if top1 is not None and top1 > DIVERGED_TOP1:
            return False
        message = f"source val top-1 {top1} <= {DIVERGED_TOP1} after training (chance 0.2)"
    elif message is None:
        return False            # another failure: recorded in FAILED by study.run_logged
    with open(os.path.join(net.out, "diverged.json"), "w") as f:
        json.dump({"diverged": True, "returncode": returncode, "message": message,
                   "command": net.command()}, f, indent=1)
    return True


def train_one(net):
    """Train one network: ('done' | 'diverged' | 'FAILED': FOLDER/NAME, failure record or None)."""
    status, failure = study.run_logged(net.command(), net.out)
    if mark_diverged(net, status):   # a result, not a failure
        if failure:
            os.remove(os.path.join(net.out, "FAILED"))
        failure, what = None, "diverged"
    else:
        what = "FAILED" if failure else "done"
    return f"{what}: {net.folder}/{net.name}", failure and f"{net.folder}/{net.name}: {failure}"


def train(jobs, dry_run):
    todo, finished, nets = [], 0, networks()
    for net in nets:
        if status(net):
            finished += 1
        elif reused_source(net):
            copy_reused(net, dry_run)
        else:
            todo.append(net)
    for net in todo:
        print(" ".join(net.command()), flush=True)
    print(f"{len(todo)} of {len(nets)} networks to train; {finished} already finished in {OUT} "
          f"(results.json or diverged.json) are skipped" + (
              "; to train them again, point ONE_RATE_DIR at an empty folder"
              if finished == len(nets) else ""), flush=True)
    if not dry_run and todo:
        study.run_parallel(todo, train_one, jobs)


def trained_weights():
    """{Net: its final.pt} of the finished, not diverged networks whose weights are here."""
    return {n: os.path.join(n.out, "final.pt") for n in networks()
            if status(n) == "done" and os.path.exists(os.path.join(n.out, "final.pt"))}


def analyze(dry_run):
    """Probes (three pool targets and block6), class separation (with dead units), fine-tuning
    of arm A's seed 0 and CKA over CKA_SET, for every network whose weights are here; what
    exists is skipped. A network trained elsewhere keeps its committed results."""
    nets = trained_weights()
    print(f"{len(nets)} networks with weights here", flush=True)
    for base in dict.fromkeys(n.base for n in nets):
        study.probe_and_separate({n.name: c for n, c in nets.items() if n.base == base}, base,
                                 () if "reruns" in base else study.TARGETS, dry_run)
    target = study.TARGETS["coarse_to_fine"][2]
    for net in (n for n in CKA_SET if n.seed == 0 and n in nets):
        study.finetune(nets[net], os.path.join(OUT, net.folder, "finetune", net.name, target),
                       dry_run)
    cka = os.path.join(OUT, "lr0.1", "cka")
    if os.path.exists(os.path.join(cka, "cka.json")):
        return
    missing = [n.name for n in CKA_SET if n not in nets]
    if missing:
        print(f"CKA waits for the weights of {', '.join(missing)} (all at once)", flush=True)
        return
    study.run_step("CKA", [sys.executable, "cka_analysis.py", "--checkpoint",
                           *(study.rel(nets[n]) for n in CKA_SET), "--data", study.SOURCE,
                           "--split", "val", "--max-images", "1000", "--out", study.rel(cka)],
                   dry_run)


def main():
    p = common.argument_parser(__doc__)    # a bad argument: one line, exit status 2
    p.add_argument("stage", choices=("train", "analyze", "report"))
    p.add_argument("--jobs", type=common.positive_int, default=os.environ.get("JOBS", "2"),
                   help="training runs at a time (default: JOBS, else 2)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args()
    if a.stage != "train" and not os.path.isdir(OUT):   # a mistyped ONE_RATE_DIR: no empty report
        raise common.UserError(f"no such folder: {OUT} (ONE_RATE_DIR); point it at the folder "
                               f"that holds lr0.1/, or unset it for the committed one_rate/")
    if a.stage != "report" and not os.path.isdir(os.path.join(ROOT, study.SHARED)):
        raise common.UserError(f"data folder not found: {study.SHARED}; set SHARED=DIR (the .npz "
                               f"data sets)")
    if a.stage == "train":
        train(a.jobs, a.dry_run)
    elif a.stage == "analyze":
        analyze(a.dry_run)
    elif not a.dry_run:
        import one_rate_report   # beside this file
        one_rate_report.write_report()


if __name__ == "__main__":
    common.run_main(main)
