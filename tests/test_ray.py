"""Ray Data pipelines (gpucrypt.ray) on a real local Ray cluster, started once for the module:
a folder of a few hundred files encrypted by actors into a datasink and decrypted back byte
for byte, read back through the gpucrypt fsspec filesystem; a tampered file fails the job by
name and a failed job publishes nothing. Keys travel as references only."""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import uuid

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray Data pipelines need the [ray] extra")

from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from gpucrypt import ray as gray  # noqa: E402
from gpucrypt import stream  # noqa: E402
from gpucrypt.keys import Keyset  # noqa: E402
from gpucrypt.keys.portable import KeyReferences  # noqa: E402

FILES = 300


#: credentials for moto's S3 server: set before Ray starts, so that its workers have them
S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def cluster():
    # one local cluster for the whole module: starting Ray takes seconds on two cores
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    saved = {name: os.environ.get(name) for name in S3_ENVIRONMENT}
    os.environ.update(S3_ENVIRONMENT)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        yield
        ray.shutdown()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _s3_bucket():
    """(a boto3 client, url(prefix) -> an s3:// URL pyarrow opens) for the bucket "bkt" of
    a moto S3 server on the loopback."""
    boto3 = pytest.importorskip("boto3", reason="moto's server is driven through boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"})
        s3.create_bucket(Bucket="bkt")
        yield s3, lambda prefix: (f"s3://bkt/{prefix}?endpoint_override={host}:{port}"
                                  f"&scheme=http&region=us-east-1")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    keyset = Keyset.generate()
    path = tmp_path_factory.mktemp("keys") / "keyset.json"
    keyset.save(path)
    return str(path), keyset.primary.secret_bytes()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """FILES small files (0 to 3000 bytes, an empty one included) in three subfolders."""
    root = tmp_path_factory.mktemp("plain")
    rng = np.random.default_rng(17)
    files = {}
    for i in range(FILES):
        name = f"part{i % 3}/file{i:03d}.bin"
        data = rng.bytes(int(rng.integers(0, 3000)) if i else 0)
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
        files[name] = data
    return root, files


