"""One-off: move this study's committed results to the identity layout of issue 12 (run once).

The study's results were written before training stored a run id and before every results file
began with common.result_header. Its checkpoints are not committed, so nothing can be recomputed;
this rewrites the JSON (and the two .npz files of CKA and class separation) in place:

- run id of each training run: uuid5(NAMESPACE_URL, 'results/cifar10_small/runs/train/<run>')
  as hex, a stable stand-in for the uuid4 that training writes now (the checkpoints are gone);
- checkpoint_hash: the sha256 prefix that the probe, fine-tune, CKA and class-separation results
  recorded for that final.pt (all of them agree; checked below);
- every other identity field from the training run's own results.json.

    cd REPO && python results/cifar10_small/migrate_identity.py
    python make_figures.py --runs results/cifar10_small/runs --out /tmp/check --formats png
    diff /tmp/check/report.md results/cifar10_small/report.md     # no difference

Refuses to run twice (a migrated file has a 'kind').
"""
import glob
import json
import os
import sys
import uuid

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import linear_probe  # noqa: E402

RUNS = "results/cifar10_small/runs"   # as the scripts recorded their paths (from the repo root)
IDENTITY_KEYS = ("objective", "hparams", "arch", "resolution", "seed", "small_input")


def load(path):
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def save(path, obj):
    common.save_json(os.path.join(ROOT, path), obj)


def main():
    train = sorted(glob.glob(os.path.join(ROOT, RUNS, "train", "*", "results.json")))
    if not train or "kind" in load(os.path.relpath(train[0], ROOT)):
        sys.exit("already migrated (or no training results): nothing to do")

    # the content hash of every final.pt, as each downstream result recorded it
    hashes = {}
    for p in glob.glob(os.path.join(ROOT, RUNS, "probe", "*", "*", "results.json")):
        r = load(os.path.relpath(p, ROOT))
        hashes.setdefault(r["checkpoint"], set()).add(r["checkpoint_hash"])
    for p in glob.glob(os.path.join(ROOT, RUNS, "finetune", "*", "*", "results.json")):
        r = load(os.path.relpath(p, ROOT))
        hashes.setdefault(r["checkpoint_path"], set()).add(r["checkpoint_hash"])
    cka = load(f"{RUNS}/cka/cka.json")
    for path, h in zip(cka["paths"], cka["hashes"]):
        hashes.setdefault(path, set()).add(h)
    separation = load(f"{RUNS}/class_separation/class_separation.json")
    for e in separation:
        hashes.setdefault(e["path"], set()).add(e["hash"])
    assert all(len(h) == 1 for h in hashes.values()), hashes

    identities = {}   # checkpoint path -> identity
    for p in train:
        rel = os.path.relpath(p, ROOT)
        r = load(rel)
        run = os.path.basename(os.path.dirname(p))
        ckpt = f"{RUNS}/train/{run}/final.pt"
        identity = {
            "run_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{RUNS}/train/{run}").hex,
            "checkpoint": common.checkpoint_label(ckpt), "checkpoint_path": ckpt,
            "checkpoint_hash": hashes[ckpt].pop(), "objective": r["objective"],
            "hparams": r["hparams"], "seed": r["seed"], "arch": r["arch"],
            "dataset": r["dataset"], "dataset_name": common.dataset_label(r["dataset"]),
            "resolution": r["resolution"], "small_input": r["small_input"]}
        assert list(identity) == list(common.IDENTITY_FIELDS)
        identities[ckpt] = identity
        rest = {k: v for k, v in r.items() if k not in IDENTITY_KEYS + ("dataset", "dataset_name")}
        save(rel, {**common.result_header(identity, r["dataset"], "train"), **rest})

    for p in sorted(glob.glob(os.path.join(ROOT, RUNS, "probe", "*", "*", "results.json"))):
        rel = os.path.relpath(p, ROOT)
        r = load(rel)
        drop = ("checkpoint", "checkpoint_label", "objective", "seed", "arch", "dataset",
                "dataset_spec", "checkpoint_hash")
        rest = {k: v for k, v in r.items() if k not in drop}
        save(rel, {**common.result_header(identities[r["checkpoint"]], r["dataset_spec"],
                                          "linear_probe"), **rest})
    linear_probe.write_summary(os.path.join(ROOT, RUNS, "probe"))

    for p in sorted(glob.glob(os.path.join(ROOT, RUNS, "finetune", "**", "results.json"),
                              recursive=True)):
        rel = os.path.relpath(p, ROOT)
        r = load(rel)
        if "finetune_of" in r:     # a grid point or the final run: finetune.py's own record
            save(rel, {"kind": "finetune_run", **r})
            continue
        drop = ("checkpoint", "checkpoint_path", "checkpoint_hash", "objective", "seed", "arch",
                "dataset", "dataset_name", "from_scratch")
        rest = {k: v for k, v in r.items() if k not in drop}
        save(rel, {**common.result_header(identities[r["checkpoint_path"]], r["dataset"],
                                          "finetune"), **rest})

    networks = [identities[p] for p in cka["paths"]]
    drop = ("labels", "objectives", "seeds", "archs", "hashes", "paths", "data", "dataset")
    save(f"{RUNS}/cka/cka.json", {**common.result_header(networks, cka["data"], "cka"),
                                  **{k: v for k, v in cka.items() if k not in drop}})
    npz = os.path.join(ROOT, RUNS, "cka", "cka.npz")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    common.save_npz(npz, cka=arrays["cka"], layers=arrays["layers"], checkpoints=arrays["labels"],
                    run_ids=np.array([n["run_id"] for n in networks]),
                    resolution=arrays["resolution"], n_images=arrays["n_images"],
                    n_images_used=np.int64(cka["n_images_used"]),
                    n_batches=arrays["n_batches"], skipped_images=np.int64(cka["skipped_images"]),
                    passes=arrays["passes"])

    networks = [identities[e["path"]] for e in separation]
    assert len({(e["data"], e["split"]) for e in separation}) == 1
    save(f"{RUNS}/class_separation/class_separation.json", {
        **common.result_header(networks, separation[0]["data"], "class_separation"),
        "split": separation[0]["split"], "max_per_class": 500,   # SEP_ARGS in README.md
        "results": [{"checkpoint": e["label"], "resolution": e["resolution"],
                     "n_images": e["n_images"], "num_classes": e["num_classes"],
                     "layers": e["layers"]} for e in separation]})
    npz = os.path.join(ROOT, RUNS, "class_separation", "class_separation.npz")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    common.save_npz(npz, r2=arrays["r2"], sparsity=arrays["sparsity"], dim=arrays["dim"],
                    checkpoints=arrays["labels"],
                    run_ids=np.array([n["run_id"] for n in networks]), layers=arrays["layers"],
                    n_images=arrays["n_images"])
    print(f"migrated {len(identities)} training runs and their results under {RUNS}")


if __name__ == "__main__":
    main()
