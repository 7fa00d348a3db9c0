"""Figures and report.md from whatever the study's scripts wrote.

Reads, recursively under --runs, every results.json, cka.json (with its cka.npz) and
class_separation.json. Each starts with the identity block of common.result_header: its kind
(train, evaluate, linear_probe, finetune, cka, class_separation) and the identity of its
network(s). Results are joined per network on the run id that training (or
import_tf_checkpoint.py) wrote into the checkpoint; a file without an identity block, or a network
without a run id (older checkpoints, torchvision weights), gets one note in the report and is
left out. Each file is checked whole before any of it is used: one with a field of the wrong type
or an accuracy outside [0, 1] is one note and left out, whatever its name's order. A network
without training results here (an imported one) takes its source top-1 from
train_imagenet.py --evaluate on its training data. It writes to --out, as PNG and PDF:
  fig1_top1_vs_transfer     source top-1 against mean transfer accuracy, one point per objective
  fig2_table                per objective: mean +- standard error over seeds, Welch p vs softmax
  fig3_cka_by_layer         CKA between objectives per layer against the different-seed baseline
  fig3_cka_matrices         objective x objective CKA at a few depths
  fig4_class_separation     penultimate-layer (pool) R^2 against source top-1 and transfer
  fig5_sweep_<obj>_<hp>     R^2, top-1 and transfer against a swept hyperparameter value
  report.md                 a verdict per claim of SPEC.md (holds / does not hold / cannot tell,
                            by fixed rules stated in the report), the table, rank correlations,
                            CKA and sweep summaries, and a note for every piece that was missing
                            or skipped (never a crash), and for every run that demo.sh
                            recorded as failed (a FAILED file in its folder).
  results.csv               one row per network: identity (run_id, checkpoint, objective, seed,
                            arch, dataset, trained_here, in_comparison: in the table's variant),
                            the objectives' hyperparameters (a column each, empty where an
                            objective has none), training lr/epochs/batch_size, source top1 and
                            where it came from, every transfer result (linear:<dataset>,
                            linear:<dataset>:<layer>, finetune:<dataset>, the :mean over
                            datasets), and the pool layer's r2, sparsity, dim and dead.
  objectives.csv            the table of report.md, one row per objective and quantity (the
                            column names of results.csv): n, mean, se, diff_vs_softmax, p (Welch
                            against softmax), the paper's claim and the verdict; also sparsity,
                            dim and dead. Accuracies in percent in both files, as in report.md.

Examples:
  python make_figures.py --runs results/demo --out results/demo
  python make_figures.py --runs runs/ --out figures/ --formats png
"""
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import sys
import textwrap
import typing
import warnings

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while torch loads (1-2 s): one line and status 130, as later (common.run_main)
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted (Ctrl-C) while starting",
                                                   file=sys.stderr), os._exit(130)))

import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402

try:
    from scipy import stats
except ImportError:  # scipy comes with scikit-learn, but the figures do not need it
    stats = None

ALPHA = 0.05
FT_MARGIN = 1.0   # points: fine-tuning accuracies closer than this to softmax's are "no different"
# A transfer-accuracy axis spans at least this many points, and fine-tuning's at least the
# linear probe's: autoscaled to a 2-point span, one seed's noise filled the whole panel.
MIN_ACCURACY_SPAN = 10.0
CKA_MARGIN = 0.01   # a CKA difference smaller than this is no difference, however significant
NAMES = {"extra_final_layer_l2": "Extra final layer L2"}   # where display()'s rule is wrong
TAB10 = plt.get_cmap("tab10").colors
FIXED_COLOURS = {"softmax": "black", "label_smoothing": TAB10[0], "sigmoid": TAB10[1],
                 "extra_final_layer_l2": TAB10[2], "dropout": TAB10[3],
                 "logit_penalty": TAB10[4], "logit_normalization": TAB10[5],
                 "cosine_softmax": TAB10[6], "squared_error": TAB10[9]}
MARKERS = "osD^v<>pPX*h"
# SPEC.md's claims, as the direction of each non-softmax objective against softmax.
CLAIMS = {"top1": "higher", "r2": "higher", "linear": "lower", "finetune": "no difference"}
KIND_NAMES = {"linear": "Linear probe", "finetune": "Fine-tune"}


def claim_words(claim, unit):
    """The paper's claim as the issue words it: better / worse / no difference (vs softmax)."""
    words = {"higher": "better (higher)", "lower": "worse (lower)"} if unit == "%" else {}
    return words.get(claim, claim)


def claim_text(claim):
    return "no difference from softmax" if claim == "no difference" else f"{claim} than softmax"


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--runs", required=True, help="folder searched recursively for results")
    p.add_argument("--out", default=None, help="output folder (default: --runs)")
    p.add_argument("--formats", default="png,pdf", help="comma-separated figure formats")
    p.add_argument("--dpi", type=int, default=150, help="figure resolution, dots per inch")
    p.add_argument("--overwrite", action="store_true", help="write the report into a folder "
                   "that holds results of another kind (default: refused)")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# Reading: find every result file under --runs and classify it by content.

def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def display(obj):
    """An objective's name in the report: 'label_smoothing' -> 'Label smoothing'."""
    return NAMES.get(obj, str(obj).replace("_", " ").capitalize())


def fmt_value(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def variant_of(hparams):
    return tuple(sorted((k, fmt_value(v)) for k, v in (hparams or {}).items()))


RESULT_FILES = ("results.json", "cka.json", "class_separation.json")
KINDS = ("train", "evaluate", "linear_probe", "finetune", "cka", "class_separation")
TRANSFER = {"linear_probe": "linear", "finetune": "finetune"}   # result kind -> network field


def read_results(runs, notes):
    """{kind: [(path, content)]} of every results file under `runs`, by the 'kind' of its
    identity block (common.result_header), each checked whole (problems()) before any of it is
    used. Files without an identity block, unreadable or malformed ones get a note each, and so
    does every run that failed (demo.sh's FAILED file: a network, or one of its results, is
    missing)."""
    found = {k: [] for k in KINDS}
    for root, dirs, files in os.walk(runs):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "FAILED" in files and "results.json" not in files:  # beside results.json: stale
            notes.append(failure_note(os.path.join(root, "FAILED"), runs))
        for name in sorted(f for f in files if f in RESULT_FILES):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, runs)
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError, RecursionError) as e:   # RecursionError: [[[[...]]]]
                notes.append(f"`{rel}`: cannot be read as JSON ({type(e).__name__}: "
                             f"{str(e)[:80]}); skipped.")
                continue
            kind = data.get("kind") if isinstance(data, dict) else None
            if kind in KINDS:
                why = next(problems(kind, data), None)
                if why:
                    notes.append(f"`{rel}`: {why}; skipped.")
                else:
                    found[kind].append((path, data))
            elif kind != "finetune_run":   # a fine-tune grid point: finetune.py's own business
                notes.append(f"`{rel}`: no identity block (written before results carried one, "
                             f"issue 12); skipped: rerun the step that wrote it.")
    return found


def failure_note(path, runs):
    """The note for a FAILED file: what is missing (a network when its training failed) and why
    (the file's first line: exit status, error, log)."""
    rel = os.path.relpath(os.path.dirname(path), runs)
    try:
        with open(path, errors="replace") as f:
            why = f.readline().strip() or "no message"
    except OSError as e:
        why = f"FAILED is unreadable ({e.strerror or e})"
    what = ("this network is missing from every result" if rel.split(os.sep)[0] == "train"
            else "its results are missing")
    return f"`{rel}` failed, so {what}: {why}"


# What each field read from a results file must be (None: absent is fine too): checked for a
# whole file before any of it is used, so a damaged file is one note, never a traceback, and
# never registers a run id that hides the good copy of the run (issue 25).
SCALAR = (str, int, float, bool)
IDENTITY_TYPES = {"run_id": str, "checkpoint": str, "checkpoint_path": str,
                  "checkpoint_hash": str, "objective": str, "hparams": dict, "seed": int,
                  "arch": str, "dataset": str, "dataset_name": str, "resolution": int,
                  "small_input": bool, "stem_pool": str}
FIELD_TYPES = {"dataset": str, "dataset_name": str, "layer": str, "folds": int, "metric": str,
               "preprocessing": str, "split": str, "grid": dict, "fold_results": list,
               "layers": list, "results": list}
SCALAR_FIELDS = ("lr", "epochs", "steps", "batch_size", "train_images", "num_classes", "precision",
                 "train_seconds", "count", "resolution", "n_images", "n_train", "n_val", "n_test",
                 "best_lambda", "best_lr", "best_wd", "standardize", "max_per_class")
ACCURACY = {"train": "top1", "evaluate": "top1", "linear_probe": "test_accuracy",
            "finetune": "test_accuracy"}


def of_type(v, want):
    """isinstance(v, want), where a boolean is no int."""
    return isinstance(v, want) and not (want is int and isinstance(v, bool))


def type_name(v):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number")


def identity_problems(identity, where):
    """Why a network identity block is unusable (a generator, as problems())."""
    if not isinstance(identity, dict):
        yield f"{where} is {type_name(identity)}, not a network identity block"
        return
    yield from (f"{where}.{key} is {type_name(identity[key])}" for key, want in
                IDENTITY_TYPES.items() if identity.get(key) is not None and
                not of_type(identity[key], want))
    if any(not isinstance(v, SCALAR) and v is not None for v in
           (identity.get("hparams") or {}).values()):
        yield f"{where}.hparams holds a value that is not a number, string or boolean"


def problems(kind, r):
    """Why results file content `r` of `kind` cannot be used, in a few words: every field this
    script reads is of the right type, the network identities are identity blocks, and the
    accuracy is a number in [0, 1] (a 5.0 was shown as 500%). A generator: read_results()
    reports the first reason; where later checks rely on a field, its check returns after it."""
    for key, want in FIELD_TYPES.items():   # class_separation's layers are inside "results"
        v = r.get(key)
        if v is not None and not of_type(v, want) and (kind, key) != ("class_separation", "layers"):
            yield f"{key} is {type_name(v)}"
    for key in SCALAR_FIELDS:   # shown in the report, or compared: plain values
        if r.get(key) is not None and not isinstance(r[key], SCALAR):
            yield f"{key} is {type_name(r[key])}, not a plain value"
    if kind in ("cka", "class_separation"):
        if not isinstance(r.get("networks"), list) or not r["networks"]:
            yield "networks is not a non-empty list of network identity blocks"
            return
        for i, identity in enumerate(r["networks"]):
            yield from identity_problems(identity, f"networks[{i}]")
    elif r.get("network") is not None or kind in ("train", "evaluate"):
        yield from identity_problems(r.get("network"), "network")
    if kind == "cka" and any(not isinstance(l, str) for l in r.get("layers") or []):
        yield "layers holds a value that is not a layer name"
    if kind == "class_separation":
        results = r.get("results") or []
        if len(results) != len(r["networks"]):
            yield f"{len(r['networks'])} networks but {len(results)} results"
        for i, res in enumerate(results):
            layers = res.get("layers") if isinstance(res, dict) else None
            if not isinstance(layers, dict) or any(
                    not isinstance(v, dict) or any(x is not None and not isinstance(x, (int, float))
                                                   for x in v.values()) for v in layers.values()):
                yield f"results[{i}] is not a result per layer of numbers"
    if any(not isinstance(f, dict) for f in r.get("fold_results") or []):
        yield "fold_results holds a value that is not an object"
    key = ACCURACY.get(kind)
    if key and not finite(r.get(key)):
        yield f"{key} is missing or not a finite number ({r.get(key)!r})"
    elif key and not 0 <= r[key] <= 1:
        yield f"{key} is {r[key]!r}, not an accuracy in [0, 1]"


