"""The gpucrypt:: fsspec filesystem (gpucrypt.fs): pandas and pyarrow read encrypted Parquet in
place over local, in-memory and HTTP targets; reads decrypt only the segments they touch;
tampering and truncation raise with the file's name; writes are published whole; the
filesystem pickles without a secret."""
from __future__ import annotations

import http.server
import os
import pickle
import posixpath
import re
import threading

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

import gpucrypt.fs as gfs
from gpucrypt import stream
from gpucrypt.keys import Identity, KeyManagementError, Keyset, NoMatchingRecipient, WrappingKey
from gpucrypt.keys.providers import EnvKeyProvider

from _signals import dies_of, python_child

SEGMENT = 4096  # the smallest segment: a small Parquet file spans many of them
ROWS, ROW_GROUP = 16000, 2000


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    keyset = Keyset.generate()
    keyset.save(folder / "keyset.json")
    identity = Identity.generate()
    identity.save(folder / "me.identity")
    identity.recipient.save(folder / "me.recipient")
    return {"keyset": str(folder / "keyset.json"), "kek": keyset.primary.secret_bytes(),
            "identity": str(folder / "me.identity"), "recipient": str(folder / "me.recipient")}


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(17)
    return pd.DataFrame({"id": np.arange(ROWS, dtype=np.int64),
                         "score": rng.random(ROWS),
                         "label": [f"row-{i}" for i in range(ROWS)]})


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory, keys, frame):
    """An encrypted Parquet file of 8 row groups in 4 KiB segments, written through the
    filesystem with pyarrow; its path and its stored bytes."""
    path = str(tmp_path_factory.mktemp("data") / "train.parquet.gc")
    fs = fsspec.filesystem("gpucrypt", target_protocol="file", keyset=keys["keyset"],
                           segment_size=SEGMENT)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, filesystem=fs,
                   row_group_size=ROW_GROUP)
    with open(path, "rb") as f:
        return path, f.read()


def local_fs(keys, **options):
    return fsspec.filesystem("gpucrypt", target_protocol="file", keyset=keys["keyset"], **options)


def test_pandas_and_pyarrow_read_encrypted_parquet_through_the_filesystem(keys, frame, encrypted):
    path, stored = encrypted
    assert stored.startswith(b"GPUCRYPT") and b"PAR1" not in stored  # ciphertext at rest
    chained = pd.read_parquet(f"gpucrypt::file://{path}",
                              storage_options={"gpucrypt": {"keyset": keys["keyset"]}})
    pd.testing.assert_frame_equal(chained, frame)
    table = pq.read_table(path, filesystem=local_fs(keys))
    assert table.equals(pa.Table.from_pandas(frame, preserve_index=False))
    info = local_fs(keys).info(path)
    assert info["encrypted"] and info["stored_size"] == len(stored)
    assert info["size"] == stream.open(path, _keyset_data_key(keys, path)).size


def _keyset_data_key(keys, path):
    from gpucrypt.keys import open_envelope

    return open_envelope(stream.read_header(path).envelope, Keyset.load(keys["keyset"]))


