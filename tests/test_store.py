"""The store on disk under damage, concurrency and a full disk, each against an undisturbed run (arrays equal exactly):
damaged shards and caches are named and encoded again, one writer per store (a lock), a full disk names the file and
loses nothing, arrays changed in place are refused (a content hash recorded at merge, checked on open only for files
whose size or mtime changed), and a checkpoint's identity covers exactly the files its encodings depend on."""
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import packed
import shards
import store
from test_eval import FakeM3, NoisyTokens
from test_scale import TEXTS, write_store
from tiny import run, spawn, tiny_m3


def same_store(P, want):
    """Every array of P equals want's, dtype and values (bit for bit)."""
    assert set(P) == set(want)
    for k in want:
        assert P[k].dtype == want[k].dtype and np.array_equal(P[k], want[k], equal_nan=True), k


def interrupted_before_merge(tmp_path, m, monkeypatch):
    """Every shard of TEXTS written into tmp_path/st (4 of 7, 7, 7, 2 passages), the merge interrupted."""
    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards, "merge", stop)
    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path, TEXTS, m)
    monkeypatch.undo()
    return tmp_path / "st" / "shards"


def cut(f, keep=0.5):
    """Truncate file f to a fraction of its size (a copy or write that died half-way)."""
    with open(f, "r+b") as fh:
        fh.truncate(int(os.path.getsize(f) * keep))


def test_a_damaged_shard_is_named_and_encoded_again(tmp_path, monkeypatch):
    full = write_store(tmp_path, TEXTS, NoisyTokens(), name="once")
    m = NoisyTokens()
    shard_dir = interrupted_before_merge(tmp_path, m, monkeypatch)
    assert m.calls == 4
    cut(shard_dir / "00001.npz")  # -> BadZipFile
    cut(shard_dir / "00002.tokens.npy")  # -> mmap's ValueError
    meta = store.store_meta(packed.model_key(m), TEXTS, 64, False)
    size = lambda s: min(7, len(TEXTS) - 7 * s)
    with pytest.raises(ValueError, match=r"shards/00001\.npz: unreadable \(BadZipFile: .*run the same encode again"):
        shards.merge(str(tmp_path / "st"), meta, 4, size)  # a torchrun rank's shard damaged: named, nothing written
    assert sorted(os.listdir(tmp_path / "st")) == ["shards"]
    with pytest.warns(UserWarning) as warned:
        P = write_store(tmp_path, TEXTS, m)
    said = [str(w.message) for w in warned]
    assert any(re.search(r"shards/00001\.npz: unreadable \(BadZipFile: .*\): encoding it again", s) for s in said)
    assert any(re.search(r"shards/00002\.tokens\.npy: unreadable \(ValueError: .*\): encoding it again", s)
               for s in said)
    assert m.calls == 6 and not os.path.exists(shard_dir)  # shards 1 and 2 only, then merged
    same_store(P, full)


def test_a_damaged_encoding_cache_is_named_and_rebuilt(tmp_path):
    m, cache = FakeM3(), str(tmp_path / "cache")
    fresh = packed.encode_cached(lambda: m, TEXTS, 64, cache_dir=cache, key="k")
    f, = [os.path.join(cache, x) for x in os.listdir(cache)]
    damage = {"cut": lambda: cut(f), "garbage": lambda: Path(f).write_bytes(b"not an npz " * 100),
              "a missing array": lambda: np.savez(f, **{k: v for k, v in fresh.items() if k != "cb_ptr"}),
              "another corpus's rows": lambda: np.savez(f, **packed.pack(m.encode(TEXTS[:5])))}
    for n, (what, spoil) in enumerate(damage.items()):
        spoil()
        with pytest.warns(UserWarning, match=rf"{re.escape(f)}: damaged encoding cache .*: encoding again"):
            got = packed.encode_cached(lambda: m, TEXTS, 64, cache_dir=cache, key="k")
        calls = m.calls
        assert calls == n + 2 + (what == "another corpus's rows"), what  # encoded again (and 5 texts by the test)
        same_store(got, fresh)
        assert os.listdir(cache) == [os.path.basename(f)]  # rebuilt in place, no temporaries left
        same_store(packed.encode_cached(lambda: m, TEXTS, 64, cache_dir=cache, key="k"), fresh)
        assert m.calls == calls  # and read from now on


class GatedM3(NoisyTokens):
    """NoisyTokens that says it started (the file `started`) and then waits, at most 120 s, for the file `gate`."""

    def __init__(self, started, gate):
        super().__init__()
        self.started, self.gate = started, gate

    def encode(self, texts, **kw):
        open(self.started, "w").close()
        deadline = time.time() + 120
        while not os.path.exists(self.gate):
            if time.time() > deadline:
                raise TimeoutError(f"{self.gate} never appeared")
            time.sleep(0.05)
        return super().encode(texts, **kw)