# ----------------------------------------------------------------------------------------------
# Networks: one per training run id, with its transfer and class-separation results attached.

def make_network(identity):
    return {"run_id": identity.get("run_id"), "hash": identity.get("checkpoint_hash"),
            "objective": str(identity.get("objective")), "seed": identity.get("seed"),
            "label": identity.get("checkpoint"), "hparams": dict(identity.get("hparams") or {}),
            "arch": identity.get("arch"), "dataset": identity.get("dataset"),
            "dataset_name": identity.get("dataset_name"), "linear": {}, "finetune": {},
            "layers": {}, "sources": {}, "orphan": False, **dict.fromkeys(
                ("epochs", "lr", "batch_size", "top1", "r2", "sparsity", "dim", "dead"))}


def network_of(identity, rel, nets, notes):
    """The network (by run id) that a result's identity names, or None with a note. A run id
    not trained under --runs becomes a network of its own (an orphan)."""
    if not isinstance(identity, dict):
        notes.append(f"`{rel}`: no network identity (e.g. a --features probe); skipped.")
        return None
    rid = identity.get("run_id")
    if rid is None:
        path = str(identity.get("checkpoint_path"))
        why = (f"published weights {path} are not part of the objective comparison"
               if path.startswith("torchvision:") else
               f"checkpoint {identity.get('checkpoint')} has no run id (written before run ids)")
        notes.append(f"`{rel}`: {why}; skipped.")
        return None
    net = nets.get(rid)
    if net is None:
        net = nets[rid] = {**make_network(identity), "orphan": True}
    elif net["hash"] and identity.get("checkpoint_hash") not in (None, net["hash"]):
        notes.append(f"`{rel}`: checkpoint {identity.get('checkpoint')} of run {rid} is not that "
                     f"run's final.pt (another content hash, e.g. a snapshot); skipped.")
        return None
    return net


def training_networks(found, runs, notes):
    """{run id: network} from the training results."""
    nets = {}
    for path, r in found["train"]:
        rel = os.path.relpath(path, runs)
        identity = r.get("network") or {}
        if identity.get("run_id") is None or identity["run_id"] in nets:
            notes.append(f"`{rel}`: training results without a run id, or with one already "
                         f"seen (a copied run folder?); skipped.")
            continue
        net = nets[identity["run_id"]] = make_network(identity)
        net.update({k: r.get(k) for k in ("epochs", "lr", "batch_size")})
        net["top1"] = 100 * float(r["top1"])   # a fraction in [0, 1] in every file (problems())
    return nets


def attach_evaluations(found, nets, runs, notes):
    """Source top-1 from train_imagenet.py --evaluate results (kind 'evaluate') for networks
    without training results here, e.g. the paper's imported networks: the evaluation on the
    network's own training data, with TF's preprocessing for imported (tf_same) networks when
    both were run, as the authors scored them."""
    chosen = {}
    for path, r in found["evaluate"]:
        rel = os.path.relpath(path, runs)
        net = network_of(r.get("network"), rel, nets, notes)
        if net is None or not net["orphan"]:
            continue    # a trained network: its training results.json gives the source top-1
        if r.get("dataset_name") != net["dataset_name"]:
            notes.append(f"`{rel}`: evaluated on {r.get('dataset_name')}, not on the network's "
                         f"training data ({net['dataset_name']}); not a source top-1.")
            continue
        wanted = "tf" if (r.get("network") or {}).get("stem_pool") == "tf_same" else "torchvision"
        rank = (r.get("preprocessing") == wanted, os.path.getmtime(path))
        if net["run_id"] not in chosen or rank > chosen[net["run_id"]][0]:
            chosen[net["run_id"]] = (rank, r)
    for rid, (_, r) in chosen.items():
        nets[rid]["top1"] = 100 * float(r["top1"])
        nets[rid]["sources"]["top1"] = f"evaluate ({r.get('preprocessing')} preprocessing)"


def target_of(r):
    """A transfer result's target: its dataset name, with ' (K-fold)' for linear_probe --folds
    (scored over all the data set's images: another number than its test split's)."""
    return str(r.get("dataset_name")) + (f" ({r['folds']}-fold)" if r.get("folds") else "")


def attach_transfer(found, nets, runs, notes, scratch):
    for kind, field in TRANSFER.items():
        seen = {}
        for path, r in found[kind]:
            rel = os.path.relpath(path, runs)
            acc, dataset = r["test_accuracy"], target_of(r)   # finite, checked by problems()
            if (r.get("network") or {}).get("objective") == "scratch":
                scratch.setdefault((field, dataset), []).append(float(acc))
                continue
            net = network_of(r.get("network"), rel, nets, notes)
            if net is None:
                continue
            if r.get("layer") not in (None, "pool"):   # reported in its own table
                net["layers"][(dataset, r["layer"])] = 100 * float(acc)
                continue
            key = (net["run_id"], dataset)
            if key in seen:
                older, newer = sorted([seen[key], path], key=os.path.getmtime)
                notes.append(f"`{os.path.relpath(older, runs)}` and "
                             f"`{os.path.relpath(newer, runs)}`: two "
                             f"{KIND_NAMES[field].lower()} results for one network and dataset; "
                             f"the newer is used.")
                if newer != path:
                    continue
            seen[key] = path
            net[field][dataset] = 100 * float(acc)
            net["sources"].setdefault("metric_" + field, {})[dataset] = r.get("metric", "top1")


def attach_class_separation(found, nets, runs, notes):
    by_data = {}
    for path, d in found["class_separation"]:
        by_data.setdefault(str(d.get("dataset_name")), []).append((path, d))
    if not by_data:
        return
    chosen = max(by_data, key=lambda k: sum(len(d.get("networks") or []) for _, d in by_data[k]))
    if len(by_data) > 1:
        notes.append(f"Class separation was measured on several datasets "
                     f"({', '.join(sorted(by_data))}); the figures use {chosen!r}.")
    missing_pool = 0
    for path, d in by_data[chosen]:
        rel = os.path.relpath(path, runs)
        for identity, res in zip(d["networks"], d["results"]):   # as many, checked by problems()
            pool = (res.get("layers") or {}).get("pool") or {}
            if not finite(pool.get("r2")):
                missing_pool += 1
                continue
            net = network_of(identity, rel, nets, notes)
            if net is not None:
                net["r2"] = float(pool["r2"])
                for name in ("sparsity", "dim", "dead"):   # dead: class_separation.py's newer
                    net[name] = float(pool[name]) if finite(pool.get(name)) else None
    if missing_pool:
        notes.append(f"Class separation: {missing_pool} entr{'y' if missing_pool == 1 else 'ies'} "
                     f"without a finite R^2 for the pool layer; skipped.")


def choose_variants(nets, notes):
    """Per objective, the networks of the main hyperparameter variant (the paper's values when
    present, else the most common), and every variant for the sweeps."""
    by_obj = {}
    for n in nets:
        by_obj.setdefault(n["objective"], []).append(n)
    order = [o for o in common.OBJECTIVES if o in by_obj] + sorted(
        o for o in by_obj if o not in common.OBJECTIVES)
    groups = {}
    for obj in order:
        variants = {}
        for n in by_obj[obj]:
            variants.setdefault(variant_of(n["hparams"]), []).append(n)
        paper = common.OBJECTIVES.get(obj, {})

        def is_paper(v):
            d = dict(v)
            return all(d.get(k, fmt_value(x)) == fmt_value(x) for k, x in paper.items())
        main = sorted(variants, key=lambda v: (not is_paper(v), -len(variants[v]), v))[0]
        if len(variants) > 1 or not is_paper(main):
            hp = ", ".join(f"{k}={v}" for k, v in main) or "none"
            notes.append(f"{display(obj)}: {len(variants)} hyperparameter setting(s); the table, "
                         f"CKA and class-separation comparison use {hp}"
                         f"{'' if is_paper(main) else ' (not the paper values)'}.")
        groups[obj] = variants[main]
    return groups, by_obj


# ----------------------------------------------------------------------------------------------
# Statistics

def values(nets, quantity):
    """The finite values of quantity(network) over `nets`, as floats."""
    return [float(v) for v in map(quantity, nets) if finite(v)]


def mean_se(vals):
    v = np.asarray(vals, dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return float(v.mean()), se, len(v)


def welch_p(a, b):
    if stats is None or len(a) < 2 or len(b) < 2:
        return math.nan
    with warnings.catch_warnings(action="ignore"), np.errstate(all="ignore"):
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def welch(a, b, level=1 - ALPHA):
    """Welch's comparison of mean(a) - mean(b): {diff, se, df, low, high, p} with the interval
    at `level`, or None with fewer than 2 values on a side (or no scipy).

    >>> w = welch([70.1, 70.5, 70.3], [68.0, 68.4, 68.2])
    >>> round(w["diff"], 2), w["low"] > 0, w["p"] < 0.01
    (2.1, True, True)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if stats is None or len(a) < 2 or len(b) < 2:
        return None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    diff = float(a.mean() - b.mean())
    if se == 0:
        return {"diff": diff, "se": 0.0, "df": math.inf, "low": diff, "high": diff,
                "p": 1.0 if diff == 0 else 0.0}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = float(stats.t.ppf(0.5 + level / 2, df))
    return {"diff": diff, "se": se, "df": df, "low": diff - t * se, "high": diff + t * se,
            "p": float(2 * stats.t.sf(abs(diff) / se, df))}


def tost_p(a, b, margin):
    """Two one-sided Welch tests of |mean(a) - mean(b)| < margin: the larger one-sided p-value
    (below ALPHA: equivalent within the margin, i.e. the 1 - 2 ALPHA interval lies inside
    [-margin, +margin]); NaN when welch() gives None."""
    w = welch(a, b)
    if w is None:
        return math.nan
    if w["se"] == 0:
        return 0.0 if abs(w["diff"]) < margin else 1.0
    lower = stats.t.sf((w["diff"] + margin) / w["se"], w["df"])   # H0: diff <= -margin
    upper = stats.t.cdf((w["diff"] - margin) / w["se"], w["df"])  # H0: diff >= +margin
    return float(max(lower, upper))


def holm(ps):
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN, not counted).

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    """
    idx = [i for i, p in enumerate(ps) if finite(p)]
    order = sorted(idx, key=lambda i: ps[i])
    out, running = [math.nan] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * ps[i]))
        out[i] = round(running, 12)
    return out


def spearman(x, y):
    if stats is None or len(x) < 3:
        return math.nan, math.nan
    with warnings.catch_warnings(action="ignore"), np.errstate(all="ignore"):
        r = stats.spearmanr(x, y)
    return float(r.statistic if hasattr(r, "statistic") else r[0]), float(r.pvalue)


def mean_of(d):
    return float(np.mean(list(d.values()))) if d else None


