"""torchrun across nodes whose disks are their own: no shared data, cache or out folder.

    who()                              # "rank 1" on one node, "rank 1 (host h, node 1)" on several
    line, stop = flag_verdict(error)   # every rank's flag check, agreed through torchrun's store
    on_node_first(fn)                  # each node's local rank 0 runs fn while the others wait
    on_rank0_first(fn)                 # global rank 0 runs fn while the others wait
    same_data(key_fn, folder)          # every node's data content key equal to rank 0's, or stop
    share_files(folder, names)         # rank 0's files written on the nodes that lack them
    ck = load_shared(path)             # rank 0's file loaded on every rank (torch.load)

A failure inside any of these is raised on the rank that met it (rank 0: the error itself; any
other rank: RankError, its message prefixed with who()) and as Stopped on every other rank, so no
rank waits in a collective for a peer that has already failed. Files are shipped as raw bytes in
CHUNK-sized broadcasts (no pickled object of a file's size) and written with fileio.atomic_write.
Needs torch.distributed and torchrun's environment (RANK, LOCAL_RANK, GROUP_RANK, ...) only.
"""
import datetime
import hashlib
import io
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

from fileio import atomic_write, sha256_file

CHUNK = 1 << 24  # bytes per broadcast when a file is shipped (16 MiB)
FLAG_WAIT_S = 60  # how long a rank waits for the others' flag checks


class RankError(Exception):
    """An error this rank met itself; str(e) is one line, prefixed with who() where it helps."""


class Stopped(Exception):
    """Another rank failed and says why on its own console; str(e) names it and the gist."""


def where():
    """This process under torchrun: rank, local_rank, node (GROUP_RANK), nodes, host."""
    e = os.environ
    return {"rank": int(e.get("RANK", 0)), "local_rank": int(e.get("LOCAL_RANK", 0)),
            "node": int(e.get("GROUP_RANK", 0)), "nodes": int(e.get("GROUP_WORLD_SIZE", 1)),
            "host": socket.gethostname()}


def who():
    """The rank's name in a line: with its host and node when the job spans several nodes."""
    w = where()
    at = f" (host {w['host']}, node {w['node']})" if w["nodes"] > 1 else ""
    return f"rank {w['rank']}{at}"


def one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


def _active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(obj):
    """all_gather_object: every rank's obj, in rank order."""
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj)
    return got


# ----------------------------------------------------------------------------- errors heard

def flag_verdict(error):
    """Every rank's flag check (error: its one-line message or None), agreed before the process
    group starts, through the store torchrun's agent holds. Returns (line, stop): the line this
    rank prints (or None) and whether every rank stops. Rank 0 prints its own error, or a failed
    rank's on another node; any other rank prints its own, prefixed with who(), unless rank 0 says
    the same. Without torchrun's store (one process, ranks started by hand) rank 0 alone speaks."""
    w, world = where(), int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return (error if w["rank"] == 0 else None), error is not None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=datetime.timedelta(seconds=FLAG_WAIT_S))
    own = None if error is None else error if w["rank"] == 0 else f"{who()}: {error}"
    prefix = f"cdeit-flags/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(prefix + str(w["rank"]), json.dumps([error, who(), w["node"]]))
    keys = [prefix + str(r) for r in range(world)]
    try:
        store.wait(keys)
    except Exception:  # noqa: BLE001  (a rank that never came: the heartbeat names it later)
        return own, error is not None
    got = [json.loads(store.get(k)) for k in keys]
    failed = [g for g in got if g[0] is not None]
    if error is not None:
        return (None if w["rank"] != 0 and error == got[0][0] else own), True
    if w["rank"] == 0 and failed and failed[0][2] != w["node"]:
        return f"{failed[0][1]}: {failed[0][0]}", True
    return None, bool(failed)


def _together(fn, here):
    """fn() on the ranks where `here`; then every rank learns whether any failed (module doc)."""
    err = None
    if here:
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (any failure must reach the other ranks)
            err = e
    if not _active():
        if err is not None:
            raise err
        return
    got = _gather(None if err is None else [one_line(err), who()])
    if err is not None:
        if dist.get_rank() == 0:
            raise err
        raise RankError(f"{who()}: {one_line(err)}") from err
    failed = [g for g in got if g is not None]
    if failed:
        raise Stopped(f"{failed[0][1]} failed ({failed[0][0][:200]})")


def on_node_first(fn):
    """fn() on each node's local rank 0 (it prepares that node's folders) while the others wait."""
    _together(fn, where()["local_rank"] == 0)


def on_rank0_first(fn):
    """fn() on global rank 0 while the others wait."""
    _together(fn, where()["rank"] == 0)


# ----------------------------------------------------------------------------- the same data

def _differences(ours, theirs, limit=3):
    names = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    out = [f"{k} {theirs.get(k, 'missing')} there, {ours.get(k, 'missing')} on rank 0"
           for k in names[:limit]]
    return "; ".join(out) + (f"; and {len(names) - limit} more" if len(names) > limit else "")


