"""Tests of common.py: objectives, model, param groups, datasets, transforms, features, checkpoints."""
import argparse
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
from conftest import ROOT, SHARED_DATA, full_disk, non_finite_copy, one_line_error, read_only

# ---------------------------------------------------------------------------------------------
# Objectives: each loss against values worked out by hand with plain Python math, per example.

Z = [[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]
Y = [0, 2]
K = 3


def logsumexp(row):
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def ce(row, y):
    return logsumexp(row) - row[y]


def by_hand(objective, **hp):
    per = []
    for row, y in zip(Z, Y):
        if objective in ("softmax", "extra_final_layer_l2", "dropout"):
            per.append(ce(row, y))
        elif objective == "label_smoothing":
            a = hp.get("alpha", 0.1)
            lse = logsumexp(row)
            t = [(1 - a) * (k == y) + a / K for k in range(K)]
            per.append(sum(-t[k] * (row[k] - lse) for k in range(K)) / (1 - a))
        elif objective == "sigmoid":
            total = 0.0
            for k in range(K):
                p = 1 / (1 + math.exp(-(row[k] - math.log(K))))
                total += -math.log(p) if k == y else -math.log(1 - p)
            per.append(total)
        elif objective == "logit_penalty":
            beta = hp.get("beta", 6e-4)
            per.append(ce(row, y) + beta / 2 * sum(v * v for v in row))
        elif objective == "logit_normalization":
            tau = hp.get("tau", 0.04)
            norm = math.sqrt(sum(v * v for v in row))
            per.append(ce([v / (tau * norm) for v in row], y))
        elif objective == "cosine_softmax":
            tau = hp.get("tau", 0.05)
            per.append(ce([v / tau for v in row], y))
        elif objective == "squared_error":
            kappa, m, s = hp.get("kappa", 9), hp.get("m", 60), hp.get("loss_scale", 10)
            per.append(s * (kappa * (row[y] - m) ** 2 + sum(row[k] ** 2 for k in range(K) if k != y)))
    return sum(per) / len(per)


@pytest.mark.parametrize("objective", list(common.OBJECTIVES))
def test_loss_matches_hand_worked_value(objective):
    crit = common.make_criterion(objective, K)
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    loss = crit(z, torch.tensor(Y))
    assert loss.ndim == 0 and loss.dtype == torch.float64
    assert loss.item() == pytest.approx(by_hand(objective), rel=1e-12)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    z32 = torch.tensor(Z, dtype=torch.float32)
    assert crit(z32, torch.tensor(Y)).dtype == torch.float32


def test_hand_worked_literals():
    # A few values written out, to catch a by_hand() that drifts along with the code.
    y = torch.tensor([0])
    z = torch.zeros(1, 4, dtype=torch.float64)
    # label smoothing at z = 0: CE against any target distribution is log K, times 1/(1-a).
    assert common.make_criterion("label_smoothing", 4)(z, y).item() == pytest.approx(
        math.log(4) / 0.9)
    # sigmoid at z = 0: p = 1/(1+K) per class -> -log(1/5) - 3 log(4/5).
    assert common.make_criterion("sigmoid", 4)(z, y).item() == pytest.approx(
        math.log(5) - 3 * math.log(0.8))
    # squared error at z = 0: s * kappa * M^2 = 10 * 9 * 3600.
    assert common.make_criterion("squared_error", 4)(z, y).item() == pytest.approx(324000.0)
    # logit penalty: CE(0) + beta/2 * ||z||^2 with z = (1, 1, 1, 1): log 4 + 6e-4/2 * 4.
    assert common.make_criterion("logit_penalty", 4)(z + 1, y).item() == pytest.approx(
        math.log(4) + 1.2e-3)


def test_overrides_and_unknown_names():
    crit = common.make_criterion("logit_normalization", K, tau=0.5)
    z = torch.tensor(Z, dtype=torch.float64)
    assert crit(z, torch.tensor(Y)).item() == pytest.approx(by_hand("logit_normalization", tau=0.5))
    with pytest.raises(ValueError, match="valid: softmax"):
        common.make_criterion("hinge", K)
    with pytest.raises(ValueError, match="valid: tau"):
        common.make_criterion("logit_normalization", K, alpha=0.2)
    assert common.objective_hparams("cosine_softmax")["normalize_features"] is True


# ---------------------------------------------------------------------------------------------
# Model

def test_resnet50_matches_torchvision():
    model = common.build_model("softmax", 1000, arch="resnet50")
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    tv = torchvision.models.resnet50(num_classes=1000)
    tv.load_state_dict(model.state_dict(), strict=True)
    # zero-init of the last BN gamma of every residual branch, fc ~ N(0, 0.01^2), bias 0
    assert all((b.bn3.weight == 0).all() for b in common.block_modules(model))
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert (model.fc.bias == 0).all()
    assert len(common.block_modules(model)) == 16


@pytest.mark.parametrize("objective", ["dropout", "cosine_softmax", "extra_final_layer_l2"])
def test_heads_keep_torchvision_keys(objective):
    model = common.build_model(objective, 10, arch="resnet18")
    keys = set(torchvision.models.resnet18(num_classes=10).state_dict())
    assert set(model.state_dict()) == keys


def test_cosine_head_invariant_to_weight_scale():
    torch.manual_seed(0)
    model = common.build_model("cosine_softmax", 10, arch="resnet18", small_input=True).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        model.fc.weight[3] *= 7.5
        after = model(x)
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-6)
    assert before.abs().max() <= 1 + 1e-5  # cosine + zero bias
    # the TF code's variant: only w normalized, so output scales with ||x||
    tf = common.build_model("cosine_softmax", 10, arch="resnet18", normalize_features=False)
    assert tf.fc.normalize_features is False


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = common.build_model("dropout", 10, arch="resnet18", small_input=True)
    assert model.fc.p == pytest.approx(0.3)
    feats = torch.rand(64, 512)
    model.eval()
    torch.testing.assert_close(model.fc(feats), model.fc(feats))
    model.train()
    assert not torch.allclose(model.fc(feats), model.fc(feats))


def test_small_input_stem():
    model = common.build_model("softmax", 10, arch="resnet18", small_input=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_wide_and_deep_variants_build():
    for arch in ("resnet34", "wide_resnet50_2"):
        assert common.build_model("softmax", 7, arch=arch).fc.out_features == 7
    with pytest.raises(ValueError, match="unknown arch"):
        common.build_model("softmax", 7, arch="vgg16")


def test_param_groups():
    model = common.build_model("extra_final_layer_l2", 10, arch="resnet18")
    groups = common.param_groups(model, "extra_final_layer_l2", 8e-5)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())
    assert by_id[id(model.fc.weight)] == pytest.approx(8e-5 + 8e-4)
    assert by_id[id(model.fc.bias)] == 0
    assert by_id[id(model.conv1.weight)] == pytest.approx(8e-5)
    assert by_id[id(model.bn1.weight)] == 0 and by_id[id(model.bn1.bias)] == 0
    plain = common.param_groups(common.build_model("softmax", 10, arch="resnet18"), "softmax", 8e-5)
    assert len(plain) == 2


# ---------------------------------------------------------------------------------------------
# Datasets: miniature copies in each family's real on-disk format.

