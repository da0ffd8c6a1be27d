"""Download: fetch CIFAR-10, CIFAR-10-C and the DeiT-III teacher into a data folder.

One job: put the published files on disk, intact. Top to bottom:
  1. the file specs (name, URL, checksums, what to extract);
  2. one file: stream with a progress line, resume a .part with an HTTP Range request, check the
     checksum, rename atomically, extract a tar refusing members that would land outside;
  3. all files: try each, then one error that names every missing file, its URL, its checksum and
     where to put it by hand (offline machines);
  4. torchrun: only rank 0 downloads, the other ranks wait for it;
  5. the command line.

Reading the files is data.py's job.
Facts (URLs, checksums, layouts): ../shared/reference/data-formats.md.
Command line: `python download.py --data-dir ./data` (or `python data.py --data-dir ./data`).
Needs only the standard library (plus safetensors to check the teacher file, and torch only when
a torch.distributed process group is running).
"""
import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from typing import NamedTuple

import fileio


class DataError(RuntimeError):
    """A missing, malformed or undownloadable data file; the message names the file. Defined here
    (data.py imports it) so that both files raise the same type without an import cycle."""


# ----------------------------------------------------------------------------------------------
# 1. The published files

CIFAR_DIR, CIFARC_DIR = "cifar-10-batches-py", "CIFAR-10-C"
CIFAR_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch", "batches.meta"]
# All 19 files of the CIFAR-10-C release (15 benchmark corruptions + 4 extra).
CORRUPTION_FILES = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                    "elastic_transform", "pixelate", "jpeg_compression",
                    "speckle_noise", "gaussian_blur", "spatter", "saturate"]
TEACHER_FILE = "deit3_small_patch16_224.safetensors"


class Remote(NamedTuple):
    filename: str        # name on disk, and on a mirror: <base>/<filename>
    url: str             # canonical address
    md5: str | None
    sha256: str | None
    extract: bool        # a tar archive, extracted into data_dir and then deleted
    required: tuple      # paths under data_dir whose presence means "already have it"


FILES = {
    "cifar10": Remote("cifar-10-python.tar.gz",
                      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a", None, True,
                      tuple(f"{CIFAR_DIR}/{f}" for f in CIFAR_FILES)),
    "cifar10c": Remote("CIFAR-10-C.tar", "https://zenodo.org/record/2535967/files/CIFAR-10-C.tar",
                       "56bf5dcef84df0e2308c6dcbcbbd8499",
                       "c72763e101c723b7c507b96205f7e938912a5d587376173b825850cf3cb876a7", True,
                       tuple(f"{CIFARC_DIR}/{n}.npy" for n in CORRUPTION_FILES[:15] + ["labels"])),
    # timm/deit3_small_patch16_224.fb_in22k_ft_in1k model.safetensors; no published checksum:
    # we check that it parses as safetensors and record its sha256 next to it.
    "teacher": Remote(TEACHER_FILE,
                      ("https://huggingface.co/timm/deit3_small_patch16_224.fb_in22k_ft_in1k"
                       "/resolve/main/model.safetensors"), None, None, False, (TEACHER_FILE,)),
}


def teacher_path(data_dir):
    return os.path.join(data_dir, TEACHER_FILE)


# ----------------------------------------------------------------------------------------------
# 2. One file: stream, resume, verify, rename, extract

def _progress(name, done, total, t0, start, final=False):
    rate = (done - start) / max(time.time() - t0, 1e-6)   # this session's bytes / time
    eta = ""
    if total and rate > 0:
        left = int((total - done) / rate)
        eta = f"ETA {left // 60}:{left % 60:02d}"
    tot = f" / {total / 1e6:.1f} MB" if total else ""
    sys.stderr.write(f"\r  {name}: {done / 1e6:.1f} MB{tot}  {rate / 1e6:.2f} MB/s  {eta}   "
                     + ("\n" if final else ""))
    sys.stderr.flush()


