"""download.py against a local HTTP server on 127.0.0.1 (nothing else is contacted): mirrors,
resume with Range after a cut connection, checksums, safe extraction, tampered pickles, torchrun
ranks, the offline error."""
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading

import pytest
import torch

import corruptions
import data
import download


class _Server:
    """Serves self.files {name: bytes}; honours Range; can cut the first response of a file."""

    def __init__(self):
        self.files, self.cut, self.log = {}, set(), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.log.append((name, self.headers.get("Range")))
                body = outer.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                start, rng = 0, self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in outer.cut:   # send half, then drop the connection
                    outer.cut.discard(name)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _tar(members, gz=False):
    """members: {name: bytes} or (name, TarInfo-tweak) -> archive bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(body, tuple):   # (type, linkname)
                info.type, info.linkname = body
                tf.addfile(info)
            else:
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _spec(name, body, required, extract=True, md5=None):
    return download.Remote(name, f"https://example.invalid/{name}",
                           md5 or hashlib.md5(body).hexdigest(), hashlib.sha256(body).hexdigest(),
                           extract, tuple(required))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Small synthetic CIFAR-10 / CIFAR-10-C files, packed as the published archives."""
    root = tmp_path_factory.mktemp("src")
    data.write_synthetic(str(root), train_per_class=20, test_per_class=4)
    out = {}
    for folder, arch, gz in (("cifar-10-batches-py", "cifar-10-python.tar.gz", True),
                             ("CIFAR-10-C", "CIFAR-10-C.tar", False)):
        files = {f"{folder}/{n}": (root / folder / n).read_bytes()
                 for n in sorted(os.listdir(root / folder))}
        out[arch] = (_tar(files, gz), list(files))
    from safetensors.torch import save_file
    save_file({"cls_token": torch.zeros(1, 1, 4)}, str(root / "t.safetensors"))
    out["teacher"] = (root / "t.safetensors").read_bytes()
    return out


def _specs(synth):
    (c10, c10_files), (c10c, c10c_files) = synth["cifar-10-python.tar.gz"], synth["CIFAR-10-C.tar"]
    return [_spec("cifar-10-python.tar.gz", c10, c10_files),
            _spec("CIFAR-10-C.tar", c10c, c10c_files),
            download.Remote(download.TEACHER_FILE, "https://example.invalid/model.safetensors",
                            None, None, False, (download.TEACHER_FILE,))]


def test_download_extract_read(server, synth, tmp_path, capsys):
    server.files = {"cifar-10-python.tar.gz": synth["cifar-10-python.tar.gz"][0],
                    "CIFAR-10-C.tar": synth["CIFAR-10-C.tar"][0],
                    download.TEACHER_FILE: synth["teacher"]}
    d = str(tmp_path / "data")
    download.download(d, server.url, files=_specs(synth))
    err = capsys.readouterr().err   # the progress line: bytes, rate, ETA
    assert "CIFAR-10-C.tar:" in err and "MB/s" in err and "ETA" in err
    assert sorted(os.listdir(d)) == ["CIFAR-10-C", "cifar-10-batches-py", download.TEACHER_FILE,
                                     download.TEACHER_FILE + ".sha256"]
    assert data.read_cifar10(d)["test_images"].shape == (40, 32, 32, 3)
    assert data.read_cifar10c(d, "frost")[0].shape == (200, 32, 32, 3)
    sha = hashlib.sha256(synth["teacher"]).hexdigest()
    with open(os.path.join(d, download.TEACHER_FILE + ".sha256")) as f:
        assert f.read().split()[0] == sha
    assert download.teacher_path(d) == os.path.join(d, download.TEACHER_FILE)
    n = len(server.log)
    download.download(d, server.url, files=_specs(synth), quiet=True)   # all present: no request
    assert len(server.log) == n


def test_mirror_from_environment(server, synth, tmp_path, monkeypatch):
    server.files = {"CIFAR-10-C.tar": synth["CIFAR-10-C.tar"][0]}
    monkeypatch.setenv("CDEIT_MIRROR", server.url)
    download.download(str(tmp_path), files=_specs(synth)[1:2], quiet=True)
    assert server.log == [("CIFAR-10-C.tar", None)]


