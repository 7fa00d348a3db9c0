"""Import the authors' released TensorFlow-1 ResNet-50 checkpoints, without TensorFlow.

The 72 networks of the paper (9 objectives x 8 seeds) are TF1 checkpoints at
gs://gresearch/loss_functions_transfer/checkpoints/<objective>/seed<k>/model.ckpt
(https://storage.googleapis.com/gresearch/loss_functions_transfer/checkpoints/...: files
model.ckpt.index and model.ckpt.data-00000-of-00001). This script turns one, or a downloaded
tree of them, into ordinary checkpoints of this project that common.load_pretrained, and so
every analysis script, loads:

    python import_tf_checkpoint.py --checkpoint ckpts/softmax/seed0/model.ckpt --out softmax_s0.pt
    python import_tf_checkpoint.py --checkpoint ckpts --out runs/tf # runs/tf/<objective>_s<seed>.pt
    python import_tf_checkpoint.py --checkpoint x/model.ckpt --objective sigmoid --seed 2 \\
        --out sigmoid_s2.pt --keep-background
    python linear_probe.py --checkpoint runs/tf/*.pt --data cifar10:/data --out runs/probe

Or not at all: every script that takes a checkpoint takes the released networks by name,
--checkpoint paper:OBJECTIVE/seedK (or paper:all, the 72), downloaded and converted on first use
(fetch_released below; PAPER_CHECKPOINTS_URL for a mirror) and then loaded from torch's hub cache
(TORCH_HOME/hub/checkpoints/loss_functions_transfer/OBJECTIVE_sK.pt):

    python linear_probe.py --checkpoint paper:all --data cifar10:/data --out runs/probe

What is imported (as the official load_model.py restores it for evaluation): for every variable
of the eval graph its <name>/ExponentialMovingAverage shadow, BN moving statistics included;
raw weights, Momentum slots and global_step in the same file are never read. TF1 auto-names
(conv2d, conv2d_1, ..., batch_normalization_N in layer-creation order, dense/kernel or the
cosine head's dense/normalized_kernel) are mapped onto torchvision's ResNet-50. The released
heads have 1001 outputs, class 0 an unused background class (TF class k = ImageNet class k-1):
it is dropped unless --keep-background. The model is rebuilt with TF's SAME stem max-pool
(checkpoint key stem_pool="tf_same"); the cosine_softmax head normalizes only the weights
(normalize_features=False), as the released code does. Checked against the official TF graph:
all 16 block outputs, the pooled features and the final layer agree to float32 round-off.

TF eval preprocessing (center crop of 0.875 of the short side, TF1 resize_bicubic without
antialiasing or half-pixel offset) is tf_eval_transform() below: within 2e-4 grey levels of
TF's output. common.eval_transform (antialiased bicubic, uint8) is not the same input: on
scikit-learn's two sample photos it differs by 4-10 grey levels on average, over 100 at edges.

The reader needs numpy and the standard library only (read_index, read_tensors): the .index
file is a LevelDB-style table of BundleEntryProto records, the data file raw little-endian
tensors checked with masked crc32c.
"""
import base64
import contextlib
import errno
import functools
import hashlib
import http.client
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import urllib.error
import urllib.request
import uuid

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while torch loads (1-2 s): one line and status 130, as later (common.run_main)
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted (Ctrl-C) while starting",
                                                   file=sys.stderr), os._exit(130)))

import numpy as np
import torch

import common

# ----------------------------------------------------------------------------------------------
# Reading a TF checkpoint (TensorBundle format): numpy and the standard library only

