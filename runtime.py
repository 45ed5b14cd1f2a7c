"""What every command shares (train.py, eval.py, mine.py): rank-0 printing and stopping, reading a config, atomic
writes, output paths that never replace an input or another run's file, and the process group's start and end.

The end of a multi-process run is explicit and ordered, so a finished run always exits: the caller first closes what
uses the group (the batch stream's worker processes, the log), end_distributed() then frees the DDP wrappers (their
reducers hold the group), waits for every rank and destroys the group. A rank that fails does not wait for the others
(they may be inside a collective that will never complete): run_command reports its error and leaves at once, and
torchrun stops the other ranks.
"""
import contextlib
import ctypes
import gc
import json
import os
import sys
import tempfile
import traceback


def print0(*args):
    """print on rank 0 only (RANK, set by torchrun), flushed: a multi-process run says each thing once."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def stop(msg):
    """Exit with msg, printed once (by rank 0) however many processes torchrun started."""
    raise SystemExit(msg if int(os.environ.get("RANK", "0")) == 0 else 1)


def write_atomic(path, lines):
    """Write the strings lines to path through a temporary file (replacing): a crash or a full disk never leaves half a
    file, and an existing file at path stays as it was until the new one is complete."""
    with replacing(path, tag=str(os.getpid())) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)


@contextlib.contextmanager
def replacing(path, tag=""):
    """A temporary name next to path to write (path's extension kept: np.save/np.savez add theirs otherwise), renamed
    to path when the block ends; tag: for writers without the store's lock. Any error removes the temporary file;
    an OSError (a full disk: ENOSPC, or numpy's "N requested and M written") becomes one naming path."""
    folder, name = os.path.split(path)
    stem, dot, ext = name.partition(".")
    tmp = os.path.join(folder, f"{stem}.tmp{tag}{dot}{ext}")  # shards/00001.tmp.tokens.npy, dense.tmp.npy
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        msg = (f"{path}: not written ({e}): disk full or not writable; free space (or fix the permissions) and run "
               "again: what was finished is kept")
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def read_json(path):
    """The JSON object in path, or None if missing, unreadable, being written or not an object."""
    try:
        with open(path) as f:
            x = json.load(f)
        return x if isinstance(x, dict) else None
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# configs: defaults <- YAML diffs <- --key=value

def parse_config(cls, argv, problems, hint=lambda key: ""):
    """A flat config dataclass from its defaults <- YAML files (flat diffs) <- --key=value overrides, values coerced to
    the field's type; problems(cfg) -> [(key, why)] checks the values; hint(key) adds to the unknown-key message. Every
    error stops naming the key and where it was set (the file, the command line or the default)."""
    import dataclasses

    import yaml
    cfg, types, where = cls(), {f.name: f.type for f in dataclasses.fields(cls)}, {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            if not eq:
                stop(f"config: {arg!r} must be --key=value")
            try:  # text keys as typed ("query: " is no YAML mapping); unknown keys are refused below
                items, src = {key: val if types.get(key, str) is str else yaml.safe_load(val)}, "command line"
            except yaml.YAMLError as e:
                stop(f"config: {arg!r}: not a valid value: {e}")
        else:
            if not os.path.isfile(arg):
                stop(f"config: no such file {arg!r}")
            try:
                items, src = yaml.safe_load(open(arg)) or {}, arg
            except yaml.YAMLError as e:
                stop(f"config: {arg}: not valid YAML: {e}")
            if not isinstance(items, dict):
                stop(f"config: {arg}: expected key: value lines, got {type(items).__name__}")
        for key, val in items.items():
            if key not in types:
                stop(f"config: unknown key {key!r} ({src}){hint(key)}")
            setattr(cfg, key, _coerce(key, val, types[key], src))
            where[key] = src
    for key, problem in problems(cfg):  # key: a field, or a dotted path into a mapping field (eval_sets.dev.data)
        top, *path = key.split(".")
        value = getattr(cfg, top)
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        stop(f"config: {key}={value!r} ({where.get(top, 'default')}): {problem}")
    return cfg


def _coerce(key, val, typ, where):
    """Coerce a YAML/CLI value to the field's type: "1e-5" -> float, "48,32" -> [48, 32]."""
    typ = {"bool": bool, "int": int, "float": float, "str": str, "list": list, "dict": dict}.get(
        getattr(typ, "__name__", typ), typ)
    try:
        if typ is dict and val is not None and not isinstance(val, dict):
            raise ValueError("expected a mapping, e.g. {dev: {data: DIR, split: dev}}")
        if typ is dict:  # a YAML mapping (eval_sets), checked by the config's problems
            return val or {}
        if typ is list:
            items = val.split(",") if isinstance(val, str) else val if isinstance(val, list) else [val]
            return [int(x) for x in items]
        if typ is bool and not isinstance(val, bool):
            raise ValueError("expected true/false")
        if typ is str and isinstance(val, (dict, list)):  # YAML read `query_prefix: query: x` as a mapping
            raise ValueError("expected text: quote it in YAML")
        if typ is int and isinstance(val, float) and not val.is_integer():
            raise ValueError("expected an integer")
        return typ(val) if val is not None or typ is str else ""
    except (TypeError, ValueError) as e:
        stop(f"config: {key}={val!r} ({where}) is not a {typ.__name__}: {e}")


# ----------------------------------------------------------------------------------------------------------------
# outputs: never an input, never another run's file unless asked

def same_file(a, b):
    """a and b are one file (the same inode: a symlink or hard link counts), both existing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def output_error(path, option, inputs=(), folders=(), overwrite=False):
    """Why the output file `path` (named by `option`, e.g. --out) must not be written, or None: it is one of the input
    files (by inode), lies in a data folder being read, exists and overwrite is off, is a folder, or its folder cannot
    be written. Checked before any work starts."""
    real = os.path.realpath(path)
    for f in inputs:
        if f and same_file(path, f):
            return f"{option} {path} is the input {f}: the output would replace what is being read"
    for d in folders:
        if d and os.path.isdir(d) and (real + os.sep).startswith(os.path.realpath(d) + os.sep):
            return f"{option} {path} lies in the data folder {d} being read: write it elsewhere"
    if os.path.isdir(path):
        return f"{option} {path} is a folder, not a file"
    if os.path.exists(path) and not overwrite:
        return f"{option} {path} exists: pass --overwrite to replace it, or choose another file"
    return writable_error(os.path.dirname(os.path.abspath(path)), f"{option} {path}")


def writable_error(folder, what):
    """Why nothing can be written in folder (or the first of its ancestors that exists: the rest would be created),
    naming what (the option and its value), or None. Tried with a real file: root passes every permission check, even
    on a read-only file system."""
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):  # ends at / at the latest
        parent = os.path.dirname(parent)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".m3-write-check-"):
            return None
    except OSError as e:
        return f"{what}: cannot write in {parent} ({e.strerror or e}: read-only, not a folder, or no permission)"


# ----------------------------------------------------------------------------------------------------------------
# the process group

def trim_heap():
    """Give the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing). An encode pass frees GBs of
    per-passage arrays of a few hundred KB each, which glibc's sliding mmap threshold places in the heap; without this
    they stay resident beside what the evaluation allocates next."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def init_distributed(timeout_s, backend=None):
    """(ddp, rank, world, device): a process group when launched by torchrun (NCCL on GPUs, gloo on CPU, or
    `backend`), waiting timeout_s in every collective; one process otherwise."""
    import datetime

    import torch
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return False, 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def end_distributed():
    """The end of a successful multi-process run: the DDP wrappers the caller dropped are freed now (reference cycles:
    gc), while the group is still registered, so the last reference to it is torch's own, whose destructor releases the
    GIL (a reducer freed at interpreter exit destroys gloo's group holding the GIL, while a gloo worker thread waits for
    the GIL to free a finished collective's tensors: a deadlock); then every rank waits for the others and the group is
    destroyed."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def run_command(main, argv):
    """main(argv) as a command. A rank of a multi-process run whose main raises reports the error as Python would and
    exits at once (os._exit): the collectives other ranks wait in cannot complete, and destroying its group could wait
    for them; torchrun sees the exit and stops the other ranks."""
    try:
        return main(argv)
    except BaseException as e:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else 1
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        else:
            traceback.print_exc()
            code = 130 if isinstance(e, KeyboardInterrupt) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