def _segments_of(byte_ranges, size):
    return {i for start, end in byte_ranges for i in range(start // SEGMENT, (end - 1) // SEGMENT + 1)
            if start < end <= size}


def test_column_and_row_group_selection_decrypt_only_their_segments(keys, frame, encrypted):
    path, _ = encrypted
    fs = local_fs(keys)
    size = fs.size(path)
    total = -(-size // SEGMENT)
    gfs.reset_stats()
    whole = pq.ParquetFile(path, filesystem=fs).read()
    everything = gfs.stats()["segments_decrypted"]
    assert whole.num_rows == ROWS and everything >= total

    gfs.reset_stats()
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        part = pf.read_row_group(3, columns=["id"])
    counted = gfs.stats()
    assert part.column("id").to_pylist() == list(range(3 * ROW_GROUP, 4 * ROW_GROUP))
    chunk = meta.row_group(3).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    # what a reader must touch: that column chunk and the footer pyarrow reads (up to its
    # last 64 KiB); the final segment once more, verified when the file opens and evicted
    # from the one-segment cache before the footer read reaches it again
    needed = _segments_of([(start, start + chunk.total_compressed_size),
                           (max(0, size - (64 << 10)), size)], size)
    assert counted["files_opened"] == 1
    assert counted["segments_decrypted"] <= len(needed) + 1
    assert counted["segments_decrypted"] < total / 2  # 1 of 8 row groups, 1 of 3 columns


def test_cat_ranges_and_seek_decrypt_only_what_they_touch(keys, encrypted):
    path, _ = encrypted
    fs = local_fs(keys)
    with fs.open(path, "rb") as f:
        plain = f.read()
    gfs.reset_stats()
    got = fs.cat_ranges([path] * 3, [0, 5 * SEGMENT + 10, -8], [4, 5 * SEGMENT + 20, None])
    assert got == [plain[:4], plain[5 * SEGMENT + 10:5 * SEGMENT + 20], plain[-8:]]
    # the final segment (verified on opening, and holding the last 8 bytes), segments 0 and 5
    assert gfs.stats() == {"segments_decrypted": 3, "files_opened": 1}
    assert fs.cat_file(path, 7 * SEGMENT - 3, 7 * SEGMENT + 3) == plain[7 * SEGMENT - 3:7 * SEGMENT + 3]


def test_memory_target_write_and_read_back(keys, frame):
    fs = fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=keys["keyset"],
                           segment_size=SEGMENT)
    frame.to_parquet("/gc17/out/frame.parquet.gc", filesystem=fs)
    memory = fsspec.filesystem("memory")
    stored = memory.cat_file("/gc17/out/frame.parquet.gc")
    assert stored.startswith(b"GPUCRYPT")
    assert memory.ls("/gc17/out", detail=False) == ["/gc17/out/frame.parquet.gc"]  # no temp left
    pd.testing.assert_frame_equal(pd.read_parquet("/gc17/out/frame.parquet.gc", filesystem=fs), frame)
    chained = pd.read_parquet("gpucrypt::memory://gc17/out/frame.parquet.gc",
                              storage_options={"gpucrypt": {"keyset": keys["keyset"]}})
    pd.testing.assert_frame_equal(chained, frame)
    [entry] = fs.ls("/gc17/out")
    assert entry["size"] == len(fs.cat_file("/gc17/out/frame.parquet.gc")) < entry["stored_size"]
    memory.rm("/gc17", recursive=True)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (path -> bytes) with HEAD and single Range requests, and
    records every range served."""

    protocol_version = "HTTP/1.1"  # keep-alive: one connection for the many range requests

    def log_message(self, *args):
        pass

    def _body(self):
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
        return data

    def do_HEAD(self):
        data = self._body()
        if data is not None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

    def do_GET(self):
        data = self._body()
        if data is None:
            return
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start, end = 0, len(data)
        if match:
            start = int(match.group(1))
            end = min(len(data), int(match.group(2)) + 1 if match.group(2) else len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.server.served.append((self.path, start, end))
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[start:end])


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    server.files, server.served = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_target_reads_ranges_on_the_loopback(keys, frame, encrypted, http_server):
    _, stored = encrypted
    http_server.files["/train.parquet.gc"] = stored
    url = f"http://127.0.0.1:{http_server.server_address[1]}/train.parquet.gc"
    whole = pd.read_parquet(f"gpucrypt::{url}",
                            storage_options={"gpucrypt": {"keyset": keys["keyset"]}})
    pd.testing.assert_frame_equal(whole, frame)

    http_server.served.clear()
    fs = fsspec.filesystem("gpucrypt", target_protocol="http", keyset=keys["keyset"],
                           target_options={"cache_type": "readahead", "block_size": 8192})
    with fs.open(url, "rb") as f:
        part = pq.ParquetFile(f).read_row_group(3, columns=["id"])
    assert part.column("id").to_pylist() == list(range(3 * ROW_GROUP, 4 * ROW_GROUP))
    fetched = sum(end - start for _, start, end in http_server.served)
    # ranges: the header, the footer (pyarrow reads up to 64 KiB of it) and one column chunk,
    # each with 8 KiB of read-ahead
    assert 0 < fetched < len(stored) / 2


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1:]


def test_tampered_segment_raises_with_the_file_name_and_releases_nothing(keys, encrypted, tmp_path):
    path, stored = encrypted
    header_length = stream.read_header(stored).header_length
    bad = tmp_path / "tampered.parquet.gc"
    bad.write_bytes(_flip(stored, header_length + 2 * (SEGMENT + 16) + 100))  # inside segment 2
    fs = local_fs(keys)
    with fs.open(str(bad), "rb") as f:  # header and final segment verify
        assert f.read(10) == fs.cat_file(path, 0, 10)  # segment 0 still reads
        f.seek(2 * SEGMENT + 50)
        with pytest.raises(stream.AuthenticationError, match=re.escape(str(bad))) as caught:
            f.read(10)
        assert caught.value.segment == 2
    with pytest.raises(stream.AuthenticationError, match=re.escape(str(bad))):
        fs.cat_ranges([str(bad)], [2 * SEGMENT], [2 * SEGMENT + 1])
    with pytest.raises(stream.AuthenticationError, match=re.escape(str(bad))):
        pd.read_parquet(str(bad), filesystem=fs)


def test_truncated_file_raises_with_the_file_name(keys, encrypted, tmp_path):
    _, stored = encrypted
    fs = local_fs(keys)
    whole_segments_cut = tmp_path / "short.parquet.gc"
    header_length = stream.read_header(stored).header_length
    whole_segments_cut.write_bytes(stored[:header_length + 10 * (SEGMENT + 16)])
    with pytest.raises(stream.TruncatedError, match=re.escape(str(whole_segments_cut))):
        fs.open(str(whole_segments_cut), "rb")  # segment 9 is not marked last
    inside_a_tag = tmp_path / "cut-tag.parquet.gc"
    inside_a_tag.write_bytes(stored[:header_length + 10 * (SEGMENT + 16) + 7])
    with pytest.raises(stream.TruncatedError, match=re.escape(str(inside_a_tag))):
        fs.cat_file(str(inside_a_tag))


def test_a_truncated_file_is_listed_and_refused_when_opened(keys, tmp_path):
    """Listing does not open files: a stream cut inside a tag is an entry with its stored
    size and ``truncated``, so exists, find, glob and du keep working; opening it raises."""
    fs = local_fs(keys, segment_size=SEGMENT)
    good, bad = str(tmp_path / "good.gc"), str(tmp_path / "bad.gc")
    fs.pipe_file(good, b"x" * 10000)
    fs.pipe_file(bad, b"y" * 10000)
    stored = (tmp_path / "bad.gc").read_bytes()[:-1810]  # ends inside the last tag
    (tmp_path / "bad.gc").write_bytes(stored)
    entry = fs.info(bad)
    assert entry["truncated"] and entry["encrypted"] and entry["size"] == len(stored)
    assert "truncated" not in fs.info(good) and fs.info(good)["size"] == 10000
    assert fs.exists(bad) and fs.isfile(bad)
    assert sorted(e["name"] for e in fs.ls(str(tmp_path))) == [bad, good]
    assert fs.find(str(tmp_path)) == fs.glob(f"{tmp_path}/*.gc") == [bad, good]
    assert fs.du(str(tmp_path)) == 10000 + len(stored)
    for read in (lambda: fs.open(bad, "rb"), lambda: fs.cat_file(bad)):
        with pytest.raises(stream.TruncatedError, match=re.escape(bad)):
            read()


def test_pickles_without_any_secret_and_reads_after_unpickling(keys, encrypted, monkeypatch):
    path, _ = encrypted
    fs = local_fs(keys)
    plain = fs.cat_file(path, 0, 100)  # keys resolved and a data key cached in this instance
    data_key = _keyset_data_key(keys, path)
    blob = pickle.dumps(fs)
    assert keys["kek"] not in blob and data_key not in blob
    assert keys["keyset"].encode() in blob  # the reference, resolved again where unpickled
    assert pickle.loads(blob).cat_file(path, 0, 100) == plain

    monkeypatch.setenv("GC17_KEK", keys["kek"].hex())
    provider_key = WrappingKey.from_provider(EnvKeyProvider(Keyset.load(keys["keyset"]).primary.id,
                                                            "GC17_KEK"),
                                             Keyset.load(keys["keyset"]).primary.id)
    by_provider = fsspec.filesystem("gpucrypt", target_protocol="file", identities=[provider_key],
                                    skip_instance_cache=True)
    blob = pickle.dumps(by_provider)
    assert keys["kek"] not in blob and keys["kek"].hex().encode() not in blob
    assert pickle.loads(blob).cat_file(path, 0, 100) == plain


def test_key_material_is_refused_as_a_reference(keys):
    for secret in (Keyset.load(keys["keyset"]), Identity.load(keys["identity"]), keys["kek"],
                   WrappingKey("k", keys["kek"])):
        with pytest.raises(TypeError, match="pickle"):
            fsspec.filesystem("gpucrypt", target_protocol="file", keyset=secret,
                              skip_instance_cache=True)


def test_recipient_writes_identity_reads_and_other_keys_are_refused(keys, tmp_path):
    path = str(tmp_path / "blob.gc")
    writer = fsspec.filesystem("gpucrypt", target_protocol="file", recipients=keys["recipient"])
    writer.pipe_file(path, b"abc" * 5000)
    reader = fsspec.filesystem("gpucrypt", target_protocol="file", identities=keys["identity"])
    assert reader.cat_file(path) == b"abc" * 5000
    with pytest.raises(ValueError, match="recipients= or keyset="):
        reader.pipe_file(str(tmp_path / "other.gc"), b"x")
    with pytest.raises(NoMatchingRecipient, match=re.escape(path)):
        local_fs(keys).cat_file(path)


def test_writes_publish_whole_files_or_nothing(keys, tmp_path):
    fs = local_fs(keys)
    target = tmp_path / "out.gc"
    with pytest.raises(RuntimeError):
        with fs.open(str(target), "wb") as f:
            f.write(b"partial")
            raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []  # nothing published, no temporary file left
    with fs.open(str(target), "wb") as f:
        f.write(b"first ")
        with pytest.raises(TypeError):   # as a file refuses it (bytes(5) is five zero bytes)
            f.write(5)
        f.write(b"second")
    assert fs.cat_file(str(target)) == b"first second"
    with pytest.raises(ValueError, match="'rb' or 'wb'"):
        fs.open(str(target), "ab")

    memory_fs = fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=keys["keyset"])
    with pytest.raises(RuntimeError):
        with memory_fs.open("/gc17w/out.gc", "wb") as f:
            f.write(b"partial")
            raise RuntimeError("the writer failed")
    assert not fsspec.filesystem("memory").exists("/gc17w/out.gc")


@pytest.fixture
def memory(keys, request):
    """A gpucrypt filesystem over the memory target, in a folder of this test's own, and
    the memory filesystem itself (the folder removed afterwards)."""
    folder = "/" + re.sub(r"\W", "_", request.node.name)
    fs = fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=keys["keyset"])
    yield fs, folder
    memory_fs = fsspec.filesystem("memory")
    if memory_fs.exists(folder):
        memory_fs.rm(folder, recursive=True)


def test_only_a_successful_close_publishes(keys, memory, caplog):
    """Text mode, compression= and pandas close the file on their way out of a failure;
    an unclosed writer is closed when it is collected: none of them publishes, the old
    file stays. A write that succeeds publishes, through the same wrappers."""
    import gc
    import gzip

    fs, folder = memory
    path = f"{folder}/data"

    def fails(write, **options):
        fs.pipe_file(path, b"OLD")
        with pytest.raises(RuntimeError, match="failed half-way"):
            with fs.open(path, **options) as f:
                write(f)
                raise RuntimeError("the writer failed half-way")
        assert fs.cat_file(path) == b"OLD"

    fails(lambda f: f.write("partial line\n"), mode="w")
    fails(lambda f: f.write(b"partial"), mode="wb", compression="gzip")
    fails(lambda f: f.write("partial"), mode="w", compression="gzip")

    def abandoned():
        f = fs.open(path, "wb")
        f.write(b"half")
    abandoned()
    gc.collect()
    assert fs.cat_file(path) == b"OLD"

    class Fails:
        def __str__(self):
            raise RuntimeError("serialisation failed half-way")
    options = {"gpucrypt": {"keyset": keys["keyset"]}}
    url = f"gpucrypt::memory://{path}"
    with pytest.raises(RuntimeError, match="failed half-way"):
        pd.DataFrame({"a": range(50), "b": ["x"] * 49 + [Fails()]}).to_csv(
            url, storage_options=options, index=False)
    assert fs.cat_file(path) == b"OLD"

    with fs.open(path, "w") as f:
        f.write("new text\n")
    assert fs.cat_file(path) == b"new text\n"
    with fs.open(path, "wb", compression="gzip") as f:
        f.write(b"compressed")
    assert gzip.decompress(fs.cat_file(path)) == b"compressed"
    with fs.open(path, "w", compression="gzip") as f:
        f.write("compressed text")
    assert gzip.decompress(fs.cat_file(path)) == b"compressed text"
    pd.DataFrame({"a": range(3)}).to_csv(url, storage_options=options, index=False)
    assert fs.cat_file(path) == b"a\n0\n1\n2\n"

    # inside an except clause: a file opened there publishes on close; one opened before
    # publishes by commit()
    try:
        raise KeyError("handled")
    except KeyError:
        with fs.open(path, "wb") as f:
            f.write(b"written while handling")
        assert fs.cat_file(path) == b"written while handling"
        before = fs.open(f"{folder}/other", "wb")
        before.write(b"committed")
        before.commit()
    assert fs.cat_file(f"{folder}/other") == b"committed"

    # a with block that ends normally publishes, whatever exception its surroundings are
    # still handling (an ExitStack's suppress() of an earlier one, say), in every mode
    import contextlib

    for mode, compression, data in (("wb", None, b"binary"), ("w", None, "text"),
                                    ("wb", "gzip", b"gzip"), ("w", "gzip", "gzip text")):
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(fs.open(path, mode, compression=compression))
            f.write(data)
            stack.enter_context(contextlib.suppress(KeyError))
            raise KeyError("handled inside")
        stored = fs.cat_file(path)
        assert (gzip.decompress(stored) if compression else stored) == \
            (data if isinstance(data, bytes) else data.encode())
    # a plain close inside an unrelated except clause discards (commit() publishes there),
    # and says so in the log (a warning could replace the exception being handled)
    fs.pipe_file(path, b"OLD")
    f = fs.open(path, "wb")
    f.write(b"not published")
    try:
        {}["missing"]
    except KeyError:
        with caplog.at_level("WARNING", logger="gpucrypt.fs"):
            f.close()
    assert fs.cat_file(path) == b"OLD"
    assert "discarded, not published" in caplog.text and "commit()" in caplog.text
    # a text writer dropped unclosed is abandoned, as a binary one is
    def abandoned_text():
        f = fs.open(path, "w")
        f.write("half")
    abandoned_text()
    gc.collect()
    assert fs.cat_file(path) == b"OLD"


def test_transactions_publish_on_commit_and_drop_on_failure(memory):
    fs, folder = memory
    fs.pipe_file(f"{folder}/a", b"OLD")
    with pytest.raises(RuntimeError):
        with fs.transaction:
            fs.pipe_file(f"{folder}/a", b"NEW")
            fs.pipe_file(f"{folder}/b", b"NEW")
            raise RuntimeError("abort the transaction")
    assert fs.cat_file(f"{folder}/a") == b"OLD" and not fs.exists(f"{folder}/b")
    with fs.transaction:
        fs.pipe_file(f"{folder}/a", b"NEW")
        with fs.open(f"{folder}/b", "wb", compression="gzip") as f:
            f.write(b"NEW")
        assert fs.cat_file(f"{folder}/a") == b"OLD" and not fs.exists(f"{folder}/b")
    assert fs.cat_file(f"{folder}/a") == b"NEW" and fs.exists(f"{folder}/b")
    with pytest.raises(ValueError, match="still open when its transaction committed"):
        with fs.transaction:
            fs.open(f"{folder}/c", "wb").write(b"never closed")
    assert not fs.exists(f"{folder}/c")


def test_files_have_a_mode_and_writers_tell(memory):
    """What tarfile (and other writers that record offsets) need of a file object."""
    import io
    import tarfile

    fs, folder = memory
    with fs.open(f"{folder}/t.tar", "wb") as f:
        assert (f.mode, f.tell(), f.seekable()) == ("wb", 0, False)
        with tarfile.open(fileobj=f, mode="w") as tar:
            info = tarfile.TarInfo("x")
            info.size = 7
            tar.addfile(info, io.BytesIO(b"payload"))
        assert f.tell() == 10240
    with fs.open(f"{folder}/t.tar", "rb") as f:
        assert f.mode == "rb"
        with tarfile.open(fileobj=f) as tar:
            assert tar.extractfile("x").read() == b"payload"


def test_put_file_and_get_file_round_trip(keys, tmp_path):
    source = tmp_path / "plain.bin"
    source.write_bytes(np.random.default_rng(3).bytes(50_000))
    fs = fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=keys["keyset"],
                           segment_size=SEGMENT)
    fs.put(str(source), "/gc17p/plain.bin.gc")
    assert fsspec.filesystem("memory").cat_file("/gc17p/plain.bin.gc").startswith(b"GPUCRYPT")
    fs.get("/gc17p/plain.bin.gc", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    fsspec.filesystem("memory").rm("/gc17p", recursive=True)


@pytest.mark.parametrize("target", ["file", "memory"])
def test_get_takes_file_objects_and_folders_as_fsspec_does(keys, tmp_path, target):
    import io
    import os

    fs = fsspec.filesystem("gpucrypt", target_protocol=target, keyset=keys["keyset"],
                           segment_size=SEGMENT)
    root = str(tmp_path / "remote") if target == "file" else f"/{tmp_path.name}"
    files = {"b": b"b" * 5000, "sub/a": b"a" * 9000}
    for name, data in files.items():
        fs.makedirs(f"{root}/tree/{os.path.dirname(name)}", exist_ok=True)
        fs.pipe_file(f"{root}/tree/{name}", data)
    fs.makedirs(f"{root}/tree/empty", exist_ok=True)

    out = io.BytesIO()
    fs.get_file(f"{root}/tree/sub/a", out)
    assert out.getvalue() == files["sub/a"]
    fs.get_file(f"{root}/tree/b", str(tmp_path / "new" / "deeper" / "b"))  # folders made
    assert (tmp_path / "new" / "deeper" / "b").read_bytes() == files["b"]

    local = tmp_path / "copy"
    fs.get(f"{root}/tree", str(local), recursive=True)
    got = {os.path.relpath(os.path.join(d, n), local): open(os.path.join(d, n), "rb").read()
           for d, _, names in os.walk(local) for n in names}
    assert got == files and (local / "empty").is_dir()
    if target == "memory":
        fsspec.filesystem("memory").rm(root, recursive=True)


def test_a_failed_publish_is_retried_never_reported_as_done(keys, tmp_path):
    """The target refuses the file (its folder was removed after the open): close raises
    and keeps the plaintext; a second close does nothing, as any file's; commit() raises
    again while the target refuses, then publishes."""
    fs = local_fs(keys)
    for first, mode, data in (("commit", "wb", b"binary"), ("close", "wb", b"again"),
                              ("close", "w", "text")):
        folder = tmp_path / f"{first}-{mode}"
        folder.mkdir()
        f = fs.open(str(folder / "x.gc"), mode)
        f.write(data)
        folder.rmdir()
        with pytest.raises(FileNotFoundError):
            getattr(f, first)()
        f.close()  # closed already: no second error (a finaliser, an outer with block)
        with pytest.raises(FileNotFoundError):
            f.commit()
        folder.mkdir()
        f.commit()
        assert fs.cat_file(str(folder / "x.gc")) == (data if mode == "wb" else data.encode())


def test_named_errors_survive_pickling_between_processes():
    """Ray sends a worker's exception to the driver pickled: class, message, segment, path."""
    for error in (stream.AuthenticationError("segment 2 failed authentication", 2),
                  stream.TruncatedError("truncated file", 7),
                  stream.UnsupportedVersion("unsupported gpucrypt format version 9", 9),
                  stream.FormatError("not a gpucrypt file")):
        named = gfs.named_error(error, "/data/x.gc")
        back = pickle.loads(pickle.dumps(named))
        assert type(back) is type(error) and str(back) == f"/data/x.gc: {error}"
        assert back.path == "/data/x.gc"
        assert getattr(back, "segment", None) == getattr(error, "segment", None)
        assert getattr(back, "version", None) == getattr(error, "version", None)


def test_key_uri_strings_are_references_that_pickle_as_their_uri(keys, frame, tmp_path):
    """A ``file://`` key URI (docs/KEYS.md, *Key references*) names the keyset as a path
    does: the filesystem writes and reads with it, and its pickle carries the URI only."""
    from gpucrypt.keys import KeyReference

    uri = "file://" + keys["keyset"]
    fs = fsspec.filesystem("gpucrypt", target_protocol="file", keyset=uri, skip_instance_cache=True)
    assert fs.keys.keyset == KeyReference(uri)
    path = str(tmp_path / "by-uri.parquet.gc")
    pq.write_table(pa.Table.from_pandas(frame.head(100), preserve_index=False), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).to_pandas().equals(frame.head(100))
    blob = pickle.dumps(fs)
    assert keys["kek"] not in blob and keys["kek"].hex().encode() not in blob
    assert pq.read_table(path, filesystem=pickle.loads(blob)).num_rows == 100
    with pytest.raises(Exception, match="pkcs11"):
        gfs.GpucryptFileSystem(target_protocol="file", keyset="pkcs11:no-such-attribute")


def test_a_transaction_publishes_file_by_file_as_documented(keys, tmp_path):
    """docs/DATASETS.md: the files are published one by one when the transaction ends; a
    publish that fails leaves the files before it published, raises, and the files after
    it are not published."""
    fs = local_fs(keys)
    for folder in "abc":
        (tmp_path / folder).mkdir()
    names = [str(tmp_path / "a" / "1.gc"), str(tmp_path / "b" / "2.gc"), str(tmp_path / "c" / "3.gc")]
    with pytest.raises(FileNotFoundError):
        with fs.transaction:
            for name in names:
                with fs.open(name, "wb") as f:
                    f.write(name.encode())
            (tmp_path / "b").rmdir()  # removed before the end: the second publish fails
    assert fs.cat_file(names[0]) == names[0].encode()
    assert not (tmp_path / "b" / "2.gc").exists() and not (tmp_path / "c" / "3.gc").exists()


def _encrypt_events(caplog) -> list[str]:
    """The outcomes of the ``file.encrypt`` audit events logged so far."""
    return [record.audit["outcome"] for record in caplog.records
            if getattr(record, "audit", {}).get("operation") == "file.encrypt"]


def test_a_write_is_audited_ok_only_once_it_is_at_its_path(keys, tmp_path, caplog):
    """A file sealed beside its target (any target but a local one, and a put_file staged
    in a transaction) logged file.encrypt "ok" when sealed, before the move that
    publishes it: a move that then failed left the log saying it was done while the
    caller was told it failed. The event now comes after the move: "error" if it failed,
    or if the transaction was discarded, and "ok" once the file is there."""
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="gpucrypt.audit")
    memory_fs = MemoryFileSystem()
    memory_fs.pipe_file("/f6/dir/child", b"x")
    fs = gfs.GpucryptFileSystem(fs=memory_fs, keyset=keys["keyset"])
    with pytest.raises(IsADirectoryError):
        fs.pipe_file("/f6/dir", b"secret")  # the move is refused: the path is a folder
    assert _encrypt_events(caplog) == ["error"]
    fs.pipe_file("/f6/file", b"secret")
    assert _encrypt_events(caplog) == ["error", "ok"] and fs.cat_file("/f6/file") == b"secret"
    memory_fs.rm("/f6", recursive=True)

    caplog.clear()
    (tmp_path / "plain").write_bytes(b"secret")
    (tmp_path / "sub").mkdir()
    local = local_fs(keys)
    with pytest.raises(FileNotFoundError):
        with local.transaction:
            local.put_file(str(tmp_path / "plain"), str(tmp_path / "sub" / "x.gc"))
            assert _encrypt_events(caplog) == []  # sealed, not yet at its path
            shutil.rmtree(tmp_path / "sub")  # the commit's move fails
    assert _encrypt_events(caplog) == ["error"]
    with pytest.raises(RuntimeError):
        with local.transaction:
            local.put_file(str(tmp_path / "plain"), str(tmp_path / "y.gc"))
            raise RuntimeError("the transaction is discarded")
    assert _encrypt_events(caplog) == ["error", "error"] and not (tmp_path / "y.gc").exists()
    with local.transaction:
        local.put_file(str(tmp_path / "plain"), str(tmp_path / "z.gc"))
    assert _encrypt_events(caplog) == ["error", "error", "ok"]
    assert local.cat_file(str(tmp_path / "z.gc")) == b"secret"


