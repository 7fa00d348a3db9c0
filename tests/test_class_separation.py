"""class_separation.py: R^2 (SPEC.md), sparsity, participation ratio, the script."""
import json

import numpy as np
import pytest
import torch

import common
from class_separation import class_separation, dead_fraction, main, participation_ratio, sparsity
from conftest import non_finite_copy, one_line_error, read_only


def naive_r2(x, labels):
    """SPEC.md's definition: every pair, self-pairs included, each class weighted equally."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - u @ u.T
    classes = np.unique(labels)
    K = len(classes)
    within = sum(d[np.ix_(labels == k, labels == k)].sum() / (K * (labels == k).sum() ** 2)
                 for k in classes)
    total = sum(d[np.ix_(labels == j, labels == k)].sum()
                / (K * K * (labels == j).sum() * (labels == k).sum())
                for j in classes for k in classes)
    return 1 - within / total


def test_equals_naive_pairwise_definition_with_unequal_classes():
    rng = np.random.RandomState(0)
    labels = np.repeat([7, 3, 11], [5, 9, 17])  # unequal sizes, arbitrary label values
    x = rng.randn(len(labels), 6) + labels[:, None] * 0.1 * rng.randn(1, 6)
    x = np.maximum(x, 0) + 0.01
    assert class_separation(x, labels) == pytest.approx(naive_r2(x, labels), abs=1e-9)
    perm = rng.permutation(len(labels))  # order does not matter
    assert class_separation(x[perm], labels[perm]) == pytest.approx(naive_r2(x, labels), abs=1e-9)


def test_spec_vectors_and_scaling_invariance():
    x = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=float)
    y = np.array([0, 0, 1, 1])
    assert class_separation(x, y) == pytest.approx(0.5, abs=1e-12)
    assert class_separation(x * np.array([[2.0], [0.3], [7.0], [1.5]]), y) == pytest.approx(0.5,
                                                                                        abs=1e-12)
    x2 = np.array([[1, 1], [2, 2], [-1, 1], [-3, 3]], dtype=float)
    assert class_separation(x2, y) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.RandomState(1)
    z, lz = rng.rand(200, 16), rng.randint(0, 4, 200)
    scale = rng.uniform(0.01, 100, size=(200, 1))
    assert class_separation(z * scale, lz) == pytest.approx(class_separation(z, lz), abs=1e-12)


def test_shared_distribution_gives_zero_and_collapsed_classes_give_one():
    rng = np.random.RandomState(2)
    n = 6000
    labels = rng.randint(0, 3, n)
    x = rng.randn(n, 20) + 0.5  # one distribution for every class
    assert abs(class_separation(x, labels)) < 0.005
    directions = rng.randn(3, 20)
    collapsed = directions[labels] * rng.uniform(0.1, 10, size=(n, 1))
    assert class_separation(collapsed, labels) == pytest.approx(1.0, abs=1e-12)
    separated = directions[labels] + 0.3 * rng.randn(n, 20)
    assert 0.5 < class_separation(separated, labels) < 1


def test_bad_input_one_line_errors():
    x = np.random.RandomState(3).rand(10, 4)
    y = np.arange(10) % 2
    for features, labels, message in [
            (x, np.zeros(10), "at least 2 classes"),
            (np.vstack([x[:9], np.zeros((1, 4))]), y, "are zero"),
            (np.where(np.arange(40).reshape(10, 4) == 5, np.nan, x), y, "NaN"),
            (x, y[:9], "labels must be"),
            (np.ones((10, 4)), y, "one direction")]:
        with pytest.raises(ValueError, match=message) as e:
            class_separation(features, labels)
        assert "\n" not in str(e.value)


def test_sparsity_and_participation_ratio():
    rng = np.random.RandomState(4)
    x = np.maximum(rng.randn(300, 12) @ np.diag(np.linspace(0.1, 3, 12)), 0)
    assert sparsity(x) == pytest.approx((x == 0).mean())
    eig = np.linalg.eigvalsh(np.cov(x.T))
    assert participation_ratio(x) == pytest.approx(eig.sum() ** 2 / (eig ** 2).sum(), rel=1e-10)
    wide = rng.randn(8, 50)  # fewer examples than dims: the N x N path
    eig = np.linalg.eigvalsh(np.cov(wide.T))
    assert participation_ratio(wide) == pytest.approx(eig.sum() ** 2 / (eig ** 2).sum(), rel=1e-9)
    assert participation_ratio(rng.randn(5000, 10)) == pytest.approx(10, rel=0.02)
    with pytest.raises(ValueError, match="constant"):
        participation_ratio(np.ones((5, 3)))


def test_dead_units_are_channels_zero_on_every_image_not_zeros_in_general():
    x = np.array([[0., 1., 0., 0.], [0., 2., 3., 0.], [0., 0., 0., 0.]])
    assert dead_fraction(x) == 0.5              # channels 0 and 3 never fire
    assert sparsity(x) == pytest.approx(9 / 12)  # 9 zeros: 6 of dead channels, 3 of live ones
    assert dead_fraction(np.eye(4)) == 0.0       # every channel fires once: sparse, none dead


def test_script_writes_records_per_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = common.build_model("label_smoothing", 10, arch="resnet18", small_input=True)
    ck = common.make_checkpoint(model, {"objective": "label_smoothing", "arch": "resnet18",
                                        "hparams": common.objective_hparams("label_smoothing"),
                                        "num_classes": 10, "small_input": True},
                                args={"resolution": 8, "seed": 4})
    path = tmp_path / "ls_s4.pt"
    common.save_checkpoint(str(path), ck)
    out = tmp_path / "sep"
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0)   # a progress line at every batch
    main(["--checkpoint", str(path), "--data", "digits", "--out", str(out), "--max-per-class", "15",
          "--layers", "block8,pool,logits", "--device", "cpu", "--batch-size", "64"])
    ticks = [l for l in capsys.readouterr().out.splitlines() if "ls_s4: features" in l]
    assert [l.split(": ")[2].split(" (")[0] for l in ticks] == ["64/150 images", "128/150 images",
                                                               "150/150 images"]
    assert " eta " in ticks[0] and "done in" in ticks[-1]
    report = json.loads((out / "class_separation.json").read_text())
    assert list(report)[:4] == ["kind", "networks", "dataset", "dataset_name"]
    assert len(report["networks"]) == len(report["results"]) == 1
    net, r = report["networks"][0], report["results"][0]
    assert (net["checkpoint"], net["objective"], net["seed"], net["arch"]) == (
        "ls_s4", "label_smoothing", 4, "resnet18")
    assert (report["dataset"], report["dataset_name"], report["split"]) == ("digits", "digits",
                                                                            "train")
    assert (r["n_images"], r["num_classes"], r["resolution"]) == (150, 10, 8)
    assert list(r["layers"]) == ["block8", "pool", "logits"]
    # recompute from the same features
    data = common.load_dataset("digits")
    from class_separation import per_class_subset
    loader = common.eval_loader(per_class_subset(data["train"], 15), 8, 64)
    feats, labels = common.collect_features(model, loader, ["pool"])
    assert r["layers"]["pool"]["r2"] == pytest.approx(class_separation(feats["pool"], labels),
                                                      abs=1e-9)
    assert r["layers"]["pool"]["dim"] == pytest.approx(participation_ratio(feats["pool"]), rel=1e-6)
    assert 0 <= r["layers"]["pool"]["sparsity"] <= 1
    assert r["layers"]["pool"]["dead"] == dead_fraction(feats["pool"])
    with np.load(out / "class_separation.npz") as z:
        assert z["r2"].shape == (1, 3) and list(z["checkpoints"]) == ["ls_s4"]
        assert list(z["run_ids"]) == [""]                 # a checkpoint without a run id
    with pytest.raises(common.UserError, match="has no layer block9"):
        main(["--checkpoint", str(path), "--data", "digits", "--out", str(out),
              "--layers", "block9"])


def test_max_per_class_below_two_is_refused(tmp_path, capsys):
    # one image per class: within-class distance 0, R^2 = 1 whatever the features
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", "x.pt", "--data", "digits", "--out", str(tmp_path / "o"),
              "--max-per-class", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "must be >= 2" in err


def test_nan_weights_unwritable_output_and_bad_numbers_are_one_line_errors(tmp_path, capsys,
                                                                           monkeypatch):
    model = common.build_model("softmax", 10, arch="resnet18", small_input=True)
    ck = common.make_checkpoint(model, {"objective": "softmax", "arch": "resnet18", "hparams": {},
                                        "num_classes": 10, "small_input": True},
                                args={"resolution": 8})
    good = str(tmp_path / "good.pt")
    common.save_checkpoint(good, ck)
    nan = non_finite_copy(good, tmp_path / "nan.pt", "fc.weight")
    args = ["--data", "digits", "--max-per-class", "4"]
    err = one_line_error(capsys, lambda: main(["--checkpoint", nan, *args, "--out",
                                               str(tmp_path / "o")]))
    assert f"{nan} holds non-finite weights (model tensor fc.weight has NaN)" in err
    err = one_line_error(capsys, lambda: main(["--checkpoint", good, *args, "--out",
                                               str(tmp_path / "o"), "--workers", "-1"]))
    assert "--workers: '-1' must be >= 0" in err
    read_only(monkeypatch, tmp_path / "ro")
    err = one_line_error(capsys, lambda: main(["--checkpoint", good, *args, "--out",
                                               str(tmp_path / "ro" / "o")]))
    assert "cannot write into" in err and "Read-only file system" in err


def test_results_of_other_networks_or_settings_are_not_replaced(tmp_path, capsys):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = common.build_model("softmax", 10, arch="resnet18", small_input=True)
        paths.append(str(tmp_path / f"s{seed}.pt"))
        common.save_checkpoint(paths[-1], common.make_checkpoint(
            model, {"objective": "softmax", "arch": "resnet18", "hparams": {}, "num_classes": 10,
                    "small_input": True}, args={"resolution": 8, "seed": seed}))
    out = tmp_path / "sep"
    flags = ["--data", "digits", "--out", str(out), "--max-per-class", "5", "--device", "cpu"]
    main(["--checkpoint", paths[0], *flags])
    main(["--checkpoint", paths[0], *flags])                     # the same: its own file
    before = (out / "class_separation.json").read_text()
    err = one_line_error(capsys, lambda: main(["--checkpoint", paths[1], *flags]))
    assert "class_separation.json holds the class separation of another checkpoint or setting " \
           f"(checkpoint_hash: '{common.file_hash(paths[0])}' -> " \
           f"'{common.file_hash(paths[1])}')" in err
    err = one_line_error(capsys, lambda: main(["--checkpoint", paths[0], *flags, "--layers",
                                               "logits"]))
    assert "resolution and layers: [(8, ['pool'])] -> [(8, ['logits'])]" in err
    assert (out / "class_separation.json").read_text() == before
    main(["--checkpoint", paths[1], *flags, "--overwrite"])
    assert json.loads((out / "class_separation.json").read_text())["networks"][0]["seed"] == 1
