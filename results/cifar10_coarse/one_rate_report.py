"""one_rate/report.md: the pre-registered analysis of the paper's protocol (README.md beside this
file, "Analysis plan and verdict rules"), computed from the committed JSON files alone.

    python results/cifar10_coarse/one_rate.py report     # writes one_rate/report.md

Every rule below is the plan's, numbered as there; the thresholds are its constants.
"""
import json
import math
import os

import numpy as np

import one_rate
import study

study.repo_module("make_figures")   # from the repository root: the import below finds it loaded
from make_figures import (finite, holm, mean_se, overall_verdict, slope_fit,  # noqa: E402
                          slope_text, slope_verdict, spearman, stats, tost_p, welch)

ALPHA = 0.05
POOL = ("coarse_to_fine", "clothing", "fashion_mnist")
# quantity -> (label, equivalence margin, digits); transfer quantities in points
QUANTITIES = {"mean": ("probe mean of the 3 targets", 1.0, 2),
              **{t: (f"probe {t.replace('_', '-')}", 1.0, 2) for t in POOL},
              "top1": ("source test top-1", 0.5, 2), "r2": ("R^2 (pool)", 0.02, 3)}
TITLE_NEED = 4      # of the 8 objectives (rule 1)


# ----------------------------------------------------------------------------------------------
# Reading one network's committed numbers

def read(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def network_numbers(base, name):
    """A network's numbers (accuracies in %) under BASE/{train,probe,separation,finetune}/NAME:
    {'diverged': bool, 'top1', 'r2', 'sparsity', 'dead', 'dim', each pool target, 'mean',
    'block6', 'finetune'}; a number not yet measured is absent. None before training ends."""
    train_dir = os.path.join(base, "train", name)
    if os.path.exists(os.path.join(train_dir, "diverged.json")):
        return {"diverged": True}
    train = read(os.path.join(train_dir, "results.json"))
    if train is None:
        return None
    out = {"diverged": False, "top1": 100 * train["top1"]}
    for t, (_, _, folder) in study.TARGETS.items():
        r = read(os.path.join(base, "probe", name, folder, "results.json"))
        if r is not None:
            out["block6" if t.endswith("block6") else t] = 100 * r["test_accuracy"]
    if all(t in out for t in POOL):
        out["mean"] = sum(out[t] for t in POOL) / len(POOL)
    sep = read(os.path.join(base, "separation", name, "class_separation.json"))
    if sep is not None:
        pool = sep["results"][0]["layers"]["pool"]
        out.update({k: pool[k] for k in ("r2", "sparsity", "dead", "dim") if k in pool})
    ft = read(os.path.join(base, "finetune", name, study.TARGETS["coarse_to_fine"][2],
                           "results.json"))
    if ft is not None:
        out["finetune"] = 100 * ft["test_accuracy"]
    return out


def configurations():
    """{(objective, lr, wd): [numbers of each seed that finished training]} in network order. A
    reused network's dead-unit fraction comes from its rerun (one_rate.py, order 5), when the
    rerun reproduced its training record exactly."""
    out, reruns = {}, {}
    for net in one_rate.networks():
        nums = network_numbers(net.base, net.name)
        if net.rerun:
            if nums is not None and one_rate.rerun_matches(net) and "dead" in nums:
                reruns[(net.folder, net.name)] = nums["dead"]
            continue
        out.setdefault((net.objective, net.lr, net.wd), [])
        if nums is not None:
            out[(net.objective, net.lr, net.wd)].append((net, nums))
    for seeds in out.values():
        for net, nums in seeds:
            if "dead" not in nums and (net.folder, net.name) in reruns:
                nums["dead"] = reruns[(net.folder, net.name)]
    return {k: [nums for _, nums in v] for k, v in out.items()}


def vals(seeds, key):
    return [s[key] for s in seeds if not s["diverged"] and finite(s.get(key))]


def diverged_text(seeds):
    k = sum(s["diverged"] for s in seeds)
    return f"; {k} of {len(seeds)} diverged" if k else ""


def diverged_note(cells):
    """' (squared_error at 1.6: 1 of 2 diverged)' for the cells {(objective, lr): seeds} of
    one comparison that have a diverged seed, or ''."""
    notes = [f"{o} at {lr:g}: {k} of {len(seeds)} diverged" for (o, lr), seeds in cells.items()
             if (k := sum(s["diverged"] for s in seeds))]
    return f" ({'; '.join(notes)})" if notes else ""


def all_diverged(seeds):
    return bool(seeds) and all(s["diverged"] for s in seeds)


def cell(seeds, key, digits):
    v = vals(seeds, key)
    if not v:
        return "diverged" if all_diverged(seeds) else "-"
    m, se, n = mean_se(v)
    return f"{m:.{digits}f}" + (f" ± {se:.{digits}f}" if n > 1 else "") + f" (n={n})"


def md_table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows), ""]