def write_npz_folder(path, sizes=(("train", 60), ("validation", 20), ("test", 30)), hw=(12, 10),
                     channels=3, classes=6):
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in sizes:
        labels = np.arange(n) % classes
        images = rng.integers(0, 256, (n, *hw, channels), dtype=np.uint8)
        images[..., 0, 0, 0] = labels  # label visible in the pixels, to check pairing
        np.savez(os.path.join(path, f"toy_{split}.npz"), images=images, labels=labels)
    with open(os.path.join(path, "classes.json"), "w") as f:
        json.dump({"classes": [f"c{i}" for i in range(classes)]}, f)


def test_npz_folder_and_subsets(tmp_path):
    write_npz_folder(tmp_path / "toy")
    d = common.load_dataset(f"npz:{tmp_path / 'toy'}")
    assert (len(d["train"]), len(d["val"]), len(d["test"])) == (60, 20, 30)
    assert d["num_classes"] == 6 and d["classes"][2] == "c2" and d["metric"] == "top1"
    img, y = d["train"][7]
    assert img.dtype == torch.uint8 and img.shape == (3, 12, 10) and img[0, 0, 0] == y
    sub = common.load_dataset(f"npz:{tmp_path / 'toy'}@4,1")
    assert sub["num_classes"] == 2 and sub["classes"] == ["c4", "c1"]
    for split in ("train", "val", "test"):
        for i in range(len(sub[split])):
            img, y = sub[split][i]
            assert {4: 0, 1: 1}[int(img[0, 0, 0])] == y


@pytest.mark.parametrize("change, message", [
    (lambda lb: lb.astype(np.float32), "labels must be integers, got float32"),
    (lambda lb: np.where(np.arange(len(lb)) == 3, -1, lb), "label -1 at index 3 is negative"),
    (lambda lb: lb[:, None], r"labels \(N,\), got .* \(60, 1\)"),
    (lambda lb: np.where(np.arange(len(lb)) == 5, 10 ** 9, lb), "label 1000000000 at index 5"),
    (lambda lb: lb * 0, "has 1 class: a classifier needs at least 2"),
])
def test_bad_labels_are_one_line_errors(tmp_path, change, message):
    write_npz_folder(tmp_path / "d")
    f = tmp_path / "d" / "toy_train.npz"
    with np.load(f) as d:
        images, labels = d["images"], d["labels"]
    np.savez(f, images=images, labels=change(labels))
    with pytest.raises(common.UserError, match=message):
        common.load_dataset(f"npz:{tmp_path / 'd'}")


def test_a_class_seen_only_in_test_and_a_broken_classes_json_are_refused(tmp_path):
    write_npz_folder(tmp_path / "d")
    f = tmp_path / "d" / "toy_train.npz"
    with np.load(f) as d:
        images, labels = d["images"], d["labels"]
    keep = labels != 5
    np.savez(f, images=images[keep], labels=labels[keep])
    with pytest.raises(common.UserError, match="class 5 .* has val images but no training"):
        common.load_dataset(f"npz:{tmp_path / 'd'}")
    common.load_dataset(f"npz:{tmp_path / 'd'}@0-4")  # a subset without it is fine
    (tmp_path / "d" / "classes.json").write_text("{not json")
    with pytest.raises(common.UserError, match="classes.json is not valid JSON"):
        common.load_dataset(f"npz:{tmp_path / 'd'}")