def test_a_held_event_names_the_path_as_it_was_when_the_file_was_sealed(keys, tmp_path,
                                                                         monkeypatch, caplog):
    """A put_file in a transaction holds its event until the commit, which made a relative
    path absolute against the working folder of that moment: a chdir in between logged
    another file's path."""
    import logging

    caplog.set_level(logging.INFO, logger="gpucrypt.audit")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "data.bin").write_bytes(b"secret")
    local = local_fs(keys)
    monkeypatch.chdir(tmp_path / "a")
    with local.transaction:
        local.put_file("data.bin", str(tmp_path / "data.bin.gc"))
        monkeypatch.chdir(tmp_path / "b")  # the application moves on before the commit
    (event,) = [record.audit for record in caplog.records
                if getattr(record, "audit", {}).get("operation") == "file.encrypt"]
    assert event["outcome"] == "ok"
    assert event["path"] == str(tmp_path / "a" / "data.bin")  # put_file's event names its source


def test_a_staged_put_that_fails_names_its_path_not_the_temporary_file(keys, tmp_path,
                                                                       monkeypatch):
    """A put_file in a transaction is sealed into ``.NAME.XXXXXXXX.gpucrypt-tmp`` beside its
    path: a full disk while it was sealed, or its folder gone before the commit's move,
    raised an error naming that temporary file (gone by then). They name the path."""
    import errno
    import shutil

    (tmp_path / "plain").write_bytes(os.urandom(3 * SEGMENT))
    (tmp_path / "sub").mkdir()
    target = str(tmp_path / "sub" / "x.gc")
    fs = local_fs(keys, segment_size=SEGMENT)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(os, "pwrite", full)
        with pytest.raises(OSError) as info:
            with fs.transaction:
                fs.put_file(str(tmp_path / "plain"), target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == target
    with pytest.raises(FileNotFoundError) as info:
        with fs.transaction:
            fs.put_file(str(tmp_path / "plain"), target)
            shutil.rmtree(tmp_path / "sub")
    assert info.value.filename == target and info.value.filename2 is None
    assert os.listdir(tmp_path) == ["plain"]


@pytest.mark.parametrize("target", ["file", "memory"])
def test_info_reads_a_replaced_file_again(keys, tmp_path, target, request):
    """``info`` remembers each file's plaintext size, so that listings do not read every
    header again: a file replaced by another of the same stored size (the same bytes but
    not a stream; a stream of larger segments, so fewer tags and more plaintext) is read
    again, not given the size of the file it replaced."""
    import time

    base = str(tmp_path) if target == "file" else "/" + re.sub(r"\W", "_", request.node.name)
    fs = fsspec.filesystem("gpucrypt", target_protocol=target, keyset=keys["keyset"])
    plain_fs = fs.fs
    path = f"{base}/data.gc"
    with fs.open(path, "wb", segment_size=4096) as f:
        f.write(bytes(20_000))  # 5 segments, 5 tags
    stored = plain_fs.cat_file(path)
    first = fs.info(path)
    assert first["encrypted"] and first["size"] == 20_000 and first["stored_size"] == len(stored)

    def replace(data: bytes) -> None:
        time.sleep(0.01)  # a new modification/creation time, and locally a new inode
        plain_fs.pipe_file(path + ".new", data)
        plain_fs.mv(path + ".new", path)

    replace(bytes(len(stored)))
    second = fs.info(path)
    assert not second["encrypted"] and second["size"] == len(stored)
    with fs.open(path + ".other", "wb", segment_size=8192) as f:
        f.write(bytes(20_032))  # 3 segments: two tags fewer, 32 bytes more plaintext
    other = plain_fs.cat_file(path + ".other")
    assert len(other) == len(stored)
    replace(other)
    third = fs.info(path)
    assert third["encrypted"] and third["size"] == 20_032
    if target == "memory":
        plain_fs.rm(base, recursive=True)


def test_write_options_per_file_and_checked_before_writing(keys, tmp_path):
    """``algorithm``, ``segment_size`` and ``device`` given to ``open(..., "wb")`` or
    ``put_file`` seal that one file; wrong ones, there or for the filesystem, are refused
    where they are given, not when a close would lose what was written."""
    fs = local_fs(keys)
    path = str(tmp_path / "one.gc")
    with fs.open(path, "wb", algorithm="aes-256-gcm", segment_size=8192) as f:
        f.write(b"x" * 10_000)
    with open(path, "rb") as raw:
        header = stream.read_header(raw)
    assert (header.algorithm, header.segment_size) == ("aes-256-gcm", 8192)
    assert fs.cat_file(path) == b"x" * 10_000
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"y" * 5000)
    fs.put_file(str(plain), str(tmp_path / "two.gc"), algorithm="xchacha20-poly1305")
    with open(tmp_path / "two.gc", "rb") as raw:
        assert stream.read_header(raw).algorithm == "xchacha20-poly1305"
    assert fs.write_options == {"algorithm": "chacha20-poly1305",  # the filesystem's own: as made
                                "segment_size": stream.DEFAULT_SEGMENT_SIZE, "device": "auto"}
    for bad in ({"segment_size": 1024}, {"algorithm": "aes-cbc"}, {"device": "tpu"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fs.open(str(tmp_path / "bad.gc"), "wb", **bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            fsspec.filesystem("gpucrypt", target_protocol="file", keyset=keys["keyset"],
                              skip_instance_cache=True, **bad)
    assert not (tmp_path / "bad.gc").exists()


def test_an_instance_is_shared_only_by_calls_naming_the_same_keys_as_text(keys, request):
    """fsspec hands back a cached instance for arguments that print alike: two providers'
    ``WrappingKey(id='prod')`` print alike and are different keys, so each call with key
    objects gets its own filesystem, which writes for its own key. Keys named by text
    (what pandas passes on every call) still share one instance and its resolved keys."""
    import io
    import os

    from gpucrypt.keys import decrypt_file
    from gpucrypt.keys.portable import KeyReferences
    from gpucrypt.keys.providers import CallableKeyProvider

    folder = "/" + re.sub(r"\W", "_", request.node.name)
    key_a, key_b = os.urandom(32), os.urandom(32)
    team_a = WrappingKey.from_provider(CallableKeyProvider(lambda i: key_a, name="kms"), "prod")
    team_b = WrappingKey.from_provider(CallableKeyProvider(lambda i: key_b, name="kms"), "prod")
    assert repr(team_a) == repr(team_b)  # all that fsspec's token sees of them
    fs_a = fsspec.filesystem("gpucrypt", target_protocol="memory", recipients=team_a,
                             identities=team_a)
    fs_b = fsspec.filesystem("gpucrypt", target_protocol="memory", recipients=team_b,
                             identities=team_b)
    assert fs_a is not fs_b and fs_b.keys.recipients[0] is team_b
    fs_b.pipe_file(f"{folder}/secret", b"team B data")
    stored = fs_b.fs.cat_file(f"{folder}/secret")
    out = io.BytesIO()
    decrypt_file(stored, out, identities=team_b)
    assert out.getvalue() == b"team B data"
    with pytest.raises(NoMatchingRecipient):
        decrypt_file(stored, io.BytesIO(), identities=team_a)
    with pytest.raises(NoMatchingRecipient):
        fs_a.cat_file(f"{folder}/secret")

    by_path = fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=keys["keyset"])
    assert fsspec.filesystem("gpucrypt", target_protocol="memory",
                             keyset=keys["keyset"]) is by_path
    assert fsspec.filesystem("gpucrypt", target_protocol="memory",
                             keys=KeyReferences(keyset=keys["keyset"])) is by_path
    # passphrase_env is not in a KeyReferences' repr, but it is in the cache's token
    assert fsspec.filesystem("gpucrypt", target_protocol="memory", keys=KeyReferences(
        keyset=keys["keyset"], passphrase_env="GC17_NONE")) is not by_path
    fsspec.filesystem("memory").rm(folder, recursive=True)


def _rotate(path: str) -> tuple[str, str]:
    """A rotation as an operator makes it: a new primary, the old key destroyed, the file
    saved again. The old and the new primary's ids."""
    keyset = Keyset.load(path)
    old = keyset.primary.id
    new = keyset.add(primary=True).id
    keyset.destroy(old)
    keyset.save(path)
    return old, new


@pytest.mark.parametrize("reference", ["path", "file-uri"])
def test_a_keyset_rotated_on_disk_reaches_the_next_write(tmp_path, reference):
    """A keyset file rotated while a filesystem naming it exists: the next
    ``fsspec.filesystem(...)`` call (the cached instance) and the instance kept from
    before both wrap new files under the new primary, never the destroyed key; an
    unchanged file is not resolved again; a removed one fails the next write."""
    from gpucrypt.keys import KeysetError, decrypt_file

    path = str(tmp_path / "team.json")
    Keyset.generate().save(path)
    ref = path if reference == "path" else "file://" + path
    fs = fsspec.filesystem("gpucrypt", target_protocol="file", keyset=ref)
    fs.pipe_file(str(tmp_path / "before.gc"), b"before")
    resolved = fs._keys()
    fs.pipe_file(str(tmp_path / "before2.gc"), b"before")
    assert fs._keys() is resolved  # unchanged: one resolution (a sealed keyset's scrypt)

    old, new = _rotate(path)
    again = fsspec.filesystem("gpucrypt", target_protocol="file", keyset=ref)
    assert again is fs  # text references: the cached instance, as documented
    for name in ("after.gc", "after2.gc"):
        again.pipe_file(str(tmp_path / name), name.encode())
        with open(tmp_path / name, "rb") as f:
            assert stream.read_header(f).key_id == new != old
        decrypt_file(str(tmp_path / name), str(tmp_path / "plain"),
                     keyset=Keyset.load(path))  # the current keyset file opens it
    with pytest.raises(NoMatchingRecipient, match="destroyed"):
        fs.cat_file(str(tmp_path / "before.gc"))  # the destroyed key is gone here too

    import os

    os.remove(path)
    with pytest.raises(KeysetError):
        fs.pipe_file(str(tmp_path / "no-keyset.gc"), b"x")
    assert not (tmp_path / "no-keyset.gc").exists()


@pytest.mark.parametrize("target", ["file", "memory"])
def test_put_file_keeps_to_create_mode_and_transactions(keys, tmp_path, target, request):
    """As fsspec's filesystems: ``mode="create"`` refuses an existing target; inside a
    transaction a put is published when the transaction ends, with what the local file
    held at the put, and an aborted transaction leaves nothing, no temporary file either."""
    base = str(tmp_path / "out") if target == "file" else "/" + re.sub(r"\W", "_",
                                                                      request.node.name)
    fs = fsspec.filesystem("gpucrypt", target_protocol=target, keyset=keys["keyset"])
    fs.makedirs(base, exist_ok=True)
    source = tmp_path / "plain.txt"
    source.write_bytes(b"new contents")
    fs.pipe_file(f"{base}/existing", b"old contents")
    with pytest.raises(FileExistsError):
        fs.put_file(str(source), f"{base}/existing", mode="create")
    assert fs.cat_file(f"{base}/existing") == b"old contents"
    fs.put_file(str(source), f"{base}/created", mode="create")
    assert fs.cat_file(f"{base}/created") == b"new contents"

    listed = sorted(fs.fs.ls(base, detail=False))
    with pytest.raises(RuntimeError):
        with fs.transaction:
            fs.put_file(str(source), f"{base}/existing")
            fs.put_file(str(source), f"{base}/put")
            raise RuntimeError("abort the transaction")
    assert fs.cat_file(f"{base}/existing") == b"old contents" and not fs.exists(f"{base}/put")
    assert sorted(fs.fs.ls(base, detail=False)) == listed  # no temporary file left

    with fs.transaction:
        fs.put_file(str(source), f"{base}/put", segment_size=8192)
        source.write_bytes(b"changed after the put")
        assert not fs.exists(f"{base}/put")
    assert fs.cat_file(f"{base}/put") == b"new contents"
    with fs.open(f"{base}/put", "rb") as f:
        assert f.header.segment_size == 8192  # per-file options still reach the file
    assert sorted(fs.fs.ls(base, detail=False)) == sorted(listed + [f"{base}/put"])
    if target == "memory":
        fs.fs.rm(base, recursive=True)


def test_filesystems_holding_different_key_objects_are_not_equal(keys):
    """Each call with key objects gets its own instance, but it kept the token fsspec makes
    of the arguments' printed form, which two providers' ``WrappingKey(id='prod')``
    share: the two filesystems compared equal, hashed equal (one of them dropped from a
    set, or a cache keyed by filesystem handing one's reads to the other) and had one
    dask token and one pyarrow identity. Keys named by text still make equal filesystems."""
    import os

    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from gpucrypt.keys.providers import CallableKeyProvider

    key_a, key_b = os.urandom(32), os.urandom(32)
    team_a = WrappingKey.from_provider(CallableKeyProvider(lambda i: key_a, name="kms"), "prod")
    team_b = WrappingKey.from_provider(CallableKeyProvider(lambda i: key_b, name="kms"), "prod")
    fs_a = fsspec.filesystem("gpucrypt", target_protocol="memory", recipients=team_a,
                             identities=team_a)
    fs_b = fsspec.filesystem("gpucrypt", target_protocol="memory", recipients=team_b,
                             identities=team_b)
    assert fs_a != fs_b and not fs_a == fs_b and hash(fs_a) != hash(fs_b)
    assert len({fs_a, fs_b}) == 2
    assert fs_a.__dask_tokenize__() != fs_b.__dask_tokenize__()  # what dask.tokenize uses
    assert not PyFileSystem(FSSpecHandler(fs_a)).equals(PyFileSystem(FSSpecHandler(fs_b)))
    assert fs_a == fs_a and len({fs_a, fs_a}) == 1  # each equals itself

    by_path = fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=keys["keyset"])
    again = pickle.loads(pickle.dumps(by_path))  # the same keys, as text: an equal filesystem
    assert again == by_path and hash(again) == hash(by_path)


def test_key_arguments_given_as_none_or_empty_win_over_the_fsspec_config(keys, monkeypatch):
    """An explicit ``keyset=None`` is the way to say "identities only" (read, never write)
    when fsspec's config names a keyset: the key arguments that were None or [] were
    dropped to make one spelling per set of keys, and fsspec then filled the config's
    keyset in again, so the filesystem could write. Explicit values win, as for any
    fsspec option; left out, the config's keys apply; and the spellings of one set of
    keys still share an instance."""
    from fsspec.config import conf

    from gpucrypt.keys.portable import KeyReferences

    monkeypatch.setitem(conf, "gpucrypt", {"keyset": keys["keyset"]})  # restored after
    readers = [fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=None,
                                 identities=[keys["identity"]]),
               fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=None,
                                 identities=keys["identity"], recipients=[])]
    for reader in readers + [pickle.loads(pickle.dumps(readers[0]))]:  # config reapplied
        assert reader.keys.keyset is None and list(reader.keys.identities) == [keys["identity"]]
        assert not reader._keys().can_encrypt()
        with pytest.raises(ValueError, match="identities only"):
            reader.pipe_file("/config_none/out", b"x")
    assert readers[1] is readers[0]  # one identity and a list of it: one filesystem
    defaulted = fsspec.filesystem("gpucrypt", target_protocol="memory",
                                  identities=[keys["identity"]])
    assert defaulted.keys.keyset == keys["keyset"] and defaulted is not readers[0]

    # a config's keys= (a KeyReferences) is a default too; fsspec applied it again over
    # the keys spelled out from it, and __init__ refused the two (TypeError)
    monkeypatch.setitem(conf, "gpucrypt", {"keys": KeyReferences(keyset=keys["keyset"])})
    from_config = fsspec.filesystem("gpucrypt", target_protocol="memory")
    assert from_config.keys.keyset == keys["keyset"] and from_config._keys().can_encrypt()

    monkeypatch.delitem(conf, "gpucrypt")
    by_path = fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=keys["keyset"])
    assert fsspec.filesystem("gpucrypt", target_protocol="memory",
                             keys=KeyReferences(keyset=keys["keyset"])) is by_path
    assert fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=keys["keyset"],
                             identities=[], recipients=None) is by_path
    assert not fsspec.filesystem("memory").exists("/config_none/out")


