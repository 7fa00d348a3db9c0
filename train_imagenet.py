"""Train a ResNet with one of the nine objectives of SPEC.md, on one device or many (torchrun).

  python train_imagenet.py --data digits@0-4 --objective softmax --out runs/digits_softmax_s0
  python train_imagenet.py --data digits@0-4 --objective cosine_softmax --tau 0.1 --seed 1 \\
      --out runs/digits_cos_tau0.1_s1
  python train_imagenet.py --data npz:../shared/data/cifar10@0-4 --objective sigmoid --out runs/c5
  torchrun --nproc_per_node=8 train_imagenet.py --data imagenet:/data/imagenet \\
      --objective logit_normalization --out runs/in_logitnorm_s0
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
      train_imagenet.py --data imagenet:/data/imagenet --objective sigmoid --out runs/in_sigmoid

Evaluate a checkpoint without training (this project's, an imported one of the paper's, or
torchvision's published weights) on the dataset's TEST split; writes OUT/results.json (kind
"evaluate": top1, top5, mean_per_class). --eval-preprocessing tf scores the imported networks
as the authors did (import_tf_checkpoint.tf_eval_transform):
  python train_imagenet.py --evaluate runs/digits_softmax_s0/final.pt --data digits@0-4 \\
      --out runs/eval/digits_softmax_s0
  torchrun --nproc_per_node=8 train_imagenet.py --evaluate runs/tf/softmax_s0.pt \\
      --eval-preprocessing tf --data imagenet:/data/imagenet --out runs/eval/softmax_s0
  python train_imagenet.py --evaluate torchvision:resnet50:IMAGENET1K_V1 \\
      --data imagenet:/data/imagenet --out runs/eval/torchvision_resnet50
  python train_imagenet.py --evaluate paper:sigmoid/seed0 --eval-preprocessing tf \\
      --data imagenet:/data/imagenet --out runs/eval/sigmoid_s0   # downloaded on first use

Rerunning the same command resumes from OUT/last.pt (mid-epoch, bitwise on the CPU with
--deterministic); SIGTERM or SIGUSR1 writes last.pt and exits (status 128 + signal). Changing
epochs, batch size, lr, objective and the like on resume is refused unless --force-resume.

Presets by dataset (every value can be overridden on the command line):
  imagenet and other image folders: resnet50, 224 px, paper augmentation, 90 epochs, global batch
      4096, lr 0.1 per 256 with 5 warmup epochs, EMA time constant 1 epoch; squared_error: no
      rate of its own, and at SPEC.md's s = 10 it diverged on small data at every lr from 0.8
      down to 0.005 per 256. Recommended: --loss-scale 0.005 (s x lr = 5e-4 per 256, the product
      that trained on digits and CIFAR-10, while lr and weight decay stay the other
      objectives'), or --lr 5e-5 at s = 10. This is extrapolated from those small-data
      measurements (BENCHMARKS.md, results/cifar10_coarse/README.md), not measured on ImageNet;
      a run that diverges stops with a one-line nan/inf error naming the step
  npz:DIR, cifar10, cifar100: resnet50 with the small-input stem, 32 px, 'small' augmentation
      (crop with padding, flip), 30 epochs, batch 512, lr 0.1 per 256, 2 warmup epochs;
      squared_error: lr 5e-5 per 256
  digits (8x8 px, the demo; about 10 s of training on 2 CPU cores): resnet18 with the standard
      stem, 16 px, 'small' augmentation without flip, 6 epochs, batch 32, lr 0.8 per 256 (0.1 at
      batch 32), 1 warmup epoch, EMA time constant 0.25 epoch; squared_error: lr 5e-5 per 256
      (at SPEC.md's s, kappa, M its loss diverges at the other objectives' lr)
Everything else is SPEC.md's recipe: SGD Nesterov 0.9, weight decay 8e-5 on conv and linear
weights, cosine decay per step, bf16 autocast and torch.compile on GPU, fp32 on CPU.

Prints a line per epoch and, within an epoch, every --progress-seconds (default 30) a line
with the step in the epoch, img/s, loss, lr and the ETA of the epoch and of the run, e.g.
  epoch 3/90 step 600/1251 (48%) | 2950 img/s | loss 3.1024 (epoch 3.2113) | lr 1.6 | eta ...
Writes OUT/args.json, OUT/log.jsonl (every --log-every steps: loss, lr, images/s, share of time
waiting for data), OUT/summary.csv (a row per epoch: raw and EMA weights on the val split),
OUT/last.pt (every epoch and every --ckpt-minutes), and at the end OUT/final.pt (load it with
common.load_checkpoint + common.model_from_checkpoint) and OUT/results.json: top1/top5 and
mean_per_class are the TEST split accuracies of the EMA weights (the raw weights' in *_raw),
val_top1 etc. the val split's at the last epoch; the test split is never used for any choice.

The file reads top to bottom: presets and flags (resolve_args: the one place the arguments are
resolved; nothing writes into them after it), distributed setup, the data pipeline, one optimizer
step, evaluation, the state a checkpoint carries, then train() in its steps (prepare_run,
open_output, step_loop with Run.step and Run.log_step, finish) and main(). finetune.py trains
through the same train(). Tests reach two hooks through the environment, never set in use:
KORNBLITH_TEST_HOOKS="nan_at_step=7,kill_at_step=5" (read_test_hooks).
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while torch loads (1-2 s): one line and status 130, as later (common.run_main)
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted (Ctrl-C) while starting",
                                                   file=sys.stderr), os._exit(130)))

import numpy as np
import torch

import common

# ==============================================================================================
# Presets and flags

PRESETS = {
    "imagenet": dict(arch="resnet50", resolution=224, augment="paper", flip=True,
                     small_input=False, epochs=90, batch_size=4096, lr=0.1, warmup_epochs=5.0,
                     ema_epochs=1.0),
    "small": dict(arch="resnet50", resolution=32, augment="small", flip=True, small_input=True,
                  epochs=30, batch_size=512, lr=0.1, warmup_epochs=2.0, ema_epochs=1.0),
    "digits": dict(arch="resnet18", resolution=16, augment="small", flip=False,
                   small_input=False, epochs=6, batch_size=32, lr=0.8, warmup_epochs=1.0,
                   ema_epochs=0.25),
}
# Per-objective learning rates (per 256 images) that replace a preset's lr. squared_error with
# SPEC.md's s=10, kappa=9, M=60 has gradients ~1e4 times cross-entropy's: on digits it stops
# with nan/inf within the first epoch at every lr from 0.8 down to 0.005 per 256, and trains
# well (test top-1 > 0.97) at 5e-5. On CIFAR-10 (ResNet-18, 32 px, batch 128) 5e-5 trains
# faster in the first epoch than softmax at the preset's 0.1 (train top-1 0.53 vs 0.42 after
# 100 steps), so the small preset uses it too. The imagenet preset has no measured rate; the
# loss scale s only rescales the gradient, so what matters is s x lr: 10 x 5e-5 = 5e-4 per 256
# trained on digits and on CIFAR-10 (small preset), and so did s = 0.005 at lr 0.05, 0.1 and
# 0.2 (2.5e-4 to 1e-3: val top-1 80.4, 80.7, 79.7, as good as softmax's best; the CIFAR-10
# coarse study, results/cifar10_coarse/README.md), while 10 x 0.005 = 0.05 diverged on digits.
# nan_error recommends that product (extrapolated: never measured with 1,000 classes).
OBJECTIVE_LR = {"digits": {"squared_error": 5e-5}, "small": {"squared_error": 5e-5}}
SQUARED_ERROR_STEP = 5e-4   # s x lr per 256 that trained squared_error on small data
# The objectives' hyperparameters, each its own flag of the same name (common.OBJECTIVES)
OBJECTIVE_HPARAMS = ("alpha", "lambda_", "dropout", "beta", "tau", "normalize_features", "kappa",
                     "m", "loss_scale")
# Arguments that cannot change what a run computes. Every other argument is compared on resume
# and a changed one is refused unless --force-resume (so a new flag is compared by default); the
# architecture, input stem and objective are refused even then (the weights would not fit).
NOT_COMPARED_ON_RESUME = {"out", "workers", "workers_from", "threads", "device", "log_every",
                          "ckpt_minutes", "progress_seconds",
                          "eval_batch_size", "force_resume", "download", "snapshot_every",
                          "compile", "channels_last", "deterministic", "keep_resume_state",
                          "evaluate", "eval_preprocessing"}
NEVER_CHANGED_ON_RESUME = {"arch", "small_input", "objective"}
# What --evaluate reads (evaluate_checkpoint); any other flag given with it is refused.
EVALUATE_USES = {"evaluate", "data", "out", "download", "eval_preprocessing", "resolution",
                 "precision", "channels_last", "workers", "eval_batch_size", "device",
                 "overwrite"}


def add_training_args(parser, **defaults):
    """Add the flags train() reads. A default of None means: chosen by the script's data preset
    or by the device (see the script's help, which says it in words). `defaults` override these
    defaults, and --help shows them (common.HelpFormatter). Each number's valid range is its
    argparse type (common.positive_int & co.)."""
    pos_int, pos_float = common.positive_int, common.positive_float
    nonneg_int, nonneg_float = common.nonnegative_int, common.nonnegative_float
    words = {"epochs": "the data preset's", "batch_size": "the data preset's",
             "lr": "the data preset's, or the objective's (squared_error), see above",
             "warmup_epochs": "the data preset's", "ema_epochs": "the data preset's",
             "workers": "common.default_workers: on a GPU the cores this process may use "
                        "less one, on the CPU one"}

    def preset(dest):   # a given default is shown by the formatter; else these words
        return "" if dest in defaults else f" (default: {words[dest]})"
    g = parser.add_argument_group("training (shared with finetune.py)")
    g.add_argument("--epochs", type=pos_int, help="training epochs" + preset("epochs"))
    g.add_argument("--batch-size", type=pos_int,
                   help="GLOBAL batch size (all processes together); must divide by the world "
                        "size" + preset("batch_size"))
    g.add_argument("--micro-batch", type=pos_int, help="per-device images per forward/backward; "
                   "gradients accumulate to the per-device batch (default: on a GPU the largest "
                   "divisor of the per-device batch up to 256 images of 224 px, scaled by "
                   "pixels; on the CPU the whole batch, no accumulation)")
    g.add_argument("--lr", type=pos_float, help="learning rate per 256 images, scaled linearly "
                   "to the global batch" + preset("lr"))
    g.add_argument("--warmup-epochs", type=nonneg_float,
                   help="linear warmup, then cosine decay per step" + preset("warmup_epochs"))
    g.add_argument("--momentum", type=common.fraction_below_one, default=0.9,
                   help="SGD momentum, in [0, 1)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum")
    g.add_argument("--weight-decay", type=nonneg_float, default=8e-5,
                   help="on conv and linear weights only (common.param_groups)")
    g.add_argument("--ema-epochs", type=nonneg_float, help="time constant of the exponential "
                   "moving average of the weights, in epochs (0: no EMA)" + preset("ema_epochs"))
    g.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast precision; auto: bf16 on GPU, fp32 on CPU; fp16 uses GradScaler")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for GPU, off for CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for GPU, off for CPU)")
    g.add_argument("--workers", type=common.worker_count,
                   help="data loading processes per device (at most the usable CPU cores)"
                   + preset("workers"))
    g.add_argument("--threads", type=common.thread_count, help="CPU threads of the training step "
                   "(default: OMP_NUM_THREADS if set, else the cores left over by the loader "
                   "workers; at most the usable CPU cores)")
    g.add_argument("--eval-batch-size", type=pos_int, default=256, help="per device")
    g.add_argument("--log-every", type=pos_int, default=50,
                   help="steps between reads of the loss (the only host syncs) and log.jsonl lines")
    g.add_argument("--progress-seconds", type=nonneg_float, default=30.0,
                   help="within an epoch, a progress line (step i/N, img/s, loss, lr, eta of "
                        "the epoch and of the run) at most this often, at log steps only "
                        "(0: at every log step)")
    g.add_argument("--ckpt-minutes", type=nonneg_float, default=10.0,
                   help="also write last.pt this often (checked at log steps; 0: every log step)")
    g.add_argument("--steps", type=pos_int, help="a budget of optimizer steps: the cosine "
                   "schedule ends there and the last epoch is cut (default: whole --epochs)")
    g.add_argument("--seed", type=common.seed, default=0,
                   help="seed of the initialization, data order and augmentation")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bitwise-reproducible runs on the CPU)")
    g.add_argument("--force-resume", action="store_true",
                   help="resume from last.pt even if schedule-defining arguments changed")
    g.add_argument("--keep-resume-state", action="store_true",
                   help="keep OUT/last.pt (weights, EMA, optimizer, RNGs) after the run "
                   "finishes, to extend it later with --force-resume --epochs N (default: "
                   "deleted, final.pt keeps the weights every analysis uses)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: the local GPU)")
    parser.set_defaults(**defaults)
    return g


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--data", required=True, help="dataset spec: digits, digits@0-4, "
                   "npz:DIR[@0-4], imagenet:DIR, folder:DIR, cifar10:ROOT, ... (see README)")
    p.add_argument("--objective", default="softmax", choices=list(common.OBJECTIVES),
                   help="the training objective (SPEC.md)")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--arch", choices=common.ARCHS, help="default: from the data preset")
    p.add_argument("--resolution", type=common.resolution,
                   help="training and evaluation side in pixels (default: the data preset's; "
                        "with --evaluate the checkpoint's training resolution, else 224)")
    p.add_argument("--augment", choices=("paper", "small"),
                   help="train augmentation style (default: the data preset's)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips in training (default: the data preset's)")
    p.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem without max-pool, for images of 32 px or less "
                        "(default: the data preset's)")
    p.add_argument("--download", action="store_true", help="let torchvision download datasets")
    p.add_argument("--evaluate", metavar="CKPT", help="evaluate CKPT (a checkpoint path or "
                   "torchvision:ARCH[:WEIGHTS] or paper:OBJECTIVE/seedK) on --data's test "
                   "split instead of training; training flags are then refused (default: train)")
    p.add_argument("--eval-preprocessing", choices=("torchvision", "tf"), default="torchvision",
                   help="with --evaluate: torchvision (this project's: antialiased bicubic, "
                   "uint8) or tf (the released TF models': crop 0.875, TF1 resize_bicubic)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds results of another kind (a fine-tune, "
                   "a probe, ...), or, with --evaluate, replace another checkpoint's or "
                   "setting's evaluation (default: refused)")
    p.add_argument("--snapshot-every", type=common.nonnegative_int, default=0,
                   metavar="EPOCHS",
                   help="also keep the weights every this many epochs as "
                   "OUT/snapshots/epochNNN.pt (a normal checkpoint every script reads; 0: none)")
    h = p.add_argument_group("objective hyperparameters (defaults: SPEC.md)")
    spec = {k: v for hp in common.OBJECTIVES.values() for k, v in hp.items()}

    def default(key):   # SPEC.md's value, from common.OBJECTIVES
        return f" (default: {spec[key]})"
    h.add_argument("--alpha", type=float, help="label_smoothing" + default("alpha"))
    h.add_argument("--lambda", dest="lambda_", type=float,
                   help="extra_final_layer_l2" + default("lambda_"))
    h.add_argument("--dropout", type=float,
                   help="dropout: drop rate on the pooled features" + default("dropout"))
    h.add_argument("--beta", type=float, help="logit_penalty" + default("beta"))
    h.add_argument("--tau", type=float, help="logit_normalization, cosine_softmax (default: "
                   f"{common.OBJECTIVES['logit_normalization']['tau']} and "
                   f"{common.OBJECTIVES['cosine_softmax']['tau']})")
    h.add_argument("--normalize-features", action=argparse.BooleanOptionalAction, default=None,
                   help="cosine_softmax: normalize x too (--no-normalize-features: the released "
                   "code's variant)" + default("normalize_features"))
    h.add_argument("--kappa", type=float, help="squared_error" + default("kappa"))
    h.add_argument("--m", type=float, help="squared_error: target M" + default("m"))
    h.add_argument("--loss-scale", type=float, help="squared_error: s" + default("loss_scale"))
    add_training_args(p)
    args = p.parse_args(argv)
    if args.evaluate:
        common.refuse_unused(p, args, EVALUATE_USES, "with --evaluate, which scores a trained "
                             "network (drop it, or train without --evaluate)")
    else:
        common.refuse_unused(p, args, set(vars(args)) - {"eval_preprocessing"},
                             "in training (it goes with --evaluate)")
    return args


def preset_name(spec, image_size=None):
    name = common.parse_spec(spec)[0] if spec else "imagenet"
    if name == "digits":
        return "digits"
    if name in ("npz", "cifar10", "cifar100") or (image_size is not None and image_size <= 64):
        return "small"
    return "imagenet"


def resolve_args(args, image_size, device):
    """The arguments a training run uses: parse_args()' with every value left unset filled in
    from the data preset, the objective's lr and the device (device_defaults), as a new
    Namespace. The one place they are resolved: nothing writes into them later, and args.json
    and the checkpoints record them as they are.

    >>> resolve_args(parse_args(["--data", "digits", "--out", "o"]), 8, torch.device("cpu")).lr
    0.8
    """
    preset = preset_name(args.data, image_size)
    lr = args.lr if args.lr is not None else OBJECTIVE_LR.get(preset, {}).get(args.objective)
    values = {**vars(args), "preset": preset, "lr": lr}
    values.update({k: v for k, v in PRESETS[preset].items() if values[k] is None})
    return device_defaults(argparse.Namespace(**values), device)


def device_defaults(args, device):
    """A copy of `args` with the device's values where they were left to it, the one rule of
    training, fine-tuning and --evaluate: the precision (amp_dtype), torch.compile and
    channels_last on a GPU only, the loader workers (common.default_workers) and workers_from,
    where their number came from."""
    cuda = device.type == "cuda"
    workers, workers_from = (args.workers, "--workers") if args.workers is not None else \
        common.default_workers(device.type)
    return argparse.Namespace(**{
        **vars(args), "precision": amp_dtype(args.precision, device)[0],
        "compile": cuda if args.compile is None else args.compile,
        "channels_last": cuda if args.channels_last is None else args.channels_last,
        "workers": workers, "workers_from": workers_from})


def objective_overrides(args):
    return {hp: getattr(args, hp) for hp in OBJECTIVE_HPARAMS if getattr(args, hp) is not None}


# ==============================================================================================
# Distributed setup: torchrun's environment, NCCL on GPUs, gloo on the CPU

@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group when
    there is more than one process: NCCL on GPUs (one GPU per local rank), gloo on the CPU. A
    plain `python script.py` is rank 0 of 1."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = common.resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, common.cpu_cores() // common.local_world_size()))
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.distributed.init_process_group("nccl", device_id=dev)
        else:
            torch.distributed.init_process_group("gloo")
    return Dist(rank, world, local_rank, dev)


def teardown_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce(t, op="sum"):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
               "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(t, op=ops[op])
    return t


def broadcast_buffers(*modules):
    """Rank 0's BN statistics to every rank (each rank updates its own from its own batch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for module in modules:
            for b in module.buffers():
                torch.distributed.broadcast(b, 0)


def amp_dtype(precision, device):
    """('bf16' | 'fp16' | 'fp32', the autocast dtype or None) for --precision on this device."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise common.UserError("--precision fp16 needs a GPU (GradScaler); use bf16 or fp32 on "
                               "the CPU")
    return precision, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# ==============================================================================================
# The data pipeline: uint8 images, augmentation seeded per image, normalization on the device.
# Augmentation randomness is a function of (seed, epoch, image index), not of the worker that
# happens to load the image, so a resumed run sees the same images as an uninterrupted one.

class SeededAugment(torch.utils.data.Dataset):
    """A Split with a random transform whose randomness depends only on (seed, epoch, index).

    Items are fetched with keys (epoch, index) (see EpochSampler), so an epoch's augmentations
    are the same whatever the number of workers, and after a mid-epoch resume. The process's
    own torch RNG state is restored after each item (it drives dropout when workers=0)."""

    def __init__(self, split, transform, seed):
        self.split, self.transform, self.seed = split, transform, int(seed)

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        epoch, i = key
        img, label = self.split[i]
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_000_007 + i) % 2 ** 63)
        try:
            img = self.transform(img)
        finally:
            gen.set_state(state)
        return img, label


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a permutation of the training set that depends on (seed, epoch) only
    (torch's DistributedSampler, drop_last), cut to `per_epoch` images and started at `start`
    (a mid-epoch resume). Yields (epoch, index) keys for SeededAugment."""

    def __init__(self, n, per_epoch, rank, world, seed):
        self.inner = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                         shuffle=True, seed=seed, drop_last=True)
        self.per_epoch, self.epoch, self.start = per_epoch, 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(self.inner)[self.start:self.per_epoch]])

    def __len__(self):
        return max(0, self.per_epoch - self.start)


