"""Shared pieces of the study: the nine objectives, the ResNet, the datasets, features, checkpoints.

Every script imports this file; scripts talk to each other only through checkpoint files and
.npz/.json outputs. Definitions follow ../SPEC.md (Kornblith et al., NeurIPS 2021).

    import common
    crit = common.make_criterion("logit_normalization", num_classes=1000, tau=0.05)
    model = common.build_model("cosine_softmax", 1000, arch="resnet50")
    data = common.load_dataset("digits@0-4")        # {'train','val','test', 'num_classes', ...}
    feats = common.extract_features(model, loader, ["block16", "pool"])
"""
import glob
import hashlib
import io
import json
import math
import os
import pickle
import platform
import re
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2 as T


class UserError(ValueError):
    """Bad input from the user: scripts print the message on one line and exit with status 2."""


def run_main(main):
    """Run a script's main(), turning UserError into a one-line message and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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


class ImageSource(torch.utils.data.Dataset):
    """An image list that yields (uint8 CHW tensor with 3 channels, label) without transforms.

    Backed by an in-memory uint8 array (N, H, W, C), a list of image file paths, or a list of
    torchvision datasets laid end to end. Picklable, for DataLoader workers."""

    def __init__(self, labels, images=None, paths=None, datasets=None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.images, self.paths, self.datasets = images, paths, datasets
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


def parse_subset(subset, num_classes, spec):
    """The part after '@': '0-4', '0,3,7', '0+8,1+9', 'per_class=500', '5-9,per_class=500' ->
    (list of class groups, one per new class in the order given, at most this many images per
    original class or None). A group is one original class, or several joined by '+' that
    become one new class ('0+8,1+9': airplane and ship are class 0, automobile and truck 1)."""
    parts = [p for p in (subset or "").split(",") if p.strip()]
    caps = [p for p in parts if p.strip().startswith("per_class")]
    per_class = None
    if len(caps) > 1:
        raise UserError(f"{spec!r} gives per_class twice; write e.g. @0-4,per_class=500")
    if caps:
        m = re.fullmatch(r"\s*per_class\s*=\s*(\d+)\s*", caps[0])
        if not m or int(m.group(1)) < 1:
            raise UserError(f"bad {caps[0].strip()!r} in {spec!r}; write per_class=N with N >= 1 "
                            "(at most N images of each class in every split)")
        per_class = int(m.group(1))
    rest = ",".join(p for p in parts if p not in caps)
    groups = parse_classes(rest, num_classes, spec) if rest else [[c] for c in range(num_classes)]
    return groups, per_class


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
            if im.dtype != np.uint8 or im.ndim != 4 or len(im) != len(lb):
                raise UserError(f"{f}: expected images uint8 (N,H,W,C) and labels (N,), got "
                                f"{im.dtype} {im.shape} and {lb.shape}")
            images.append(im)
            labels.append(lb.astype(np.int64))
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
        with open(cj) as fh:
            meta = json.load(fh)
        names = meta.get("classes") if isinstance(meta, dict) else meta
        if isinstance(names, list) and len(names) >= num_classes:
            classes = [str(c) for c in names]
    splits = {k: v for k, v in ranges.items() if len(v)}
    return ImageSource(labels, images=images), splits, classes, images.shape[1]


def _read_image(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return T.functional.pil_to_tensor(im.convert("RGB"))
    except Exception as e:
        raise RuntimeError(f"cannot decode image {path}: {e}") from e


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
    original class in every split, a seeded subset taken after the validation hold-out).
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
    groups, per_class = parse_subset(subset, num_all, spec)
    label_map = np.full(num_all, -1, dtype=np.int64)
    for new_class, group in enumerate(groups):
        label_map[group] = new_class
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
    names = ["+".join(classes[c] if c < len(classes) else str(c) for c in g) for g in groups]
    return {**views, "num_classes": len(groups), "classes": names, "metric": "mean_per_class" if name in MEAN_PER_CLASS
            else "top1", "name": dataset_label(spec), "spec": spec, "image_size": size}


# ----------------------------------------------------------------------------------------------
# Metrics

def accuracy_metrics(logits_or_pred, labels, num_classes=None):
    """top1, top5 (when logits given) and mean per-class accuracy, as floats in [0, 1]."""
    labels = torch.as_tensor(labels)
    x = torch.as_tensor(logits_or_pred)
    pred = x.argmax(1) if x.ndim == 2 else x
    out = {"top1": (pred == labels).double().mean().item()}
    if x.ndim == 2:
        k = min(5, x.shape[1])
        out["top5"] = (x.topk(k, 1).indices == labels[:, None]).any(1).double().mean().item()
    out["mean_per_class"] = mean_per_class_accuracy(pred, labels, num_classes)
    return out


def mean_per_class_accuracy(pred, labels, num_classes=None):
    """Mean over the classes present in `labels` of each class's accuracy."""
    pred, labels = torch.as_tensor(pred), torch.as_tensor(labels)
    k = int(num_classes or int(max(labels.max(), pred.max())) + 1)
    total = torch.bincount(labels, minlength=k).double()
    correct = torch.bincount(labels[pred == labels], minlength=k).double()
    present = total > 0
    return (correct[present] / total[present]).mean().item()