# ----------------------------------------------------------------------------------------------
# Rule 1: each objective against softmax at the shared rate (arm A)

def compare(a, b, margin):
    """Welch + TOST of seed values a against b: {diff, low, high, p, tost} or None (< 2 a side)."""
    w = welch(a, b)
    return None if w is None else {**w, "tost": tost_p(a, b, margin)}


def primary(configs, key):
    """{objective: comparison with softmax at lr 0.1 on `key`, Holm-adjusted over the 8}. The
    adjustment and the verdicts wait until all 8 comparisons exist: adjusted over the 4 there
    were, squared error was once printed *worse* (p 0.012 x 4 = 0.048) under "over the 8"."""
    soft = vals(configs[("softmax", 0.1, one_rate.WD)], key)
    margin = QUANTITIES[key][1]
    others = [o for o in one_rate.SPEC_NETS if o != "softmax"]
    comps = {o: compare(vals(configs[(o, 0.1, one_rate.WD)], key), soft, margin) for o in others}
    if not all(comps.values()):
        return comps
    ps = holm([c["p"] for c in comps.values()])
    tosts = holm([c["tost"] for c in comps.values()])
    for c, p, t in zip(comps.values(), ps, tosts):
        c.update(p_holm=p, tost_holm=t)
        c["verdict"] = primary_verdict(c, key)
    return comps


def primary_verdict(c, key):
    up, down = ("better", "worse") if key not in ("top1", "r2") else ("higher", "lower")
    if c["p_holm"] < ALPHA:
        return up if c["diff"] > 0 else down
    if c["tost_holm"] < ALPHA:
        return "no different"
    return "cannot tell"


def claim_verdict(comps, key):
    """The per-objective claim over the 8 comparisons (rule 1): for transfer the title's claim
    (others worse), for top-1 and R^2 the paper's 'others higher'."""
    have = sum(1 for c in comps.values() if c)
    if have < len(comps):
        return f"waits ({have} of {len(comps)} objectives have 2 or more seeds on each side)"
    v = [c["verdict"] for c in comps.values()]
    n = {w: v.count(w) for w in set(v)}
    if key in ("top1", "r2"):
        return "holds" if n.get("higher", 0) >= TITLE_NEED and not n.get("lower") else \
            "cannot tell"
    worse, better, same = n.get("worse", 0), n.get("better", 0), n.get("no different", 0)
    if worse >= TITLE_NEED and not better:
        return "holds"
    if not worse and better + same >= TITLE_NEED:
        return "refuted"
    if worse and better:
        return "depends on the objective"
    return "cannot tell"


def holm_cells(c):
    """The Holm-adjusted p, TOST p and verdict of a comparison, or 'waits' before all 8 exist."""
    if "verdict" not in c:
        return ["waits", "waits", "waits (Holm over all 8)"]
    return [f"{c['p_holm']:.2g}", f"{c['tost_holm']:.2g}", f"**{c['verdict']}**"]