# The accuracies that figures 1, 4 and the rank correlations set against top-1 or R^2, one number
# per network: key -> (quantity, axis label, name, the paper's direction of R^2 against it).
ACCURACIES = {
    "top1": (lambda n: n["top1"], "source-task top-1 accuracy (%)", "source top-1", "positive"),
    "linear": (lambda n: mean_of(n["linear"]), "linear probe accuracy, mean over datasets (%)",
               "linear probe mean", "negative"),
    "finetune": (lambda n: mean_of(n["finetune"]), "fine-tune accuracy, mean over datasets (%)",
                 "fine-tune mean", "none")}


def verdict(claim, diff, p):
    """The observed direction against softmax and whether it agrees with the paper's claim."""
    if not finite(diff):
        return ""
    if not finite(p):
        return "untested"
    if p >= ALPHA:
        return "agrees" if claim == "no difference" else "n.s."
    if claim == "no difference":
        return "differs"
    return "agrees" if claim == ("higher" if diff > 0 else "lower") else "opposite"


def quantities(nets, layers=False, separation=False):
    """The quantities with a value in `nets`, each (key, header, claim, quantity, digits, unit):
    source top-1, R^2 (pool), every transfer target (linear:<dataset>, finetune:<dataset>, and
    <kind>:mean over several), with `layers` the probes of other layers than pool
    (linear:<dataset>:<layer>), with `separation` the pool layer's sparsity, dimensionality and
    dead units (claim None: not a claim of the paper). One catalogue for the report's table,
    results.csv and objectives.csv, so that their columns cannot drift apart."""
    cols = [("top1", "Source top-1", CLAIMS["top1"], lambda n: n["top1"], 2, "%"),
            ("r2", "Class separation R^2 (pool)", CLAIMS["r2"], lambda n: n["r2"], 3, "")]
    for kind in ("linear", "finetune"):
        datasets = sorted({d for n in nets for d in n[kind]})
        metrics = {d: m for n in nets for d, m in n["sources"].get("metric_" + kind, {}).items()}
        for d in datasets:
            per_class = " mean per-class" if metrics.get(d) == "mean_per_class" else ""
            cols.append((f"{kind}:{d}", f"{KIND_NAMES[kind]} {d}{per_class}", CLAIMS[kind],
                         lambda n, k=kind, d=d: n[k].get(d), 2, "%"))
        if kind == "linear" and layers:
            cols += [(f"linear:{d}:{layer}", f"Linear probe {d}: {layer}", None,
                      lambda n, dl=(d, layer): n["layers"].get(dl), 2, "%")
                     for d, layer in sorted({dl for n in nets for dl in n["layers"]})]
        if len(datasets) > 1:
            cols.append((f"{kind}:mean", f"{KIND_NAMES[kind]} mean over datasets", CLAIMS[kind],
                         lambda n, k=kind: mean_of(n[k]), 2, "%"))
    if separation:
        cols += [(k, name, None, lambda n, k=k: n[k], 3, "") for k, name in SEPARATION]
    return [c for c in cols if values(nets, c[3])]


SEPARATION = (("sparsity", "Sparsity (pool, fraction of zeros)"),
              ("dim", "Participation-ratio dimensionality (pool)"),
              ("dead", "Dead units (pool, fraction of channels zero on every image)"))


def table_cells(groups, cols):
    """{objective: {column key: dict(mean, se, n, p, diff, verdict, vals)}}."""
    ref = groups.get("softmax", [])
    out = {}
    for obj, nets in groups.items():
        out[obj] = {}
        for key, _, claim, q, _, _ in cols:
            vals, base = values(nets, q), values(ref, q)
            m, se, n = mean_se(vals)
            bm = mean_se(base)[0]
            diff = m - bm if obj != "softmax" and base and vals else math.nan
            p = welch_p(vals, base) if obj != "softmax" else math.nan
            out[obj][key] = {"mean": m, "se": se, "n": n, "p": p, "diff": diff, "vals": vals,
                             "verdict": verdict(claim, diff, p) if obj != "softmax" else ""}
    return out


def cell_text(c, digits, with_verdict=True, sep=", "):
    if c["n"] == 0:
        return "-"
    s = f"{c['mean']:.{digits}f}"
    s += f" ± {c['se']:.{digits}f}" if finite(c["se"]) else f" (n={c['n']})"
    if finite(c["p"]):
        s += f"{sep}p={c['p']:.2g}"
    if with_verdict and c["verdict"] and c["verdict"] != "untested":
        s += f" ({c['verdict']})"
    return s


def mean_text(vals, digits):
    """Mean ± standard error over seeds, the mean alone for one value, '-' for none.

    >>> mean_text([70.0, 70.5], 2), mean_text([0.31], 3), mean_text([], 2)
    ('70.25 ± 0.25', '0.310', '-')
    """
    m, se, n = mean_se(vals)
    return "-" if n == 0 else f"{m:.{digits}f}" + (f" ± {se:.{digits}f}" if finite(se) else "")


# ----------------------------------------------------------------------------------------------
# What each report section gives back, and the figures they draw

class Section(typing.NamedTuple):
    """A report section: its lines of report.md, its verdicts on the paper's claims
    ([(claim, (verdict, evidence))]) and its notes on what was missing or skipped."""
    lines: list
    verdicts: tuple = ()
    notes: tuple = ()


@dataclasses.dataclass
class Figures:
    """Where and how figures are saved, each objective's colour and marker (the same in every
    figure), and the figure files written so far."""
    out: str
    formats: list
    dpi: int
    colours: dict
    order: list
    written: list = dataclasses.field(default_factory=list)

    def marker(self, obj):
        return MARKERS[self.order.index(obj) % len(MARKERS)]

    def save(self, fig, name):
        for ext in self.formats:
            path = os.path.join(self.out, f"{name}.{ext}")
            try:  # atomically: a full disk leaves the old figure, never a 0-byte file
                common.atomic_write(path, lambda f, ext=ext: fig.savefig(f, format=ext,
                                                                       dpi=self.dpi))
            except OSError as e:
                plt.close(fig)
                raise common.UserError(f"cannot write {path}: {e.strerror or e}; check --out")
            self.written.append(path)
        plt.close(fig)

    def embed(self, name, alt):
        """report.md's link to figure `name`, where its PNG was written."""
        return [f"![{alt}]({name}.png)", ""] if any(
            os.path.basename(p) == f"{name}.png" for p in self.written) else []


def legend_right(fig, objectives, figures, keys):
    """The objectives' colours and markers; `keys`, what the marks mean, below them after a
    blank line."""
    handles = [plt.Line2D([], [], color=figures.colours[o], marker=figures.marker(o),
                          linestyle="", markersize=8, label=display(o)) for o in objectives]
    handles += [plt.Line2D([], [], linestyle="", label=" "), *keys]
    fig.legend(handles=handles, loc="outside right center", title="Objective", frameon=False)


def mean_keys(ax):
    """Legend entries of scatter_means' marks: a translucent dot per network (seed), the mean
    with standard-error bars. The bars' handle is an errorbar at NaN: drawn nowhere."""
    one = plt.Line2D([], [], color="0.3", alpha=0.35, marker="o", markersize=5, linestyle="",
                     label="one network (a seed)")
    mean = ax.errorbar([math.nan], [math.nan], xerr=[1], yerr=[1], color="0.3", marker="o",
                       markersize=7, capsize=3, linestyle="", label="mean ± s.e. over seeds")
    return [one, mean]


def widen_transfer(axes):
    """{kind: ax} of transfer accuracies: each y axis widened about its centre to span
    MIN_ACCURACY_SPAN at least, fine-tuning's at least what the linear probe's spans, inside
    [0, 100] (accuracy in %) unless what is drawn already goes past it."""
    span = MIN_ACCURACY_SPAN
    for ax in (axes[k] for k in ("linear", "finetune") if k in axes):
        a, b = ax.get_ylim()
        if b - a < span:
            lo, hi = min(0.0, a), max(100.0, b)
            start = min(max((a + b) / 2 - span / 2, lo), hi - span)
            ax.set_ylim(start, start + span)
        span = max(span, -np.subtract(*ax.get_ylim()))


def scatter_means(ax, groups, xq, yq, figures):
    """Per objective: translucent points per network, the mean with standard-error bars."""
    drawn = []
    for obj, nets in groups.items():
        pairs = [(xq(n), yq(n)) for n in nets]
        pairs = [(x, y) for x, y in pairs if finite(x) and finite(y)]
        if not pairs:
            continue
        xs, ys = np.array(pairs, dtype=float).T
        mx, sx, _ = mean_se(xs)
        my, sy, _ = mean_se(ys)
        ax.scatter(xs, ys, color=figures.colours[obj], alpha=0.25, s=18,
                   marker=figures.marker(obj), linewidths=0)
        ax.errorbar(mx, my, xerr=sx if finite(sx) else None, yerr=sy if finite(sy) else None,
                    color=figures.colours[obj], marker=figures.marker(obj),
                    markersize=8, capsize=3, linestyle="")
        drawn.append(obj)
    ax.grid(alpha=0.3)
    return drawn


def fig_panels(figures, name, groups, x, panels, size, title):
    """Figures 1 and 4: a row of scatter_means panels, `x` across, one quantity per panel up;
    panels are (kind, quantity, x label, y label, title, title's keywords), `size` a panel's
    (width, height) in inches; transfer axes widened (widen_transfer), the legend on the right."""
    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels) + 2.5, size[1]),
                             layout="constrained", squeeze=False)
    drawn = set()
    for ax, (_, y, xlabel, ylabel, panel_title, title_kw) in zip(axes[0], panels):
        drawn.update(scatter_means(ax, groups, x, y, figures))
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_title(panel_title, **title_kw)
    widen_transfer({panel[0]: ax for ax, panel in zip(axes[0], panels)})
    legend_right(fig, [o for o in groups if o in drawn], figures, mean_keys(axes[0, 0]))
    fig.suptitle(title)
    figures.save(fig, name)


def fig_transfer(groups, figures):
    """Figure 1; its notes."""
    kinds = [k for k in ("linear", "finetune")
             if any(n[k] and n["top1"] is not None for g in groups.values() for n in g)]
    if not kinds:
        return ["Figure 1 skipped: it needs source top-1 and transfer results of the same "
                "networks."]
    top1, top1_label = ACCURACIES["top1"][:2]
    fig_panels(figures, "fig1_top1_vs_transfer", groups, top1,
               [(k, ACCURACIES[k][0], top1_label, ACCURACIES[k][1], f"{KIND_NAMES[k]} transfer "
                 f"(paper: {claim_text(CLAIMS[k])})", {}) for k in kinds], (5.5, 4.8),
               "Source accuracy against transfer accuracy (mean ± standard error over seeds)")
    return []


def fig_class_separation(groups, figures):
    """Figure 4: R^2 against source top-1 and transfer, with Spearman's rho over objective
    means; its notes."""
    nets = [n for g in groups.values() for n in g]
    if not any(n["r2"] is not None for n in nets):
        return ["Figure 4 skipped: no class-separation R^2 (pool layer) found."]
    panels = []
    for kind, (q, label, _, _) in ACCURACIES.items():
        if any(n["r2"] is not None and finite(q(n)) for n in nets):
            pairs = objective_means(groups, lambda n: n["r2"], q)
            rho = spearman(*zip(*pairs))[0] if len(pairs) >= 3 else math.nan
            panels.append((kind, q, "class separation R^2 of the pooled features (unitless)",
                           label, f"Spearman ρ over objectives: {rho:.2f}" if finite(rho) else
                           "Spearman ρ: n/a (fewer than 3 objectives)", {"fontsize": 10}))
    if not panels:
        return ["Figure 4 skipped: R^2 found but no top-1 or transfer accuracy of the same "
                "networks."]
    fig_panels(figures, "fig4_class_separation", groups, lambda n: n["r2"], panels, (4.8, 4.6),
               "Class separation of the penultimate layer (mean ± standard error over seeds)")
    return []


