"""linear_probe.py: the solver against scikit-learn and SPEC.md's published vectors, the sweep, the
end-to-end path from a checkpoint on digits@5-9, the feature cache, the metric, bad input."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import linear_probe as lp
from conftest import ROOT, full_disk, non_finite_copy, one_line_error, read_only


def blobs(n, d, k, seed=0, sep=1.0, weights=None):
    """Non-negative (post-ReLU-like) features with class structure."""
    rng = np.random.default_rng(seed)
    y = rng.choice(k, size=n, p=weights) if weights is not None else rng.permutation(np.arange(n) % k)
    means = rng.normal(size=(k, d)) * sep
    return np.maximum(means[y] + rng.normal(size=(n, d)), 0).astype(np.float32), y


def objective(x, y, W, b, lam):
    """mean cross-entropy + lam/2 ||W||^2, float64."""
    z = np.asarray(x, np.float64) @ np.asarray(W, np.float64) + np.asarray(b, np.float64)
    m = z.max(1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(1)) + m[:, 0]
    return float((lse - z[np.arange(len(y)), y]).mean() + lam / 2 * (np.asarray(W) ** 2).sum())


def standardized(x, ref):
    mu, sd = ref.mean(0, dtype=np.float64), ref.std(0, dtype=np.float64)
    return ((x - mu) / np.where(sd > 0, sd, 1)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The solver

def test_objective_and_accuracy_match_sklearn():
    from sklearn.linear_model import LogisticRegression
    x, y = blobs(1200, 40, 5, seed=1, sep=0.5)
    xtr, ytr, xte, yte = standardized(x[:900], x[:900]), y[:900], standardized(x[900:], x[:900]), y[900:]
    for lam in (1e-1, 1e-2, 1e-4):
        W, b, info = lp.solve_logistic(xtr, ytr, lam, 5)
        assert info["converged"]
        sk = LogisticRegression(C=1 / (lam * len(xtr)), tol=1e-10, max_iter=20000)
        sk.fit(xtr.astype(np.float64), ytr)
        f_sk = objective(xtr, ytr, sk.coef_.T, sk.intercept_, lam)
        f_ours = objective(xtr, ytr, W.numpy(), b.numpy(), lam)
        assert abs(f_ours - f_sk) <= 1e-4 * f_sk, (lam, f_ours, f_sk)
        assert abs(info["objective"] - f_ours) <= 1e-6 * f_ours   # its float32 value is right too
        acc = (lp.predict(xte, W, b).numpy() == yte).mean()
        assert abs(acc - sk.score(xte.astype(np.float64), yte)) <= 0.003, lam


def test_published_digits_vectors():
    """SPEC.md: sum CE + ||W||^2/(2C) on load_digits X/16, the stratified 25% test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data / 16, d.target, test_size=0.25, random_state=0,
                                          stratify=d.target)
    for C, want in ((1e-4, 0.640000), (1e-2, 0.908889), (1, 0.968889), (100, 0.964444)):
        W, b, _ = lp.solve_logistic(xtr, ytr, 1 / (C * len(xtr)), 10, rtol=1e-8)
        acc = (lp.predict(xte.astype(np.float32), W, b).numpy() == yte).mean()
        assert acc == pytest.approx(want, abs=1e-6), C