def section_primary(configs):
    lines = ["## Rule 1: every objective against softmax at lr 0.1 per 256 (arm A)", "",
             f"Welch's t-test against softmax, Holm-adjusted over the 8 objectives; *no different*"
             f" by two one-sided tests against the margin (Holm-adjusted); 95% intervals. Margins:"
             f" {', '.join(f'{QUANTITIES[k][0]} {QUANTITIES[k][1]:g}' for k in QUANTITIES)}.", ""]
    verdicts = []
    for key, (label, margin, digits) in QUANTITIES.items():
        comps = primary(configs, key)
        rows = [["softmax", cell(configs[("softmax", 0.1, one_rate.WD)], key, digits),
                 "", "", "", "", ""]]
        for o, c in comps.items():
            seeds = configs[(o, 0.1, one_rate.WD)]
            rows.append([o, cell(seeds, key, digits) + diverged_text(seeds), *(
                ["-"] * 5 if c is None else
                [f"{c['diff']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]",
                 f"{c['p']:.2g}", *holm_cells(c)])])
        v = claim_verdict(comps, key)
        verdicts.append((label, v))
        lines += [f"### {label}", "", *md_table(
            ["objective", "mean ± se (n)", "minus softmax [95% CI]", "p", "p Holm",
             f"TOST p Holm (±{margin:g})", "verdict"], rows),
            f"Claim over the 8 objectives: **{v}**.", ""]
    return lines, verdicts


# ----------------------------------------------------------------------------------------------
# Rule 2: the rate as a factor (arm B) and the effective step (arm C)

def welch_of_cells(cells, signs, level=0.95):
    """A signed sum of cell means (e.g. an interaction) with a Welch-Satterthwaite interval:
    {est, low, high} or None when a cell has fewer than 2 values."""
    if any(len(c) < 2 for c in cells) or stats is None:
        return None
    v = [np.var(c, ddof=1) / len(c) for c in cells]
    est = sum(s * np.mean(c) for s, c in zip(signs, cells))
    se = math.sqrt(sum(v))
    if se == 0:
        return {"est": est, "low": est, "high": est}
    df = sum(v) ** 2 / sum(x ** 2 / (len(c) - 1) for x, c in zip(v, cells))
    t = float(stats.t.ppf(0.5 + level / 2, df))
    return {"est": est, "low": est - t * se, "high": est + t * se}


def interval_text(w, digits):
    return "-" if w is None else \
        f"{w['est']:+.{digits}f} [{w['low']:+.{digits}f}, {w['high']:+.{digits}f}]"


def section_rates(configs):
    keys = [("mean", 2), ("r2", 3), ("sparsity", 3), ("dead", 3), ("top1", 2)]
    lines = ["## Rule 2: the learning rate as a factor (arm B)", ""]
    rows = []
    for o in one_rate.ARM_B:
        for lr in (0.1, 0.4, 1.6):
            seeds = configs[(o, lr, one_rate.WD)]
            rows.append([o, f"{lr:g}", *(cell(seeds, k, d) for k, d in keys),
                         sum(s["diverged"] for s in seeds)])
    lines += md_table(["objective", "lr per 256", "probe mean", "R^2", "sparsity",
                       "dead units", "source top-1", "diverged"], rows)
    # the plan: a cell whose seeds all diverged reads "diverged" in every comparison; a partly
    # diverged one is compared on its trained seeds, with the diverged count beside it
    rows = []
    for o in one_rate.ARM_B:
        for lr in (0.4, 1.6):
            named = {(o, r): configs[(o, r, one_rate.WD)] for r in (lr, 0.1)}
            seeds, label = list(named.values()), f"0.1 -> {lr:g}" + diverged_note(named)
            if any(map(all_diverged, seeds)):
                rows.append([o, label, "diverged", "diverged"])
                continue
            rows.append([o, label, *(interval_text(welch_of_cells([vals(s, k) for s in seeds],
                                                                  (1, -1)), d)
                                     for k, d in (("mean", 2), ("r2", 3)))])
    lines += ["Change with the rate (Welch 95% intervals):", "",
              *md_table(["objective", "rate", "probe mean", "R^2"], rows)]
    rows = []
    for o in one_rate.ARM_B[1:]:
        for lr in (0.4, 1.6):
            named = {(x, r): configs[(x, r, one_rate.WD)]
                     for r in (lr, 0.1) for x in (o, "softmax")}
            seeds = list(named.values())      # objective, softmax at lr; the same at 0.1
            label = f"{lr:g} vs 0.1" + diverged_note(named)
            diverged = any(map(all_diverged, seeds))
            for key, margin, d in (("mean", 1.0, 2), ("r2", 0.02, 3)):
                if diverged:
                    rows.append([o, label, key, "diverged", "**diverged**"])
                    continue
                w = welch_of_cells([vals(s, key) for s in seeds], (1, -1, -1, 1))
                v = "cannot tell (a cell has < 2 seeds)" if w is None else \
                    "changes" if w["low"] > 0 or w["high"] < 0 \
                    else "does not" if -margin < w["low"] and w["high"] < margin else "cannot tell"
                rows.append([o, label, key, interval_text(w, d), f"**{v}**"])
    lines += ["Interaction: (objective - softmax) at the rate minus (objective - softmax) at "
              "0.1; *changes* when the 95% interval excludes 0, *does not* when it lies inside "
              "the margin (1 point; R^2 0.02).", "",
              *md_table(["objective", "rates", "quantity", "difference of differences", "verdict"],
                        rows)]
    return lines + section_arm_c(configs)