def worker_init(_worker_id):
    # SLURM and friends signal the whole process group: loader workers must survive until the
    # main process has saved its checkpoint.
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def stop_workers(loader):
    """End the loader's worker processes now, on every way out of the training loop. They ignore
    SIGTERM (worker_init), and the interpreter's exit terminates and then joins them: left to
    it, any exception in the loop hung the process forever (issue 13, 13 reproduced cases)."""
    it = getattr(loader, "_iterator", None)  # the persistent workers' iterator (torch 2.x)
    if it is None:
        return
    it._shutdown_workers()  # asks them to stop and joins them (5 s each at most)
    for w in getattr(it, "_workers", []):
        if w.is_alive():
            w.kill()  # SIGKILL is never ignored
            w.join()


PREFETCH = 4   # batches in flight per loader worker


def check_shared_memory(workers, micro_batch, resolution, shm="/dev/shm"):
    """Refuse to start loader workers whose batches in flight do not fit in /dev/shm, where they
    pass them to the main process: Docker's default 64 MB ended such a run with a bus error
    (ImageNet on 8 GPUs: about 2.5 GB per rank)."""
    if workers == 0 or not os.path.isdir(shm):
        return
    need = workers * PREFETCH * micro_batch * 3 * resolution * resolution
    free = shutil.disk_usage(shm).free
    if need > free:
        raise common.UserError(
            f"{shm} has {free / 2**30:.2f} GiB free, but {workers} loader workers need about "
            f"{need / 2**30:.2f} GiB for their batches in flight: run the container with "
            f"--ipc=host or --shm-size={math.ceil(need * 1.5 / 2**30)}g, or lower --workers")