def test_resume_after_cut_connection(server, synth, tmp_path):
    body = synth["CIFAR-10-C.tar"][0]
    server.files = {"CIFAR-10-C.tar": body}
    spec = _specs(synth)[1:2]
    server.cut = {"CIFAR-10-C.tar"}
    # no retries: it fails and keeps the .part
    with pytest.raises(download.DataError, match="CIFAR-10-C.tar"):
        download.download(str(tmp_path), server.url, files=spec, quiet=True, retries=0)
    part = tmp_path / "CIFAR-10-C.tar.part"
    assert part.stat().st_size == len(body) // 2
    download.download(str(tmp_path), server.url, files=spec, quiet=True)  # next run resumes
    assert server.log[-1] == ("CIFAR-10-C.tar", f"bytes={len(body) // 2}-")
    assert os.path.exists(tmp_path / "CIFAR-10-C" / "labels.npy")
    assert not part.exists() and not (tmp_path / "CIFAR-10-C.tar").exists()
    # within one call: the cut is retried with a Range request
    server.cut, server.log = {"cifar-10-python.tar.gz"}, []
    server.files["cifar-10-python.tar.gz"] = synth["cifar-10-python.tar.gz"][0]
    download.download(str(tmp_path), server.url, files=_specs(synth)[:1], quiet=True)
    half = len(synth["cifar-10-python.tar.gz"][0]) // 2
    assert [r for _, r in server.log] == [None, f"bytes={half}-"]
    assert data.read_cifar10(str(tmp_path))["train_labels"].shape == (200,)


def test_checksum_mismatch_leaves_nothing(server, synth, tmp_path):
    body = synth["CIFAR-10-C.tar"][0]
    server.files = {"CIFAR-10-C.tar": body + b"tampered"}
    with pytest.raises(download.DataError) as e:
        download.download(str(tmp_path), server.url, files=_specs(synth)[1:2], quiet=True)
    msg = str(e.value)
    assert "CIFAR-10-C.tar: checksum mismatch" in msg and "removed" in msg
    assert hashlib.sha256(body).hexdigest() in msg
    assert os.listdir(tmp_path) == []
    # a file put there by hand is checked too, and left for the user
    (tmp_path / "CIFAR-10-C.tar").write_bytes(b"by hand")
    with pytest.raises(download.DataError,
                       match="CIFAR-10-C.tar: checksum mismatch.*delete or replace it"):
        download.download(str(tmp_path), server.url, files=_specs(synth)[1:2], quiet=True)
    assert os.listdir(tmp_path) == ["CIFAR-10-C.tar"]
    (tmp_path / "CIFAR-10-C.tar").write_bytes(body)    # the right file by hand: used, no request
    n = len(server.log)
    download.download(str(tmp_path), server.url, files=_specs(synth)[1:2], quiet=True)
    assert len(server.log) == n and os.path.exists(tmp_path / "CIFAR-10-C" / "labels.npy")


def test_bad_teacher_file_removed(server, synth, tmp_path):
    server.files = {download.TEACHER_FILE: b"<html>not found</html>"}
    with pytest.raises(download.DataError, match="not a valid safetensors file"):
        download.download(str(tmp_path), server.url, files=_specs(synth)[2:], quiet=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("member", [
    {"../evil.txt": b"x"},
    {"/tmp/evil-abs.txt": b"x"},
    {"cifar-10-batches-py/link": (tarfile.SYMTYPE, "../../evil.txt")},
    {"cifar-10-batches-py/hard": (tarfile.LNKTYPE, "../evil.txt")},
])
def test_archive_members_outside_refused(server, tmp_path, member):
    body = _tar({"cifar-10-batches-py/ok.txt": b"fine", **member})
    server.files = {"evil.tar": body}
    d = tmp_path / "data"
    with pytest.raises(download.DataError, match="refusing archive member"):
        spec = _spec("evil.tar", body, ["cifar-10-batches-py/ok.txt"])
        download.download(str(d), server.url, files=[spec], quiet=True)
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/evil-abs.txt")
    assert not (d / "cifar-10-batches-py").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_tampered_pickle_refused(server, synth, tmp_path):
    _Evil.marker = tmp_path / "pwned"
    batch = pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=4)
    files = {f"cifar-10-batches-py/{n}": b"" for n in download.CIFAR_FILES}
    body = _tar({**files, "cifar-10-batches-py/data_batch_1": batch}, gz=True)
    server.files = {"cifar-10-python.tar.gz": body}
    d = tmp_path / "data"
    spec = _spec("cifar-10-python.tar.gz", body, list(files))
    download.download(str(d), server.url, files=[spec], quiet=True)
    with pytest.raises(download.DataError) as e:
        data.read_cifar10(str(d))
    assert "refusing to unpickle posix.system" in str(e.value) and "data_batch_1" in str(e.value)
    assert not _Evil.marker.exists()