def _tree(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


@pytest.mark.filterwarnings("ignore:Use 'expr' instead of 'fn':UserWarning")
def test_a_local_cluster_encrypts_a_folder_reads_it_back_and_fails_by_name(cluster, keyset,
                                                                          plain, tmp_path):
    """One test, one cluster: pytest-xdist may send the tests of a module to different
    workers, and each would start its own Ray."""
    root, files = plain
    encrypted = tmp_path / "enc"

    # actors encrypt the folder; the datasink publishes gpucrypt files, no staging left
    gray.encrypt_files(root, encrypted, keyset=keyset[0], actors=2, segment_size=4096)
    tree = _tree(encrypted)
    assert sorted(tree) == sorted(name + ".gc" for name in files)
    for name, data in tree.items():
        header = stream.read_header(data)
        assert header.segment_size == 4096 and header.envelope
        # a plaintext of 16 bytes or more turns up in ~3 KiB of ciphertext by chance with
        # probability under 2**-100; a shorter one (a single byte, say) may well, and would
        # prove nothing
        assert len(files[name[:-3]]) < 16 or files[name[:-3]] not in data

    # read tasks decrypt it back, byte for byte, through the gpucrypt fsspec filesystem
    rows = gray.read_encrypted(encrypted, keyset=keyset[0], include_paths=True).take_all()
    got = {os.path.relpath(row["path"], encrypted)[:-3]: bytes(row["bytes"]) for row in rows}
    assert got == files

    # every file, names starting with "." or "_" included (Ray's own listing of a folder
    # leaves them out), both ways; an empty folder gives an empty one
    hidden = tmp_path / "hidden"
    contents = {name: name.encode() * 10 for name in
                ["a.txt", "_labels.csv", ".config", "..config", "_meta/x.json",
                 "sub/_ok.txt", "sub/..x",
                 # the staging folders' word in a user's names: files like any other
                 "notes.gpucrypt-staging-draft.txt", "old.gpucrypt-staging-1/b.txt",
                 f".gpucrypt-staging-{'0' * 32}.txt"]}
    for name, data in contents.items():
        (hidden / name).parent.mkdir(parents=True, exist_ok=True)
        (hidden / name).write_bytes(data)
    leftover = hidden / f".gpucrypt-staging-{uuid.uuid4().hex}" / "part.gc"  # a crashed job's
    # staging folder: not the folder's files
    leftover.parent.mkdir()
    leftover.write_bytes(b"half a file")
    gray.encrypt_files(hidden, tmp_path / "hidden-enc", keyset=keyset[0], actors=1)
    assert sorted(_tree(tmp_path / "hidden-enc")) == sorted(n + ".gc" for n in contents)
    gray.decrypt_files(tmp_path / "hidden-enc", tmp_path / "hidden-back", keyset=keyset[0],
                       actors=1)
    assert _tree(tmp_path / "hidden-back") == contents
    (tmp_path / "empty").mkdir()
    gray.encrypt_files(tmp_path / "empty", tmp_path / "empty-enc", keyset=keyset[0], actors=1)
    assert list((tmp_path / "empty-enc").iterdir()) == []

    # Parquet encrypted by encrypt_files (train.parquet.gc) and read back by read_parquet,
    # which keeps only ".parquet" names unless told otherwise
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({"label": [1, 2, 3]}), tmp_path / "table" / "train.parquet")
    gray.encrypt_files(tmp_path / "table", tmp_path / "table-enc", keyset=keyset[0], actors=1)
    rows = gray.read_encrypted(tmp_path / "table-enc", keyset=keyset[0],
                               reader=ray.data.read_parquet).take_all()
    assert sorted(row["label"] for row in rows) == [1, 2, 3]
    # and one encrypted under its own name (fsspec, or a sink with suffix=""), in the same folder
    os.rename(tmp_path / "table-enc" / "train.parquet.gc", tmp_path / "table-enc" / "a.parquet")
    gray.encrypt_files(tmp_path / "table", tmp_path / "table-enc2", keyset=keyset[0], actors=1)
    os.rename(tmp_path / "table-enc2" / "train.parquet.gc", tmp_path / "table-enc" / "b.parquet.gc")
    rows = gray.read_encrypted(tmp_path / "table-enc", keyset=keyset[0],
                               reader=ray.data.read_parquet).take_all()
    assert sorted(row["label"] for row in rows) == [1, 1, 2, 2, 3, 3]

    # an S3 folder (moto's server on the loopback) to a local one and back: the rows'
    # paths are the bucket's ("bkt/raw/a.txt"), not local paths under the target's rules
    with _s3_bucket() as (s3, url):
        for name, data in contents.items():
            s3.put_object(Bucket="bkt", Key=f"raw/{name}", Body=data)
        gray.encrypt_files(url("raw"), tmp_path / "from-s3", keyset=keyset[0], actors=1)
        assert sorted(_tree(tmp_path / "from-s3")) == sorted(n + ".gc" for n in contents)
        for name, data in _tree(tmp_path / "from-s3").items():
            s3.put_object(Bucket="bkt", Key=f"enc/{name}", Body=data)
        gray.decrypt_files(url("enc"), tmp_path / "back-from-s3", keyset=keyset[0], actors=1)
        assert _tree(tmp_path / "back-from-s3") == contents

    # a filter that empties a block (Ray hands the sink a block without columns) and a
    # dataset without rows (the write never starts): the rows left, or an empty folder
    refs = KeyReferences(keyset=keyset[0])
    items = [{"bytes": f"row{i}".encode(), "path": f"/in/f{i}"} for i in range(4)]
    kept = ray.data.from_items(items, override_num_blocks=2).filter(
        lambda row: row["path"] in ("/in/f0", "/in/f1"))  # a filter by expr keeps the columns
    kept.write_datasink(gray.GpucryptDatasink(str(tmp_path / "kept"), relative_to="/in",
                                              keys=refs))
    assert sorted(os.listdir(tmp_path / "kept")) == ["f0.gc", "f1.gc"]
    ray.data.from_items(items).limit(0).write_datasink(
        gray.GpucryptDatasink(str(tmp_path / "none"), keys=refs))
    assert list((tmp_path / "none").iterdir()) == []

    # a tampered file fails the job by name, and the failed job publishes nothing
    source = tmp_path / "tampered"
    source.mkdir()
    for name in sorted(tree)[:12]:
        shutil.copy(encrypted / name, source / os.path.basename(name))
    victim = sorted(source.iterdir())[4]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 1  # inside the final segment's ciphertext
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(Exception, match=re.escape(str(victim))) as caught:
        gray.decrypt_files(source, out, keyset=keyset[0], actors=1)
    assert "failed authentication" in str(caught.value)
    assert not out.exists() or list(out.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_batch_classes_round_trip_and_name_a_failing_file(keyset, plain):
    """EncryptBatch and DecryptBatch called as Ray calls them, on numpy and pandas batches
    (the cluster test runs them too, in actors)."""
    import pandas as pd

    _, files = plain
    names = sorted(files)[:20]
    batch = {"path": np.array(names), "bytes": np.array([files[n] for n in names], dtype=object)}
    sealed = gray.EncryptBatch(keyset=keyset[0], segment_size=4096)(batch)
    assert list(sealed["path"]) == names
    assert all(stream.read_header(c).envelope for c in sealed["bytes"])
    opened = gray.DecryptBatch(keyset=keyset[0])(pd.DataFrame(sealed))
    assert [bytes(b) for b in opened["bytes"]] == [files[n] for n in names]

    bad = bytearray(sealed["bytes"][7])
    bad[-1] ^= 1
    sealed["bytes"][7] = bytes(bad)
    with pytest.raises(stream.AuthenticationError, match=re.escape(names[7])):
        gray.DecryptBatch(keyset=keyset[0])(sealed)
    cut = sealed["bytes"][3]
    sealed["bytes"][3] = cut[:stream.read_header(cut).header_length]  # every segment cut off
    with pytest.raises(stream.TruncatedError, match=re.escape(names[3])):
        gray.DecryptBatch(keyset=keyset[0])(sealed)


def test_batches_without_rows_come_back_as_they_are(keyset):
    """Ray hands over an emptied block (a filter kept none of its rows) without its
    columns: no rows, nothing to encrypt or decrypt, whatever the batch format."""
    import pandas as pd
    import pyarrow as pa

    encrypt, decrypt = gray.EncryptBatch(keyset=keyset[0]), gray.DecryptBatch(keyset=keyset[0])
    for batch in (pa.table({}), {}, pd.DataFrame()):
        assert encrypt(batch) is batch and decrypt(batch) is batch


def test_values_ending_in_nul_bytes_round_trip_whole(keyset):
    """A dict of lists, as a caller may give one: the binary column must not become a
    fixed-width 'S' array, which drops trailing NUL bytes; such an array is refused."""
    values = [b"data\x00\x00", b"\x00\x00", b""]
    sealed = gray.EncryptBatch(keyset=keyset[0], segment_size=4096)(
        {"path": ["a", "b", "c"], "bytes": values})
    opened = gray.DecryptBatch(keyset=keyset[0])({"path": ["a", "b", "c"],
                                                  "bytes": list(sealed["bytes"])})
    assert [bytes(v) for v in opened["bytes"]] == values
    for array in (np.array(values), np.array(["text"])):
        with pytest.raises(TypeError, match="give the bytes as a list or an object array"):
            gray.EncryptBatch(keyset=keyset[0])({"bytes": array})


def test_arrow_batches_are_read_in_place_and_written_as_one_buffer(keyset, plain):
    """pyarrow batches (gray.BATCH_FORMAT, what the folder helpers ask Ray for): sliced and
    multi-chunk tables, binary and large_binary columns, round trip; every output file
    is a gpucrypt stream of its own, and a bad one is named."""
    import pyarrow as pa

    _, files = plain
    names = sorted(files)[:40]
    values = [files[n] * (1 + i % 5) for i, n in enumerate(names)]  # up to 4 segments
    table = pa.table({"path": names, "bytes": pa.array(values, pa.binary())})
    tables = [table, table.slice(5, 17), pa.concat_tables([table.slice(0, 9), table.slice(9)]),
              table.set_column(1, "bytes", table["bytes"].cast(pa.large_binary()))]
    encrypt, decrypt = gray.EncryptBatch(keyset=keyset[0], segment_size=4096), \
        gray.DecryptBatch(keyset=keyset[0])
    for batch in tables:
        sealed = encrypt(batch)
        blobs = sealed.column("bytes").to_pylist()
        assert sealed.column("path").to_pylist() == batch.column("path").to_pylist()
        for blob, data in zip(blobs, batch.column("bytes").to_pylist()):
            header = stream.read_header(blob)
            assert header.envelope
            assert len(blob) == header.header_length + len(data) + 16 * max(1, -(-len(data) // 4096))
        assert decrypt(sealed).column("bytes").to_pylist() == batch.column("bytes").to_pylist()
    blobs[2] = blobs[2][:-1] + bytes([blobs[2][-1] ^ 1])
    bad = sealed.set_column(1, "bytes", pa.array(blobs, pa.binary()))
    with pytest.raises(stream.AuthenticationError, match=re.escape(names[2])):
        decrypt(bad)


def test_keys_travel_as_references_not_bytes(keyset):
    path, kek = keyset
    refs = KeyReferences(keyset=path)
    blob = pickle.dumps({"keys": refs})  # what map_batches puts in the task graph
    assert kek not in blob and path.encode() in blob
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(refs.resolve())
    sink = gray.GpucryptDatasink("/tmp/unused", keys=refs)
    assert sink.prepare(b"abc", "x").startswith(b"GPUCRYPT")  # resolved in this process
    assert kek not in pickle.dumps(sink)


def test_datasinks_refuse_plaintext_and_names_outside_their_folder(tmp_path):
    sink = gray.GpucryptDatasink(str(tmp_path / "out"), relative_to=str(tmp_path / "in"))
    with pytest.raises(ValueError, match="not a gpucrypt stream"):
        sink.prepare(b"plaintext", "in/a.bin")  # never stored in the clear under a .gc name
    assert sink.name_of(str(tmp_path / "in" / "sub" / "a.bin")) == "sub/a.bin.gc"
    with pytest.raises(ValueError, match="not inside"):
        sink.name_of(str(tmp_path / "elsewhere" / "a.bin"))
    plain = gray.StagedFilesDatasink(str(tmp_path / "out"), relative_to=str(tmp_path / "in"),
                                     strip_suffix=".gc")
    assert plain.name_of(str(tmp_path / "in" / "a.bin.gc")) == "a.bin"
    # names that start with two dots are files of the folder; only ".." leaves it
    assert sink.name_of(str(tmp_path / "in" / "..config")) == "..config.gc"
    assert sink.name_of(str(tmp_path / "in" / "sub" / "..x")) == "sub/..x.gc"
    for outside in ("in/../etc/passwd", "in/..", "in/sub/../../x"):
        with pytest.raises(ValueError, match="not inside"):
            sink.name_of(str(tmp_path) + "/" + outside)
    base = gray.StagedFilesDatasink(str(tmp_path / "out"))  # no relative_to: base names
    assert base.name_of("/anywhere/..config") == "..config"


def test_relative_to_is_spelled_as_the_sources_paths_not_the_targets(tmp_path):
    """An S3 source's rows are "bkt/raw/..." whatever the sink writes to: a local target
    made relative_to "<cwd>/s3://bkt/raw" and refused every row."""
    import fsspec

    local = gray.StagedFilesDatasink(str(tmp_path / "out"), relative_to="s3://bkt/raw/")
    assert local.name_of("bkt/raw/sub/a.txt") == "sub/a.txt"
    memory = gray.StagedFilesDatasink("memory://out", relative_to=str(tmp_path / "in"),
                                      filesystem=fsspec.filesystem("memory"))
    assert memory.name_of(str(tmp_path / "in" / "a.txt")) == "a.txt"
    from_memory = gray.StagedFilesDatasink(str(tmp_path / "out"), relative_to="memory://in")
    assert from_memory.name_of("/in/a.txt") == "a.txt"


def test_a_pyarrow_filesystem_is_taken_as_rays_own_datasinks_take_it(tmp_path):
    from pyarrow.fs import LocalFileSystem

    sink = gray.StagedFilesDatasink(str(tmp_path / "out"), filesystem=LocalFileSystem())
    _publish(sink, ["a.bin"])
    os.chdir(tmp_path)  # a relative path is this folder's, not a write task's
    try:
        assert gray.StagedFilesDatasink("rel", filesystem=LocalFileSystem()).root == \
            str(tmp_path / "rel")
    finally:
        os.chdir("/")
    assert _tree(tmp_path / "out") == {"a.bin": b"a.bin"}
    with pytest.raises(TypeError, match="fsspec or a pyarrow filesystem"):
        gray.StagedFilesDatasink(str(tmp_path / "x"), filesystem=object())


@pytest.mark.parametrize("prefixed", [False, True], ids=["local", "dir-prefix"])
def test_a_local_publish_missing_files_other_nodes_wrote_publishes_nothing(tmp_path, prefixed):
    """On a cluster of several nodes a local path is each node's own disk: the files that
    write tasks elsewhere staged are not here, and publishing this node's folder reported
    success without them. dir:: over the local disk is each node's own disk as well (the
    check was made by protocol, "dir", and skipped)."""
    from types import SimpleNamespace

    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    sink = gray.StagedFilesDatasink("out", filesystem=DirFileSystem(
        str(tmp_path), LocalFileSystem())) if prefixed else \
        gray.StagedFilesDatasink(str(tmp_path / "out"))
    sink.on_write_start()
    sink.fs.pipe_file(f"{sink.staging}/here.bin", b"here")
    with pytest.raises(FileNotFoundError, match="1 of 2 file.*elsewhere.bin.*other nodes"):
        try:
            sink.on_write_complete(SimpleNamespace(write_returns=[["here.bin"],
                                                                  ["elsewhere.bin"]]))
        except Exception as exc:
            sink.on_write_failed(exc)
            raise
    # nothing published, the staging folder removed (under dir::, from the folder "out"
    # made to hold it; on the local disk it was out's sibling)
    assert os.listdir(tmp_path) == (["out"] if prefixed else [])
    assert not prefixed or os.listdir(tmp_path / "out") == []


def _publish(sink, names: list[str]) -> None:
    """What Ray does around the write tasks: start, each row written, complete, and on an
    exception of any of it, ``on_write_failed`` and the exception raised again
    (``ray.data.Dataset.write_datasink``, Ray 2.60)."""
    from types import SimpleNamespace

    try:
        sink.on_write_start()
        for name in names:
            staged = os.path.join(sink.staging, name)
            os.makedirs(os.path.dirname(staged), exist_ok=True)
            with open(staged, "wb") as f:
                f.write(name.encode())
        sink.on_write_complete(SimpleNamespace(write_returns=[names]))
    except Exception as exc:
        sink.on_write_failed(exc)
        raise


def test_a_new_local_folder_is_published_in_one_rename_an_existing_one_file_by_file(tmp_path):
    names = ["a.bin", "sub/b.bin"]
    fresh = gray.StagedFilesDatasink(str(tmp_path / "fresh"))
    assert fresh.whole and os.path.dirname(fresh.staging) == str(tmp_path)  # a sibling
    _publish(fresh, names)
    assert _tree(tmp_path / "fresh") == {n: n.encode() for n in names}
    assert sorted(os.listdir(tmp_path)) == ["fresh"]  # the staging folder became it

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.bin").write_bytes(b"old")
    existing = gray.StagedFilesDatasink(str(tmp_path / "full"))
    assert not existing.whole and os.path.dirname(existing.staging) == str(tmp_path / "full")
    _publish(existing, names)
    assert _tree(tmp_path / "full") == {"old.bin": b"old", **{n: n.encode() for n in names}}

    late = gray.StagedFilesDatasink(str(tmp_path / "late"))  # made by someone meanwhile
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "theirs.bin").write_bytes(b"theirs")
    _publish(late, names)
    assert _tree(tmp_path / "late") == {"theirs.bin": b"theirs", **{n: n.encode() for n in names}}
    assert sorted(os.listdir(tmp_path)) == ["fresh", "full", "late"]


class _AFileMadeMeanwhile(LocalFileSystem):
    """A local target where another writer makes the file ``blocker`` once ``after`` is
    moved into place: after the sink checked what is in the way, before its next move."""

    def __init__(self, after: str, blocker: str, **kwargs):
        super().__init__(skip_instance_cache=True, **kwargs)
        self._after, self._blocker = after, blocker

    def mv(self, path1, path2, **kwargs):
        super().mv(path1, path2, **kwargs)
        if path2 == self._after:
            with open(self._blocker, "wb") as f:
                f.write(b"a file where a folder must go")


def test_a_publish_that_fails_part_way_keeps_the_rest_and_says_where(tmp_path, caplog):
    """Into an existing folder the files are moved one by one; an error of the target on
    the second (a file made meanwhile where its folder must go) leaves the first
    published. The others are only in the staging folder, so Ray's on_write_failed keeps
    it, and the error names what was published and where the rest are. Ray's call order
    is replayed without a cluster (_publish); a failure before publishing still removes
    the staging."""
    root = tmp_path / "out"
    root.mkdir()
    sink = gray.StagedFilesDatasink(
        str(root), filesystem=_AFileMadeMeanwhile(str(root / "a.bin"), str(root / "sub")))
    names = ["a.bin", "sub/b.bin", "c.bin"]
    with pytest.raises(gray.PartialPublishError) as caught:
        _publish(sink, names)
    error = caught.value
    assert error.published == ["a.bin"] and error.remaining == ["sub/b.bin", "c.bin"]
    assert error.staging == sink.staging and isinstance(error.__cause__, OSError)
    assert "a.bin" in str(error) and sink.staging in str(error) and "c.bin" in str(error)
    assert pickle.loads(pickle.dumps(error)).remaining == error.remaining
    assert (root / "a.bin").read_bytes() == b"a.bin"
    assert _tree(error.staging) == {"sub/b.bin": b"sub/b.bin", "c.bin": b"c.bin"}
    assert sink.staging in caplog.text  # on_write_failed says it kept the folder

    failing = gray.StagedFilesDatasink(str(root))  # two rows map to one name: before publishing
    with pytest.raises(ValueError, match="same output file"):
        _publish(failing, ["d.bin", "d.bin"])
    assert not os.path.exists(failing.staging) and not (root / "d.bin").exists()


def test_a_name_that_stripping_a_suffix_leaves_empty_dot_or_dotdot_is_refused(tmp_path):
    """decrypt_files' sink drops ``.gc``: the sources ``...gc``, ``..gc`` and ``sub/...gc``
    became ``..``, ``.`` and ``sub/..``, which passed the check made before stripping; a
    memory target then published a file named ``/plain/sub/..`` and a local one failed
    with IsADirectoryError. The name is checked as it is written, part by part;
    ``..config`` stays a file of the folder."""
    import fsspec
    import pyarrow as pa

    src = str(tmp_path / "enc")
    sink = gray.StagedFilesDatasink(str(tmp_path / "plain"), relative_to=src,
                                    strip_suffix=".gc")
    for source in ("...gc", "..gc", "sub/...gc", "sub/..gc", "sub/.gc"):
        with pytest.raises(ValueError, match="names no file"):
            sink.name_of(f"{src}/{source}")
    assert sink.name_of(f"{src}/..config.gc") == "..config"
    assert sink.name_of(f"{src}/sub/...x.gc") == "sub/...x"
    bare = gray.StagedFilesDatasink(str(tmp_path / "plain"), strip_suffix=".gc")
    with pytest.raises(ValueError, match="names no file"):
        bare.name_of("/anywhere/...gc")

    memory = fsspec.filesystem("memory")
    target = "/" + re.sub(r"\W", "_", tmp_path.name)
    on_memory = gray.StagedFilesDatasink(f"memory://{target}/plain", relative_to="/enc",
                                         strip_suffix=".gc", filesystem=memory)
    on_memory.on_write_start()
    with pytest.raises(ValueError, match="names no file"):
        on_memory.write([pa.table({"bytes": [b"secret"], "path": ["/enc/sub/...gc"]})], None)
    on_memory.on_write_failed(ValueError("the write task failed"))
    assert memory.find(target) == []  # nothing staged, nothing published
    if memory.exists(target):
        memory.rm(target, recursive=True)


def _job_failing_in_a_write_task(sink, names: list[str]) -> None:
    """A job whose write task fails after staging ``names``: on_write_failed, as Ray calls it."""
    try:
        sink.on_write_start()
        for name in names:
            with open(os.path.join(sink.staging, name), "wb") as f:
                f.write(name.encode())
        raise RuntimeError("a write task failed")
    except RuntimeError as exc:
        sink.on_write_failed(exc)


def test_a_sink_runs_its_next_job_afresh(tmp_path, caplog):
    """A sink used for a second job after a complete publish (file by file, into an
    existing folder) kept ``_published``: the second job failing in a write task kept
    its staging folder and logged that publishing had started. Each job now starts
    afresh, except that a folder kept by a publish that stopped part-way stays kept
    (it holds the only copy of its files) until a job publishes completely."""
    root = tmp_path / "out"
    root.mkdir()
    sink = gray.StagedFilesDatasink(
        str(root), filesystem=_AFileMadeMeanwhile(str(root / "d.bin"), str(root / "sub")))
    _publish(sink, ["a.bin", "b.bin"])
    assert _tree(root) == {"a.bin": b"a.bin", "b.bin": b"b.bin"}
    _job_failing_in_a_write_task(sink, ["c.bin"])
    assert not os.path.exists(sink.staging) and not (root / "c.bin").exists()
    assert "publishing had started" not in caplog.text and sink.staging not in caplog.text

    with pytest.raises(gray.PartialPublishError):  # sub is made once d.bin is in place
        _publish(sink, ["d.bin", "sub/e.bin"])
    caplog.clear()
    _job_failing_in_a_write_task(sink, ["f.bin"])  # the same sink, before publishing
    assert _tree(sink.staging) == {"sub/e.bin": b"sub/e.bin", "f.bin": b"f.bin"}
    assert sink.staging in caplog.text and "earlier job" in caplog.text
    (root / "sub").unlink()
    _publish(sink, ["sub/e.bin"])  # a complete publish removes the kept folder
    assert not os.path.exists(sink.staging) and (root / "sub" / "e.bin").exists()
    _job_failing_in_a_write_task(sink, ["g.bin"])
    assert not os.path.exists(sink.staging)


def test_a_sink_given_keys_says_when_its_rows_are_encrypted_already(keyset, tmp_path, caplog):
    """EncryptBatch's rows and keys= on the sink: encrypted twice, without a word."""
    import io
    import logging

    sealed = io.BytesIO()
    stream.encrypt(b"a row", sealed, os.urandom(32), device="cpu")
    sink = gray.GpucryptDatasink(str(tmp_path / "out"), keys=KeyReferences(keyset=keyset[0]))
    with caplog.at_level(logging.WARNING, logger="gpucrypt.ray"):
        again = sink.prepare(sealed.getvalue(), "/in/a.bin")
    assert "is a gpucrypt stream already, and is encrypted again" in caplog.text
    assert stream.read_header(again).envelope  # encrypted for the keyset all the same
    caplog.clear()
    fresh = gray.GpucryptDatasink(str(tmp_path / "out2"), keys=KeyReferences(keyset=keyset[0]))
    with caplog.at_level(logging.WARNING, logger="gpucrypt.ray"):
        fresh.prepare(b"plain row", "/in/b.bin")
    assert "encrypted again" not in caplog.text


@pytest.mark.parametrize("target", ["file", "memory"])
def test_a_publish_onto_a_folder_is_refused_before_anything_moves(tmp_path, target):
    """A row whose file's place is taken by a folder: ``mv`` moved the file inside the
    folder (``report/report``) and the job reported success. Every place is checked
    before the first move: nothing is published and on_write_failed removes the staging
    folder. Ray's call order is replayed without a cluster (see _publish)."""
    if target == "file":
        root = tmp_path / "out"
        (root / "report").mkdir(parents=True)
        (root / "report" / "keep").write_bytes(b"theirs")
        sink = gray.StagedFilesDatasink(str(root))
        with pytest.raises(IsADirectoryError, match=r"1 of the file\(s\).*\(report\).*nothing "
                                                    r"was published"):
            _publish(sink, ["a.bin", "report", "z.bin"])
        assert _tree(root) == {"report/keep": b"theirs"} and os.listdir(root) == ["report"]
        return
    assert _publish_on_memory(tmp_path, {"report/keep": b"theirs"},
                              {"a.bin": b"a", "report": b"NEW"},
                              IsADirectoryError, "report") == {"report/keep": b"theirs"}
    # an object and a prefix that share a name: the object is not republished over it
    assert _publish_on_memory(tmp_path, {"report": b"obj", "report/keep": b"theirs"},
                              {"a.bin": b"a", "report": b"NEW"}, IsADirectoryError,
                              "report") == {"report": b"obj", "report/keep": b"theirs"}


def _publish_on_memory(tmp_path, theirs: dict, staged: dict, error: type | None = None,
                       match: str = "", folder: str = "out") -> dict:
    """A publish of ``staged`` (name: bytes) into a memory folder holding ``theirs``
    (stored as an object store holds its keys: an object ``a`` and keys below ``a/`` may
    both be there), refused with ``error`` where one is given: what the folder holds
    afterwards (relative name: bytes). Ray's calls as _publish replays them, with the
    files staged on the memory target."""
    from types import SimpleNamespace

    import fsspec
    from fsspec.implementations.memory import MemoryFile

    memory = fsspec.filesystem("memory")
    root = "/" + re.sub(r"\W", "_", tmp_path.name) + "/" + folder
    for name, data in theirs.items():
        memory.store[f"{root}/{name}"] = MemoryFile(memory, f"{root}/{name}", data)
    sink = gray.StagedFilesDatasink(f"memory://{root}")
    try:
        sink.on_write_start()
        for name, data in staged.items():
            memory.pipe_file(f"{sink.staging}/{name}", data)

        def complete():
            try:
                sink.on_write_complete(SimpleNamespace(write_returns=[list(staged)]))
            except Exception as exc:
                sink.on_write_failed(exc)
                raise

        if error is None:
            complete()
        else:
            with pytest.raises(error, match=match):
                complete()
        return {path[len(root) + 1:]: memory.cat_file(path) for path in memory.find(root)}
    finally:
        memory.rm(root.rsplit("/", 1)[0], recursive=True)


def test_a_sink_under_a_dir_prefix_keeps_its_path_inside_the_prefix(tmp_path):
    """dir:: over the local disk counts as the local disk (its folders are real), but its
    paths are relative to its prefix: made absolute, 'out' became <cwd>/out under it."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    sink = gray.StagedFilesDatasink("out", filesystem=DirFileSystem(str(tmp_path),
                                                                     LocalFileSystem()))
    assert sink.root == "out"
    from types import SimpleNamespace

    sink.on_write_start()  # Ray's calls, as _publish replays them, through the sink's fs
    sink.fs.pipe_file(f"{sink.staging}/a.bin", b"A")
    sink.on_write_complete(SimpleNamespace(write_returns=[["a.bin"]]))
    assert _tree(tmp_path / "out") == {"a.bin": b"A"}


def test_names_that_read_as_glob_patterns_are_published_as_they_are(tmp_path):
    """fsspec's generic mv and rm(recursive=True) take ``[``, ``*`` and ``?`` as glob
    patterns: on an object store ``a[1]`` was never published and the staged ``a1`` it
    matched was moved into a folder named ``a[1]`` (the job failing part-way), and a
    root such as ``out[1]`` kept its staging folder. The local disk globbed nothing
    before; its root such as ``out[1]`` now takes the exact-name removal."""
    names = {"a[1]": b"A[1]", "a1": b"A1", "x?": b"X?", "x1": b"X1", "s*/b": b"B"}
    assert _publish_on_memory(tmp_path, {}, names) == names
    assert _publish_on_memory(tmp_path, {"old": b"theirs"}, {"a1": b"A1"},
                              folder="out[1]") == {"old": b"theirs", "a1": b"A1"}
    root = tmp_path / "out[1]"
    root.mkdir()  # an existing folder: published file by file, then the staging removed
    _publish(gray.StagedFilesDatasink(str(root)), ["a[1]", "sub/b?"])
    assert _tree(root) == {"a[1]": b"a[1]", "sub/b?": b"sub/b?"}


def test_a_sink_without_keys_refuses_rows_that_are_no_whole_stream(keyset):
    """Without keys the sink checked the header only: a header alone, or one followed by
    fewer bytes than a tag (a stream cut there, a header glued to a short plaintext), was
    stored under a .gc name. Only the structure can be checked there: a length some
    whole stream has (16 bytes or more after the header, or after a segment's end) still
    passes, plaintext or not, as documented."""
    import io

    sink = gray.GpucryptDatasink("/tmp/unused")
    enc = gray.EncryptBatch(KeyReferences(keyset=keyset[0]), segment_size=4096, device="cpu")
    whole = {n: enc({"bytes": [os.urandom(n)]})["bytes"][0] for n in (0, 5000, 8192)}
    for data in whole.values():
        assert sink.prepare(data, "/in/whole") == data
    header_length = stream.read_header(io.BytesIO(whole[0])).header_length
    for name, row in [("header alone", whole[0][:header_length]),
                      ("header and a short plaintext", whole[0][:header_length] + b"secret"),
                      ("cut 10 bytes into a segment",
                       whole[8192][:header_length + 4096 + 16 + 10])]:
        with pytest.raises(ValueError, match="not that of a whole stream"):
            sink.prepare(row, name)
    # the documented limit: whole by length, so not refused without keys
    for row in (whole[0][:header_length] + b"SECRET PLAINTEXT",
                whole[8192][:header_length + 4096 + 16],
                whole[5000][:-1]):
        assert sink.prepare(row, "/in/limit") == row


def test_read_encrypted_takes_its_keys_over_the_fsspec_configs(keyset, tmp_path, monkeypatch):
    """``FSSPEC_GPUCRYPT_KEYSET`` (fsspec's config) made every read_encrypted fail: it
    passes ``keys=``, and the config's keyset was added beside it ("give keys= or
    keyset=..., not both"). The reader is given as a function here, which gets the
    pyarrow filesystem read_encrypted made; the read goes through it."""
    from fsspec.config import conf

    other = tmp_path / "other.json"
    Keyset.generate().save(other)
    path = str(tmp_path / "a.gc")
    refs = KeyReferences(keyset=keyset[0])
    with open(path, "wb") as f:
        f.write(gray.EncryptBatch(refs, device="cpu")({"bytes": [b"the rows"]})["bytes"][0])
    monkeypatch.setitem(conf, "gpucrypt", {"keyset": str(other)})  # restored after
    for given in ({"keyset": keyset[0]}, {"keys": refs}):
        filesystem = gray.read_encrypted(path, reader=lambda paths, filesystem: filesystem,
                                         **given)
        with filesystem.open_input_file(path) as f:
            assert f.read() == b"the rows"


@pytest.mark.parametrize("target", ["file", "memory"])
def test_a_file_standing_where_a_folder_must_go_is_refused_before_anything_moves(
        tmp_path, target):
    """A row mapped to ``a/c.txt`` while ``a`` is a file in the folder: the files before it
    were published, and the job failed part-way at its move (PartialPublishError). Every
    parent path is checked with the final paths, before the first move: nothing is
    published and on_write_failed removes the staging folder. A link to a folder at a
    file's place is still a folder; new and existing folders still take files. On an
    object store (memory) an object ``a`` has no folder to stand in the way of: ``a/c.txt``
    is a key beside it, published as the store's own moves publish it (the check refused
    it), beside a prefix ``a/`` too."""
    if target == "file":
        root = tmp_path / "out"
        (root / "deep").mkdir(parents=True)
        (root / "a").write_bytes(b"theirs")
        (root / "deep" / "x").write_bytes(b"theirs too")
        sink = gray.StagedFilesDatasink(str(root))
        with pytest.raises(NotADirectoryError, match=r"2 of the file\(s\).*inside a file.*"
                                                     r"a/c\.txt: a is a file.*deep/x/y\.txt: "
                                                     r"deep/x is a file.*nothing was published"):
            _publish(sink, ["b.txt", "a/c.txt", "deep/x/y.txt"])
        assert _tree(root) == {"a": b"theirs", "deep/x": b"theirs too"}
        assert sorted(os.listdir(root)) == ["a", "deep"]

        (tmp_path / "real").mkdir()
        os.symlink(tmp_path / "real", root / "link.txt")
        with pytest.raises(IsADirectoryError, match=r"replace a folder \(link\.txt\)"):
            _publish(gray.StagedFilesDatasink(str(root)), ["b.txt", "link.txt"])
        assert os.listdir(tmp_path / "real") == [] and not (root / "b.txt").exists()

        _publish(gray.StagedFilesDatasink(str(root)), ["deep/n.txt", "new/er/m.txt", "t.txt"])
        assert _tree(root) == {"a": b"theirs", "deep/x": b"theirs too", "deep/n.txt":
                               b"deep/n.txt", "new/er/m.txt": b"new/er/m.txt", "t.txt": b"t.txt"}
        return
    staged = {"b.txt": b"b", "a/c.txt": b"c", "deep/x/y.txt": b"y"}
    for theirs in ({"a": b"theirs", "deep/x": b"too"},  # objects alone
                   {"a": b"theirs", "a/keep": b"k", "deep/x": b"too"}):  # and a prefix a/
        assert _publish_on_memory(tmp_path, theirs, staged) == {**theirs, **staged}