def section_arm_c(configs):
    wd16 = configs.get(("softmax", 0.1, 16 * one_rate.WD), [])
    lines = ["### Arm C: softmax at 0.1 with 16 x weight decay", ""]
    rows = []
    for key, margin, d in (("mean", 1.0, 2), ("r2", 0.02, 3)):
        c = vals(wd16, key)
        at01 = vals(configs[("softmax", 0.1, one_rate.WD)], key)
        at16 = vals(configs[("softmax", 1.6, one_rate.WD)], key)
        w01, w16 = welch(c, at01), welch(c, at16)
        if all_diverged(wd16):
            v = "diverged"
        elif w01 is None or w16 is None:
            v = "waits"
        elif w01["p"] < ALPHA and tost_p(c, at16, margin) < ALPHA:
            v = "the effective step explains the rate"
        elif tost_p(c, at01, margin) < ALPHA:
            v = "it does not"
        else:
            v = "cannot tell"
        fmt = lambda w: "-" if w is None else \
            f"{w['diff']:+.{d}f} [{w['low']:+.{d}f}, {w['high']:+.{d}f}]"
        rows.append([key, cell(wd16, key, d) + diverged_text(wd16), fmt(w01), fmt(w16),
                     f"**{v}**"])
    return lines + md_table(["quantity", "softmax lr 0.1, wd 1.28e-3", "minus softmax at 0.1",
                             "minus softmax at 1.6", "verdict"], rows)


# ----------------------------------------------------------------------------------------------
# Rule 3: the mechanism, on configuration means; rule 4: dead units or sparse codes

def config_means(configs, lr=None, keys=("r2", "mean", *POOL, "sparsity", "dead")):
    """[{key: seed mean}] per configuration (of one rate, or all), configurations with every key."""
    out = []
    for (o, r, wd), seeds in configs.items():
        if lr is not None and (r, wd) != (lr, one_rate.WD):
            continue
        means = {k: np.mean(vals(seeds, k)) for k in keys if vals(seeds, k)}
        if "r2" in means:
            out.append({"objective": o, "lr": r, "wd": wd, **means})
    return out


def ols(y, columns, coef=1):
    """OLS of y on [1, *columns]: coefficient `coef` (1: the first column) per +0.1 of it, with
    its 95% t interval, as slope_fit's dict; None without enough degrees of freedom."""
    X = np.column_stack([np.ones(len(y)), *columns])
    n, k = X.shape
    if n <= k or np.linalg.matrix_rank(X) < k or stats is None:
        return None
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    cov = float(resid @ resid) / (n - k) * np.linalg.inv(X.T @ X)
    se, t = math.sqrt(cov[coef, coef]), float(stats.t.ppf(1 - ALPHA / 2, n - k))
    b = float(beta[coef])
    return {"n": n, "slope": b / 10, "low": (b - t * se) / 10, "high": (b + t * se) / 10,
            "p": float(2 * stats.t.sf(abs(b) / se, n - k)) if se > 0 else 0.0}