# ----------------------------------------------------------------------------------------------
# Features

def extract_features(model, loader, layers, device="cpu", dtype=None):
    """Run `model` over `loader` in eval mode; yield (dict layer -> float tensor (B, D) on
    `device`, labels) per batch. Layers: block1..blockN, pool, logits. Conv maps are flattened
    (C, H, W order). Hooks copy activations, so in-place ops downstream cannot change them."""
    valid = layer_names(model)
    bad = [l for l in layers if l not in valid]
    if bad:
        raise UserError(f"unknown layer(s) {', '.join(bad)}; valid: {', '.join(valid)}")
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
        for images, labels in loader:
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


def collect_features(model, loader, layers, device="cpu"):
    """extract_features gathered into numpy: ({layer: float32 (N, D)}, labels int64 (N,))."""
    chunks, labels = {l: [] for l in layers}, []
    for feats, y in extract_features(model, loader, layers, device):
        for l in layers:
            chunks[l].append(feats[l].cpu().numpy().astype(np.float32, copy=False))
        labels.append(np.asarray(y))
    return ({l: np.concatenate(c) for l, c in chunks.items()},
            np.concatenate(labels).astype(np.int64))


def eval_loader(split, resolution, batch_size=256, workers=0, crop_fraction=None):
    """A deterministic loader over a Split with the eval transform (no augmentation).

    Tiny in-memory images (<= 64 px) are resized without a crop unless crop_fraction is given."""
    if crop_fraction is None:
        size = split.source.images.shape[1] if split.source.images is not None else None
        crop_fraction = 1.0 if size is not None and size <= 64 else 0.875
    ds = with_transform(split, eval_transform(resolution, crop_fraction))
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
    `path`: a reader sees either the old file or the complete new one, never a torn write."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


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


def save_npz(path, **arrays):
    atomic_write(path, lambda f: np.savez(f, **arrays))


def make_checkpoint(model, objective, hparams, arch, num_classes, small_input, ema=None,
                    args=None, **extra):
    """The checkpoint dict every script reads. `ema` is the EMA model's state_dict (or None).
    Everything stored must load with torch.load(weights_only=True)."""
    ck = {"format": CKPT_FORMAT, "objective": objective, "hparams": dict(hparams), "arch": arch,
          "num_classes": int(num_classes), "small_input": bool(small_input),
          "model": model.state_dict() if isinstance(model, nn.Module) else model,
          "ema": ema, "args": dict(args or {}), "versions": versions()}
    ck.update(extra)
    return ck


def save_checkpoint(path, checkpoint):
    """Atomic torch.save: write a temporary file, flush and fsync, os.replace."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, arch=None, num_classes=None, map_location="cpu"):
    """Load and check a checkpoint; raise UserError saying what is wrong (missing, truncated,
    not a checkpoint of this project, another arch or class count)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes); re-run the training that writes it")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = [l for l in str(e).splitlines() if "Unsupported global" in l]
        raise UserError(f"checkpoint {path} holds objects that cannot be loaded safely "
                        f"({detail[0].strip() if detail else 'not tensors and plain values'}); "
                        f"save it with common.make_checkpoint")
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated ({msg}); re-save it or "
                        f"re-run the training that writes it")
    if not isinstance(ck, dict) or any(k not in ck for k in CKPT_REQUIRED):
        missing = [k for k in CKPT_REQUIRED if not isinstance(ck, dict) or k not in ck]
        raise UserError(f"{path} is not a checkpoint of this project (missing {', '.join(missing)});"
                        f" for torchvision weights use torchvision:ARCH:WEIGHTS")
    if arch is not None and ck["arch"] != arch:
        raise UserError(f"checkpoint {path} is a {ck['arch']}, expected {arch}")
    if num_classes is not None and ck["num_classes"] != num_classes:
        raise UserError(f"checkpoint {path} has {ck['num_classes']} classes, expected {num_classes}")
    return ck


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