BUCKET = "gs://gresearch/loss_functions_transfer/checkpoints"   # <objective>/seed<k>/model.ckpt
RELEASED_URL = "https://storage.googleapis.com/gresearch/loss_functions_transfer/checkpoints"
RELEASED_FILES = ("model.ckpt.index", "model.ckpt.data-00000-of-00001")
DOWNLOAD_TIMEOUT = 60      # seconds without a byte before a download is given up
TABLE_MAGIC = 0xDB4775248B80FB57           # LevelDB table footer magic, also TF's
FOOTER_LEN = 48                            # two block handles padded to 40 bytes + magic
DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?",
          17: "<u2", 19: "<f2", 22: "<u4", 23: "<u8"}     # TF DataType enum -> numpy
DTYPE_NAMES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128", 20: "resource",
               21: "variant"}


def _crc_table():
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    return t


CRC_TABLE = _crc_table()                   # CRC-32C (Castagnoli), reflected
_CRC_LIST = CRC_TABLE.tolist()


def _crc_bytes(reg, data):
    for b in data:
        reg = _CRC_LIST[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


@functools.lru_cache(maxsize=64)
def _zeros_tables(n):
    """The CRC register's map for n zero bytes (linear over GF(2)) as 4 byte-lookup tables."""
    cols = [_crc_bytes(1 << j, b"\0") for j in range(32)]        # one zero byte

    def apply(op, x):
        r, j = 0, 0
        while x:
            if x & 1:
                r ^= op[j]
            x, j = x >> 1, j + 1
        return r
    power, op = [1 << j for j in range(32)], cols
    while n:                                                      # op^n by squaring
        if n & 1:
            power = [apply(op, c) for c in power]
        op, n = [apply(op, c) for c in op], n >> 1
    return [[apply(power, b << (8 * k)) for b in range(256)] for k in range(4)]


def crc32c(data):
    """CRC-32C of bytes. Large inputs run as many interleaved numpy lanes, combined with the
    zero-byte operator: measured about 0.6 s per 100 MB on one core."""
    buf = np.frombuffer(data, dtype=np.uint8)
    n, reg = len(buf), 0xFFFFFFFF
    if n >= 1 << 15:
        step = max(256, math.isqrt(n) // 4)
        lanes = n // step
        block = buf[:lanes * step].reshape(lanes, step).T.copy()
        regs = np.zeros(lanes, dtype=np.uint32)
        for row in block:
            regs = CRC_TABLE[(regs ^ row) & 0xFF] ^ (regs >> 8)
        t0, t1, t2, t3 = _zeros_tables(step)
        for r in regs.tolist():
            reg = (t0[reg & 0xFF] ^ t1[(reg >> 8) & 0xFF] ^ t2[(reg >> 16) & 0xFF]
                   ^ t3[reg >> 24] ^ r)
        buf = buf[lanes * step:]
    return _crc_bytes(reg, buf.tobytes()) ^ 0xFFFFFFFF


def masked_crc32c(data):
    """TF's (and LevelDB's) stored form of a CRC: rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf, pos):
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if b < 0x80:
            return value, pos


def _fields(buf):
    """A protobuf message's fields as (number, value): int for varint/fixed, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        value, pos = _value(buf, pos, key & 7)
        if pos > len(buf):
            raise ValueError("truncated protobuf field")
        yield key >> 3, value


def _value(buf, pos, wire):
    """(value, next position) of a field of wire type `wire` starting at pos."""
    if wire == 0:                                          # varint
        return _varint(buf, pos)
    if wire in (1, 5):                                     # fixed64, fixed32
        size = 8 if wire == 1 else 4
        return int.from_bytes(buf[pos:pos + size], "little"), pos + size
    if wire == 2:                                          # length-delimited
        size, pos = _varint(buf, pos)
        return bytes(buf[pos:pos + size]), pos + size
    raise ValueError(f"unsupported protobuf wire type {wire}")


def _entry(buf):
    """BundleEntryProto -> dict(dtype, shape, shard_id, offset, size, crc32c, sliced)."""
    e = {"dtype": 0, "shape": [], "shard_id": 0, "offset": 0, "size": 0, "crc32c": None,
         "sliced": False}
    names = {1: "dtype", 3: "shard_id", 4: "offset", 5: "size", 6: "crc32c"}
    for number, value in _fields(buf):
        if number in names:
            e[names[number]] = value
        elif number == 2:                                  # TensorShapeProto: repeated dim = 2
            e["shape"] += [dict(_fields(dim)).get(1, 0) for n, dim in _fields(value) if n == 2]
        elif number == 7:
            e["sliced"] = True
    return e


def _block(data, offset, size, path):
    """A table block's contents after its 5-byte trailer (compression type, masked crc32c)."""
    raw = data[offset:offset + size + 5]
    if offset < 0 or len(raw) != size + 5:
        raise common.UserError(f"{path} is truncated (a block runs past the end of the file); "
                               f"download it again")
    contents, kind, crc = raw[:size], raw[size], int.from_bytes(raw[size + 1:], "little")
    if masked_crc32c(raw[:size + 1]) != crc:
        raise common.UserError(f"{path} is corrupt (crc32c mismatch in a table block); "
                               f"download it again")
    if kind != 0:
        raise common.UserError(f"{path} has compressed table blocks (type {kind}, e.g. snappy), "
                               f"which this reader does not support (TF writes them uncompressed)")
    return contents


def _block_items(block):
    """(key, value) pairs of a table block: prefix-compressed keys, restart array at the end."""
    restarts = int.from_bytes(block[-4:], "little")
    end, pos, key, items = len(block) - 4 * (restarts + 1), 0, b"", []
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        key = key[:shared] + bytes(block[pos:pos + unshared])
        pos += unshared
        items.append((key, bytes(block[pos:pos + vlen])))
        pos += vlen
    return items


def read_index(prefix):
    """A checkpoint's table of contents: {tensor name: entry dict} from PREFIX.index, and the
    number of data shards. Raises UserError when the file is missing, truncated or corrupt."""
    path = prefix + ".index"
    if not os.path.isfile(path):
        raise common.UserError(f"{path} not found; --checkpoint takes the prefix (.../model.ckpt)"
                               f" beside model.ckpt.index and model.ckpt.data-00000-of-00001")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < FOOTER_LEN or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise common.UserError(f"{path} is not a TensorFlow checkpoint index (no table magic "
                               f"at its end: truncated or another format); download it again")
    try:
        return _read_table(data, path)
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise common.UserError(f"{path} is corrupt ({e}); download it again")


def _read_table(data, path):
    """({tensor name: entry dict}, number of shards) from the bytes of an .index file."""
    footer = data[-FOOTER_LEN:]
    _, pos = _varint(footer, 0)                             # metaindex handle: unused
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    entries, shards = {}, 1
    for _, handle in _block_items(_block(data, index_offset, index_size, path)):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        for key, value in _block_items(_block(data, offset, size, path)):
            if key != b"":
                entries[key.decode()] = _entry(value)
                continue
            header = dict(_fields(value))                   # BundleHeaderProto
            shards = header.get(1, 1)
            if header.get(2, 0) != 0:
                raise common.UserError(f"{path} was written big-endian; unsupported")
    return entries, shards


def read_tensors(prefix, names, entries, shards=1):
    """{name: numpy array} for the given entries, read by offset from the data shard(s) and
    checked against the stored crc32c; other tensors in the file are never read."""
    missing = [n for n in names if n not in entries]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise common.UserError(f"{prefix}: tensor(s) {', '.join(missing[:3])}{more} not in the "
                               f"checkpoint; is it one of the released ResNet-50s?")
    out, files = {}, {}
    with contextlib.ExitStack() as opened:      # every shard opened is closed, whatever happens
        for name in names:
            e = entries[name]
            if e["dtype"] not in DTYPES:
                kind = DTYPE_NAMES.get(e["dtype"], f"enum {e['dtype']}")
                raise common.UserError(f"{prefix}: tensor {name} has dtype {kind}, which this "
                                       f"reader does not support")
            if e["sliced"]:
                raise common.UserError(f"{prefix}: tensor {name} is stored in slices "
                                       f"(a partitioned variable); not supported")
            shard = f"{prefix}.data-{e['shard_id']:05d}-of-{shards:05d}"
            if shard not in files:
                if not os.path.isfile(shard):
                    raise common.UserError(f"data file {shard} not found; download it beside "
                                           f"{prefix}.index")
                files[shard] = opened.enter_context(open(shard, "rb"))
            f = files[shard]
            f.seek(e["offset"])
            raw = f.read(e["size"])
            if len(raw) != e["size"]:
                raise common.UserError(f"{shard} is truncated (tensor {name} runs past its end); "
                                       f"download it again")
            if e["crc32c"] is not None and masked_crc32c(raw) != e["crc32c"]:
                raise common.UserError(f"{shard} is corrupt (crc32c mismatch in tensor {name}); "
                                       f"download it again")
            dtype = np.dtype(DTYPES[e["dtype"]])
            if len(raw) != dtype.itemsize * math.prod(e["shape"]):
                raise common.UserError(f"{prefix}: tensor {name} holds {len(raw)} bytes, not "
                                       f"{e['shape']} of {dtype}")
            out[name] = np.frombuffer(raw, dtype=dtype).reshape(e["shape"])
    return out


# ----------------------------------------------------------------------------------------------
# TF ResNet-50 (resnet_model.py of google-research/loss_functions_transfer) -> torchvision

EMA = "/ExponentialMovingAverage"


def tf_name_map(cosine=False):
    """{torchvision state_dict key: TF variable name}. tf.layers numbers conv2d and
    batch_normalization layers in creation order: the stem, then per block its projection
    shortcut (first block of a stage) before conv1..conv3, each conv followed by its BN, so a
    conv and its BN share the number."""
    convs = [("conv1", "bn1")]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}."
            if i == 0:
                convs.append((p + "downsample.0", p + "downsample.1"))
            convs += [(p + f"conv{j}", p + f"bn{j}") for j in (1, 2, 3)]
    names = {}
    for k, (conv, bn) in enumerate(convs):
        n = f"_{k}" if k else ""
        names[conv + ".weight"] = f"conv2d{n}/kernel"
        for torch_key, tf_key in (("weight", "gamma"), ("bias", "beta"),
                                  ("running_mean", "moving_mean"),
                                  ("running_var", "moving_variance")):
            names[f"{bn}.{torch_key}"] = f"batch_normalization{n}/{tf_key}"
    names["fc.weight"] = "dense/normalized_kernel" if cosine else "dense/kernel"
    names["fc.bias"] = "dense/bias"
    return names


def infer_run(prefix):
    """(objective, seed) from the bucket's layout .../<objective>/seed<k>/model.ckpt, else None."""
    parent = os.path.dirname(os.path.abspath(prefix))
    m = re.fullmatch(r"seed(\d+)", os.path.basename(parent))
    objective = os.path.basename(os.path.dirname(parent))
    return objective if objective in common.OBJECTIVES else None, int(m.group(1)) if m else None


def convert(prefix, objective=None, seed=None, keep_background=False):
    """One TF checkpoint -> a checkpoint dict of this project (common.make_checkpoint)."""
    found_objective, found_seed = infer_run(prefix)
    if objective is not None and found_objective is not None and objective != found_objective:
        raise common.UserError(f"--objective {objective} contradicts the path {prefix} "
                               f"(folder {found_objective})")
    if seed is not None and found_seed is not None and seed != found_seed:
        raise common.UserError(f"--seed {seed} contradicts the path {prefix} (seed{found_seed})")
    objective = objective or found_objective
    seed = found_seed if seed is None else seed
    if objective is None:
        raise common.UserError(f"cannot tell the objective from the path {prefix} (expected "
                               f".../<objective>/seed<k>/model.ckpt); pass --objective")
    common.objective_hparams(objective)                     # unknown objective -> UserError
    entries, shards = read_index(prefix)
    cosine = "dense/normalized_kernel" + EMA in entries
    if cosine and objective != "cosine_softmax":
        raise common.UserError(f"{prefix} has a cosine head (dense/normalized_kernel) but the "
                               f"objective is {objective}; pass --objective cosine_softmax")
    if objective == "cosine_softmax" and not cosine and "dense/kernel" + EMA in entries:
        raise common.UserError(f"{prefix} has a linear head (dense/kernel), not the cosine head "
                               f"of cosine_softmax; pass the right --objective")
    names = tf_name_map(cosine)
    tensors = read_tensors(prefix, [n + EMA for n in names.values()], entries, shards)
    bias = tensors["dense/bias" + EMA]
    if bias.ndim != 1 or bias.shape[0] < 2:
        raise common.UserError(f"{prefix}: dense/bias has shape {list(bias.shape)}; not a "
                               f"classifier head")
    num_classes = bias.shape[0] - (0 if keep_background else 1)
    hp = {"normalize_features": False} if objective == "cosine_softmax" else {}
    with torch.device("meta"):      # shapes only: a randomly initialized ResNet-50 costs ~1 s
        state = common.build_model(objective, num_classes, "resnet50", **hp).state_dict()
    state = {k: torch.zeros((), dtype=v.dtype) if k.endswith("num_batches_tracked") else v
             for k, v in state.items()}
    for key, tf_name in names.items():
        a = tensors[tf_name + EMA]
        if a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)                     # HWIO -> OIHW
        elif a.ndim == 2:
            a = a.T                                         # (in, out) -> (out, in)
        if key.startswith("fc.") and not keep_background:
            a = a[1:]                                       # TF class k = ImageNet class k-1
        if tuple(a.shape) != tuple(state[key].shape):
            raise common.UserError(f"{prefix}: {tf_name} has shape "
                                   f"{list(tensors[tf_name + EMA].shape)}, which does not fit a "
                                   f"ResNet-50 ({key} is {list(state[key].shape)} in torch layout)")
        if a.dtype != np.float32:
            raise common.UserError(f"{prefix}: {tf_name} is {a.dtype}, expected float32")
        state[key] = torch.from_numpy(np.array(a, dtype=np.float32, order="C"))
    args = {"data": "imagenet", "resolution": 224, "seed": seed, "objective": objective,
            "arch": "resnet50"}
    source = {"prefix": os.path.abspath(prefix), "weights": "ExponentialMovingAverage",
              "background_class_kept": bool(keep_background), "tf_num_classes": int(bias.shape[0]),
              "head": "cosine" if cosine else "linear"}
    model_args = {"objective": objective, "hparams": common.objective_hparams(objective, **hp),
                  "arch": "resnet50", "num_classes": num_classes, "small_input": False,
                  "stem_pool": "tf_same"}
    return common.make_checkpoint(state, model_args, ema=state, args=args, dataset="imagenet",
                                  tf_checkpoint=source,
                                  run_id=released_run_id(objective, seed, prefix))