def section_mechanism(configs):
    lines = ["## Rule 3: the slope of transfer on R^2 within each rate (configuration means)", "",
             "OLS over configuration means (seeds averaged first), points per +0.1 R^2, 95% t "
             "interval on (configurations - 2) df; rule 1 of the first protocol (delta 0.5).", ""]
    rows = []
    for lr in (0.1, 0.4, 1.6):
        pts = config_means(configs, lr)
        per = {}
        for t in POOL:
            fit = slope_fit([(p["r2"], p[t]) for p in pts if t in p])
            per[t] = slope_verdict(fit)
            rows.append([f"{lr:g}", t, len([p for p in pts if t in p]), slope_text(fit),
                         f"**{per[t]}**"])
        rows.append([f"{lr:g}", "overall (rule 2)", "", "", f"**{overall_verdict(list(per.values()))}**"])
    lines += md_table(["lr per 256", "target", "configurations", "slope [95% CI]", "verdict"], rows)
    pts = [p for p in config_means(configs) if "mean" in p]
    rates = sorted({(p["lr"], p["wd"]) for p in pts})
    dummies = [np.array([float((p["lr"], p["wd"]) == r) for p in pts]) for r in rates[1:]]
    y = np.array([p["mean"] for p in pts]) if pts else np.array([])
    x = np.array([p["r2"] for p in pts]) if pts else np.array([])
    rows = [["all rates, rate as a fixed effect", len(pts), slope_text(ols(y, [x, *dummies]))]]
    for cov in ("sparsity", "dead"):
        sub = [p for p in pts if cov in p]
        fit = ols(np.array([p["mean"] for p in sub]), [np.array([p["r2"] for p in sub]),
                                                       np.array([p[cov] for p in sub])]) \
            if sub else None
        rows.append([f"adjusted for {cov}", len(sub), slope_text(fit)])
    lines += ["Declared covariates (probe mean; reported, no verdict of their own):", "",
              *md_table(["fit", "configurations", "slope per +0.1 R^2 [95% CI]"], rows)]
    rows = []
    for cov in ("r2", "sparsity", "dead"):
        sub = [p for p in pts if cov in p]
        rho, p = spearman([q[cov] for q in sub], [q["mean"] for q in sub])
        rows.append([cov, len(sub), "-" if not finite(rho) else f"{rho:+.2f} (p = {p:.2g})"])
    return lines + md_table(["covariate", "configurations", "Spearman rho with the probe mean"],
                            rows)


def dead_or_sparse(s, d):
    if not (finite(s) and finite(d)) or s == 0:
        return "-"
    return "dead units" if d >= 0.8 * s else "sparse codes" if d <= 0.2 * s else "both"


def dead_row(seeds):
    """[sparsity, dead (seed range), live zeros, verdict] of rule 4 on the seed means, or None
    before any seed has a sparsity."""
    s, d = vals(seeds, "sparsity"), vals(seeds, "dead")
    if not s:
        return None
    ms, md_ = float(np.mean(s)), float(np.mean(d)) if d else math.nan
    live = (ms - md_) / (1 - md_) if finite(md_) and md_ < 1 else math.nan
    rng = f"{min(d):.3f}-{max(d):.3f}" if d else "-"
    return [f"{ms:.3f}", "-" if not d else f"{md_:.3f} ({rng})",
            "-" if not finite(live) else f"{live:.3f}", dead_or_sparse(ms, md_)]


def first_protocol_cells():
    """{(network, lr): (numbers of each rerun that reproduced its record, reruns planned)} for
    the first protocol's networks that are no network of this one (one_rate.py, order 5)."""
    cells = {}
    for net in one_rate.networks():
        if not net.rerun or (net.folder, net.name) in one_rate.REUSED:
            continue                # a network of this protocol: in the table above
        key = (net.name.rsplit("_s", 1)[0], net.lr)
        seeds, planned = cells.get(key, ([], 0))
        same = one_rate.rerun_matches(net) and network_numbers(net.base, net.name)
        cells[key] = seeds + ([same] if same else []), planned + 1
    return cells


def mismatched_reruns():
    """The reruns that finished without reproducing their committed record (left out)."""
    return [f"{n.folder}/{n.name}" for n in one_rate.networks()
            if n.rerun and one_rate.rerun_matches(n) is False]