def fig_table(groups, cols, cells, figures):
    """The per-objective table as a figure: blue cells above softmax, red below, pale where the
    difference is not significant; the paper's claim under each column header."""
    objs = list(groups)
    headers = [header_text(h, unit) + f"\npaper: {claim_words(claim, unit)}"
               for _, h, claim, _, _, unit in cols]
    # a column as wide as its longest header line (about 0.075 inch a character at 8 pt)
    width = max([1.45] + [0.075 * len(line) for h in headers for line in h.splitlines()])
    fig, ax = plt.subplots(figsize=(width * len(cols) + 2.8, 0.75 * len(objs) + 2.4),
                           layout="constrained")
    colour = np.full((len(objs), len(cols)), np.nan)
    for j, (key, *_rest) in enumerate(cols):
        diffs = np.array([cells[o][key]["diff"] for o in objs], dtype=float)
        scale = np.nanmax(np.abs(diffs)) if np.isfinite(diffs).any() else 0
        if scale > 0:
            significant = np.array([cells[o][key]["p"] < ALPHA for o in objs])
            colour[:, j] = diffs / scale * np.where(significant, 1.0, 0.3)
    ax.imshow(np.ma.masked_invalid(colour), cmap="RdBu", vmin=-1.5, vmax=1.5, aspect="auto")
    for i, o in enumerate(objs):
        for j, (key, _, _, _, digits, _) in enumerate(cols):
            c = cells[o][key]
            text = cell_text(c, digits, with_verdict=False, sep="\n")
            if c["verdict"] and c["verdict"] != "untested":
                text += f"\n{c['verdict']}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7.5, linespacing=1.3)
    ax.set_xticks(range(len(cols)), headers, fontsize=8)
    ax.xaxis.tick_top()
    rows = [f"{display(o)} (n={len(groups[o])}{', reference' if o == 'softmax' else ''})"
            for o in objs]
    ax.set_yticks(range(len(objs)), rows, fontsize=9)
    ax.set_xticks(np.arange(len(cols) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(objs) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="both", length=0)
    ax.set_xlabel(textwrap.fill(
        "Mean ± standard error over seeds (n networks); p: Welch t-test against softmax; "
        f"agrees / opposite / differs / n.s.: the paper's claim checked at p < {ALPHA}. "
        "Blue: above softmax, red: below, shade scaled per column; pale: not significant.",
        int(14 * len(cols) + 30)), fontsize=8)
    figures.save(fig, "fig2_table")


def header_text(header, unit, width=17):
    r"""A table column's header wrapped at spaces and, in dataset labels such as
    cifar10@5-9,per_class=2000, before '@' and after ','; never inside a word or at a hyphen
    (a longer word keeps its line), and '(%)' stays with the word before it.

    >>> header_text("Linear probe fashion_mnist@per_class=300", "%")
    'Linear probe\nfashion_mnist\n@per_class=300\xa0(%)'
    """
    text = re.sub(r"([@,])", r"\1 ", header).replace("@ ", " @") + ("\xa0(%)" if unit else "")
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def load_cka(found, runs, notes):
    """The cka.json with the most networks and its cka.npz array, as dict(cka, layers,
    networks, path, n_images)."""
    best = None
    for path, meta in found["cka"]:
        npz = os.path.join(os.path.dirname(path), "cka.npz")
        rel = os.path.relpath(npz, runs)
        try:
            with np.load(npz, allow_pickle=False) as z:
                cka = z["cka"]
        except Exception as e:
            notes.append(f"`{rel}`: cannot be read ({type(e).__name__}: {str(e)[:80]}); skipped.")
            continue
        networks, layers = meta.get("networks") or [], meta.get("layers") or []
        if cka.ndim != 4 or cka.shape[:2] != (len(networks),) * 2 or \
                cka.shape[2:] != (len(layers),) * 2:
            notes.append(f"`{rel}`: array 'cka' of shape {cka.shape} does not match the "
                         f"{len(networks)} networks and {len(layers)} layers of cka.json; "
                         f"skipped.")
            continue
        entry = {"cka": cka.astype(float), "layers": [str(l) for l in layers],
                 "networks": networks, "path": rel, "n_images": meta.get("n_images")}
        if best is not None:
            notes.append(f"Several cka.npz files; using the one with the most networks.")
        if best is None or len(networks) > len(best["networks"]):
            best = entry
    return best


def cka_groups(c, groups):
    """Indices of the CKA networks per objective, leaving out networks of other sweep values
    (hyperparameters other than the main variant's)."""
    main = {o: variant_of(g[0]["hparams"]) for o, g in groups.items()}
    idx = {}
    for i, identity in enumerate(c["networks"]):
        obj = identity.get("objective")
        if obj in main and variant_of(identity.get("hparams")) != main[obj]:
            continue
        idx.setdefault(obj, []).append(i)
    order = [o for o in groups if o in idx] + sorted(o for o in idx if o not in groups)
    return {o: idx[o] for o in order}


def cka_summary(c, idx):
    """Per layer: same-objective different-seed baseline and between-objective values."""
    diag = np.einsum("ijll->ijl", c["cka"])
    obj_of = {i: o for o, ii in idx.items() for i in ii}
    same, between = [], []
    for i, j in itertools.combinations(sorted(obj_of), 2):
        (same if obj_of[i] == obj_of[j] else between).append(diag[i, j])
    ref = "softmax" if "softmax" in idx else next(iter(idx), None)
    vs_ref = {o: np.nanmean([diag[i, j] for i in idx[ref] for j in ii], axis=0)
              for o, ii in idx.items() if o != ref}
    return {"diag": diag, "same": np.array(same), "between": np.array(between), "ref": ref,
            "vs_ref": vs_ref}


def objective_matrix(diag, idx, layer):
    objs = list(idx)
    mat = np.full((len(objs), len(objs)), np.nan)
    for a, oa in enumerate(objs):
        for b, ob in enumerate(objs):
            vals = [diag[i, j, layer] for i in idx[oa] for j in idx[ob] if i != j]
            if vals:
                mat[a, b] = np.nanmean(vals)
    return mat


def fig_cka(c, idx, s, figures):
    """Figure 3, by layer and as objective x objective matrices; its notes."""
    if not len(s["same"]) and not s["vs_ref"]:
        return ["Figure 3 skipped: CKA needs at least two networks of known objectives."]
    fig_cka_by_layer(c, s, figures)
    fig_cka_matrices(c, idx, s, figures)
    return [] if len(s["same"]) else [
        "CKA: no two networks of one objective, so no different-seed baseline."]


def fig_cka_by_layer(c, s, figures):
    layers = c["layers"]
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(7.5, 0.45 * len(layers) + 4.5), 4.8),
                           layout="constrained")
    if len(s["same"]):
        ax.fill_between(x, np.nanmin(s["same"], 0), np.nanmax(s["same"], 0), color="0.75",
                        alpha=0.6, label="same objective, different seed (range)")
        ax.plot(x, np.nanmean(s["same"], 0), color="0.35", linestyle="--", linewidth=2,
                label="same objective, different seed (mean)")
    for o, curve in s["vs_ref"].items():
        ax.plot(x, curve, color=figures.colours[o], marker=figures.marker(o), markersize=4,
                label=f"{display(s['ref'])} vs {display(o)}")
    ax.set_xticks(x, layers, rotation=60, ha="right", fontsize=8)
    ax.set(xlabel="layer (block outputs, pooled features, logits)",
           ylabel="linear CKA (0 to 1, unitless)")
    ax.set_title(f"CKA between networks at the same layer ({c['n_images'] or '?'} images)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center", fontsize=8, frameon=False)
    figures.save(fig, "fig3_cka_by_layer")


