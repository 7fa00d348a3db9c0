"""Fine-tune a pretrained network on a transfer dataset, choosing lr x weight decay on val only.

  python finetune.py --checkpoint runs/digits_softmax_s0/final.pt --data digits@5-9 --out ft/sm
  python finetune.py --checkpoint torchvision:resnet50:IMAGENET1K_V1 --data flowers102:/data \\
      --out ft/flowers --steps 20000 --batch-size 256 --resolution 224
  python finetune.py --checkpoint runs/c5/final.pt --data npz:../shared/data/clothing_small \\
      --out ft/clothing --lrs 0.01 0.1 --wds 1e-5 1e-4 --epochs 10
  python finetune.py --from-scratch --arch resnet18 --small-input --resolution 8 \\
      --data digits@5-9 --out ft/scratch                   # the random-init baseline
  torchrun --nproc_per_node=8 finetune.py --checkpoint CKPT --data food101:/data --out ft/food

What it does (SPEC.md, "Transfer evaluation"):
  1. Every layer but the head starts from the checkpoint (its EMA weights when it has them), the
     head is a fresh linear layer (N(0, 0.01^2), bias 0) whatever the source objective was; the
     whole network trains with softmax cross-entropy, SGD Nesterov 0.9, linear warmup then
     cosine decay, the training augmentation, AMP and channels_last on GPU (train_imagenet.py's
     train(), imported).
  2. Each (lr, weight decay) of the grid trains on train and is scored on val
     (OUT/grid/lr<LR>_wd<WD>/); the test split is not even loaded into these runs.
  3. The best pair on val (the dataset's metric: top-1, or mean per-class accuracy) is retrained
     on train+val (OUT/final/) and evaluated once on test.
Default grid: lr per 256 images in {0.003, 0.01, 0.03, 0.1} x weight decay in {1e-5, 1e-4}
(log-spaced, 8 runs). Every run is resumable after a kill (rerun the same command); a finished
grid point is read back, not recomputed. Each run starts with a line 'grid point i of N' (or
'the final run') and the ETA of the whole fine-tuning. A finished run's resume state (last.pt)
is deleted, and so are the models (only scores are used): --keep-model keeps the final one,
OUT/final/final.pt (the demo's 18 would take 0.8 GB). Writes OUT/results.json: result_header
first (kind "finetune", network: the source's identity, dataset: the target spec,
dataset_name), then metric, test_accuracy, best_lr, best_wd, grid (each pair -> val metric),
seconds, sizes.
"""
import argparse
import math
import os
import shutil
import signal
import sys
import time

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while torch loads (1-2 s): one line and status 130, as later (common.run_main)
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted (Ctrl-C) while starting",
                                                   file=sys.stderr), os._exit(130)))

import torch
import torch.nn as nn

import common
import train_imagenet