def load_pretrained(name, map_location="cpu"):
    """A model to extract features from, by checkpoint path or 'torchvision:ARCH[:WEIGHTS]'.

    Returns (model, info) with info = {label, objective, arch, small_input, resolution, hash,
    num_classes, seed, stem_pool}."""
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
        info = {"label": f"torchvision_{arch}_{w.name}", "objective": "softmax", "arch": arch,
                "small_input": False, "resolution": 224, "hash": f"torchvision:{arch}:{w.name}",
                "num_classes": model.fc.out_features, "seed": None, "stem_pool": "torchvision"}
        return model, info
    ck = load_checkpoint(name, map_location=map_location)
    model = model_from_checkpoint(ck, path=name)
    args = ck.get("args") or {}
    info = {"label": checkpoint_label(name), "objective": ck["objective"], "arch": ck["arch"],
            "small_input": ck["small_input"], "resolution": args.get("resolution"),
            "hash": file_hash(name), "num_classes": ck["num_classes"], "seed": args.get("seed"),
            "stem_pool": ck.get("stem_pool", "torchvision")}
    return model, info


def checkpoint_label(path):
    """A checkpoint's short name: the file name without extension, or its folder's name for
    final/last/best.pt ('runs/softmax_s0/final.pt' -> 'softmax_s0')."""
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


def resolve_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# Training machinery: train_imagenet.py and finetune.py both train through fit().
#
#   parser = argparse.ArgumentParser(); common.add_training_args(parser); args = parser.parse_args()
#   dist = common.setup_distributed(args.device)     # torchrun's env: NCCL on GPUs, gloo on the CPU
#   results = common.fit(model, criterion, groups, data, train_tf, out_dir, args, meta, dist)
#   common.teardown_distributed()
#
# fit() is resumable: rerunning it on the same out_dir continues from out_dir/last.pt, mid-epoch,
# with the model, optimizer, EMA, scaler, schedule position, sampler position and every RNG, so
# an interrupted run ends with the same weights as an uninterrupted one (bitwise on the CPU with
# --deterministic). Augmentation randomness is a function of (seed, epoch, image index), not of
# the worker that happens to load the image.

import argparse
import contextlib
import copy
import random
import signal
import time

RESUME_KEYS = ("data", "arch", "epochs", "steps", "batch_size", "lr", "warmup_epochs", "seed",
               "resolution", "momentum", "nesterov", "weight_decay", "ema_epochs")
NO_BAD_STEP = 2 ** 62


def add_training_args(parser, **defaults):
    """Add the flags fit() reads. A default of None means: chosen by the script's data preset or
    by the device (see the script's help). `defaults` override these defaults."""
    g = parser.add_argument_group("training (shared with finetune.py)")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--batch-size", type=int,
                   help="GLOBAL batch size (all processes together); must divide by the world size")
    g.add_argument("--micro-batch", type=int, help="per-device images per forward/backward; "
                   "gradients accumulate to the per-device batch (default: no accumulation)")
    g.add_argument("--lr", type=float, help="learning rate per 256 images, scaled linearly to the "
                   "global batch")
    g.add_argument("--warmup-epochs", type=float, help="linear warmup, then cosine decay per step")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--weight-decay", type=float, default=8e-5,
                   help="on conv and linear weights only (common.param_groups)")
    g.add_argument("--ema-epochs", type=float, help="time constant of the exponential moving "
                   "average of the weights, in epochs (0: no EMA)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast precision; auto: bf16 on GPU, fp32 on CPU; fp16 uses GradScaler")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for GPU, off for CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for GPU, off for CPU)")
    g.add_argument("--workers", type=int, help="data loading processes per device")
    g.add_argument("--threads", type=int, help="CPU threads of the training step (default: "
                   "OMP_NUM_THREADS if set, else the cores left over by the loader workers)")
    g.add_argument("--eval-batch-size", type=int, default=256, help="per device")
    g.add_argument("--log-every", type=int, default=50,
                   help="steps between reads of the loss (the only host syncs) and log.jsonl lines")
    g.add_argument("--ckpt-minutes", type=float, default=10.0,
                   help="also write last.pt this often (checked at log steps; 0: every log step)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bitwise-reproducible runs on the CPU)")
    g.add_argument("--force-resume", action="store_true",
                   help="resume from last.pt even if schedule-defining arguments changed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: the local GPU)")
    g.add_argument("--debug-nan-at-step", type=int, default=-1, help=argparse.SUPPRESS)
    g.add_argument("--debug-kill-at-step", type=int, default=-1, help=argparse.SUPPRESS)
    parser.set_defaults(**defaults)
    return g