def fig_cka_matrices(c, idx, s, figures):
    layers, L = c["layers"], len(c["layers"])
    picks = sorted({max(0, (L - 2) // 2 - 1), max(0, L - 3), max(0, L - 2), L - 1}) \
        if L >= 4 else list(range(L))
    objs = list(idx)
    names = [display(o) for o in objs]
    mats = [objective_matrix(s["diag"], idx, l) for l in picks]
    vmin = min((float(np.nanmin(m)) for m in mats if np.isfinite(m).any()), default=0.0)
    ncol = 2 if len(picks) > 1 else 1
    nrow = math.ceil(len(picks) / ncol)
    side = 0.5 * len(objs) + 2.8
    fig, axes = plt.subplots(nrow, ncol, figsize=(side * ncol + 1.2, side * nrow),
                             layout="constrained", squeeze=False)
    im = None
    for ax, l, mat in zip(axes.flat, picks, mats):
        im = ax.imshow(np.ma.masked_invalid(mat), cmap="viridis", vmin=min(vmin, 0.999), vmax=1)
        ax.set_title(f"layer {layers[l]}")
        ax.set_xticks(range(len(objs)), names, rotation=60, ha="right", fontsize=9)
        ax.set_yticks(range(len(objs)), names, fontsize=9)
        if len(objs) <= 10:   # a cell is about 0.5 inch: '0.93' at 11 pt (9 pt from 7 up) fits
            matrix_text(ax, mat, vmin, 11 if len(objs) <= 6 else 9.5)
    for ax in list(axes.flat)[len(picks):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes, label="linear CKA (mean over seed pairs; diagonal: different seeds)",
                 shrink=0.8)
    fig.suptitle("CKA between objectives at a few depths")
    figures.save(fig, "fig3_cka_matrices")


def matrix_text(ax, mat, vmin, size):
    """Each finite cell's value, white on the darker half of the colour scale."""
    for (a, b), v in np.ndenumerate(mat):
        if np.isfinite(v):
            ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=size,
                    color="white" if v < (vmin + 1) / 2 else "black")


def find_sweeps(by_obj, groups):
    """[(objective, hyperparameter, {value: [networks]})] for every hyperparameter that takes
    several values while the objective's other hyperparameters keep their main values."""
    sweeps = []
    for obj, nets in by_obj.items():
        main = dict(variant_of(groups[obj][0]["hparams"]))
        keys = sorted({k for n in nets for k in n["hparams"]})
        for key in keys:
            points = {}
            for n in nets:
                v = dict(variant_of(n["hparams"]))
                if all(v.get(k) == main.get(k) for k in set(v) | set(main) if k != key) \
                        and finite(n["hparams"].get(key)):
                    points.setdefault(n["hparams"][key], []).append(n)
            if len(points) >= 2:
                sweeps.append((obj, key, dict(sorted(points.items(), key=lambda kv: kv[0]))))
    return sweeps


SWEEP_QUANTITIES = (("Class separation R^2 (pool)", "R^2 (unitless)", lambda n: n["r2"], 3),
                    ("Source top-1", "top-1 accuracy (%)", ACCURACIES["top1"][0], 2),
                    ("Linear probe mean", "accuracy, mean over datasets (%)",
                     ACCURACIES["linear"][0], 2),
                    ("Fine-tune mean", "accuracy, mean over datasets (%)",
                     ACCURACIES["finetune"][0], 2))


def fig_sweep(obj, key, points, figures):
    quantities = [q for q in SWEEP_QUANTITIES
                  if any(values(ns, q[2]) for ns in points.values())]
    if not quantities:
        return None
    xs = [float(v) for v in points]
    log = all(x > 0 for x in xs) and max(xs) / min(xs) >= 3
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 4.0),
                             layout="constrained", squeeze=False)
    paper = common.OBJECTIVES.get(obj, {}).get(key)
    for ax, (title, ylabel, q, _) in zip(axes[0], quantities):
        stat = [(x, *mean_se(values(ns, q))[:2]) for x, ns in zip(xs, points.values())]
        stat = [(x, m, se) for x, m, se in stat if finite(m)]
        sx, sm, sse = map(np.array, zip(*stat))
        ax.errorbar(sx, sm, yerr=np.where(np.isfinite(sse), sse, 0), color=figures.colours[obj],
                    marker="o", capsize=3)
        if paper is not None and finite(paper):
            ax.axvline(float(paper), color="0.5", linestyle=":", label="paper value")
            if ax is axes[0, 0]:
                ax.legend(fontsize=8, frameon=False)
        if log:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs, [fmt_value(v) for v in points], rotation=45 if len(xs) > 5 else 0)
        ax.set(xlabel=f"{key} (hyperparameter value)", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{display(obj)}: sweep of {key} (mean ± standard error over seeds)")
    name = f"fig5_sweep_{obj}_{re.sub(r'[^A-Za-z0-9]+', '_', key)}"
    figures.save(fig, name)
    return name, quantities


# ----------------------------------------------------------------------------------------------
# R^2 against linear transfer, network by network: the slope rule, pre-registered in
# results/cifar10_coarse/README.md before that study's networks existed. One point per network
# (every hyperparameter value, every seed), not per objective mean: the sweeps give R^2 a range
# that a handful of objective means cannot.

SLOPE_DELTA = 0.5   # the smallest meaningful effect: probe points per +0.1 R^2
# Sweeps whose value 0 is softmax itself: softmax's networks join them at 0.
ZERO_IS_SOFTMAX = {("label_smoothing", "alpha"), ("extra_final_layer_l2", "lambda_"),
                   ("dropout", "dropout"), ("logit_penalty", "beta")}
SLOPE_RULES = [
    "**Rule 1, per target**: ordinary least squares acc = a + b R^2 over all networks, b given "
    "as probe points per +0.1 R^2 with its 95% confidence interval (t distribution, n - 2 "
    f"degrees of freedom); the smallest meaningful effect is δ = {SLOPE_DELTA} points per +0.1 "
    "R^2. *holds*: the interval lies below 0 and the estimate is at most -δ; *refuted*: the "
    "interval's lower end is above -δ (a meaningful negative effect is excluded), *refuted, "
    "opposite* when the whole interval lies above +δ; otherwise *cannot tell*.",
    "**Rule 2, overall**: *holds* when rule 1 holds on at least 2 targets (all targets when "
    "fewer) and is refuted on none; *refuted* when refuted on at least 2 (all when fewer) and "
    "holds on none; otherwise *depends on the target*.",
    "**Rule 3, per sweep**: rule 1 over that sweep's networks only (softmax joins as value 0 "
    "where the objective at 0 is softmax), and the direction of R^2 against the swept value "
    f"(Spearman's ρ over networks, p < {ALPHA} to call a direction).",
]


def slope_fit(points):
    """OLS y = a + b x over (x = R^2, y = accuracy %) points -> {n, slope, low, high, p} with
    the slope and its 95% interval per +0.1 R^2, or None (fewer than 3 points, no spread of R^2,
    or no scipy for the t quantile).

    >>> f = slope_fit([(0.2, 70.0), (0.3, 69.0), (0.4, 68.2), (0.5, 66.9)])
    >>> round(f["slope"], 2), f["n"]
    (-1.01, 4)
    """
    x, y = np.array(points, dtype=float).T if len(points) else (np.array([]), np.array([]))
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or stats is None:
        return None
    b, a = map(float, np.polyfit(x, y, 1))
    resid = y - (a + b * x)
    se = math.sqrt(float(resid @ resid) / (n - 2) / float(((x - x.mean()) ** 2).sum()))
    t = float(stats.t.ppf(1 - ALPHA / 2, n - 2))
    p = float(2 * stats.t.sf(abs(b) / se, n - 2)) if se > 0 else 0.0
    return {"n": n, "slope": b / 10, "low": (b - t * se) / 10, "high": (b + t * se) / 10, "p": p}


def fit_band(points, fit, x):
    """The least-squares line of slope_fit at x and its 95% confidence band for the mean:
    (mean, low, high). The band's half-width is t se(b) sqrt(Sxx/n + (x - mean x)^2), and
    t se(b) is half slope_fit's interval (per +0.1 R^2, so 10 x per unit R^2)."""
    px, py = np.array(points, dtype=float).T
    d = np.asarray(x, dtype=float) - px.mean()
    mean = py.mean() + 10 * fit["slope"] * d    # the line passes through the points' mean
    half = 5 * (fit["high"] - fit["low"]) * np.sqrt(((px - px.mean()) ** 2).sum() / len(px)
                                                    + d ** 2)
    return mean, mean - half, mean + half


def slope_verdict(fit):
    """Rule 1 on a slope_fit."""
    if fit is None:
        return "cannot tell"
    if fit["high"] < 0 and fit["slope"] <= -SLOPE_DELTA:
        return "holds"
    if fit["low"] > SLOPE_DELTA:
        return "refuted, opposite"
    if fit["low"] > -SLOPE_DELTA:
        return "refuted"
    return "cannot tell"


def overall_verdict(verdicts):
    """Rule 2 over the per-target verdicts of rule 1. One target: its own verdict; no target
    decided: cannot tell."""
    if len(verdicts) == 1:
        return verdicts[0]
    if all(v == "cannot tell" for v in verdicts):
        return "cannot tell"
    need = min(2, len(verdicts))
    holds = sum(v == "holds" for v in verdicts)
    refuted = sum(v.startswith("refuted") for v in verdicts)
    if holds >= need and refuted == 0:
        return "holds"
    if refuted >= need and holds == 0:
        return "refuted"
    return "depends on the target"


def slope_text(fit):
    """'+0.73 [+0.19, +1.27]': the slope per +0.1 R^2 and its 95% interval ('-' without a fit)."""
    return "-" if fit is None else f"{fit['slope']:+.2f} [{fit['low']:+.2f}, {fit['high']:+.2f}]"


def fit_text(fit):
    return "-" if fit is None else f"{slope_text(fit)} per +0.1 R^2, p = {fit['p']:.2g}"


def slope_points(nets, target):
    return [(n["r2"], n["linear"][target]) for n in nets
            if finite(n["r2"]) and finite(n["linear"].get(target))]


def fig_slopes(nets, points, fits, figures):
    """Figure 6: per target (`points`: its (R^2, accuracy) over all networks), a point per
    network and the least-squares line of `fits` with its band."""
    fig, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points) + 2.5, 4.4),
                             layout="constrained", squeeze=False)
    drawn = set()
    for ax, (target, pts) in zip(axes[0], points.items()):
        for obj in figures.order:
            own = slope_points([n for n in nets if n["objective"] == obj], target)
            if own:
                xs, ys = np.array(own).T
                ax.scatter(xs, ys, color=figures.colours[obj], marker=figures.marker(obj),
                           s=28, alpha=0.8, linewidths=0)
                drawn.add(obj)
        fit = fits[target]
        if fit is not None:
            xs = [x for x, _ in pts]
            grid = np.linspace(min(xs), max(xs), 60)
            mean, low, high = fit_band(pts, fit, grid)
            ax.fill_between(grid, low, high, color="0.3", alpha=0.15, linewidth=0)
            ax.plot(grid, mean, color="0.3", linestyle="--")
        ax.set_title(f"{target}\nslope {slope_text(fit)} per +0.1 R^2\n"
                     f"({slope_verdict(fit)})", fontsize=9)
        ax.set(xlabel="class separation R^2 (pool)", ylabel="linear-probe accuracy (%)")
        ax.grid(alpha=0.3)
    keys = [plt.Line2D([], [], color="0.3", marker="o", markersize=5, linestyle="",
                       label="one network"),
            plt.Line2D([], [], color="0.3", linestyle="--", label="least-squares fit"),
            matplotlib.patches.Patch(color="0.3", alpha=0.15, linewidth=0,
                                     label="95% confidence band\nof the fitted mean")]
    legend_right(fig, [o for o in figures.order if o in drawn], figures, keys)
    fig.suptitle("R^2 against linear transfer, one point per network; dashed: least squares "
                 "with the 95% confidence band of its mean")
    figures.save(fig, "fig6_r2_vs_linear")


def sweep_rows(by_obj, groups, targets):
    """Rule 3: [(sweep name, target, fit, rho, p)] for every sweep with R^2."""
    rows = []
    for obj, key, points in find_sweeps(by_obj, groups):
        points = dict(points)
        if (obj, key) in ZERO_IS_SOFTMAX and "softmax" in by_obj and 0 not in points:
            points[0] = by_obj["softmax"]
        members = [(float(v), n) for v, ns in points.items() for n in ns if finite(n["r2"])]
        if len(members) < 3:
            continue
        rho, p = spearman([v for v, _ in members], [n["r2"] for _, n in members])
        name = f"{display(obj)} {key} ({', '.join(fmt_value(v) for v in sorted(points))})"
        for target in targets:
            rows.append((name, target, slope_fit(slope_points([n for _, n in members], target)),
                         rho, p))
    return rows


# ----------------------------------------------------------------------------------------------
# The report's sections, in report.md's order: each returns a Section (its lines, verdicts and
# notes), from the one list of networks (`nets`; `groups`: per objective, the networks of its
# main hyperparameter variant; `by_obj`: every variant) and the table computed once (`cells`).

def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def section_results(groups, cols, cells, scratch, figures):
    """The per-objective table (figures 1 and 2) and the verdicts read from it."""
    if not cols:
        return Section([], notes=["Figures 1 and 2 skipped: no accuracy of any network was "
                                  "found."])
    notes = fig_transfer(groups, figures)
    fig_table(groups, cols, cells, figures)
    lines = ["## Per-objective results (figures 1 and 2)", "",
             "Mean ± standard error over seeds; accuracies in %. p: Welch t-test against softmax "
             f"(two-sided); beside it, the paper's claim checked at p < {ALPHA}: agrees, "
             "opposite, differs (where the paper finds no difference) or n.s. (not "
             "significant). Each column header gives the paper's claim for every non-softmax "
             "objective against softmax (SPEC.md).", ""]
    lines += report_table(groups, cols, cells) + [""]
    lines += figures.embed("fig1_top1_vs_transfer", "source top-1 against transfer")
    lines += figures.embed("fig2_table", "table")
    if scratch:
        lines += ["Trained from scratch (no pretraining), as written by the script:", ""]
        for (kind, d), v in sorted(scratch.items()):
            m, se, n = mean_se(v)
            lines.append(f"- {KIND_NAMES[kind]} {d}: {m:.4g}" +
                         (f" ± {se:.2g}" if finite(se) else "") + f" (n={n})")
        lines.append("")
    return Section(lines, table_verdicts(groups, cols, cells), notes)