DEFAULT_LRS = (0.003, 0.01, 0.03, 0.1)
DEFAULT_WDS = (1e-5, 1e-4)
# A finished run is read back only if every argument that can change its result is the same:
# all of them but these (derived, not listed by hand, so a new flag counts by default).
NOT_IN_GRID_KEY = train_imagenet.NOT_COMPARED_ON_RESUME | {"lrs", "wds", "checkpoint", "keep_model"}


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--checkpoint", help="a checkpoint of train_imagenet.py (or its run folder: "
                   "its final.pt), torchvision:ARCH[:WEIGHTS] (e.g. torchvision:resnet50:"
                   "IMAGENET1K_V2) or paper:OBJECTIVE/seedK (the paper's networks, downloaded "
                   "once); required unless --from-scratch")
    p.add_argument("--from-scratch", action="store_true",
                   help="random initialization instead of a checkpoint (the baseline)")
    p.add_argument("--data", required=True, help="dataset spec (see README), e.g. digits@5-9")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--lrs", type=common.positive_float, nargs="*", default=list(DEFAULT_LRS),
                   help="learning rates per 256 images (scaled to the batch)")
    p.add_argument("--wds", type=common.nonnegative_float, nargs="*", default=list(DEFAULT_WDS),
                   help="weight decays (conv and linear weights)")
    p.add_argument("--arch", choices=common.ARCHS,
                   help="must match the checkpoint's; needed with --from-scratch (default resnet50)")
    p.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="with --from-scratch: the 3x3 stride-1 stem for tiny images (default: "
                        "off; with --checkpoint the checkpoint's)")
    p.add_argument("--resolution", type=common.resolution,
                   help="default: the checkpoint's training resolution, else 224")
    p.add_argument("--augment", choices=("paper", "small"),
                   help="default: the data preset's (train_imagenet.py): small for digits, npz, "
                        "CIFAR and images of 64 px or less, else paper")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: the data preset's: on, off for "
                        "digits)")
    p.add_argument("--download", action="store_true", help="let torchvision download datasets")
    p.add_argument("--keep-model", action="store_true",
                   help="keep the fine-tuned model, OUT/final/final.pt (default: its scores only)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds results of another kind, or replace "
                   "the fine-tuning of another network or dataset there (default: refused)")
    train_imagenet.add_training_args(p, epochs=10, batch_size=128, warmup_epochs=1.0,
                                     ema_epochs=0.0, log_every=100)
    # The grid sets the rate and the decay of every run: --lr and --weight-decay (shared with
    # train_imagenet.py) are refused, not dropped in silence (--lr 0.05 --lrs 0.1 trained at
    # 0.1). Kept as hidden flags so that argparse does not take --lr for an abbreviation of --lrs.
    grid_flags = {"lr": "--lrs", "weight_decay": "--wds"}
    for action in p._actions:
        if action.dest in grid_flags:
            action.default, action.help = None, argparse.SUPPRESS
    args = p.parse_args(argv)
    if bool(args.checkpoint) == args.from_scratch:
        p.error("give exactly one of --checkpoint or --from-scratch")
    common.resolve_device(args.device)   # cheap checks first: a bad --device before the files
    if args.checkpoint:
        args.checkpoint = common.checkpoint_name(args.checkpoint)   # a run folder: its final.pt
    for dest, grid in grid_flags.items():
        if getattr(args, dest) is not None:
            flag = "--" + dest.replace("_", "-")
            p.error(f"{flag} is not used by finetune.py: its grid {grid} gives the values to "
                    f"try (e.g. {grid} {getattr(args, dest):g})")
    return args


def resolve_args(args, data, network, device):
    """The arguments every run of the fine-tuning shares, as a new Namespace: `args` with what
    was left unset filled in, the one place (nothing writes into them later): the resolution
    (the checkpoint's), augmentation and flips (the data preset's, train_imagenet.PRESETS),
    epochs from --steps, and the device's values (train_imagenet.device_defaults)."""
    preset = train_imagenet.PRESETS[train_imagenet.preset_name(args.data, data["image_size"])]
    epochs = args.epochs
    if args.steps is not None:
        per_epoch = len(data["train"]) // args.batch_size
        epochs = max(1, math.ceil(args.steps / max(1, per_epoch)))
    return train_imagenet.device_defaults(argparse.Namespace(**{
        **vars(args), "resolution": common.input_resolution(args.resolution, network),
        "augment": args.augment or preset["augment"],
        "flip": preset["flip"] if args.flip is None else args.flip, "epochs": epochs}), device)


def source_model(args):
    """(model without a trained head, network: the source's identity) from --checkpoint or
    --from-scratch."""
    if args.from_scratch:
        arch = args.arch or "resnet50"
        small = bool(args.small_input)
        model = common.build_model("softmax", 1, arch=arch, small_input=small)
        return model, common.scratch_identity(arch, small)
    model, network = common.load_pretrained(args.checkpoint)
    if args.arch and args.arch != network["arch"]:
        raise common.UserError(f"--arch {args.arch} but {args.checkpoint} is a "
                               f"{network['arch']}: drop --arch or pass a {args.arch} checkpoint")
    if args.small_input is not None and args.small_input != network["small_input"]:
        raise common.UserError(f"--small-input does not match {args.checkpoint} (small_input="
                               f"{network['small_input']}); drop the flag")
    return model, network