def lock_worker(rank, init, tmp_path):
    """Two independent processes (no process group) encoding one store: 0 starts and is held inside its first shard,
    1 tries meanwhile, writes what happened to rank1.txt, then lets 0 go on."""
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    if rank == 0:
        (tmp_path / "pid0").write_text(str(os.getpid()))
        write_store(tmp_path, TEXTS, GatedM3(started, gate))
        return
    try:
        deadline = time.time() + 120
        while not os.path.exists(started) and time.time() < deadline:
            time.sleep(0.05)
        try:
            write_store(tmp_path, TEXTS, NoisyTokens())
            (tmp_path / "rank1.txt").write_text("no error")
        except Exception as e:
            (tmp_path / "rank1.txt").write_text(f"{type(e).__name__}: {e}")
    finally:
        open(gate, "w").close()


def test_two_writers_of_one_store_the_second_stops_at_once(tmp_path):
    spawn(lock_worker, (tmp_path,), nprocs=2, timeout=300)
    said, pid0 = (tmp_path / "rank1.txt").read_text(), (tmp_path / "pid0").read_text()
    st = str(tmp_path / "st")
    assert re.fullmatch(rf"RuntimeError: {re.escape(st)} is being written by pid {pid0} on {socket.gethostname()} "
                        r"\(.*encode\.lock\): .*", said), said
    one = write_store(tmp_path, TEXTS, NoisyTokens(), name="one")
    same_store(store.open_store(st), one)  # the first writer's store, undisturbed
    assert "encode.lock" not in os.listdir(st)


def plant_lock(st, pid, host):
    """A lock file in st as another writer leaves it: its pid and host."""
    os.makedirs(st, exist_ok=True)
    with open(os.path.join(st, "encode.lock"), "w") as f:
        json.dump({"pid": pid, "host": host}, f)


def test_a_live_lock_stops_a_writer_a_stale_one_is_taken_over_and_errors_release_it(tmp_path):
    st, me = str(tmp_path / "st"), socket.gethostname()
    lock = os.path.join(st, "encode.lock")
    m = FakeM3()
    for pid, host in ((os.getppid(), me), (os.getppid(), "elsewhere"), (2 ** 22 + 1, "elsewhere")):
        plant_lock(st, pid, host)  # alive here, or on another host (whose processes cannot be seen): held
        before = Path(lock).read_text()
        with pytest.raises(RuntimeError, match=rf"{re.escape(st)} is being written by pid {pid} on {host} "
                                               rf"\({re.escape(lock)}\): .*remove {re.escape(lock)}"):
            write_store(tmp_path, TEXTS, m)
        assert m.calls == 0 and os.listdir(st) == ["encode.lock"] and Path(lock).read_text() == before
    dead = int(run([sys.executable, "-c", "import os; print(os.getpid())"], timeout=60).stdout)
    plant_lock(st, dead, me)  # a killed run's lock
    with pytest.warns(UserWarning, match=rf"{re.escape(lock)}: pid {dead} on {me} no longer runs: lock taken over"):
        P = write_store(tmp_path, TEXTS, m)
    same_store(P, write_store(tmp_path, TEXTS, FakeM3(), name="one"))
    assert "encode.lock" not in os.listdir(st)

    class Fails(FakeM3):
        def encode(self, texts, **kw):
            raise RuntimeError("the model failed")
    with pytest.raises(RuntimeError, match="the model failed"):
        write_store(tmp_path, TEXTS, Fails(), name="failed")
    assert os.listdir(tmp_path / "failed") == ["shards"]  # the lock went with the error