def _fetch(url, part, name, quiet, timeout=60):
    """Stream url into part, appending with an HTTP Range request when part already has bytes."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "cdeit-kit"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:      # nothing left to send: the part is complete
            return
        raise
    with resp:
        if have and resp.status != 206:  # server ignored the Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        done, t0, last = have, time.time(), 0.0
        with open(part, "ab" if have else "wb") as f:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                if not quiet and time.time() - last > 0.5:
                    _progress(name, done, total, t0, have)
                    last = time.time()
            f.flush()
            os.fsync(f.fileno())
        if not quiet:
            _progress(name, done, total, t0, have, final=True)
        if total is not None and done < total:
            raise ConnectionError(f"connection closed after {done} of {total} bytes")


def _hashes(path):
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def _inside(path, root):
    return path == root or path.startswith(root + os.sep)


def _safe_extract(archive, data_dir):
    """Extract a tar into data_dir, refusing members that would land outside it."""
    root = os.path.realpath(data_dir)
    tmp = os.path.join(data_dir, f".extract-{os.path.basename(archive)}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                target = os.path.realpath(os.path.join(root, m.name))
                parts = m.name.replace("\\", "/").split("/")
                bad = os.path.isabs(m.name) or ".." in parts or not _inside(target, root)
                if m.issym() or m.islnk():
                    base = os.path.dirname(target) if m.issym() else root
                    link = os.path.realpath(os.path.join(base, m.linkname))
                    bad = bad or os.path.isabs(m.linkname) or not _inside(link, root)
                if bad or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    raise DataError(f"{archive}: refusing archive member {m.name!r} "
                                    f"(it would land outside {data_dir} or is not a plain file)")
            os.makedirs(tmp)
            try:
                tf.extractall(tmp, members, filter="data")  # the stdlib's own guard, a second line
            except TypeError:  # Python < 3.11.4: no filters
                tf.extractall(tmp, members)
        for dirpath, _, names in os.walk(tmp):  # move files into place one by one
            for n in names:
                src = os.path.join(dirpath, n)
                dst = os.path.join(data_dir, os.path.relpath(src, tmp))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
    except tarfile.TarError as e:
        raise DataError(f"{archive}: not a readable tar archive ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify(spec, file, downloaded):
    """Checksums (or, for the teacher, a safetensors parse); a bad download is deleted, a bad file
    the user put there is left alone for them to inspect."""
    md5, sha = _hashes(file)
    fix = "the downloaded file was removed" if downloaded else "delete or replace it"
    bad = None
    if spec.sha256 and sha != spec.sha256:
        bad = f"checksum mismatch (expected sha256 {spec.sha256}, got {sha})"
    elif spec.md5 and md5 != spec.md5:
        bad = f"checksum mismatch (expected md5 {spec.md5}, got {md5})"
    elif spec.filename.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(file, framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError("no tensors")
        except (SafetensorError, OSError, ValueError) as e:
            bad = f"not a valid safetensors file ({type(e).__name__}: {e})"
    if bad:
        if downloaded:
            os.remove(file)
        raise DataError(f"{spec.filename}: {bad}; {fix}")
    return sha


def _get(spec, data_dir, base_url, quiet, retries):
    url = _url(spec, base_url)
    path = os.path.join(data_dir, spec.filename)
    part = path + ".part"
    if os.path.exists(path):        # put there by hand (the offline error says where)
        sha = _verify(spec, path, downloaded=False)
    else:
        for attempt in range(retries + 1):
            try:
                _fetch(url, part, spec.filename, quiet)
                break
            except (OSError, http.client.HTTPException) as e:  # cut connections too; keep .part
                if isinstance(e, urllib.error.HTTPError) or attempt == retries:
                    raise
                time.sleep(min(2 ** attempt, 10) * 0.1)
        sha = _verify(spec, part, downloaded=True)
        os.replace(part, path)      # atomic: a file under its real name is always complete
    if spec.filename.endswith(".safetensors"):
        with open(path + ".sha256", "w") as f:   # no published checksum: record what we got
            f.write(f"{sha}  {spec.filename}\n")
    if spec.extract:
        _safe_extract(path, data_dir)
        os.remove(path)    # saves 3 GB for CIFAR-10-C; the extracted files are what we read


def _present(spec, data_dir):
    return all(os.path.exists(os.path.join(data_dir, r)) for r in spec.required)


# ----------------------------------------------------------------------------------------------
# 3. All files, and the offline error

def _url(spec, base_url):
    return f"{base_url.rstrip('/')}/{spec.filename}" if base_url else spec.url


def _download_all(data_dir, specs, base_url, quiet, retries, tidy=True):
    created = not os.path.isdir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    failed = []
    for spec in specs:
        if _present(spec, data_dir):
            continue
        try:
            _get(spec, data_dir, base_url, quiet, retries)
        except (DataError, OSError, http.client.HTTPException, ValueError) as e:
            failed.append((spec, e))
    if failed:
        if tidy and created and not os.listdir(data_dir):  # nothing fetched: no empty folder left
            os.rmdir(data_dir)
        raise DataError(_missing_message(data_dir, failed, base_url))


def _missing_message(data_dir, failed, base_url):
    """First line: what failed and what to do, short enough to stand alone; then each file once:
    the error we got, its URL, its checksum and where to put it by hand."""
    where = os.path.abspath(data_dir)
    files = f"{len(failed)} file{'' if len(failed) == 1 else 's'}"
    first = (f"could not fetch {files} into {where} (offline? put them there by hand, or use "
             f"--mirror URL / CDEIT_MIRROR):")
    lines = [first]
    for spec, e in failed:
        ck = f"md5 {spec.md5}" if spec.md5 else "none published (must parse as safetensors)"
        ck += f", sha256 {spec.sha256}" if spec.sha256 else ""
        then = " (extracted on the next run)" if spec.extract else ""
        lines += [f"  - {spec.filename}: {' '.join(str(e).split())}",
                  f"      url:       {_url(spec, base_url)}",
                  f"      checksum:  {ck}",
                  f"      put it at: {os.path.join(where, spec.filename)}{then}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 4. The entry point: every rank calls it, only rank 0 downloads

def download(data_dir, base_url=None, teacher=True, quiet=False, files=None, retries=3, poll_s=2.0,
             node_local=False):
    """Fetch into data_dir whatever is missing: CIFAR-10 and CIFAR-10-C (extracted, archives then
    deleted) and, with teacher=True, the DeiT-III weights as deit3_small_patch16_224.safetensors.
    base_url (or env CDEIT_MIRROR) points at a mirror holding the files under those names,
    <base>/<filename>. A .part file is resumed with an HTTP Range request; a file is renamed into
    place only after its checksum passed. Under torchrun only rank 0 downloads: with a process
    group the others wait at a broadcast, without one they poll until the files are in place
    (rank 0 leaves a marker on failure). node_local=True: this process fetches whatever its rank
    (train.py calls it on each node's local rank 0 while that node's other ranks wait)."""
    base_url = base_url or os.environ.get("CDEIT_MIRROR") or None
    if files is None:
        files = [FILES["cifar10"], FILES["cifar10c"]] + ([FILES["teacher"]] if teacher else [])
    specs = list(files)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or node_local:
        return _download_all(data_dir, specs, base_url, quiet, retries)
    dist = sys.modules.get("torch.distributed")   # a process group implies torch is imported
    if dist is not None and dist.is_available() and dist.is_initialized():
        msg = [None]
        if rank == 0:
            try:
                _download_all(data_dir, specs, base_url, quiet, retries)
            except DataError as e:
                msg = [str(e)]
        dist.broadcast_object_list(msg, src=0)
        if msg[0]:
            raise DataError(msg[0])
        return
    marker = os.path.join(data_dir, ".download-failed")
    if rank == 0:
        if os.path.exists(marker):
            os.remove(marker)
        try:
            # tidy=False: the failure marker goes into data_dir
            return _download_all(data_dir, specs, base_url, quiet, retries, tidy=False)
        except DataError as e:
            with contextlib.suppress(fileio.WriteError):  # atomic: never read half-written
                fileio.atomic_write(marker, str(e), "download error note")
            raise
    start = time.time()
    while not all(_present(s, data_dir) for s in specs):
        if os.path.exists(marker) and os.path.getmtime(marker) >= start - 2:
            with open(marker) as f:
                first, _, rest = f.read().partition("\n")
            raise DataError(f"rank 0 failed to download: {first}"
                            + (f"\n{rest}" if rest else ""))
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------
# 5. Command line

def parser(description="Fetch CIFAR-10, CIFAR-10-C and the DeiT-III teacher into --data-dir."):
    import argparse
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data-dir", default="./data")
    ap.add_argument("--mirror", default=None,
                    help="base URL holding the files as <base>/<filename> (env CDEIT_MIRROR)")
    ap.add_argument("--no-teacher", action="store_true", help="skip the teacher weights")
    ap.add_argument("--quiet", action="store_true")
    return ap


def run(args):
    """Download what args asks for; a DataError becomes its message on stderr and exit status 1."""
    try:
        download(args.data_dir, args.mirror, teacher=not args.no_teacher, quiet=args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"all files present in {args.data_dir}")


def main(argv=None):
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