def with_fresh_head(source, network, num_classes, seed):
    """A softmax ResNet of the source's arch with every weight but the head copied over."""
    torch.manual_seed(seed)
    model = common.build_model("softmax", num_classes, arch=network["arch"],
                               small_input=network["small_input"],
                               stem_pool=network.get("stem_pool", "torchvision"))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise common.UserError(f"the checkpoint's weights do not fit a {network['arch']} "
                               f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
    return model


def run_args(args, lr, wd, stage):
    """The arguments of one training run: the script's, with one (lr, weight decay) of the grid
    and its own output folder; stage 'grid' (train, scored on val) or 'final' (train+val)."""
    out = os.path.join(args.out, "final") if stage == "final" else \
        os.path.join(args.out, "grid", f"lr{lr:g}_wd{wd:g}")
    run = {k: v for k, v in vars(args).items() if k not in ("lrs", "wds")}
    return argparse.Namespace(**{**run, "lr": lr, "weight_decay": wd, "out": out, "stage": stage})


def grid_key(run, network):
    """What a finished run is read back by: every argument that can change its result (all
    but NOT_IN_GRID_KEY, derived rather than listed) and the source checkpoint's hash."""
    key = {k: v for k, v in sorted(vars(run).items()) if k not in NOT_IN_GRID_KEY}
    return {**key, "checkpoint_hash": network["checkpoint_hash"] or "scratch"}


def train_one(source, network, data, run, dist, overwrite=False):
    """One fine-tuning run (train_imagenet.train: resumable) into run.out; a finished run with
    the same grid key is read back, one with another is refused (deleted with `overwrite`). A
    finished run's resume state (last.pt) is deleted, and a grid point's final.pt too (only its
    val score is used): a ResNet-50's last.pt is about 300 MB."""
    key = grid_key(run, network)
    keep_model = run.stage == "final" and run.keep_model
    if train_imagenet.finished(run.out, need_model=keep_model):
        before = common.read_json(os.path.join(run.out, "results.json")).get("grid_key") or {}
        if before.get("precision") == "auto":   # a key written before the flag was resolved
            before = {**before, "precision": run.precision}
        changed = {k: (before.get(k), key.get(k)) for k in sorted(set(before) | set(key))
                   if before.get(k) != key.get(k)}
        if not (changed and overwrite):
            done = train_imagenet.read_back(run.out, changed, dist, "; rerun with the original "
                                            "ones, use another --out, or --overwrite to replace "
                                            "it", prefix="finetune: ")
            return {**done, "read_back": True}   # no training time: left out of the ETA
        shutil.rmtree(run.out)  # --overwrite: another network's run, replaced
    model = with_fresh_head(source, network, data["num_classes"], run.seed)
    model_args = {"objective": "softmax", "hparams": {}, "arch": network["arch"],
                  "num_classes": data["num_classes"], "small_input": network["small_input"],
                  "stem_pool": network.get("stem_pool", "torchvision")}
    extra = {"kind": "finetune_run", "finetune_of": network["checkpoint"],
             "source_objective": network["objective"], "grid_key": key, "lr": run.lr,
             "weight_decay": run.weight_decay}
    results = train_imagenet.train(model, model_args, data, run, dist, results_extra=extra)
    if dist.is_main:
        for name in ("last.pt",) + (() if keep_model else ("final.pt",)):
            if os.path.exists(os.path.join(run.out, name)):
                os.remove(os.path.join(run.out, name))
    return results


def val_score(results, metric):
    key = f"val_{metric}"    # the dataset's metric: top1 or mean_per_class
    value = results.get(key)
    if value is None or not math.isfinite(value):
        raise common.UserError(f"a grid run has no finite {key}; see its summary.csv")
    return value


def timed(took, fn, *args):
    """fn(*args), its wall time appended to `took` unless the run was read back."""
    t = time.time()
    r = fn(*args)
    if not r.get("read_back"):
        took.append(time.time() - t)
    return r


def eta_text(took, runs_left):
    """'eta 12m30s (3 runs left)' at the mean time of the runs trained so far (the final run,
    on train+val, takes about as long as a grid point); no estimate before the first."""
    left = f"{runs_left} run{'s' if runs_left != 1 else ''} left"
    if not took:
        return f"eta known after the first run ({left})"
    return f"eta {common.duration(sum(took) / len(took) * runs_left)} ({left})"


def main(argv=None):
    args = parse_args(argv)
    # not a run argument: kept out of the runs' arguments, their grid keys and checkpoints
    overwrite = vars(args).pop("overwrite")
    start = time.time()
    if not args.lrs or not args.wds:
        raise common.UserError("empty grid: give at least one value to --lrs and to --wds")
    dist = train_imagenet.setup_distributed(args.device)
    try:
        if dist.is_main:  # one fine-tuning per folder at a time, and nothing else there
            common.make_out_dir(args.out, "finetune", overwrite)
        source, network = source_model(args)
        data = common.load_dataset(args.data, download=args.download)
        if dist.is_main:  # another source or target: refused before any training
            common.refuse_replacing(os.path.join(args.out, "results.json"),
                                    common.result_header(network, data, "finetune"),
                                    overwrite=overwrite, what="the fine-tuning")
        args = resolve_args(args, data, network, dist.device)
        selection = {**data, "test": None}   # the grid's runs never see the test split
        grid, scores = {}, {}
        points = [(lr, wd) for lr in args.lrs for wd in args.wds]
        took = []   # seconds of each run trained here (read-back ones take none): the ETA's rate
        for i, (lr, wd) in enumerate(points, 1):
            if dist.is_main:
                print(f"finetune: grid point {i} of {len(points)}: lr {lr:g}, wd {wd:g} | "
                      f"{eta_text(took, len(points) - i + 2)}", flush=True)
            r = timed(took, train_one, source, network, selection,
                      run_args(args, lr, wd, "grid"), dist, overwrite)
            scores[(lr, wd)] = val_score(r, data["metric"])
            grid[f"lr={lr:g},wd={wd:g}"] = scores[(lr, wd)]
        best_lr, best_wd = max(scores, key=lambda k: (scores[k], -k[0], -k[1]))
        if dist.is_main:
            print(f"finetune: best on val lr={best_lr:g} wd={best_wd:g} "
                  f"({data['metric']} {common.pct(scores[(best_lr, best_wd)])}); retraining on "
                  f"train+val (the final run) | {eta_text(took, 1)}", flush=True)
        final_data = {**selection, "train": common.concat_splits(data["train"], data["val"]),
                      "val": None, "test": data["test"]}
        final = run_args(args, best_lr, best_wd, "final")
        r = timed(took, train_one, source, network, final_data, final, dist, overwrite)
        test_acc = r[data["metric"]]
        results = {**common.result_header(network, data, "finetune"),   # the source network
                   "metric": data["metric"], "test_accuracy": test_acc,
                   "test_top1": r["top1"], "test_mean_per_class": r["mean_per_class"],
                   "best_lr": best_lr, "best_wd": best_wd, "grid": grid,
                   "best_val": scores[(best_lr, best_wd)], "seconds": time.time() - start,
                   "resolution": args.resolution, "epochs": args.epochs, "steps": r.get("steps"),
                   "batch_size": args.batch_size, "n_train": len(data["train"]),
                   "n_val": len(data["val"]), "n_test": len(data["test"]),
                   "num_classes": data["num_classes"],
                   "final_checkpoint": os.path.join(args.out, "final", "final.pt")
                   if args.keep_model else None,
                   "settings": grid_key(final, network)}  # everything the final run used
        if dist.is_main:
            common.save_json(os.path.join(args.out, "results.json"), results)
            print(f"finetune: {network['checkpoint']} -> {data['name']}: test {data['metric']} "
                  f"{common.pct(test_acc)} (lr {best_lr:g}, wd {best_wd:g}) in "
                  f"{results['seconds']:.0f} s")
        return results
    finally:
        train_imagenet.teardown_distributed()


if __name__ == "__main__":
    common.run_main(main)