def test_offline_error_lists_every_file(tmp_path, capsys):
    """A short first line that stands alone (count, folder, what to do), then each file once: its
    error, URL, checksum and where to put it by hand."""
    with pytest.raises(download.DataError) as e:   # nothing listens on port 9 of 127.0.0.1
        download.download(str(tmp_path), "http://127.0.0.1:9", quiet=True, retries=0)
    lines = str(e.value).split("\n")
    assert lines[0] == (f"could not fetch 3 files into {tmp_path} (offline? put them there by "
                        "hand, or use --mirror URL / CDEIT_MIRROR):")
    assert len(lines) == 1 + 4 * 3
    for k, spec in enumerate(download.FILES.values()):
        block = lines[1 + 4 * k:5 + 4 * k]
        assert block[0].startswith(f"  - {spec.filename}: <urlopen error "), block
        assert sum(ln.startswith(f"  - {spec.filename}") for ln in lines) == 1
        assert block[1].split() == ["url:", f"http://127.0.0.1:9/{spec.filename}"]
        assert block[2].split()[:2] == ["checksum:", "md5" if spec.md5 else "none"]
        assert block[3].split()[:3] == ["put", "it", "at:"]
        assert block[3].split()[3] == os.path.join(str(tmp_path), spec.filename)
    msg = str(e.value)
    assert download.FILES["cifar10"].md5 in msg and download.FILES["cifar10c"].sha256 in msg
    # both command lines: one error, exit status 1
    for main in (download.main, data.main):
        with pytest.raises(SystemExit) as ex:
            main(["--data-dir", str(tmp_path), "--mirror", "http://127.0.0.1:9", "--quiet",
                  "--no-teacher"])
        assert ex.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: could not fetch 2 files into ") and "Traceback" not in err


def test_corruption_files_list_the_benchmark_first():
    # download.py needs only the standard library, so it spells the names corruptions.py defines
    assert download.CORRUPTION_FILES[:15] == corruptions.CORRUPTIONS


def test_readers_raise_the_downloaders_error():
    with pytest.raises(download.DataError):   # callers catch one type for fetching and reading
        data.read_cifar10("/nonexistent-dir")


def test_synthetic_command_line(tmp_path, capsys):
    data.main(["--data-dir", str(tmp_path), "--synthetic"])
    assert "synthetic" in capsys.readouterr().out
    assert data.read_cifar10(str(tmp_path))["train_labels"].shape == (2500,)


def test_torchrun_ranks_wait_for_rank0(server, synth, tmp_path, monkeypatch):
    spec = _specs(synth)[1:2]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    server.files = {"CIFAR-10-C.tar": synth["CIFAR-10-C.tar"][0]}
    # rank 1 never downloads: it waits until rank 0 (here: a thread) has put the files in place
    def rank0():
        download._download_all(str(tmp_path), spec, server.url, True, 0)
    t = threading.Timer(0.3, rank0)
    t.start()
    download.download(str(tmp_path), server.url, files=spec, quiet=True, poll_s=0.05)
    t.join()
    assert [n for n, _ in server.log] == ["CIFAR-10-C.tar"]
    # rank 0 fails -> it leaves a marker and the waiting rank raises too
    d = tmp_path / "other"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(download.DataError):
        download.download(str(d), "http://127.0.0.1:9", files=spec, quiet=True, retries=0)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(download.DataError, match="rank 0 failed"):
        download.download(str(d), "http://127.0.0.1:9", files=spec, quiet=True, poll_s=0.05)
