"""cka_analysis.py: linear CKA (SPEC.md test vectors), the minibatch accumulator, the script."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from cka_analysis import MinibatchCKA, linear_cka, main
from conftest import ROOT, non_finite_copy, one_line_error, read_only


def spec_vectors():
    np.random.seed(1337)  # SPEC.md: Kornblith's demo notebook, legacy global RNG
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    t = np.random.randn(10, 10)
    return x, y, t


def hsic_unbiased_3term(k, l):
    """Song et al. (2012) eq. 5 in float64, written independently of cka_analysis."""
    k, l = k.astype(np.float64).copy(), l.astype(np.float64).copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    n = len(k)
    ones = np.ones(n)
    return (np.trace(k @ l) + ones @ k @ ones * (ones @ l @ ones) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))


def test_published_vectors_and_invariances():
    x, y, t = spec_vectors()
    assert linear_cka(x, y) == pytest.approx(0.55761, abs=5e-6)
    assert linear_cka(x, y, debiased=True) == pytest.approx(0.51346, abs=5e-6)
    # not invariant to an arbitrary invertible linear map
    assert linear_cka(x @ t, y) == pytest.approx(0.40225, abs=5e-6)
    q, _ = np.linalg.qr(np.random.RandomState(0).randn(10, 10))
    for debiased in (False, True):
        base = linear_cka(x, y, debiased)
        assert linear_cka(x, x, debiased) == pytest.approx(1, abs=1e-12)
        assert linear_cka(y, x, debiased) == pytest.approx(base, abs=1e-12)      # symmetric
        assert linear_cka(x @ q, y, debiased) == pytest.approx(base, abs=1e-10)  # orthogonal
        assert linear_cka(x, y @ q, debiased) == pytest.approx(base, abs=1e-10)
        assert linear_cka(1.337 * x, y, debiased) == pytest.approx(base, abs=1e-12)  # isotropic
        assert linear_cka(x, 0.01 * y, debiased) == pytest.approx(base, abs=1e-12)
        assert abs(linear_cka(x @ t, y, debiased) - base) > 0.05


def test_feature_space_form_equals_gram_form():
    rng = np.random.RandomState(1)
    x = rng.randn(60, 7) + 3
    y = np.maximum(rng.randn(60, 12) + x[:, :1], 0)
    h = np.eye(60) - 1 / 60
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h  # direct centred n x n Gram matrices
    direct = np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l))
    assert linear_cka(x, y) == pytest.approx(direct, abs=1e-6)
    # wide features (p > n) take the Gram path: the same value
    xw = np.concatenate([x, np.zeros((60, 80))], 1)
    assert linear_cka(xw, y) == pytest.approx(direct, abs=1e-6)
    # debiased form = the independent 3-term unbiased HSIC
    k, l = x @ x.T, y @ y.T
    ref = hsic_unbiased_3term(k, l) / np.sqrt(hsic_unbiased_3term(k, k) * hsic_unbiased_3term(l, l))
    assert linear_cka(x, y, debiased=True) == pytest.approx(ref, abs=1e-9)


def test_independent_gaussians():
    rng = np.random.RandomState(0)
    n, d1, d2 = 100, 10, 37
    biased, debiased = [], []
    for _ in range(30):
        x, y = rng.randn(n, d1), rng.randn(n, d2)
        biased.append(linear_cka(x, y))
        debiased.append(linear_cka(x, y, debiased=True))
    expected = np.sqrt(d1 * d2 / ((n + d1) * (n + d2)))  # ~0.157 (SPEC.md)
    assert np.mean(biased) == pytest.approx(expected, abs=0.02)
    assert abs(np.mean(debiased)) < 0.02


def test_minibatch_equals_batchwise_unbiased_hsic_and_approaches_full_data():
    rng = np.random.RandomState(2)
    n, batch = 2000, 250
    z = rng.randn(n, 5)
    feats = [np.maximum(z @ rng.randn(5, 40) + rng.randn(n, 40) + 4, 0).astype(np.float32),
             (z[:, :3] @ rng.randn(3, 20) + 0.5 * rng.randn(n, 20)).astype(np.float32),
             rng.randn(n, 8).astype(np.float32)]
    acc = MinibatchCKA()
    sums = np.zeros((3, 3))
    for s in range(0, n, batch):
        part = [torch.from_numpy(f[s:s + batch]) for f in feats]
        acc.update(iter(part))  # a generator is fine
        grams = [f[s:s + batch].astype(np.float64) @ f[s:s + batch].astype(np.float64).T
                 for f in feats]
        sums += [[hsic_unbiased_3term(a, b) for b in grams] for a in grams]
    got = acc.cka()
    want = sums / np.sqrt(np.outer(np.diag(sums), np.diag(sums)))
    assert acc.n_images == n and acc.n_batches == n // batch
    np.testing.assert_allclose(got, want, atol=1e-7)  # float32 inputs, large offset: still exact
    np.testing.assert_allclose(np.diag(got), 1, atol=1e-12)
    np.testing.assert_allclose(got, got.T, atol=1e-12)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert got[a, b] == pytest.approx(linear_cka(feats[a], feats[b], debiased=True), abs=0.02)
    assert got[0, 1] > 0.5 and abs(got[0, 2]) < 0.05


def test_minibatch_weights_batches_skips_tiny_ones_and_checks_input():
    rng = np.random.RandomState(3)
    x, y = rng.randn(103, 4), rng.randn(103, 6)
    acc = MinibatchCKA()
    acc.update([x[:100], y[:100]])
    acc.update([x[100:], y[100:]])  # 3 images: skipped, the estimator needs 4
    assert (acc.n_images, acc.skipped) == (100, 3)
    assert acc.cka()[0, 1] == pytest.approx(linear_cka(x[:100], y[:100], debiased=True), abs=1e-10)
    # unequal batches weigh by their size: sum_b n_b HSIC_b, normalized
    acc = MinibatchCKA()
    h = np.zeros(3)
    for s, e in ((0, 80), (80, 100)):
        acc.update([x[s:e], y[s:e]])
        k, l = x[s:e] @ x[s:e].T, y[s:e] @ y[s:e].T
        h += (e - s) * np.array([hsic_unbiased_3term(k, l), hsic_unbiased_3term(k, k),
                                 hsic_unbiased_3term(l, l)])
    assert acc.cka()[0, 1] == pytest.approx(h[0] / np.sqrt(h[1] * h[2]), abs=1e-10)
    # overwrite=True centres the given float tensors in place: same values
    xt, yt = torch.from_numpy(x[:80]).float(), torch.from_numpy(y[:80]).float()
    acc = MinibatchCKA()
    acc.update([xt.clone(), yt.clone()], overwrite=True)
    assert acc.cka()[0, 1] == pytest.approx(linear_cka(xt, yt, debiased=True), abs=1e-7)
    with pytest.raises(ValueError, match="differ in size"):
        acc.update([x[:50], y[:40]])
    with pytest.raises(ValueError, match="NaN"):
        acc.update([np.full((10, 4), np.nan), y[:10]])
    with pytest.raises(ValueError, match="no batch"):
        MinibatchCKA().cka()
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(x, y[:50])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones((20, 3)), y[:20])


# ----------------------------------------------------------------------------------------------
# The script, on tiny ResNet-18 checkpoints built without training

def make_checkpoint(path, seed, resolution=8, arch="resnet18", objective="softmax"):
    torch.manual_seed(seed)
    model = common.build_model(objective, 10, arch=arch, small_input=True)
    for m in model.modules():  # make the residual branches matter (zero-init gamma otherwise)
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0, 0.1)
    ck = common.make_checkpoint(model, {"objective": objective, "arch": arch, "num_classes": 10,
                                        "hparams": common.objective_hparams(objective),
                                        "small_input": True},
                                args={"resolution": resolution, "seed": seed}, run_id=f"run{seed}")
    common.save_checkpoint(str(path), ck)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    a = make_checkpoint(d / "softmax_s0.pt", 0)
    b = str(d / "softmax_s0_copy.pt")
    shutil.copy(a, b)
    c = make_checkpoint(d / "sigmoid_s1.pt", 1, objective="sigmoid")
    return a, b, c


def test_script_identical_networks_give_one_at_every_layer(ckpts, tmp_path, monkeypatch,
                                                          capsys):
    a, b, c = ckpts
    out = tmp_path / "cka"
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0)   # a progress line at every batch
    main(["--checkpoint", a, b, c, "--data", "digits", "--out", str(out), "--split", "train",
          "--max-images", "100", "--batch-size", "40", "--passes", "2", "--device", "cpu"])
    ticks = [l for l in capsys.readouterr().out.splitlines() if "features of 3 network" in l]
    assert [l.split(": ")[1].split(" (")[0] for l in ticks] == [
        f"{n}/200 images" for n in (40, 80, 100, 140, 180, 200)]   # both passes
    assert " eta " in ticks[0] and "done in" in ticks[-1]
    with np.load(out / "cka.npz") as z:
        cka, layers = z["cka"], list(z["layers"])
        assert list(z["checkpoints"]) == ["softmax_s0", "softmax_s0_copy", "sigmoid_s1"]
        assert list(z["run_ids"]) == ["run0", "run0", "run1"]   # the copy: the same run
        assert int(z["n_images"]) == 100 and int(z["n_batches"]) == 6  # 40 + 40 + 20, twice
    assert layers == [f"block{i}" for i in range(1, 9)] + ["pool", "logits"]
    assert cka.shape == (3, 3, 10, 10)
    same = np.einsum("abii->abi", cka)
    np.testing.assert_allclose(same[0, 1], 1, atol=1e-6)  # identical networks
    np.testing.assert_allclose(same[[0, 1, 2], [0, 1, 2]], 1, atol=1e-6)
    np.testing.assert_allclose(cka, cka.transpose(1, 0, 3, 2), atol=1e-9)
    assert (same[0, 2] < 0.99).sum() >= 5  # another seed differs
    report = json.loads((out / "cka.json").read_text())
    assert list(report)[:4] == ["kind", "networks", "dataset", "dataset_name"]
    nets = report["networks"]                            # identities in the arrays' order
    assert [n["checkpoint"] for n in nets] == ["softmax_s0", "softmax_s0_copy", "sigmoid_s1"]
    assert [n["seed"] for n in nets] == [0, 0, 1]
    assert [n["objective"] for n in nets] == ["softmax", "softmax", "sigmoid"]
    assert (report["dataset"], report["dataset_name"]) == ("digits", "digits")
    assert report["layers"] == layers
    assert report["same_layer"]["pool"][0][1] == pytest.approx(1, abs=1e-6)
    assert report["same_layer"]["pool"][0][2] == pytest.approx(same[0, 2, 8], abs=1e-6)


def test_script_errors(ckpts, tmp_path):
    a, _, _ = ckpts
    other_res = make_checkpoint(tmp_path / "r16.pt", 2, resolution=16)
    out = str(tmp_path / "out")
    with pytest.raises(common.UserError, match="different resolutions"):
        main(["--checkpoint", a, other_res, "--data", "digits", "--out", out])
    with pytest.raises(common.UserError, match="has no layer block9"):
        main(["--checkpoint", a, "--data", "digits", "--out", out, "--layers", "block9"])
    with pytest.raises(common.UserError, match="at least 4"):
        main(["--checkpoint", a, "--data", "digits", "--out", out, "--batch-size", "2"])
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(common.UserError, match="exists and is a file"):
        main(["--checkpoint", a, "--data", "digits", "--out", str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "keep me"
    deep = make_checkpoint(tmp_path / "r34.pt", 3, arch="resnet34")
    with pytest.raises(common.UserError, match="different layer lists"):
        main(["--checkpoint", a, deep, "--data", "digits", "--out", out])
    # --resolution makes mismatched checkpoints comparable; shared layers work across archs
    main(["--checkpoint", a, other_res, deep, "--data", "digits", "--out", out, "--resolution", "8",
          "--layers", "pool,logits", "--max-images", "40", "--batch-size", "40"])
    with np.load(os.path.join(out, "cka.npz")) as z:
        assert z["cka"].shape == (3, 3, 2, 2)
    nets = json.loads(open(os.path.join(out, "cka.json")).read())["networks"]
    assert [n["arch"] for n in nets] == ["resnet18"] * 2 + ["resnet34"]
    # NaN weights: the error names the checkpoint and its first non-finite tensor
    nan = non_finite_copy(a, tmp_path / "nan.pt", "layer3.0.conv1.weight")
    with pytest.raises(common.UserError, match=r"nan\.pt holds non-finite weights \(model "
                                               r"tensor layer3\.0\.conv1\.weight has NaN\)"):
        main(["--checkpoint", a, nan, "--data", "digits", "--out", out])
    # finite weights whose features overflow: the checkpoint and the first layer that goes bad
    huge = torch.load(a, weights_only=True)
    huge["model"]["layer3.0.conv1.weight"] *= 1e38
    huge["checksum"] = common.weights_checksum(huge)
    common.save_checkpoint(str(tmp_path / "huge.pt"), huge)
    with pytest.raises(common.UserError, match=r"huge\.pt: layer block5 has NaN"):
        main(["--checkpoint", a, str(tmp_path / "huge.pt"), "--data", "digits", "--out",
              str(tmp_path / "out2"), "--max-images", "8", "--batch-size", "8"])
    assert not torch.is_inference_mode_enabled()  # the feature generators were closed
    # a bad path: one line on stderr, exit status 2, nothing written
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cka_analysis.py"), "--checkpoint",
                        a, str(tmp_path / "missing.pt"), "--data", "digits", "--out",
                        str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "checkpoint not found" in r.stderr and not (tmp_path / "none").exists()


def test_unwritable_output_and_bad_numbers_are_one_line_errors(ckpts, tmp_path, capsys,
                                                               monkeypatch):
    a, _, _ = ckpts
    args = ["--checkpoint", a, "--data", "digits", "--max-images", "8", "--batch-size", "8"]
    err = one_line_error(capsys, lambda: main([*args, "--out", str(tmp_path), "--workers", "-1"]))
    assert "--workers: '-1' must be >= 0" in err
    err = one_line_error(capsys, lambda: main([*args, "--out", str(tmp_path / "o"),
                                               "--crop-fraction", "0"]))
    assert "'0' must be in (0, 1]" in err
    read_only(monkeypatch, tmp_path / "ro")
    err = one_line_error(capsys, lambda: main([*args, "--out", str(tmp_path / "ro" / "o")]))
    assert "cannot write into" in err and "Read-only file system" in err


def test_the_cka_of_other_networks_does_not_replace_a_finished_one(ckpts, tmp_path):
    a, _, c = ckpts
    out = str(tmp_path / "cka")
    flags = ["--data", "digits", "--out", out, "--max-images", "8", "--batch-size", "8",
             "--layers", "pool", "--device", "cpu"]
    main(["--checkpoint", a, c, *flags])
    before = open(os.path.join(out, "cka.json")).read()
    with pytest.raises(common.UserError, match=r"cka.json holds the CKA of another checkpoint or "
                                               r"setting \(networks: 2 -> 1\); use another --out"):
        main(["--checkpoint", a, *flags])
    with pytest.raises(common.UserError, match=r"layers: \['pool'\] -> \['logits'\]"):
        main(["--checkpoint", a, c, *flags[:-3], "logits", "--device", "cpu"])
    assert open(os.path.join(out, "cka.json")).read() == before
    main(["--checkpoint", a, *flags, "--overwrite"])
    assert len(json.load(open(os.path.join(out, "cka.json")))["networks"]) == 1


def test_too_many_workers_is_one_line(capsys):
    import class_separation
    for script in (main, class_separation.main):
        err = one_line_error(capsys, lambda: script(["--checkpoint", "x.pt", "--data", "digits",
                                                     "--out", "o", "--workers", "1000"]))
        assert "'1000' is more than the" in err and "CPU cores this process may use" in err
