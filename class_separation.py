"""Class separation of a network's features (SPEC.md, "Representation analyses").

For each checkpoint and layer (default: the penultimate `pool` features):
  r2        1 - d_within / d_total with the cosine distance d = 1 - cos(a, b), every class
            weighted equally (self-pairs included), computed as
            (mean_k ||mu_k||^2 - ||mu||^2) / (1 - ||mu||^2) from the class means mu_k of the
            unit-normalized features: O(N D), no pairwise matrix
  sparsity  the fraction of activations that are exactly zero
  dead      the fraction of channels (feature dimensions) that are zero on every image: a
            sparsity of 0.97 can be 97% dead channels or sparse codes of live ones
  dim       participation ratio of the feature covariance, (sum of eigenvalues)^2 / sum of
            eigenvalues^2 = tr(C)^2 / ||C||_F^2

    python class_separation.py --checkpoint runs/*/final.pt --data imagenet:/data/imagenet \\
        --split train --max-per-class 50 --out results/separation
    python class_separation.py --checkpoint a.pt b.pt --data digits --out /tmp/sep \\
        --layers block8,pool

Output DIR/class_separation.json: common.result_header first (kind "class_separation",
networks: the identity of every checkpoint, dataset: the spec of the images, dataset_name),
then split, max_per_class and `results`, one per network in the same order: {checkpoint,
resolution, n_images, num_classes, layers: {layer: {r2, sparsity, dead, dim}}}.
DIR/class_separation.npz: checkpoints, run_ids ('' where none), layers (the union over
checkpoints), n_images, and r2, sparsity, dead, dim of shape (checkpoints, layers), NaN where a
checkpoint has no such layer.

Importable:
    from class_separation import class_separation, sparsity, dead_fraction, participation_ratio
    class_separation(features, labels)   # R^2, float
"""
import os
import signal
import sys
import time

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while torch loads (1-2 s): one line and status 130, as later (common.run_main)
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted (Ctrl-C) while starting",
                                                   file=sys.stderr), os._exit(130)))

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# The measures (copyable: torch and numpy only; bad input raises ValueError)

def _features(features):
    x = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-d (examples, dims) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"features must be numeric, got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("features has NaN or infinite values")
    return x


def class_separation(features, labels):
    """R^2 = 1 - d_within / d_total of SPEC.md for (N, D) features and (N,) integer labels.

    Each class present counts equally, whatever its size. Raises ValueError on fewer than two
    classes, zero feature vectors (cosine undefined), NaN, or features all in one direction."""
    x = _features(features).astype(np.float64)
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"labels must be a 1-d array of {len(x)} entries, got shape {y.shape}")
    classes, inverse = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"class separation needs at least 2 classes, got {len(classes)}")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} of {len(x)} feature vectors are zero: "
                         f"cosine distance is undefined for them")
    u = torch.from_numpy(x / norms[:, None])
    sums = torch.zeros(len(classes), x.shape[1], dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(inverse.astype(np.int64)), u)
    counts = torch.from_numpy(np.bincount(inverse).astype(np.float64))
    mu_k = sums / counts[:, None]
    mu = mu_k.mean(0)
    within = (mu_k * mu_k).sum(1).mean()
    total = 1 - mu.dot(mu)
    if total <= 1e-12:
        raise ValueError("all feature vectors point in one direction: d_total is 0, "
                         "R^2 is undefined")
    return float((within - mu.dot(mu)) / total)


def sparsity(features):
    """Fraction of exactly-zero entries."""
    x = _features(features)
    return float((x == 0).mean())


def dead_fraction(features):
    """Fraction of feature dimensions that are exactly zero on every example (dead units).

    >>> dead_fraction(np.array([[0., 1., 0.], [0., 2., 3.]]))   # channel 0 never fires
    0.3333333333333333
    """
    x = _features(features)
    return float((x == 0).all(axis=0).mean())


def participation_ratio(features):
    """(sum lambda)^2 / sum lambda^2 over the eigenvalues of the feature covariance, from the
    D x D covariance or, when there are fewer examples than dimensions, the N x N Gram matrix
    of the centred features (same nonzero eigenvalues). Raises ValueError for constant features."""
    x = torch.from_numpy(_features(features).astype(np.float64))
    x = x - x.mean(0)
    c = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    trace, frob2 = torch.trace(c), c.pow(2).sum()
    if frob2 <= 0:
        raise ValueError("features are constant over the examples: dimensionality undefined")
    return float(trace * trace / frob2)


# ----------------------------------------------------------------------------------------------
# The command-line part

try:
    import common   # the kit's shared code, beside this file: the part below needs it
except ImportError:  # this file copied alone: the method above still works (it needs no common)
    common = None


def per_class_subset(split, max_per_class, seed=0):
    """A Split view with at most max_per_class images of each class (seeded, in data order)."""
    if max_per_class is None:
        return split
    keep = common.cap_per_class(split.indices, split.labels, max_per_class, seed)
    return common.Split(split.source, keep, split.label_map)


def check_memory(model, layers, resolution, n_images, label):
    """Refuse, before running, to hold more features than half the machine's memory."""
    probe = [(torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8), torch.zeros(1))]
    device = next(model.parameters()).device
    feats, _ = next(iter(common.extract_features(model, probe, layers, device)))
    need = n_images * sum(f.shape[1] for f in feats.values()) * 4
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > have / 2:
        raise common.UserError(f"{label}: {n_images} images x layers {','.join(layers)} need "
                               f"{need / 2**30:.1f} GiB of features (machine: "
                               f"{have / 2**30:.0f} GiB); use --max-per-class or fewer --layers")