def released_run_id(objective, seed, prefix):
    """A stable run id for a released network (uuid5 of its bucket path), so the results of an
    imported network join in make_figures like a trained one's, and importing it again (or on
    another machine) gives the same id. Without a seed: uuid5 of the local prefix.

    >>> released_run_id("softmax", 0, "ckpts/softmax/seed0/model.ckpt")[:8]
    'c53bf481'
    """
    name = (f"{BUCKET}/{objective}/seed{seed}" if seed is not None else os.path.abspath(prefix))
    return uuid.uuid5(uuid.NAMESPACE_URL, name).hex


# ----------------------------------------------------------------------------------------------
# The paper's networks by name (common.load_pretrained's paper:OBJECTIVE/seedK): downloaded once,
# converted, cached under torch's hub cache

def released_cache_path(objective, seed):
    """Where a converted released network is kept: torch's hub cache beside torchvision's
    weights (TORCH_HOME/hub/checkpoints/; ~/.cache/torch by default), as OBJECTIVE_sK.pt."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", "loss_functions_transfer",
                        f"{objective}_s{seed}.pt")


def fetch_released(objective, seed, log=print):
    """The path of released network OBJECTIVE/seedK as a checkpoint of this project: from the
    cache, or else downloaded from RELEASED_URL (the environment's PAPER_CHECKPOINTS_URL for a
    mirror), converted (convert(): EMA weights, 1000 classes) and cached. The two TF files go to
    a temporary folder and are deleted once converted (200 MB); the cache gets the .pt only when
    it is whole (common.save_checkpoint: written beside, then renamed). Nothing half-written is
    ever converted or loaded: each file is checked against the size and hash the server gives,
    the conversion checks every tensor's crc32c, and the .pt carries its weights' checksum.

        path = fetch_released("softmax", 0)   # ~/.cache/torch/hub/checkpoints/.../softmax_s0.pt
    """
    path = released_cache_path(objective, seed)
    if os.path.isfile(path):
        return path
    name = f"paper:{objective}/seed{seed}"
    base = (os.environ.get("PAPER_CHECKPOINTS_URL") or RELEASED_URL).rstrip("/")
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=folder, prefix=".download-")
    except OSError as e:
        raise common.UserError(f"{name}: cannot write the cache folder {folder} "
                               f"({e.strerror or e}); set TORCH_HOME to a writable place") from None
    try:
        prefix = os.path.join(tmp, objective, f"seed{seed}", "model.ckpt")
        os.makedirs(os.path.dirname(prefix))
        for f in RELEASED_FILES:
            download(f"{base}/{objective}/seed{seed}/{f}",
                     os.path.join(os.path.dirname(prefix), f), name, log)
        try:
            ck = convert(prefix, objective, seed)
        except common.UserError as e:     # the files' URL, not the deleted temporary path
            text = str(e).replace(prefix, f"{base}/{objective}/seed{seed}/model.ckpt")
            raise common.UserError(f"{name}: {text} (nothing was cached)") from None
        common.save_checkpoint(path, ck)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{name}: converted, cached as {path}", flush=True)
    return path


def download(url, dst, name, log=print):
    """url -> dst with torch's downloader (torch.hub.download_url_to_file: a progress bar on a
    terminal, plain lines in a log; it renames its partial file onto dst when the stream ends),
    then checked against the server's Content-Length and, from Google Cloud Storage, the MD5 or
    CRC32C of its x-goog-hash header: a connection closed mid-body ends the stream without an
    error. Any failure is a one-line UserError naming `name` and the URL."""
    why = None
    old_timeout = socket.getdefaulttimeout()
    try:
        size, hashes = _head(url)
        log(f"{name}: downloading {url}" + (f" ({size / 1e6:.1f} MB)" if size else ""), flush=True)
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)   # torch's downloader sets none
        torch.hub.download_url_to_file(url, dst, progress=sys.stderr.isatty())
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code} {e.reason}" + (": not on the server" if e.code == 404 else "")
    except urllib.error.URLError as e:
        why = f"{e.reason}; check the network, or PAPER_CHECKPOINTS_URL"
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise common.UserError(f"{name}: no space left on the device for {dst}; free some "
                                   f"space or set TORCH_HOME elsewhere") from None
        why = f"{e.strerror or e or type(e).__name__}; check the network, or PAPER_CHECKPOINTS_URL"
    except (http.client.HTTPException, ValueError) as e:
        why = f"{type(e).__name__}: {e}"
    finally:
        socket.setdefaulttimeout(old_timeout)
    if why is None:
        got = os.path.getsize(dst)
        if size is not None and got != size:
            why = f"the connection closed after {got:,} of {size:,} bytes"
        elif not _hash_matches(dst, hashes):
            why = "its content does not match the hash the server gives"
    if why is not None:
        if os.path.exists(dst):
            os.remove(dst)
        raise common.UserError(f"{name}: cannot download {url} ({why}); nothing was cached, "
                               f"rerun to try again")


def _head(url):
    """(size or None, {hash kind: base64 digest}) from a HEAD request; a server that does not
    answer HEAD (405, 501) gives (None, {}): the download is then checked by its content only."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "torch.hub"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as r:
            size = r.headers.get("Content-Length")
            hashes = dict(h.strip().split("=", 1) for v in r.headers.get_all("x-goog-hash") or []
                          for h in v.split(",") if "=" in h)
    except urllib.error.HTTPError as e:
        if e.code in (405, 501):
            return None, {}
        raise
    return (int(size) if size and size.isdigit() else None), hashes