def table_verdicts(groups, cols, cells):
    """The verdicts on the claims that the table tests: top-1, R^2 and linear transfer against
    softmax, R^2 against linear transfer over objectives, fine-tuning differences."""
    keys = [k for k, *_ in cols]
    direction = lambda key, claim: direction_verdict(cells, key, claim) if key in keys else None
    verdicts = [
        ("Non-softmax objectives have higher source top-1 than softmax",
         direction("top1", "higher")),
        ("Non-softmax objectives have higher class separation R^2 than softmax",
         direction("r2", "higher")),
        ("Non-softmax objectives have lower linear-probe transfer than softmax (the paper's "
         "title)", direction(main_key(cols, "linear"), "lower")),
        ("Higher R^2 goes with lower linear-probe transfer",
         correlation_verdict(groups, ACCURACIES["linear"][0], -1)),
        ("Fine-tuning differences are small", finetune_verdict(groups, cells, cols))]
    return [(claim, v) for claim, v in verdicts if v]


def main_key(cols, kind):
    """The column of `kind` ('linear', 'finetune') that a verdict reads: the mean over datasets
    where there are several, else the one dataset's (None without one)."""
    keys = [k for k, *_ in cols if k.startswith(kind + ":")]
    return f"{kind}:mean" if f"{kind}:mean" in keys else next(iter(keys), None)


def report_table(groups, cols, cells):
    header = ["Objective", "Seeds"] + [
        f"{h}{' (%)' if unit else ''} [paper: {claim_words(claim, unit)}]"
        for _, h, claim, _, _, unit in cols]
    rows = []
    for obj, nets in groups.items():
        seeds = sorted({n["seed"] for n in nets}, key=lambda v: (not isinstance(v, int),
                                                                  str(v).zfill(12)))
        seeds = [str(v) for v in seeds]
        rows.append([display(obj), f"{len(nets)} ({', '.join(seeds)})"] +
                    [cell_text(cells[obj][key], digits) for key, _, _, _, digits, _ in cols])
    return md_table(header, rows)


def section_cka(found, runs, groups, figures):
    notes = []
    c = load_cka(found, runs, notes)
    if c is None:
        return Section([], notes=notes + ["CKA (figure 3) skipped: no readable cka.npz."])
    idx = cka_groups(c, groups)
    # all-NaN layers (constant activations) stay NaN
    with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
        s = cka_summary(c, idx)
        notes += fig_cka(c, idx, s, figures)
        table = cka_table(c, s)
        v = cka_verdict(c, s, idx)
    verdicts = [("CKA between objectives matches the different-seed baseline except in the last "
                 "few layers", v)] if v else []
    lines = (["## CKA (figure 3)", "", f"From `{c['path']}`: {c['cka'].shape[0]} networks, "
              f"{len(c['layers'])} layers, {c['n_images'] or 'unknown number of'} images. The "
              f"paper's claim: CKA between objectives matches the different-seed baseline "
              f"except in the last few layers.", ""] + table + [""] +
             figures.embed("fig3_cka_by_layer", "CKA by layer") +
             figures.embed("fig3_cka_matrices", "CKA matrices"))
    return Section(lines, verdicts, notes)


def cka_table(c, s):
    """Per layer: CKA between objectives and the same-objective baseline, mean [min, max]."""
    between, same = s["between"], s["same"]
    rows = []
    for l, name in enumerate(c["layers"]):
        b, w = (f"{np.nanmean(a[:, l]):.3f} [{np.nanmin(a[:, l]):.3f}, {np.nanmax(a[:, l]):.3f}]"
                if len(a) else "-" for a in (between, same))
        below = "-"
        if len(between) and len(same):   # below by more than the 3 decimals shown
            below = "yes" if np.nanmean(between[:, l]) < np.nanmin(same[:, l]) - 1e-3 else "no"
        rows.append([name, b, w, below])
    return md_table(["Layer", "between objectives: mean [min, max]",
                     "same objective, other seed: mean [min, max]",
                     "between-objective mean below the baseline's range"], rows)


def section_class_separation(groups, figures):
    rows = [[display(obj)] + [mean_text(values(nets, lambda x, k=key: x[k]), digits)
                              for key, digits in (("r2", 3), ("sparsity", 3), ("dim", 1))]
            for obj, nets in groups.items() if any(n["r2"] is not None for n in nets)]
    if not rows:
        return Section([], notes=["Class separation (figure 4) skipped: no class_separation.json "
                                  "with a pool layer R^2."])
    notes = fig_class_separation(groups, figures)
    lines = (["## Class separation of the penultimate layer (figure 4)", ""] +
             md_table(["Objective", "R^2 (pool)", "sparsity (fraction of zeros)",
                       "participation-ratio dimensionality"], rows) +
             ["", "Rank correlations:", ""] + report_correlations(groups) + [""] +
             figures.embed("fig4_class_separation", "class separation"))
    return Section(lines, notes=notes)


def report_correlations(groups):
    """Spearman's ρ of R^2 against each accuracy, over objective means and over networks."""
    nets = [n for g in groups.values() for n in g]
    f = lambda r, p: f"{r:.2f} (p={p:.2g})" if finite(r) else "n/a"
    rows = []
    for q, _, label, claim in ACCURACIES.values():
        per_obj = objective_means(groups, lambda n: n["r2"], q)
        per_net = [(n["r2"], q(n)) for n in nets if finite(n["r2"]) and finite(q(n))]
        if not per_obj:
            continue
        ro, po = spearman(*zip(*per_obj))
        rn, pn = spearman(*zip(*per_net)) if per_net else (math.nan, math.nan)
        rows.append([f"R^2 vs {label}", f"{f(ro, po)}, n={len(per_obj)}",
                     f"{f(rn, pn)}, n={len(per_net)}", claim])
    if not rows:
        return ["Not computed: no network has both R^2 and an accuracy."]
    lines = md_table(["Pair", "Spearman ρ over objective means", "Spearman ρ over networks",
                      "paper's direction"], rows)
    if stats is None:
        lines.append("\nscipy is not installed: rank correlations are not computed.")
    return lines + ["\nn/a: fewer than 3 points, or one side constant."]


def section_slopes(nets, by_obj, groups, figures):
    """The slope rule (figure 6): rules 1 and 2 per target and overall, rule 3 per sweep."""
    targets = sorted({t for n in nets if finite(n["r2"]) for t in n["linear"]})
    points = {t: slope_points(nets, t) for t in targets}
    points = {t: pts for t, pts in points.items() if len(pts) >= 3}
    if not points:
        return Section([], notes=["The slope rule (figure 6) skipped: it needs R^2 and a linear "
                                  "probe of at least 3 networks on one target."])
    fits = {t: slope_fit(pts) for t, pts in points.items()}
    per_target = {t: slope_verdict(f) for t, f in fits.items()}
    overall = overall_verdict(list(per_target.values()))
    evidence = "; ".join(f"{t}: {per_target[t]}, {fit_text(f)} (n = {len(points[t])})"
                         for t, f in fits.items())
    fig_slopes(nets, points, fits, figures)
    lines = ["## R^2 against linear transfer, network by network (figure 6)", "",
             *[f"- {r}" for r in SLOPE_RULES], ""]
    lines += md_table(["Target", "Networks", "Slope per +0.1 R^2 [95% CI]", "p", "Verdict"],
                      [[t, len(points[t]), slope_text(f), "-" if f is None else f"{f['p']:.2g}",
                        per_target[t]] for t, f in fits.items()])
    lines += ["", f"Overall (rule 2): **{overall}**.", ""]
    lines += figures.embed("fig6_r2_vs_linear", "R^2 against linear transfer")
    sweeps = sweep_rows(by_obj, groups, list(points))
    if sweeps:
        trend = lambda rho, p: (", rises" if rho > 0 else ", falls") if p < ALPHA else ""
        lines += ["Within each sweep (rule 3):", ""]
        lines += md_table(["Sweep", "Target", "Slope per +0.1 R^2 [95% CI]", "Verdict",
                           "R^2 against the value: Spearman ρ (p)"],
                          [[name, t, slope_text(f), slope_verdict(f),
                            f"{rho:+.2f} ({p:.2g}){trend(rho, p)}"]
                           for name, t, f, rho, p in sweeps]) + [""]
    return Section(lines, [("Higher R^2 goes with lower linear-probe transfer, network by "
                            "network (slope rule)", (overall, evidence))])


def section_layers(nets, groups):
    """Linear probes of layers other than pool: per objective, that layer's accuracy beside the
    pool layer's on the same target, and (descriptive, not a verdict) its slope on R^2."""
    pairs = sorted({k for n in nets for k in n["layers"]})
    if not pairs or not groups:
        return Section([])
    lines = ["## Linear probes of earlier layers", "",
             "Mean ± standard error over seeds (%), the same protocol as the pool layer. The "
             "paper finds that the objectives' representations differ mainly in the last few "
             "layers (CKA), so a probe of an earlier layer should depend less on the objective.",
             ""]
    for target, layer in pairs:
        rows = [[display(obj), *(mean_text(values(g, q), 2) for q in (
            lambda n: n["layers"].get((target, layer)), lambda n: n["linear"].get(target)))]
            for obj, g in groups.items()]
        lines += [f"### {target}: {layer}", ""]
        lines += md_table(["Objective", f"{layer}", "pool"], rows) + [""]
        fit = slope_fit([(n["r2"], n["layers"][(target, layer)]) for n in nets
                         if finite(n["r2"]) and finite(n["layers"].get((target, layer)))])
        fit_pool = slope_fit(slope_points(nets, target))
        lines += [f"Slope on R^2 over networks (rule 1's fit, descriptive): {layer} "
                  f"{fit_text(fit)}; pool {fit_text(fit_pool)}.", ""]
    return Section(lines)


def section_sweeps(by_obj, groups, figures):
    """Figure 5 and a table per sweep: each quantity's mean per value of the hyperparameter."""
    sweeps = find_sweeps(by_obj, groups)
    if not sweeps:
        return Section([], notes=["Hyperparameter sweeps (figure 5) skipped: no objective was "
                                  "trained with several values of one hyperparameter."])
    lines = ["## Hyperparameter sweeps (figure 5)", ""]
    for obj, key, points in sweeps:
        made = fig_sweep(obj, key, points, figures)
        if made:
            name, quantities = made
            rows = [[fmt_value(v), str(len(ns))] +
                    [mean_text(values(ns, q), digits) for _, _, q, digits in quantities]
                    for v, ns in points.items()]
            lines += [f"### {display(obj)}: {key}", ""]
            lines += md_table([key, "networks"] + [t for t, *_ in quantities], rows) + [""]
            lines += [f"![{display(obj)} {key} sweep]({name}.png)", ""]
    return Section(lines)


# ----------------------------------------------------------------------------------------------
# One verdict per claim of SPEC.md: holds, does not hold, or cannot tell at this sample size.
# The rules are fixed here and printed in the report, so a verdict never depends on a reader.