def same_data(key_fn, folder, what="data folder"):
    """Each node's local rank 0 computes key_fn() (a JSON-able content key of its folder); a node
    whose key differs from rank 0's stops the job: rank 0 and that node's local rank 0 raise
    RankError naming the node (host, node rank), the folder and what differs; the rest Stopped."""
    if not _active():
        return
    w, key = where(), {}
    _together(lambda: key.update(k=key_fn()), w["local_rank"] == 0)
    got = _gather([key.get("k"), os.path.abspath(folder), w["host"], w["node"], w["rank"]])
    ref = got[0]
    bad = next((g for g in got if g[0] is not None and g[0] != ref[0]), None)
    if bad is None:
        return
    k, path, host, node, rank = bad
    msg = (f"node {node} (host {host}, rank {rank}): its {what} {path} differs from rank 0's "
           f"({ref[2]}, {ref[1]}): {_differences(ref[0], k)}")
    if w["rank"] in (0, rank):
        raise RankError(msg)
    raise Stopped(msg)


# ----------------------------------------------------------------------------- shipping bytes

def _comm_device():
    """Where collective buffers live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(data=None, src=0, chunk=None):
    """src's bytes on every rank, sent as uint8 tensors of at most `chunk` (CHUNK) bytes each."""
    dev, mine, chunk = _comm_device(), dist.get_rank() == src, chunk or CHUNK
    n = torch.tensor([len(data) if mine else 0], dtype=torch.int64, device=dev)
    dist.broadcast(n, src)
    n = int(n.item())
    src_buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if mine and n else None  # (n,)
    out = None if mine else bytearray(n)
    for off in range(0, n, chunk):
        m = min(chunk, n - off)
        if mine:
            buf = src_buf[off:off + m].to(dev)  # (m,) uint8
        else:
            buf = torch.empty(m, dtype=torch.uint8, device=dev)
        dist.broadcast(buf, src)
        if not mine:
            out[off:off + m] = buf.cpu().numpy().tobytes()
    return data if mine else bytes(out)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _digest(path):
    return sha256_file(path) if os.path.isfile(path) else None


def _ship(path, ranks, what):
    """Rank 0's path broadcast; written atomically by `ranks`. Returns the bytes they received."""
    data = {}
    on_rank0_first(lambda: data.update(b=_read(path)))
    blob = broadcast_bytes(data.get("b"))
    _together(lambda: atomic_write(path, blob, what), dist.get_rank() in ranks)
    return len(blob) * len(ranks)


def share_files(folder, names, what="file", log=print):
    """Rank 0's folder/<name> for each name on every node, in the order given (write a file that
    marks a folder complete last): a node whose copy is missing or differs (sha256) receives rank
    0's bytes and writes them atomically into its own folder; an identical copy is kept. Rank 0
    logs what it sent. Returns (bytes sent, seconds)."""
    if not _active():
        return 0, 0.0
    w, t0, sent = where(), time.time(), 0
    paths = [os.path.join(folder, n) for n in names]
    digests = {}
    _together(lambda: digests.update(d=[_digest(p) for p in paths]),
              w["rank"] == 0 or (w["local_rank"] == 0 and w["node"] != 0))
    got = _gather(digests.get("d"))
    ref = got[0]
    shipped = []
    for i, path in enumerate(paths):
        need = [r for r, d in enumerate(got) if d is not None and d[i] != ref[i]]
        if need:
            sent += _ship(path, need, what)
            shipped.append(names[i])
    seconds = time.time() - t0
    if sent and w["rank"] == 0:
        log(f"{what}: sent {', '.join(shipped)} ({sent / 1e6:.1f} MB) to the nodes lacking them "
            f"in {seconds:.1f}s")
    return sent, seconds


def load_shared(path):
    """torch.load(path, weights_only=True) of rank 0's file on every rank: rank 0 reads it and
    broadcasts the bytes, so the other nodes need no copy; a node that holds one must hold the
    same bytes (else RankError on rank 0 and on that node, naming it)."""
    if not _active():
        return torch.load(path, map_location="cpu", weights_only=True)
    w, data, name = where(), {}, os.path.basename(path)
    on_rank0_first(lambda: data.update(b=_read(path)))

    def key():  # rank 0: its file; another node: its own copy, if it has one
        if w["rank"] == 0:
            return {name: hashlib.sha256(data["b"]).hexdigest()[:16]}
        return {name: sha256_file(path)[:16]} if w["node"] != 0 and os.path.isfile(path) else None
    same_data(key, os.path.dirname(os.path.abspath(path)), what="out folder")
    blob = broadcast_bytes(data.get("b"))
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- launching

def slurm_launch(n_nodes, nproc_per_node, env=os.environ):
    """The command prefix that runs a script on every node of a Slurm allocation: one torchrun
    agent per node (srun), c10d rendezvous on this host (the batch host, the allocation's first
    node), the job's id as the rendezvous id and a port derived from it."""
    job = env.get("SLURM_JOB_ID", "0")
    port = 29400 + int(job) % 1000 if job.isdigit() else 29400
    return ["srun", f"--nodes={n_nodes}", "--ntasks-per-node=1", sys.executable, "-m",
            "torch.distributed.run", f"--nnodes={n_nodes}", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={socket.gethostname()}:{port}",
            f"--rdzv-id=cdeit-{job}"]