def _hash_matches(path, hashes):
    """Whether the file matches the MD5 or else CRC32C of an x-goog-hash header ({kind: base64
    digest}); True when the server gives neither (the size and crc32c of every tensor remain)."""
    with open(path, "rb") as f:
        if "md5" in hashes:
            kind, digest = "md5", hashlib.file_digest(f, "md5").digest()
        elif "crc32c" in hashes:
            kind, digest = "crc32c", crc32c(f.read()).to_bytes(4, "big")
        else:
            return True
    return base64.b64encode(digest).decode() == hashes[kind]


def find_checkpoints(folder):
    """Every PREFIX with a PREFIX.index under `folder`, sorted."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f[:-len(".index")]) for f in files if f.endswith(".index")]
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# TF's eval preprocessing (resnet_preprocessing.py), torch only

def _tf_bicubic_matrix(n_in, n_out):
    """(n_out, n_in) weights of TF1 ResizeBicubic with align_corners=False and
    half_pixel_centers=False: source x = out * in/out (float32), cubic a = -0.75 from a
    1024-step coefficient table, edge pixels repeated, no antialiasing."""
    a, table = np.float32(-0.75), 1024
    x = np.arange(table + 1, dtype=np.float32) / np.float32(table)
    near = ((a + 2) * x - (a + 3)) * x * x + 1                  # weight at distance x
    x1 = x + 1
    far = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a          # weight at distance x + 1
    scale = np.float32(n_in) / np.float32(n_out)
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for o in range(n_out):
        src = np.float32(o) * scale
        i = int(np.floor(src))
        k = int(np.rint((src - np.float32(i)) * np.float32(table)))
        for j, c in zip(range(i - 1, i + 3), (far[k], near[k], near[table - k], far[table - k])):
            w[o, min(max(j, 0), n_in - 1)] += c
    return torch.from_numpy(w)


def tf_eval_transform(resolution=224, crop_fraction=0.875):
    """uint8 CHW -> float32 CHW on the 0-255 scale, unclipped (common.normalize takes it as is):
    the released models' eval preprocessing, center crop of round(crop_fraction * short side)
    (TF's offsets) then TF1 resize_bicubic. Use with common.with_transform(split, ...)."""
    def transform(img):
        h, w = img.shape[-2:]
        side = int(np.rint(np.float32(crop_fraction) * np.float32(min(h, w))))
        top, left = (h - side + 1) // 2, (w - side + 1) // 2
        x = img[..., top:top + side, left:left + side].double()
        m = _tf_bicubic_matrix(side, resolution)
        return (m @ x @ m.T).float()
    return transform


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = common.argument_parser(__doc__)     # a bad argument: one line `error: ...`, exit 2
    p.add_argument("--checkpoint", required=True,
                   help="a TF checkpoint prefix (.../model.ckpt) or a folder holding several")
    p.add_argument("--out", required=True,
                   help="output .pt file (for a prefix) or folder (for a folder)")
    p.add_argument("--objective", default=None, choices=list(common.OBJECTIVES),
                   help="default: the <objective> folder of the bucket's layout")
    p.add_argument("--seed", type=common.seed, default=None, help="default: the seed<k> folder")
    p.add_argument("--keep-background", action="store_true",
                   help="keep TF's 1001 outputs (class 0 = unused background); default 1000")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output file that holds another network (default: refused)")
    args = p.parse_args(argv)
    if re.match(r"(gs|https?)://", args.checkpoint):
        raise common.UserError(f"download {args.checkpoint} first (e.g. gsutil -m cp -r "
                               f"gs://gresearch/loss_functions_transfer/checkpoints .), then pass "
                               f"the local path; or give the scripts --checkpoint "
                               f"paper:OBJECTIVE/seedK, which downloads and converts by itself")
    args.checkpoint = re.sub(r"\.(index|data-\d{5}-of-\d{5})$", "", args.checkpoint)
    if os.path.isdir(args.checkpoint):
        if args.objective is not None or args.seed is not None:
            raise common.UserError("--objective/--seed apply to one checkpoint; a folder's are "
                                   "read from its <objective>/seed<k>/ layout")
        if os.path.isfile(args.out) or args.out.endswith(".pt"):
            raise common.UserError(f"--checkpoint is a folder, so --out must be a folder, "
                                   f"not {args.out}")
        prefixes = find_checkpoints(args.checkpoint)
        if not prefixes:
            raise common.UserError(f"no TF checkpoint (*.index) under {args.checkpoint}")
        jobs = []
        for prefix in prefixes:
            objective, seed = infer_run(prefix)
            if objective is None or seed is None:
                raise common.UserError(f"{prefix} is not in an <objective>/seed<k>/ folder; "
                                       f"convert it alone with --objective and --seed")
            jobs.append((prefix, os.path.join(args.out, f"{objective}_s{seed}.pt")))
    else:
        if not os.path.isfile(args.checkpoint + ".index"):
            raise common.UserError(f"{args.checkpoint}.index not found; --checkpoint takes the "
                                   f"prefix (.../model.ckpt) or a folder")
        if os.path.isdir(args.out):
            raise common.UserError(f"--out {args.out} is a folder; give a .pt file name")
        jobs = [(args.checkpoint, args.out)]
    for prefix, out in jobs:
        with common.locked_file(out):  # one writer per file, as per folder elsewhere
            ck = convert(prefix, args.objective, args.seed, args.keep_background)
            if same_network(out, ck, args.overwrite):
                print(f"{prefix} -> {out}: already imported (the same weights)", flush=True)
                continue
            common.save_checkpoint(out, ck)
        print(f"{prefix} -> {out} ({ck['objective']}, seed {ck['args']['seed']}, "
              f"{ck['num_classes']} classes)", flush=True)


def same_network(out, ck, overwrite=False):
    """Whether `out` holds the network of checkpoint dict `ck` already (the same weights). Any
    other content, another network or not a checkpoint, is refused with one line unless
    `overwrite` (the rule of every script's outputs: two imports of different networks to one
    .pt left only the second)."""
    if not os.path.lexists(out):
        return False
    try:
        old = torch.load(out, map_location="cpu", weights_only=True)
    except Exception:
        old = None
    if isinstance(old, dict) and old.get("checksum") == ck["checksum"]:
        return True
    if overwrite:
        return False
    if isinstance(old, dict) and "objective" in old:
        tf, run = (old.get(k) if isinstance(old.get(k), dict) else {}
                   for k in ("tf_checkpoint", "args"))
        what = (f"another network ({old['objective']}, seed {run.get('seed')}, "
                f"{old.get('num_classes')} classes, from {tf.get('prefix', 'elsewhere')})")
    else:
        what = "a file that is not a checkpoint of this project"
    raise common.UserError(f"{out} holds {what}; use another --out, or --overwrite to replace it")


if __name__ == "__main__":
    common.run_main(main)