def test_a_transaction_refuses_a_symbolic_link_target_as_a_put_outside_does(keys, tmp_path):
    """Outside a transaction a local put refuses a target that is a symbolic link
    (renamed over, the file it points to would keep the old data); inside one the
    staged file was renamed over the link. Refused at the put, and at the commit for a
    link made in between, with nothing left behind."""
    import errno
    import os

    fs = fsspec.filesystem("gpucrypt", target_protocol="file", keyset=keys["keyset"])
    source = tmp_path / "plain"
    source.write_bytes(b"data")
    precious = tmp_path / "precious"
    precious.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    link = out / "link.gc"
    link.symlink_to(precious)
    with pytest.raises(OSError, match="symbolic link") as outside:
        fs.put_file(str(source), str(link))
    with pytest.raises(OSError, match="symbolic link.*give the file it points to") as inside:
        with fs.transaction:
            fs.put_file(str(source), str(link))
    for caught in (outside, inside):
        assert caught.value.errno == errno.ELOOP and caught.value.filename == str(link)

    later = out / "later.gc"
    with pytest.raises(OSError, match="symbolic link") as at_commit:
        with fs.transaction:
            fs.put_file(str(source), str(later))
            later.symlink_to(precious)  # made between the put and the commit
    assert at_commit.value.errno == errno.ELOOP and at_commit.value.filename == str(later)
    assert link.is_symlink() and later.is_symlink() and precious.read_bytes() == b"precious"
    assert sorted(os.listdir(out)) == ["later.gc", "link.gc"]  # no temporary file left


def test_a_transaction_stages_a_put_under_any_name_its_folder_takes(keys, tmp_path):
    """The staged file was ``.NAME.XXXXXXXX.gpucrypt-tmp``, sealed through an atomic file
    whose own temporary name adds as much again: names of about 209 to 232 bytes, which
    a put outside a transaction takes, failed inside one with ENAMETOOLONG. The staged
    name keeps 64 bytes of the target's, so staging adds no limit of its own: up to the
    folder's 255 bytes."""
    import os

    fs = fsspec.filesystem("gpucrypt", target_protocol="file", keyset=keys["keyset"])
    source = tmp_path / "plain"
    source.write_bytes(b"data")
    out = tmp_path / "out"
    out.mkdir()
    for length in (220, 232, 255):
        inside = out / ("i" * length)
        with fs.transaction:
            fs.put_file(str(source), str(inside))
            staged = [n for n in os.listdir(out) if n.endswith(".gpucrypt-tmp")]
            assert len(staged) == 1 and staged[0].startswith("." + "i" * 64 + ".")
        assert fs.cat_file(str(inside)) == b"data"
        if length <= 232:  # what a put outside takes (its atomic file's own temporary name)
            outside = out / ("o" * length)
            fs.put_file(str(source), str(outside))
            assert fs.cat_file(str(outside)) == b"data"
    assert len(os.listdir(out)) == 5  # the files, no temporary one