def train_loader(split, transform, micro_batch, per_epoch, dist, seed, workers):
    """(DataLoader, EpochSampler) over a Split: uint8 batches of `micro_batch` images,
    augmentation seeded per image; call sampler.set_epoch(epoch, start) before iter(loader)."""
    sampler = EpochSampler(len(split), per_epoch, dist.rank, dist.world, seed)
    loader = torch.utils.data.DataLoader(
        SeededAugment(split, transform, seed), batch_size=micro_batch, sampler=sampler,
        num_workers=workers, pin_memory=dist.device.type == "cuda", drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=PREFETCH if workers > 0 else None,
        worker_init_fn=worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def to_device(images, labels, device, channels_last=True, dtype=torch.float32):
    """A uint8 batch from a loader -> (normalized float images, labels) on the device; the copy
    is asynchronous from pinned memory and the normalization runs on the device."""
    x = common.normalize(images.to(device, non_blocking=True), dtype)
    if not channels_last:
        x = x.contiguous()
    return x, labels.to(device, non_blocking=True)


# ==============================================================================================
# One optimizer step, the learning-rate schedule, the EMA of the weights

GPU_FORWARD_IMAGES = 256   # per forward on one GPU at 224 px: ResNet-50 in bf16 fits in 40 GB


def default_micro_batch(per_device, resolution, cuda):
    """Images per forward when --micro-batch is not given: on a GPU the largest divisor of the
    per-device batch that is at most GPU_FORWARD_IMAGES at 224 px (scaled by pixels), gradients
    accumulated to the per-device batch, so the recipe stays the same on one GPU as on 16 (the
    ImageNet preset on one GPU ran one forward of 4,096 images); on the CPU the whole batch.

    >>> default_micro_batch(4096, 224, cuda=True), default_micro_batch(512, 112, cuda=True)
    (256, 512)
    """
    if not cuda:
        return per_device
    cap = max(1, int(GPU_FORWARD_IMAGES * (224 / resolution) ** 2))
    return max(d for d in range(1, min(cap, per_device) + 1) if per_device % d == 0)


def lr_factor(step, total_steps, warmup_steps):
    """Multiplier of the peak learning rate at `step` (0-based): linear warmup over warmup_steps
    ((step+1)/warmup), then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_step(model, criterion, opt, scaler, batches, amp_dtype=None, poison=False):
    """One optimizer step on a list of device micro-batches [(x, y), ...] whose gradients
    accumulate (DDP syncs only on the last one). Returns device tensors (loss summed over the
    images, correct top-1 count): nothing here waits for the device."""
    n = len(batches)
    loss_sum = correct = 0
    for j, (x, y) in enumerate(batches):
        no_sync = j < n - 1 and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            loss = criterion(logits.float(), y)  # every objective in float32
            if poison:
                loss = loss * float("nan")
            scaled = loss / n
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss_sum + loss.detach() * y.shape[0]
        correct = correct + (logits.detach().argmax(1) == y).sum()
    if scaler is not None:
        scaler.step(opt)  # fused SGD: the inf check stays on the device
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, correct


def ema_new(model):
    """A frozen copy of `model` that ema_update() moves towards the trained weights."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


def ema_update(ema, model, decay, step):
    """ema <- d * ema + (1 - d) * model for the parameters and the floating-point buffers (BN
    running mean and variance); integer buffers (BN's batch counter) are copied.
    d = min(decay, (1 + step) / (10 + step)), as TensorFlow's ExponentialMovingAverage with
    num_updates, so that early averages are not dominated by the initialization."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        dst, src = [], []
        for e, m in zip([*ema.parameters(), *ema.buffers()],
                        [*model.parameters(), *model.buffers()]):
            if e.is_floating_point():
                dst.append(e)
                src.append(m.detach())
            else:
                e.copy_(m)
        torch._foreach_lerp_(dst, src, 1.0 - d)


# ==============================================================================================
# Evaluation: every image exactly once across ranks

def evaluate(models, split, resolution, dist=Dist(), *, amp_dtype=None, batch_size=256,
             workers=0, criterion=None, channels_last=False, transform=None, loader=None):
    """Evaluate every model of {name: model} on `split` (eval transform, or `transform`: see
    common.eval_loader), each image exactly once across ranks (rank r takes images r, r+world,
    ...; no padding), counts summed over ranks. `loader`: a rank_loader() of the split to reuse
    (its workers persist), else one is built for this call.
    Returns {name: {top1, top5, mean_per_class, loss, count}}; loss is criterion's (or None).

    >>> data = common.load_dataset("digits")
    >>> model = common.build_model("softmax", 10, "resnet18", small_input=True)
    >>> evaluate({"m": model}, data["val"], 8)["m"]["count"]
    135
    """
    if loader is None:
        loader = rank_loader(split, resolution, dist, batch_size, workers, transform)
    K, device = int(split.label_map.max()) + 1, dist.device
    counts = {n: torch.zeros(3, K, dtype=torch.float64, device=device) for n in models}
    losses = {n: torch.zeros((), dtype=torch.float64, device=device) for n in models}
    was_training = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        for images, labels in common.loader_iter(loader):
            x, y = to_device(images, labels, device, channels_last)
            for name, m in models.items():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    z = m(x).float()
                counts[name] += common.class_counts(z, y, K)
                if criterion is not None:
                    losses[name] += criterion(z, y).double() * y.shape[0]
    out = {}
    for name, m in models.items():
        m.train(was_training[name])
        c = all_reduce(counts[name])
        count = int(c[0].sum().item())
        if count != len(split):
            raise AssertionError(f"evaluated {count} images of {len(split)}")
        loss = all_reduce(losses[name]).item() / count if criterion is not None else None
        out[name] = {**common.accuracy(c), "loss": loss, "count": count}
    return out


# ==============================================================================================
# What a checkpoint carries besides weights and optimizer: the RNGs and the training position

def rank_loader(split, resolution, dist=Dist(), batch_size=256, workers=0, transform=None):
    """The eval loader of this rank's share of a split (images rank, rank + world, ...). In-memory
    arrays load in the process itself: a worker process would cost more than it saves."""
    part = common.Split(split.source, split.indices[dist.rank::dist.world], split.label_map)
    if split.source.images is not None:
        workers = 0
    return common.eval_loader(part, resolution, batch_size=batch_size, workers=workers,
                              transform=transform)


def rng_states(device):
    """Every RNG this process uses, as tensors and Python numbers (torch.load weights_only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "gauss": float(gauss)},
          "python": [version, list(state), gauss_next]}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_states(st, device):
    torch.set_rng_state(st["torch"])
    k = st["numpy"]
    np.random.set_state(("MT19937", k["keys"].numpy().astype(np.uint32), k["pos"],
                         k["has_gauss"], k["gauss"]))
    version, state, gauss_next = st["python"]
    random.setstate((version, tuple(state), gauss_next))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def gather_rng_states(dist):
    """Every rank's RNG states, in rank order (all ranks call this)."""
    if dist.world == 1:
        return [rng_states(dist.device)]
    states = [None] * dist.world
    torch.distributed.all_gather_object(states, rng_states(dist.device))
    return states