def analyse(name, data, args, device):
    """(network, result) of one checkpoint: result = {resolution, n_images, num_classes,
    layers: {layer: {r2, sparsity, dead, dim}}}."""
    model, network = common.load_pretrained(name)
    model.to(device)
    resolution = common.input_resolution(args.resolution, network)
    layers = common.resolve_layers(model, args.layers,
                                   f"{network['checkpoint']} ({network['arch']})")
    view = per_class_subset(data[args.split], args.max_per_class)
    check_memory(model, layers, resolution, len(view), network["checkpoint"])
    loader = common.eval_loader(view, resolution, args.batch_size, args.workers, args.crop_fraction)
    tick = common.Ticker(f"  {network['checkpoint']}: features", len(view))
    feats, labels = common.collect_features(model, loader, layers, device, progress=tick)
    results = {}
    for layer in layers:
        f = feats[layer]
        try:
            results[layer] = {"r2": class_separation(f, labels), "sparsity": sparsity(f),
                              "dead": dead_fraction(f), "dim": participation_ratio(f)}
        except ValueError as e:
            raise common.UserError(f"{name}: layer {layer}: {e}")
    return network, {"checkpoint": network["checkpoint"], "resolution": resolution,
                     "n_images": int(len(labels)), "num_classes": int(len(np.unique(labels))),
                     "layers": results}


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="checkpoint paths (or run folders: their final.pt), "
                        "torchvision:ARCH:WEIGHTS and/or paper:OBJECTIVE/seedK or paper:all "
                        "(the paper's networks, downloaded once)")
    p.add_argument("--data", required=True,
                   help="dataset spec (digits, npz:DIR, imagenet:DIR, ...)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="train", choices=["train", "val", "test"],
                   help="the images measured")
    p.add_argument("--layers", default="pool", help="pool, all, or a comma list")
    p.add_argument("--max-per-class", default=None, type=common.int_at_least(
                       2, "one image per class gives R^2 = 1 whatever the features"),
                   help="at most this many images per class (seeded random choice; >= 2: with "
                        "one image per class R^2 is 1 whatever the features; default: all)")
    p.add_argument("--batch-size", type=common.positive_int, default=256,
                   help="feature extraction batch size")
    p.add_argument("--resolution", type=common.resolution, default=None,
                   help="input side length (default: each checkpoint's training resolution, "
                        "else 224)")
    p.add_argument("--crop-fraction", type=common.fraction, default=None,
                   help="eval center crop (default 0.875; 1 for in-memory images <= 64 px)")
    p.add_argument("--workers", type=common.worker_count, default=0,
                   help="DataLoader worker processes (at most the usable CPU cores)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of other checkpoints or settings in --out, or write "
                        "into a folder that holds results of another kind (default: refused)")
    return p.parse_args(argv)


def save(networks, results, data, args):
    """OUT/class_separation.json and .npz, unless they hold other networks' or settings'."""
    def per_network(r):  # resolution and layers of each network, as class_separation.json has
        return [(x.get("resolution"), list(x.get("layers") or {})) if isinstance(x, dict)
                else None for x in r.get("results") or []]
    head = {**common.result_header(networks, data, "class_separation"), "split": args.split,
            "max_per_class": args.max_per_class, "results": results}
    common.refuse_replacing(os.path.join(args.out, "class_separation.json"), head,
                            ("split", "max_per_class", ("resolution and layers", per_network)),
                            args.overwrite, "the class separation")
    layers = list(dict.fromkeys(l for r in results for l in r["layers"]))  # NaN where absent
    table = {k: np.array([[r["layers"].get(l, {}).get(k, np.nan) for l in layers] for r in results],
                         dtype=np.float64) for k in ("r2", "sparsity", "dead", "dim")}
    common.save_npz(os.path.join(args.out, "class_separation.npz"), **table,
                    checkpoints=np.array([net["checkpoint"] for net in networks]),
                    run_ids=np.array([net["run_id"] or "" for net in networks]),
                    layers=np.array(layers),
                    n_images=np.array([r["n_images"] for r in results], dtype=np.int64))
    common.save_json(os.path.join(args.out, "class_separation.json"),
                     {**head, "versions": common.versions()})


def main(argv=None):
    args = parse_args(argv)
    args.checkpoint = common.checkpoint_names(args.checkpoint)   # cheap checks first
    device = common.resolve_device(args.device)
    data = common.load_dataset(args.data, download=args.download)
    common.make_out_dir(args.out, "class_separation", args.overwrite)
    networks, results, start = [], [], time.time()
    for name in args.checkpoint:
        network, res = analyse(name, data, args, device)
        networks.append(network)
        results.append(res)
        vals = "  ".join(f"{l}: r2 {v['r2']:.4f} sparsity {v['sparsity']:.3f} "
                         f"dead {v['dead']:.3f} dim {v['dim']:.1f}"
                         for l, v in res["layers"].items())
        print(f"{network['checkpoint']} ({network['objective']}, seed {network['seed']}): {vals}",
              flush=True)
    save(networks, results, data, args)   # refused only now: the networks are known once loaded
    print(f"done in {time.time() - start:.1f} s; wrote {args.out}/class_separation.json and .npz")


if __name__ == "__main__":
    if common is None:
        print("error: the script needs common.py from the kit beside it; the method works "
              "alone: import it", file=sys.stderr)
        raise SystemExit(2)
    common.run_main(main)