def direction_verdict(cells, key, claim):
    """A directional claim (every non-softmax objective higher/lower than softmax) from the
    per-objective Welch tests in `cells`: (verdict, evidence text) or None."""
    tested = [c[key] for o, c in cells.items() if o != "softmax" and key in c and
              finite(c[key]["diff"])]
    if not tested or "softmax" not in cells:
        return None
    n = len(tested)
    agree = sum(c["verdict"] == "agrees" for c in tested)
    opposite = sum(c["verdict"] == "opposite" for c in tested)
    sign = sum((c["diff"] > 0) == (claim == "higher") for c in tested)
    half = math.ceil(n / 2)
    if agree >= half and opposite == 0:
        v = "holds"
    elif opposite >= half and agree == 0:
        v = "does not hold"
    else:
        v = "cannot tell"
    diffs = [c["diff"] for c in tested]
    text = (f"{claim} than softmax for {sign} of {n} objectives; significantly (p < {ALPHA}) "
            f"{claim} for {agree}, significantly the other way for {opposite}; difference from "
            f"softmax {min(diffs):+.3g} to {max(diffs):+.3g} (mean {np.mean(diffs):+.3g})")
    need = seeds_needed(cells, key, claim)
    if v == "cannot tell" and need:
        text += (f"; at the observed differences and seed-to-seed spread, about "
                 f"{need if need < 1000 else 'over 1000'} seeds per objective would make the "
                 f"median objective that points the claimed way significant")
    return v, text


def seeds_needed(cells, key, claim):
    """For the objectives whose difference from softmax points the claimed way but is not
    significant: the seeds per objective at which that difference, with the observed standard
    deviations, would reach p < ALPHA (two-sided t-test with 2n - 2 degrees of freedom, at
    least one seed more than now); the median, or None."""
    base = cells.get("softmax", {}).get(key)
    if stats is None or not base or not finite(base.get("se")) or base["n"] < 2:
        return None
    need = []
    for obj, c in cells.items():
        c = c.get(key)
        if obj == "softmax" or not c or c["verdict"] != "n.s." or not finite(c["se"]) or \
                c["n"] < 2 or (c["diff"] > 0) != (claim == "higher") or c["diff"] == 0:
            continue
        var = c["se"] ** 2 * c["n"] + base["se"] ** 2 * base["n"]   # sum of the two variances
        n = max(c["n"], base["n"]) + 1
        while n < 1000 and abs(c["diff"]) / math.sqrt(var / n) < stats.t.ppf(1 - ALPHA / 2,
                                                                            2 * n - 2):
            n += 1
        need.append(n)
    return int(np.median(need)) if need else None


def objective_means(groups, x, y):
    """[(mean of x, mean of y)] over seeds, one pair per objective where both are finite."""
    pts = [(mean_se(values(g, x))[0], mean_se(values(g, y))[0]) for g in groups.values()]
    return [(a, b) for a, b in pts if finite(a) and finite(b)]


def spread_of_means(groups, quantity):
    """Largest minus smallest objective mean of a quantity (nan with no values)."""
    means = [m for m in (mean_se(values(g, quantity))[0] for g in groups.values()) if finite(m)]
    return float(np.ptp(means)) if means else math.nan


def correlation_verdict(groups, quantity, sign):
    """R^2 against a quantity over objective means: holds when Spearman's rho has the claimed
    sign at p < ALPHA, does not hold when it has the other sign at p < ALPHA."""
    pts = objective_means(groups, lambda n: n["r2"], quantity)
    rho, p = spearman(*zip(*pts)) if len(pts) >= 3 else (math.nan, math.nan)
    if not finite(rho):
        return None
    v = "cannot tell" if p >= ALPHA else ("holds" if (rho < 0) == (sign < 0) else "does not hold")
    return v, f"Spearman ρ = {rho:.2f} (p = {p:.2g}) over {len(pts)} objective means"


def finetune_verdict(groups, cells, cols):
    """'Fine-tuning differences are small': holds when every objective's fine-tune accuracy is
    equivalent to softmax's within FT_MARGIN points (tost_p < ALPHA, which needs at least 2
    networks on each side: non-significance alone is no evidence of no difference) and the
    spread of objective means is smaller than the linear probe's on the same datasets; does not
    hold when at least two objectives differ, or one differs and the spread is not smaller;
    otherwise cannot tell."""
    ft = main_key(cols, "finetune")
    if ft is None or "softmax" not in cells:
        return None
    datasets = sorted({d for g in groups.values() for n in g for d in n["finetune"]})

    def linear_same_data(n):   # the linear probe on the fine-tuning datasets, when all exist
        return mean_of({d: n["linear"][d] for d in datasets}) \
            if all(d in n["linear"] for d in datasets) else None

    s_ft = spread_of_means(groups, next(c[3] for c in cols if c[0] == ft))
    s_lp = spread_of_means(groups, linear_same_data)
    differ = sum(c[ft]["verdict"] == "differs" for o, c in cells.items() if o != "softmax")
    n = sum(finite(c[ft]["diff"]) for o, c in cells.items() if o != "softmax")
    if n == 0:
        return None
    smaller = finite(s_lp) and s_ft < s_lp
    soft = cells["softmax"][ft]["vals"]
    equivalent = sum(tost_p(c[ft]["vals"], soft, FT_MARGIN) < ALPHA
                     for o, c in cells.items() if o != "softmax" and finite(c[ft]["diff"]))
    if equivalent == n and smaller:
        v = "holds"
    elif differ >= 2 or (differ == 1 and finite(s_lp) and not smaller):
        v = "does not hold"
    else:
        v = "cannot tell"
    text = (f"{differ} of {n} objectives differ from softmax at p < {ALPHA}, {equivalent} are "
            f"equivalent to it within {FT_MARGIN:g} points (TOST); objective means "
            f"span {s_ft:.2f} points fine-tuned" +
            (f" against {s_lp:.2f} points linear-probed on the same data" if finite(s_lp)
             else " (no linear probe on the same data to compare)"))
    return v, text


def late_layers(layers):
    """The 'last few layers': the last residual stage (2 blocks for ResNet-18 with 8 blocks,
    else 3, as in torchvision's ResNets), pool and logits."""
    blocks = [l for l in layers if re.fullmatch(r"block\d+", l)]
    last = blocks[-(2 if len(blocks) == 8 else 3):] if blocks else []
    return set(last) | ({"pool", "logits"} & set(layers))


def cka_verdict(c, s, idx):
    """Per non-softmax objective and layer, a Welch t-test of its CKA with the softmax networks
    against the same-objective different-seed pairs (all objectives); 'below' = significantly
    lower and by more than CKA_MARGIN on average. Each objective then matches the baseline at
    every layer, is below it only in the last few layers (the paper's pattern), or is below it
    in an earlier layer too. Holds when at least half of the objectives show the paper's pattern
    and none is below in an earlier layer; does not hold when at least half are below in an
    earlier layer; otherwise cannot tell."""
    ref, same = s["ref"], s["same"]
    if ref != "softmax" or not len(same):
        return None
    late = late_layers(c["layers"])
    kinds = {"match": [], "late": [], "early": []}
    for obj, ii in idx.items():
        if obj == ref:
            continue
        pairs = s["diag"][np.ix_(idx[ref], ii)]   # (softmax network, this one's, layer)
        below = [name for l, name in enumerate(c["layers"])
                 if below_baseline(pairs[..., l].ravel(), same[:, l])]
        early = [l for l in below if l not in late]
        kind = "early" if early else ("late" if below else "match")
        kinds[kind].append(f"{display(obj)} ({', '.join(early or below)})" if below
                           else display(obj))
    n = sum(map(len, kinds.values()))
    if n == 0:
        return None
    half = math.ceil(n / 2)
    if len(kinds["late"]) >= half and not kinds["early"]:
        v = "holds"
    elif len(kinds["early"]) >= half:
        v = "does not hold"
    else:
        v = "cannot tell"
    text = (f"CKA with softmax below the same-objective baseline (Welch p < {ALPHA} and lower by "
            f"more than {CKA_MARGIN}) only in the last few layers "
            f"({', '.join(l for l in c['layers'] if l in late)}): "
            f"{'; '.join(kinds['late']) or 'none'}; in an earlier layer: "
            f"{'; '.join(kinds['early']) or 'none'}; at no layer: "
            f"{', '.join(kinds['match']) or 'none'}")
    return v, text


def below_baseline(b, w):
    """Whether CKA values `b` lie below the baseline's `w` (NaN left out): lower on average by
    more than CKA_MARGIN and significantly (Welch p < ALPHA), with at least 2 values each."""
    b, w = b[np.isfinite(b)], w[np.isfinite(w)]
    return len(b) >= 2 and len(w) >= 2 and b.mean() < w.mean() - CKA_MARGIN and \
        welch_p(b, w) < ALPHA


def distinct(records, key):
    """The distinct values of `key` over records, as text: 'a' or 'a / b' (None if absent)."""
    vals = (r.get(key) for r in records if isinstance(r, dict))
    seen = dict.fromkeys(v for v in vals if v is not None and not isinstance(v, (dict, list)))
    return " / ".join(map(fmt_value, seen)) or None


def lr_text(train):
    """'0.1' or '0.1 (squared_error: 5e-05)': the common lr and the objectives that differ."""
    lrs = [r.get("lr") for r in train]
    common_lr = max(set(lrs), key=lrs.count, default=None)
    other = {}
    for r in train:
        if r.get("lr") != common_lr:
            other.setdefault(fmt_value(r.get("lr")), set()).add(str(r.get("objective")))
    return fmt_value(common_lr) + (" (" + "; ".join(f"{', '.join(sorted(o))}: {v}" for v, o in
                                                    sorted(other.items())) + ")" if other else "")


def section_setup(found):
    """What was run, read back from the results themselves (so it cannot drift from them)."""
    lines = []
    # the identity's fields (arch, objective, ...) beside the result's own (its dataset wins)
    flat = {k: [{**(r.get("network") or {}), **r} for _, r in found[k]] for k in found}
    train = flat["train"]
    if train:
        f = lambda k: distinct(train, k) or "?"
        secs = [r["train_seconds"] for r in train if finite(r.get("train_seconds"))]
        lines.append(f"- Training: {len(train)} networks on `{f('dataset')}` "
                     f"({f('train_images')} training images, {f('num_classes')} classes), "
                     f"{f('arch')}{' small-input stem' if f('small_input') == 'True' else ''} at "
                     f"{f('resolution')} px, {f('epochs')} epochs ({f('steps')} steps) of batch "
                     f"{f('batch_size')}, lr {lr_text(train)} per 256, {f('precision')}"
                     + (f"; {np.mean(secs):.0f} s per network on average" if secs else "") + ".")
    evaluated = flat["evaluate"]
    if evaluated:
        f = lambda k: distinct(evaluated, k) or "?"
        lines.append(f"- Evaluated without training here (train_imagenet.py --evaluate): "
                     f"{len(evaluated)} result(s) on `{f('dataset_name')}` (test split, "
                     f"{f('count')} images), {f('arch')} at {f('resolution')} px, "
                     f"{f('preprocessing')} preprocessing.")
    for kind, name in (("linear_probe", "Linear probe"), ("finetune", "Fine-tuning")):
        by_ds = {}
        for r in flat[kind]:
            if r.get("objective") != "scratch":
                by_ds.setdefault((target_of(r), str(r.get("layer"))), []).append(r)
        for (ds, _), rs in sorted(by_ds.items()):
            f = lambda k: distinct(rs, k) or "?"
            sizes = (f"{f('n_test')} images, each predicted once by {f('folds')}-fold "
                     f"cross-validation (fold i tested, fold i+1 chooses lambda, the rest train)"
                     if rs[0].get("folds") else
                     f"{f('n_train')} train / {f('n_val')} val / {f('n_test')} test images")
            text = (f"- {name} on `{ds}` ({len(rs)} networks): {sizes}, {f('num_classes')} "
                    f"classes, metric {f('metric')}, {f('resolution')} px")
            if kind == "linear_probe":
                lams = [r["best_lambda"] for r in rs if finite(r.get("best_lambda"))] + [
                    f["best_lambda"] for r in rs for f in r.get("fold_results") or []
                    if finite(f.get("best_lambda"))]
                text += (f", layer {f('layer')}, features standardized: {f('standardize')}" +
                         (f", chosen lambda {min(lams):.2g} to {max(lams):.2g}" if lams else ""))
            else:
                grid = sorted({k for r in rs if isinstance(r.get("grid"), dict)
                               for k in r["grid"]})
                picks = [f"lr={fmt_value(r['best_lr'])},wd={fmt_value(r['best_wd'])}"
                         for r in rs if "best_lr" in r and "best_wd" in r]
                counts = ", ".join(f"{k} x{picks.count(k)}" for k in sorted(set(picks)))
                text += (f", {f('epochs')} epochs of batch {f('batch_size')}, grid "
                         f"{'; '.join(grid) or '?'} (lr per 256) selected on val, then "
                         f"retrained on train+val; chosen: {counts or '?'}")
            lines.append(text + ".")
    cs = [{**res, "dataset_name": d.get("dataset_name"), "split": d.get("split")}
          for _, d in found["class_separation"] for res in d.get("results") or []]
    if cs:
        f = lambda k: distinct(cs, k) or "?"
        lines.append(f"- Class separation: `{f('dataset_name')}`, {f('split')} split, "
                     f"{f('n_images')} images per network.")
    return (["## Setup (read from the results)", ""] + lines + [""]) if lines else []