# a child that stages a put in a transaction on a local target and waits, inside it, for
# the test's signal; signals start at their default action, as in a shell
_STAGED_PUT = """
import os, signal, sys, time
for name in ("SIGTERM", "SIGHUP"):
    signal.signal(getattr(signal, name), signal.SIG_DFL)
import fsspec
keyset, source, target = sys.argv[1:]
fs = fsspec.filesystem("gpucrypt", target_protocol="file", keyset=keyset)
with fs.transaction:
    fs.put_file(source, target)
    print("staged", flush=True)
    time.sleep(120)  # the signal ends the process here
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_signal_inside_a_transaction_removes_the_staged_put(keys, tmp_path, signame):
    """A put inside a transaction waits sealed (the whole file) in a hidden temporary file
    beside its target until the transaction ends. A real signal from outside meanwhile
    left it there; it is now removed, as gpucrypt's other named temporary files are."""
    import os

    source = tmp_path / "plain"
    source.write_bytes(b"x" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    with python_child(_STAGED_PUT, keys["keyset"], str(source), str(out / "data.gc")) as child:
        assert child.stdout.readline().strip() == "staged", child.stderr.read()
        staged = os.listdir(out)
        assert len(staged) == 1 and staged[0].endswith(".gpucrypt-tmp")
        dies_of(child, signame)
    assert os.listdir(out) == []


class _ListedThenGone(LocalFileSystem):
    """The real local filesystem, whose listing is followed, before anything else runs, by
    what ``after_listing`` does to the folder: another writer removing or replacing a file
    between a listing and the header reads that follow it, without a timing race."""

    def ls(self, path, detail=False, **kwargs):
        entries = super().ls(path, detail=detail, **kwargs)
        self.after_listing()
        return entries


def test_a_listing_leaves_out_files_gone_before_their_header_is_read(keys, tmp_path):
    """A file gone between the listing and its header read (another writer's temporary
    file renamed into place) is left out, as a local listing leaves out a file gone before
    it is stat'ed; one that cannot be read stays, with its stored size and
    "encrypted": None. Before, either failed the whole ls, and find/glob (whose walk
    swallows the error) returned nothing. gpucrypt's own temporary files are not listed."""
    import os

    fs = local_fs(keys)
    for name in ("a.gc", "gone.gc", "unreadable.gc"):
        fs.pipe_file(str(tmp_path / name), name.encode())
    (tmp_path / ".a.gc.0123abcd.gpucrypt-tmp").write_bytes(b"a write in flight")

    def another_writer():
        os.remove(tmp_path / "gone.gc")
        os.remove(tmp_path / "unreadable.gc")
        (tmp_path / "unreadable.gc").mkdir()  # listed as a file: reading it fails (EISDIR)
    target = _ListedThenGone(skip_instance_cache=True)
    target.after_listing = another_writer
    over_it = fsspec.filesystem("gpucrypt", fs=target, keyset=keys["keyset"])

    listed = {posixpath.basename(e["name"]): e for e in over_it.ls(str(tmp_path))}
    assert sorted(listed) == ["a.gc", "unreadable.gc"]
    assert listed["a.gc"]["size"] == 4 and listed["a.gc"]["encrypted"] is True
    unreadable = listed["unreadable.gc"]
    assert unreadable["encrypted"] is None and unreadable["size"] == unreadable["stored_size"] > 0
    # put back; the next listing (glob's) is followed by the same removals
    (tmp_path / "unreadable.gc").rmdir()
    fs.pipe_file(str(tmp_path / "gone.gc"), b"back")
    fs.pipe_file(str(tmp_path / "unreadable.gc"), b"back")
    assert sorted(posixpath.basename(p) for p in over_it.glob(str(tmp_path / "*.gc"))) == \
        ["a.gc", "unreadable.gc"]
    assert ".a.gc.0123abcd.gpucrypt-tmp" not in {posixpath.basename(p) for p in
                                                 fs.ls(str(tmp_path), detail=False)}


def test_a_write_onto_a_folder_is_refused_and_leaves_nothing(keys, memory):
    """fsspec's generic mv copies into a folder: a write to a path that is a folder of
    the memory target 'succeeded' and left the file inside it under its temporary name."""
    fs, folder = memory
    fs.pipe_file(f"{folder}/sub/x.gc", b"child")  # {folder}/sub is now a folder
    with pytest.raises(IsADirectoryError, match=re.escape(f"{folder}/sub")):
        fs.pipe_file(f"{folder}/sub", b"IMPORTANT")
    assert fs.fs.find(folder) == [f"{folder}/sub/x.gc"]  # no temporary file inside it
    assert fs.cat_file(f"{folder}/sub/x.gc") == b"child"


class _MoveReportsFailure(MemoryFileSystem):
    """The real memory filesystem, whose ``cp_file`` (a move on an object store is a copy,
    then a removal: gpucrypt.fs.move_exactly) reports failure by its return value (some
    targets do) instead of raising."""

    def cp_file(self, path1, path2, **kwargs):
        return False


def test_a_move_that_leaves_no_file_is_not_reported_as_written(keys, memory):
    _, folder = memory
    fs = fsspec.filesystem("gpucrypt", fs=_MoveReportsFailure(skip_instance_cache=True),
                           keyset=keys["keyset"])
    f = fs.open(f"{folder}/x.gc", "wb")
    f.write(b"data")
    with pytest.raises(OSError, match="left no file"):
        f.close()
    assert fs.fs.find(folder) == []  # the temporary file removed


def test_names_that_read_as_glob_patterns_are_written_as_they_are(keys, memory):
    """fsspec's generic mv takes ``[``, ``*`` and ``?`` as glob patterns: on an object
    store a write to ``a[1].gc`` raised FileNotFoundError (its temporary name matched
    nothing), and one to ``x?.gc`` left its temporary file in a folder named ``x?.gc``
    and reported the write failed."""
    fs, folder = memory
    fs.pipe_file(f"{folder}/a1.gc", b"theirs")
    for name in ("a[1].gc", "x?.gc", "s*.gc"):
        with fs.open(f"{folder}/{name}", "wb") as f:
            f.write(name.encode())
    assert {posixpath.basename(p): fs.cat_file(p) for p in fs.find(folder)} == {
        "a1.gc": b"theirs", "a[1].gc": b"a[1].gc", "x?.gc": b"x?.gc", "s*.gc": b"s*.gc"}
    assert sorted(posixpath.basename(p) for p in fs.fs.find(folder)) == \
        ["a1.gc", "a[1].gc", "s*.gc", "x?.gc"]  # no temporary file left


@pytest.mark.parametrize("name", ["plain.gc", "a[1].gc"])
def test_a_write_under_a_dir_prefix_is_published_by_a_rename(keys, tmp_path, name):
    """On the local disk under a dir:: prefix, the glob fix first published by copying
    (cp_file then rm_file): the old file truncated and rewritten in place, so a reader
    holding it open saw the new bytes, and a crash mid-copy lost both. A rename: the
    reader keeps the old file."""
    from fsspec.implementations.local import LocalFileSystem

    fs = fsspec.filesystem("gpucrypt", target_protocol="dir", skip_instance_cache=True,
                           target_options={"path": str(tmp_path), "fs": LocalFileSystem()},
                           keyset=keys["keyset"])
    fs.pipe_file(name, b"old")
    with open(tmp_path / name, "rb") as reader:
        before = reader.read()
        fs.pipe_file(name, b"new")
        reader.seek(0)
        assert reader.read() == before  # the old file, whole: it was renamed over
    assert fs.cat_file(name) == b"new" and sorted(os.listdir(tmp_path)) == [name]


def test_memory_readers_in_threads_read_their_own_bytes(keys, memory):
    """fsspec's memory filesystem hands every open("rb") one shared BytesIO: readers in two
    threads moved each other's position (FormatError, AuthenticationError, wrong bytes)."""
    import os
    import sys

    _, folder = memory
    fs = fsspec.filesystem("gpucrypt", target_protocol="memory", keyset=keys["keyset"],
                           segment_size=SEGMENT)
    data = os.urandom(12 * SEGMENT + 5)
    fs.pipe_file(f"{folder}/x.gc", data)
    threads, rounds = 4, 150
    barrier, failures = threading.Barrier(threads), []

    def read(seed):
        barrier.wait()
        for i in range(rounds):
            start = (i * 997 + seed * 4099) % (len(data) - 5000)
            try:
                if fs.cat_file(f"{folder}/x.gc", start, start + 5000) != data[start:start + 5000]:
                    failures.append("wrong bytes")
            except Exception as exc:  # noqa: BLE001 - counted, the test reports them
                failures.append(type(exc).__name__)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: between a seek and its read
    try:
        workers = [threading.Thread(target=read, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []


def test_the_targets_auto_mkdir_makes_the_folder_of_every_write(keys, tmp_path):
    fs = fsspec.filesystem("gpucrypt", target_protocol="file", keyset=keys["keyset"],
                           target_options={"auto_mkdir": True})
    fs.pipe_file(str(tmp_path / "p" / "sub" / "x.gc"), b"piped")
    fs.put_file(keys["recipient"], str(tmp_path / "u" / "sub" / "x.gc"))
    with fs.open(str(tmp_path / "o" / "sub" / "x.gc"), "wb") as f:
        f.write(b"opened")
    fs.cp_file(str(tmp_path / "p" / "sub" / "x.gc"), str(tmp_path / "c" / "sub" / "x.gc"))
    assert fs.cat_file(str(tmp_path / "p" / "sub" / "x.gc")) == b"piped"
    assert fs.cat_file(str(tmp_path / "o" / "sub" / "x.gc")) == b"opened"
    assert fs.cat_file(str(tmp_path / "c" / "sub" / "x.gc")) == b"piped"
    with open(keys["recipient"], "rb") as source:
        assert fs.cat_file(str(tmp_path / "u" / "sub" / "x.gc")) == source.read()


def test_a_write_that_could_only_fail_is_refused_at_open(keys, tmp_path):
    """Identities only (nothing to encrypt for), a missing folder, a folder at the path:
    refused when the file is opened, not at close after the whole plaintext was kept."""
    reader = fsspec.filesystem("gpucrypt", target_protocol="memory", identities=keys["identity"])
    with pytest.raises(ValueError, match="recipients= or keyset="):
        reader.open("/gc17-identities-only/x.gc", "wb")
    fs = local_fs(keys)
    with pytest.raises(FileNotFoundError, match="auto_mkdir"):
        fs.open(str(tmp_path / "missing" / "x.gc"), "wb")
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        fs.open(str(tmp_path), "wb")
    assert list(tmp_path.iterdir()) == []


def test_relative_key_paths_name_the_files_meant_when_the_filesystem_was_made(
        keys, tmp_path, monkeypatch):
    """keyset="team.json" was looked up again from the current folder at each use: after
    os.chdir a filesystem (one kept, or fsspec's cached one) used another keyset."""
    for team in ("one", "two"):
        (tmp_path / team).mkdir()
        Keyset.generate().save(tmp_path / team / "team.json")
    monkeypatch.chdir(tmp_path / "one")
    fs = fsspec.filesystem("gpucrypt", target_protocol="file", keyset="team.json")
    fs.pipe_file(str(tmp_path / "x.gc"), b"team one")
    monkeypatch.chdir(tmp_path / "two")
    assert fs.cat_file(str(tmp_path / "x.gc")) == b"team one"
    assert pickle.loads(pickle.dumps(fs)).cat_file(str(tmp_path / "x.gc")) == b"team one"
    assert fs.storage_options["keyset"] == str(tmp_path / "one" / "team.json")
    there = fsspec.filesystem("gpucrypt", target_protocol="file", keyset="team.json")
    assert there is not fs
    assert there.storage_options["keyset"] == str(tmp_path / "two" / "team.json")
    with pytest.raises(NoMatchingRecipient):
        there.cat_file(str(tmp_path / "x.gc"))
    secret = Keyset.load(tmp_path / "one" / "team.json").primary.secret_bytes()
    # what the pickle and fsspec's token (a digest of these arguments) are made of
    assert secret not in pickle.dumps(fs) and secret.hex() not in repr(fs.storage_options)


def test_cp_file_on_a_local_target_replaces_the_destination_at_once(keys, tmp_path):
    """The local target's cp_file truncated the destination and rewrote it in place: a
    copy cut short left it clobbered, and a reader holding it saw the new bytes."""
    fs = local_fs(keys)
    fs.pipe_file(str(tmp_path / "new.gc"), b"new" * 1000)
    fs.pipe_file(str(tmp_path / "old.gc"), b"old" * 1000)
    old_key = _keyset_data_key(keys, str(tmp_path / "old.gc"))
    with open(tmp_path / "old.gc", "rb") as held:
        fs.cp_file(str(tmp_path / "new.gc"), str(tmp_path / "old.gc"))
        assert stream.open(held, old_key).read() == b"old" * 1000
    assert fs.cat_file(str(tmp_path / "old.gc")) == b"new" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.gc", "old.gc"]


def test_exclusive_create_points_to_create_mode_and_open_files_refuse_pickling(keys, memory):
    fs, folder = memory
    with pytest.raises(ValueError, match=r"exclusive create.*mode='create'"):
        fs.open(f"{folder}/x.gc", "xb")
    fs.pipe_file(f"{folder}/x.gc", b"SECRET-PLAINTEXT", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{folder}/x.gc", b"again", mode="create")
    with fs.open(f"{folder}/x.gc", "rb") as reader, pytest.raises(TypeError, match="reader"):
        pickle.dumps(reader)
    for mode, data in (("wb", b"WRITER-PLAINTEXT"), ("w", "WRITER-PLAINTEXT")):
        with fs.open(f"{folder}/y.gc", mode) as writer:
            writer.write(data)
            with pytest.raises(TypeError, match="holds the plaintext"):
                pickle.dumps(writer)
    with fs.open(f"{folder}/z.gc.gz", "wb", compression="gzip") as writer:
        with pytest.raises(TypeError, match="holds the plaintext"):
            pickle.dumps(writer)


@pytest.mark.parametrize("options", [{"kyeset": "team.json"}, {"key": b"k" * 32}])
def test_an_option_the_filesystem_does_not_take_is_refused_not_dropped(options):
    """A typo (kyeset=) or key bytes (key=) were dropped without a word, and the user was
    told later that no key reference was given."""
    import fsspec

    with pytest.raises(TypeError, match="unexpected option.*keys are named by reference"):
        fsspec.filesystem("gpucrypt", target_protocol="memory", skip_instance_cache=True,
                          **options)


@pytest.mark.parametrize("target", ["file", "memory"])
def test_cat_and_a_mappers_getitems_raise_a_failing_file_whatever_on_error_says(
        keys, tmp_path, target, request):
    """fsspec's own ``cat`` treats every error as a missing file: ``on_error="omit"`` left
    a tampered file out without a word, and so did a mapper's ``getitems(on_error="omit")``
    (zarr v2's reads: a tampered chunk read as missing, its fill value). A file that fails
    as a gpucrypt file raises whatever ``on_error`` says; a missing one is still left out
    or returned, as fsspec does."""
    base = str(tmp_path) if target == "file" else "/" + re.sub(r"\W", "_", request.node.name)
    fs = fsspec.filesystem("gpucrypt", target_protocol=target, keyset=keys["keyset"],
                           segment_size=SEGMENT)
    good, missing = f"{base}/store/good", f"{base}/store/missing"
    fs.makedirs(f"{base}/store", exist_ok=True)
    fs.pipe_file(good, b"g" * 9000)
    failing = {stream.AuthenticationError: f"{base}/store/tampered",
               stream.TruncatedError: f"{base}/store/cut",
               stream.FormatError: f"{base}/store/plain",
               NoMatchingRecipient: f"{base}/store/foreign"}
    fs.pipe_file(failing[stream.AuthenticationError], b"t" * 9000)
    fs.fs.pipe_file(failing[stream.AuthenticationError],
                    _flip(fs.fs.cat_file(failing[stream.AuthenticationError]), -100))
    fs.pipe_file(failing[stream.TruncatedError], b"c" * 9000)
    fs.fs.pipe_file(failing[stream.TruncatedError],
                    fs.fs.cat_file(failing[stream.TruncatedError])[:-(9000 - 2 * SEGMENT + 16)])
    fs.fs.pipe_file(failing[stream.FormatError], b"not a gpucrypt file at all")
    fsspec.filesystem("gpucrypt", target_protocol=target, recipients=keys["recipient"]).pipe_file(
        failing[NoMatchingRecipient], b"for another key")
    mapper = fs.get_mapper(f"{base}/store")
    for error, path in failing.items():
        for on_error in ("omit", "return"):
            with pytest.raises(error, match=re.escape(path)):
                fs.cat([good, path, missing], on_error=on_error)
            with pytest.raises(error, match=re.escape(path)):
                mapper.getitems(["good", posixpath.basename(path)], on_error=on_error)
        with pytest.raises(error, match=re.escape(path)):
            fs.cat([good, path])  # on_error="raise": as fsspec

    assert fs.cat([good, missing], on_error="omit") == {good: b"g" * 9000}
    returned = fs.cat([good, missing], on_error="return")
    assert returned[good] == b"g" * 9000 and isinstance(returned[missing], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        fs.cat([good, missing])
    assert fs.cat(good) == b"g" * 9000  # one file named: its bytes, as fsspec gives them
    assert mapper.getitems(["good", "missing"], on_error="omit") == {"good": b"g" * 9000}
    if target == "memory":
        fs.fs.rm(base, recursive=True)


def test_get_file_refuses_to_decrypt_a_local_file_onto_itself(keys, tmp_path):
    """``stream.decrypt`` refuses one file as input and output only when given two paths;
    ``get_file`` hands it the source as a file object, so ``get_file(p, p)`` replaced the
    only ciphertext with its plaintext."""
    fs = local_fs(keys)
    path = str(tmp_path / "a.gc")
    fs.pipe_file(path, b"A" * 100)
    stored = (tmp_path / "a.gc").read_bytes()
    for same in (path, str(tmp_path / "sub" / ".." / "a.gc")):
        with pytest.raises(ValueError, match=r"src and dst are the same file.*another path"):
            fs.get_file(path, same)
    os.link(path, tmp_path / "hard.gc")  # another name of the same file
    with pytest.raises(ValueError, match="same file"):
        fs.get_file(path, str(tmp_path / "hard.gc"))
    assert (tmp_path / "a.gc").read_bytes() == stored and not (tmp_path / "sub").exists()
    fs.get_file(path, str(tmp_path / "a.bin"))  # another file: decrypted there
    assert (tmp_path / "a.bin").read_bytes() == b"A" * 100


def test_a_stream_cut_inside_its_header_is_listed_truncated(keys, tmp_path):
    """A stream cut inside its header was listed ``"encrypted": False``, as if it were
    some other file, while opening it raised TruncatedError; a file shorter than the
    magic, or with other magic bytes, is still no stream."""
    fs = local_fs(keys)
    fs.pipe_file(str(tmp_path / "whole.gc"), b"x" * 1000)
    stored = (tmp_path / "whole.gc").read_bytes()
    header_length = stream.read_header(stored).header_length
    for cut in (len(b"GPUCRYPT"), 40, header_length - 1):  # the magic whole, and more
        path = str(tmp_path / f"cut{cut}.gc")
        with open(path, "wb") as f:
            f.write(stored[:cut])
        entry = fs.info(path)
        assert entry["truncated"] and entry["encrypted"] and entry["size"] == cut
        with pytest.raises(stream.TruncatedError, match=re.escape(path)):
            fs.open(path, "rb")
    for name, data in (("short", stored[:3]), ("other", b"PK\x03\x04" + bytes(60))):
        (tmp_path / name).write_bytes(data)
        entry = fs.info(str(tmp_path / name))
        assert entry["encrypted"] is False and "truncated" not in entry


def test_key_arguments_given_win_over_the_fsspec_configs_keys_whole(keys, tmp_path, monkeypatch):
    """With fsspec's config naming a keyset (``FSSPEC_GPUCRYPT_KEYSET=...``), a filesystem
    given ``keys=KeyReferences(...)`` was refused ("give keys= or keyset=..., not both"),
    and so was every ``gpucrypt.ray.read_encrypted``, which passes ``keys=``. The caller's
    keys replace the config's whole, in either spelling."""
    from fsspec.config import conf

    from gpucrypt.keys.portable import KeyReferences

    other = tmp_path / "other.json"
    Keyset.generate().save(other)
    monkeypatch.setitem(conf, "gpucrypt", {"keyset": str(other)})  # restored after
    path = str(tmp_path / "a.gc")
    local_fs(keys).pipe_file(path, b"for the keys given")
    by_keys = fsspec.filesystem("gpucrypt", target_protocol="file",
                                keys=KeyReferences(keyset=keys["keyset"]))
    assert by_keys.keys.keyset == keys["keyset"] and by_keys.cat_file(path) == b"for the keys given"
    direct = gfs.GpucryptFileSystem(target_protocol="file",  # as read_encrypted makes it
                                    keys=KeyReferences(identities=[keys["identity"]]))
    assert direct.keys.keyset is None and list(direct.keys.identities) == [keys["identity"]]
    again = pickle.loads(pickle.dumps(direct))  # the config applied again where unpickled
    assert again.keys.keyset is None and not again._keys().can_encrypt()
    # key objects (not cached by their text) take the same way
    provider_key = WrappingKey.from_provider(EnvKeyProvider("k", "GC17_NO_SUCH_VARIABLE"), "k")
    by_object = fsspec.filesystem("gpucrypt", target_protocol="file",
                                  keys=KeyReferences(identities=[provider_key]))
    assert by_object.keys.keyset is None

    monkeypatch.setitem(conf, "gpucrypt", {"keys": KeyReferences(keyset=str(other))})
    by_keyset = fsspec.filesystem("gpucrypt", target_protocol="file", keyset=keys["keyset"])
    assert by_keyset.keys.keyset == keys["keyset"] and by_keyset.cat_file(path)
    assert fsspec.filesystem("gpucrypt", target_protocol="file").keys.keyset == str(other)
    with pytest.raises(TypeError, match="not both"):  # both given by the caller: its slip
        fsspec.filesystem("gpucrypt", target_protocol="file", keyset=keys["keyset"],
                          keys=KeyReferences(keyset=keys["keyset"]))


@pytest.mark.parametrize("cache", ["filecache", "simplecache", "blockcache"])
def test_a_cache_above_gpucrypt_is_refused_and_keeps_no_plaintext(keys, tmp_path, cache):
    """``filecache::`` and ``simplecache::`` over gpucrypt downloaded whole files into
    their cache folder, decrypted (only blockcache reached a refusal, on ``blocksize``).
    Every read through one of fsspec's caching filesystems is refused; below gpucrypt the
    cache holds ciphertext and reads back the data."""
    target = f"{tmp_path}/x.gc"
    data = os.urandom(50_000)
    local_fs(keys).pipe_file(target, data)
    storage = tmp_path / "cache"
    reads = {
        "open": lambda c: c.open(target, "rb").read(),
        "cat_file": lambda c: c.cat_file(target),
        "cat": lambda c: c.cat([target]),
        "get": lambda c: c.get(target, str(tmp_path / "got")),
    }
    for made_by in ("chained", "fs="):
        if made_by == "chained":
            caching = fsspec.core.url_to_fs(f"{cache}::gpucrypt::file://{target}",
                                            gpucrypt={"keyset": keys["keyset"]},
                                            **{cache: {"cache_storage": str(storage)}})[0]
        else:
            caching = fsspec.filesystem(cache, fs=local_fs(keys), cache_storage=str(storage),
                                        skip_instance_cache=True)
        for read in reads.values():
            with pytest.raises(ValueError, match=f"not cached above gpucrypt.*{cache}::gpucrypt"
                                                 f".*put the cache below"):
                read(caching)
    assert not any(data[:64] in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
                   and p.name != "x.gc")

    if cache == "blockcache":
        return  # below gpucrypt over a local file it fails in fsspec itself, on close
        # (its close_and_update sets LocalFileOpener.closed, a property without a setter)
    with fsspec.open(f"gpucrypt::{cache}::file://{target}", "rb",
                     gpucrypt={"keyset": keys["keyset"]},
                     **{cache: {"cache_storage": str(tmp_path / "below")}}) as f:
        assert f.read() == data
    cached = [p for p in (tmp_path / "below").rglob("*") if p.is_file()]
    assert cached and not any(data[:64] in p.read_bytes() for p in cached)


@pytest.mark.parametrize("target", ["file", "memory"])
def test_only_a_missing_file_follows_on_error_a_bad_envelope_or_lost_keys_raise(
        tmp_path, target, request):
    """``on_error`` was applied to every error but a failing stream's: a file whose
    envelope was tampered with (``EnvelopeError``), and every file once the keyset file
    was moved away (``KeysetError``), were left out by ``cat(on_error="omit")`` and a
    mapper's ``getitems(on_error="omit")`` (zarr read the chunk, or the whole array, as
    fill values) and returned by ``cat_ranges``. Only a missing file follows ``on_error``;
    the envelope's error starts with the file's path."""
    from gpucrypt.keys import EnvelopeError, KeysetError

    keyset = tmp_path / "keyset.json"
    Keyset.generate().save(keyset)
    base = str(tmp_path) if target == "file" else "/" + re.sub(r"\W", "_", request.node.name)
    fs = fsspec.filesystem("gpucrypt", target_protocol=target, keyset=str(keyset))
    good, bad, missing = (f"{base}/store/{name}" for name in ("good", "bad", "missing"))
    fs.makedirs(f"{base}/store", exist_ok=True)
    fs.pipe_file(good, b"g" * 100)
    fs.pipe_file(bad, b"b" * 100)
    stored = fs.fs.cat_file(bad)
    envelope_at = stored.index(stream.read_header(stored).envelope)
    fs.fs.pipe_file(bad, _flip(stored, envelope_at + 2))  # the envelope's magic
    mapper = fs.get_mapper(f"{base}/store")
    starts_with_bad = "^" + re.escape(f"{bad}: ")
    for on_error in ("omit", "return"):
        with pytest.raises(EnvelopeError, match=starts_with_bad):
            fs.cat([good, bad, missing], on_error=on_error)
        with pytest.raises(EnvelopeError, match=starts_with_bad):
            mapper.getitems(["good", "bad"], on_error=on_error)
    with pytest.raises(EnvelopeError, match=starts_with_bad):
        fs.cat_ranges([good, bad], [0, 0], [5, 5], on_error="return")

    # missing files still follow on_error, as fsspec has them
    assert fs.cat([good, missing], on_error="omit") == {good: b"g" * 100}
    assert mapper.getitems(["good", "missing"], on_error="omit") == {"good": b"g" * 100}
    ranges = fs.cat_ranges([good, missing], [0, 0], [5, 5], on_error="return")
    assert ranges[0] == b"ggggg" and isinstance(ranges[1], FileNotFoundError)

    os.rename(keyset, tmp_path / "moved.json")  # the keys cannot be loaded any more
    for on_error in ("omit", "return"):
        with pytest.raises(KeysetError, match="^" + re.escape(f"{good}: ")):
            fs.cat([missing, good], on_error=on_error)
        with pytest.raises(KeysetError, match="no such file"):
            mapper.getitems(["good"], on_error=on_error)
    with pytest.raises(KeysetError, match="no such file"):
        fs.cat_ranges([good], [0], [5], on_error="return")
    if target == "memory":
        fs.fs.rm(base, recursive=True)


class _OwnKeyError(KeyManagementError):
    """A provider's own key error, whose constructor takes other arguments than a message."""

    def __init__(self, code, text):
        super().__init__(f"{code}: {text}")


def _provider_errors():
    from gpucrypt.keys.awskms import _NoRegion

    return {"connection": ConnectionError("kms unreachable"),
            "timeout": TimeoutError("kms timed out"), "runtime": RuntimeError("boom"),
            "missing": FileNotFoundError(2, "no credentials file"),
            "own-class": _OwnKeyError(7, "token locked"),
            "gpucrypt-class": _NoRegion("no region for aws-kms:team")}


@pytest.mark.parametrize("kind", list(_provider_errors()))
def test_a_key_providers_own_error_is_said_as_the_files(memory, kind):
    """A key provider that fails (a KMS down: ``ConnectionError``, ``TimeoutError``; any
    error of its own) raised its error bare, without the data file's path, where every
    other failure of a read starts with it; and gpucrypt's own key errors from outside
    ``gpucrypt._errors`` (``_NoRegion``) were re-raised unnamed too. Now a provider's error
    is a ``KeyProviderError`` starting with the path, chained from it; gpucrypt's own
    classes keep their class, the path leading their message. None is left out as a
    missing file."""
    from gpucrypt.keys import KeyProviderError

    fs, folder = memory
    failure = _provider_errors()[kind]

    class Provider:
        fail = None

        def get_key(self, key_id):
            if Provider.fail is not None:
                raise Provider.fail
            return bytes(range(32))

    key = WrappingKey.from_provider(Provider(), "team")
    path = f"{folder}/0.0"
    fsspec.filesystem("gpucrypt", target_protocol="memory", identities=[key],
                      recipients=[key]).pipe_file(path, b"hello")
    Provider.fail = failure
    reader = fsspec.filesystem("gpucrypt", target_protocol="memory", identities=[key],
                               recipients=[key])
    expected = type(failure) if kind == "gpucrypt-class" else KeyProviderError
    for read in (lambda: reader.cat([path], on_error="omit"), lambda: reader.cat_file(path),
                 lambda: reader.open(path, "rb")):
        with pytest.raises(expected, match="^" + re.escape(f"{path}: ")) as raised:
            read()
        if kind != "gpucrypt-class":
            assert raised.value.__cause__ is failure
            assert f"({type(failure).__name__}: {failure})" in str(raised.value)


@pytest.mark.parametrize("cache", ["filecache", "simplecache", "blockcache"])
def test_a_cache_over_a_dir_prefix_of_gpucrypt_is_refused_too(keys, tmp_path, cache):
    """A cache over ``dir::`` over gpucrypt was not recognised (the frame above gpucrypt's
    was DirFileSystem's, not the cache's): the whole plaintext file was kept in its cache
    folder. The cache's targets are followed down to gpucrypt, made by ``fs=`` or by a
    chained URL."""
    from fsspec.implementations.dirfs import DirFileSystem

    folder = tmp_path / "data"
    folder.mkdir()
    data = os.urandom(20_000)
    local_fs(keys).pipe_file(str(folder / "x.gc"), data)
    reads = (lambda c: c.open("x.gc", "rb").read(), lambda c: c.cat_file("x.gc"),
             lambda c: c.cat(["x.gc"]), lambda c: c.get("x.gc", str(tmp_path / "got")))
    for i, read in enumerate(reads):
        # a cache each (a blockcache keeps a refused block as fetched, its zeros, and
        # would read them back without asking gpucrypt again)
        storage = str(tmp_path / f"cache{i}")
        by_fs = fsspec.filesystem(cache, fs=DirFileSystem(path=str(folder), fs=local_fs(keys)),
                                  cache_storage=storage + "-fs", skip_instance_cache=True)
        by_url = fsspec.core.url_to_fs(f"{cache}::dir::gpucrypt::file://{folder}",
                                       gpucrypt={"keyset": keys["keyset"]},
                                       dir={"path": str(folder)},
                                       **{cache: {"cache_storage": storage + "-url"}})[0]
        for caching in (by_fs, by_url):
            assert isinstance(caching.fs, DirFileSystem)
            with pytest.raises(ValueError, match=f"not cached above gpucrypt.*{cache}::gpucrypt"):
                read(caching)
    assert not any(data[:64] in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
                   and p.name != "x.gc")
    # the same filesystems, no cache above: read as before
    assert DirFileSystem(path=str(folder), fs=local_fs(keys)).cat_file("x.gc") == data


@pytest.mark.parametrize("cache", ["filecache", "simplecache", "blockcache"])
def test_a_cache_over_a_reference_filesystem_of_gpucrypt_is_refused(keys, tmp_path, cache):
    """kerchunk's references over gpucrypt (``ReferenceFileSystem(refs, fs={"gpucrypt":
    gpucrypt_fs})``) under a cache were not recognised: the frames between the cache's
    and gpucrypt's were fsspec's reference module, which ended the look, and the
    reference filesystem keeps its targets in ``.fss``, not ``.fs``. The whole plaintext
    file was kept in the cache folder. Now refused; the same references read as before
    with no cache above them."""
    from fsspec.implementations.reference import ReferenceFileSystem

    target = str(tmp_path / "x.gc")
    data = os.urandom(20_000)
    local_fs(keys).pipe_file(target, data)
    refs = {"version": 1, "refs": {"whole": [f"gpucrypt://{target}"],
                                   "part": [f"gpucrypt://{target}", 100, 50]}}

    def references():
        return ReferenceFileSystem(refs, fs={"gpucrypt": local_fs(keys)},
                                   skip_instance_cache=True)

    reads = (lambda c: c.open("whole", "rb").read(), lambda c: c.cat_file("whole"),
             lambda c: c.cat(["whole", "part"]),
             lambda c: c.get_mapper("").getitems(["whole", "part"]))
    for i, read in enumerate(reads):
        caching = fsspec.filesystem(cache, fs=references(), skip_instance_cache=True,
                                    cache_storage=str(tmp_path / f"cache{i}"))
        with pytest.raises(Exception) as raised:  # the refusal, or ReferenceNotReachable
            read(caching)                         # from it
        if cache == "blockcache" and i >= 2:
            # blockcache's cat_ranges takes the reference filesystem's on_error="return"
            # answer (a ReferenceNotReachable from the refusal) for a block, and fails on it
            assert isinstance(raised.value, TypeError), raised.value
            continue
        refusal = raised.value.__cause__ or raised.value
        assert isinstance(refusal, ValueError) and re.search(
            f"not cached above gpucrypt.*{cache}::gpucrypt.*put the cache below", str(refusal))
    assert not any(data[:64] in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
                   and p.name != "x.gc")
    # no cache above: the references read gpucrypt's plaintext, whole and by range
    assert references().cat_file("whole") == data
    assert references().cat(["whole", "part"]) == {"whole": data, "part": data[100:150]}
    assert references().get_mapper("").getitems(["part"]) == {"part": data[100:150]}
    with references().open("whole", "rb") as f:
        assert f.read() == data


def test_the_cache_check_keeps_none_of_the_callers_locals_alive(memory):
    """The check for a cache above read ``f_locals`` of the frame that called gpucrypt:
    on Python 3.11 that snapshot kept the caller's locals alive after the caller deleted
    them (a plaintext buffer, until the caller returned). Only frames of fsspec's caches
    are read."""
    import gc
    import weakref

    fs, folder = memory
    fs.pipe_file(f"{folder}/a", b"x")

    class Plaintext:
        pass

    def caller():
        buffer = Plaintext()
        alive = weakref.ref(buffer)
        fs.open(f"{folder}/a", "rb").close()
        fs.cat_file(f"{folder}/a")
        del buffer
        gc.collect()
        return alive() is None

    assert caller()


def test_get_file_refuses_the_stored_file_itself_under_wrappers_and_file_urls(
        keys, tmp_path, monkeypatch):
    """``get_file(p, p)`` was refused only over a plain local target: under ``dir::`` or
    with a simplecache below gpucrypt it replaced the only ciphertext with its
    plaintext. And an ``lpath`` given as ``file:///...`` was not stripped: the plaintext
    went to ``./file:/...``. The files are compared (the descriptor read, the local file
    a wrapped local target stores) before anything is written."""
    from fsspec.implementations.dirfs import DirFileSystem

    path = tmp_path / "a.gc"
    local_fs(keys).pipe_file(str(path), b"A" * 100)
    stored = path.read_bytes()
    in_dir = fsspec.filesystem("gpucrypt", keyset=keys["keyset"],
                               fs=DirFileSystem(path=str(tmp_path), fs=LocalFileSystem()))
    cache_below = fsspec.filesystem(
        "gpucrypt", keyset=keys["keyset"],
        fs=fsspec.filesystem("simplecache", target_protocol="file",
                             cache_storage=str(tmp_path / "below"), skip_instance_cache=True))
    monkeypatch.chdir(tmp_path)
    for fs, rpath in ((in_dir, "a.gc"), (cache_below, str(path)), (local_fs(keys), str(path))):
        for lpath in (str(path), f"file://{path}"):
            with pytest.raises(ValueError, match="same file"):
                fs.get_file(rpath, lpath)
            assert path.read_bytes() == stored
    local_fs(keys).get_file(str(path), f"file://{tmp_path}/b.bin")
    assert (tmp_path / "b.bin").read_bytes() == b"A" * 100
    assert not (tmp_path / "file:").exists()


def test_an_explicit_keys_none_wins_over_the_fsspec_configs_keyset(keys, monkeypatch):
    """``keys=None`` given beside a configured keyset still took the config's keyset,
    though explicit key arguments win, ``None`` included: it names no keys now (refused
    alone, as without a config), and beside ``identities=`` reads only."""
    from fsspec.config import conf

    monkeypatch.setitem(conf, "gpucrypt", {"keyset": keys["keyset"]})  # restored after
    with pytest.raises(ValueError, match="no key reference given"):
        fsspec.filesystem("gpucrypt", target_protocol="memory", keys=None)
    reader = fsspec.filesystem("gpucrypt", target_protocol="memory", keys=None,
                               identities=[keys["identity"]])
    assert reader.keys.keyset is None and not reader._keys().can_encrypt()
    assert fsspec.filesystem("gpucrypt", target_protocol="memory").keys.keyset == keys["keyset"]


def test_a_writer_opened_while_handling_is_discarded_when_that_exception_is_raised_again(
        keys, tmp_path, caplog):
    """A writer opened inside an ``except`` clause publishes when its block ends normally
    (the handled exception raised and caught again inside the clause included: a helper
    that sorts exceptions by raising them), and is discarded when the block fails by
    raising the handled exception again out of a ``with`` block: the writer's own, or
    ``fsspec.open``'s (whose ``__exit__`` closes the file without passing the exception
    on). Raised again and closed by a plain ``close()`` it publishes, as documented: that
    close cannot be told from the normal end above."""
    fs = local_fs(keys)
    path = str(tmp_path / "report.gc")
    options = {"gpucrypt": {"keyset": keys["keyset"]}}
    url = f"gpucrypt::file://{path}"

    def reraise(exc):
        raise exc

    def fails_while_handling(write):
        fs.pipe_file(path, b"OLD complete report")
        with pytest.raises(ValueError, match="input bad"):
            try:
                raise ValueError("input bad")
            except ValueError as exc:
                write(exc)
        assert fs.cat_file(path) == b"OLD complete report"

    def through_open_file(exc, mode="wb"):
        with fsspec.open(url, mode, **options) as f:
            f.write(b"NEW half" if mode == "wb" else "NEW half")
            raise

    def through_its_own_with(exc):
        with fs.open(path, "wb") as f:
            f.write(b"NEW half")
            raise

    def reraised_by_a_function_in_its_with(exc):
        with fs.open(path, "wb") as f:
            f.write(b"NEW half")
            reraise(exc)

    with caplog.at_level("WARNING", logger="gpucrypt.fs"):
        fails_while_handling(through_open_file)
        fails_while_handling(lambda exc: through_open_file(exc, "w"))
        fails_while_handling(through_its_own_with)
        fails_while_handling(reraised_by_a_function_in_its_with)
    # logged by each close that discarded (its own with block discards without a word)
    assert caplog.text.count("discarded, not published") == 2

    # raised and caught again inside the clause, then written and closed: published
    for sort in (reraise, lambda exc: reraise(exc.with_traceback(None))):
        try:
            raise KeyError("missing")
        except KeyError as exc:
            f = fs.open(path, "wb")
            try:
                sort(exc)
            except KeyError:
                pass  # sorted: this one is expected, the report goes on
            f.write(b"report after sorting")
            f.close()
        assert fs.cat_file(path) == b"report after sorting"

    # opened there and ended normally: published, by fsspec.open's block and by close()
    for mode, data in (("wb", b"report A"), ("w", "report B")):
        try:
            raise ValueError("input bad")
        except ValueError:
            with fsspec.open(url, mode, **options) as f:
                f.write(data)
        assert fs.cat_file(path) == (data if mode == "wb" else data.encode())
    try:
        raise ValueError("input bad")
    except ValueError:
        f = fs.open(path, "wb")
        f.write(b"report C")
        f.close()
    assert fs.cat_file(path) == b"report C"


def test_an_io_wrapper_collected_unclosed_does_not_publish(keys, tmp_path, caplog):
    """A writer wrapped in io's TextIOWrapper or BufferedWriter whose export fails: the
    wrapper's finaliser closes the writer once the failure is handled, with nothing in
    sys.exc_info(); io tells the file (``_dealloc_warn``), which is then discarded. A
    wrapper closed by the caller publishes."""
    import gc
    import io

    fs = local_fs(keys)
    path = str(tmp_path / "report.csv.gc")
    old = b"id\n" + b"".join(b"%d\n" % i for i in range(100))

    def rows():
        for i in range(100):
            if i == 10:
                raise ValueError("bad row 10")
            yield f"{i}\n"

    wrappers = {"text": lambda raw: io.TextIOWrapper(raw, encoding="utf-8"),
                "text over buffered": lambda raw: io.TextIOWrapper(io.BufferedWriter(raw),
                                                                   encoding="utf-8"),
                "buffered": lambda raw: io.TextIOWrapper(io.BufferedWriter(raw),
                                                         encoding="utf-8").detach()}

    def export(wrap, close):
        f = wrap(fs.open(path, "wb"))
        text = not isinstance(f, io.BufferedWriter)
        f.write("id\n" if text else b"id\n")
        for row in rows() if not close else (f"{i}\n" for i in range(5)):
            f.write(row if text else row.encode())
        if close:
            f.close()

    for name, wrap in wrappers.items():
        fs.pipe_file(path, old)
        with caplog.at_level("WARNING", logger="gpucrypt.fs"):
            with pytest.raises(ValueError, match="bad row 10"):
                export(wrap, close=False)
            gc.collect()
        assert fs.cat_file(path) == old, name
        assert "was collected without being closed" in caplog.text
        caplog.clear()
        export(wrap, close=True)
        assert fs.cat_file(path) == b"id\n0\n1\n2\n3\n4\n", name


class _VersionedRangeHandler(_RangeHandler):
    """:class:`_RangeHandler` that also sends ``server.headers[path]`` (Last-Modified,
    ETag, ...) with every response."""

    def end_headers(self):
        for name, value in self.server.headers.get(self.path, {}).items():
            self.send_header(name, value)
        super().end_headers()


def test_info_over_http_reads_a_replaced_file_again(keys):
    """A file replaced by another of the same stored size but another header length (a
    keyset-only file by one also sealed for a recipient) gets its own plaintext size:
    over a server that sends Last-Modified (what fsspec's http info reports, under that
    name), and over one that sends no version at all (then nothing is remembered)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _VersionedRangeHandler)
    server.files, server.served, server.headers = {}, [], {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        writer = fsspec.filesystem("gpucrypt", target_protocol="memory",
                                   keyset=keys["keyset"])
        for_recipient = fsspec.filesystem("gpucrypt", target_protocol="memory",
                                          keyset=keys["keyset"],
                                          recipients=[keys["recipient"]])
        writer.pipe_file("/gc17http/a", b"x" * 1000)
        first = writer.fs.cat_file("/gc17http/a")
        for_recipient.pipe_file("/gc17http/probe", b"")
        longer_header = len(writer.fs.cat_file("/gc17http/probe")) - 16
        n = len(first) - 16 - longer_header
        for_recipient.pipe_file("/gc17http/b", b"y" * n)
        second = writer.fs.cat_file("/gc17http/b")
        writer.fs.rm("/gc17http", recursive=True)
        assert len(first) == len(second) and n != 1000

        fs = fsspec.filesystem("gpucrypt", target_protocol="http", keyset=keys["keyset"])
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name, versions in (("/lastmod.gc", ("Sat, 05 Dec 2026 20:40:45 GMT",
                                                "Sat, 05 Dec 2026 20:40:46 GMT")),
                               ("/unversioned.gc", None)):
            url = base + name
            for stored, size, version in ((first, 1000, versions and versions[0]),
                                          (second, n, versions and versions[1])):
                server.files[name] = stored
                if version:
                    server.headers[name] = {"Last-Modified": version}
                    assert fs.fs.info(url)["Last-Modified"] == version
                info = fs.info(url)
                assert (info["size"], info["stored_size"]) == (size, len(stored)), name
                assert len(fs.cat_file(url)) == size
    finally:
        server.shutdown()
        server.server_close()


def test_a_text_writer_can_be_discarded(keys, tmp_path):
    """``discard()``, documented for every writer, on text-mode ones (plain and
    compressed) too: nothing is published, the text not yet flushed included."""
    import gc

    fs = local_fs(keys)
    path = str(tmp_path / "d.gc")
    for compression in (None, "gzip"):
        fs.pipe_file(path, b"old")
        f = fs.open(path, "w", compression=compression)
        f.write("new text")
        f.discard()
        assert f.closed
        f.close()  # nothing more to do
        del f
        gc.collect()
        assert fs.cat_file(path) == b"old"
        with fs.open(path, "w", compression=compression) as f:
            f.write("new text")
            f.discard()
        assert fs.cat_file(path) == b"old"
        assert sorted(os.listdir(tmp_path)) == ["d.gc"]  # no temporary file left


@pytest.mark.parametrize("target", ["file", "memory"])
def test_a_misspelt_write_option_is_refused_not_dropped(keys, tmp_path, target, request):
    """``algoritm=``, ``segmentsize=`` given to ``open(..., "wb")``, ``pipe_file`` or
    ``put_file`` are refused (``TypeError``, the likely name suggested) before anything
    is written, as the constructor refuses them; what fsspec's open takes still goes."""
    base = str(tmp_path) if target == "file" else "/" + re.sub(r"\W", "_", request.node.name)
    fs = fsspec.filesystem("gpucrypt", target_protocol=target, keyset=keys["keyset"])
    path = f"{base}/o.gc"
    fs.pipe_file(path, b"old")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"plain")
    for call in (lambda: fs.open(path, "wb", algoritm="aes-256-gcm"),
                 lambda: fs.open(path, "w", algoritm="aes-256-gcm"),
                 lambda: fs.pipe_file(path, b"new", segmentsize=1 << 20),
                 lambda: fs.put_file(str(plain), path, algoritm="aes-256-gcm"),
                 lambda: fs.put_file(str(plain), f"{base}/new.gc", algoritm="aes-256-gcm")):
        with pytest.raises(TypeError, match=r"algoritm= \(did you mean algorithm=\?\)|"
                                            r"segmentsize= \(did you mean segment_size=\?\)"):
            call()
    assert fs.cat_file(path) == b"old" and not fs.exists(f"{base}/new.gc")
    with fs.open(path, "wb", block_size=1 << 20, cache_type="none", cache_options={},
                 autocommit=True, algorithm="aes-256-gcm") as f:
        f.write(b"new")
    assert fs.cat_file(path) == b"new"
    assert stream.read_header(fs.fs.cat_file(path)).algorithm == "aes-256-gcm"
    if target == "memory":
        fs.fs.rm(base, recursive=True)


def test_a_file_replaced_while_open_is_said_to_have_changed_not_to_be_tampered(keys, memory,
                                                                                 tmp_path):
    """A reader open while its file is replaced (memory: every read is a range of what
    the path holds now) or rewritten in place (local) fails authentication; the error
    says the file changed since it was opened, and to open it again. A file tampered
    with before it was opened gets no such excuse."""
    fs, folder = memory
    path = f"{folder}/r.gc"
    fs.pipe_file(path, b"old" * 5000, segment_size=SEGMENT)
    with fs.open(path, "rb") as f:
        fs.pipe_file(path, b"new" * 5000, segment_size=SEGMENT)
        with pytest.raises(stream.AuthenticationError,
                           match="changed since it was opened.*open it again"):
            f.read()
    assert fs.cat_file(path) == b"new" * 5000

    local = local_fs(keys)
    path = str(tmp_path / "r.gc")
    local.pipe_file(path, b"old" * 5000, segment_size=SEGMENT)
    local.pipe_file(path + ".other", b"new" * 5000, segment_size=SEGMENT)
    other = (tmp_path / "r.gc.other").read_bytes()
    with local.open(path, "rb") as f:
        with open(path, "r+b") as raw:  # in place, as cp or shutil.copyfile rewrite it
            raw.write(other)
        with pytest.raises(stream.AuthenticationError, match="changed since it was opened"):
            f.readline()

    stored = (tmp_path / "r.gc.other").read_bytes()
    header_length = stream.read_header(stored).header_length
    (tmp_path / "bad.gc").write_bytes(_flip(stored, header_length + 100))  # segment 0
    with local.open(str(tmp_path / "bad.gc"), "rb") as f:
        os.chmod(tmp_path / "bad.gc", 0o600)  # the inode's ctime moves, not one byte
        os.link(tmp_path / "bad.gc", tmp_path / "bad-link.gc")
        with pytest.raises(stream.AuthenticationError) as caught:
            f.read()
    assert "changed since" not in str(caught.value)


def test_a_zip_targets_sizes_are_remembered(keys, tmp_path):
    """A zip archive's members report their CRC and time, which tell one version from
    the next: their plaintext sizes are remembered (a target that reports no version is
    asked for the header at every info, and zip's fields were not among those known)."""
    import zipfile

    fs = local_fs(keys)
    fs.pipe_file(str(tmp_path / "a.gc"), b"x" * 1000)
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as archive:
        archive.write(tmp_path / "a.gc", "a.gc")
    zipped = fsspec.filesystem("gpucrypt", target_protocol="zip",
                               target_options={"fo": str(tmp_path / "data.zip")},
                               keyset=keys["keyset"])
    reads = []
    real = type(zipped)._header
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(zipped), "_header", lambda *a: reads.append(1) or real(*a))
        for _ in range(5):
            assert zipped.info("a.gc")["size"] == 1000
    assert len(reads) == 1


def test_lines_of_an_encrypted_file_are_read_whole(keys, tmp_path):
    """Iterating a reader gives its lines, across segments, the last without a newline;
    a line that reaches a tampered segment raises with the file's name, and nothing of
    it is consumed."""
    fs = local_fs(keys, segment_size=SEGMENT)
    data = b"".join(b"%06d %s\n" % (i, b"t" * (i % 50)) for i in range(2000)) + b"last"
    path = str(tmp_path / "lines.gc")
    fs.pipe_file(path, data)
    with fs.open(path, "rb") as f:
        assert list(f) == data.splitlines(keepends=True)
        f.seek(SEGMENT - 3)
        assert f.readline(10) == data[SEGMENT - 3:SEGMENT + 7]
    stored = (tmp_path / "lines.gc").read_bytes()
    header_length = stream.read_header(stored).header_length
    (tmp_path / "bad.gc").write_bytes(_flip(stored, header_length + (SEGMENT + 16) + 10))
    with fs.open(str(tmp_path / "bad.gc"), "rb") as f:
        f.seek(SEGMENT - 3)
        with pytest.raises(stream.AuthenticationError, match=re.escape(str(tmp_path / "bad.gc"))):
            f.readline()
        assert f.tell() == SEGMENT - 3