@dataclasses.dataclass
class Progress:
    """The training loop's mutable state: where training is and what it has measured so far.
    last.pt stores it as `train_state`; a resumed run continues from it."""
    run_id: str                    # unique per run, kept across resumes, written into final.pt
    step: int = 0                  # optimizer steps done (global)
    epoch: int = 0                 # epochs finished
    images_in_epoch: int = 0       # images of the current epoch done (global)
    images: int = 0                # images trained on (global)
    train_seconds: float = 0.0     # wall time of training, evaluation and checkpoints
    step_seconds: float = 0.0      # wall time of the log intervals (for images/s)
    epoch_sums: list = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])
    history: list = dataclasses.field(default_factory=list)  # one summary.csv row per epoch
    saved_step: int = None         # step of the last last.pt written (None: none yet)

    def end_epoch(self):
        self.epoch, self.images_in_epoch, self.epoch_sums = self.epoch + 1, 0, [0.0, 0.0, 0.0]


def truncate_log(path, step):
    """Keep the log lines up to `step` (a resumed run redoes the steps after it)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, errors="replace") as f:  # a damaged file loses its bad lines, not the run
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                pass  # a line torn by a kill
    common.atomic_write(path, lambda f: f.write("".join(keep).encode()))


def append_log(path, record):
    """One line more in log.jsonl. A full disk is one line (common.write_error), and a log it
    left empty is removed (a torn last line is dropped by truncate_log on resume)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:
                os.remove(path)
        raise common.write_error(path, e) from None


# ==============================================================================================
# The training loop: train() prepares the run, opens its output folder, runs the steps