@pytest.mark.parametrize("objective, overrides, message", [
    ("label_smoothing", {"alpha": 2}, r"alpha must be in \[0, 1\)"),
    ("label_smoothing", {"alpha": 1.0}, r"alpha must be in \[0, 1\)"),
    ("logit_normalization", {"tau": -0.05}, "tau must be > 0"),
    ("cosine_softmax", {"tau": float("nan")}, "tau must be > 0"),
    ("squared_error", {"kappa": -9}, "kappa must be > 0"),
    ("squared_error", {"loss_scale": 0}, "loss_scale must be > 0"),
    ("dropout", {"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ("extra_final_layer_l2", {"lambda_": -1}, "lambda must be >= 0"),
    ("logit_penalty", {"beta": float("inf")}, "beta must be >= 0"),
])
def test_objective_hyperparameters_are_checked_where_they_are_defined(objective, overrides,
                                                                      message):
    with pytest.raises(common.UserError, match=message):
        common.objective_hparams(objective, **overrides)
    with pytest.raises(common.UserError, match=message):
        common.build_model(objective, 5, "resnet18", **overrides)


def test_objective_hyperparameter_edges_that_are_valid():
    assert common.objective_hparams("label_smoothing", alpha=0)["alpha"] == 0
    assert common.objective_hparams("dropout", dropout=0.0)["dropout"] == 0
    assert common.objective_hparams("squared_error", m=-3)["m"] == -3


def test_npz_grayscale_and_holdout(tmp_path):
    write_npz_folder(tmp_path / "g", sizes=(("train", 100), ("test", 20)), channels=1, classes=5)
    d = common.load_dataset(f"npz:{tmp_path / 'g'}")
    assert d["train"][0][0].shape == (3, 12, 10)
    assert len(d["val"]) == 10 and len(d["train"]) == 90
    assert np.bincount(d["val"].labels).tolist() == [2] * 5  # stratified
    again = common.load_dataset(f"npz:{tmp_path / 'g'}")
    assert np.array_equal(d["val"].indices, again["val"].indices)  # deterministic
    assert not set(d["val"].indices) & set(d["train"].indices)


def test_digits_splits_disjoint_deterministic():
    d = common.load_dataset("digits")
    idx = [set(d[s].indices.tolist()) for s in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert sum(map(len, idx)) == 1797 and len(d["test"]) == 450
    lo, hi = common.load_dataset("digits@0-4"), common.load_dataset("digits@5-9")
    assert set(lo["test"].indices) | set(hi["test"].indices) == idx[2]
    assert set(lo["val"].indices) <= idx[1] and set(hi["val"].indices) <= idx[1]
    assert sorted(set(hi["train"].labels)) == [0, 1, 2, 3, 4]
    assert hi["classes"] == ["5", "6", "7", "8", "9"]
    assert np.array_equal(common.load_dataset("digits@0-4")["train"].indices, lo["train"].indices)


def test_per_class_cap():
    full, capped = common.load_dataset("digits@5-9"), common.load_dataset("digits@5-9,per_class=7")
    assert capped["name"] == "digits@5-9,per_class_7" and capped["classes"] == full["classes"]
    for split in ("train", "val", "test"):
        counts = np.bincount(capped[split].labels, minlength=5)
        assert counts.tolist() == [7] * 5  # every class of digits has more than 7 in each split
        assert set(capped[split].indices) <= set(full[split].indices)  # a subset of the split
    again = common.load_dataset("digits@5-9,per_class=7")
    assert np.array_equal(again["train"].indices, capped["train"].indices)  # deterministic
    whole = common.load_dataset("digits@per_class=1000")  # a cap above every class: no change
    assert np.array_equal(whole["train"].indices, common.load_dataset("digits")["train"].indices)


def test_merged_classes():
    # '+' joins original classes into one new class, in the order given; per_class caps each
    # original class, so merged classes stay balanced between their members
    whole = common.load_dataset("digits")
    merged = common.load_dataset("digits@0+8,1+9,3+5,per_class=10")
    assert merged["num_classes"] == 3 and merged["classes"] == ["0+8", "1+9", "3+5"]
    assert merged["name"] == "digits@0+8,1+9,3+5,per_class_10"
    for split in ("train", "val", "test"):
        v = merged[split]
        original = v.source.labels[v.indices]
        assert set(original.tolist()) == {0, 8, 1, 9, 3, 5}
        new = {0: 0, 8: 0, 1: 1, 9: 1, 3: 2, 5: 2}
        assert v.labels.tolist() == [new[c] for c in original.tolist()]
        counts = np.bincount(original, minlength=10)[[0, 8, 1, 9, 3, 5]]
        assert counts.max() == counts.min()  # the same cap on every original class
        assert set(v.indices) <= set(whole[split].indices)
    mixed = common.load_dataset("digits@2-3,0+1")  # ranges and groups mix: 2, 3, {0, 1}
    assert mixed["num_classes"] == 3 and mixed["classes"] == ["2", "3", "0+1"]


def test_from_split_resplits_one_split():
    whole = common.load_dataset("digits")
    only = common.load_dataset("digits@5-9,from=test")
    assert only["name"] == "digits@5-9,from_test"
    idx = [set(only[s].indices.tolist()) for s in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert set().union(*idx) <= set(whole["test"].indices.tolist())  # test images only
    n = len(set().union(*idx))
    assert n == int((whole["test"].source.labels[whole["test"].indices] >= 5).sum())
    assert abs(len(idx[2]) - 0.2 * n) <= 5 and len(idx[1]) >= 5
    assert np.bincount(only["test"].labels).min() >= 8  # stratified
    again = common.load_dataset("digits@5-9,from=test")
    assert np.array_equal(again["val"].indices, only["val"].indices)


def test_digits_split_is_the_spec_split():
    # SPEC.md: sklearn LogisticRegression(C=1) on load_digits/16 with this split scores 0.968889.
    from sklearn.linear_model import LogisticRegression
    d = common.load_dataset("digits")
    tr = np.concatenate([d["train"].indices, d["val"].indices])
    src = d["train"].source
    x = src.images[..., 0].reshape(len(src), -1).astype(np.float64)
    from sklearn.datasets import load_digits
    x = load_digits().data / 16
    clf = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(x[tr], src.labels[tr])
    acc = (clf.predict(x[d["test"].indices]) == src.labels[d["test"].indices]).mean()
    assert acc == pytest.approx(0.968889, abs=1e-6)


def write_image_folder(root, splits=("train", "val"), classes=("cat", "dog", "eel"), n=4):
    rng = np.random.default_rng(1)
    for split in splits:
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_image_folder_families(tmp_path):
    write_image_folder(tmp_path / "f", splits=("train", "test"), n=12)
    d = common.load_dataset(f"folder:{tmp_path / 'f'}@1-2")
    assert d["classes"] == ["dog", "eel"] and d["num_classes"] == 2
    assert len(d["test"]) == 24 and len(d["train"]) + len(d["val"]) == 24
    img, y = d["train"][0]
    assert img.dtype == torch.uint8 and img.shape[0] == 3 and y in (0, 1)
    write_image_folder(tmp_path / "in", splits=("train", "val"), n=12)
    inet = common.load_dataset(f"imagenet:{tmp_path / 'in'}")
    assert len(inet["test"]) == 36 and len(inet["val"]) > 0  # ImageNet val/ is reported as test
    write_image_folder(tmp_path / "bs", splits=("train", "val", "test"), n=3)
    bs = common.load_dataset(f"birdsnap:{tmp_path / 'bs'}")
    assert (len(bs["train"]), len(bs["val"]), len(bs["test"])) == (9, 9, 9)


def write_cifar(root, kind):
    rng = np.random.default_rng(2)
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    os.makedirs(folder)
    k = 10 if kind == "cifar10" else 100
    key = "labels" if kind == "cifar10" else "fine_labels"

    def batch(n, offset):
        labels = [(i + offset) % k for i in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = labels  # red channel of pixel (0, 0) carries the label
        return {"data": data, key: labels}
    if kind == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)]
        for i, name in enumerate(names):
            pickle.dump(batch(40, i), open(folder / name, "wb"))
        pickle.dump(batch(30, 0), open(folder / "test_batch", "wb"))
        pickle.dump({"label_names": [f"n{i}" for i in range(10)]}, open(folder / "batches.meta", "wb"))
    else:
        pickle.dump(batch(1000, 0), open(folder / "train", "wb"))
        pickle.dump(batch(200, 0), open(folder / "test", "wb"))
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, open(folder / "meta", "wb"))


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_pickled_batches(tmp_path, monkeypatch, kind):
    write_cifar(tmp_path, kind)
    # The miniature files cannot match torchvision's md5 sums of the real ones.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    d = common.load_dataset(f"{kind}:{tmp_path}@3,5")
    assert d["num_classes"] == 2
    assert d["classes"] == (["n3", "n5"] if kind == "cifar10" else ["f3", "f5"])
    for split in ("train", "val", "test"):
        assert len(d[split]) > 0
        img, y = d[split][0]
        assert img.shape == (3, 32, 32) and {3: 0, 5: 1}[int(img[0, 0, 0])] == y
    full = common.load_dataset(f"{kind}:{tmp_path}")
    assert len(full["train"]) + len(full["val"]) == (200 if kind == "cifar10" else 1000)


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data not present")
def test_real_npz_data():
    d = common.load_dataset(f"npz:{os.path.join(SHARED_DATA, 'clothing_small')}@0-4")
    assert d["classes"] == ["dress", "hat", "longsleeve", "outwear", "pants"]
    assert d["image_size"] == 64 and len(d["val"]) > 0 and len(d["test"]) > 0


# ---------------------------------------------------------------------------------------------
# Transforms, features, metrics

def test_transforms_shapes_and_dtype():
    img = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    for tf in (common.train_transform(24), common.train_transform(24, "small", flip=False),
               common.eval_transform(24), common.eval_transform(24, crop_fraction=1.0)):
        out = tf(img)
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    x = common.normalize(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_extract_features_layers():
    torch.manual_seed(0)
    model = common.build_model("softmax", 5, arch="resnet18", small_input=True)
    data = common.load_dataset("digits@0-4")
    loader = common.eval_loader(data["val"], resolution=8, batch_size=32)
    names = common.layer_names(model)
    assert names[:2] == ["block1", "block2"] and names[-3:] == ["block8", "pool", "logits"]
    feats, labels = common.collect_features(model, loader, ["block1", "block8", "pool", "logits"])
    n = len(data["val"])
    assert feats["block1"].shape == (n, 64 * 8 * 8) and feats["block8"].shape == (n, 512)
    assert feats["pool"].shape == (n, 512) and feats["logits"].shape == (n, 5)
    assert (feats["pool"] >= 0).all() and np.array_equal(labels, data["val"].labels)
    # the pooled features are what the head sees: logits = fc(pool)
    with torch.no_grad():
        logits = model.fc(torch.from_numpy(feats["pool"])).numpy()
    np.testing.assert_allclose(logits, feats["logits"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="has no layer block99; valid: block1, "):
        next(common.extract_features(model, loader, ["block99"]))


def test_metrics_spec_vector():
    labels = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    pred = [0, 0, 1, 0, 1, 2, 3, 0, 0, 0]
    m = common.accuracy(common.class_counts(torch.tensor(pred), torch.tensor(labels), 4))
    assert m["mean_per_class"] == pytest.approx(0.5208333, abs=1e-7) and m["top1"] == 0.4
    # counts add up: two halves summed (as ranks all-reduce them) score as the whole
    halves = sum(common.class_counts(torch.tensor(pred[i::2]), torch.tensor(labels[i::2]), 4)
                 for i in range(2))
    assert common.accuracy(halves) == m


# ---------------------------------------------------------------------------------------------
# Checkpoints

def small_checkpoint(objective="cosine_softmax"):
    model = common.build_model(objective, 5, arch="resnet18", small_input=True)
    ema = {k: v.clone() + (1 if v.is_floating_point() else 0) for k, v in model.state_dict().items()}
    model_args = {"objective": objective, "hparams": common.objective_hparams(objective),
                  "arch": "resnet18", "num_classes": 5, "small_input": True}
    return model, common.make_checkpoint(model, model_args, ema=ema,
                                         args={"resolution": 8, "seed": 3})


def test_checkpoint_roundtrip_and_ema(tmp_path):
    model, ck = small_checkpoint()
    path = str(tmp_path / "run" / "final.pt")
    common.save_checkpoint(path, ck)
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    loaded = common.load_checkpoint(path, arch="resnet18", num_classes=5)
    assert loaded["versions"]["torch"] == torch.__version__
    m_ema = common.model_from_checkpoint(loaded)
    m_raw = common.model_from_checkpoint(loaded, use_ema=False)
    torch.testing.assert_close(m_raw.conv1.weight, model.conv1.weight)
    torch.testing.assert_close(m_ema.conv1.weight, model.conv1.weight + 1)
    net, network = common.load_pretrained(path)
    assert network["checkpoint"] == "run" and network["resolution"] == 8 and network["seed"] == 3
    assert network["objective"] == "cosine_softmax" and len(network["checkpoint_hash"]) == 16


def test_network_identity_and_result_header(tmp_path):
    _, ck = small_checkpoint()
    ck.update(run_id=common.new_run_id(), dataset="digits@0-4")
    path = str(tmp_path / "softmax_s3" / "final.pt")
    common.save_checkpoint(path, ck)
    _, network = common.load_pretrained(path)
    assert list(network) == list(common.IDENTITY_FIELDS) == [
        "run_id", "checkpoint", "checkpoint_path", "checkpoint_hash", "objective", "hparams",
        "seed", "arch", "dataset", "dataset_name", "resolution", "small_input",
        "stem_pool"]
    assert network == {"run_id": ck["run_id"], "checkpoint": "softmax_s3", "checkpoint_path": path,
                       "checkpoint_hash": common.file_hash(path), "objective": "cosine_softmax",
                       "hparams": common.objective_hparams("cosine_softmax"), "seed": 3,
                       "arch": "resnet18", "dataset": "digits@0-4", "dataset_name": "digits@0-4",
                       "resolution": 8, "small_input": True, "stem_pool": "torchvision"}
    ck["dataset"] = "imagenet"  # the authors' networks: trained on data this kit did not load
    common.save_checkpoint(path, ck)
    assert common.load_pretrained(path)[1]["dataset_name"] == "imagenet"
    assert len(ck["run_id"]) == 32 and ck["run_id"] != common.new_run_id()
    del ck["run_id"]                                     # a checkpoint from before run ids
    common.save_checkpoint(path, ck)
    assert common.load_pretrained(path)[1]["run_id"] is None
    for other in (common.scratch_identity("resnet50", False),
                  common.torchvision_identity("torchvision:resnet50", "resnet50", "IMAGENET1K_V2")):
        assert list(other) == list(common.IDENTITY_FIELDS) and other["run_id"] is None
    assert common.scratch_identity("resnet18", True)["objective"] == "scratch"
    # one network or several; the dataset of the result (spec and short name), always
    header = common.result_header(network, "npz:/data/cifar10@5-9", "linear_probe")
    assert header == {"kind": "linear_probe", "network": network,
                      "dataset": "npz:/data/cifar10@5-9", "dataset_name": "cifar10@5-9"}
    header = common.result_header([network, network], {"spec": "digits"}, "cka")
    assert list(header) == ["kind", "networks", "dataset", "dataset_name"]
    assert header["networks"] == [network, network] and header["dataset_name"] == "digits"


def test_command_line_helpers(tmp_path):
    import argparse
    for parse in (common.positive_int, common.nonnegative_int, common.positive_float,
                  common.nonnegative_float, common.fraction):
        for bad in ("-1", "x", "nan", "inf", "-inf"):
            with pytest.raises(argparse.ArgumentTypeError):
                parse(bad)
    for parse in (common.positive_int, common.positive_float, common.fraction):
        with pytest.raises(argparse.ArgumentTypeError, match="'0' must be"):
            parse("0")
    assert common.nonnegative_int("0") == 0 and common.nonnegative_float("0") == 0.0
    assert common.positive_int("3") == 3 and common.positive_float("1e-6") == 1e-6
    assert common.fraction("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError):
        common.fraction("1.5")
    with pytest.raises(argparse.ArgumentTypeError):
        common.positive_int("2.5")
    # argparse turns the refusal into one line and exit status 2
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=common.positive_int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "0"])
    assert e.value.code == 2
    # the input side: asked for, else the network's training resolution, else 224
    assert common.input_resolution(16, {"resolution": 8}) == 16
    assert common.input_resolution(None, {"resolution": 8}) == 8
    assert common.input_resolution(None, {"resolution": None}) == 224
    model = common.build_model("softmax", 5, arch="resnet18")
    assert common.resolve_layers(model, "block8, pool") == ["block8", "pool"]
    assert common.resolve_layers(model, "all") == common.layer_names(model)
    for bad, message in (("block9", "has no layer block9; valid: block1"), ("", "no layer given"),
                         ("pool,pool", "repeated")):
        with pytest.raises(common.UserError, match=message):
            common.resolve_layers(model, bad)
    common.make_out_dir(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.UserError, match="exists and is a file"):
        common.make_out_dir(str(tmp_path / "file"))
    with pytest.raises(common.UserError, match="file/sub cannot be created: .*file is a file, "
                                               "not a folder"):
        common.make_out_dir(str(tmp_path / "file" / "sub"))  # --out under a plain file
    common.release_folder(str(tmp_path / "a" / "b"))
    # a folder several runs share (a cache): created, not held; refused as early
    common.make_shared_dir(str(tmp_path / "c" / "d"), "--cache")
    common.make_shared_dir(str(tmp_path / "c" / "d"), "--cache")
    with pytest.raises(common.UserError, match="--cache .*file exists and is a file"):
        common.make_shared_dir(str(tmp_path / "file"), "--cache")
    with pytest.raises(common.UserError, match="--cache .*file/sub cannot be created: .*file "
                                               "is a file, not a folder"):
        common.make_shared_dir(str(tmp_path / "file" / "sub"), "--cache")


def test_read_only_folders_are_one_line_errors(tmp_path, monkeypatch):
    old = tmp_path / "ro" / "x.json"
    common.save_json(old, {"a": 1})
    read_only(monkeypatch, tmp_path / "ro")
    with pytest.raises(common.UserError, match="cannot write .*x.json: Read-only file system"):
        common.save_json(old, {"a": 2})
    assert json.loads(old.read_text()) == {"a": 1}
    with pytest.raises(common.UserError, match="cannot write into .*: Read-only file system"):
        common.make_out_dir(str(tmp_path / "ro"))
    with pytest.raises(common.UserError, match="--cache .* is not writable"):
        common.make_shared_dir(str(tmp_path / "ro"), "--cache")


def test_checkpoint_errors(tmp_path):
    _, ck = small_checkpoint("softmax")
    path = str(tmp_path / "c.pt")
    common.save_checkpoint(path, ck)
    with pytest.raises(ValueError, match="not found"):
        common.load_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="is a resnet18, expected resnet50"):
        common.load_checkpoint(path, arch="resnet50")
    with pytest.raises(ValueError, match="has 5 classes, expected 10"):
        common.load_checkpoint(path, num_classes=10)
    data = open(path, "rb").read()
    trunc = tmp_path / "t.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        common.load_checkpoint(str(trunc))
    # random bytes are a damaged file, not an unsafe one; a class torch will not build is unsafe
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"random\.pt is corrupt or truncated \(Unsupported "):
        common.load_checkpoint(str(tmp_path / "random.pt"))
    import fractions
    torch.save({"x": fractions.Fraction(1, 3)}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match=r"cannot be loaded safely \(.*fractions\.Fraction"):
        common.load_checkpoint(str(tmp_path / "unsafe.pt"))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        common.load_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        common.load_checkpoint(str(tmp_path / "empty.pt"))
    # NaN or inf anywhere in the weights, raw or EMA: unusable, and the message says so, naming
    # the first tensor (in the order of the state dict), with the caller's advice
    for part, name, value, what in (("model", "layer3.1.bn2.bias", float("nan"), "NaN"),
                                    ("ema", "fc.weight", -float("inf"), "inf")):
        bad = non_finite_copy(path, tmp_path / f"{part}.pt", name, value, part)
        with pytest.raises(common.UserError, match=rf"{part}\.pt holds non-finite weights "
                                                   rf"\({part} tensor {name} has {what}\): it is "
                                                   rf"unusable.*; do this$"):
            common.load_checkpoint(bad, advice="do this")
        with pytest.raises(common.UserError, match="use another checkpoint"):
            common.load_pretrained(bad)


def test_a_run_folder_means_its_final_pt(tmp_path):
    """--checkpoint runs/softmax_s3 is runs/softmax_s3/final.pt, the same network and identity
    (it used to say "corrupt or truncated ... re-run the training")."""
    _, ck = small_checkpoint()
    run = tmp_path / "softmax_s3"
    common.save_checkpoint(str(run / "final.pt"), ck)
    assert common.checkpoint_names([str(run), "torchvision:resnet18"]) == \
        [str(run / "final.pt"), "torchvision:resnet18"]
    assert common.load_pretrained(str(run))[1] == common.load_pretrained(str(run / "final.pt"))[1]
    os.rename(run / "final.pt", run / "last.pt")
    with pytest.raises(common.UserError, match="softmax_s3 is a run folder whose training has "
                                               "not finished .last.pt but no final.pt.; rerun"):
        common.load_pretrained(str(run))
    os.remove(run / "last.pt")
    with pytest.raises(common.UserError, match="is a folder without final.pt"):
        common.checkpoint_name(str(run))
    with pytest.raises(common.UserError, match="checkpoint not found: .*nope.pt"):
        common.checkpoint_names([str(tmp_path / "nope.pt")])


def test_unused_flags_are_refused(capsys):
    """refuse_unused: a flag given a value other than its default, that this mode does not
    read, is one line; the same flag at its default passes (it changes nothing)."""
    def parse(argv):
        p = common.argument_parser("doc")
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--n", type=int, default=3)
        args = p.parse_args(argv)
        common.refuse_unused(p, args, {"n"}, "here (use --n)")
        return args
    assert parse(["--n", "4", "--fast"]).n == 4
    for argv, flag in ((["--lr", "0.1"], "--lr"), (["--no-fast"], "--no-fast")):
        with pytest.raises(SystemExit) as e:
            parse(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err == f"error: {flag} is not used here (use --n) (see " \
                                            f"{os.path.basename(sys.argv[0])} --help)\n"


def test_write_csv_quotes_what_needs_it(tmp_path):
    """A dataset spec holds commas (npz:DIR@5-9,per_class=2000): quoted, it stays one column."""
    import csv
    rows = [{"dataset": "cifar10@5-9,per_class_2000", "acc": 0.1234567, "note": 'say "hi"'},
            {"dataset": "digits", "acc": None, "extra": True}]
    common.write_csv(str(tmp_path / "t.csv"), rows)
    text = (tmp_path / "t.csv").read_text()
    assert text.splitlines()[0] == "dataset,acc,note,extra"
    assert list(csv.DictReader(open(tmp_path / "t.csv"))) == [
        {"dataset": "cifar10@5-9,per_class_2000", "acc": "0.123457", "note": 'say "hi"',
         "extra": ""}, {"dataset": "digits", "acc": "", "note": "", "extra": "True"}]
    assert common.hparam_columns({"tau": 0.05, "normalize_features": False, "new": 1}) == {
        "alpha": None, "lambda_": None, "dropout": None, "beta": None, "tau": 0.05,
        "normalize_features": False, "kappa": None, "m": None, "loss_scale": None, "new": 1}


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    common.save_json(path, {"a": 1})

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        common.atomic_write(str(path), boom)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    # every results file of every script goes through atomic_write (json, csv, npz, checkpoints)
    common.save_json(tmp_path / "r.json", {"a": 1})
    full_disk(monkeypatch, ".r.json.")
    with pytest.raises(common.UserError, match=r"r\.json: no space left on the device \(the "
                                               r"previous file is unchanged\)") as e:
        common.save_json(tmp_path / "r.json", {"a": 2})
    assert "\n" not in str(e.value) and json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    full_disk(monkeypatch, ".x.npz.")
    with pytest.raises(common.UserError, match=r"no space left on the device \(nothing written"):
        common.save_npz(str(tmp_path / "x.npz"), a=np.zeros(3))
    assert sorted(os.listdir(tmp_path)) == ["r.json"]  # no temporary file left


def test_torchvision_weights_offline_error():
    with pytest.raises(ValueError, match="unknown weights"):
        common.load_pretrained("torchvision:resnet18:NOPE")
    with pytest.raises(ValueError, match="unknown torchvision arch"):
        common.load_pretrained("torchvision:alexnet")


# ---------------------------------------------------------------------------------------------
# Bad dataset specs: one clear line each.

@pytest.mark.parametrize("spec, message", [
    ("imagenette:/x", "unknown dataset 'imagenette'"),
    ("npz:/definitely/missing", "not found"),
    ("digits@0-12", "out of range"),
    ("digits@3", "fewer than 2 classes"),
    ("digits@a-b", "bad class subset"),
    ("digits@per_class=0", "write per_class=N"),
    ("digits@0-4,per_class=2,per_class=3", "per_class twice"),
    ("digits@from=val", "no val split of its own"),
    ("digits@from=x", "write from=train"),
    ("digits@colour=red", "unknown option 'colour'"),
    ("digits@0+8,8+1", "repeats a class"),
    ("digits@0+8", "fewer than 2 classes"),
    ("digits@0-2+8,4", "bad class group"),
    ("digits@0++8,4", "bad class group"),
    ("digits@0+10,4", "out of range"),
    ("digits@", "empty class subset"),
    ("cifar10", "needs a path"),
    ("", "empty dataset spec"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        common.load_dataset(spec)


def test_empty_folders(tmp_path):
    (tmp_path / "npzempty").mkdir()
    with pytest.raises(ValueError, match="no .npz files"):
        common.load_dataset(f"npz:{tmp_path / 'npzempty'}")
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="cannot read image folder"):
        common.load_dataset(f"folder:{tmp_path / 'imgs'}")
    (tmp_path / "notrain").mkdir()
    with pytest.raises(ValueError, match="no train/ folder"):
        common.load_dataset(f"folder:{tmp_path / 'notrain'}")


def test_run_main_prints_one_line(tmp_path):
    code = ("import common\n"
            "def main():\n    common.load_dataset('digits@0-99')\n"
            "common.run_main(main)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: class subset")


def test_a_user_error_in_a_loader_worker_is_still_one_line():
    # torch re-raises a worker's exception with the worker's traceback as its message
    from torch._utils import ExceptionWrapper
    message = "cannot decode image x/7.png (cannot identify image file); replace or remove it"
    try:
        raise common.UserError(message)
    except common.UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(common.UserError) as e:
        wrapped.reraise()
    assert "\n" in str(e.value) and common.user_message(e.value) == message
    assert common.user_message(common.UserError("a: b")) == "a: b"


def test_open_feature_generator_leaves_autograd_on():
    model = common.build_model("softmax", 5, arch="resnet18", small_input=True)
    loader = common.eval_loader(common.load_dataset("digits@0-4")["val"], 8, batch_size=16)
    gen = common.extract_features(model, loader, ["pool"])
    feats, _ = next(gen)  # left open on purpose
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    feats["pool"] += 1  # ordinary tensors: in-place use downstream is fine
    gen.close()


def test_flipped_bits_inside_a_weight_tensor_are_caught(tmp_path, capsys):
    model, ck = small_checkpoint("softmax")
    path = str(tmp_path / "c.pt")
    common.save_checkpoint(path, ck)
    common.load_checkpoint(path)  # verifies
    raw = bytearray(open(path, "rb").read())
    name = "conv1.weight"
    # torch.load does not check the zip's CRCs: change bytes of one tensor's storage in place
    t = ck["model"][name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = raw.find(t[:64])
    assert at > 0
    raw[at + 10] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    loaded = torch.load(path, weights_only=True)  # loads without complaint ...
    assert not torch.equal(loaded["model"][name], ck["model"][name])
    with pytest.raises(common.UserError, match="corrupt: its weights do not match the checksum"):
        common.load_checkpoint(path)  # ... but not past the checksum
    del ck["checksum"]  # a checkpoint from before checksums: loads, with a note
    common.save_checkpoint(path, ck)
    common.load_checkpoint(path)
    assert "holds no checksum" in capsys.readouterr().err


def test_one_writer_per_folder(tmp_path):
    # a second process on a folder in use is refused with one line; the first may re-enter
    out = str(tmp_path / "out")
    common.make_out_dir(out)
    common.make_out_dir(out)  # the same process: no-op
    with common.locked(out):
        pass
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
            "common.run_main(lambda: common.make_out_dir(sys.argv[2]))")
    r = subprocess.run([sys.executable, "-c", code, ROOT, out], capture_output=True, text=True)
    assert r.returncode == 2 and f"is in use by pid {os.getpid()}" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0
    common.release_folder(out)
    r = subprocess.run([sys.executable, "-c", code, ROOT, out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # released: free again (a killed holder releases too)
    open(os.path.join(out, ".last.pt.abc.tmp"), "w").write("x")  # a killed writer's leftover
    common.make_out_dir(out)
    assert not os.path.exists(os.path.join(out, ".last.pt.abc.tmp"))
    common.release_folder(out)


# ---------------------------------------------------------------------------------------------
# JPEG decoding: TorchCodec, with PIL for what it does not read

def pil_decode(path):
    with Image.open(path) as im:
        return torchvision.transforms.functional.pil_to_tensor(im.convert("RGB"))


def test_jpegs_decode_with_torchcodec_to_the_same_pixels_as_pil(tmp_path, monkeypatch):
    """Tolerance: at most 2 levels of 255 anywhere (two libjpeg builds may round the inverse DCT
    differently); measured: 0 on all 600 photos of clothing_jpeg and on these files."""
    calls = []
    real = common._decode_jpeg()
    assert real is not None, "torchcodec is a requirement: pip install -r requirements.txt"
    monkeypatch.setattr(common, "_DECODE_JPEG", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 9, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    files = {"rgb.jpg": Image.fromarray(smooth), "gray.jpg": Image.fromarray(smooth[..., 0]),
             "cmyk.jpg": Image.fromarray(smooth).convert("CMYK"), "plain.png": Image.fromarray(smooth)}
    for name, im in files.items():
        im.save(tmp_path / name, quality=90) if name.endswith("jpg") else im.save(tmp_path / name)
    for name in files:
        a, b = common._read_image(str(tmp_path / name)), pil_decode(tmp_path / name)
        assert a.shape == b.shape == (3, 192, 144) and a.dtype == torch.uint8
        assert (a.int() - b.int()).abs().max() <= 2, name
    assert len(calls) == 3                      # the three JPEGs went to TorchCodec, not the PNG
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "rgb.jpg").read_bytes()[:300])
    with pytest.raises(common.UserError, match=r"cannot decode image .*broken.jpg"):
        common._read_image(str(tmp_path / "broken.jpg"))
    monkeypatch.setattr(common, "_DECODE_JPEG", None)   # torchcodec absent: PIL does it all
    assert torch.equal(common._read_image(str(tmp_path / "rgb.jpg")),
                       pil_decode(tmp_path / "rgb.jpg"))


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "clothing_jpeg")),
                    reason="needs ../shared/data/clothing_jpeg")
def test_the_eval_transform_of_real_photos_matches_pil_decoding():
    data = common.load_dataset(f"folder:{os.path.join(SHARED_DATA, 'clothing_jpeg')}")
    src, tf = data["test"].source, common.eval_transform(224)
    for i in data["test"].indices[::10]:
        ours = tf(src[int(i)][0])
        theirs = tf(pil_decode(src.paths[int(i)]))
        assert (ours.int() - theirs.int()).abs().max() <= 2


def test_paths_are_kept_without_a_python_object_each():
    names = ["a/1.jpg", "b/ü 2.jpg", os.fsdecode(b"c/\xff.jpg"), ""]
    p = common.Paths(names)
    assert len(p) == 4 and list(p) == names and p[np.int64(1)] == names[1] and p[-1] == ""
    assert isinstance(p.buffer, np.ndarray) and isinstance(p.offsets, np.ndarray)
    with pytest.raises(IndexError):
        p[4]
    src = pickle.loads(pickle.dumps(common.ImageSource([0, 1, 0, 1], paths=names)))
    assert list(src.paths) == names


def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(26)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    n, why = common.default_workers("cuda")
    assert n == 12 and "26 cores" in why            # 26 / 2 ranks - 1 for the process itself
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert common.default_workers("cuda")[0] == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert common.default_workers("cuda")[0] == 1   # never 0: the GPU would wait on decoding
    assert common.default_workers("cpu")[0] == 1


# ---------------------------------------------------------------------------------------------
# Every script's --help: each option's default is shown (issue 27)

SCRIPTS = ("train_imagenet", "finetune", "linear_probe", "cka_analysis", "class_separation",
           "import_tf_checkpoint", "make_figures")


def script_parser(name, monkeypatch):
    """The ArgumentParser that script `name` builds, caught while it prints its --help."""
    import importlib
    module = importlib.import_module(name)
    made, real = [], common.argument_parser
    monkeypatch.setattr(common, "argument_parser", lambda doc: made.append(real(doc)) or made[-1])
    monkeypatch.setattr(sys, "argv", [name + ".py", "--help"])
    entry = getattr(module, "parse_args", None) or module.main
    with pytest.raises(SystemExit) as e:
        entry() if entry.__code__.co_argcount == 0 else entry(["--help"])
    assert e.value.code == 0 and len(made) == 1
    return made[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_every_default(name, monkeypatch, capsys):
    """An option that is not a plain switch says its default: the value (HelpFormatter adds it)
    or, for one chosen at run time, in words; one without (one of --checkpoint or --features)
    says when it is required."""
    p = script_parser(name, monkeypatch)
    shown = capsys.readouterr().out
    formatter = p._get_formatter()
    silent = []
    for a in p._actions:
        if (not a.option_strings or a.required or a.help == argparse.SUPPRESS
                or isinstance(a, (argparse._StoreConstAction, argparse._HelpAction))):
            continue
        text = formatter._expand_help(a) if a.help else ""
        if "default" not in text and "required" not in text:
            silent.append(a.option_strings[0])
    assert not silent, f"{name}.py --help does not say the default of {silent}"
    assert "default" in shown


@pytest.mark.parametrize("name, code", [
    ("cka_analysis", "import numpy as np, cka_analysis as m\n"
                     "x = np.random.default_rng(0).normal(size=(50, 8))\n"
                     "assert abs(m.linear_cka(x, x) - 1) < 1e-9"),
    ("class_separation", "import numpy as np, class_separation as m\n"
                         "r = np.random.default_rng(0); x = r.normal(size=(60, 5)); y = r.integers(0, 3, 60)\n"
                         "assert -1 < m.class_separation(x, y) < 1 and m.dead_fraction(np.abs(x)) == 0"),
    ("linear_probe", "import numpy as np, linear_probe as m\n"
                     "r = np.random.default_rng(0)\n"
                     "def part(n): y = r.integers(0, 3, n); return (r.normal(size=(n, 4)) + y[:, None]).astype(np.float32), y\n"
                     "res, W, b = m.run_probe(part(90), part(30), part(30), 3, "
                     "m.ProbeSettings(lambdas=[1e-3, 1e-1], log=None))\n"
                     "assert res['test_accuracy'] > 0.5"),
])
def test_the_analysis_files_import_and_run_alone(tmp_path, name, code):
    """A researcher copies one analysis file into another project: its method must import and
    run with torch and numpy only, without common.py; the script itself says what it needs."""
    import shutil
    shutil.copy(os.path.join(ROOT, f"{name}.py"), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, f"{name}.py", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: the script needs common.py")


# ---------------------------------------------------------------------------------------------
# Progress lines of long loops (issue 27)

def test_duration_and_ticker_lines(monkeypatch):
    d = common.duration
    assert [d(3.4), d(425), d(10920), d(200000), d(math.inf)] == ["3s", "7m05s", "3h02m",
                                                                  "2d07h", "?"]
    clock = iter([0.0, 4.0, 11.0, 12.0, 30.0])      # time.monotonic() at start and each call
    monkeypatch.setattr(common.time, "monotonic", lambda: next(clock))
    lines = []
    tick = common.Ticker("  features", 1000, log=lines.append, seconds=10)
    for done in (100, 400, 500, 1000):   # 4 s: too soon; 11 s: a line; 12 s: too soon; the end
        tick(done)
    assert lines == ["  features: 400/1000 images (40%), 36 images/s, eta 16s",
                     "  features: 1000/1000 images (100%), 33 images/s, done in 30s"]
    monkeypatch.setattr(common.time, "monotonic", lambda: 1.0)
    quiet = common.Ticker("x", 10, log=lines.append, seconds=10)
    quiet(10)                            # a loop shorter than the interval says nothing
    assert len(lines) == 2


def test_the_lock_dies_with_its_process_not_with_its_forked_children(tmp_path):
    """A killed run's DataLoader workers outlive it by up to 5 s. The lock is the process's own
    (a POSIX record lock), so its immediate rerun gets the folder while the children still run,
    and the busy message names only the live holder (issue 25)."""
    out = str(tmp_path / "out")
    code = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); import common; "
            "common.make_out_dir(sys.argv[2]); child = os.fork()\n"
            "if child == 0: time.sleep(60); os._exit(0)\n"
            "print(child, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, ROOT, out], stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        busy = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
                "common.run_main(lambda: common.make_out_dir(sys.argv[2]))")
        r = subprocess.run([sys.executable, "-c", busy, ROOT, out], capture_output=True,
                           text=True)
        assert r.returncode == 2 and f"is in use by pid {holder.pid} on " in r.stderr, r.stderr
        holder.kill()
        holder.wait()
        os.kill(child, 0)                    # the forked child still runs, with the lock's fd
        assert common.hold_folder(out)       # ... and the folder is free at once
        common.release_folder(out)
    finally:
        holder.kill()
        os.kill(child, 9)


def test_a_full_disk_while_taking_the_lock_is_one_line_and_leaves_no_file(tmp_path, capsys,
                                                                           monkeypatch):
    import errno

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "out"
    err = one_line_error(capsys, lambda: common.make_out_dir(str(out)))
    assert f"cannot write {out}/.lock: no space left on the device" in err
    assert os.listdir(out) == []             # no empty .lock left behind
    monkeypatch.undo()
    common.make_out_dir(str(out))            # space again: taken as usual
    common.release_folder(str(out))


def test_one_kind_of_result_per_folder(tmp_path, capsys):
    """A folder's kind is read from its own files; another kind there is refused with one line
    before any work, unless --overwrite (issue 25: scripts replaced each other's results)."""
    def folder(name, files, dirs=()):
        d = tmp_path / name
        d.mkdir()
        for f, text in files.items():
            (d / f).write_text(text)
        for sub in dirs:
            (d / sub).mkdir()
        return str(d)
    kinds = {
        folder("train", {"results.json": '{"kind": "train"}', "final.pt": "",
                         "summary.csv": "epoch,step\n"}): "train",
        folder("killed", {"last.pt": "", "log.jsonl": ""}): "train",
        folder("ft", {"results.json": '{"kind": "finetune"}'}, ["grid", "final"]): "finetune",
        folder("ft_run", {"results.json": '{"kind": "finetune_run"}'}): "train",
        folder("probe", {"summary.csv": "run_id,checkpoint\n"}, ["cache"]): "linear_probe",
        folder("eval", {"results.json": '{"kind": "evaluate"}'}): "evaluate",
        folder("cka", {"cka.json": "{}", "cka.npz": ""}): "cka",
        folder("sep", {"class_separation.json": "{}"}): "class_separation",
        folder("figs", {"report.md": "# Report"}, ["runs"]): "figures",
    }
    for path, kind in kinds.items():
        assert set(common.folder_kinds(path)) == {kind}, path
    assert common.folder_kinds(folder("empty", {"train.log": "", "results.json": "{bad"})) == {}
    ft = str(tmp_path / "ft")
    err = one_line_error(capsys, lambda: common.make_out_dir(ft, "train"))
    assert err == (f"error: {ft} holds results of another kind (fine-tuning: results.json of "
                   f"kind finetune); training results need a folder of their own: choose "
                   f"another --out, or add --overwrite to write there anyway")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
            "common.run_main(lambda: common.make_out_dir(sys.argv[2]))")
    r = subprocess.run([sys.executable, "-c", code, ROOT, ft], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr           # refused: the folder was released at once
    common.make_out_dir(ft, "finetune")          # its own kind
    common.release_folder(ft)
    common.make_out_dir(ft, "train", overwrite=True)
    common.release_folder(ft)


def test_a_finished_result_is_replaced_only_by_the_same_computation(tmp_path, capsys):
    net = {"checkpoint": "a", "checkpoint_hash": "h1"}
    path = tmp_path / "results.json"
    old = {"kind": "evaluate", "network": net, "dataset": "digits", "resolution": 8}
    common.save_json(str(path), old)
    assert not common.refuse_replacing(str(path), dict(old), ("resolution",))   # the same
    other = {**old, "network": {**net, "checkpoint_hash": "h2"}}
    err = one_line_error(capsys, lambda: common.refuse_replacing(str(path), other,
                                                                 ("resolution",)))
    assert f"{path} holds the result of another checkpoint or setting (checkpoint_hash: 'h1' " \
           f"-> 'h2'); use another --out, or --overwrite to replace it" in err
    with pytest.raises(common.UserError, match="dataset: 'digits' -> 'digits@0-4'; resolution"):
        common.refuse_replacing(str(path), {**old, "dataset": "digits@0-4", "resolution": 16},
                                ("resolution",))
    assert common.refuse_replacing(str(path), other, overwrite=True)          # allowed
    many = {"networks": [net, net]}
    common.save_json(str(path), many)
    with pytest.raises(common.UserError, match="checkpoint_hash of network 2: 'h1' -> 'h2'"):
        common.refuse_replacing(str(path), {"networks": [net, other["network"]]})
    with pytest.raises(common.UserError, match="networks: 2 -> 1"):
        common.refuse_replacing(str(path), {"networks": [net]})


def _small_checkpoint_file(path):
    torch.manual_seed(0)
    model = common.build_model("softmax", 5, arch="resnet18", small_input=True)
    common.save_checkpoint(str(path), common.make_checkpoint(
        model, {"objective": "softmax", "hparams": {}, "arch": "resnet18", "num_classes": 5,
                "small_input": True}, args={"resolution": 8, "seed": 0}, run_id="r0"))
    return str(path)


@pytest.mark.parametrize("script", ["probe", "probe --features", "cka", "class separation",
                                    "make_figures", "train", "finetune", "--evaluate"])
def test_a_full_disk_is_one_line_in_every_script(script, tmp_path, capsys, monkeypatch):
    """The first write of every script is the lock's pid: on a full disk it was a traceback and
    left a 0-byte OUT/.lock, in all 8 scripts or modes (issue 25)."""
    import errno
    import cka_analysis
    import class_separation
    import finetune
    import linear_probe
    import make_figures
    import train_imagenet
    ckpt = _small_checkpoint_file(tmp_path / "s0.pt")
    feats = tmp_path / "f.npz"
    np.savez(feats, train_x=np.eye(4, dtype=np.float32).repeat(5, 0),
             train_y=np.arange(20) % 2, test_x=np.eye(4, dtype=np.float32), test_y=np.arange(4) % 2)
    (tmp_path / "runs").mkdir()
    out = str(tmp_path / "out")
    main = {"probe": lambda: linear_probe.main(["--checkpoint", ckpt, "--data", "digits@5-9",
                                                "--out", out]),
            "probe --features": lambda: linear_probe.main(["--features", str(feats), "--out",
                                                           out]),
            "cka": lambda: cka_analysis.main(["--checkpoint", ckpt, "--data", "digits", "--out",
                                              out]),
            "class separation": lambda: class_separation.main(["--checkpoint", ckpt, "--data",
                                                               "digits", "--out", out]),
            "make_figures": make_figures.main,
            "train": lambda: train_imagenet.main(["--data", "digits@0-4", "--out", out]),
            "finetune": lambda: finetune.main(["--checkpoint", ckpt, "--data", "digits@5-9",
                                               "--out", out]),
            "--evaluate": lambda: train_imagenet.main(["--evaluate", ckpt, "--data",
                                                       "digits@0-4", "--out", out])}[script]
    monkeypatch.setattr(sys, "argv", ["make_figures.py", "--runs", str(tmp_path / "runs"),
                                      "--out", out])

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    err = one_line_error(capsys, main)
    assert f"error: cannot write {out}/.lock: no space left on the device" in err
    assert not [f for f in os.listdir(out) if os.path.getsize(os.path.join(out, f)) == 0]


def test_an_unforeseen_disk_error_is_still_one_line(tmp_path, capsys):
    import errno

    def main():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    err = one_line_error(capsys, main)
    assert err == (f"error: cannot write {tmp_path}/x: no space left on the device; free some "
                   f"space or choose another output folder")

    def broken(f):  # an I/O error of the disk while a result is written: named, old file kept
        raise OSError(errno.EIO, "Input/output error")
    common.save_json(str(tmp_path / "r.json"), {"a": 1})
    err = one_line_error(capsys, lambda: common.atomic_write(str(tmp_path / "r.json"), broken))
    assert "r.json: Input/output error (the previous file is unchanged)" in err
    assert common.read_json(str(tmp_path / "r.json")) == {"a": 1}
    with pytest.raises(ValueError):   # not a disk error: not hidden
        common.run_main(lambda: (_ for _ in ()).throw(ValueError("a bug")))


def test_output_paths_that_cannot_be_one_are_said_plainly(tmp_path, capsys):
    """--out '', a dangling symbolic link and a path below a file gave the system's misleading
    words ("No such file or directory: ''", "File exists", "Not a directory"; issue 25)."""
    (tmp_path / "afile").write_text("keep me")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    for path, message in (
            ("", "the output folder is an empty string; give a path, e.g. --out runs/x"),
            (tmp_path / "link", f"output folder {tmp_path}/link is a symbolic link to "
                                f"{tmp_path}/nowhere, which does not exist; create that, or "
                                f"choose another output folder"),
            (tmp_path / "link" / "sub", f"output folder {tmp_path}/link/sub: {tmp_path}/link is "
                                        f"a symbolic link to {tmp_path}/nowhere"),
            (tmp_path / "afile" / "a" / "b", f"output folder {tmp_path}/afile/a/b cannot be "
                                             f"created: {tmp_path}/afile is a file, not a folder")):
        err = one_line_error(capsys, lambda: common.make_out_dir(str(path), "train"))
        assert message in err, err
    with pytest.raises(common.UserError, match="output file .*link is a symbolic link"):
        with common.locked_file(str(tmp_path / "link")):
            pass
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "afile").read_text() == "keep me"


def test_a_worker_that_dies_while_handing_over_a_batch_is_one_line(capsys):
    """Killed while it passes a batch's shared memory over, a worker leaves the main process a
    ConnectionResetError inside the DataLoader's receive, not torch's "DataLoader worker (pid
    N) is killed" (a traceback, found by the by-hand rerun of issue 25's cases under load). The
    same error anywhere else is not hidden."""
    where = os.path.join("site-packages", "torch", "utils", "data", "dataloader.py")
    scope = {}
    exec(compile("def receive():\n    raise ConnectionResetError(104, 'Connection reset by peer')",
                 where, "exec"), scope)
    err = one_line_error(capsys, scope["receive"])
    assert err.startswith("error: a data-loading worker process died ([Errno 104] Connection "
                          "reset by peer), perhaps killed for lack of memory; rerun")
    exec(compile("def receive():\n    raise EOFError", where, "exec"), scope)
    err = one_line_error(capsys, scope["receive"])   # an EOFError says nothing: its name does
    assert err.startswith("error: a data-loading worker process died (EOFError), perhaps")

    def elsewhere():
        raise ConnectionResetError(104, "Connection reset by peer")
    with pytest.raises(ConnectionResetError):
        common.run_main(elsewhere)