def setup_distributed(device="auto"):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group when
    there is more than one process: NCCL on GPUs (one GPU per local rank), gloo on the CPU.
    Returns {rank, world, local_rank, device}; a plain `python script.py` is rank 0 of 1."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif world > 1 and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.distributed.init_process_group("nccl", device_id=dev)
        else:
            torch.distributed.init_process_group("gloo")
    return {"rank": rank, "world": world, "local_rank": local_rank, "device": dev}


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def teardown_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def lr_factor(step, total_steps, warmup_steps):
    """Multiplier of the peak learning rate at `step` (0-based): linear warmup over warmup_steps
    ((step+1)/warmup), then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def _worker_init(_worker_id):
    # SLURM and friends signal the whole process group: loader workers must survive until the
    # main process has saved its checkpoint.
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def train_loader(split, transform, micro_batch, per_epoch, rank, world, seed, workers,
                 pin_memory=False):
    """(DataLoader, EpochSampler) over a Split: uint8 batches of `micro_batch` images,
    augmentation seeded per image, call sampler.set_epoch(epoch, start) before iter(loader)."""
    sampler = EpochSampler(len(split), per_epoch, rank, world, seed)
    loader = torch.utils.data.DataLoader(
        SeededAugment(split, transform, seed), batch_size=micro_batch, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory, drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def to_device(images, labels, device, channels_last=True, dtype=torch.float32):
    """A uint8 batch from a loader -> (normalized float images, labels) on the device; the copy
    is asynchronous from pinned memory and the normalization runs on the device."""
    x = normalize(images.to(device, non_blocking=True), dtype)
    if not channels_last:
        x = x.contiguous()
    return x, labels.to(device, non_blocking=True)


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


def _all_reduce(t, op="sum"):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
               "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(t, op=ops[op])
    return t


def _broadcast_buffers(module):
    """Rank 0's BN statistics to every rank (each rank updates its own from its own batch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for b in module.buffers():
            torch.distributed.broadcast(b, 0)


def evaluate(models, split, resolution, device, num_classes, rank=0, world=1, amp_dtype=None,
             batch_size=256, workers=0, criterion=None, channels_last=True):
    """Evaluate every model of {name: model} on `split` (eval transform), each image exactly once
    across ranks (rank r takes images r, r+world, ...; no padding), counts summed over ranks.
    Returns {name: {top1, top5, mean_per_class, loss, count}}; loss is criterion's (or None)."""
    part = Split(split.source, split.indices[rank::world], split.label_map)
    if split.source.images is not None:
        workers = 0  # in-memory arrays: a worker process would cost more than it saves
    loader = eval_loader(part, resolution, batch_size=batch_size, workers=workers)
    K = int(num_classes)
    sums = {n: torch.zeros(4, dtype=torch.float64, device=device) for n in models}
    per_class = {n: torch.zeros(2, K, dtype=torch.float64, device=device) for n in models}
    was_training = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        for images, labels in loader:
            x, y = to_device(images, labels, device, channels_last)
            onehot = F.one_hot(y, K).double()
            for name, m in models.items():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    z = m(x)
                z = z.float()
                hit1 = z.argmax(1) == y
                hit5 = (z.topk(min(5, z.shape[1]), 1).indices == y[:, None]).any(1)
                s = sums[name]
                s[0] += hit1.sum()
                s[1] += hit5.sum()
                if criterion is not None:
                    s[2] += criterion(z, y).double() * y.shape[0]
                s[3] += y.shape[0]
                per_class[name][0] += onehot.sum(0)
                per_class[name][1] += (onehot * hit1[:, None]).sum(0)
    out = {}
    for name, m in models.items():
        m.train(was_training[name])
        s = _all_reduce(sums[name]).tolist()
        pc = _all_reduce(per_class[name])
        count = int(round(s[3]))
        if count != len(split):
            raise AssertionError(f"evaluated {count} images of {len(split)}")
        present = pc[0] > 0
        out[name] = {"top1": s[0] / count, "top5": s[1] / count,
                     "mean_per_class": (pc[1][present] / pc[0][present]).mean().item(),
                     "loss": s[2] / count if criterion is not None else None, "count": count}
    return out


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


def _gather_rng(device, world):
    states = [rng_states(device)]
    if world > 1:
        states = [None] * world
        torch.distributed.all_gather_object(states, rng_states(device))
    return states


