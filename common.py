"""Shared pieces of the study: the nine objectives, the ResNet, the datasets, features, checkpoints.

Every script imports this file; scripts talk to each other only through checkpoint files and
.npz/.json outputs. Definitions follow ../SPEC.md (Kornblith et al., NeurIPS 2021).

    import common
    crit = common.make_criterion("logit_normalization", num_classes=1000, tau=0.05)
    model = common.build_model("cosine_softmax", 1000, arch="resnet50")
    data = common.load_dataset("digits@0-4")        # {'train','val','test', 'num_classes', ...}
    feats = common.extract_features(model, loader, ["block16", "pool"])
    model, network = common.load_pretrained("runs/softmax_s0/final.pt")   # network: identity
"""
import argparse
import contextlib
import csv
import errno
import fcntl
import glob
import hashlib
import io
import json
import math
import os
import platform
import re
import signal
import struct
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2 as T


class UserError(ValueError):
    """Bad input from the user: scripts print the message on one line and exit with status 2."""


def run_main(main):
    """Run a script's main(): a UserError becomes one line `error: ...` and exit status 2, Ctrl-C
    one line and status 130 (every file this project writes is then complete or untouched)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler and \
            threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the scripts' startup one
    try:
        main()
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except (OSError, RuntimeError, EOFError) as e:
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:  # one no code path saw coming
            print(f"error: {write_error(e.filename or 'a file', e)}", file=sys.stderr)
            sys.exit(2)
        if not worker_died(e):
            raise
        why = str(e).strip().rstrip(".") or type(e).__name__   # an EOFError has no words
        print(f"error: a data-loading worker process died ({why}), "
              f"perhaps killed for lack of memory; rerun the same command to resume, with fewer "
              f"--workers if it recurs", file=sys.stderr)
        sys.exit(2)


def worker_died(e):
    """Whether `e` says a DataLoader worker died (OOM killer, kill -9): torch's own RuntimeError
    ("DataLoader worker (pid N) is killed by signal"), or, when the worker dies while it hands a
    batch's shared memory over, the broken connection (ConnectionResetError, EOFError) raised
    inside the DataLoader's receive (seen when a worker was killed mid-epoch under load)."""
    if isinstance(e, RuntimeError):
        return str(e).startswith("DataLoader worker (pid")
    if not isinstance(e, (ConnectionError, EOFError)):
        return False
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("utils", "data", "dataloader.py")):
            return True
        tb = tb.tb_next
    return False


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def user_message(e):
    """A UserError's one line. One raised in a DataLoader worker (a corrupt image) reaches the
    main process with the worker's whole traceback as its text (torch's ExceptionWrapper); the
    worker's own message is the traceback's last line, after the exception's name."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


# ----------------------------------------------------------------------------------------------
# Objectives (SPEC.md, "The nine objectives")

OBJECTIVES = {
    "softmax": {},
    "label_smoothing": {"alpha": 0.1},
    "sigmoid": {},
    "extra_final_layer_l2": {"lambda_": 8e-4},
    "dropout": {"dropout": 0.3},
    "logit_penalty": {"beta": 6e-4},
    "logit_normalization": {"tau": 0.04},
    "cosine_softmax": {"tau": 0.05, "normalize_features": True},
    "squared_error": {"kappa": 9.0, "m": 60.0, "loss_scale": 10.0},
}
# Where each hyperparameter makes sense: (low, high, what), both ends exclusive unless named in
# `what`. Outside, the objective is not the paper's (alpha 2 or tau -0.05 trained to chance).
HPARAM_RANGES = {
    "alpha": (0.0, 1.0, "in [0, 1)"), "lambda_": (0.0, math.inf, ">= 0"),
    "dropout": (0.0, 1.0, "in [0, 1)"), "beta": (0.0, math.inf, ">= 0"),
    "tau": (0.0, math.inf, "> 0"), "kappa": (0.0, math.inf, "> 0"),
    "m": (-math.inf, math.inf, "finite"), "loss_scale": (0.0, math.inf, "> 0"),
}


def _in_range(key, value):
    low, high, what = HPARAM_RANGES[key]
    if not math.isfinite(value):
        return False
    closed_low = what.startswith(">=") or what.startswith("in [")
    return (value >= low if closed_low else value > low) and value < high


def objective_hparams(objective, **overrides):
    """The objective's hyperparameters with overrides applied; unknown names raise ValueError.

    Overrides set to None are ignored, so argparse defaults of None can be passed straight in."""
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    hp = dict(OBJECTIVES[objective])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in hp:
            valid = ", ".join(hp) or "none"
            raise UserError(f"objective {objective!r} has no hyperparameter {key!r}; valid: {valid}")
        hp[key] = type(hp[key])(value)
        if key in HPARAM_RANGES and not _in_range(key, hp[key]):
            raise UserError(f"{objective}: {key.rstrip('_')} must be {HPARAM_RANGES[key][2]} "
                            f"(got {value})")
    return hp


def make_criterion(objective, num_classes, **overrides):
    """Return loss(logits, targets) -> 0-dim tensor, the batch mean of the objective's loss.

    `logits` is the head output (for cosine_softmax the cosine plus bias, before 1/tau).
    extra_final_layer_l2 and dropout are plain cross-entropy here: their extra terms live in
    param_groups() and in the model."""
    hp = objective_hparams(objective, **overrides)
    K = int(num_classes)

    def onehot(targets, like):
        return F.one_hot(targets, K).to(like.dtype)

    if objective in ("softmax", "extra_final_layer_l2", "dropout"):
        return lambda z, y: F.cross_entropy(z, y)
    if objective == "label_smoothing":
        a = hp["alpha"]

        def loss(z, y):
            t = (1 - a) * onehot(y, z) + a / K
            return -(t * F.log_softmax(z, dim=1)).sum(1).mean() / (1 - a)
        return loss
    if objective == "sigmoid":
        offset = math.log(K)

        def loss(z, y):
            bce = F.binary_cross_entropy_with_logits(z - offset, onehot(y, z), reduction="none")
            return bce.sum(1).mean()
        return loss
    if objective == "logit_penalty":
        beta = hp["beta"]
        return lambda z, y: F.cross_entropy(z, y) + beta / 2 * z.pow(2).sum(1).mean()
    if objective == "logit_normalization":
        tau = hp["tau"]

        def loss(z, y):
            norm = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return F.cross_entropy(z / (tau * norm), y)
        return loss
    if objective == "cosine_softmax":
        tau = hp["tau"]
        return lambda z, y: F.cross_entropy(z / tau, y)
    if objective == "squared_error":
        kappa, m, s = hp["kappa"], hp["m"], hp["loss_scale"]

        def loss(z, y):
            hot = onehot(y, z)
            per_class = hot * kappa * (z - m).pow(2) + (1 - hot) * z.pow(2)
            return s * per_class.sum(1).mean()
        return loss
    raise AssertionError(objective)


# ----------------------------------------------------------------------------------------------
# Model

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
         "resnext101_64x4d")


class DropoutLinear(nn.Linear):
    """nn.Linear with dropout on its input (training only); state_dict keys stay fc.weight/bias."""

    def __init__(self, in_features, out_features, p):
        super().__init__(in_features, out_features)
        self.p = p

    def forward(self, x):
        return super().forward(F.dropout(x, self.p, self.training))


class CosineLinear(nn.Module):
    """z_k = x.w_k / (||x|| ||w_k||) + b_k; with normalize_features=False only w_k is normalized
    (the released TF code's variant). Parameters are named weight/bias like nn.Linear."""

    def __init__(self, in_features, out_features, normalize_features=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.normalize_features = normalize_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        if self.normalize_features:
            x = F.normalize(x, dim=1, eps=1e-12)
        return F.linear(x, F.normalize(self.weight, dim=1, eps=1e-12), self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"normalize_features={self.normalize_features}"


class MaxPoolSame(nn.Module):
    """TF's max_pool(3, 2, padding='SAME'), the released TF ResNets' stem pool: for an even side
    (112 at 224 px) it pads 0 before and 1 after where torchvision pads 1 on both sides, which
    shifts every window by one pixel. No parameters, so state_dicts are unchanged."""

    def forward(self, x):
        pads = []
        for n in (x.shape[-1], x.shape[-2]):            # F.pad order: width, then height
            total = max(((n + 1) // 2 - 1) * 2 + 3 - n, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=-math.inf), 3, 2)


STEM_POOLS = ("torchvision", "tf_same")


def build_model(objective, num_classes, arch="resnet50", small_input=False,
                stem_pool="torchvision", **overrides):
    """A torchvision ResNet for `objective` (SPEC.md): zero-init last BN gamma of each residual
    branch, final layer N(0, 0.01^2) with zero bias, dropout or cosine head where the objective
    asks. With a linear head the state_dict loads strictly into torchvision.models.<arch>.
    stem_pool="tf_same": TF's SAME max-pool after the stem (import_tf_checkpoint.py's models)."""
    hp = objective_hparams(objective, **overrides)
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    model = getattr(torchvision.models, arch)(num_classes=num_classes, zero_init_residual=True)
    dim = model.fc.in_features
    if objective == "dropout":
        model.fc = DropoutLinear(dim, num_classes, hp["dropout"])
    elif objective == "cosine_softmax":
        model.fc = CosineLinear(dim, num_classes, hp["normalize_features"])
    nn.init.normal_(model.fc.weight, std=0.01)
    nn.init.zeros_(model.fc.bias)
    if small_input:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    if stem_pool not in STEM_POOLS:
        raise UserError(f"unknown stem_pool {stem_pool!r}; valid: {', '.join(STEM_POOLS)}")
    if stem_pool == "tf_same" and not small_input:
        model.maxpool = MaxPoolSame()
    return model


def param_groups(model, objective, weight_decay, **overrides):
    """SGD parameter groups: weight decay on conv and linear weights only (not BN, not biases);
    for extra_final_layer_l2 the final layer's weight gets weight_decay + lambda_."""
    hp = objective_hparams(objective, **overrides)
    fc_weight = model.fc.weight if hasattr(model, "fc") else None
    decay, no_decay, head = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if p is fc_weight and objective == "extra_final_layer_l2":
                head.append(p)
            elif name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear, CosineLinear)):
                decay.append(p)
            else:
                no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if head:
        groups.append({"params": head, "weight_decay": weight_decay + hp["lambda_"]})
    return [g for g in groups if g["params"]]


def block_modules(model):
    """The residual blocks in order (block1..blockN): 16 for ResNet-50, 8 for ResNet-18."""
    return [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]


def layer_names(model):
    return [f"block{i + 1}" for i in range(len(block_modules(model)))] + ["pool", "logits"]


def resolve_layers(model, names, what="the network"):
    """The layer list asked for: 'all', a comma list 'block8,pool' or a list of names, each
    checked against layer_names(model); a UserError lists the valid names.

        resolve_layers(build_model("softmax", 10, "resnet18"), "block8, pool")  # [block8, pool]
    """
    valid = layer_names(model)
    if names == "all":
        return valid
    layers = [s.strip() for s in names.split(",")] if isinstance(names, str) else list(names)
    layers = [l for l in layers if l]
    if not layers:
        raise UserError(f"no layer given; valid: all, {', '.join(valid)}")
    if len(set(layers)) != len(layers):
        raise UserError(f"a layer is repeated in {', '.join(layers)}")
    bad = [l for l in layers if l not in valid]
    if bad:
        raise UserError(f"{what} has no layer {', '.join(bad)}; valid: {', '.join(valid)}")
    return layers


# ----------------------------------------------------------------------------------------------
# Transforms: images travel as uint8 CHW and are normalized on the device.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC


def train_transform(resolution, style="paper", flip=True):
    """uint8 -> uint8. 'paper': Inception random-resized crop (0.08-1, 3/4-4/3), bicubic, flip.
    'small': resize to the resolution, random crop with 1/8 reflect padding, flip (CIFAR-style,
    for tiny images where a 0.08 crop leaves nothing)."""
    flips = [T.RandomHorizontalFlip()] if flip else []
    if style == "paper":
        return T.Compose([T.RandomResizedCrop(resolution, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                              interpolation=BICUBIC, antialias=True), *flips])
    if style == "small":
        pad = max(1, resolution // 8)
        return T.Compose([T.Resize((resolution, resolution), interpolation=BICUBIC, antialias=True),
                          T.RandomCrop(resolution, padding=pad, padding_mode="reflect"), *flips])
    raise UserError(f"unknown augmentation style {style!r}; valid: paper, small")


def eval_transform(resolution, crop_fraction=0.875):
    """uint8 -> uint8: center crop of crop_fraction of the short side, bicubic resize."""
    def center_crop(img):
        h, w = img.shape[-2:]
        side = max(1, round(min(h, w) * crop_fraction))
        return T.functional.center_crop(img, [side, side])
    steps = [] if crop_fraction >= 1 else [T.Lambda(center_crop)]
    return T.Compose([*steps, T.Resize((resolution, resolution), interpolation=BICUBIC,
                                       antialias=True)])


_NORMALIZE_CONSTANTS = {}  # (device, dtype) -> (mean, std)


def normalize(images, dtype=torch.float32):
    """uint8 NCHW batch (on any device) -> normalized float in channels_last.

    The constants are made once per device and dtype: a host-to-device copy per batch would
    make the host wait for the GPU at every training step."""
    key = (images.device, dtype)
    if key not in _NORMALIZE_CONSTANTS:
        with torch.inference_mode(False):
            _NORMALIZE_CONSTANTS[key] = tuple(
                torch.tensor(v, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
                for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _NORMALIZE_CONSTANTS[key]
    x = (images.to(dtype) - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# Datasets. One spec string names a dataset everywhere; see load_dataset().

VAL_FRACTION = 0.1        # stratified hold-out from train where a dataset has no val split
VAL_MAX = 10_000          # ... capped at this many images (ImageNet: 10 per class)
TEST_FRACTION = 0.2       # stratified test split for datasets without one (SUN397, Caltech-101)
SPLIT_SEED = 0            # splits never depend on a training seed
MEAN_PER_CLASS = {"oxford_pets", "flowers102", "fgvc_aircraft", "caltech101"}
TORCHVISION_DATASETS = ("cifar10", "cifar100", "food101", "sun397", "stanford_cars",
                        "oxford_pets", "flowers102", "fgvc_aircraft", "dtd", "caltech101")
FOLDER_DATASETS = ("imagenet", "folder", "birdsnap")


class Paths:
    """File paths as one numpy byte buffer with offsets, indexable like a list of str. No Python
    object per path: a list of ImageNet's 1.28 M paths is touched (refcounts) by every forked
    loader worker, which then copies its pages; these arrays stay shared."""

    def __init__(self, paths):
        encoded = [os.fsencode(p) for p in paths]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"path index {i} out of range")
        i = int(i) % len(self)
        return os.fsdecode(self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class ImageSource(torch.utils.data.Dataset):
    """An image list that yields (uint8 CHW tensor with 3 channels, label) without transforms.

    Backed by an in-memory uint8 array (N, H, W, C), a list of image file paths, or a list of
    torchvision datasets laid end to end. Picklable, for DataLoader workers."""

    def __init__(self, labels, images=None, paths=None, datasets=None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.images, self.datasets = images, datasets
        self.paths = None if paths is None else Paths(paths)
        if datasets is not None:
            self.offsets = np.cumsum([0] + [len(d) for d in datasets])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.images is not None:
            img = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        elif self.paths is not None:
            img = _read_image(self.paths[i])
        else:
            j = int(np.searchsorted(self.offsets, i, side="right")) - 1
            pil, _ = self.datasets[j][i - self.offsets[j]]
            img = T.functional.pil_to_tensor(pil.convert("RGB"))
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        elif img.shape[0] == 4:
            img = img[:3]
        return img, int(self.labels[i])


class Split(torch.utils.data.Dataset):
    """A view of an ImageSource: selected indices, labels remapped to 0..k-1, an optional
    transform. `labels` holds the remapped labels of the view (for samplers and metrics)."""

    def __init__(self, source, indices, label_map, transform=None):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.label_map = label_map
        self.labels = label_map[source.labels[self.indices]]
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, _ = self.source[int(self.indices[i])]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])

    @property
    def images(self):
        """The in-memory uint8 (N, H, W, C) array of this view, or None for file-backed data."""
        return None if self.source.images is None else self.source.images[self.indices]


def with_transform(split, transform):
    """The same view of the data with another transform."""
    return Split(split.source, split.indices, split.label_map, transform)


def concat_splits(a, b):
    """train+val as one view (both must come from the same source)."""
    if a.source is not b.source:
        raise ValueError("can only concatenate views of the same source")
    return Split(a.source, np.concatenate([a.indices, b.indices]), a.label_map, a.transform)


def parse_spec(spec):
    """'name[:path][@classes]' -> (name, path or None, class list string or None)."""
    if not isinstance(spec, str) or not spec:
        raise UserError("empty dataset spec; examples: digits, npz:DIR, cifar10:ROOT@0-4")
    body, at, subset = spec.partition("@")
    if at and not subset.strip():
        raise UserError(f"empty class subset after '@' in {spec!r}; write e.g. @0-4, @0,3,7 or "
                        f"@0+8,1+9, or drop the '@'")
    name, _, path = body.partition(":")
    valid = ("digits", "npz", *FOLDER_DATASETS, *TORCHVISION_DATASETS)
    if name not in valid:
        raise UserError(f"unknown dataset {name!r} in {spec!r}; valid: {', '.join(valid)}")
    if name == "digits" and path:
        raise UserError(f"'digits' takes no path (got {spec!r}); use digits or digits@0-4")
    if name != "digits" and not path:
        raise UserError(f"dataset {name!r} needs a path: {name}:DIR")
    return name, path or None, subset or None


def dataset_label(spec):
    """A filesystem-safe short name for a spec: 'npz:/a/cifar10@5-9' -> 'cifar10@5-9'."""
    name, path, subset = parse_spec(spec)
    base = os.path.basename(os.path.normpath(path)) if path else name
    if name not in ("npz", "folder") and path:
        base = name
    label = base + (f"@{subset}" if subset else "")
    return re.sub(r"[^A-Za-z0-9@,.+_-]", "_", label)


# The options of a subset spec: key -> (the value parsed, or None when invalid; the advice)
SUBSET_OPTIONS = {
    "per_class": (lambda v: int(v) if re.fullmatch(r"\d+", v) and int(v) >= 1 else None,
                  "write per_class=N with N >= 1 (at most N images of each class in every split)"),
    "from": (lambda v: v if v in ("train", "val", "test") else None,
             "write from=train, from=val or from=test")}


def parse_subset(subset, num_classes, spec):
    """The part after '@': classes and options, comma-separated ->
    (list of class groups, one per new class in the order given; at most this many images per
    original class or None; the split to draw every split from, or None).

    Classes: '0-4', '0,3,7', or groups '0+8,1+9' whose original classes merge into one new class
    ('0+8,1+9': airplane and ship are class 0, automobile and truck 1). Options: per_class=N (at
    most N images of each original class in every split), from=SPLIT (only the images of that
    split, re-split into train/val/test: 'from=test' probes on images no network trained on)."""
    parts = [p.strip() for p in (subset or "").split(",") if p.strip()]
    options = {}
    for part in [p for p in parts if "=" in p]:
        key, _, value = (x.strip() for x in part.partition("="))
        if key in options:
            raise UserError(f"{spec!r} gives {key} twice; write e.g. @0-4,per_class=500")
        if key not in SUBSET_OPTIONS:
            raise UserError(f"unknown option {key!r} in {spec!r}; valid: per_class=N, from=SPLIT")
        parse, advice = SUBSET_OPTIONS[key]
        options[key] = parse(value)
        if options[key] is None:
            raise UserError(f"bad {part!r} in {spec!r}; {advice}")
    rest = ",".join(p for p in parts if "=" not in p)
    groups = parse_classes(rest, num_classes, spec) if rest else [[c] for c in range(num_classes)]
    return groups, options.get("per_class"), options.get("from")


def cap_per_class(idx, labels, per_class, seed=SPLIT_SEED):
    """At most per_class of the indices idx of each label (seeded; data order kept)."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(idx), dtype=bool)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        if len(where) > per_class:
            where = rng.choice(where, per_class, replace=False)
        keep[where] = True
    return idx[keep]


def parse_classes(subset, num_classes, spec):
    """'0-4' or '0,3,7' or '0-2,5' -> [[0], [1], ...]; '0+8,1+9' -> [[0, 8], [1, 9]] (order kept:
    group i becomes class i)."""
    groups = []
    for part in subset.split(","):
        if "+" in part:
            items = part.split("+")
            if not all(re.fullmatch(r"\s*\d+\s*", i) for i in items):
                raise UserError(f"bad class group {part.strip()!r} in {spec!r}; join single class "
                                f"indices with '+', e.g. @0+8,1+9")
            groups.append([int(i) for i in items])
            continue
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"bad class subset {subset!r} in {spec!r}; write e.g. @0-4, @0,3,7 "
                            f"or @0+8,1+9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UserError(f"bad class range {part!r} in {spec!r}: end before start")
        groups.extend([c] for c in range(lo, hi + 1))
    classes = [c for g in groups for c in g]
    bad = [c for c in classes if c >= num_classes]
    if bad:
        raise UserError(f"class subset {subset!r} of {spec!r} is out of range: the dataset has "
                        f"{num_classes} classes (0-{num_classes - 1})")
    if len(set(classes)) != len(classes):
        raise UserError(f"class subset {subset!r} of {spec!r} repeats a class")
    if len(groups) < 2:
        raise UserError(f"class subset {subset!r} of {spec!r} has fewer than 2 classes")
    return groups


def stratified_holdout(labels, fraction, cap=None, seed=SPLIT_SEED, what="validation"):
    """Split indices 0..n-1 into (keep, held_out), stratified by label, seeded."""
    from sklearn.model_selection import train_test_split
    labels = np.asarray(labels)
    n, k = len(labels), len(np.unique(labels))
    size = math.ceil(fraction * n)  # as sklearn's train_test_split rounds a fraction
    if cap:
        size = min(size, cap)
    size = max(size, k)
    counts = np.bincount(labels)
    if n - size < k or counts[counts > 0].min() < 2:
        raise UserError(f"too few images for a {what} split ({n} images, {k} classes, smallest "
                        f"class {counts[counts > 0].min()}): need at least 2 per class")
    idx = np.arange(n)
    keep, held = train_test_split(idx, test_size=size, random_state=seed, stratify=labels)
    return np.sort(keep), np.sort(held)


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.round(d.images * (255 / 16)).clip(0, 255).astype(np.uint8)[..., None]
    src = ImageSource(d.target, images=images)
    # The test split of SPEC.md's published logistic-regression vectors.
    train, test = stratified_holdout(d.target, 0.25, what="test")
    return src, {"train": train, "test": test}, [str(i) for i in range(10)], 8


def _npz(path):
    if not os.path.isdir(path):
        raise UserError(f"npz dataset folder not found: {path}")
    files = sorted(glob.glob(os.path.join(path, "*.npz")))
    if not files:
        raise UserError(f"no .npz files in {path}; expected files named *train*.npz / *test*.npz")
    groups = {"train": [], "val": [], "test": []}
    for f in files:
        base = os.path.basename(f).lower()
        if "train" in base:
            groups["train"].append(f)
        elif "val" in base:
            groups["val"].append(f)
        elif "test" in base:
            groups["test"].append(f)
    if not groups["train"]:
        raise UserError(f"no training file in {path}: one .npz name must contain 'train'")
    images, labels, ranges, start = [], [], {}, 0
    for split, fs in groups.items():
        for f in fs:
            try:
                with np.load(f) as d:
                    im, lb = d["images"], d["labels"]
            except KeyError as e:
                raise UserError(f"{f} lacks array {e}; expected arrays 'images' and 'labels'")
            except Exception as e:
                raise UserError(f"cannot read {f}: {type(e).__name__}: {e}")
            if im.dtype != np.uint8 or im.ndim != 4 or lb.ndim != 1 or len(im) != len(lb):
                raise UserError(f"{f}: expected images uint8 (N,H,W,C) and labels (N,), got "
                                f"{im.dtype} {im.shape} and {lb.shape}")
            images.append(im)
            labels.append(check_labels(lb, f))
        n = sum(len(x) for x in labels) - start
        ranges[split] = np.arange(start, start + n)
        start += n
    shapes = {im.shape[1:] for im in images}
    if len(shapes) != 1:
        raise UserError(f"image shapes differ between the files of {path}: {sorted(shapes)}")
    images, labels = np.concatenate(images), np.concatenate(labels)
    num_classes = int(labels.max()) + 1
    classes = [str(i) for i in range(num_classes)]
    cj = os.path.join(path, "classes.json")
    if os.path.exists(cj):
        meta = read_json(cj)
        names = meta.get("classes") if isinstance(meta, dict) else meta
        if isinstance(names, list) and len(names) >= num_classes:
            classes = [str(c) for c in names]
    splits = {k: v for k, v in ranges.items() if len(v)}
    return ImageSource(labels, images=images), splits, classes, images.shape[1]


MAX_CLASSES = 100_000  # more is a broken label, not a dataset: (N, K) one-hot targets explode


def check_labels(labels, what):
    """Labels as int64 (N,), or a one-line UserError naming the first bad one: not integers
    (floats would be truncated silently), negative, or so large that the class count is absurd
    (one label of 1e9 made 1e9 + 1 classes and ran the machine out of memory)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise UserError(f"{what}: labels must be integers, got {labels.dtype}; store them as "
                        f"int64 class indices 0..K-1")
    for bad, why in ((labels < 0, "negative"), (labels >= MAX_CLASSES, f">= {MAX_CLASSES:,}")):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{what}: label {int(labels[i])} at index {i} is {why}; labels must "
                            f"be class indices 0..K-1")
    return labels.astype(np.int64)


def _decode_jpeg():
    """TorchCodec's JPEG decoder (libjpeg-turbo on the CPU), or None where it is not installed.
    Imported on first use, in the loader worker that decodes."""
    global _DECODE_JPEG
    if _DECODE_JPEG is False:
        try:
            from torchcodec.decoders import decode_jpeg
            _DECODE_JPEG = decode_jpeg
        except Exception:      # not installed, or its native library does not load
            _DECODE_JPEG = None
    return _DECODE_JPEG


_DECODE_JPEG = False   # not tried yet


def _read_image(path):
    """A file -> uint8 RGB tensor (3, H, W). JPEG files (by their first bytes) are decoded by
    TorchCodec, about 1.6x PIL's speed on phone photos (BENCHMARKS.md, input pipeline) with the
    same pixels (tests/test_common.py); other formats, and a JPEG TorchCodec cannot read (CMYK,
    some truncated files), by PIL. Neither applies EXIF orientation, as torchvision's loaders."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            data = f.read()
        decode = _decode_jpeg() if data[:3] == b"\xff\xd8\xff" else None
        if decode is not None:
            try:
                return decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
            except Exception:
                pass           # PIL decides: it decodes or gives the reason below
        with Image.open(io.BytesIO(data)) as im:
            return T.functional.pil_to_tensor(im.convert("RGB"))
    except Exception as e:  # a UserError, so that a worker's failure is one line too
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot decode image {path} ({why}); replace or remove it") from e


def _folder(name, path):
    """ImageFolder layout: DIR/train/<class>/*.jpg, optional DIR/val/, DIR/test/."""
    if not os.path.isdir(path):
        raise UserError(f"{name} folder not found: {path}")
    train_dir = os.path.join(path, "train")
    if not os.path.isdir(train_dir):
        raise UserError(f"{path} has no train/ folder; expected {path}/train/<class>/<image>")
    def scan(d):
        try:
            return torchvision.datasets.ImageFolder(d, loader=_read_image)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"cannot read image folder {d}: {str(e).splitlines()[0]}")
    parts = {"train": scan(train_dir)}
    classes = parts["train"].classes
    for split, sub in (("val", "val"), ("val", "validation"), ("test", "test")):
        d = os.path.join(path, sub)
        if os.path.isdir(d) and split not in parts:
            parts[split] = scan(d)
            if parts[split].classes != classes:
                raise UserError(f"class folders of {d} differ from those of {train_dir}")
    if name == "imagenet" and "test" not in parts and "val" in parts:
        # ImageNet's val/ is the reported (test) set; validation is held out from train.
        parts["test"] = parts.pop("val")
    samples, splits = [], {}
    for split, ds in parts.items():
        splits[split] = np.arange(len(samples), len(samples) + len(ds.samples))
        samples.extend(ds.samples)
    src = ImageSource([s[1] for s in samples], paths=[s[0] for s in samples])
    return src, splits, list(classes), None


def _tv_labels(ds):
    for attr in ("targets", "_labels", "y"):
        if hasattr(ds, attr):
            return list(getattr(ds, attr))
    if hasattr(ds, "_samples"):
        return [s[1] for s in ds._samples]
    raise AssertionError(f"cannot find labels of {type(ds).__name__}")


def _tv_classes(ds, n):
    for attr in ("classes", "categories"):
        if hasattr(ds, attr):
            return [str(c) for c in getattr(ds, attr)]
    return [str(i) for i in range(n)]


def _torchvision(name, root, download):
    D = torchvision.datasets
    ctor = {
        "cifar10": lambda s: D.CIFAR10(root, train=s == "train", download=download),
        "cifar100": lambda s: D.CIFAR100(root, train=s == "train", download=download),
        "food101": lambda s: D.Food101(root, split=s, download=download),
        "sun397": lambda s: D.SUN397(root, download=download),
        "stanford_cars": lambda s: D.StanfordCars(root, split=s, download=download),
        "oxford_pets": lambda s: D.OxfordIIITPet(root, split="trainval" if s == "train" else s,
                                                 download=download),
        "flowers102": lambda s: D.Flowers102(root, split=s, download=download),
        "fgvc_aircraft": lambda s: D.FGVCAircraft(root, split=s, download=download),
        "dtd": lambda s: D.DTD(root, split=s, download=download),
        "caltech101": lambda s: D.Caltech101(root, download=download),
    }[name]
    official = {"sun397": ["all"], "caltech101": ["all"],
                "flowers102": ["train", "val", "test"], "fgvc_aircraft": ["train", "val", "test"],
                "dtd": ["train", "val", "test"]}.get(name, ["train", "test"])
    parts = {}
    for split in official:
        try:
            parts[split] = ctor(split)
        except RuntimeError as e:
            hint = "" if download else " (add --download to fetch it, where torchvision can)"
            raise UserError(f"{name} not found or corrupt under {root}: "
                            f"{str(e).splitlines()[0]}{hint}")
    datasets, labels, splits = [], [], {}
    for split, ds in parts.items():
        lb = _tv_labels(ds)
        splits[split] = np.arange(len(labels), len(labels) + len(lb))
        datasets.append(ds)
        labels.extend(lb)
    arrays = [getattr(ds, "data", None) for ds in datasets]
    if all(isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 4 for a in arrays):
        src = ImageSource(labels, images=np.concatenate(arrays))  # CIFAR: already in memory
    else:
        src = ImageSource(labels, datasets=datasets)
    if "all" in splits:
        train, test = stratified_holdout(src.labels, TEST_FRACTION, what="test")
        splits = {"train": train, "test": test}
    return src, splits, _tv_classes(datasets[0], int(max(labels)) + 1), None


def load_dataset(spec, download=False):
    """Load a dataset by spec and return a dict:
        train, val, test: Split views (uint8 CHW images, labels 0..k-1, no transform yet)
        num_classes, classes, metric ('top1' or 'mean_per_class'), name, spec,
        image_size: native side length of in-memory images (None for image files).
    Specs: digits | npz:DIR | imagenet:DIR | folder:DIR | birdsnap:DIR | <torchvision name>:ROOT,
    each with an optional class subset suffix @0-4 or @0,3,7 (relabelled 0..k-1 in that order),
    class groups merged many-to-one (@0+8,1+9: classes 0 and 8 become class 0, 1 and 9 class 1)
    and/or a cap per_class=N (@per_class=500, @0-4,per_class=500: at most N images of each
    original class in every split, a seeded subset taken after the validation hold-out), and/or
    from=SPLIT (@from=test: only that split's images, re-split as a dataset without val or test:
    a stratified, seeded TEST_FRACTION test split, then the val hold-out).
    Where a dataset has no validation split, val is a stratified, seeded hold-out of
    VAL_FRACTION of train (at most VAL_MAX images); test is never used to select anything."""
    name, path, subset = parse_spec(spec)
    if name == "digits":
        src, splits, classes, size = _digits()
    elif name == "npz":
        src, splits, classes, size = _npz(path)
    elif name in FOLDER_DATASETS:
        src, splits, classes, size = _folder(name, path)
    else:
        src, splits, classes, size = _torchvision(name, path, download)
    if len(src) == 0 or len(splits.get("train", [])) == 0:
        raise UserError(f"dataset {spec!r} has no training images")
    num_all = max(len(classes), int(src.labels.max()) + 1)
    groups, per_class, from_split = parse_subset(subset, num_all, spec)
    label_map = np.full(num_all, -1, dtype=np.int64)
    for new_class, group in enumerate(groups):
        label_map[group] = new_class
    if from_split:
        if from_split not in splits:
            raise UserError(f"{spec!r}: the dataset has no {from_split} split of its own; "
                            f"use from=train or from=test")
        only = splits[from_split]
        keep, held = stratified_holdout(src.labels[only], TEST_FRACTION, what="test")
        splits = {"train": only[keep], "test": only[held]}
    if "val" not in splits:
        train_labels = src.labels[splits["train"]]
        # held out from the whole dataset, so a class subset's split is the whole's restricted
        keep, held = stratified_holdout(train_labels, VAL_FRACTION, VAL_MAX)
        splits["val"], splits["train"] = splits["train"][held], splits["train"][keep]
    if "test" not in splits:
        raise UserError(f"dataset {spec!r} has no test split: add a test/ folder or *test*.npz")
    views = {}
    for split in ("train", "val", "test"):
        idx = splits[split]
        idx = idx[label_map[src.labels[idx]] >= 0]
        if per_class:
            idx = cap_per_class(idx, src.labels[idx], per_class)
        if len(idx) == 0:
            raise UserError(f"the {split} split of {spec!r} has no images of the chosen classes")
        views[split] = Split(src, idx, label_map)
    present = set(np.unique(views["train"].labels).tolist())
    if len(present) < 2:
        raise UserError(f"the train split of {spec!r} has {len(present)} class: a classifier "
                        f"needs at least 2")
    for split in ("val", "test"):
        missing = sorted(set(np.unique(views[split].labels).tolist()) - present)
        if missing:
            raise UserError(f"class {missing[0]} of {spec!r} has {split} images but no training "
                            f"images; drop it with a class subset (@...)")
    names = ["+".join(classes[c] if c < len(classes) else str(c) for c in g) for g in groups]
    return {**views, "num_classes": len(groups), "classes": names, "metric": "mean_per_class" if name in MEAN_PER_CLASS
            else "top1", "name": dataset_label(spec), "spec": spec, "image_size": size}


# ----------------------------------------------------------------------------------------------
# Metrics

def class_counts(scores, labels, num_classes):
    """Per true class, the images and their hits: a float64 tensor (3, num_classes) of images,
    top-1 hits and top-5 hits, on the labels' device. `scores`: logits (N, K), or predicted
    classes (N,), which give two rows (no top-5). Counts add up: summed over batches, or over
    ranks (all_reduce), they give accuracy() of the whole set. Integer counts in float64 are
    exact, so the sums are too.

    >>> labels = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])     # SPEC.md's test vector
    >>> accuracy(class_counts(torch.tensor([0, 0, 1, 0, 1, 2, 3, 0, 0, 0]), labels, 4))
    {'top1': 0.4, 'top5': None, 'mean_per_class': 0.5208333333333333}
    """
    labels = torch.as_tensor(labels)
    scores = torch.as_tensor(scores).to(labels.device)
    if scores.ndim == 2:
        top5 = scores.topk(min(5, scores.shape[1]), 1).indices
        hits = [scores.argmax(1) == labels, (top5 == labels[:, None]).any(1)]
    else:
        hits = [scores == labels]
    hits = torch.stack([torch.ones_like(hits[0]), *hits]).double()   # (rows, N)
    # index_add_: no host sync, and deterministic on the GPU too (torch's deterministic mode)
    counts = torch.zeros(len(hits), num_classes, dtype=torch.float64, device=labels.device)
    return counts.index_add_(1, labels, hits)


def accuracy(counts):
    """{top1, top5, mean_per_class} as floats in [0, 1] from class_counts() (summed): the share
    of hits, and the mean over the classes that have images of each class's share of top-1
    hits; top5 None when the counts have no top-5 row."""
    images, top1 = counts[0], counts[1]
    n, present = images.sum().item(), images > 0
    return {"top1": top1.sum().item() / n,
            "top5": counts[2].sum().item() / n if len(counts) > 2 else None,
            "mean_per_class": (top1[present] / images[present]).mean().item()}


# ----------------------------------------------------------------------------------------------
# Features

def extract_features(model, loader, layers, device="cpu", dtype=None):
    """Run `model` over `loader` in eval mode; yield (dict layer -> float tensor (B, D) on
    `device`, labels) per batch. Layers: block1..blockN, pool, logits. Conv maps are flattened
    (C, H, W order). Hooks copy activations, so in-place ops downstream cannot change them."""
    layers = resolve_layers(model, layers)
    valid = layer_names(model)
    store, handles = {}, []
    modules = dict(zip(valid[:-2], block_modules(model)))
    modules["pool"] = model.avgpool
    for name in layers:
        if name == "logits":
            continue
        def hook(_m, _inp, out, name=name):
            store[name] = out.detach().flatten(1).float().clone()
        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    device = torch.device(device)
    try:
        for images, labels in loader_iter(loader):
            # no_grad only around the forward pass: a generator left open must not leave
            # the whole process without autograd
            with torch.no_grad():
                x = normalize(images.to(device, non_blocking=True))
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = model(x)
                if "logits" in layers:
                    store["logits"] = logits.detach().float().clone()
            yield {name: store.pop(name) for name in layers}, labels
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


# Progress of long loops, as plain lines that stay readable in a log file (no bar redrawn with
# carriage returns): torchvision's MetricLogger and timm print such interval lines with an ETA.
PROGRESS_SECONDS = 10.0   # a Ticker's default interval; tests set 0 to see every line


def duration(seconds):
    """A time span for a human: '42s', '7m05s', '3h02m', '2d04h' ('?' when not finite).

    >>> duration(425), duration(10920), duration(3.4)
    ('7m05s', '3h02m', '3s')
    """
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Ticker:
    """Progress lines of a loop over `total` items: calling it with the number done prints
    '<what>: <done>/<total> <unit> (<pct>%), <rate> <unit>/s, eta <time>' at most every
    `seconds` (default PROGRESS_SECONDS; 0: every call), and once it has printed, a last line
    when done reaches total. A loop shorter than `seconds` prints nothing.

    >>> tick = Ticker("  features", 5000)   # doctest: +SKIP
    >>> tick(1280)                          # '  features: 1280/5000 images (26%), ... eta 31s'
    """

    def __init__(self, what, total, unit="images", seconds=None, log=None):
        self.what, self.total, self.unit = what, total, unit
        self.log = log or (lambda text: print(text, flush=True))
        self.seconds = PROGRESS_SECONDS if seconds is None else seconds
        self.start = self.last = time.monotonic()
        self.printed = False

    def __call__(self, done):
        now = time.monotonic()
        end = done >= self.total
        if not (now - self.last >= self.seconds or (end and self.printed)):
            return
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else math.inf
        pct = 100 * done / max(self.total, 1)
        self.log(f"{self.what}: {done}/{self.total} {self.unit} ({pct:.0f}%), "
                 f"{rate:.0f} {self.unit}/s, " +
                 (f"done in {duration(elapsed)}" if end else f"eta {duration(eta)}"))
        self.last, self.printed = now, True


def collect_features(model, loader, layers, device="cpu", progress=None):
    """extract_features gathered into numpy: ({layer: float32 (N, D)}, labels int64 (N,)).
    progress: called with the number of images done after each batch (e.g. a Ticker)."""
    chunks, labels, done = {l: [] for l in layers}, [], 0
    for feats, y in extract_features(model, loader, layers, device):
        for l in layers:
            chunks[l].append(feats[l].cpu().numpy().astype(np.float32, copy=False))
        labels.append(np.asarray(y))
        done += len(labels[-1])
        if progress is not None:
            progress(done)
    return ({l: np.concatenate(c) for l, c in chunks.items()},
            np.concatenate(labels).astype(np.int64))


def eval_loader(split, resolution, batch_size=256, workers=0, crop_fraction=None,
                transform=None):
    """A deterministic loader over a Split with the eval transform (no augmentation).

    Tiny in-memory images (<= 64 px) are resized without a crop unless crop_fraction is given.
    `transform` replaces eval_transform (e.g. import_tf_checkpoint.tf_eval_transform(224): TF's
    preprocessing, float on the 0-255 scale, which normalize() takes as it takes uint8)."""
    if crop_fraction is None:
        size = split.source.images.shape[1] if split.source.images is not None else None
        crop_fraction = 1.0 if size is not None and size <= 64 else 0.875
    ds = with_transform(split, transform or eval_transform(resolution, crop_fraction))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0)


# ----------------------------------------------------------------------------------------------
# Checkpoints and file I/O

CKPT_FORMAT = 1
CKPT_REQUIRED = ("format", "objective", "hparams", "arch", "num_classes", "small_input", "model")


def versions():
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": np.__version__, "python": platform.python_version()}


def atomic_write(path, write):
    """Call write(fileobj) on a temporary file beside `path`, fsync it, then os.replace it onto
    `path`: a reader sees either the old file or the complete new one, never a torn write. A full
    disk or an unwritable folder is a one-line UserError, with the old file left as it was."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would survive the rename
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e} ({d}); choose another output "
                        f"folder") from None
    try:
        with hold_ctrl_c():
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(e, d)
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous file is unchanged" if os.path.exists(path) else "nothing written"
        if full:
            raise UserError(f"cannot write {path}: no space left on the device ({kept}); free "
                            f"some space or choose another output folder") from None
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:  # EIO, EROFS, EFBIG: as clear
            raise UserError(f"cannot write {path}: {e.strerror or e} ({kept}); choose another "
                            f"output folder") from None
        raise
    try:
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def _disk_full(e, folder):
    """Whether an exception from writing a file into `folder` means the disk (or the quota) is
    full. torch.save reports it as a RuntimeError of its zip writer ('file write failed',
    'unexpected pos'), which other failures can raise too: then the free space decides."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError) and any(s in str(e) for s in ("file write failed",
                                                                  "unexpected pos")):
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize < 16 << 20
    return False


@contextlib.contextmanager
def hold_ctrl_c():
    """Hold back Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt. Used where
    a KeyboardInterrupt raised at a random point is lost: inside torch.save the zip writer turns
    it into a RuntimeError and the file is lost (atomic_write), and while a DataLoader forks its
    workers it lands in an at-fork callback (logging's _releaseLock), where Python prints
    "Exception ignored" and carries on: training went on as if no Ctrl-C had come (1 of 27
    Ctrl-Cs at random moments of a run; loader_iter). In the main thread only (signal handlers
    live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda *_: caught.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


def loader_iter(loader):
    """iter(loader), its worker processes (if any) started with Ctrl-C held back (hold_ctrl_c).
    Every loop over a DataLoader with workers starts it this way."""
    with hold_ctrl_c():
        return iter(loader)


_HELD = {}  # real path of a folder -> fd of its .lock, for the folders this process holds


def hold_folder(folder):
    """Take OUT/.lock for `folder` (creating the folder) until release_folder() or the process
    ends; a second process on the same folder gets a one-line UserError instead of silently
    mixing its files with the first one's. Taking a folder this process holds already is a no-op.
    Temporary files of atomic_write that a killed writer left behind are removed (nobody else
    writes here). Returns whether this call took the lock.

    The lock is a POSIX record lock (fcntl), which belongs to this process alone: the kernel drops
    it the moment the process dies, even by SIGKILL, and forked DataLoader workers do not inherit
    it. (A flock was shared with the workers, which outlive a killed process by up to 5 s: a
    requeued job's immediate rerun was refused, issue 25.) Its catch: closing ANY descriptor of
    the file releases it, so nothing else in this process may open a .lock file."""
    key = os.path.realpath(folder)
    if key in _HELD:
        return False
    check_out_path(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"output folder {folder} exists and is a file; choose another")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write into {folder}: {e.strerror or e}; choose another output "
                        f"folder") from None
    _HELD[key] = _take_lock(os.path.join(folder, ".lock"), folder)
    for stale in glob.glob(os.path.join(glob.escape(folder), ".*.tmp")):
        os.remove(stale)
    return True


@contextlib.contextmanager
def locked_file(path):
    """One writer at a time for the output FILE `path` (as hold_folder is per folder, with the
    same lock): .NAME.lock beside it, held for the with block, then removed. A second process
    gets a one-line UserError naming the first. Temporary files of atomic_write that a killed
    writer of `path` left are removed.

        with common.locked_file("runs/tf/softmax_s0.pt"):
            common.save_checkpoint("runs/tf/softmax_s0.pt", ck)
    """
    folder = os.path.dirname(path) or "."
    check_out_path(path, "output file")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write into {folder}: {e.strerror or e}; choose another output "
                        f"file") from None
    lock = os.path.join(folder, f".{os.path.basename(path)}.lock")
    while True:
        fd = _take_lock(lock, path)
        try:  # the lock file still the one locked: a holder removes it when done, and a
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:   # process that opened it just
                break                                          # before holds a dead copy
        except FileNotFoundError:
            pass
        os.close(fd)
    for stale in glob.glob(os.path.join(glob.escape(folder),
                                        f".{glob.escape(os.path.basename(path))}.*.tmp")):
        os.remove(stale)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)  # while still held (see above)
        os.close(fd)


def check_out_path(path, what="output folder"):
    """A one-line UserError, said plainly, for an output path that cannot be one: empty
    (--out ''), a symbolic link to nothing (itself or a folder above it), or below a file. The
    system's own words were misleading: "No such file or directory: ''", "File exists" for the
    link, "Not a directory"."""
    if not path:
        raise UserError(f"the {what} is an empty string; give a path, e.g. --out runs/x")
    p = os.path.abspath(path)
    while True:
        if os.path.islink(p) and not os.path.exists(p):
            where = f"{what} {path}" + ("" if p == os.path.abspath(path) else f": {p}")
            raise UserError(f"{where} is a symbolic link to {os.readlink(p)}, which does not "
                            f"exist; create that, or choose another {what}")
        if os.path.exists(p):
            break
        p = os.path.dirname(p)
    if p != os.path.abspath(path) and not os.path.isdir(p):
        raise UserError(f"{what} {path} cannot be created: {p} is a file, not a folder; choose "
                        f"another {what}")


def _take_lock(path, what):
    """Open `path` and take its POSIX record lock for this process; write 'pid N on HOST' into it
    for the people who look. Returns the descriptor (closing it releases the lock). A lock held
    by another process is a one-line UserError naming that process, which the kernel says holds
    it (so a live one); so is a disk that cannot take the few bytes, with no empty file left."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot write into {os.path.dirname(path) or '.'}: {e.strerror or e}; "
                        f"choose another output folder") from None
    for _ in range(3):  # a holder that exits between the two calls below: try again
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise UserError(f"cannot lock {path}: {e.strerror or e}; choose another output "
                                f"folder") from None
            holder = _lock_holder(fd)
            if holder is not None:
                os.close(fd)
                raise UserError(f"{what} is in use by {holder}: wait for it to finish, or choose "
                                f"another output folder") from None
    else:
        os.close(fd)
        raise UserError(f"{what} is in use by processes that come and go; retry, or choose "
                        f"another output folder")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still held: nobody can have taken it meanwhile
        os.close(fd)
        raise write_error(path, e) from None
    return fd


def _lock_holder(fd):
    """'pid N' (with the host it wrote) of the process holding the lock on fd's file, asked of
    the kernel (F_GETLK), so the process is alive; None when nobody holds it any more. Where the
    kernel cannot say (not 64-bit Linux; a network file system), what the holder wrote."""
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if not (sys.platform.startswith("linux") and struct.calcsize("P") == 8):
        return text or "another process"
    query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        kind, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return text or "another process"
    if kind == fcntl.F_UNLCK:
        return None
    if pid <= 0:
        return text or "another process"
    return text if text.startswith(f"pid {pid} ") else f"pid {pid}"


def write_error(path, e):
    """The one-line UserError for an OSError from writing `path`: a full disk (or quota) says so,
    anything else names the system's reason."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"cannot write {path}: no space left on the device; free some space or "
                         f"choose another output folder")
    return UserError(f"cannot write {path}: {e.strerror or e}; choose another output folder")


def release_folder(folder):
    fd = _HELD.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def locked(folder):
    """hold_folder() for the duration of a with block (train(): one run's folder)."""
    took = hold_folder(folder)
    try:
        yield
    finally:
        if took:
            release_folder(folder)


# ----------------------------------------------------------------------------------------------
# What may share an output folder (issue 25): one kind of result per folder, and a finished result
# replaced only by the same computation, unless --overwrite. Every script asks here.
#
#   common.make_out_dir(args.out, "cka", args.overwrite)      # another kind there: refused
#   common.refuse_replacing(os.path.join(args.out, "cka.json"), new, ("split",), args.overwrite)

FOLDER_KINDS = {"train": "training", "evaluate": "evaluation (train_imagenet.py --evaluate)",
                "finetune": "fine-tuning", "linear_probe": "linear-probe",
                "cka": "CKA", "class_separation": "class-separation", "figures": "figures"}


def folder_kinds(folder):
    """{kind: the file that shows it} for the results `folder` itself holds (not its subfolders;
    FOLDER_KINDS): results.json by its kind (a fine-tune's grid run is training); training's
    last.pt, final.pt, log.jsonl, args.json or summary.csv (its first column: epoch); a
    fine-tune's grid/ or final/; the linear probe's summary.csv (first column: run_id) or cache/;
    cka.json/.npz; class_separation.json/.npz; make_figures.py's report.md."""
    found = {}

    def there(name):
        return os.path.lexists(os.path.join(folder, name))
    try:
        with open(os.path.join(folder, "results.json")) as f:
            kind = json.load(f).get("kind")
        kind = {"finetune_run": "train"}.get(kind, kind)
        if kind in FOLDER_KINDS:
            found[kind] = f"results.json of kind {kind}"
    except (OSError, ValueError, AttributeError, RecursionError):
        pass  # none, or unreadable: the script that reads it says so
    try:
        with open(os.path.join(folder, "summary.csv")) as f:
            first = f.readline()
        kind = "train" if first.startswith("epoch,") else \
            "linear_probe" if first.startswith("run_id,") else None
        if kind:
            found.setdefault(kind, "summary.csv")
    except (OSError, ValueError):
        pass
    for kind, names in (("train", ("last.pt", "final.pt", "log.jsonl", "args.json")),
                        ("finetune", ("grid", "final")), ("linear_probe", ("cache",)),
                        ("cka", ("cka.json", "cka.npz")),
                        ("class_separation", ("class_separation.json", "class_separation.npz")),
                        ("figures", ("report.md",))):
        for name in names:
            is_dir = name in ("grid", "final", "cache")
            if there(name) and os.path.isdir(os.path.join(folder, name)) == is_dir:
                found.setdefault(kind, name + ("/" if is_dir else ""))
    return found


def claim_folder(folder, kind, overwrite=False):
    """hold_folder(folder) for results of `kind` (a FOLDER_KINDS key), refused with one line
    before any work when the folder holds results of another kind, which the new ones would be
    mixed with or replace (a fine-tune over a training run's results.json, a probe's summary.csv
    over a training run's), unless `overwrite` (--overwrite). Returns whether this call took the
    lock."""
    took = hold_folder(folder)
    other = {k: v for k, v in folder_kinds(folder).items() if k != kind}
    if other and not overwrite:
        if took:
            release_folder(folder)
        k, shown_by = next(iter(other.items()))
        raise UserError(f"{folder} holds results of another kind ({FOLDER_KINDS[k]}: "
                        f"{shown_by}); {FOLDER_KINDS[kind]} results need a folder of their own: "
                        f"choose another --out, or add --overwrite to write there anyway")
    return took


@contextlib.contextmanager
def claimed(folder, kind, overwrite=False):
    """claim_folder() for the duration of a with block."""
    took = claim_folder(folder, kind, overwrite)
    try:
        yield
    finally:
        if took:
            release_folder(folder)


def refuse_replacing(path, new, fields=(), overwrite=False, what="the result", flag="--out"):
    """Refuse (one-line UserError) to replace the finished result at `path` (a results file)
    with `new` when `new` is not the same computation: other network(s) (their checkpoint
    hashes), another dataset, or another value of one of `fields` (a name, or (name, function of
    the results dict)). The same computation rerun may replace its own file; `overwrite` allows
    anything. Returns whether there was another computation's result (then overwritten)."""
    if not os.path.isfile(path):
        return False
    try:
        old = read_json(path)
    except UserError:
        if overwrite:  # unreadable: replaced as asked
            return True
        raise
    old = old if isinstance(old, dict) else {}

    def hashes(r):
        nets = r.get("networks") if "networks" in r else [r.get("network")]
        return [n.get("checkpoint_hash") if isinstance(n, dict) else None
                for n in (nets if isinstance(nets, list) else [nets])]
    diff, a, b = [], hashes(old), hashes(new)
    if len(a) != len(b):
        diff.append(("networks", len(a), len(b)))
    elif a != b:
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        diff.append(("checkpoint_hash" + (f" of network {i + 1}" if len(a) > 1 else ""),
                     a[i], b[i]))
    for field in ("dataset", *fields):
        name, get = field if isinstance(field, tuple) else (field, lambda r, k=field: r.get(k))
        if get(old) != get(new):
            diff.append((name, get(old), get(new)))
    if diff and not overwrite:
        text = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff)
        raise UserError(f"{path} holds {what} of another checkpoint or setting ({text}); use "
                        f"another {flag}, or --overwrite to replace it")
    return bool(diff)


def save_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n")
                                         .encode()))


def read_json(path):
    """A JSON file, or a one-line UserError saying it is missing or corrupt."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); delete it and rerun the step that "
                        f"writes it")


def pct(x):
    """An accuracy in [0, 1] as console text: 'pct(0.995575)' -> '99.56%' ('-' for None)."""
    return "-" if x is None else f"{100 * x:.2f}%"


def hparam_columns(hparams):
    """An objective's hyperparameters as CSV columns: one per hyperparameter of any objective, in
    OBJECTIVES' order (None, an empty cell, where this objective has none), then any other.

        hparam_columns({"tau": 0.05, "normalize_features": False})["tau"]   # 0.05
    """
    names = dict.fromkeys(k for hp in OBJECTIVES.values() for k in hp)
    return {**{k: (hparams or {}).get(k) for k in names},
            **{k: v for k, v in sorted((hparams or {}).items()) if k not in names}}


def write_csv(path, rows):
    """A list of dicts as a CSV file (columns in first-seen order; floats to 6 digits; None
    empty). A field with a comma or a quote is quoted (csv module): dataset specs such as
    npz:DIR@5-9,per_class=2000 used to split into two columns."""
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows(["" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float)
                                              else str(r[c])) for c in cols] for r in rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def save_npz(path, **arrays):
    atomic_write(path, lambda f: np.savez(f, **arrays))


def make_checkpoint(model, model_args, *, ema=None, args=None, **extra):
    """The checkpoint dict every script reads. model_args: objective, hparams, arch, num_classes,
    small_input and optionally stem_pool (build_model's arguments: what rebuilds the model).
    `model`: a module or its state_dict; `ema`: the EMA model's state_dict (or None). Everything
    stored must load with torch.load(weights_only=True).

        ck = make_checkpoint(model, {"objective": "softmax", "hparams": {}, "arch": "resnet18",
                                     "num_classes": 10, "small_input": True}, args={"seed": 0})
    """
    m = model_args
    ck = {"format": CKPT_FORMAT, "objective": m["objective"], "hparams": dict(m["hparams"]),
          "arch": m["arch"], "num_classes": int(m["num_classes"]),
          "small_input": bool(m["small_input"]), "stem_pool": m.get("stem_pool", "torchvision"),
          "model": model.state_dict() if isinstance(model, nn.Module) else model,
          "ema": ema, "args": dict(args or {}), "versions": versions()}
    ck.update(extra)
    ck["checksum"] = weights_checksum(ck)
    return ck


def save_checkpoint(path, checkpoint):
    """Atomic torch.save: write a temporary file, flush and fsync, os.replace."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, arch=None, num_classes=None, map_location="cpu",
                    advice="use another checkpoint"):
    """Load and check a checkpoint; raise UserError saying what is wrong (missing, truncated,
    not a checkpoint of this project, another arch or class count, NaN or inf weights).
    `advice` ends the message about NaN or inf weights (what the caller's user can do)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes); re-run the training that writes it")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # torch's safe loader says "Unsupported global" for a class it refuses to build; any
        # other failure (random bytes: "Unsupported operand 103") is a damaged file
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        unsafe = [l for l in lines if "Unsupported global" in l]
        if unsafe:
            raise UserError(f"checkpoint {path} holds objects that cannot be loaded safely "
                            f"({unsafe[0]}); save it with common.make_checkpoint") from None
        why = next((l for l in lines if l.startswith("Unsupported")), None) or (
            lines[0] if lines else type(e).__name__)
        raise UserError(f"checkpoint {path} is corrupt or truncated ({why}); re-save it or "
                        f"re-run the training that writes it") from None
    if not isinstance(ck, dict) or any(k not in ck for k in CKPT_REQUIRED):
        missing = [k for k in CKPT_REQUIRED if not isinstance(ck, dict) or k not in ck]
        raise UserError(f"{path} is not a checkpoint of this project (missing {', '.join(missing)});"
                        f" for torchvision weights use torchvision:ARCH:WEIGHTS")
    if arch is not None and ck["arch"] != arch:
        raise UserError(f"checkpoint {path} is a {ck['arch']}, expected {arch}")
    if num_classes is not None and ck["num_classes"] != num_classes:
        raise UserError(f"checkpoint {path} has {ck['num_classes']} classes, expected {num_classes}")
    if "checksum" not in ck:
        if path not in _UNVERIFIED:
            print(f"note: {path} holds no checksum (written before checkpoints had one): its "
                  f"weights cannot be verified", file=sys.stderr)
            _UNVERIFIED.add(path)
    elif weights_checksum(ck) != ck["checksum"]:
        raise UserError(f"checkpoint {path} is corrupt: its weights do not match the checksum "
                        f"written with them; restore a copy or re-run the training that wrote it")
    check_finite_weights(ck, path, advice)
    return ck


def check_finite_weights(ck, path, advice):
    """A UserError naming the first weight or buffer of `ck` (model, then EMA) that holds NaN or
    inf. Such a checkpoint is unusable, whatever is done with it: fine-tuned from, its loss was
    nan at once and the message blamed the learning rate; probed, its features were nan."""
    for part in ("model", "ema"):
        for name, t in (ck.get(part) or {}).items():
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                what = "NaN" if torch.isnan(t).any() else "inf"
                raise UserError(f"checkpoint {path} holds non-finite weights ({part} tensor "
                                f"{name} has {what}): it is unusable, perhaps saved after "
                                f"training diverged; {advice}")


_UNVERIFIED = set()  # paths already noted as written without a checksum


def weights_checksum(ck):
    """sha256 (16 hex digits) of a checkpoint's weights and EMA weights: names, dtypes, shapes and
    bytes. torch.load does not check the zip file's CRCs, so flipped bits inside a tensor load
    without complaint; this catches them."""
    h = hashlib.sha256()
    for part in ("model", "ema"):
        state = ck.get(part)
        for name in sorted(state or {}):
            t = state[name].detach().cpu().contiguous()
            h.update(f"{part}/{name}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_from_checkpoint(ck, use_ema=True, path="checkpoint"):
    """Rebuild the model of a checkpoint dict; load its EMA weights when present and asked for."""
    model = build_model(ck["objective"], ck["num_classes"], arch=ck["arch"],
                        small_input=ck["small_input"],
                        stem_pool=ck.get("stem_pool", "torchvision"), **ck["hparams"])
    state = ck["ema"] if use_ema and ck.get("ema") is not None else ck["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit a {ck['arch']} with {ck['num_classes']} "
                        f"classes ({str(e).splitlines()[0]})")
    return model


# The paper's 72 released networks by name: paper:OBJECTIVE/seedK, the bucket's folders
# <objective>/seed<k> (import_tf_checkpoint.fetch_released downloads, converts and caches one).
PAPER_SEEDS = 8


def paper_network(name):
    """(objective, seed) of 'paper:OBJECTIVE/seedK'; anything else is a one-line UserError.

        paper_network("paper:logit_penalty/seed7")   # ('logit_penalty', 7)
    """
    m = re.fullmatch(r"paper:(\w+)/seed(\d+)", name)
    if not m or m.group(1) not in OBJECTIVES or int(m.group(2)) >= PAPER_SEEDS:
        raise UserError(f"unknown network {name!r}: the paper's are paper:OBJECTIVE/seedK, "
                        f"OBJECTIVE one of {', '.join(OBJECTIVES)}, K 0 to {PAPER_SEEDS - 1}, "
                        f"or paper:all for all {len(OBJECTIVES) * PAPER_SEEDS}")
    return m.group(1), int(m.group(2))


def paper_names():
    """The names of the paper's 72 networks (9 objectives x 8 seeds), what paper:all means."""
    return [f"paper:{o}/seed{k}" for o in OBJECTIVES for k in range(PAPER_SEEDS)]


def checkpoint_name(name):
    """One --checkpoint value as load_pretrained takes it, checked before any long work: a run
    folder of train_imagenet.py means its final.pt (what every analysis reads); a missing file
    or an unknown paper:... name is a one-line UserError here, not after the first network's
    features. Nothing is downloaded yet."""
    if name.startswith("torchvision:"):
        return name
    if name == "paper:all":
        raise UserError(f"paper:all names {len(paper_names())} networks and this script takes "
                        f"one: give paper:OBJECTIVE/seedK")
    if name.startswith("paper:"):
        paper_network(name)
        return name
    if os.path.isdir(name):
        final = os.path.join(name, "final.pt")
        if os.path.isfile(final):
            return final
        if os.path.isfile(os.path.join(name, "last.pt")):
            raise UserError(f"{name} is a run folder whose training has not finished (last.pt "
                            f"but no final.pt); rerun its training command to finish it")
        raise UserError(f"{name} is a folder without final.pt, not a finished run of "
                        f"train_imagenet.py; pass a checkpoint file")
    if not os.path.exists(name):
        raise UserError(f"checkpoint not found: {name}")
    return name


def checkpoint_names(names):
    """checkpoint_name() of each of a script's --checkpoint values, paper:all expanded to the
    paper's 72 networks (paper_names())."""
    return [checkpoint_name(n) for name in names
            for n in (paper_names() if name == "paper:all" else [name])]


def load_pretrained(name, map_location="cpu"):
    """A model to extract features from, by checkpoint path (or run folder: its final.pt),
    'torchvision:ARCH[:WEIGHTS]' or 'paper:OBJECTIVE/seedK' (the paper's networks: downloaded
    and converted on first use, then loaded from torch's hub cache).

    Returns (model, network) with network = network_identity(...), the block every results
    file starts with."""
    if name.startswith("paper:"):
        return _load_paper_network(name, map_location)
    if name.startswith("torchvision:"):
        parts = name.split(":")
        arch = parts[1] if len(parts) > 1 else ""
        weights = parts[2] if len(parts) > 2 else "DEFAULT"
        if arch not in ARCHS:
            raise UserError(f"unknown torchvision arch {arch!r}; valid: {', '.join(ARCHS)}")
        try:
            w = torchvision.models.get_weight(f"{_weights_enum(arch)}.{weights}") \
                if weights != "DEFAULT" else torchvision.models.get_model_weights(arch).DEFAULT
        except (ValueError, KeyError, AttributeError):
            raise UserError(f"unknown weights {weights!r} for {arch}; valid: "
                            f"{', '.join(w.name for w in torchvision.models.get_model_weights(arch))}")
        try:
            model = torchvision.models.get_model(arch, weights=w)
        except Exception as e:
            raise UserError(f"cannot load torchvision weights {w} (download failed or no cache in "
                            f"{torch.hub.get_dir()}): {str(e).splitlines()[0]}")
        return model, torchvision_identity(name, arch, w.name)
    name = checkpoint_name(name)
    ck = load_checkpoint(name, map_location=map_location)
    return model_from_checkpoint(ck, path=name), network_identity(name, ck)


def _load_paper_network(name, map_location):
    """load_pretrained of paper:OBJECTIVE/seedK. Its identity is that of the converted checkpoint
    (label OBJECTIVE_sK and run id as import_tf_checkpoint.py gives it, so results join those
    of a network converted by hand), with checkpoint_path the name: the same on every machine."""
    objective, seed = paper_network(name)
    import import_tf_checkpoint     # here, not at the top: it imports this module
    path = import_tf_checkpoint.fetch_released(objective, seed)
    try:
        ck = load_checkpoint(path, map_location=map_location)
    except UserError as e:          # a damaged cache: say which file, and how to get it again
        reason = str(e).split(path, 1)[-1].split(";")[0].strip()
        raise UserError(f"{name}: the cached {path} {reason}; delete it and rerun to download "
                        f"the network again") from None
    return model_from_checkpoint(ck, path=name), {**network_identity(path, ck),
                                                  "checkpoint_path": name}


# ----------------------------------------------------------------------------------------------
# Identity: one block, the same in every results file, says which network a result belongs to.
#
#   run_id           uuid4 hex written by training into last.pt/final.pt (None: older
#                    checkpoints, torchvision weights, --from-scratch)
#   checkpoint       the short label (checkpoint_label): 'runs/softmax_s0/final.pt' -> softmax_s0
#   checkpoint_path  the path (or torchvision:ARCH:WEIGHTS or paper:OBJECTIVE/seedK name) as given
#   checkpoint_hash  file_hash of the file (torchvision:ARCH:WEIGHTS for published weights,
#                    None without weights)
#   objective, hparams, seed, arch, resolution (training input side), small_input, stem_pool
#   dataset          the SPEC string of the network's training data; dataset_name its short name
#
# A results file adds, after the block, the dataset spec and short name of the data THAT result
# was computed on (result_header).

IDENTITY_FIELDS = ("run_id", "checkpoint", "checkpoint_path", "checkpoint_hash", "objective",
                   "hparams", "seed", "arch", "dataset", "dataset_name", "resolution",
                   "small_input", "stem_pool")


def new_run_id():
    """A unique id for one training run (uuid4 hex), kept in its checkpoints and results."""
    return uuid.uuid4().hex


def network_identity(path, ck):
    """The identity of the network in checkpoint dict `ck` loaded from `path` (IDENTITY_FIELDS).

        network_identity("runs/softmax_s0/final.pt", load_checkpoint(path))["checkpoint"]
        # 'softmax_s0'
    """
    args = ck.get("args") or {}
    dataset = ck.get("dataset")
    return {"run_id": ck.get("run_id"), "checkpoint": checkpoint_label(path),
            "checkpoint_path": path, "checkpoint_hash": file_hash(path),
            "objective": ck["objective"], "hparams": dict(ck["hparams"]), "seed": args.get("seed"),
            "arch": ck["arch"], "dataset": dataset, "dataset_name": trained_on_label(dataset),
            "resolution": args.get("resolution"), "small_input": bool(ck["small_input"]),
            "stem_pool": ck.get("stem_pool", "torchvision")}


def trained_on_label(spec):
    """dataset_label of a network's training data; a bare name such as the imported networks'
    'imagenet' (trained elsewhere: no local path) is its own label; None stays None."""
    if not spec:
        return None
    try:
        return dataset_label(spec)
    except UserError:
        return re.sub(r"[^A-Za-z0-9@,.+_-]", "_", spec.split(":")[0])


def torchvision_identity(name, arch, weights):
    """Published softmax weights: no run id; trained on ImageNet (no spec: not trained here)."""
    return {"run_id": None, "checkpoint": f"torchvision_{arch}_{weights}",
            "checkpoint_path": name, "checkpoint_hash": f"torchvision:{arch}:{weights}",
            "objective": "softmax", "hparams": {}, "seed": None, "arch": arch, "dataset": None,
            "dataset_name": "imagenet", "resolution": 224, "small_input": False,
            "stem_pool": "torchvision"}


def scratch_identity(arch, small_input):
    """The random initialization of finetune.py --from-scratch (objective 'scratch')."""
    return {"run_id": None, "checkpoint": f"scratch_{arch}", "checkpoint_path": None,
            "checkpoint_hash": None, "objective": "scratch", "hparams": {}, "seed": None,
            "arch": arch, "dataset": None, "dataset_name": None, "resolution": None,
            "small_input": bool(small_input), "stem_pool": "torchvision"}


def result_header(network, data, kind):
    """The first keys of every results file: kind ('train', 'finetune_run', 'finetune',
    'linear_probe', 'cka', 'class_separation'), the identity of the network(s) (one dict:
    "network"; a list, in the order of the result's arrays: "networks"), and the dataset spec
    and short name of the data this result was computed on (load_dataset's dict or a spec).

        result_header(network, "npz:/data/cifar10@5-9", "linear_probe")
        # {'kind': 'linear_probe', 'network': {...}, 'dataset': 'npz:/data/cifar10@5-9',
        #  'dataset_name': 'cifar10@5-9'}
    """
    spec = data["spec"] if isinstance(data, dict) else data
    block = {"networks": list(network)} if isinstance(network, (list, tuple)) else \
        {"network": network}
    return {"kind": kind, **block, "dataset": spec,
            "dataset_name": dataset_label(spec) if spec else None}


def checkpoint_label(path):
    """A checkpoint's short name: the file name without extension, or its folder's name for
    final/last/best.pt ('runs/softmax_s0/final.pt' -> 'softmax_s0'); a paper network's is the
    importer's file name ('paper:softmax/seed0' -> 'softmax_s0')."""
    if path.startswith("paper:"):
        objective, seed = paper_network(path)
        return f"{objective}_s{seed}"
    label = os.path.splitext(os.path.basename(path))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent if label in ("final", "last", "best") and parent else label


def _weights_enum(arch):
    return torchvision.models.get_model_weights(arch).__name__


def file_hash(path, chunk=1 << 20):
    """sha256 of a file's content (hex, first 16 characters)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cpu_cores():
    """The cores this process may use: its CPU affinity (taskset, a container's or SLURM's
    cpuset), not the machine's count, which os.cpu_count() gives."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:     # macOS
        return os.cpu_count() or 1


def local_world_size():
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))))


def default_workers(device_type):
    """(loader worker processes per training process, why): the one rule every script uses
    when --workers is not given.

    On a GPU the CPU's one job is the input pipeline: this process's share of the cores (the
    cores it may use over the processes on this machine) less one for the process itself, with
    no fixed cap. A decoding worker does about 800 JPEG images/s at 224 px (BENCHMARKS.md), so
    a GPU that trains ResNet-50 at 4,000-6,000 img/s needs 6-8 of them. On the CPU one worker:
    the training step needs the cores, and the small preset's augmentation is cheap."""
    cores, local = cpu_cores(), local_world_size()
    if device_type == "cuda":
        n = max(1, cores // local - 1)
        return n, f"{cores} cores this process may use / {local} processes here - 1"
    return 1, "on the CPU the training step takes the other cores"


def resolve_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


# ----------------------------------------------------------------------------------------------
# Command-line helpers: argparse types, the input-resolution rule, the output folder.
#
#   p.add_argument("--batch-size", type=common.positive_int, default=256)
#   resolution = common.input_resolution(args.resolution, network)
#   common.make_out_dir(args.out)

class HelpFormatter(argparse.RawTextHelpFormatter):
    """The module docstring's layout kept (RawTextHelpFormatter), and every option's help ending
    with its default, "(default: 256)", as ArgumentDefaultsHelpFormatter does, except where the
    help says it already: in words, for a default chosen at run time (None: "the data preset's").
    A switch (store_true) is off unless given, which needs no saying."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text or not action.option_strings or d is None or d is False
                or d is argparse.SUPPRESS or isinstance(action, argparse._StoreConstAction)):
            return text
        value = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{text} (default: {value.replace('%', '%%')})".lstrip()


def argument_parser(doc):
    """The scripts' ArgumentParser: the module docstring as --help (layout kept), every option's
    default in its help (HelpFormatter), and a bad argument as ONE line `error: ...` with exit
    status 2, like every other bad input (argparse's own message starts with the whole usage
    text)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)

    def error(message):
        print(f"error: {message} (see {p.prog} --help)", file=sys.stderr)
        sys.exit(2)
    p.error = error
    return p


def refuse_unused(parser, args, used, why):
    """parser.error (one line, exit 2) naming the first option given a value other than its
    default that is not in `used` (dest names): a flag a script would ignore in this mode is
    refused, not dropped in silence. `why` ends the message. An option given at its default
    value changes nothing and passes.

        common.refuse_unused(p, args, EVALUATE_USES, "with --evaluate (it trains nothing)")
    """
    for a in parser._actions:
        if (a.option_strings and a.dest not in used and a.default is not argparse.SUPPRESS
                and getattr(args, a.dest, a.default) != a.default):
            value = getattr(args, a.dest)
            flag = next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
            if isinstance(a, argparse.BooleanOptionalAction) and value is False:
                flag = next(o for o in a.option_strings if o.startswith("--no-"))
            parser.error(f"{flag} is not used {why}")


def _number(text, kind):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(text, kind, ok, what):
    v = _number(text, kind)
    if not ok(v):
        raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
    return v


def seed(text):
    """argparse type: a random seed, an integer in [0, 2**63) (torch.manual_seed's range)."""
    return _checked(text, int, lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)")


def positive_int(text):
    """argparse type: an integer > 0."""
    return _checked(text, int, lambda v: v > 0, "> 0")


def nonnegative_int(text):
    """argparse type: an integer >= 0."""
    return _checked(text, int, lambda v: v >= 0, ">= 0")


def positive_float(text):
    """argparse type: a finite number > 0 (NaN and inf are refused)."""
    return _checked(text, float, lambda v: v > 0, "> 0")


def nonnegative_float(text):
    """argparse type: a finite number >= 0 (NaN and inf are refused)."""
    return _checked(text, float, lambda v: v >= 0, ">= 0")


def fraction(text):
    """argparse type: a number in (0, 1] (a crop fraction, a share of the data)."""
    return _checked(text, float, lambda v: 0 < v <= 1, "in (0, 1]")


def fraction_below_one(text):
    """argparse type: a number in [0, 1) (a momentum, a drop rate, a smoothing weight)."""
    return _checked(text, float, lambda v: 0 <= v < 1, "in [0, 1)")


def _core_count(text, low):
    v = _checked(text, int, lambda v: v >= low, f">= {low}")
    cores = cpu_cores()
    if v > cores:  # 1,000,000 threads crashed libgomp; 1,000 workers forked until out of memory
        raise argparse.ArgumentTypeError(f"{text!r} is more than the {cores} CPU cores this "
                                         f"process may use; give at most {cores}")
    return v


def thread_count(text):
    """argparse type: a number of CPU threads, in [1, cpu_cores()]."""
    return _core_count(text, 1)


def worker_count(text):
    """argparse type: a number of data-loading processes, in [0, cpu_cores()]."""
    return _core_count(text, 0)


def int_at_least(low, why):
    """argparse type factory: an integer >= low; `why` ends the message (why less is wrong)."""
    def check(text):
        return _checked(text, int, lambda v: v >= low, f">= {low} ({why})")
    return check


MAX_RESOLUTION = 4096  # a larger side is a typo: --resolution 100000 asked for 30 GB per batch


def resolution(text):
    """argparse type: an input side length in pixels, in [1, MAX_RESOLUTION]."""
    return _checked(text, int, lambda v: 0 < v <= MAX_RESOLUTION, f"in [1, {MAX_RESOLUTION}]")


def input_resolution(requested, network):
    """The input side length: `requested` (a --resolution flag), else the network's training
    resolution, else 224 (ImageNet's)."""
    return int(requested or network.get("resolution") or 224)


def make_out_dir(path, kind=None, overwrite=False):
    """Create the output folder and hold it for this process (hold_folder: one writer per
    folder) before any long computation, so a bad or busy --out fails early; with `kind`, for
    results of that kind only (claim_folder: another kind there is refused unless overwrite)."""
    claim_folder(path, kind, overwrite) if kind else hold_folder(path)
    if not os.access(path, os.W_OK):
        raise UserError(f"output folder {path} is not writable")


def make_shared_dir(path, flag):
    """Create a folder that several runs may write into at once (linear_probe.py's --cache), so
    not held; a file in the way or an unwritable place fails here, before any long work, not
    after the first features are extracted."""
    check_out_path(path, flag)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} exists and is a file; choose another folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder ({e.strerror or e}); choose "
                        f"another") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is not writable; choose another folder")