def test_a_full_disk_names_the_file_leaves_no_half_file_and_a_rerun_resumes(tmp_path, monkeypatch):
    full = write_store(tmp_path, TEXTS, NoisyTokens(), name="once")
    m, shard_dir = NoisyTokens(), tmp_path / "st" / "shards"
    real_savez, real_save, real_header = np.savez, np.save, np.lib.format.write_array_header_1_0

    def half_then(error, real, when):  # writes a few bytes, then fails as a full disk does
        def write(f, *a, **k):
            if not when(f, *a):
                return real(f, *a, **k)
            if isinstance(f, str):
                Path(f).write_bytes(b"\x93NUMPY half")
            raise error
        return write
    monkeypatch.setattr(np, "savez", half_then(OSError(errno.ENOSPC, "No space left on device"), real_savez,
                                               lambda f, *a: f.endswith("00001.tmp.npz")))
    with pytest.raises(OSError, match=r"shards/00001\.npz: not written \(\[Errno 28\] No space left on device\): "
                                      "disk full or not writable") as e:
        write_store(tmp_path, TEXTS, m)
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(shard_dir)) == ["00000.npz", "00000.tokens.npy", "00001.tokens.npy", "meta.json"]
    monkeypatch.undo()  # space again, until shard 2's tokens
    monkeypatch.setattr(np, "save", half_then(OSError("1536 requested and 0 written"), real_save,  # numpy's words
                                              lambda f, *a: f.endswith("00002.tmp.tokens.npy")))
    with pytest.raises(OSError, match=r"shards/00002\.tokens\.npy: not written \(1536 requested and 0 written\): "
                                      "disk full or not writable"):
        write_store(tmp_path, TEXTS, m)
    assert sorted(os.listdir(shard_dir)) == ["00000.npz", "00000.tokens.npy", "00001.npz", "00001.tokens.npy",
                                          "meta.json"]
    monkeypatch.undo()  # until the merge writes tokens.npy (float16, a row per token; dense.npy: one per passage)
    monkeypatch.setattr(np.lib.format, "write_array_header_1_0", half_then(
        OSError(errno.ENOSPC, "No space left on device"), real_header,
        lambda f, d: d["descr"] == "<f2" and d["shape"][0] != len(TEXTS)))
    with pytest.raises(OSError, match=r"st/tokens\.npy: not written .*disk full or not writable"):
        write_store(tmp_path, TEXTS, m)  # while merging: the shards are kept
    assert sorted(os.listdir(tmp_path / "st")) == ["dense.npy", "offsets.npy", "shards", "sp_ids.npy", "sp_ptr.npy",
                                                   "sp_w.npy"]
    assert len(os.listdir(shard_dir)) == 9 and m.calls == 6
    monkeypatch.undo()
    P = write_store(tmp_path, TEXTS, m)  # the cause fixed: resumes, nothing encoded twice
    assert m.calls == 6
    same_store(P, full)


def count_hashes(monkeypatch):
    """The files store.file_hash reads from now on."""
    calls, real = [], store.file_hash
    monkeypatch.setattr(store, "file_hash", lambda f: calls.append(os.path.basename(f)) or real(f))
    return calls