def section_verdicts(verdicts):
    if not verdicts:
        return []
    lines = ["## Verdicts on the paper's claims", "",
             "Each claim of SPEC.md checked against the numbers below, by fixed rules: a "
             "directional claim (every non-softmax objective against softmax, Welch t-test per "
             f"objective at p < {ALPHA}) holds when at least half of the objectives agree "
             "significantly and none goes significantly the other way, and does not hold when at "
             "least half go significantly the other way and none agrees; a correlation holds or "
             f"does not hold when Spearman's ρ over objective means is significant (p < {ALPHA}) "
             "with or against the claimed sign; the fine-tuning and CKA rules are stated in their "
             "rows. Everything else is *cannot tell at this sample size*: more seeds (a "
             "smaller standard error) or longer training (larger differences) would be needed to "
             "tell.", ""]
    lines += md_table(["Claim (SPEC.md)", "Verdict", "Evidence"],
                      [[claim, f"**{v}**", text] for claim, (v, text) in verdicts])
    return lines + [""]


# ----------------------------------------------------------------------------------------------

def load_networks(runs, notes):
    """Every result under `runs`, joined per network on its run id: (found, networks, scratch)."""
    found = read_results(runs, notes)
    if not any(found.values()):
        raise common.UserError(f"no results under {runs}: expected results.json (training, linear "
                               f"probe, fine-tune), cka.json or class_separation.json with an "
                               f"identity block")
    nets, scratch = training_networks(found, runs, notes), {}
    attach_evaluations(found, nets, runs, notes)
    attach_transfer(found, nets, runs, notes, scratch)
    attach_class_separation(found, nets, runs, notes)
    orphans = [n for n in nets.values() if n["orphan"]]
    if orphans:
        labels = sorted(str(n["label"] or n["objective"]) for n in orphans)
        evaluated = sum(n["top1"] is not None for n in orphans)
        notes.append(f"{len(labels)} network(s) without a training results.json here (e.g. "
                     f"imported): {', '.join(labels)}; source top-1 of {evaluated} from "
                     f"train_imagenet.py --evaluate results.")
    nets = list(nets.values())
    for field in ("arch", "dataset", "epochs"):
        seen = {str(n[field]) for n in nets if not n["orphan"]}
        if len(seen) > 1:
            notes.append(f"Training runs differ in {field} ({', '.join(sorted(seen))}); they are "
                         f"grouped by objective only.")
    return found, nets, scratch


def assign_colours(nets):
    """One colour per objective, the same in every figure: fixed for the nine, then spares."""
    known = list(common.OBJECTIVES)
    order = known + sorted({n["objective"] for n in nets} - set(known))
    spare = list(TAB10[7:9]) + list(plt.get_cmap("tab20").colors)
    return {o: FIXED_COLOURS.get(o) or (spare.pop(0) if spare else "grey") for o in order}, order


# ----------------------------------------------------------------------------------------------
# Machine-readable results: results.csv (a row per network), objectives.csv (the table)

def hparam_names(nets):
    """The hyperparameter columns (common.hparam_columns) of all these networks."""
    names = dict.fromkeys(k for n in nets for k in common.hparam_columns(n["hparams"]))
    return list(names) or list(common.hparam_columns({}))


def csv_value(v):
    """A cell: None, NaN and inf as an empty cell (write_csv writes floats to 6 digits)."""
    return v if v is None or isinstance(v, (bool, str)) or finite(v) else None


def results_rows(nets, groups):
    """results.csv: one row per network, in the report's objective order, then seed."""
    in_table = {id(n) for g in groups.values() for n in g}
    hps = hparam_names(nets)
    transfer = [(k, q) for k, _, _, q, _, _ in quantities(nets, layers=True) if ":" in k]
    extra = [k for k, _ in SEPARATION if k != "dead" or any(n["dead"] is not None for n in nets)]
    order = {o: i for i, o in enumerate(common.OBJECTIVES)}
    rows = []
    for n in sorted(nets, key=lambda n: (order.get(n["objective"], len(order)), n["objective"],
                                         variant_of(n["hparams"]), str(n["seed"]).zfill(12),
                                         str(n["label"]))):
        row = {"run_id": n["run_id"], "checkpoint": n["label"], "objective": n["objective"],
               "seed": n["seed"], "arch": n["arch"], "dataset": n["dataset_name"],
               "trained_here": not n["orphan"], "in_comparison": id(n) in in_table,
               **{h: n["hparams"].get(h) for h in hps},
               "epochs": n["epochs"], "lr": n["lr"], "batch_size": n["batch_size"],
               "top1": n["top1"], "top1_from": None if n["top1"] is None else
               n["sources"].get("top1", "training"),
               **{k: q(n) for k, q in transfer}, "r2": n["r2"], **{k: n[k] for k in extra}}
        rows.append({k: csv_value(v) for k, v in row.items()})
    return rows


def objectives_rows(groups, cols, cells):
    """objectives.csv: the report's table in long form, one row per objective and quantity,
    plus the pool layer's sparsity, dimensionality and dead units (no claim of the paper: no
    verdict)."""
    hps = hparam_names([n for g in groups.values() for n in g])
    rows = []
    for obj, members in groups.items():
        hp = members[0]["hparams"]
        for key, name, claim, _, _, unit in cols:
            c = cells[obj][key]
            row = {"objective": obj, **{h: hp.get(h) for h in hps}, "quantity": key,
                   "name": name, "unit": unit, "n": c["n"], "mean": c["mean"], "se": c["se"],
                   "diff_vs_softmax": c["diff"], "p": c["p"],
                   "paper_claim": claim_words(claim, unit) if claim else None,
                   "verdict": (c["verdict"] or None) if claim else None}
            rows.append({k: csv_value(v) for k, v in row.items()})
    return rows


def write_tables(out, nets, groups, cols, cells):
    """results.csv and objectives.csv beside report.md; the paths written."""
    written = []
    for name, rows in (("results.csv", results_rows(nets, groups)),
                       ("objectives.csv", objectives_rows(groups, cols, cells))):
        if rows:
            common.write_csv(os.path.join(out, name), rows)
            written.append(name)
    return written


def output_options(args):
    """--out, --dpi and --formats checked: (out, formats); one-line errors."""
    if not os.path.isdir(args.runs):
        raise common.UserError(f"--runs folder not found: {args.runs}")
    out = args.runs if args.out is None else args.out   # --out '' is an error, not --runs
    if not 20 <= args.dpi <= 1200:
        raise common.UserError(f"--dpi {args.dpi} is out of range; use 20-1200 (default 150)")
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in ("png", "pdf", "svg") for f in formats):
        raise common.UserError(f"--formats {args.formats!r}: use png, pdf and/or svg, "
                               f"comma-separated")
    return out, formats


def report_text(runs, found, nets, groups, sections, notes, written):
    """report.md: what was read, the verdicts, the setup, the sections, then the notes."""
    counts = ", ".join(f"{len(found[k])} {name}" for k, name in (
        ("train", "training results.json"), ("evaluate", "evaluate results.json"),
        ("linear_probe", "linear-probe results.json"),
        ("finetune", "fine-tune results.json"), ("cka", "cka.npz"),
        ("class_separation", "class_separation.json")))
    figures = sorted({os.path.basename(p) for p in written if p.endswith(".png")})
    lines = ["# Report: why do better loss functions lead to less transferable features?", "",
             f"Read from `{runs}`: {counts}; {len(nets)} network(s) of {len(groups)} "
             f"objective(s).", "",
             "The paper's claims (Kornblith et al. 2021, SPEC.md): non-softmax objectives have "
             "higher source top-1 and higher class separation R^2 than softmax; higher R^2 goes "
             "with lower linear-probe transfer; fine-tuning differences are small; CKA between "
             "objectives matches the different-seed baseline except in the last few layers.", "",
             "Figures: " + (", ".join(f"`{f}`" for f in figures) or "none") + ".", ""]
    lines += section_verdicts([v for s in sections for v in s.verdicts]) + section_setup(found)
    lines += [line for s in sections for line in s.lines]
    lines += ["## Notes: what was missing or skipped", ""]
    lines += [f"- {n}" for n in notes] or ["- nothing: every piece was found."]
    return "\n".join(lines) + "\n", figures


def main():
    args = parse_args()
    runs = args.runs
    out, formats = output_options(args)
    common.make_out_dir(out, "figures", args.overwrite)

    notes = []
    found, nets, scratch = load_networks(runs, notes)
    groups, by_obj = choose_variants(nets, notes)
    if groups and "softmax" not in groups:
        notes.append("No softmax networks: no p-values or comparison against softmax.")
    if stats is None:
        notes.append("scipy is not installed: no p-values and no rank correlations.")
    figures = Figures(out, formats, args.dpi, *assign_colours(nets))
    cols = quantities([n for g in groups.values() for n in g], separation=True)
    cells = table_cells(groups, cols)   # the table, its verdicts and objectives.csv
    sections = [section_results(groups, [c for c in cols if c[2]], cells, scratch, figures),
                section_cka(found, runs, groups, figures),
                section_class_separation(groups, figures),
                section_slopes(nets, by_obj, groups, figures),
                section_layers(nets, groups),
                section_sweeps(by_obj, groups, figures)]
    notes += [note for s in sections for note in s.notes]
    text, pngs = report_text(runs, found, nets, groups, sections, notes, figures.written)
    report = os.path.join(out, "report.md")
    try:
        common.atomic_write(report, lambda f: f.write(text.encode()))
    except OSError as e:
        raise common.UserError(f"cannot write {report}: {e.strerror or e}")
    tables = write_tables(out, nets, groups, cols, cells)
    print(f"wrote {report}, {' and '.join(tables) or 'no table'} and {len(pngs)} figure(s) "
          f"({', '.join(formats)}) to {out}; {len(notes)} note(s) in the report")


if __name__ == "__main__":
    common.run_main(main)