def test_rank_deficient_features_are_solved_exactly():
    """Fewer examples than dimensions, a constant and a duplicated column: the null space is
    dropped (exact), and the objective matches scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    x, y = blobs(60, 150, 3, seed=2)
    x[:, 5] = 0.7
    x[:, 6] = x[:, 7]
    lam = 1e-2
    prob = lp.prepare(torch.from_numpy(x.copy()), len(x))
    assert prob.Z.shape[1] < 60          # rank <= n - 1 after centring
    W, b, info = lp.solve_logistic(x, y, lam, 3)
    sk = LogisticRegression(C=1 / (lam * len(x)), tol=1e-10, max_iter=20000).fit(x.astype(float), y)
    f_sk = objective(x, y, sk.coef_.T, sk.intercept_, lam)
    assert abs(objective(x, y, W.numpy(), b.numpy(), lam) - f_sk) <= 1e-4 * f_sk


def test_wide_features_without_rotation(monkeypatch):
    """Above ROTATE_MAX_DIM the features are centred and scaled, not rotated: same optimum."""
    from sklearn.linear_model import LogisticRegression
    monkeypatch.setattr(lp, "ROTATE_MAX_DIM", 10)
    x, y = blobs(300, 25, 3, seed=6, sep=0.5)
    lam = 1e-3
    W, b, info = lp.solve_logistic(x, y, lam, 3)
    assert info["converged"]
    sk = LogisticRegression(C=1 / (lam * len(x)), tol=1e-10, max_iter=20000).fit(x.astype(float), y)
    f_sk = objective(x, y, sk.coef_.T, sk.intercept_, lam)
    assert abs(objective(x, y, W.numpy(), b.numpy(), lam) - f_sk) <= 1e-4 * f_sk


def test_sweep_equals_cold_solves_and_selects_on_val():
    x, y = blobs(1500, 30, 4, seed=3, sep=0.4)
    train, val, test = (x[:900], y[:900]), (x[900:1200], y[900:1200]), (x[1200:], y[1200:])
    lambdas = lp.parse_lambdas("1e-5:1e2:8")
    res, W, b = lp.run_probe(train, val, test, 4, lp.ProbeSettings(lambdas, log=None))
    assert [p["lambda"] for p in res["path"]] == sorted(lambdas, reverse=True)
    assert all(p["converged"] for p in res["path"]) and res["refit"]["converged"]
    xs = standardized(train[0], train[0])
    for p in res["path"][::3]:   # the warm-started path lands where a cold solve does
        Wc, bc, _ = lp.solve_logistic(xs, train[1], p["lambda"], 4)
        f_cold = objective(xs, train[1], Wc.numpy(), bc.numpy(), p["lambda"])
        assert abs(p["objective"] - f_cold) <= 1e-4 * f_cold
    best = max(res["path"], key=lambda p: (p["val"], p["lambda"]))
    assert res["best_lambda"] == best["lambda"] and res["best_val"] == best["val"]
    assert res["val_curve"] == {f"{p['lambda']:.6g}": p["val"] for p in res["path"]}
    # the refit is on train+val at the chosen lambda, standardized with train statistics
    xall = standardized(np.concatenate([train[0], val[0]]), train[0])
    yall = np.concatenate([train[1], val[1]])
    Wr, br, _ = lp.solve_logistic(xall, yall, res["best_lambda"], 4)
    mu, sd = train[0].mean(0, dtype=np.float64), train[0].std(0, dtype=np.float64)
    W_std = W.numpy() * sd[:, None]                 # probe.npz W on raw -> on standardized
    f_ours = objective(xall, yall, W_std, b.numpy() + mu @ W.numpy(), res["best_lambda"])
    f_cold = objective(xall, yall, Wr.numpy(), br.numpy(), res["best_lambda"])
    assert abs(f_ours - f_cold) <= 1e-4 * f_cold
    acc = (lp.predict(test[0], W, b).numpy() == test[1]).mean()
    assert res["test_accuracy"] == pytest.approx(acc) and res["metric"] == "top1"


def test_the_scorer_is_a_parameter():
    """run_probe scores with settings.accuracy: top-1 only by default (the method alone); the
    script passes the project's one rule (common, through lp.accuracy), and its mean_per_class
    picks lambda and is the test accuracy when it is the metric."""
    x, y = blobs(600, 10, 3, seed=5, sep=0.4, weights=[0.6, 0.3, 0.1])
    splits = (x[:300], y[:300]), (x[300:450], y[300:450]), (x[450:], y[450:])
    res, _, _ = lp.run_probe(*splits, 3, lp.ProbeSettings([1e-3, 1e-1, 10], log=None))
    assert [k for k in res if k.startswith("test_")] == ["test_accuracy", "test_top1"]
    res, W, b = lp.run_probe(*splits, 3, lp.ProbeSettings(
        [1e-3, 1e-1, 10], "mean_per_class", accuracy=lp.accuracy, log=None))
    pred = lp.predict(splits[2][0], W, b)
    mpc = common.accuracy(common.class_counts(pred, torch.as_tensor(splits[2][1]), 3))[
        "mean_per_class"]
    assert res["test_accuracy"] == res["test_mean_per_class"] == mpc
    assert res["best_val"] == max(p["val"] for p in res["path"])


def test_mean_per_class_metric_and_features_file(tmp_path):
    """Imbalanced classes: with --metric mean_per_class the reported accuracy is the mean of the
    per-class accuracies of the saved probe's predictions, not top-1. Without val arrays, val is a
    seeded stratified 10% of train."""
    x, y = blobs(1000, 20, 3, seed=4, sep=0.35, weights=[0.7, 0.2, 0.1])
    path = tmp_path / "feats.npz"
    np.savez(path, train_x=x[:700], train_y=y[:700], test_x=x[700:], test_y=y[700:])
    out = tmp_path / "out"
    lp.main(["--features", str(path), "--out", str(out), "--metric", "mean_per_class",
             "--lambdas", "1e-4:1e2:7"])
    r = json.loads((out / "feats" / "features" / "results.json").read_text())
    keep, held = common.stratified_holdout(y[:700], common.VAL_FRACTION, common.VAL_MAX, seed=0)
    assert (r["n_train"], r["n_val"], r["n_test"]) == (len(keep), len(held), 300)
    probe = np.load(out / "feats" / "features" / "probe.npz")
    pred = (x[700:].astype(np.float64) @ probe["W"] + probe["b"]).argmax(1)
    per_class = [(pred[y[700:] == k] == k).mean() for k in range(3)]
    assert r["metric"] == "mean_per_class"
    assert r["test_accuracy"] == pytest.approx(np.mean(per_class))
    assert r["test_top1"] == pytest.approx((pred == y[700:]).mean())
    assert abs(r["test_accuracy"] - r["test_top1"]) > 0.01       # the two really differ here
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 1 and rows[0]["metric"] == "mean_per_class"


def test_folds_are_stratified_and_each_example_is_tested_once(tmp_path):
    """--folds: fold i is scored by the protocol trained on the other folds with fold i+1 as val;
    the reported score is over all pooled predictions, which the saved per-fold probes reproduce,
    and each fold equals run_probe on the same split (so the protocol is unchanged)."""
    x, y = blobs(600, 12, 3, seed=7, sep=0.4, weights=[0.5, 0.3, 0.2])
    fold = lp.fold_of(y, 5, seed=3)
    for c in range(3):    # each class within one example of an equal share in every fold
        counts = np.bincount(fold[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.bincount(fold).max() - np.bincount(fold).min() <= 1
    path = tmp_path / "feats.npz"
    np.savez(path, train_x=x[:400], train_y=y[:400], val_x=x[400:500], val_y=y[400:500],
             test_x=x[500:], test_y=y[500:])
    out = tmp_path / "out"
    lp.main(["--features", str(path), "--out", str(out), "--folds", "5", "--seed", "3",
             "--lambdas", "1e-3:1e1:5"])
    folder = out / "feats" / "features+5fold"
    r = json.loads((folder / "results.json").read_text())
    probe = np.load(folder / "probe.npz")
    assert probe["W"].shape == (5, 12, 3) and r["n_test"] == 600 and r["folds"] == 5
    pred = np.empty(600, dtype=np.int64)
    for i in range(5):
        pred[fold == i] = (x[fold == i].astype(np.float64) @ probe["W"][i] + probe["b"][i]).argmax(1)
    assert r["test_accuracy"] == pytest.approx((pred == y).mean())
    test, val = fold == 2, fold == 3
    train = ~(test | val)
    one, _, _ = lp.run_probe((x[train], y[train]), (x[val], y[val]), (x[test], y[test]), 3,
                             lp.ProbeSettings([1e-3, 1e-2, 1e-1, 1, 10], log=None))
    assert r["fold_results"][2]["test_accuracy"] == one["test_accuracy"]
    assert r["fold_results"][2]["best_lambda"] == one["best_lambda"]
    assert r["fold_accuracy_std"] == pytest.approx(
        np.std([f["test_accuracy"] for f in r["fold_results"]], ddof=1))


@pytest.mark.parametrize("folds, message", [("2", "'2' must be >= 3"),
                                            ("9", "class 2 has 8 examples, fewer than --folds 9")])
def test_bad_folds_one_line_error(tmp_path, folds, message):
    x, y = blobs(40, 4, 3, seed=1)
    y[y == 2] = 0
    y[:8] = 2
    path = tmp_path / "feats.npz"
    np.savez(path, train_x=x[:30], train_y=y[:30], test_x=x[30:], test_y=y[30:])
    r = subprocess.run([sys.executable, "linear_probe.py", "--features", str(path), "--out",
                        str(tmp_path / "out"), "--folds", folds], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------------------------
# From a checkpoint, with the feature cache

def save_small_checkpoint(path, seed=0, objective="softmax"):
    torch.manual_seed(seed)
    model = common.build_model(objective, 5, arch="resnet18", small_input=True)
    ck = common.make_checkpoint(model, {"objective": objective, "arch": "resnet18",
                                        "hparams": common.objective_hparams(objective),
                                        "num_classes": 5, "small_input": True},
                                args={"resolution": 8, "seed": seed}, run_id=f"run{seed}")
    common.save_checkpoint(str(path), ck)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def probe_args(ckpt, out, *extra):
    return ["--checkpoint", str(ckpt), "--data", "digits@5-9", "--out", str(out), "--workers", "0",
            "--device", "cpu", *extra]


def test_progress_a_pair_counter_with_eta_and_lambda_lines_only_when_verbose(tmp_path,
                                                                              monkeypatch, capsys):
    ckpts = []
    for seed in (0, 1):
        ckpts.append(tmp_path / f"s{seed}" / "final.pt")
        ckpts[-1].parent.mkdir()
        save_small_checkpoint(ckpts[-1], seed=seed)
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0)   # a progress line at every batch
    argv = ["--checkpoint", *map(str, ckpts), "--data", "digits@5-9", "--out",
            str(tmp_path / "o"), "--workers", "0", "--device", "cpu", "--batch-size", "100",
            "--lambdas", "1e-3:1e1:3"]
    lp.main(argv)
    log = capsys.readouterr().out
    assert re.search(r"^pair 1 of 2: s0 on digits@5-9", log, re.M), log
    assert re.search(r"^pair 2 of 2 \(eta \d\S*\): s1 on digits@5-9", log, re.M), log
    assert re.search(r"extracting train pool features: 100/\d+ images \(\d+%\), \d+ images/s, "
                     r"eta \d", log), log
    assert re.search(r"extracting test pool features: (\d+)/\1 images \(100%\), .* done in", log)
    assert "  lambda " not in log                         # the path only with --verbose
    lp.main([*argv, "--verbose"])                         # the same pairs, from the cache
    log = capsys.readouterr().out
    assert log.count("  lambda ") == 6 and "extracting" not in log


def test_end_to_end_from_checkpoint_and_cache(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "runs" / "softmax_s3" / "final.pt"
    ckpt.parent.mkdir(parents=True)
    save_small_checkpoint(ckpt, seed=3)
    out = tmp_path / "probe"
    count = Counter(common.collect_features)
    monkeypatch.setattr(common, "collect_features", count)
    lp.main(probe_args(ckpt, out))
    assert count.calls == 3                              # train, val, test
    pair = out / "softmax_s3" / "digits@5-9"
    r = json.loads((pair / "results.json").read_text())
    data = common.load_dataset("digits@5-9")
    assert list(r)[:4] == ["kind", "network", "dataset", "dataset_name"]   # identity first
    net = r["network"]
    assert list(net) == list(common.IDENTITY_FIELDS)
    assert net["checkpoint_path"] == str(ckpt) and net["checkpoint"] == "softmax_s3"
    assert net["checkpoint_hash"] == common.file_hash(str(ckpt))
    assert (net["objective"], net["seed"], net["arch"]) == ("softmax", 3, "resnet18")
    assert (net["run_id"], net["dataset"], r["kind"]) == ("run3", None, "linear_probe")
    assert (r["dataset"], r["dataset_name"], r["layer"]) == ("digits@5-9", "digits@5-9", "pool")
    assert r["resolution"] == 8                          # the checkpoint's training resolution
    assert (r["n_train"], r["n_val"], r["n_test"]) == tuple(len(data[s]) for s in
                                                            ("train", "val", "test"))
    assert (r["dim"], r["num_classes"], r["metric"]) == (512, 5, "top1")
    assert len(r["val_curve"]) == 45 and r["best_lambda"] in [p["lambda"] for p in r["path"]]
    assert 1e-6 * 0.999 <= min(p["lambda"] for p in r["path"]) <= 1e-6 * 1.001
    assert r["test_accuracy"] > 0.25 and r["seconds"] > 0          # chance is 0.2
    # the saved probe and the cached test features reproduce the reported accuracy
    cached = sorted((out / "cache").rglob("*.npz"))
    assert len(cached) == 3
    test_cache = [c for c in cached if c.name.endswith("_test.npz")][0]
    with np.load(test_cache) as f:
        xte, yte = f["x"], f["y"]
    probe = np.load(pair / "probe.npz")
    pred = (xte.astype(np.float64) @ probe["W"] + probe["b"]).argmax(1)
    assert (pred == yte).mean() == pytest.approx(r["test_accuracy"])
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 1
    assert {k: rows[0][k] for k in ("checkpoint", "objective", "seed", "dataset_name", "layer")} \
        == {"checkpoint": "softmax_s3", "objective": "softmax", "seed": "3",
            "dataset_name": "digits@5-9", "layer": "pool"}

    # a rerun reads the cache (a short lambda grid from here on, to save time)
    short = ("--lambdas", "1e-3:1e1:5", "--overwrite")  # another lambda grid: replaces
    lp.main(probe_args(ckpt, out, *short))
    assert count.calls == 3
    first = json.loads((pair / "results.json").read_text())

    # a corrupt cache file and a stale one (made for other data) are rebuilt, the rest reused
    train_cache = [c for c in cached if c.name.endswith("_train.npz")][0]
    train_cache.write_bytes(b"not an npz")
    val_cache = [c for c in cached if c.name.endswith("_val.npz")][0]
    with np.load(val_cache) as f:
        arrays = dict(f)
    key = json.loads(str(arrays["key"]))
    key["data"] = "0" * 16
    np.savez(val_cache, **{**arrays, "key": np.array(json.dumps(key))})
    capsys.readouterr()
    lp.main(probe_args(ckpt, out, *short))
    assert count.calls == 5
    log = capsys.readouterr().out
    assert "stale or corrupt" in log and "unreadable" in log and "other data" in log
    again = json.loads((pair / "results.json").read_text())
    assert again["test_accuracy"] == first["test_accuracy"]
    assert again["val_curve"] == first["val_curve"]

    # new weights at the same path: a new content hash, so new features
    save_small_checkpoint(ckpt, seed=4)
    lp.main(probe_args(ckpt, out, *short))
    assert count.calls == 8
    assert len(list((out / "cache").iterdir())) == 2


def test_dataset_metric_is_used(tmp_path, monkeypatch):
    """A dataset whose spec says mean_per_class (e.g. oxford_pets) is scored that way."""
    ckpt = tmp_path / "a.pt"
    save_small_checkpoint(ckpt)
    real = common.load_dataset
    monkeypatch.setattr(common, "load_dataset",
                        lambda spec, download=False: {**real(spec), "metric": "mean_per_class"})
    out = tmp_path / "out"
    lp.main(probe_args(ckpt, out, "--lambdas", "1e-3:1e1:5", "--resolution", "8"))
    r = json.loads((out / "a" / "digits@5-9" / "results.json").read_text())
    assert r["metric"] == "mean_per_class"
    assert r["test_accuracy"] == r["test_mean_per_class"] != r["test_top1"]


# ----------------------------------------------------------------------------------------------
# Bad input: one line saying what is wrong

def write_features(path, **override):
    x, y = blobs(300, 8, 3, seed=5)
    arrays = {"train_x": x[:200], "train_y": y[:200], "test_x": x[200:], "test_y": y[200:]}
    arrays.update(override)
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("override, message", [
    ("nan", "NaN"),
    ("short_y", "shape"),
    ("test_dim", "features, but train has"),
    ("one_class", "single class"),
    ("missing", "lacks array"),
    ("unseen", "absent from train"),
    ("huge_label", r"train: label 100000000 at index 3 is >= 100,000"),
    ("negative_label", "label -1 at index 0 is negative"),
    ("float_labels", "labels must be integers, got float64"),
    ("column_labels", r"y of shape \(N,\), got \(200, 8\) and \(200, 1\)"),
])
def test_bad_features_one_line_error(tmp_path, override, message):
    x, y = blobs(300, 8, 3, seed=5)
    bad = {"nan": {"train_x": np.where(np.arange(8) == 2, np.nan, x[:200]).astype(np.float32)},
           "short_y": {"train_y": y[:150]},
           "test_dim": {"test_x": x[200:, :5]},
           "one_class": {"train_y": np.zeros(200, dtype=np.int64)},
           "missing": {},
           "unseen": {"test_y": np.full(100, 7)},
           "huge_label": {"train_y": np.where(np.arange(200) == 3, 10 ** 8, y[:200])},
           "negative_label": {"test_y": np.where(np.arange(100) == 0, -1, y[200:])},
           "float_labels": {"train_y": y[:200].astype(np.float64)},
           "column_labels": {"train_y": y[:200, None]}}[override]
    path = write_features(tmp_path / "f.npz", **bad)
    if override == "missing":
        np.savez(path, train_x=x[:200], train_y=y[:200])
    with pytest.raises(common.UserError, match=message) as e:
        lp.main(["--features", path, "--out", str(tmp_path / "out")])
    assert "\n" not in str(e.value)


def test_bad_arguments_one_line_error(tmp_path, monkeypatch):
    ckpt = tmp_path / "a.pt"
    save_small_checkpoint(ckpt)
    cases = [
        (probe_args(ckpt, tmp_path / "o", "--layer", "block99"), "has no layer block99.*block8"),
        (probe_args(tmp_path / "missing.pt", tmp_path / "o"), "checkpoint not found"),
        (probe_args(ckpt, tmp_path / "o", "--lambdas", "1:0.1:5"), "bad --lambdas"),
        (["--features", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")], "not found"),
        (probe_args(ckpt, tmp_path / "o")[:2] + ["--out", str(tmp_path / "o")], "needs --data"),
    ]
    for argv, message in cases:
        with pytest.raises(common.UserError, match=message) as e:
            lp.main(argv)
        assert "\n" not in str(e.value)
    # torchvision weights that cannot be downloaded (no network, empty cache): one clear line
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    try:
        lp.main(probe_args("torchvision:resnet18:IMAGENET1K_V1", tmp_path / "o"))
    except common.UserError as e:
        assert "cannot load torchvision weights" in str(e) and "\n" not in str(e)
    else:
        pytest.skip("torchvision weights were downloadable here")


def test_flags_of_the_other_mode_are_refused(tmp_path, capsys):
    """--metric is for --features (a dataset has its own metric); --layer, --workers & co. go
    with --checkpoint: given in the other mode, each is one line, not silently ignored."""
    ckpt = tmp_path / "a.pt"
    save_small_checkpoint(ckpt)
    err = one_line_error(capsys, lambda: lp.main(probe_args(ckpt, tmp_path / "o", "--metric",
                                                            "mean_per_class")))
    assert "--metric is not used with --checkpoint" in err
    path = write_features(tmp_path / "f.npz")
    for flag, value in (("--layer", "block3"), ("--workers", "1"), ("--batch-size", "3")):
        err = one_line_error(capsys, lambda: lp.main(["--features", path, "--out",
                                                      str(tmp_path / "o"), flag, value]))
        assert f"error: {flag} is not used with --features" in err
    assert not os.path.exists(tmp_path / "o")       # refused before anything is written


def test_summary_rows_carry_the_objectives_hyperparameters():
    net = {"run_id": "r", "checkpoint": "cos_s0", "objective": "cosine_softmax", "seed": 0,
           "arch": "resnet18", "hparams": {"tau": 0.05, "normalize_features": True}}
    row = lp.summary_row({"network": net, "dataset_name": "digits@5-9", "test_accuracy": 0.9})
    assert list(row)[:8] == ["run_id", "checkpoint", "checkpoint_path", "objective", "seed",
                             "arch", "alpha", "lambda_"]
    assert (row["tau"], row["normalize_features"], row["alpha"], row["test_accuracy"]) == \
        (0.05, True, None, 0.9)


def test_command_line_error_exit_status(tmp_path):
    x, _ = blobs(300, 8, 3, seed=5)
    path = write_features(tmp_path / "f.npz", train_y=np.zeros(200, dtype=np.int64))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "linear_probe.py"), "--features", path,
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


def test_an_absurd_label_is_refused_before_any_allocation(tmp_path):
    # one label of 1e8 made 1e8 + 1 classes: the solver asked for 13.6 GB without a word
    x, y = blobs(300, 8, 3, seed=5)
    path = write_features(tmp_path / "f.npz", train_y=np.where(np.arange(200) == 3, 10 ** 8,
                                                                y[:200]))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "linear_probe.py"), "--features", path,
                        "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "label 100000000 at index 3" in p.stderr


def test_a_checkpoint_with_nan_weights_is_named_as_the_problem(tmp_path, capsys):
    ckpt = tmp_path / "a.pt"
    save_small_checkpoint(ckpt)
    bad = non_finite_copy(ckpt, tmp_path / "nan.pt", "layer4.1.bn2.running_var", float("inf"))
    err = one_line_error(capsys, lambda: lp.main(probe_args(bad, tmp_path / "o")))
    assert f"{bad} holds non-finite weights (model tensor layer4.1.bn2.running_var has inf)" \
        in err and "use another checkpoint" in err and "--lr" not in err


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "a.pt"
    save_small_checkpoint(ckpt)
    (tmp_path / "afile").write_text("keep me")
    afile = str(tmp_path / "afile")
    for argv, message in (
            (probe_args(ckpt, f"{afile}/sub"), f"output folder {afile}/sub cannot be created: "
                                               f"{afile} is a file, not a folder"),
            (probe_args(ckpt, tmp_path / "o", "--cache", afile), f"--cache {afile} exists and is "
                                                                 f"a file"),
            (probe_args(ckpt, tmp_path / "o2", "--cache", f"{afile}/c"),
             f"--cache {afile}/c cannot be created: {afile} is a file, not a folder")):
        assert message in one_line_error(capsys, lambda: lp.main(argv))
    read_only(monkeypatch, tmp_path / "ro")
    err = one_line_error(capsys, lambda: lp.main(probe_args(ckpt, tmp_path / "ro" / "o")))
    assert "cannot write into" in err and "Read-only file system" in err
    err = one_line_error(capsys, lambda: lp.main(probe_args(ckpt, tmp_path / "o3", "--cache",
                                                            str(tmp_path / "ro"))))
    assert "is not writable" in err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    path = write_features(tmp_path / "f.npz")
    full_disk(monkeypatch, ".results.json.")
    err = one_line_error(capsys, lambda: lp.main(["--features", path, "--out", str(tmp_path / "o"),
                                                  "--lambdas", "1e-2,1"]))
    assert "results.json: no space left on the device (nothing written)" in err


def test_results_of_another_checkpoint_or_setting_are_not_replaced(tmp_path):
    a, b = tmp_path / "A" / "ref" / "final.pt", tmp_path / "B" / "ref" / "final.pt"
    for path, seed in ((a, 0), (b, 1)):
        path.parent.mkdir(parents=True)
        save_small_checkpoint(path, seed=seed)
    out = tmp_path / "probe"
    lams = ("--lambdas", "1e-3,1e-1")
    lp.main(probe_args(a, out, *lams))
    results = out / "ref" / "digits@5-9" / "results.json"
    first = json.loads(results.read_text())
    lp.main(probe_args(a, out, *lams))  # the same computation: replaced by the same result
    with pytest.raises(common.UserError, match="another checkpoint or setting .*checkpoint_hash"):
        lp.main(probe_args(b, out, *lams))  # same label 'ref', other weights
    with pytest.raises(common.UserError, match="standardize: True -> False"):
        lp.main(probe_args(a, out, *lams, "--no-standardize"))
    assert json.loads(results.read_text())["network"] == first["network"]  # untouched
    lp.main(probe_args(b, out, *lams, "--overwrite"))
    assert json.loads(results.read_text())["network"]["checkpoint_hash"] == \
        common.file_hash(str(b))


def test_a_probe_into_a_training_folder_is_refused(tmp_path, capsys):
    """The probe's summary.csv replaced a training run's (issue 25): refused before any work."""
    run = tmp_path / "train"
    run.mkdir()
    (run / "summary.csv").write_text("epoch,step,lr\n1,18,0.1\n")
    (run / "results.json").write_text(json.dumps({"kind": "train", "top1": 0.9}))
    path = write_features(tmp_path / "f.npz")
    argv = ["--features", path, "--out", str(run), "--lambdas", "1e-2,1"]
    err = one_line_error(capsys, lambda: lp.main(argv))
    assert "holds results of another kind (training: results.json of kind train); " \
           "linear-probe results need a folder of their own" in err
    assert (run / "summary.csv").read_text() == "epoch,step,lr\n1,18,0.1\n"
    assert sorted(os.listdir(run)) == [".lock", "results.json", "summary.csv"]
    # a features file probed again into its own folder: the same computation, replaced; another
    # file with the same name: refused
    out = tmp_path / "probe"
    lp.main(["--features", path, "--out", str(out), "--lambdas", "1e-2,1"])
    lp.main(["--features", path, "--out", str(out), "--lambdas", "1e-2,1"])
    (tmp_path / "other").mkdir()
    other = write_features(tmp_path / "other" / "f.npz")
    err = one_line_error(capsys, lambda: lp.main(["--features", other, "--out", str(out),
                                                  "--lambdas", "1e-2,1"]))
    assert f"holds the probe of another checkpoint or setting (features: '{path}' -> " \
           f"'{other}')" in err


@pytest.mark.parametrize("flags, message", [
    (["--lambdas", "1e-6:1e5:1000000000"],
     "--lambdas '1e-6:1e5:1000000000' asks for 1,000,000,000 values; at most 1,000"),
    (["--lambdas", ",".join(["1"] * 1001)], "asks for 1,001 values; at most 1,000"),
    (["--workers", "1000"], "'1000' is more than the"),
])
def test_counts_have_an_upper_bound(tmp_path, capsys, flags, message):
    """--lambdas ...:1000000000 asked for 7.5 GB; --workers 1000 forked until memory ran out."""
    path = write_features(tmp_path / "f.npz")
    err = one_line_error(capsys, lambda: lp.main(["--features", path, "--out",
                                                  str(tmp_path / "o"), *flags]))
    assert message in err
    assert lp.parse_lambdas("1e-6:1e5:1000") == sorted(set(lp.parse_lambdas("1e-6:1e5:1000")))