def change_in_place(f, row, value=np.nan):
    """Overwrite row `row` of the .npy file f with value, at the same size, as a later write would (mtime + 1 s)."""
    x = np.load(f, mmap_mode="r")
    at, step, dtype = x.offset + row * x[0].nbytes, x[0].nbytes, x.dtype
    mtime = os.stat(f).st_mtime_ns
    with open(f, "r+b") as fh:
        fh.seek(at)
        fh.write(np.full(step // dtype.itemsize, value, dtype).tobytes())
    os.utime(f, ns=(mtime + 10 ** 9, mtime + 10 ** 9))  # a coarse clock could give it the old mtime


def test_arrays_changed_in_place_are_refused_and_only_changed_files_are_hashed(tmp_path, monkeypatch):
    P = write_store(tmp_path, TEXTS, NoisyTokens())
    st = tmp_path / "st"
    files = json.loads((st / "meta.json").read_text())["files"]
    assert sorted(files) == sorted(store.store_files({}).values())
    for name, rec in files.items():  # recorded while writing = the bytes on disk, read back independently
        s = os.stat(st / name)
        assert rec == {"size": s.st_size, "mtime_ns": s.st_mtime_ns,
                       "sha1": hashlib.sha1((st / name).read_bytes()).hexdigest()}
    hashed = count_hashes(monkeypatch)
    same_store(store.open_store(str(st)), P)
    assert hashed == [] and "checked.json" not in os.listdir(st)  # nothing changed: nothing read
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(st):
        shutil.copyfile(st / name, copy / name)  # a copy: the same bytes, new mtimes
        t = os.stat(st / name).st_mtime_ns + 10 ** 9
        os.utime(copy / name, ns=(t, t))
    same_store(store.open_store(str(copy)), P)
    assert sorted(hashed) == sorted(store.store_files({}).values()) and (copy / "meta.json").read_bytes() == (
        st / "meta.json").read_bytes()
    hashed.clear()
    same_store(store.open_store(str(copy)), P)
    assert hashed == []  # checked.json remembers the accepted mtimes
    for where, name, row in ((copy, "dense.npy", 3), (st, "tokens.npy", 10)):
        change_in_place(str(where / name), row)
        with pytest.raises(ValueError, match=rf"{re.escape(str(where / name))}: changed since it was written .*"
                                             rf"encode again \(remove {re.escape(str(where))}\)"):
            store.open_store(str(where))
    cut(str(copy / "sp_w.npy"), 0.999)
    with pytest.raises(ValueError, match=r"copy/sp_w\.npy: unreadable"):
        store.open_store(str(copy))


def test_a_store_written_before_the_record_is_hashed_once_then_checked(tmp_path, monkeypatch):
    P = write_store(tmp_path, TEXTS, NoisyTokens())
    st = tmp_path / "st"
    meta = json.loads((st / "meta.json").read_text())
    del meta["files"]
    (st / "meta.json").write_text(json.dumps(meta))
    hashed = count_hashes(monkeypatch)
    with pytest.warns(UserWarning, match=r"st: written before stores recorded their files' hashes: hashing them now "
                                          r"\(0\.0 GB, once\)"):
        same_store(store.open_store(str(st)), P)
    assert sorted(hashed) == sorted(store.store_files({}).values()) and "checked.json" in os.listdir(st)
    hashed.clear()
    same_store(store.open_store(str(st)), P)
    assert hashed == []
    change_in_place(str(st / "tokens.npy"), 4)
    with pytest.raises(ValueError, match=r"st/tokens\.npy: changed since it was written"):
        store.open_store(str(st))


def test_dense_vectors_are_float16_within_half_a_unit_and_a_float32_store_is_read_as_it_is(tmp_path):
    m = NoisyTokens()
    P = write_store(tmp_path, TEXTS, m)
    st = tmp_path / "st"
    meta = json.loads((st / "meta.json").read_text())
    full = packed.pack(m.encode(TEXTS, max_length=64))["dense"].astype(np.float64)  # (N, H) the model's, float32
    assert P["dense"].dtype == np.float16 and meta["dense_vectors"] == "float16"
    # round to nearest: |x16 - x| <= 2^-11 |x| where x16 is a normal float16, else <= half the subnormal step 2^-25
    err = np.abs(P["dense"].astype(np.float64) - full)
    assert (err <= np.maximum(2.0 ** -11 * np.abs(full), 2.0 ** -25)).all() and err.max() > 0
    # a store written before the field: dense.npy float32, no "dense_vectors"; read as it is, not encoded again
    meta["files"]["dense.npy"] = store.write_npy(str(st / "dense.npy"), full.shape, np.float32, [full])
    del meta["dense_vectors"]
    (st / "meta.json").write_text(json.dumps(meta))
    old = store.open_store(str(st), store.store_meta(packed.model_key(m), TEXTS, 64, False))
    assert old["dense"].dtype == np.float32 and np.array_equal(old["dense"], full.astype(np.float32))
    same_store({k: v for k, v in old.items() if k != "dense"}, {k: v for k, v in P.items() if k != "dense"})
    meta["dense_vectors"] = "float16"  # a record that does not match the file: named
    (st / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"st/dense\.npy: field 'shape': expected \(23, \d+\) float16 \(meta\.json\), "
                                         r"got \(23, \d+\) float32"):
        store.open_store(str(st))


def test_ckpt_key_covers_exactly_what_the_encodings_depend_on(tmp_path):
    ck = tmp_path / "ck"
    tiny_m3().save_pretrained(str(ck))
    key = packed.ckpt_key(str(ck))
    for name, text in (("README.md", "# notes"), ("notes.txt", "x"), ("config.yaml", "lr: 1e-5\n"),
                       ("train_state.json", "{}"), ("log.jsonl", "{}\n"), ("config.yaml", "lr: 2e-5\n"),
                       ("modules.json", "[]"), ("m3.json", '{ "pooling" : "cls" }')):
        (ck / name).write_text(text)  # what the encodings do not depend on; m3.json: the same pooling
        assert packed.ckpt_key(str(ck)) == key, name
    (ck / "train_state.pt").write_bytes(os.urandom(100))
    assert packed.ckpt_key(str(ck)) == key

    def flip_last_byte(f):
        b = bytearray(f.read_bytes())
        b[-1] ^= 1
        f.write_bytes(b)

    def other_head(f):
        state = torch.load(f, weights_only=True)
        torch.save({k: v + 1 for k, v in state.items()}, f)

    def other_tokenizer(f):
        t = json.loads(f.read_text())
        t["model"]["vocab"]["xyzzy"] = t["model"]["vocab"].pop("protein")
        f.write_text(json.dumps(t))
    changes = {"model.safetensors": flip_last_byte, "sparse_linear.pt": other_head, "colbert_linear.pt": other_head,
               "tokenizer.json": other_tokenizer, "special_tokens_map.json": lambda f: f.write_text("{}"),
               "config.json": lambda f: f.write_text(f.read_text().replace("1e-12", "1e-06")),
               "m3.json": lambda f: f.write_text('{"pooling": "mean"}')}
    keys = [key]
    for name, change in changes.items():
        other = tmp_path / name
        shutil.copytree(ck, other)
        before = (other / name).read_bytes() if (other / name).exists() else None
        change(other / name)
        assert (other / name).read_bytes() != before, name
        keys.append(packed.ckpt_key(str(other)))
        assert keys[-1] not in keys[:-1], name  # a new key for each change