def section_dead(configs):
    rows = [[o, f"{lr:g}" + ("" if wd == one_rate.WD else f", wd {wd:g}"), *row]
            for (o, lr, wd), seeds in configs.items() if (row := dead_row(seeds))]
    first = [[name, f"{lr:g}", *(dead_row(seeds) or ["-"] * 4), f"{len(seeds)} of {planned}"]
             for (name, lr), (seeds, planned) in first_protocol_cells().items()]
    mismatched = mismatched_reruns()
    header = ["sparsity", "dead (seed range)", "live zeros", "verdict"]
    return ["## Rule 4: dead units or sparse codes (pool layer)", "",
            "Sparsity s (zeros among all activations), dead-unit fraction d (channels zero on "
            "all 5,000 source images), zeros among live units (s - d) / (1 - d); *dead units* "
            "when d >= 0.8 s, *sparse codes* when d <= 0.2 s.", "",
            *md_table(["objective", "lr", *header], rows),
            "A rerun (a committed network trained again for its weights, order 5) lends its "
            "dead units only when it reproduced the committed training record to the last "
            "digit" + (f"; these did not, and are left out: {', '.join(mismatched)}." if
                       mismatched else "; every finished rerun did.") + " The first protocol's "
            "other networks (report.md), rerun for their dead units only:", "",
            *md_table(["network", "lr", *header, "reruns that reproduced"], first)]


# ----------------------------------------------------------------------------------------------
# Rules 5 and 6: fine-tuning and CKA (descriptive at one network per objective)

def section_finetune(configs):
    rows, ft, lp = [], [], []
    for o in one_rate.SPEC_NETS:
        seeds = configs[(o, 0.1, one_rate.WD)]
        f = [s for s in seeds if finite(s.get("finetune"))]
        if f:
            ft.append(f[0]["finetune"])
            lp.append(f[0].get("coarse_to_fine", math.nan))
            rows.append([o, f"{f[0]['finetune']:.2f}", f"{f[0].get('coarse_to_fine', math.nan):.2f}"])
    span = lambda v: max(v) - min(v) if v else math.nan
    return ["## Rule 5: fine-tuning on coarse-to-fine (seed 0 of each objective, lr 0.1)", "",
            *md_table(["objective", "fine-tuned top-1", "linear probe top-1 (same network)"], rows),
            f"Span of the objectives: {span(ft):.2f} points fine-tuned, {span(lp):.2f} points "
            f"linear-probed. One network per objective gives no interval: \"fine-tuning "
            f"differences are small\" is **cannot tell** by rule 5.", ""]


def section_cka():
    c = read(os.path.join(one_rate.OUT, "lr0.1", "cka", "cka.json"))
    head = ["## Rule 6: CKA against the different-seed baseline (lr 0.1, seed 0)", ""]
    if c is None:
        return head + ["CKA waits for all of its networks' weights at once (CKA_SET).", ""]
    names = [n["checkpoint"] for n in c["networks"]]
    i0, i1 = names.index("softmax_s0"), names.index("softmax_s1")
    others = [n for n in names if n not in ("softmax_s0", "softmax_s1")]
    rows = []
    for layer, m in c["same_layer"].items():
        base = m[i0][i1]
        rows.append([layer, f"{base:.3f}", *(f"{m[i0][names.index(n)] - base:+.3f}"
                                             for n in others)])
    return head + md_table(["layer", "softmax s0-s1", *(f"{n} - baseline" for n in others)],
                           rows) + ["One baseline pair gives no interval: **cannot tell** by "
                                    "rule 6.", ""]


# ----------------------------------------------------------------------------------------------
# The two protocols side by side, and the report

def section_protocols(configs):
    first = {"softmax": ("softmax", 1.6), "label_smoothing": ("label_smoothing_a0.1", 0.8),
             "cosine_softmax": ("cosine_softmax_t0.05", 0.1), "squared_error": ("squared_error", 0.1)}
    rows = []
    for o in one_rate.SPEC_NETS:
        name, lr = first.get(o, (None, None))
        old = []
        if name:
            seeds = {"softmax": 4, "squared_error": 3}.get(o, 2)
            old = [n for s in range(seeds) if (n := network_numbers(
                os.path.join(study.HERE, "runs"), f"{name}_s{s}"))]
        new = configs[(o, 0.1, one_rate.WD)]
        rows.append([o, "-" if not lr else f"{lr:g}", cell(old, "mean", 2) if old else "-",
                     cell(old, "r2", 3) if old else "-", cell(new, "mean", 2), cell(new, "r2", 3)])
    return ["## The two protocols side by side", "",
            "First protocol: each objective at the rate chosen on its source validation "
            "(report.md); this one: every objective at 0.1 per 256.", "",
            *md_table(["objective", "first: lr", "first: probe mean", "first: R^2",
                       "one rate: probe mean", "one rate: R^2"], rows)]