def _amp_dtype(precision, device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a GPU (GradScaler); use bf16 or fp32 on the CPU")
    return precision, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _write_csv(path, rows):
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = [",".join(cols)] + [",".join("" if r.get(c) is None else
                                          (f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]))
                                          for c in cols) for r in rows]
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def _truncate_log(path, step):
    """Keep the log lines up to `step` (a resumed run redoes the steps after it)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                pass  # a line torn by a kill
    atomic_write(path, lambda f: f.write("".join(keep).encode()))


def _append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def fit(model, criterion, groups, data, train_tf, out_dir, args, meta, dist,
        results_extra=None, resume_keys=RESUME_KEYS, bench_steps=None):
    """Train `model` with SGD on data['train'], evaluate on data['val'] every epoch (raw and EMA
    weights) and on data['test'] at the end; resume from out_dir/last.pt when it exists.

    model: built on the CPU, unwrapped; fit moves it, compiles it (args.compile) and wraps it in
        DDP (world > 1). criterion(logits, targets) -> mean loss. groups: param groups (each may
        carry 'lr_scale', a multiplier of the scheduled lr). data: load_dataset()'s dict (test
        may be None). train_tf: the uint8 augmentation. meta: make_checkpoint's objective,
        hparams, arch, num_classes, small_input. args: add_training_args() flags with presets
        filled in, plus `resolution` and `workers`. dist: setup_distributed()'s dict.
    Writes out_dir/{args.json, log.jsonl, summary.csv, last.pt, final.pt, results.json} (rank 0)
    and returns the results dict. SIGTERM / SIGUSR1 save last.pt and exit with 128 + signal;
    a non-finite loss raises UserError naming the step (last.pt stays the last good state).
    bench_steps: time that many steps after 5 warmup steps, return images/s, write nothing."""
    rank, world, device = dist["rank"], dist["world"], dist["device"]
    is_main, cuda = rank == 0, device.type == "cuda"
    out_dir = out_dir or ""  # bench_steps: nothing is written
    precision, amp_dtype = _amp_dtype(args.precision, device)
    use_compile = cuda if args.compile is None else args.compile
    channels_last = cuda if args.channels_last is None else args.channels_last
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

    # Batch arithmetic and the schedule (a pure function of the global step).
    B = args.batch_size
    if B % world:
        raise UserError(f"--batch-size {B} (global) does not divide by the world size {world}")
    per_device = B // world
    micro = args.micro_batch or per_device
    if per_device % micro:
        raise UserError(f"--micro-batch {micro} does not divide the per-device batch {per_device}")
    accum = per_device // micro
    train, val, test = data["train"], data.get("val"), data.get("test")
    steps_per_epoch = (len(train) // world) // per_device
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {B} is larger than the training set ({len(train)} images); "
                        f"use a smaller --batch-size")
    total_steps = steps_per_epoch * args.epochs
    if getattr(args, "steps", None):  # a step budget (finetune.py --steps): the last epoch is cut
        total_steps = min(total_steps, args.steps)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    base_lr = args.lr * B / 256
    K = data["num_classes"]

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    opt = torch.optim.SGD(groups, lr=base_lr, momentum=args.momentum, nesterov=args.nesterov,
                          fused=True)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    ema = ema_new(model) if args.ema_epochs and args.ema_epochs > 0 else None
    ema_decay = None if ema is None else 1.0 - 1.0 / max(1.0, args.ema_epochs * steps_per_epoch)
    state = {"epoch": 0, "images_in_epoch": 0, "step": 0, "images": 0, "train_seconds": 0.0,
             "step_seconds": 0.0, "epoch_sums": [0.0, 0.0, 0.0], "history": [],
             "ckpt_step": None}
    last_path, log_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "log.jsonl")
    results_path = os.path.join(out_dir, "results.json")
    run_args = {k: v for k, v in vars(args).items()}

    def checkpoint(**extra):
        return make_checkpoint(model, meta["objective"], meta["hparams"], meta["arch"],
                               meta["num_classes"], meta["small_input"],
                               ema=ema.state_dict() if ema is not None else None, args=run_args,
                               dataset=data["spec"], classes=list(data["classes"]), **extra)

    if bench_steps is None:
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UserError(f"--out {out_dir} exists and is not a folder")
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(last_path):
            _resume(last_path, args, meta, resume_keys, model, ema, opt, scaler, state, dist,
                    steps_per_epoch, B)
            if is_main:
                _truncate_log(log_path, state["step"])
                _append_log(log_path, {"event": "resume", "step": state["step"],
                                       "time": time.time()})
        elif os.path.exists(results_path) and is_main:
            print(f"note: {out_dir} has results.json but no last.pt; training again from scratch")
    state["step"] = state["epoch"] * steps_per_epoch + state["images_in_epoch"] // B

    # Models as trained: compile first, then DDP (the raw `model` is what checkpoints hold).
    net = torch.compile(model) if use_compile else model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True)
    workers = args.workers if args.workers is not None else 0
    if not cuda:  # oversubscribed cores make every small CPU kernel wait on the slowest thread
        threads = getattr(args, "threads", None) or (
            None if "OMP_NUM_THREADS" in os.environ else max(1, _cpu_count() // int(
                os.environ.get("LOCAL_WORLD_SIZE", world)) - workers))
        if threads:
            torch.set_num_threads(threads)
    loader, sampler = train_loader(train, train_tf, micro, steps_per_epoch * per_device, rank,
                                   world, args.seed, workers, pin_memory=cuda)

    if is_main and bench_steps is None:
        save_json(os.path.join(out_dir, "args.json"), {
            **run_args, "world_size": world, "per_device_batch": per_device, "micro_batch": micro,
            "accumulation": accum, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "scaled_lr": base_lr, "precision": precision, "compile": use_compile,
            "channels_last": channels_last, "train_images": len(train),
            "val_images": len(val) if val is not None else None,
            "test_images": len(test) if test is not None else None})
    if is_main:
        print(f"train: {meta['objective']} {meta['arch']} on {data['spec']} | world {world}, batch "
              f"{per_device}/device x {world} = {B} global (micro {micro}, accum {accum}) | lr "
              f"{args.lr}/256 -> {base_lr:.4g}, warmup {warmup_steps} of {total_steps} steps "
              f"({steps_per_epoch}/epoch, {args.epochs} epochs) | {precision}, compile "
              f"{use_compile}, channels_last {channels_last}, workers {workers}"
              f"{'' if cuda else f', {torch.get_num_threads()} threads'} | train "
              f"{len(train)} / val {len(val) if val is not None else '-'} / test {len(test) if test is not None else '-'} "
              f"images, {K} classes, {args.resolution}px | device {device}"
              + (f" | resumed at step {state['step']}" if state["step"] else ""), flush=True)

    flags = {"signal": 0}

    def on_signal(signum, _frame):
        flags["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        rate = _train_loop(net, model, ema, ema_decay, criterion, opt, scaler, loader, sampler,
                           state, flags, args, dist, amp_dtype, channels_last, base_lr,
                           steps_per_epoch, total_steps, warmup_steps, accum, B, data, checkpoint,
                           out_dir, bench_steps)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if bench_steps is not None:
        return rate
    return _finish(model, ema, criterion, state, args, dist, data, amp_dtype, channels_last,
                   checkpoint, out_dir, results_extra, meta, precision, use_compile)


def _resume(path, args, meta, keys, model, ema, opt, scaler, state, dist, steps_per_epoch, B):
    ck = load_checkpoint(path, arch=meta["arch"], num_classes=meta["num_classes"])
    if "train_state" not in ck:
        raise UserError(f"{path} holds no training state (not written by fit); move it away or "
                        f"use another --out")
    saved = ck.get("args") or {}
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(args, k)!r}" for k in keys
               if k in saved and hasattr(args, k) and saved[k] != getattr(args, k)]
    if ck["objective"] != meta["objective"] or ck["hparams"] != dict(meta["hparams"]):
        changed.insert(0, f"objective: {ck['objective']} {ck['hparams']} -> {meta['objective']} "
                          f"{dict(meta['hparams'])}")
    if changed and not args.force_resume:
        raise UserError(f"{path} was trained with other arguments ({'; '.join(changed)}): rerun "
                        f"with the original ones, add --force-resume, or use another --out")
    model.load_state_dict(ck["model"])
    if ema is not None:
        if ck.get("ema") is None:
            raise UserError(f"{path} has no EMA weights but --ema-epochs > 0; use --ema-epochs 0 "
                            f"or another --out")
        ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["optimizer"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    ts = ck["train_state"]
    state.update({k: ts[k] for k in state if k in ts})
    state["ckpt_step"] = ts["step"]
    if saved.get("batch_size") != B:  # only with --force-resume: restart within the epoch
        state["images_in_epoch"] -= state["images_in_epoch"] % B
    if state["images_in_epoch"] >= steps_per_epoch * B:
        state["epoch"], state["images_in_epoch"] = state["epoch"] + 1, 0
    rngs = ck.get("rng") or []
    if len(rngs) == dist["world"]:
        set_rng_states(rngs[dist["rank"]], dist["device"])
    elif dist["rank"] == 0:
        print(f"note: {path} was written by {len(rngs)} processes, now {dist['world']}: RNG "
              f"streams restart from the seed")


def _save_last(out_dir, checkpoint, state, opt, scaler, dist, ema, model):
    """Write last.pt (rank 0) with everything a bitwise resume needs."""
    _broadcast_buffers(model)
    if ema is not None:
        _broadcast_buffers(ema)
    rngs = _gather_rng(dist["device"], dist["world"])
    if dist["rank"] == 0:
        ts = {k: v for k, v in state.items() if k != "ckpt_step"}
        save_checkpoint(os.path.join(out_dir, "last.pt"), checkpoint(
            optimizer=opt.state_dict(), scaler=scaler.state_dict() if scaler else None,
            train_state=ts, rng=rngs, world_size=dist["world"]))
    state["ckpt_step"] = state["step"]
    if dist["world"] > 1:
        torch.distributed.barrier()


def _train_loop(net, model, ema, ema_decay, criterion, opt, scaler, loader, sampler, state, flags,
                args, dist, amp_dtype, channels_last, base_lr, steps_per_epoch, total_steps,
                warmup_steps, accum, B, data, checkpoint, out_dir, bench_steps):
    rank, world, device = dist["rank"], dist["world"], dist["device"]
    is_main = rank == 0
    log_path = os.path.join(out_dir, "log.jsonl")
    bench_warmup = 5
    if bench_steps is not None:
        total_steps = state["step"] + bench_warmup + bench_steps
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, images
    bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
    t_interval, wait = time.perf_counter(), 0.0
    t_run, last_ckpt = time.perf_counter(), time.perf_counter()
    bench_start = None
    net.train()
    while state["step"] < total_steps:
        epoch = state["epoch"]
        first = state["images_in_epoch"] // B
        sampler.set_epoch(epoch, first * (B // world))
        it = iter(loader)
        for b in range(first, steps_per_epoch):
            step = state["step"]
            if step == args.debug_kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if bench_steps is not None and step == bench_warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                bench_start = time.perf_counter()
            t0 = time.perf_counter()
            batches = [to_device(*next(it), device, channels_last) for _ in range(accum)]
            wait += time.perf_counter() - t0
            lr = base_lr * lr_factor(step, total_steps if bench_steps is None else 10 ** 9,
                                     warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            loss_sum, correct = train_step(net, criterion, opt, scaler, batches, amp_dtype,
                                           poison=step == args.debug_nan_at_step)
            bad = torch.where(torch.isfinite(loss_sum) | (bad < NO_BAD_STEP), bad, step)
            sums[0] += loss_sum
            sums[1] += correct
            sums[2] += B // world  # a Python number: no host-to-device copy
            if ema is not None:
                ema_update(ema, model, ema_decay, step)
            state["step"], state["images"] = step + 1, state["images"] + B
            state["images_in_epoch"] += B
            if bench_steps is not None:
                if b == steps_per_epoch - 1:
                    state["epoch"], state["images_in_epoch"] = state["epoch"] + 1, 0
                if state["step"] == total_steps:
                    break
                continue
            epoch_end = b == steps_per_epoch - 1 or state["step"] == total_steps
            if not (state["step"] % args.log_every == 0 or epoch_end):
                continue
            # --- sync point: the only place the host reads device values ---
            g_sums = _all_reduce(sums.clone()).tolist()
            first_bad = int(_all_reduce(bad.clone(), "min"))
            due = (args.ckpt_minutes <= 0
                   or time.perf_counter() - last_ckpt >= args.ckpt_minutes * 60)
            ctl = _all_reduce(torch.tensor([flags["signal"], int(due)], device=device), "max")
            signum, due = (int(v) for v in ctl.tolist())
            dt = time.perf_counter() - t_interval
            if first_bad < NO_BAD_STEP:
                _stop_on_nan(first_bad, steps_per_epoch, out_dir, state, amp_dtype)
            state["step_seconds"] += dt
            state["train_seconds"] += time.perf_counter() - t_run
            t_run = time.perf_counter()
            state["epoch_sums"] = [a + b for a, b in zip(state["epoch_sums"], g_sums)]
            record = {"step": state["step"], "epoch": epoch + state["images_in_epoch"] /
                      (steps_per_epoch * B), "loss": g_sums[0] / g_sums[2],
                      "train_top1": g_sums[1] / g_sums[2], "lr": lr,
                      "images_per_second": g_sums[2] / dt, "data_wait": wait / dt,
                      "time": time.time()}
            if is_main:
                _append_log(log_path, record)
            sums.zero_()
            if epoch_end:
                _end_epoch(net, model, ema, criterion, state, args, dist, amp_dtype,
                           channels_last, data, lr, out_dir)
                every = getattr(args, "snapshot_every", None)
                if every and state["epoch"] % every == 0 and is_main:
                    save_checkpoint(os.path.join(out_dir, "snapshots",
                                                 f"epoch{state['epoch']:03d}.pt"),
                                    checkpoint(epoch=state["epoch"], step=state["step"]))
            if epoch_end or due or signum:
                _save_last(out_dir, checkpoint, state, opt, scaler, dist, ema, model)
                last_ckpt = time.perf_counter()
            if signum:
                if is_main:
                    print(f"signal {signum}: saved {out_dir}/last.pt at step {state['step']}; "
                          f"rerun the same command to resume", flush=True)
                raise SystemExit(128 + signum)
            state["train_seconds"] += time.perf_counter() - t_run  # eval and checkpoint time
            t_run = t_interval = time.perf_counter()
            wait = 0.0
            if state["step"] >= total_steps:
                break
    if bench_steps is not None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return bench_steps * B / (time.perf_counter() - bench_start)
    return None


def _stop_on_nan(step, steps_per_epoch, out_dir, state, amp_dtype):
    last = os.path.join(out_dir, "last.pt")
    lower = "a lower --lr" + (" (or --precision fp32)" if amp_dtype is not None else "")
    kept = (f"{last} (step {state['ckpt_step']}) is intact: rerun with {lower} and "
            f"--force-resume to continue from it, or use a new --out"
            if state["ckpt_step"] is not None else
            f"no checkpoint had been written yet: rerun with {lower}")
    raise UserError(f"the loss became nan/inf at step {step + 1} (epoch "
                    f"{step // steps_per_epoch + 1}); training stopped. {kept}")


def _end_epoch(net, model, ema, criterion, state, args, dist, amp_dtype, channels_last, data, lr,
               out_dir):
    """Evaluate raw and EMA weights on val (when there is one), add a row to summary.csv."""
    models = _eval_models(model, ema)
    m = evaluate(models, data["val"], args.resolution, dist["device"], data["num_classes"],
                 dist["rank"], dist["world"], amp_dtype, args.eval_batch_size,
                 args.workers or 0, criterion, channels_last) if data.get("val") else None
    if m is None:  # training on train+val (finetune.py's final run): nothing to score per epoch
        m = {"raw": dict.fromkeys(("top1", "top5", "mean_per_class", "loss", "count"))}
    net.train()
    loss_sum, correct, n = state["epoch_sums"]
    state["epoch"] += 1
    state["images_in_epoch"] = 0
    state["epoch_sums"] = [0.0, 0.0, 0.0]
    shown = m["ema"] if "ema" in m else m["raw"]
    row = {"epoch": state["epoch"], "step": state["step"], "lr": lr, "train_loss": loss_sum / n,
           "train_top1": correct / n, "val_top1": shown["top1"], "val_top5": shown["top5"],
           "val_mean_per_class": shown["mean_per_class"], "val_loss": shown["loss"],
           "val_top1_raw": m["raw"]["top1"], "val_top5_raw": m["raw"]["top5"],
           "val_mean_per_class_raw": m["raw"]["mean_per_class"], "val_loss_raw": m["raw"]["loss"],
           "val_count": shown["count"], "train_seconds": state["train_seconds"],
           "images_per_second": state["images"] / max(state["step_seconds"], 1e-9)}
    state["history"].append(row)
    if dist["rank"] == 0:
        _write_csv(os.path.join(out_dir, "summary.csv"), state["history"])
        val = (f"val top1 {row['val_top1']:.4f} (raw {row['val_top1_raw']:.4f}) top5 "
               f"{row['val_top5']:.4f}" if row["val_top1"] is not None else "no val split")
        print(f"epoch {row['epoch']}/{args.epochs}: train loss {row['train_loss']:.4f} top1 "
              f"{row['train_top1']:.4f} | {val} | {row['images_per_second']:.0f} img/s",
              flush=True)


def _eval_models(model, ema):
    _broadcast_buffers(model)
    if ema is None:
        return {"raw": model}
    _broadcast_buffers(ema)
    return {"ema": ema, "raw": model}


def _finish(model, ema, criterion, state, args, dist, data, amp_dtype, channels_last, checkpoint,
            out_dir, results_extra, meta, precision, use_compile):
    """Test-set evaluation of the final raw and EMA weights; final.pt and results.json."""
    models = _eval_models(model, ema)
    test = data.get("test")
    t = evaluate(models, test, args.resolution, dist["device"], data["num_classes"],
                 dist["rank"], dist["world"], amp_dtype, args.eval_batch_size, args.workers or 0,
                 criterion, channels_last) if test is not None else None
    last = state["history"][-1] if state["history"] else {}
    shown = (t["ema"] if "ema" in t else t["raw"]) if t else {}
    raw = t["raw"] if t else {}
    results = {**(results_extra or {}),  # first in the file; their values win below
               "top1": shown.get("top1"), "top5": shown.get("top5"),
               "mean_per_class": shown.get("mean_per_class"), "test_loss": shown.get("loss"),
               "top1_raw": raw.get("top1"), "top5_raw": raw.get("top5"),
               "mean_per_class_raw": raw.get("mean_per_class"), "test_count": shown.get("count"),
               "val_top1": last.get("val_top1"), "val_top5": last.get("val_top5"),
               "val_mean_per_class": last.get("val_mean_per_class"),
               "val_top1_raw": last.get("val_top1_raw"), "val_top5_raw": last.get("val_top5_raw"),
               "val_count": last.get("val_count"),
               "metric": data["metric"], "weights": "ema" if ema is not None else "raw",
               "splits": "top1/top5/mean_per_class[_raw]: test split; val_*: val split, last epoch",
               "epochs": args.epochs, "steps": state["step"], "batch_size": args.batch_size,
               "lr": args.lr, "world_size": dist["world"], "precision": precision,
               "compile": use_compile, "train_seconds": state["train_seconds"],
               "images_per_second": state["images"] / max(state["step_seconds"], 1e-9),
               "num_classes": data["num_classes"], "train_images": len(data["train"]),
               "versions": versions()}
    results.update(results_extra or {})
    if dist["rank"] == 0:
        save_checkpoint(os.path.join(out_dir, "final.pt"), checkpoint(results=results))
        save_json(os.path.join(out_dir, "results.json"), results)
        print(f"done: test top1 {results['top1']} (raw {results['top1_raw']}), top5 "
              f"{results['top5']} | {results['train_seconds']:.1f} s, "
              f"{results['images_per_second']:.0f} img/s -> {out_dir}", flush=True)
    return results