NO_BAD_STEP = 2 ** 62   # LoopState.bad before any non-finite loss


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The batch arithmetic and the learning-rate schedule: pure functions of the arguments, the
    size of the training set and the world size (plan())."""
    batch: int               # global batch
    per_device: int
    micro: int               # images per forward
    accum: int               # micro-batches per optimizer step
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_lr: float           # the peak learning rate, scaled to the global batch
    ema_decay: float         # None without EMA

    def lr(self, step):
        return self.base_lr * lr_factor(step, self.total_steps, self.warmup_steps)


@dataclasses.dataclass
class LoopState:
    """What the step loop of this process tracks between log steps: the device-side sums and the
    bad-step sentinel (read by the host at log steps only), the signal caught and the timers.
    Not saved in last.pt: each process starts it afresh (step_loop)."""
    sums: torch.Tensor       # loss, correct, images since the last log step (float64, device)
    bad: torch.Tensor        # the first step with a non-finite loss, or NO_BAD_STEP (device)
    signal: int = 0          # SIGTERM or SIGUSR1 caught (0: none)
    wait: float = 0.0        # seconds waiting for data since the last log step
    t_interval: float = 0.0  # time.perf_counter() at the start of this log interval
    t_run: float = 0.0       # ... when train_seconds was last brought up to date
    t_ckpt: float = 0.0      # ... when last.pt was last written (or training started)
    shown: tuple = None      # (time.perf_counter(), step, step_seconds) at the last progress
    #                          line, or where this process started training


@dataclasses.dataclass
class Run:
    """Everything train() builds once and its helpers below share; `progress` is what changes
    (and is saved), `loop` what this process tracks between log steps."""
    model: torch.nn.Module         # the raw model, unwrapped: what checkpoints hold
    ema: torch.nn.Module           # the EMA copy, or None
    opt: torch.optim.Optimizer
    scaler: object                 # GradScaler for fp16, else None
    criterion: object
    model_args: dict               # objective, hparams, arch, num_classes, small_input[, stem_pool]
    data: dict                     # common.load_dataset()'s dict (val and test may be None)
    args: argparse.Namespace       # resolved (resolve_args), never written
    dist: Dist
    schedule: Schedule
    autocast: torch.dtype          # of args.precision (amp_dtype); None: fp32
    loader: object                 # the training DataLoader and its EpochSampler
    sampler: EpochSampler
    progress: Progress
    resumed_with: dict = None      # arguments changed by --force-resume at this start
    net: torch.nn.Module = None    # the model as trained: DDP and torch.compile wrapped
    loop: LoopState = None
    hooks: dict = dataclasses.field(default_factory=lambda: read_test_hooks())  # tests only
    eval_loaders: dict = dataclasses.field(default_factory=dict)   # id(split) -> loader
    writer: object = dataclasses.field(default_factory=lambda: CheckpointWriter())  # last.pt

    @property
    def out_dir(self):
        return self.args.out

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def checkpoint(self, final=False, states=None, **extra):
        """The checkpoint dict of the current weights (common.make_checkpoint's format): raw and
        EMA weights; final=True: only the weights every analysis uses (the EMA's, or the raw
        ones without EMA), half the size. states: {'model', 'ema'} state dicts to store instead
        of the live modules' (a snapshot)."""
        if states is not None:
            model, ema = states["model"], states["ema"]
        else:
            model, ema = self.model, self.ema.state_dict() if self.ema is not None else None
        if final and self.ema is not None:
            model, ema, extra["weights"] = self.ema, None, "ema"
        return common.make_checkpoint(
            model, self.model_args, ema=ema, args=vars(self.args), dataset=self.data["spec"],
            classes=list(self.data["classes"]), run_id=self.progress.run_id, **extra)

    def evaluate(self, split):
        """{'ema': ..., 'raw': ...} (no 'ema' without EMA) on a split: top1, top5, loss, ..."""
        models = {"raw": self.model} if self.ema is None else {"ema": self.ema, "raw": self.model}
        broadcast_buffers(*models.values())
        loader = self.eval_loaders.get(id(split))
        if loader is None:   # built once: its workers persist from one epoch end to the next
            loader = self.eval_loaders[id(split)] = rank_loader(
                split, self.args.resolution, self.dist, self.args.eval_batch_size,
                self.args.workers)
        return evaluate(models, split, self.args.resolution, self.dist, amp_dtype=self.autocast,
                        criterion=self.criterion, channels_last=self.args.channels_last,
                        loader=loader)

    def step(self, batches_of_epoch):
        """One optimizer step on the next micro-batches; returns its lr. The loss sums, the
        bad-step sentinel and the EMA stay on the device: nothing here waits for it."""
        p, s, loop, step = self.progress, self.schedule, self.loop, self.progress.step
        if step == self.hooks["kill_at_step"]:
            self.writer.wait()   # so that a test knows which last.pt the kill leaves
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        batches = [to_device(*next(batches_of_epoch), self.dist.device, self.args.channels_last)
                   for _ in range(s.accum)]
        loop.wait += time.perf_counter() - t0
        lr = s.lr(step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss_sum, correct = train_step(self.net, self.criterion, self.opt, self.scaler, batches,
                                       self.autocast, poison=step == self.hooks["nan_at_step"])
        loop.bad = torch.where(torch.isfinite(loss_sum) | (loop.bad < NO_BAD_STEP), loop.bad, step)
        loop.sums[0] += loss_sum
        loop.sums[1] += correct
        loop.sums[2] += s.per_device  # a Python number: no host-to-device copy
        if self.ema is not None:
            ema_update(self.ema, self.model, s.ema_decay, step)
        p.step, p.images, p.images_in_epoch = step + 1, p.images + s.batch, \
            p.images_in_epoch + s.batch
        return lr

    def log_step(self, lr, epoch_end):
        """Every --log-every steps and at epoch ends, the only place the host waits for the
        device: the sums, the first non-finite step and the signal and checkpoint flags, reduced
        over ranks; a log.jsonl line, a progress line, the epoch end, last.pt, a signal's exit."""
        p, s, loop, args = self.progress, self.schedule, self.loop, self.args
        epoch = p.epoch + p.images_in_epoch / (s.steps_per_epoch * s.batch)
        sums = all_reduce(loop.sums.clone()).tolist()
        first_bad = int(all_reduce(loop.bad.clone(), "min"))
        due = args.ckpt_minutes <= 0 or time.perf_counter() - loop.t_ckpt >= args.ckpt_minutes * 60
        flags = all_reduce(torch.tensor([loop.signal, int(due)], device=self.dist.device), "max")
        signum, due = (int(v) for v in flags.tolist())
        dt = time.perf_counter() - loop.t_interval
        if first_bad < NO_BAD_STEP:
            self.writer.wait()
            raise nan_error(self, first_bad)
        p.step_seconds += dt
        p.train_seconds += time.perf_counter() - loop.t_run
        loop.t_run = time.perf_counter()
        p.epoch_sums = [a + b for a, b in zip(p.epoch_sums, sums)]
        if self.dist.is_main:
            append_log(self.path("log.jsonl"), {
                "step": p.step, "epoch": epoch, "loss": sums[0] / sums[2],
                "train_top1": sums[1] / sums[2], "lr": lr, "images_per_second": sums[2] / dt,
                "data_wait": loop.wait / dt, "time": time.time()})
        loop.sums.zero_()
        if self.dist.is_main and not epoch_end:   # the epoch's own line ends an epoch
            progress_line(self, lr, sums[0] / sums[2])
        if epoch_end:
            end_epoch(self, lr)
            self.net.train()
        if epoch_end or due or signum:
            save_last(self, background=not signum)
            loop.t_ckpt = time.perf_counter()
        if signum:
            if self.dist.is_main:
                print(f"signal {signum}: saved {self.out_dir}/last.pt at step {p.step}; rerun "
                      f"the same command to resume", flush=True)
            raise SystemExit(128 + signum)
        p.train_seconds += time.perf_counter() - loop.t_run  # evaluation and checkpoints
        loop.t_run = loop.t_interval = time.perf_counter()
        loop.wait = 0.0


def train(model, model_args, data, args, dist, results_extra=None):
    """Train `model` with SGD on data['train'], evaluate on data['val'] every epoch (raw and EMA
    weights) and on data['test'] at the end; resume from args.out/last.pt when it exists.

    model: built on the CPU, unwrapped; train() moves it, compiles it (args.compile) and wraps it
        in DDP (world > 1). model_args: {objective, hparams, arch, num_classes, small_input}, the
        arguments that rebuild it (common.build_model), which also give the loss and the
        weight-decay groups. data: load_dataset()'s dict (val or test may be None). args:
        add_training_args() flags resolved (resolve_args, device_defaults), plus out,
        resolution, augment, flip; read, never written.
    Writes args.out/{args.json, log.jsonl, summary.csv, last.pt, final.pt, results.json} (rank 0)
    and returns the results dict. SIGTERM / SIGUSR1 save last.pt and exit with 128 + signal;
    a non-finite loss raises UserError naming the step (last.pt stays the last good state)."""
    run = prepare_run(model, model_args, data, args, dist)
    with contextlib.ExitStack() as undo:  # closed on every way out: handlers, workers, the lock
        done = open_output(run, undo)
        if done is not None:
            return done   # finished before, read back
        step_loop(run, undo)
        return finish(run, results_extra)   # evaluation on test, final.pt and results.json


# --- prepare the run

def prepare_run(model, model_args, data, args, dist):
    """The Run of train(): threads and determinism, the schedule, the model on its device, the
    loss, optimizer, EMA and training loader (no workers started yet). Reads `args`, writes
    nothing (no files either)."""
    cuda = dist.device.type == "cuda"
    setup_torch(args, cuda)
    s = plan(args, len(data["train"]), dist.world, cuda)
    model.to(dist.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    objective, hparams = model_args["objective"], model_args["hparams"]
    groups = common.param_groups(model, objective, args.weight_decay, **hparams)
    opt = torch.optim.SGD(groups, lr=s.base_lr, momentum=args.momentum, nesterov=args.nesterov,
                          fused=True)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
    ema = ema_new(model) if s.ema_decay is not None else None
    criterion = common.make_criterion(objective, model_args["num_classes"], **hparams)
    transform = common.train_transform(args.resolution, args.augment, flip=args.flip)
    loader, sampler = train_loader(data["train"], transform, s.micro,
                                   s.steps_per_epoch * s.per_device, dist, args.seed, args.workers)
    return Run(model, ema, opt, scaler, criterion, model_args, data, args, dist, s,
               amp_dtype(args.precision, dist.device)[1], loader, sampler,
               Progress(run_id=common.new_run_id()))


def setup_torch(args, cuda):
    """Deterministic algorithms (--deterministic), cuDNN autotuning and TF32 on GPUs, and the
    CPU threads of the training step."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # bitwise on the CPU; on GPUs some kernels (adaptive average pooling's backward) have no
        # deterministic version, so there it is best effort with a warning
        torch.use_deterministic_algorithms(True, warn_only=cuda)
        torch.backends.cudnn.benchmark = False
    elif cuda:
        torch.backends.cudnn.benchmark = True
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return
    # on the CPU, oversubscribed cores make every small kernel wait on the slowest thread
    threads = args.threads or (
        None if "OMP_NUM_THREADS" in os.environ else
        max(1, common.cpu_cores() // common.local_world_size() - args.workers))
    if threads:
        torch.set_num_threads(threads)


def plan(args, train_images, world, cuda):
    """The Schedule of a run; a one-line error where the batch sizes do not fit."""
    B = args.batch_size
    if B % world:
        raise common.UserError(f"--batch-size {B} (global) does not divide by the world size "
                               f"{world}")
    per_device = B // world
    micro = args.micro_batch or default_micro_batch(per_device, args.resolution, cuda)
    if per_device % micro:
        raise common.UserError(f"--micro-batch {micro} does not divide the per-device batch "
                               f"{per_device}")
    steps_per_epoch = (train_images // world) // per_device
    if steps_per_epoch == 0:
        raise common.UserError(f"--batch-size {B} is larger than the training set "
                               f"({train_images} images); use a smaller --batch-size")
    total_steps = steps_per_epoch * args.epochs
    if args.steps:  # a step budget: the schedule ends there, the last epoch is cut
        total_steps = min(total_steps, args.steps)
    ema = args.ema_epochs and args.ema_epochs > 0
    return Schedule(B, per_device, micro, per_device // micro, steps_per_epoch, total_steps,
                    round(args.warmup_epochs * steps_per_epoch), args.lr * B / 256,
                    1.0 - 1.0 / max(1.0, args.ema_epochs * steps_per_epoch) if ema else None)


def read_test_hooks():
    """{'nan_at_step': i, 'kill_at_step': i} from $KORNBLITH_TEST_HOOKS (-1: off), the tests'
    only way in: 'nan_at_step=7' makes the loss of step index 7 nan (the nan/inf stop),
    'kill_at_step=5' SIGKILLs the process before step index 5, once its last.pt is on disk."""
    hooks = {"nan_at_step": -1, "kill_at_step": -1}
    for item in filter(None, os.environ.get("KORNBLITH_TEST_HOOKS", "").split(",")):
        key, _, value = item.partition("=")
        if key not in hooks or not value.lstrip("-").isdigit():
            raise common.UserError(f"KORNBLITH_TEST_HOOKS: bad {item!r}; valid: nan_at_step=N, "
                                   f"kill_at_step=N")
        hooks[key] = int(value)
    return hooks


# --- open the output folder: the lock, a finished run read back, a resume, args.json

def open_output(run, undo):
    """Hold args.out for this run (its lock, on rank 0, released by `undo`) and read back a
    finished run (its results), or resume from last.pt or start afresh (None), then write
    args.json."""
    is_main = run.dist.is_main
    if is_main:
        undo.enter_context(common.locked(run.out_dir))
    log_path = run.path("log.jsonl")
    state = shared_decision(run)
    if state == "finished":
        final = common.load_checkpoint(run.path("final.pt"), arch=run.model_args["arch"],
                                       num_classes=run.model_args["num_classes"])
        return read_back(run.out_dir, changed_arguments(final, run.args, run.model_args),
                         run.dist, TRAIN_READ_BACK_ADVICE)
    check_shared_memory(run.args.workers, run.schedule.micro, run.args.resolution)
    if state == "resume":
        resume(run, run.path("last.pt"))
        if is_main:
            truncate_log(log_path, run.progress.step)
            append_log(log_path, {"event": "resume", "step": run.progress.step,
                                  "time": time.time()})
    elif is_main:
        if os.path.exists(run.path("results.json")):
            print(f"note: {run.out_dir} has results.json but no last.pt; training again from "
                  f"scratch")
        truncate_log(log_path, 0)  # a fresh start: lines of a run killed before last.pt go
    if is_main:
        write_args_json(run)
    return None


def finished(folder, need_model=True):
    """Whether `folder` holds a finished run: the one rule of training and fine-tuning. It has
    results.json and no resume state (last.pt), and final.pt unless not `need_model` (a
    fine-tuning grid point keeps only its scores)."""
    def has(name):
        return os.path.exists(os.path.join(folder, name))
    return has("results.json") and not has("last.pt") and (has("final.pt") or not need_model)


TRAIN_READ_BACK_ADVICE = (" and no resume state (last.pt is kept only with --keep-resume-state, "
                          "which --force-resume needs to extend a run): rerun with the original "
                          "ones or use another --out")


def read_back(folder, changed, dist, advice, prefix=""):
    """The results.json of the finished run in `folder` (finished()), when `changed` (the
    arguments that differ from it: {name: (then, now)}) is empty; else a UserError naming them,
    then `advice`."""
    if changed:
        text = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise common.UserError(f"{folder} holds a finished run with other arguments ({text})"
                               f"{advice}")
    results = common.read_json(os.path.join(folder, "results.json"))
    if dist.is_main:
        top1 = results.get("top1")
        score = f" (test top1 {common.pct(top1)})" if top1 is not None else ""
        print(f"{prefix}{folder}: already finished{score}, read back", flush=True)
    return results


def changed_arguments(ck, args, model_args):
    """{name: (in the checkpoint, now)} for every argument that can change the result and differs
    from what the checkpoint was trained with (all but NOT_COMPARED_ON_RESUME), the objective and
    its hyperparameters included."""
    saved = ck.get("args") or {}
    changed = {k: (saved[k], getattr(args, k)) for k in sorted(saved)
               if k not in NOT_COMPARED_ON_RESUME and hasattr(args, k)
               and saved[k] != getattr(args, k)}
    if ck["objective"] != model_args["objective"] or ck["hparams"] != dict(model_args["hparams"]):
        changed["objective"] = (f"{ck['objective']} {ck['hparams']}",
                                f"{model_args['objective']} {dict(model_args['hparams'])}")
    return changed


def shared_decision(run):
    """'finished', 'resume' or 'start': rank 0 decides from what its --out holds, and every rank
    follows. A rank that cannot see the last.pt rank 0 resumes from (a multi-node run whose
    --out is each node's local disk) stops them all with one line, instead of starting from
    scratch while the others resume."""
    last = run.path("last.pt")
    state = 2 if finished(os.path.dirname(last)) else 1 if os.path.exists(last) else 0
    if run.dist.world > 1:
        flags = torch.tensor([state, 0], device=run.dist.device)
        torch.distributed.broadcast(flags, 0)
        state = int(flags[0])
        flags[1] = int(state == 1 and not os.path.exists(last))
        if int(all_reduce(flags, "max")[1]):
            raise common.UserError(
                f"rank 0 resumes from {last}, which some ranks cannot see: --out must be on "
                f"storage that every node shares")
    return ("start", "resume", "finished")[state]


def resume(run, path):
    """Load last.pt into the run (weights, EMA, optimizer, scaler, progress, RNGs); refuse
    arguments that changed what the run computes unless --force-resume."""
    args, m, p = run.args, run.model_args, run.progress
    ck = common.load_checkpoint(path, arch=m["arch"], num_classes=m["num_classes"],
                                advice="move it away to start the run afresh, or use another "
                                       "--out")
    if "train_state" not in ck:
        raise common.UserError(f"{path} holds no training state (not written by train()); move "
                               f"it away or use another --out")
    changed = changed_arguments(ck, args, m)
    if changed:
        text = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        if set(changed) & NEVER_CHANGED_ON_RESUME:
            raise common.UserError(f"{path} was trained with other arguments ({text}): the "
                                   f"weights do not fit; rerun with the original ones or use "
                                   f"another --out")
        if not args.force_resume:
            raise common.UserError(f"{path} was trained with other arguments ({text}): rerun "
                                   f"with the original ones, add --force-resume, or use "
                                   f"another --out")
    run.resumed_with = {k: b for k, (a, b) in changed.items()}
    run.model.load_state_dict(ck["model"])
    if run.ema is not None:
        if ck.get("ema") is None:
            raise common.UserError(f"{path} has no EMA weights but --ema-epochs > 0; use "
                                   f"--ema-epochs 0 or another --out")
        run.ema.load_state_dict(ck["ema"])
    run.opt.load_state_dict(ck["optimizer"])
    match_layouts(run.opt)
    if run.scaler is not None and ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    ts = ck["train_state"]
    names = {f.name for f in dataclasses.fields(Progress)}
    p = run.progress = Progress(**{**dataclasses.asdict(p),
                                   **{k: v for k, v in ts.items() if k in names}})
    p.run_id = ck.get("run_id") or ts.get("run_id") or p.run_id  # older last.pt: a new id
    p.saved_step = ts["step"]
    B, steps_per_epoch = args.batch_size, run.schedule.steps_per_epoch
    if (ck.get("args") or {}).get("batch_size") != B:  # only forced: restart in the epoch
        p.images_in_epoch -= p.images_in_epoch % B
    if p.images_in_epoch >= steps_per_epoch * B:
        p.epoch, p.images_in_epoch = p.epoch + 1, 0
    p.step = p.epoch * steps_per_epoch + p.images_in_epoch // B
    rngs = ck.get("rng") or []
    if len(rngs) == run.dist.world:
        set_rng_states(rngs[run.dist.rank], run.dist.device)
    elif run.dist.is_main:
        print(f"note: {path} was written by {len(rngs)} processes, now {run.dist.world}: RNG "
              f"streams restart from the seed")


def match_layouts(opt):
    """Give every loaded optimizer state tensor its parameter's memory layout. last.pt keeps the
    layout of the run that wrote it, and a resume may flip --channels-last: fused SGD with a
    momentum buffer in another layout than its parameter computed wrong updates (max weight
    difference 0.055 after one step; test_train.py)."""
    for group in opt.param_groups:
        for param in group["params"]:
            state = opt.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and \
                        value.stride() != param.stride():
                    state[key] = torch.empty_like(param).copy_(value)


def write_args_json(run):
    """args.json: the arguments the run uses, what each --force-resume changed (so the file
    never misstates a run), and the numbers derived from them; then the run's first line."""
    p, s, args, data = run.progress, run.schedule, run.args, run.data
    history = []
    if os.path.exists(run.path("args.json")) and p.step:
        history = common.read_json(run.path("args.json")).get("forced_changes", [])
    if run.resumed_with:
        history.append({"step": p.step, "changed": run.resumed_with})
    train, val, test = (len(data[k]) if data.get(k) is not None else None
                        for k in ("train", "val", "test"))
    common.save_json(run.path("args.json"), {
        **vars(args), "forced_changes": history, "world_size": run.dist.world,
        "per_device_batch": s.per_device, "micro_batch": s.micro, "accumulation": s.accum,
        "steps_per_epoch": s.steps_per_epoch, "total_steps": s.total_steps,
        "scaled_lr": s.base_lr, "train_images": train, "val_images": val, "test_images": test})
    why = "" if s.accum == 1 or args.micro_batch else (
        f": at most {GPU_FORWARD_IMAGES} images of 224 px per forward on a GPU, same recipe")
    cpu = "" if run.dist.device.type == "cuda" else f", {torch.get_num_threads()} threads"
    print(f"train: {run.model_args['objective']} {run.model_args['arch']} on {data['spec']} | "
          f"world {run.dist.world}, batch {s.per_device}/device x {run.dist.world} = {s.batch} "
          f"global (micro {s.micro}, accum {s.accum}{why}) | lr {args.lr}/256 -> "
          f"{s.base_lr:.4g}, warmup {s.warmup_steps} of {s.total_steps} steps "
          f"({s.steps_per_epoch}/epoch, {args.epochs} epochs) | {args.precision}, compile "
          f"{args.compile}, channels_last {args.channels_last}, workers {args.workers} "
          f"({args.workers_from}){cpu} | train {train} / val {'-' if val is None else val} / test "
          f"{'-' if test is None else test} "
          f"images, {run.model_args['num_classes']} classes, {args.resolution}px | device "
          f"{run.dist.device}" + (f" | resumed at step {p.step}" if p.step else ""), flush=True)


# --- the step loop

def step_loop(run, undo):
    """The optimizer steps from run.progress to the end of the schedule. The host reads device
    values only at log steps (run.log_step: every --log-every steps and at epoch ends)."""
    undo.callback(stop_workers, run.loader)
    undo.callback(lambda: [stop_workers(l) for l in run.eval_loaders.values()])
    undo.callback(run.writer.close)
    # the model as trained: DDP, then compile, as PyTorch's docs do, so that compiled graphs
    # break at DDP's buckets and gradient all-reduces overlap the backward (compiling inside
    # DDP started every all-reduce only after the whole backward)
    run.net = run.model
    if run.dist.world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(
            run.net, device_ids=[run.dist.device.index] if run.dist.device.type == "cuda"
            else None, gradient_as_bucket_view=True)
    if run.args.compile:
        run.net = torch.compile(run.net)
    p, s, now = run.progress, run.schedule, time.perf_counter()
    run.loop = LoopState(torch.zeros(3, dtype=torch.float64, device=run.dist.device),
                         torch.full((), NO_BAD_STEP, dtype=torch.int64, device=run.dist.device),
                         t_interval=now, t_run=now, t_ckpt=now,
                         shown=(now, p.step, p.step_seconds))   # progress lines measure from here

    def on_signal(signum, _frame):
        run.loop.signal = signum
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        undo.callback(signal.signal, signum, signal.signal(signum, on_signal))
    run.net.train()
    while p.step < s.total_steps:
        first = p.images_in_epoch // s.batch
        run.sampler.set_epoch(p.epoch, first * s.per_device)
        batches_of_epoch = common.loader_iter(run.loader)
        for b in range(first, s.steps_per_epoch):
            lr = run.step(batches_of_epoch)
            epoch_end = b == s.steps_per_epoch - 1 or p.step == s.total_steps
            if epoch_end or p.step % run.args.log_every == 0:
                run.log_step(lr, epoch_end)
            if p.step >= s.total_steps:
                break


# --- checkpoints, epoch ends and the end of training

def snapshot(obj):
    """A copy of a (nested) state dict with every tensor copied to the CPU, detached from the
    live training state: what a background write may take its time over."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class CheckpointWriter:
    """Writes last.pt in a background thread from a snapshot, so that training goes on while
    rank 0 hashes, serializes and fsyncs it (a 307 MB ResNet-50 last.pt held every rank at a
    barrier at each epoch end). One write at a time; a failed write (a full disk) raises its
    one-line error at the next save or at the end of training; the previous last.pt stays
    intact (common.atomic_write)."""

    def __init__(self):
        self.done, self.error = None, None   # done: the Event of the write in flight

    def start(self, write):
        self.wait()
        done = threading.Event()

        def job():
            try:
                write()
            except BaseException as e:   # raised in the main thread by wait()
                self.error = e
            finally:
                done.set()
        self.done = done
        threading.Thread(target=job, name="write last.pt").start()

    def wait(self):
        """Block until the write in flight (if any) is on disk; raise its error."""
        if self.done is not None:
            # an Event, not Thread.join(): a Ctrl-C inside Python 3.11's join() marks the
            # still-running thread as finished (CPython gh-90882), so the interpreter exited
            # under the write and torch.save aborted the process (SIGABRT, 6 of 48 Ctrl-Cs)
            self.done.wait()
            self.done = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self):
        """wait() on the way out of training, whatever raised: the error of a write is
        printed, not raised over the exception that is ending the run. A Ctrl-C is raised:
        it stops the run (the write goes on; the interpreter waits for its thread at exit)."""
        try:
            self.wait()
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            print(f"note: the last background write of last.pt failed: {common.user_message(e)}",
                  file=sys.stderr, flush=True)


def save_last(run, background=False):
    """Write last.pt (rank 0) with everything a bitwise resume needs; background=True: from a
    snapshot, in run.writer's thread, while training goes on (other ranks never wait for it)."""
    broadcast_buffers(run.model, *([run.ema] if run.ema is not None else []))
    rngs = gather_rng_states(run.dist)
    p = run.progress
    if run.dist.is_main:
        run.writer.wait()
        state = {k: v for k, v in dataclasses.asdict(p).items() if k != "saved_step"}
        parts = snapshot({"model": run.model.state_dict(),
                          "ema": run.ema.state_dict() if run.ema is not None else None,
                          "optimizer": run.opt.state_dict(),
                          "scaler": run.scaler.state_dict() if run.scaler else None})
        step = p.step

        def write():
            common.save_checkpoint(run.path("last.pt"), run.checkpoint(
                states=parts, optimizer=parts["optimizer"], scaler=parts["scaler"],
                train_state=state, rng=rngs, world_size=run.dist.world))
            p.saved_step = step
        if background:
            run.writer.start(write)
        else:
            write()
    else:
        p.saved_step = p.step
    if not background and run.dist.world > 1:   # a save before exiting: every rank waits
        torch.distributed.barrier()


SCORES = ("top1", "top5", "mean_per_class", "loss")   # of evaluate(), per epoch in summary.csv


def end_epoch(run, lr):
    """Evaluate raw and EMA weights on val (when there is one), add a row to summary.csv."""
    p, val = run.progress, run.data.get("val")
    m = run.evaluate(val) if val else None
    if m is None:  # training on train+val (finetune.py's final run): nothing to score per epoch
        m = {"raw": dict.fromkeys(("top1", "top5", "mean_per_class", "loss", "count"))}
    loss_sum, correct, n = p.epoch_sums
    p.end_epoch()
    shown = m["ema"] if "ema" in m else m["raw"]
    row = {"epoch": p.epoch, "step": p.step, "lr": lr, "train_loss": loss_sum / n,
           "train_top1": correct / n, **{f"val_{k}": shown[k] for k in SCORES},
           **{f"val_{k}_raw": m["raw"][k] for k in SCORES}, "val_count": shown["count"],
           "train_seconds": p.train_seconds,
           "images_per_second": p.images / max(p.step_seconds, 1e-9)}
    p.history.append(row)
    if run.dist.is_main:
        common.write_csv(run.path("summary.csv"), p.history)
        pct = common.pct
        val = (f"val top1 {pct(row['val_top1'])} (raw {pct(row['val_top1_raw'])}) top5 "
               f"{pct(row['val_top5'])}" if row["val_top1"] is not None else "no val split")
        print(f"epoch {row['epoch']}/{run.args.epochs}: train loss {row['train_loss']:.4f} top1 "
              f"{pct(row['train_top1'])} | {val} | {row['images_per_second']:.0f} img/s",
              flush=True)
        every = getattr(run.args, "snapshot_every", 0)
        if every and p.epoch % every == 0:
            common.save_checkpoint(run.path(os.path.join("snapshots", f"epoch{p.epoch:03d}.pt")),
                                   run.checkpoint(epoch=p.epoch, step=p.step))


def progress_line(run, lr, loss):
    """At a log step within an epoch, at most every --progress-seconds: one line with the step
    in the epoch, img/s, loss and lr, and the ETA of the epoch and of the run. The rate is that
    of the steps since the last line (log intervals only: evaluation and checkpoint writes do not
    slow it); the run's ETA adds the epoch ends still to come at the mean cost of those done
    (evaluation, last.pt). Only host numbers: no device read beyond the log step's own."""
    p, args, now = run.progress, run.args, time.perf_counter()
    steps_per_epoch, total_steps = run.schedule.steps_per_epoch, run.schedule.total_steps
    t, step, seconds = run.loop.shown
    if now - t < args.progress_seconds or p.step <= step:
        return
    run.loop.shown = (now, p.step, p.step_seconds)
    per_step = (p.step_seconds - seconds) / (p.step - step)
    B = args.batch_size
    in_epoch = p.images_in_epoch // B
    epoch_steps = min(steps_per_epoch, total_steps - p.epoch * steps_per_epoch)
    epochs = math.ceil(total_steps / steps_per_epoch)
    epoch_end_cost = (p.train_seconds - p.step_seconds) / p.epoch if p.epoch else 0.0
    eta_epoch = (epoch_steps - in_epoch) * per_step
    eta_run = (total_steps - p.step) * per_step + (epochs - p.epoch) * max(epoch_end_cost, 0.0)
    mean = p.epoch_sums[0] / p.epoch_sums[2] if p.epoch_sums[2] else math.nan
    print(f"epoch {p.epoch + 1}/{epochs} step {in_epoch}/{epoch_steps} "
          f"({100 * in_epoch / epoch_steps:.0f}%) | {B / max(per_step, 1e-9):.0f} img/s | loss "
          f"{loss:.4f} (epoch {mean:.4f}) | lr {lr:.4g} | eta epoch "
          f"{common.duration(eta_epoch)}, run {common.duration(eta_run)}", flush=True)


def nan_error(run, step):
    """The UserError for a non-finite loss at `step`, saying what last.pt still holds."""
    last, p, epoch = run.path("last.pt"), run.progress, step // run.schedule.steps_per_epoch + 1
    lower = "a lower --lr"
    s = run.model_args["hparams"].get("loss_scale") if \
        run.model_args["objective"] == "squared_error" else None
    if s and s * run.args.lr > SQUARED_ERROR_STEP:   # a value, from the small-data measurements
        lower = (f"--lr {SQUARED_ERROR_STEP / s:.3g} (squared_error trained on digits and CIFAR-10 "
                 f"at loss scale x lr = {SQUARED_ERROR_STEP:g} per 256; or, in a new --out, "
                 f"--loss-scale {SQUARED_ERROR_STEP / run.args.lr:.3g})")
    lower += " (or --precision fp32)" if run.autocast is not None else ""
    kept = (f"{last} (step {p.saved_step}) is intact: rerun with {lower} and --force-resume to "
            f"continue from it, or use a new --out" if p.saved_step is not None else
            f"no checkpoint had been written yet: rerun with {lower}")
    return common.UserError(f"the loss became nan/inf at step {step + 1} (epoch {epoch}); "
                            f"training stopped. {kept}")


def finish(run, results_extra):
    """Test-set evaluation of the final raw and EMA weights; final.pt and results.json."""
    p, test = run.progress, run.data.get("test")
    run.writer.wait()          # the last epoch end's last.pt, before final.pt replaces it
    t = run.evaluate(test) if test is not None else None
    last = p.history[-1] if p.history else {}
    shown = (t["ema"] if "ema" in t else t["raw"]) if t else {}
    raw = t["raw"] if t else {}
    args = run.args
    accuracies = SCORES[:3]
    results = {**{k: shown.get(k) for k in accuracies}, "test_loss": shown.get("loss"),
               **{f"{k}_raw": raw.get(k) for k in accuracies}, "test_count": shown.get("count"),
               **{k: last.get(k) for k in ("val_top1", "val_top5", "val_mean_per_class",
                                           "val_top1_raw", "val_top5_raw", "val_count")},
               "metric": run.data["metric"], "weights": "ema" if run.ema is not None else "raw",
               "splits": "top1/top5/mean_per_class[_raw]: test split; val_*: val split, last epoch",
               "epochs": args.epochs, "steps": p.step, "batch_size": args.batch_size,
               "lr": args.lr, "world_size": run.dist.world, "precision": args.precision,
               "compile": args.compile, "train_seconds": p.train_seconds,
               "images_per_second": p.images / max(p.step_seconds, 1e-9),
               "num_classes": run.data["num_classes"], "train_images": len(run.data["train"]),
               "versions": common.versions()}
    results.update(results_extra or {})
    if run.dist.is_main:
        final = run.checkpoint(final=True, results=results)
        common.save_checkpoint(run.path("final.pt"), final)
        # the identity block first, of final.pt itself (so written after it: its hash)
        network = common.network_identity(run.path("final.pt"), final)
        kind = results.pop("kind", "train")
        results = {**common.result_header(network, run.data, kind), **results}
        common.save_json(run.path("results.json"), results)
        if not args.keep_resume_state and os.path.exists(run.path("last.pt")):
            os.remove(run.path("last.pt"))  # 3x final.pt; --keep-resume-state to extend later
        print(f"done: test top1 {common.pct(results['top1'])} (raw "
              f"{common.pct(results['top1_raw'])}), top5 {common.pct(results['top5'])} | "
              f"{results['train_seconds']:.1f} s, {results['images_per_second']:.0f} img/s -> "
              f"{run.out_dir}", flush=True)
    return results


# ==============================================================================================
# Evaluating a checkpoint (--evaluate) and main

def evaluate_checkpoint(args, dist, overwrite=False):
    """Score the checkpoint args.evaluate on the test split of args.data, every image once
    across ranks; rank 0 writes args.out/results.json (identity block, then top1, top5, ...).
    Another kind of result in args.out, or the evaluation of another checkpoint, dataset,
    resolution or preprocessing, is refused unless `overwrite` (common.claim_folder,
    common.refuse_replacing).

    >>> r = evaluate_checkpoint(parse_args(["--evaluate", "runs/s0/final.pt", "--data",
    ...     "digits@0-4", "--out", "runs/eval_s0"]), Dist())   # doctest: +SKIP
    """
    with common.claimed(args.out, "evaluate", overwrite) if dist.is_main else \
            contextlib.nullcontext():
        return _evaluate_checkpoint(device_defaults(args, dist.device), dist, overwrite)


def _evaluate_checkpoint(args, dist, overwrite):
    model, network = common.load_pretrained(args.evaluate)
    data = common.load_dataset(args.data, download=args.download)
    outputs = getattr(getattr(model, "fc", None), "out_features", None)
    if outputs != data["num_classes"]:
        raise common.UserError(f"{args.evaluate} has {outputs} outputs but {args.data} has "
                               f"{data['num_classes']} classes; evaluate on the data it was "
                               f"trained on (an imported model: import without --keep-background)")
    if data.get("test") is None:
        raise common.UserError(f"{args.data} has no test split to evaluate on")
    trained_on = network.get("dataset_name")
    if trained_on and same_classes(trained_on) != same_classes(data["name"]):
        print(f"note: {args.evaluate} was trained on {trained_on}, and {data['name']} has other "
              f"classes (as many: {outputs}): its outputs are scored as their labels by index, "
              f"which says nothing of the network; evaluate on its training data",
              file=sys.stderr)
    saved = os.path.join(args.out, "results.json")
    resolution = common.input_resolution(args.resolution, network)
    if dist.is_main:  # two checkpoints into one --out left only the second's result
        common.refuse_replacing(saved, {"network": network, "dataset": data["spec"],
                                        "resolution": resolution,
                                        "preprocessing": args.eval_preprocessing},
                                ("resolution", "preprocessing"), overwrite, "the evaluation")
    model.to(dist.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    transform = None
    if args.eval_preprocessing == "tf":
        from import_tf_checkpoint import tf_eval_transform
        transform = tf_eval_transform(resolution)
    t0 = time.perf_counter()
    m = evaluate({"m": model}, data["test"], resolution, dist,
                 amp_dtype=amp_dtype(args.precision, dist.device)[1],
                 batch_size=args.eval_batch_size, workers=args.workers,
                 channels_last=args.channels_last, transform=transform)["m"]
    results = {**common.result_header(network, data, "evaluate"),
               "top1": m["top1"], "top5": m["top5"], "mean_per_class": m["mean_per_class"],
               "metric": data["metric"], "count": m["count"], "resolution": resolution,
               "preprocessing": args.eval_preprocessing, "split": "test",
               "precision": args.precision, "world_size": dist.world,
               "seconds": time.perf_counter() - t0, "versions": common.versions()}
    if dist.is_main:
        common.save_json(saved, results)
        print(f"evaluate: {network['checkpoint']} on {data['spec']} (test, "
              f"{m['count']} images, {resolution} px, {args.eval_preprocessing} "
              f"preprocessing): top1 {common.pct(m['top1'])} top5 {common.pct(m['top5'])} "
              f"mean per class {common.pct(m['mean_per_class'])} -> {saved}", flush=True)
    return results


def same_classes(label):
    """A dataset label without its per_class= and from= options, which choose images, not
    classes: 'cifar10@0-4,per_class_500' -> 'cifar10@0-4'."""
    base, _, subset = label.partition("@")
    kept = [part for part in subset.split(",") if part and
            not part.startswith(("per_class_", "from_"))]
    return base + ("@" + ",".join(kept) if kept else "")


def main(argv=None):
    """Parse argv (default: sys.argv) and train (or --evaluate); returns the results dict."""
    args = parse_args(argv)
    # not a run argument: kept out of args.json, the checkpoints and the resume comparison
    overwrite = vars(args).pop("overwrite")
    dist = setup_distributed(args.device)
    try:
        if args.evaluate:
            return evaluate_checkpoint(args, dist, overwrite)
        # one kind of result per folder: before the data's scan, so a wrong --out fails at once
        with common.claimed(args.out, "train", overwrite) if dist.is_main else \
                contextlib.nullcontext():
            data = common.load_dataset(args.data, download=args.download)
            args = resolve_args(args, data["image_size"], dist.device)
            hp = common.objective_hparams(args.objective, **objective_overrides(args))
            torch.manual_seed(args.seed)
            model = common.build_model(args.objective, data["num_classes"], args.arch,
                                       args.small_input, **hp)
            model_args = {"objective": args.objective, "hparams": hp, "arch": args.arch,
                          "num_classes": data["num_classes"], "small_input": args.small_input}
            return train(model, model_args, data, args, dist)
    except common.UserError:
        if not dist.is_main:
            sys.exit(2)  # rank 0 prints the message
        raise
    finally:
        teardown_distributed()


if __name__ == "__main__":
    common.run_main(main)