def section_cost():
    """Process-hours (one process on one core; the study ran two at a time) from the committed
    records: each network's train_seconds (reused copies cost nothing here) and each probe's and
    fine-tuning's seconds, features included."""
    trained, reruns, probes, finetunes, diverged = [], [], [], [], 0
    for net in one_rate.networks():
        if one_rate.reused_source(net):
            continue
        diverged += one_rate.status(net) == "diverged"
        r = read(os.path.join(net.out, "results.json"))
        if r is not None:
            (reruns if net.rerun else trained).append(r["train_seconds"])
        if not net.rerun:
            probes += [p["seconds"] for _, _, folder in study.TARGETS.values() if (p := read(
                os.path.join(net.base, "probe", net.name, folder, "results.json")))]
            ft = read(os.path.join(net.base, "finetune", net.name,
                                   study.TARGETS["coarse_to_fine"][2], "results.json"))
            finetunes += [ft["seconds"]] if ft else []
    parts = [("networks trained to the end (arms A, B, C)", trained),
             ("reruns for weights (order 5)", reruns),
             ("linear probes, feature extraction included", probes),
             ("fine-tuning, its learning-rate grid included", finetunes)]
    rows = [[what, len(v), f"{sum(v) / 3600:.1f}"] for what, v in parts]
    total = sum(sum(v) for _, v in parts) / 3600
    return ["## Cost", "", *md_table(["part", "runs", "process-hours"], rows),
            f"Total **{total:.1f} process-hours**: about {total / 2:.1f} hours of a 2-core machine "
            f"that runs two at a time. Not in the records, so not counted: the {diverged} diverged "
            f"runs (stopped early; their results.json is never written), class separation and "
            f"CKA (seconds each, by their logs).", ""]


def section_status(configs):
    n = sum(len(s) for s in configs.values())
    planned = len([n for n in one_rate.networks() if not n.rerun])
    div = [f"{o} lr {lr:g}" + ("" if wd == one_rate.WD else f" wd {wd:g}") + f": {k} of {len(s)}"
           for (o, lr, wd), s in configs.items() if (k := sum(x["diverged"] for x in s))]
    return [f"Networks finished: {n} of {planned} planned. Diverged (kept, never dropped): "
            f"{'; '.join(div) if div else 'none'}.", "", *missing_networks()]


def missing_networks():
    """Lines naming every planned network without a result, and why: its FAILED record (the
    exit status, the error and the log), else that it is not trained yet."""
    failed, waiting = [], []
    for net in one_rate.networks():
        if net.rerun or one_rate.status(net):
            continue
        path = os.path.join(net.out, "FAILED")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                failed.append(f"- `{net.folder}/{net.name}` failed: {f.readline().strip()}")
        else:
            waiting.append(f"`{net.folder}/{net.name}`")
    lines = [f"Missing, training failed ({len(failed)}; no verdict uses them):", *failed, ""]
    return (lines if failed else []) + ([
        f"Missing, not trained yet ({len(waiting)}): {', '.join(waiting)}.", ""] if waiting else [])


def write_report():
    configs = configurations()
    primary_lines, verdicts = section_primary(configs)
    lines = ["# The paper's protocol at small scale: one learning rate for all nine objectives",
             "", "Written by `python results/cifar10_coarse/one_rate.py report` from the committed "
             "JSON files; the rules are README.md's plan (\"Analysis plan and verdict rules\"), "
             "fixed before any network of this protocol existed. Accuracies in %.", "",
             *section_status(configs), "## Verdicts of rule 1 (arm A, lr 0.1)", "",
             *md_table(["quantity", "verdict"], [[k, f"**{v}**"] for k, v in verdicts]),
             *primary_lines, *section_rates(configs), *section_mechanism(configs),
             *section_dead(configs), *section_finetune(configs), *section_cka(),
             *section_protocols(configs), *section_cost()]
    os.makedirs(one_rate.OUT, exist_ok=True)
    path = os.path.join(one_rate.OUT, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {os.path.relpath(path, study.ROOT)}", flush=True)
