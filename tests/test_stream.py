"""gpucrypt.stream: round trips, random access, every kind of damage, the header parser,
envelope replacement and the encrypt/decrypt command line.

Segments are 4 KiB here and batches are shrunk (``small_batches``) so that a few KiB
of data cross segment and batch boundaries; the GPU path runs in the simulator on a
couple of segments only.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpucrypt import pipeline, stream
from gpucrypt.files._format import MIN_HEADER_SIZE

from _signals import dies_of, python_child

SEG = 4096
C = SEG + 16
ALGS = stream.ALGORITHMS
KEY = bytes(range(32))


@pytest.fixture
def small_batches(monkeypatch):
    """Four segments per CPU batch (two per thread with threads=2)."""
    monkeypatch.setattr(pipeline, "CPU_BATCH_BYTES", 4 * SEG)
    monkeypatch.setattr(pipeline, "GPU_BATCH_BYTES", 2 * SEG)


def seal(data: bytes, algorithm="chacha20-poly1305", key=KEY, **kw) -> bytes:
    out = io.BytesIO()
    kw.setdefault("device", "cpu")
    stream.encrypt(data, out, key, algorithm=algorithm, segment_size=SEG, **kw)
    return out.getvalue()


def unseal(blob: bytes, key=KEY, **kw) -> bytes:
    out = io.BytesIO()
    kw.setdefault("device", "cpu")
    stream.decrypt(blob, out, key, **kw)
    return out.getvalue()


def segments(blob: bytes) -> tuple[bytes, list[bytes]]:
    h = stream.read_header(blob).header_length
    body = blob[h:]
    return blob[:h], [body[i:i + C] for i in range(0, len(body), C)]


# ------------------------------------------------------------------ round trips
SIZES = [0, 1, SEG - 1, SEG, SEG + 1, 4 * SEG, 4 * SEG + 1, 8 * SEG, 9 * SEG + 7]


@pytest.mark.parametrize("algorithm", ALGS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("threads", [1, 2])
def test_round_trip_sizes(small_batches, algorithm, size, threads):
    data = os.urandom(size)
    blob = seal(data, algorithm, threads=threads)
    n_segments = max(1, -(-size // SEG))
    header = stream.read_header(blob)
    assert len(blob) == header.header_length + size + 16 * n_segments
    assert unseal(blob, threads=threads) == data
    assert unseal(blob, threads=3 - threads) == data  # thread count is not in the format


def test_default_batches_round_trip():
    data = os.urandom(3 * SEG + 5)
    assert unseal(seal(data)) == data



class _Writer:
    """A file object that is not an io.BytesIO: encrypt writes it batch by batch."""

    def __init__(self):
        self.parts = []

    def write(self, data):
        self.parts.append(bytes(data))
        return len(data)


@pytest.mark.parametrize("size", SIZES)
def test_in_memory_input_sealed_in_place_into_bytesio(small_batches, size):
    """Into an io.BytesIO the segments are sealed in the object's own buffer: the same bytes
    as written batch by batch, after what the object held, and the object stays usable."""
    data = os.urandom(size)
    fixed = {"segment_size": SEG, "device": "cpu", "_salt": bytes(32), "_nonce_prefix": bytes(7)}
    out = io.BytesIO()
    out.write(b"before")
    stream.encrypt(data, out, KEY, **fixed)
    out.write(b"after")  # would raise BufferError if a view of its buffer were still alive
    other = _Writer()
    stream.encrypt(data, other, KEY, **fixed)
    assert out.getvalue() == b"before" + b"".join(other.parts) + b"after"
    assert unseal(out.getvalue()[6:-5]) == data


def test_small_in_memory_input_takes_one_small_buffer(monkeypatch):
    """A small file's fixed cost: one buffer of its own size each way, not a batch's."""
    sizes = []
    real = pipeline.scratch
    monkeypatch.setattr(pipeline, "scratch", lambda n: sizes.append(n) or real(n))
    blob = seal(os.urandom(1000), key=KEY)
    assert sizes == []  # sealed in place in the BytesIO
    assert len(unseal(blob)) == 1000
    assert sizes == [C, SEG]  # ciphertext slots (sliced, never written) and plaintext


def _chunks(data: bytes, sizes):
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos:pos + n]
        pos += n
        i += 1


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "fileobj", "iterable",
                                  "path", "unbuffered"])
def test_source_kinds(small_batches, tmp_path, kind):
    data = os.urandom(6 * SEG + 99)
    path = tmp_path / "plain"
    path.write_bytes(data)
    src = {"bytes": lambda: data, "bytearray": lambda: bytearray(data),
           "memoryview": lambda: memoryview(data), "fileobj": lambda: io.BytesIO(data),
           "iterable": lambda: _chunks(data, [1, 4095, 7000, 3, 10000]), "path": lambda: path,
           "unbuffered": lambda: open(path, "rb", buffering=0)}[kind]()
    out = tmp_path / "sealed"
    stream.encrypt(src, out, KEY, segment_size=SEG, device="cpu")
    assert unseal(out.read_bytes()) == data
    back = tmp_path / "back"
    stream.decrypt(str(out), back, KEY, device="cpu")
    assert back.read_bytes() == data
    with open(out, "rb") as f:
        back2 = io.BytesIO()
        stream.decrypt(f, back2, KEY)
    assert back2.getvalue() == data


@pytest.mark.parametrize("bad", [None, 7, "text"], ids=["None", "int", "str"])
def test_a_chunk_that_is_not_bytes_is_refused_not_taken_for_the_end(tmp_path, bad):
    """An iterable's None chunk (what a non-blocking read gives for "nothing yet") ended
    the input there: the stream sealed was valid, final flag and all, and held only the
    chunks before it. Every chunk that is not bytes-like is a TypeError, nothing written."""
    out = tmp_path / "sealed"
    with pytest.raises(TypeError, match="src chunks must be bytes-like"):
        stream.encrypt(iter([b"a" * 5000, bad, b"b" * 5000]), out, KEY, segment_size=SEG)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_output_to_path_is_replaced_atomically(tmp_path):
    dst = tmp_path / "out"
    dst.write_bytes(b"old")
    stream.encrypt(b"new data", dst, KEY, segment_size=SEG)
    assert unseal(dst.read_bytes()) == b"new data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp file left


def test_fresh_salt_and_prefix_per_file():
    a, b = seal(b"same"), seal(b"same")
    ha, hb = stream.read_header(a), stream.read_header(b)
    assert ha.salt != hb.salt and ha.nonce_prefix != hb.nonce_prefix and a != b


@pytest.mark.parametrize("bad, exc", [
    (dict(segment_size=4095), ValueError), (dict(segment_size=2048), ValueError),
    (dict(segment_size=128 << 20), ValueError), (dict(segment_size=3 * 4096), ValueError),
    (dict(segment_size=4096.0), TypeError), (dict(algorithm="aes-128-gcm"), ValueError),
    (dict(key_id=b"bytes"), TypeError), (dict(key_id="x" * 1025), ValueError),
    (dict(envelope="text"), TypeError), (dict(threads=0), ValueError),
    (dict(device="tpu"), ValueError),
])
def test_argument_errors(bad, exc):
    kw = dict(segment_size=SEG)
    kw.update(bad)
    with pytest.raises(exc):
        stream.encrypt(b"x", io.BytesIO(), KEY, **kw)


@pytest.mark.parametrize("key, exc", [(b"\x00" * 16, ValueError), ("k" * 32, TypeError)])
def test_key_errors(key, exc):
    with pytest.raises(exc):
        stream.encrypt(b"x", io.BytesIO(), key)
    with pytest.raises(exc):
        stream.decrypt(seal(b"x"), io.BytesIO(), key)


def test_segment_index_limit(monkeypatch):
    import gpucrypt.files._format as fmt

    monkeypatch.setattr(stream, "MAX_SEGMENTS", 3)
    assert fmt.MAX_SEGMENTS == 2**32
    seal(os.urandom(3 * SEG))
    with pytest.raises(OverflowError, match="segments"):
        seal(os.urandom(3 * SEG + 1))


# ------------------------------------------------------------------ random access
@pytest.fixture(scope="module")
def accessible():
    data = os.urandom(5 * SEG + 1234)
    return data, seal(data, "xchacha20-poly1305")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 5 * SEG + 2000), st.integers(-1, 3 * SEG),
                              st.sampled_from([0, 1, 2])), min_size=1, max_size=8))
def test_random_access_matches_plaintext(accessible, ops):
    data, blob = accessible
    with stream.open(io.BytesIO(blob), KEY) as f:
        assert f.readable() and f.seekable() and f.size == len(data)
        pos = 0
        for offset, length, whence in ops:
            target = {0: offset, 1: pos + offset - 2000, 2: offset - 3000 - len(data) // 2}[whence]
            target = max(target, 0)
            base = {0: 0, 1: pos, 2: len(data)}[whence]
            pos = f.seek(target - base, whence)
            assert pos == target == f.tell()
            got = f.read(length)
            want = data[pos:] if length == -1 else data[pos:pos + length]
            assert got == want
            pos += len(got)
            assert f.tell() == pos


def test_open_path_readinto_and_close(tmp_path):
    data = os.urandom(2 * SEG + 10)
    path = tmp_path / "s"
    path.write_bytes(seal(data))
    with stream.open(path, KEY) as f:
        buf = bytearray(SEG + 5)
        f.seek(SEG - 3)
        assert f.readinto(buf) == len(buf) and bytes(buf) == data[SEG - 3:2 * SEG + 2]
        assert f.read() == data[2 * SEG + 2:] and f.read(10) == b""
        with pytest.raises(ValueError):
            f.seek(-1)
    assert f.closed
    with pytest.raises(ValueError):
        f.read(1)


def test_open_reports_a_bad_segment_when_read():
    data = os.urandom(3 * SEG)
    head, segs = segments(seal(data))
    segs[1] = segs[1][:5] + bytes([segs[1][5] ^ 1]) + segs[1][6:]
    with stream.open(io.BytesIO(head + b"".join(segs)), KEY) as f:
        assert f.read(SEG) == data[:SEG]
        with pytest.raises(stream.AuthenticationError) as err:
            f.read(10)
        assert err.value.segment == 1
        f.seek(2 * SEG)
        assert f.read() == data[2 * SEG:]


def test_more_segments_than_a_stream_can_index_is_data_appended(tmp_path, monkeypatch):
    """A file extended (sparse: free) past 2**32 segments still has a valid header: the
    readers raised the encoder's OverflowError ("use a larger segment_size"), not a
    StreamError. Shown with the limit lowered to 4 segments, a real 7-segment file."""
    from gpucrypt.files import stream as stream_module

    key = os.urandom(32)
    sealed = tmp_path / "s.gc"
    stream.encrypt(os.urandom(6 * 4096 + 5), sealed, key, segment_size=4096, device="cpu")
    monkeypatch.setattr(stream_module, "MAX_SEGMENTS", 4)
    for read in (lambda: stream.open(sealed, key),
                 lambda: stream.decrypt(sealed, tmp_path / "out", key, device="cpu"),
                 lambda: stream.decrypt(io.BytesIO(sealed.read_bytes()), io.BytesIO(), key,
                                        device="cpu")):  # read in order, not by position
        with pytest.raises(stream.AuthenticationError, match="more than 4 segments.*appended"):
            read()
    assert not (tmp_path / "out").exists()


def test_open_detects_truncation_up_front():
    head, segs = segments(seal(os.urandom(3 * SEG + 1)))
    with pytest.raises(stream.TruncatedError):
        stream.open(io.BytesIO(head + b"".join(segs[:2])), KEY)
    with pytest.raises(stream.TruncatedError):
        stream.open(io.BytesIO(head), KEY)
    with pytest.raises(stream.AuthenticationError):
        stream.open(io.BytesIO(seal(b"x")), os.urandom(32))


# ------------------------------------------------------------------ damage
def _damaged():
    """name -> (function of (header, segments) -> bytes, expected exception)."""
    def flip(b, i):
        return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:]

    return {
        "cut inside segment": (lambda h, s: h + b"".join(s)[:2 * C + 100], stream.AuthenticationError),
        "cut inside tag": (lambda h, s: h + b"".join(s)[:2 * C + 7], stream.TruncatedError),
        "cut at boundary": (lambda h, s: h + b"".join(s[:3]), stream.TruncatedError),
        "last segment removed": (lambda h, s: h + b"".join(s[:-1]), stream.TruncatedError),
        "header only": (lambda h, s: h, stream.TruncatedError),
        "cut inside header": (lambda h, s: h[:40], stream.TruncatedError),
        "dropped segment": (lambda h, s: h + b"".join(s[:1] + s[2:]), stream.AuthenticationError),
        "swapped segments": (lambda h, s: h + b"".join([s[1], s[0]] + s[2:]), stream.AuthenticationError),
        "duplicated segment": (lambda h, s: h + b"".join(s[:2] + s[1:]), stream.AuthenticationError),
        "appended segment": (lambda h, s: h + b"".join(s + [s[-1]]), stream.AuthenticationError),
        "appended byte": (lambda h, s: h + b"".join(s) + b"\x00", stream.AuthenticationError),
        "flipped salt bit": (lambda h, s: flip(h, 20) + b"".join(s), stream.AuthenticationError),
        "flipped segment size": (lambda h, s: flip(h, 10) + b"".join(s), stream.AuthenticationError),
        "flipped key id": (lambda h, s: flip(h, 52) + b"".join(s), stream.AuthenticationError),
        "flipped MAC bit": (lambda h, s: flip(h, len(h) - 1) + b"".join(s), stream.AuthenticationError),
        "other format": (lambda h, s: b"PK\x03\x04" + b"\x00" * 200, stream.FormatError),
        "empty file": (lambda h, s: b"", stream.FormatError),
        "future version": (lambda h, s: h[:8] + b"\x02" + h[9:] + b"".join(s), stream.UnsupportedVersion),
        "unknown algorithm": (lambda h, s: h[:9] + b"\x09" + h[10:] + b"".join(s), stream.FormatError),
    }


DAMAGE = _damaged()


@pytest.mark.parametrize("algorithm", ALGS)
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damage_is_detected_and_nothing_reaches_the_path(small_batches, tmp_path, algorithm, name):
    make, expected = DAMAGE[name]
    data = os.urandom(4 * SEG + 300)  # 5 segments, across two batches
    head, segs = segments(seal(data, algorithm, key_id="kid"))
    bad = make(head, segs)
    src = tmp_path / "bad"
    src.write_bytes(bad)
    dst = tmp_path / "plain"
    with pytest.raises(expected) as err:
        stream.decrypt(src, dst, KEY, threads=2)
    assert isinstance(err.value, stream.StreamError)
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # temp file removed
    if isinstance(err.value, stream.AuthenticationError):
        assert isinstance(err.value, InvalidTag)


def test_error_classes_and_messages(small_batches):
    head, segs = segments(seal(os.urandom(6 * SEG)))
    with pytest.raises(stream.TruncatedError, match="ends after segment 3.*not the last") as e:
        unseal(head + b"".join(segs[:4]))
    assert e.value.segment == 3
    with pytest.raises(stream.AuthenticationError, match="segment 2 failed") as e:
        unseal(head + b"".join(segs[:2] + segs[3:]))
    assert e.value.segment == 2 and not isinstance(e.value, stream.TruncatedError)
    with pytest.raises(stream.AuthenticationError, match="header") as e:
        unseal(head + b"".join(segs), key=os.urandom(32))
    assert e.value.segment is None
    with pytest.raises(stream.UnsupportedVersion) as e:
        unseal(head[:8] + b"\x07" + head[9:])
    assert e.value.version == 7


@pytest.mark.parametrize("threads", [1, 2])
def test_first_failure_is_reported_whatever_the_thread_count(small_batches, threads):
    """Segment 2 tampered and the file cut 5 bytes into segment 4 (the next batch): the
    earlier failure is the one reported, and only segments 0-1 reach the output, with
    one batch in flight (threads=1) as with two (threads=2)."""
    data = os.urandom(6 * SEG)
    head, segs = segments(seal(data))
    bad = list(segs)
    bad[2] = segs[2][:9] + bytes([segs[2][9] ^ 1]) + segs[2][10:]
    out = io.BytesIO()
    with pytest.raises(stream.AuthenticationError, match="segment 2 failed") as e:
        stream.decrypt(head + b"".join(bad[:4]) + segs[4][:5], out, KEY, threads=threads,
                       device="cpu")
    assert e.value.segment == 2 and not isinstance(e.value, stream.TruncatedError)
    assert out.getvalue() == data[:2 * SEG]


@pytest.mark.parametrize("size", [0, 4 * SEG, 24 * SEG, 24 * SEG - 1, 24 * SEG + 1, 23 * SEG + 5])
@pytest.mark.parametrize("kind", ["file", "chunks"])
@pytest.mark.parametrize("threads", [2, 3])
def test_pipeline_with_many_batches_and_real_input_buffers(small_batches, tmp_path, size, kind,
                                                           threads):
    """Sources that fill the pipeline's own input buffers (a file, chunks of odd sizes)
    through six batches and more, with two batches in flight: the same bytes as one
    thread, and back; exact multiples of the batch and of the segment included."""
    data = os.urandom(size)
    if kind == "file":
        (tmp_path / "in").write_bytes(data)
        src = tmp_path / "in"
    else:
        src = (data[i:i + 1000] for i in range(0, len(data), 1000))
    salt, prefix = os.urandom(32), os.urandom(7)
    out = io.BytesIO()
    stream.encrypt(src, out, KEY, segment_size=SEG, device="cpu", threads=threads, _salt=salt,
                   _nonce_prefix=prefix)
    assert out.getvalue() == seal(data, threads=1, _salt=salt, _nonce_prefix=prefix)
    (tmp_path / "ct").write_bytes(out.getvalue())
    back = io.BytesIO()
    stream.decrypt(tmp_path / "ct", back, KEY, device="cpu", threads=threads)
    assert back.getvalue() == data


def test_spliced_last_segment_is_named():
    """A last segment of a shorter stream under the same key and header (same salt) put
    in the middle of a longer one."""
    salt, prefix = os.urandom(32), os.urandom(7)
    long_ = seal(os.urandom(4 * SEG), _salt=salt, _nonce_prefix=prefix)
    short = seal(os.urandom(2 * SEG), _salt=salt, _nonce_prefix=prefix)
    h, ls = segments(long_)
    _, ss = segments(short)
    with pytest.raises(stream.AuthenticationError, match="marked as the last") as e:
        unseal(h + b"".join([ls[0], ss[1], ls[2], ls[3]]))
    assert e.value.segment == 1


@pytest.mark.parametrize("algorithm", ALGS)
def test_flipped_bit_in_each_segment(small_batches, algorithm):
    data = os.urandom(5 * SEG + 17)
    head, segs = segments(seal(data, algorithm))
    for i in range(len(segs)):
        for pos in (0, len(segs[i]) // 2, len(segs[i]) - 1):  # data and tag
            bad = list(segs)
            bad[i] = segs[i][:pos] + bytes([segs[i][pos] ^ 0x80]) + segs[i][pos + 1:]
            out = io.BytesIO()
            with pytest.raises(stream.AuthenticationError) as err:
                stream.decrypt(head + b"".join(bad), out, KEY, threads=2)
            assert err.value.segment == i
            # a file object holds at most the verified segments before the bad one
            assert out.getvalue() == data[:len(out.getvalue())]
            assert len(out.getvalue()) <= i * SEG


def test_every_header_byte_is_authenticated():
    blob = seal(os.urandom(100), key_id="id", envelope=b"env")
    h = stream.read_header(blob).header_length
    for i in range(h):
        bad = blob[:i] + bytes([blob[i] ^ 0x04]) + blob[i + 1:]
        with pytest.raises(stream.StreamError):
            unseal(bad)


# ------------------------------------------------------------------ header parser
VALID_HEADER = seal(b"", "xchacha20-poly1305", key_id="key-7", envelope=b"\x01" * 40)


def _parse_or_documented_error(data: bytes):
    try:
        return stream.read_header(data)
    except (stream.FormatError, stream.TruncatedError):
        return None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_header_parser_random_bytes(data):
    _parse_or_documented_error(data)
    _parse_or_documented_error(b"GPUCRYPT\x01" + data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID_HEADER) - 1), st.integers(0, 255)),
                max_size=6), st.integers(0, len(VALID_HEADER)))
def test_header_parser_mutated_headers(edits, cut):
    data = bytearray(VALID_HEADER)
    for pos, value in edits:
        data[pos] = value
    header = _parse_or_documented_error(bytes(data[:cut]))
    if header is not None:
        assert header.header_length <= cut
        with pytest.raises(stream.StreamError):  # whatever parsed, the wrong key fails
            unseal(bytes(data), key=os.urandom(32))


def test_read_header_fields(tmp_path):
    blob = seal(b"abc", "aes-256-gcm", key_id="ключ", envelope=b"E" * 3000)
    h = stream.read_header(io.BytesIO(blob))
    assert (h.version, h.algorithm, h.segment_size, h.key_id, h.envelope) == (
        1, "aes-256-gcm", SEG, "ключ", b"E" * 3000)
    assert len(h.salt) == 32 and len(h.nonce_prefix) == 7 and len(h.header_mac) == 32
    assert h.header_length == len(blob) - 3 - 16
    (tmp_path / "f").write_bytes(blob)
    assert stream.read_header(tmp_path / "f") == h
    assert "E" * 20 not in repr(h)
    assert MIN_HEADER_SIZE == len(seal(b"")) - 16


# ------------------------------------------------------------------ envelope replacement
def test_replace_envelope_keeps_segments(tmp_path):
    data = os.urandom(3 * SEG + 5)
    path = tmp_path / "f"
    path.write_bytes(seal(data, key_id="old", envelope=b"old envelope"))
    before = path.read_bytes()
    old = stream.read_header(before)
    new = stream.replace_envelope(path, KEY, b"new, longer envelope" * 10)
    after = path.read_bytes()
    assert after[new.header_length:] == before[old.header_length:]
    assert stream.read_header(after) == new
    assert new.envelope == b"new, longer envelope" * 10 and new.key_id == "old"
    assert unseal(after) == data
    stream.replace_envelope(path, KEY, None, key_id=None)
    h = stream.read_header(path)
    assert h.envelope is None and h.key_id is None and unseal(path.read_bytes()) == data
    stream.replace_envelope(path, KEY, b"x", key_id="new-id")
    assert stream.read_header(path).key_id == "new-id"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_replace_envelope_rejects_wrong_key_and_leaves_the_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(seal(b"data", envelope=b"e"))
    before = path.read_bytes()
    with pytest.raises(stream.AuthenticationError):
        stream.replace_envelope(path, os.urandom(32), b"evil")
    assert path.read_bytes() == before


def test_envelope_is_not_in_segment_aad():
    """Changing only the envelope (as key rotation does) must not touch the segments;
    a forged envelope without the key fails the header MAC."""
    data = os.urandom(SEG + 1)
    a = seal(data, envelope=b"A" * 10)
    ha = stream.read_header(a)
    forged = a[:ha.header_length - 32 - 10] + b"B" * 10 + a[ha.header_length - 32:]
    with pytest.raises(stream.AuthenticationError, match="header"):
        unseal(forged)


# ------------------------------------------------------------------ backends
@pytest.mark.parametrize("algorithm", ALGS)
def test_backends_agree(device, small_batches, algorithm):
    """The same stream bytes from every backend, read back by every backend (two segments:
    the simulator runs every GPU thread in Python)."""
    data = os.urandom(SEG + 33)
    salt, prefix = os.urandom(32), os.urandom(19 if algorithm.startswith("x") else 7)
    ref = seal(data, algorithm, _salt=salt, _nonce_prefix=prefix, device="cpu")
    out = seal(data, algorithm, _salt=salt, _nonce_prefix=prefix, device=device)
    assert out == ref
    assert unseal(ref, device=device) == data
    if device == "gpu" and algorithm != "chacha20-poly1305":
        return  # the damage paths are the same code for every algorithm; keep the simulator brief
    head, segs = segments(ref)
    with pytest.raises(stream.TruncatedError):
        unseal(head + segs[0], device=device)
    bad = segs[0][:-1] + bytes([segs[0][-1] ^ 1])
    with pytest.raises(stream.AuthenticationError) as err:
        unseal(head + bad + segs[1], device=device)
    assert err.value.segment == 0


# ------------------------------------------------------------------ command line
from gpucrypt.cli import main as cli  # noqa: E402


@pytest.fixture
def files(tmp_path):
    key = os.urandom(32)
    (tmp_path / "key.bin").write_bytes(key)
    (tmp_path / "key.hex").write_text(key.hex() + "\n")
    for name in ("key.bin", "key.hex"):  # private: the CLI refuses keys others can read
        (tmp_path / name).chmod(0o600)
    data = os.urandom(3 * SEG + 11)
    (tmp_path / "plain").write_bytes(data)
    return tmp_path, key, data


def test_cli_round_trip(files, capsys):
    d, key, data = files
    assert cli(["encrypt", "--key-file", str(d / "key.bin"), "--segment-size", "4KiB",
                "--algorithm", "aes-256-gcm", str(d / "plain"), str(d / "sealed")]) == 0
    h = stream.read_header(d / "sealed")
    assert h.segment_size == SEG and h.algorithm == "aes-256-gcm"
    assert cli(["decrypt", "--key-file", str(d / "key.hex"), str(d / "sealed"), str(d / "back")]) == 0
    assert (d / "back").read_bytes() == data
    os.environ["GPUCRYPT_TEST_KEY"] = key.hex()
    try:
        assert cli(["decrypt", "--key-env", "GPUCRYPT_TEST_KEY", "--force", "--progress",
                    str(d / "sealed"), str(d / "back")]) == 0
    finally:
        del os.environ["GPUCRYPT_TEST_KEY"]
    assert "decrypt" in capsys.readouterr().err  # the progress line


def test_cli_key_env_takes_hex_only(files, capsys, monkeypatch):
    """32 characters of a password in the variable are not taken as a raw key."""
    d, key, data = files
    monkeypatch.setenv("GPUCRYPT_TEST_KEY", "correct horse battery staple 123")
    assert cli(["encrypt", "--key-env", "GPUCRYPT_TEST_KEY", str(d / "plain"), str(d / "x")]) == 2
    assert "must hold 64 hex digits" in capsys.readouterr().err
    assert not (d / "x").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_cli_decrypts_from_a_named_pipe(files):
    """A FIFO given as a path cannot be rewound: the header is put back in front."""
    import threading

    d, key, data = files
    assert cli(["encrypt", "--key-file", str(d / "key.bin"), "--segment-size", "4KiB",
                str(d / "plain"), str(d / "sealed")]) == 0
    os.mkfifo(d / "pipe")
    writer = threading.Thread(target=lambda: (d / "pipe").write_bytes((d / "sealed").read_bytes()))
    writer.start()
    try:
        assert cli(["decrypt", "--key-file", str(d / "key.bin"), str(d / "pipe"), str(d / "back")]) == 0
    finally:
        writer.join(timeout=30)
    assert (d / "back").read_bytes() == data


def test_atomic_file_leaves_nothing_when_fsync_fails(tmp_path, monkeypatch):
    from gpucrypt.files import _atomic

    out = _atomic.AtomicFile(tmp_path / "out")
    out.write(b"plaintext that must not stay behind")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        out.commit()
    assert list(tmp_path.iterdir()) == []


def test_an_error_renamed_for_the_destination_keeps_its_kind_whatever_its_class():
    """Errors are said of the user's destination by making one of the same class: a class
    not made as OSError is (OutputExists(path)) raised TypeError there instead (a second
    review). It becomes an OSError of the same errno: the same subclass, its message."""
    import errno

    from gpucrypt.files._atomic import OutputExists, _naming

    renamed = _naming(OutputExists("/d/.out.1234.gpucrypt-tmp"), "/d/out")
    assert isinstance(renamed, FileExistsError) and renamed.filename == "/d/out"
    assert renamed.strerror == "output exists"
    from gpucrypt.fs import _raise_as_target  # gpucrypt.fs's staged puts: the same rule

    try:
        try:
            raise OutputExists("/d/.out.1234.gpucrypt-tmp")
        except OutputExists as exc:
            _raise_as_target(exc, "/d/.out.1234.gpucrypt-tmp", "/d/out")
    except FileExistsError as exc:
        renamed = exc
    assert renamed.filename == "/d/out"
    renamed = _naming(PermissionError(errno.EACCES, "Permission denied", "/d/.t"), "/d/out",
                      "Permission denied (writing a in it)")
    assert type(renamed) is PermissionError and renamed.filename == "/d/out"
    assert renamed.strerror == "Permission denied (writing a in it)"


@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
def test_a_positional_write_that_fails_part_way_names_dst(small_batches, tmp_path, monkeypatch,
                                                          operation):
    """From a file, the workers write each segment with pwrite to the unpublished file's
    descriptor: a full disk part-way raised OSError(ENOSPC) naming no file. It names
    ``dst`` now, as an open or publish error does, and nothing is published."""
    import errno

    data = os.urandom(9 * SEG + 7)
    (tmp_path / "in").write_bytes(data if operation == "encrypt" else seal(data))
    real, calls = os.pwrite, []

    def fills_up(fd, chunk, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, chunk, offset)

    monkeypatch.setattr(os, "pwrite", fills_up)
    dst = tmp_path / "out"
    run = getattr(stream, operation)
    with pytest.raises(OSError) as info:
        if operation == "encrypt":
            run(tmp_path / "in", dst, KEY, segment_size=SEG, device="cpu", threads=2)
        else:
            run(tmp_path / "in", dst, KEY, device="cpu", threads=2)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(dst)
    assert len(calls) > 3 and os.listdir(tmp_path) == ["in"]


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE (POSIX)")
@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
def test_a_sequential_write_that_fails_part_way_names_dst(tmp_path, operation):
    """From a stream, the segments go through ``AtomicFile.write``, which passed a failed
    write's OSError on naming no file. A real one here: a file-size limit (RLIMIT_FSIZE,
    SIGXFSZ ignored as Python ignores it) stops the output part-way with EFBIG."""
    data = os.urandom(9 * SEG + 7)
    (tmp_path / "in").write_bytes(data if operation == "encrypt" else seal(data))
    code = ("import io, resource, sys\n"
            "from gpucrypt import stream\n"
            "source = io.BytesIO(open('in', 'rb').read())\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 4096, 4 * 4096))\n"
            "try:\n"
            f"    stream.{operation}(source, 'out', bytes(range(32)), device='cpu')\n"
            "except OSError as exc:\n"
            "    print(exc.errno, exc.filename)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    import errno

    assert done.stdout.split() == [str(errno.EFBIG), "out"], done.stdout + done.stderr
    assert os.listdir(tmp_path) == ["in"]


@pytest.mark.parametrize("case, code, message", [
    ("wrong key", 1, "wrong key or tampered"),
    ("tampered", 1, "tampered or damaged data: segment"),  # the header verified
    ("truncated", 1, "truncated"),
    ("not ours", 1, "not a gpucrypt file"),
    ("future", 1, "unsupported gpucrypt format version"),
    ("missing key file", 2, "key file not found"),
    ("bad key file", 2, "32 raw bytes or 64 hex"),
    ("no key", 2, "no key given"),
    ("missing input", 2, "input file not found"),
    ("exists", 2, "--force"),
])
def test_cli_errors(files, capsys, case, code, message):
    d, key, data = files
    sealed = d / "sealed"
    assert cli(["encrypt", "--key-file", str(d / "key.bin"), "--segment-size", "4096",
                str(d / "plain"), str(sealed)]) == 0
    blob = sealed.read_bytes()
    keyfile, src = d / "key.bin", sealed
    if case == "wrong key":
        keyfile = d / "other"
        keyfile.write_bytes(os.urandom(32))
        keyfile.chmod(0o600)
    elif case == "tampered":
        sealed.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    elif case == "truncated":
        sealed.write_bytes(blob[:stream.read_header(blob).header_length + C])
    elif case == "not ours":
        src = d / "plain"
    elif case == "future":
        sealed.write_bytes(blob[:8] + b"\x09" + blob[9:])
    elif case == "missing key file":
        keyfile = d / "nope"
    elif case == "bad key file":
        keyfile = d / "plain"
        keyfile.chmod(0o600)
    elif case == "missing input":
        src = d / "nope"
    elif case == "exists":
        (d / "out").write_bytes(b"keep me")
    args = ["decrypt", str(src), str(d / "out")]
    if case != "no key":
        args[1:1] = ["--key-file", str(keyfile)]
    capsys.readouterr()
    assert cli(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    if case == "exists":
        assert (d / "out").read_bytes() == b"keep me"
    else:
        assert not (d / "out").exists()


def test_cli_usage_errors(files, capsys):
    d, _, _ = files
    for args in (["encrypt", "--key-file", str(d / "key.bin"), "--segment-size", "3KiB",
                  str(d / "plain"), str(d / "o")],
                 ["encrypt", "--key-file", str(d / "key.bin"), "--segment-size", "lots",
                  str(d / "plain"), str(d / "o")],
                 ["encrypt", "--key-file", str(d / "key.bin"), "--threads", "0",
                  str(d / "plain"), str(d / "o")]):
        try:
            code = cli(args)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
        assert code == 2
        assert not (d / "o").exists()


def test_cli_subprocess_pipes(files):
    """stdin -> encrypt -> stdout -> decrypt -> stdout, as a user runs it."""
    d, _, data = files
    # the installed entry point; ``python -m gpucrypt.cli`` would load cli.py twice
    # (as __main__ and as gpucrypt.cli) and miss CliError raised by the subcommands
    run = [sys.executable, "-c", "import sys; from gpucrypt.cli import main; sys.exit(main())"]
    sealed = subprocess.run(run + ["encrypt", "--key-file", str(d / "key.hex"),
                                   "--segment-size", "4KiB", "-", "-"],
                            input=data, capture_output=True, check=True).stdout
    assert stream.read_header(sealed).segment_size == SEG
    back = subprocess.run(run + ["decrypt", "--key-file", str(d / "key.bin"), "-", "-"],
                          input=sealed, capture_output=True, check=True).stdout
    assert back == data
    bad = subprocess.run(run + ["decrypt", "--key-file", str(d / "key.bin"), "-", "-"],
                         input=sealed[:-20], capture_output=True)
    assert bad.returncode == 1 and b"Traceback" not in bad.stderr
    # only verified segments reached stdout: a strict prefix of the plaintext
    assert data.startswith(bad.stdout) and len(bad.stdout) < len(data)


@pytest.mark.parametrize("as_path", [False, True])
def test_truncation_in_the_batch_of_an_earlier_failure_reports_the_failure(small_batches, tmp_path,
                                                                           as_path):
    """Segment 1 tampered and the file cut inside segment 3's tag, both in the first
    batch: the earlier failure is reported whether the input is read ahead (a file
    object) or by the workers themselves (a path), and nothing reaches a path output."""
    data = os.urandom(3 * SEG + 100)
    head, segs = segments(seal(data))
    bad = [segs[0], segs[1][:9] + bytes([segs[1][9] ^ 1]) + segs[1][10:], segs[2], segs[3][:5]]
    blob = head + b"".join(bad)
    src = tmp_path / "in"
    src.write_bytes(blob)
    out = tmp_path / "out"
    with pytest.raises(stream.AuthenticationError, match="segment 1 failed"):
        stream.decrypt(str(src) if as_path else io.BytesIO(blob), str(out), KEY, device="cpu",
                       threads=2)
    assert not out.exists() and not list(tmp_path.glob("*gpucrypt-tmp"))


def test_an_input_file_that_shrinks_while_encrypted_is_a_clear_error(small_batches, tmp_path,
                                                                     monkeypatch):
    from gpucrypt.files import _format

    src = tmp_path / "in"
    src.write_bytes(os.urandom(8 * SEG))
    real = _format.read_at

    def shrinking(fd, offset, view, what):
        os.truncate(src, SEG)
        return real(fd, offset, view, what)

    monkeypatch.setattr(_format, "read_at", shrinking)
    with pytest.raises(ValueError, match="shrank while it was being encrypted"):
        stream.encrypt(str(src), str(tmp_path / "out"), KEY, segment_size=SEG, device="cpu",
                       threads=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*gpucrypt-tmp"))


def test_a_salt_or_nonce_prefix_that_is_not_bytes_is_refused():
    """``bytes(32)`` is 32 zero bytes, exactly a salt's size: an int given for the salt
    (or the nonce prefix) must be refused, not turned into zeros."""
    key = os.urandom(32)
    with pytest.raises(TypeError, match="salt must be bytes-like"):
        stream.encrypt(io.BytesIO(b"data"), io.BytesIO(), key, _salt=32)
    with pytest.raises(TypeError, match="nonce_prefix must be bytes-like"):
        stream.encrypt(io.BytesIO(b"data"), io.BytesIO(), key, _nonce_prefix=7)


# ------------------------------------------------------------------ file objects, pipes, links
def _nonblocking_pipe(nonblocking_end: str):
    """A real pipe, one end non-blocking, as unbuffered file objects (read end, write end)."""
    r, w = os.pipe()
    os.set_blocking(r if nonblocking_end == "read" else w, False)
    return open(r, "rb", buffering=0), open(w, "wb", buffering=0)


@contextlib.contextmanager
def _pipe_fed_in_two_pieces(data: bytes, first: int):
    """The read end (raw, non-blocking) of a pipe given ``data[:first]`` now and the rest
    0.3 s later from another thread, by which time the reader is waiting on it."""
    import threading
    import time

    src, feed = _nonblocking_pipe("read")
    feed.write(data[:first])

    def rest():
        time.sleep(0.3)
        feed.write(data[first:])
        feed.close()

    writer = threading.Thread(target=rest)
    writer.start()
    try:
        yield src
    finally:
        writer.join(timeout=30)
        src.close()


def test_encrypt_waits_for_a_non_blocking_input_instead_of_ending_it(small_batches):
    """A raw non-blocking input's readinto returns None while nothing has arrived: that is
    not the end of the input (taken so, the rest was left out of a valid stream)."""
    data = os.urandom(3 * SEG + 11)
    out = io.BytesIO()
    with _pipe_fed_in_two_pieces(data, 100) as src:
        stream.encrypt(src, out, KEY, segment_size=SEG, device="cpu")
    assert unseal(out.getvalue()) == data


def test_read_header_waits_for_a_non_blocking_input_instead_of_calling_it_cut_short():
    """read_header on a raw non-blocking pipe whose header arrives in two pieces: the
    None its read returns in between means "nothing yet", not the end of the file, and
    the header is read whole with the file left just after it."""
    blob = seal(os.urandom(100))
    header = stream.read_header(blob)
    with _pipe_fed_in_two_pieces(blob, 9) as src:
        assert stream.read_header(src) == header
        assert src.read(len(blob)) == blob[header.header_length:]


def test_read_header_reads_a_spooled_file_without_sending_it_to_disk():
    """read_header only reads: asking a SpooledTemporaryFile for its fileno() (as the
    sources that decrypt uses do, to find the size) writes its data out to a disk file."""
    import tempfile

    blob = seal(b"small")
    with tempfile.SpooledTemporaryFile(max_size=1 << 20) as f:
        f.write(blob)
        f.seek(0)
        assert stream.read_header(f) == stream.read_header(blob)
        assert not f._rolled


def test_a_text_mode_input_is_refused_saying_to_open_it_in_binary(tmp_path):
    path = tmp_path / "f.gcry"
    path.write_bytes(seal(b"secret"))
    for call in (stream.read_header, lambda f: stream.decrypt(f, io.BytesIO(), KEY)):
        with open(path, encoding="latin-1") as f, \
                pytest.raises(TypeError, match="text file: open it in binary mode"):
            call(f)


def test_a_raw_output_whose_write_returns_nothing(tmp_path):
    """None from a raw file's write() means "would block, nothing written". Over a blocking
    descriptor it cannot: the object wrote everything (a sink that forgets to return its
    count), as before; with no descriptor to tell or wait on, it is refused saying what
    to do, never taken as written (which could drop data) nor retried for ever."""
    class Sink(io.RawIOBase):
        def __init__(self, fd=None):
            self.buf, self.calls, self.fd = bytearray(), 0, fd

        def writable(self):
            return True

        def fileno(self):
            if self.fd is None:
                raise io.UnsupportedOperation("fileno")
            return self.fd

        def write(self, b):
            self.calls += 1
            self.buf += bytes(b)

    data = os.urandom(50_000)
    with open(tmp_path / "f", "wb") as blocking:
        sink = Sink(blocking.fileno())
        stream.encrypt(io.BytesIO(data), sink, KEY)
        assert unseal(bytes(sink.buf)) == data and sink.calls < 10
    with pytest.raises(BlockingIOError, match="write\\(\\) returned None.*returns the byte count"):
        stream.encrypt(io.BytesIO(data), Sink(), KEY)


def test_encrypt_into_a_non_blocking_output_drops_nothing(small_batches):
    """A raw non-blocking output's write returns None when the pipe is full: nothing was
    written, so it is written again once there is room (the ciphertext silently lost its
    middle before)."""
    import threading
    import time

    data = os.urandom(64 * SEG)  # four times a pipe's buffer
    drain, dst = _nonblocking_pipe("write")
    got = []

    def reader():
        time.sleep(0.3)  # let the pipe fill up first
        while chunk := drain.read(1 << 16):
            got.append(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        stream.encrypt(data, dst, KEY, segment_size=SEG, device="cpu")
    finally:
        dst.close()
        thread.join(timeout=30)
        drain.close()
    assert unseal(b"".join(got)) == data


@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
def test_a_callers_atomic_file_keeps_what_it_held_before(small_batches, tmp_path, operation):
    """From a regular file into a caller's AtomicFile holding bytes already, the workers'
    pwrites start at its position, not at offset 0 (which overwrote the caller's bytes and
    misplaced the segments)."""
    from gpucrypt.files._atomic import AtomicFile

    data = os.urandom(3 * SEG + 100)
    src = tmp_path / "in"
    src.write_bytes(data if operation == "encrypt" else seal(data))
    out = tmp_path / "out"
    sink = AtomicFile(out)
    sink.write(b"PREFIX")
    if operation == "encrypt":
        stream.encrypt(str(src), sink, KEY, segment_size=SEG, device="cpu", threads=2)
    else:
        stream.decrypt(str(src), sink, KEY, device="cpu", threads=2)
    written = out.read_bytes()  # both commit the caller's AtomicFile
    assert written[:6] == b"PREFIX"
    assert (unseal(written[6:]) if operation == "encrypt" else written[6:]) == data


def test_a_short_file_that_is_not_ours_is_not_called_truncated():
    """Fewer bytes than the magic: a truncated stream only if they start the magic."""
    for blob in (b"hello\n", b"X", b"GPUCMOD", b"\0" * 7):
        with pytest.raises(stream.FormatError, match="not a gpucrypt file"):
            stream.read_header(blob)
    for blob in (b"G", b"GPUC", b"GPUCRYP"):
        with pytest.raises(stream.TruncatedError, match="inside the header"):
            stream.read_header(blob)


class _ShortReads(io.RawIOBase):
    """A seekable raw file whose reads return at most 1000 bytes, as raw reads may."""

    def __init__(self, data: bytes):
        super().__init__()
        self._data = io.BytesIO(data)

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        return self._data.seek(offset, whence)

    def tell(self):
        return self._data.tell()

    def readinto(self, buf):
        piece = self._data.read(min(len(buf), 1000))
        buf[:len(piece)] = piece
        return len(piece)


def test_open_reads_whole_segments_from_short_reads():
    """A read may return fewer bytes than asked without the file ending: a valid file
    was reported as cut short."""
    data = os.urandom(2 * SEG + 7)
    with stream.open(_ShortReads(seal(data)), KEY) as reader:
        assert reader.read() == data


def test_open_starts_at_the_files_position(tmp_path):
    """As read_header and decrypt do, open reads the stream from the position it is given."""
    data = os.urandom(SEG + 5)
    path = tmp_path / "f"
    path.write_bytes(b"PREFIX" + seal(data))
    with open(path, "rb") as f:
        f.seek(6)
        with stream.open(f, KEY) as reader:
            assert reader.size == len(data) and reader.read() == data
            reader.seek(SEG - 2)
            assert reader.read(4) == data[SEG - 2:SEG + 2]
    # a file whose header was read first: earlier versions rewound; the error says so
    with open(path, "rb") as f:
        f.seek(6)
        stream.read_header(f)
        with pytest.raises(stream.FormatError, match="read from byte .*seek to where it starts"):
            stream.open(f, KEY)


def test_a_failed_open_closes_without_an_ignored_exception(tmp_path):
    """An open that fails before its attributes were set was closed by IOBase's finaliser
    with an AttributeError ("Exception ignored in", shown under -X dev)."""
    (tmp_path / "sealed").write_bytes(seal(b"data"))
    code = ("import gc\n"
            "from gpucrypt import stream\n"
            f"for src, key in ((12345, bytes(32)), ({str(tmp_path / 'missing')!r}, bytes(32)),\n"
            f"                 ({str(tmp_path / 'sealed')!r}, b'short')):\n"
            "    try:\n"
            "        stream.open(src, key)\n"
            "    except (TypeError, OSError, ValueError):\n"
            "        pass\n"
            "    gc.collect()\n")
    done = subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "Exception ignored" not in done.stderr, done.stderr


@pytest.mark.parametrize("kind", ["pipe", "read-only object", "iterable"])
def test_keyed_decrypt_file_takes_what_decrypt_takes(tmp_path, kind):
    """keys.decrypt_file reads the header for its envelope first; from a source that
    cannot be rewound the header is put back in front (a pipe failed with "Illegal seek",
    a read-only object with "wrong magic bytes", chunks with a TypeError)."""
    import threading

    from gpucrypt import keys

    alice = keys.Identity.generate()
    data = os.urandom(3 * SEG + 9)
    sealed = io.BytesIO()
    keys.encrypt_file(data, sealed, recipients=alice, segment_size=SEG, device="cpu")
    blob = sealed.getvalue()
    writer = None
    if kind == "pipe":
        r, w = os.pipe()
        writer = threading.Thread(target=lambda: (os.write(w, blob), os.close(w)))
        writer.start()
        src = open(r, "rb")
    elif kind == "read-only object":
        class ReadOnly:  # read() and nothing else: what decrypt itself accepts
            def __init__(self):
                self._data = io.BytesIO(blob)

            def read(self, n=-1):
                return self._data.read(n)
        src = ReadOnly()
    else:
        src = _chunks(blob, [100, 5000, 7])
    try:
        out = io.BytesIO()
        keys.decrypt_file(src, out, identities=alice, device="cpu")
    finally:
        if writer is not None:
            writer.join(timeout=30)
            src.close()
    assert out.getvalue() == data


def test_rekeying_through_a_symbolic_link_rewrites_the_file_it_points_to(tmp_path):
    """The header is rewritten in the link's target, which a revoked recipient can no
    longer open, and the link stays a link (the link was replaced by a new file and the
    target kept the old envelope)."""
    from gpucrypt import keys

    alice, mallory = keys.Identity.generate(), keys.Identity.generate()
    data = os.urandom(2 * SEG + 1)
    real = tmp_path / "store" / "data.gc"
    real.parent.mkdir()
    keys.encrypt_file(data, real, recipients=[alice, mallory], segment_size=SEG, device="cpu")
    real.chmod(0o640)
    link = tmp_path / "current.gc"
    link.symlink_to(real)
    keys.rekey_file(link, recipients=[alice], identities=alice)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.stat().st_mode & 0o777 == 0o640
    for path in (real, link):
        with pytest.raises(keys.NoMatchingRecipient):
            keys.decrypt_file(path, io.BytesIO(), identities=mallory, device="cpu")
        out = io.BytesIO()
        keys.decrypt_file(path, out, identities=alice, device="cpu")
        assert out.getvalue() == data
    assert sorted(os.listdir(real.parent)) == ["data.gc"]  # no temporary file left


def test_an_output_that_is_a_symbolic_link_is_refused(tmp_path):
    """Writing a new output over a link would replace the link (its target keeping the
    old data) or, followed, let a planted link choose where the data go: refused, the
    link and its target untouched, nothing left behind."""
    import errno

    target = tmp_path / "target"
    target.write_bytes(b"precious")
    link = tmp_path / "out"
    link.symlink_to(target)
    sealed = tmp_path / "sealed"
    sealed.write_bytes(seal(b"plaintext"))
    for work in (lambda: stream.encrypt(b"data", link, KEY, segment_size=SEG),
                 lambda: stream.decrypt(sealed, link, KEY)):
        with pytest.raises(OSError, match="symbolic link.*give the file it points to") as err:
            work()
        assert err.value.errno == errno.ELOOP and err.value.filename == str(link)
    assert link.is_symlink() and target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["out", "sealed", "target"]


# a child that publishes an unnamed AtomicFile over an existing file and stops, for the
# test's signal, right after the file was linked beside the destination (in the window
# between that link and the rename over it); signals start at their default action, as
# in a shell (under nohup SIGHUP would be ignored and the child would outlive it)
_REPLACE_WINDOW = """
import os, signal, sys, time
for name in ("SIGTERM", "SIGHUP"):
    signal.signal(getattr(signal, name), signal.SIG_DFL)
from gpucrypt.files import _atomic
out = _atomic.AtomicFile(sys.argv[1], overwrite=True)
print("unnamed" if out.unnamed else "named", flush=True)
out.write(b"PLAINTEXT that must not stay behind " * 100)
real = os.replace
def replace_after_the_signal(src, dst):
    print("linked", flush=True)
    time.sleep(120)  # the signal ends the process here
    return real(src, dst)
_atomic.os.replace = replace_after_the_signal
out.commit()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_TMPFILE is Linux's")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_signal_while_an_output_replaces_a_file_leaves_no_copy_of_it(tmp_path, signame):
    """overwrite=True (``--force``, and every library write to a path) cannot link an
    unnamed file over the destination: it links it to ``.OUT.XXXX.gpucrypt-tmp`` beside
    it, then renames that. A real signal from outside in between removed nothing: the
    whole output (plaintext, when decrypting) stayed under that name. It is now
    removed, the destination keeping its old content."""

    target = tmp_path / "out"
    target.write_bytes(b"old")
    with python_child(_REPLACE_WINDOW, str(target)) as child:
        kind = child.stdout.readline().strip()
        if kind != "unnamed":
            pytest.skip(f"no O_TMPFILE in {tmp_path} ({kind or child.stderr.read()})")
        assert child.stdout.readline().strip() == "linked", child.stderr.read()
        beside = [n for n in os.listdir(tmp_path) if n.endswith(".gpucrypt-tmp")]
        assert len(beside) == 1 and b"PLAINTEXT" in (tmp_path / beside[0]).read_bytes()
        dies_of(child, signame)
    assert os.listdir(tmp_path) == ["out"] and target.read_bytes() == b"old"


@pytest.mark.parametrize("where", ["link", "replace"])
def test_ctrl_c_while_an_output_replaces_a_file_leaves_no_copy_of_it(tmp_path, monkeypatch, where):
    """Ctrl-C (KeyboardInterrupt) arriving as the link beside the destination returns,
    the name made (``link``), or as the rename over the destination returns (``replace``,
    the output published): no name beside is left holding the output, and the
    destination holds the old or the new bytes, whole."""
    from gpucrypt.files import _atomic

    target = tmp_path / "out"
    target.write_bytes(b"old")
    probe = _atomic.AtomicFile(tmp_path / "probe")  # the way this folder links unnamed files
    unnamed = probe._temp is None
    probe.abort()
    if not unnamed:
        pytest.skip(f"no O_TMPFILE in {tmp_path}: the output has a temporary name throughout")
    if where == "link":
        real = _atomic.AtomicFile._link_to

        def link_then_interrupt(self, path):
            real(self, path)
            raise KeyboardInterrupt
        monkeypatch.setattr(_atomic.AtomicFile, "_link_to", link_then_interrupt)
    else:
        real_replace = os.replace

        def replace_then_interrupt(src, dst):
            real_replace(src, dst)
            raise KeyboardInterrupt
        monkeypatch.setattr(_atomic.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _atomic.write_atomically(target, b"PLAINTEXT")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"]
    assert target.read_bytes() == (b"old" if where == "link" else b"PLAINTEXT")
    assert not _atomic._LIVE


def test_without_proc_a_writer_by_name_gets_a_named_temporary_file(tmp_path, monkeypatch):
    """Where /proc is not mounted, unnamed files are still linked (linkat with
    AT_EMPTY_PATH: Linux 6.10, or CAP_DAC_READ_SEARCH), but ``/proc/self/fd/N`` names
    nothing: ``writable_name()`` returned it anyway, and write_atomically_with (so
    export_safetensors and ``decrypt-model``) failed with FileNotFoundError. Simulated by
    pointing ``_PROC_FD`` at a missing folder, which ``_link_proc`` uses too."""
    from gpucrypt.files import _atomic

    monkeypatch.setattr(_atomic, "_PROC_FD", str(tmp_path / "no-proc" / "self" / "fd"))
    folder = tmp_path / "out"
    folder.mkdir()  # a folder no unnamed file was linked in yet: its way is found anew
    probe = _atomic.AtomicFile(folder / "probe")
    probe.abort()
    if not probe.unnamed:
        pytest.skip("this kernel links no unnamed file without /proc (linkat AT_EMPTY_PATH "
                    "needs Linux 6.10 or CAP_DAC_READ_SEARCH): the named fallback is used")

    def write(name: str) -> None:
        with open(name, "r+b") as f:  # in place, as safetensors-style writers do
            f.write(b"written through the name")

    _atomic.write_atomically_with(folder / "file", write)
    assert (folder / "file").read_bytes() == b"written through the name"
    assert os.listdir(folder) == ["file"]
    # a caller's file keeps what it held; a dropped one leaves no name behind
    held = _atomic.AtomicFile(folder / "held")
    held.write(b"head ")
    name = held.writable_name()
    assert os.path.exists(name) and os.path.dirname(name) == str(folder)
    with open(name, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    held.commit()
    assert (folder / "held").read_bytes() == b"head tail"
    dropped = _atomic.AtomicFile(folder / "dropped")
    dropped.writable_name()
    dropped.abort()
    assert sorted(os.listdir(folder)) == ["file", "held"]
    assert not _atomic._LIVE  # nothing left for a signal handler to remove


def test_aes_gcm_by_the_tensor_apis_name():
    """The tensor API names AES-GCM "aes-gcm"; the stream format's is AES-256's alone."""
    key = os.urandom(32)
    out = io.BytesIO()
    stream.encrypt(b"hello", out, key, algorithm="aes-gcm", device="cpu")
    assert stream.read_header(out.getvalue()).algorithm == "aes-256-gcm"
    back = io.BytesIO()
    stream.decrypt(io.BytesIO(out.getvalue()), back, key)
    assert back.getvalue() == b"hello"
    with pytest.raises(ValueError, match="or aes-gcm, the same as aes-256-gcm"):
        stream.encrypt(b"hello", io.BytesIO(), key, algorithm="aes-128-gcm")


@pytest.mark.parametrize("spelled", [".", "{d}", "{d}/"])
def test_an_output_that_is_a_folder_is_refused_before_any_work(tmp_path, monkeypatch, spelled):
    """It failed at publishing, after the work, as "Device or resource busy: '.'" or
    "Not a directory: 'out/'" (which it is)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    target = spelled.format(d=tmp_path / "out")
    with pytest.raises(IsADirectoryError, match="it is a folder: give the output file's own"):
        stream.encrypt(b"data", target, os.urandom(32), device="cpu")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
def test_src_and_dst_that_are_one_file_are_refused(tmp_path, operation):
    """decrypt("d.gc", "d.gc", key) replaced the only ciphertext with its plaintext."""
    key = os.urandom(32)
    path = tmp_path / "d"
    stream.encrypt(b"data", path, key, device="cpu")
    before = path.read_bytes()
    (tmp_path / "link").symlink_to(path)
    for dst in (path, str(path), tmp_path / "link"):
        with pytest.raises(ValueError, match="src and dst are the same file"):
            getattr(stream, operation)(path, dst, key, device="cpu")
    assert path.read_bytes() == before


def test_a_fifo_dst_swapped_for_a_link_to_a_file_after_its_check_is_not_written_through(
        tmp_path, monkeypatch):
    """A path checked as a FIFO (then written in place) was opened by name with
    open(path, "wb"): a link to a regular file swapped in between had that file truncated
    and the plaintext written into it. The open now creates and truncates nothing and
    refuses what is not a FIFO or a device."""
    from gpucrypt.files import _atomic

    key = os.urandom(32)
    stream.encrypt(b"SECRET PLAINTEXT", tmp_path / "ct", key, device="cpu")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "victim").write_bytes(b"the victim's own data")
    (tmp_path / "out").symlink_to("fifo")
    checked = _atomic.streamed_path

    def checked_then_swapped(path):
        answer = checked(path)
        os.unlink(tmp_path / "out")
        os.symlink("victim", tmp_path / "out")
        return answer

    monkeypatch.setattr(_atomic, "streamed_path", checked_then_swapped)
    with pytest.raises(OSError, match="became a regular file.*nothing was written"):
        stream.decrypt(tmp_path / "ct", tmp_path / "out", key, device="cpu")
    assert (tmp_path / "victim").read_bytes() == b"the victim's own data"


def test_a_fifo_named_as_dst_is_written_as_a_stream_not_replaced(tmp_path):
    """stream.decrypt(src, "/dev/null", key) as root put a regular file holding the
    plaintext where /dev/null was: a FIFO or a character device named by path was replaced
    by the file AtomicFile renamed over it. It is written in place now, as the command
    line writes it, and AtomicFile itself refuses such a node."""
    import stat
    import threading

    from gpucrypt.files._atomic import AtomicFile

    key, data = os.urandom(32), os.urandom(20_000)
    stream.encrypt(data, tmp_path / "ct", key, segment_size=4096, device="cpu")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    stream.decrypt(tmp_path / "ct", fifo, key, device="cpu")
    reader.join(timeout=60)
    assert got == [data]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["ct", "fifo"]
    with pytest.raises(OSError, match="it is a FIFO, which a new file would replace") as info:
        AtomicFile(fifo)
    assert not isinstance(info.value, FileExistsError)  # not "exists: overwrite it"
    with open(tmp_path / "text", "w") as text, \
            pytest.raises(TypeError, match="open it in binary mode"):
        stream.decrypt(tmp_path / "ct", text, key, device="cpu")


def test_a_read_stopped_by_a_bad_segment_leaves_the_position_where_it_was(tmp_path):
    """A read spanning a good segment and a tampered one raised with the position moved
    past the good bytes, which were never returned: the position stays where the read
    started, so they can be read again (a short read of them instead would read as the
    file's end to readers such as pyarrow's)."""
    seg, key, data = 4096, os.urandom(32), os.urandom(5 * 4096 + 100)
    sealed = io.BytesIO()
    stream.encrypt(data, sealed, key, segment_size=seg, device="cpu")
    raw = bytearray(sealed.getvalue())
    raw[stream.read_header(bytes(raw)).header_length + 2 * (seg + 16) + 5] ^= 1  # segment 2
    f = stream.open(io.BytesIO(bytes(raw)), key)
    f.seek(seg + 10)
    with pytest.raises(stream.AuthenticationError):
        f.read(2 * seg)
    assert f.tell() == seg + 10
    assert f.read(seg - 10) == data[seg + 10:2 * seg]

    class FailingRead(io.BytesIO):  # an I/O error (EIO, a network file system) instead
        fail = False

        def read(self, size=-1):
            if self.fail:
                raise OSError(5, "Input/output error")
            return super().read(size)
    source = FailingRead(sealed.getvalue())
    f = stream.open(source, key)
    f.seek(seg + 10)
    f.read(1)  # segment 1 cached
    source.fail = True
    with pytest.raises(OSError, match="Input/output error"):
        f.read(2 * seg)
    assert f.tell() == seg + 11


def test_encrypting_a_file_object_read_past_its_end_gives_an_empty_stream(tmp_path):
    """A file object positioned past its end (seek allows it) holds nothing more: encrypted
    into a path it failed ("the input file shrank", or "buffer must be 16 bytes") where
    into a BytesIO it gave the empty stream."""
    key = os.urandom(32)
    (tmp_path / "p").write_bytes(b"x" * 100)
    for past in (100, 5000):
        with open(tmp_path / "p", "rb") as src:
            src.seek(100 + past)
            stream.encrypt(src, tmp_path / "e", key, device="cpu")
        back = io.BytesIO()
        stream.decrypt(tmp_path / "e", back, key, device="cpu")
        assert back.getvalue() == b""
        os.remove(tmp_path / "e")


def test_a_text_file_given_to_decrypt_or_open_says_to_open_it_in_binary_mode(tmp_path):
    """encrypt said so; decrypt and open raised UnicodeDecodeError from the header's read."""
    key = os.urandom(32)
    stream.encrypt(b"abc" * 100, tmp_path / "e", key, device="cpu")
    with open(tmp_path / "e") as text:
        for call in (lambda: stream.decrypt(text, tmp_path / "o", key, device="cpu"),
                     lambda: stream.open(text, key)):
            with pytest.raises(TypeError, match="open it in binary mode"):
                call()
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ pipes, devices, io contracts
def _release_fifo_reader(fifo) -> None:
    """Open ``fifo`` for writing and close it: a reader blocked in its open() returns."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting: nothing to release
        pass


def _within(seconds: float, call, fifo):
    """``call()``'s result or exception, failing the test if it has not returned within
    ``seconds`` (a FIFO's open waits for a writer forever: the hang is released after)."""
    import threading

    outcome = []

    def run():
        try:
            outcome.append(("returned", call()))
        except BaseException as exc:  # noqa: B036 (reported to the test)
            outcome.append(("raised", exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    hung = worker.is_alive()
    _release_fifo_reader(fifo)
    worker.join(10)
    assert not hung, f"still waiting after {seconds} s (blocked opening the FIFO?)"
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_decrypt_file_reads_a_named_pipe_given_by_path_once(tmp_path):
    """keys.decrypt_file(FIFO path) read the header through one open and the stream through
    a second, which started where the first one's buffer had stopped: "not a gpucrypt
    file". The path is opened once now, as stream.decrypt and the command line do."""
    import threading

    from gpucrypt import keys

    alice = keys.Identity.generate()
    data = os.urandom(100_000)
    sealed = io.BytesIO()
    keys.encrypt_file(data, sealed, recipients=[alice.recipient], segment_size=4096)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(sealed.getvalue()), daemon=True)
    writer.start()
    out = io.BytesIO()
    kind, value = _within(30, lambda: keys.decrypt_file(fifo, out, identities=[alice]), fifo)
    writer.join(10)
    assert kind == "returned", value
    assert out.getvalue() == data


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_random_access_and_rekey_refuse_a_named_pipe_at_once(tmp_path):
    """stream.open(FIFO path) and keys.rekey_file(FIFO path) waited forever for a writer
    (a blocking open); both refuse it now, saying what they need."""
    from gpucrypt import keys

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    kind, exc = _within(10, lambda: stream.open(fifo, os.urandom(32)), fifo)
    assert kind == "raised" and isinstance(exc, io.UnsupportedOperation), exc
    assert "is a FIFO" in str(exc) and "stream.decrypt" in str(exc)
    kind, exc = _within(10, lambda: stream.replace_envelope(fifo, os.urandom(32), b"\x01e"),
                        fifo)
    assert kind == "raised" and isinstance(exc, ValueError), exc
    assert "is a FIFO" in str(exc) and "regular file" in str(exc)
    alice = keys.Identity.generate()
    kind, exc = _within(10, lambda: keys.rekey_file(fifo, recipients=[alice.recipient],
                                                     identities=[alice]), fifo)
    assert kind == "raised" and isinstance(exc, ValueError), exc
    assert "is a FIFO" in str(exc) and "regular file" in str(exc)


def test_random_access_refuses_a_pipe_object_saying_why():
    """A pipe's file object failed with "[Errno 29] Illegal seek" from tell()."""
    key = os.urandom(32)
    sealed = io.BytesIO()
    stream.encrypt(b"x" * 10, sealed, key, device="cpu")
    r, w = os.pipe()
    with open(r, "rb") as pipe, open(w, "wb") as writer:
        writer.write(sealed.getvalue())
        writer.flush()
        with pytest.raises(io.UnsupportedOperation, match="cannot seek .* stream.decrypt"):
            stream.open(pipe, key)


def test_the_random_access_reader_keeps_io_contracts():
    """As io.FileIO: seek takes integers only (a float was kept and failed at the next
    read), read(None) reads to the end, write is UnsupportedOperation, and a closed
    reader's readable()/seekable()/writable() are ValueError (they said True)."""
    key, data = os.urandom(32), os.urandom(10_000)
    sealed = io.BytesIO()
    stream.encrypt(data, sealed, key, segment_size=4096, device="cpu")
    f = stream.open(io.BytesIO(sealed.getvalue()), key)
    with pytest.raises(TypeError):
        f.seek(1.5)
    assert f.tell() == 0
    with pytest.raises(TypeError):
        f.seek(0, 1.0)
    f.seek(4090)
    assert f.read(None) == data[4090:]
    assert (f.readable(), f.seekable(), f.writable()) == (True, True, False)
    with pytest.raises(io.UnsupportedOperation):
        f.write(b"x")
    f.close()
    for question in (f.readable, f.seekable, f.writable):
        with pytest.raises(ValueError, match="closed file"):
            question()


def test_rewriting_a_header_warns_of_other_hard_links(tmp_path):
    """A hard link kept the old file (its old envelope) after the name given was rewritten,
    unsaid; a rekey meant to drop a recipient left that recipient's stanza under the
    other name."""
    key = os.urandom(32)
    stream.encrypt(b"data" * 100, tmp_path / "ct", key, device="cpu")
    os.link(tmp_path / "ct", tmp_path / "other-name")
    with pytest.warns(UserWarning, match="1 other hard link") as caught:
        stream.replace_envelope(tmp_path / "ct", key, b"\x01new envelope")
    assert caught[0].filename == __file__  # the user's call, not a line inside gpucrypt
    assert stream.read_header(tmp_path / "other-name").envelope is None
    assert stream.read_header(tmp_path / "ct").envelope == b"\x01new envelope"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a file another owner needs root")
def test_rewriting_a_header_keeps_the_owner_and_group(tmp_path):
    """The rewritten file belonged to the rewriting user and group: a shared group's
    members lost their access although the mode was kept."""
    key = os.urandom(32)
    path = tmp_path / "ct"
    stream.encrypt(b"data" * 100, path, key, device="cpu")
    os.chown(path, 1, 4)
    os.chmod(path, 0o2640)
    stream.replace_envelope(path, key, b"\x01new envelope")
    st = os.stat(path)
    # set-group-ID is not kept: a rewritten file is new data (see the next test)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1, 4, 0o640)


def _rewrite_header_in_child(path, key: bytes, *wrapper: str) -> None:
    """stream.replace_envelope(path) run by a child started through ``wrapper`` (a command
    that takes privileges away)."""
    code = ("import sys; from gpucrypt import stream; "
            "stream.replace_envelope(sys.argv[1], bytes.fromhex(sys.argv[2]), b'\\x01new')")
    subprocess.run([*wrapper, sys.executable, "-c", code, str(path), key.hex()], check=True,
                   timeout=120)


def _setuid_file_of_another_user(tmp_path):
    key = os.urandom(32)
    path = tmp_path / "ct"
    stream.encrypt(b"data" * 100, path, key, device="cpu")
    os.chown(path, 1, 4)
    os.chmod(path, 0o6755)
    return path, key


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not
                    __import__("shutil").which("setpriv"),
                    reason="needs root, and setpriv to take CAP_CHOWN away from a child")
def test_a_rewrite_that_cannot_keep_the_owner_drops_set_user_id(tmp_path):
    """root without CAP_CHOWN (a hardened container) could not give the new file its
    owner, and set the old mode on it all the same: another user's set-user-ID file
    became root's, still set-user-ID. A rewrite drops set-user-ID and set-group-ID (kept
    with their owner, the kernel cleared them anyway at the first write by anyone
    without CAP_FSETID: a non-root owner rewriting their own file lost them)."""
    path, key = _setuid_file_of_another_user(tmp_path)
    _rewrite_header_in_child(path, key, "setpriv", "--bounding-set", "-chown")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (0, 0)  # could not be kept
    assert st.st_mode & 0o7777 == 0o755
    assert stream.read_header(path).envelope == b"\x01new"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or
                    subprocess.run(["unshare", "-r", "true"], capture_output=True).returncode,
                    reason="needs root (to give the file another owner) and user namespaces")
def test_a_rewrite_in_a_user_namespace_keeps_going_without_the_owner(tmp_path):
    """In a user namespace (a rootless container) the owner's id is not mapped and fchown
    fails with EINVAL, not EPERM: the rewrite failed ('Invalid argument', no path) where it
    had worked before the owner was kept. It goes on, as with EPERM."""
    path, key = _setuid_file_of_another_user(tmp_path)
    _rewrite_header_in_child(path, key, "unshare", "-r")
    st = os.stat(path)
    assert st.st_mode & (0o4000 | 0o2000) == 0
    assert stream.read_header(path).envelope == b"\x01new"


def test_random_access_reads_a_block_device():
    """stream.open took a block device (seekable, sized) before FIFOs were refused, and
    must still: it is refused for holding no stream, not for being a device."""
    import stat

    device = next((entry.path for entry in os.scandir("/dev")
                   if stat.S_ISBLK(entry.stat().st_mode) and os.access(entry.path, os.R_OK)), None)
    if device is None:
        pytest.skip("no readable block device here")
    with pytest.raises(stream.StreamError):  # not a gpucrypt stream (an empty loop: truncated)
        stream.open(device, os.urandom(32)).close()


def test_rewriting_a_header_keeps_extended_attributes(tmp_path):
    """A POSIX ACL that let another user read the file, and user attributes, were lost when
    the header was rewritten into a new file."""
    key = os.urandom(32)
    path = tmp_path / "ct"
    stream.encrypt(b"data" * 100, path, key, device="cpu")
    try:
        os.setxattr(path, "user.gpucrypt-test", b"kept")
    except OSError as exc:
        pytest.skip(f"this file system takes no user attributes ({exc.strerror})")
    stream.replace_envelope(path, key, b"\x01new envelope")
    assert os.getxattr(path, "user.gpucrypt-test") == b"kept"


def _posix_acl(*entries) -> bytes:
    """A system.posix_acl_* value: (tag, permissions, id) entries (the kernel's format)."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def test_a_rewrite_gives_no_access_the_old_file_did_not(tmp_path):
    """The new file took its folder's default ACL (here: a user allowed to read), which
    the old file did not have, and the old group bits set as its mask turned it on: a
    rewrite gave that user read access. The new file has the old file's attributes, no
    more."""
    nobody, anyone = 65534, 0xFFFFFFFF
    user_obj, user, group_obj, mask, other = 0x01, 0x02, 0x04, 0x10, 0x20
    try:
        os.setxattr(tmp_path, "system.posix_acl_default", _posix_acl(
            (user_obj, 6, anyone), (user, 4, nobody), (group_obj, 4, anyone), (mask, 6, anyone),
            (other, 0, anyone)))
    except OSError as exc:
        pytest.skip(f"this file system takes no POSIX ACLs ({exc.strerror})")
    key, path = os.urandom(32), tmp_path / "ct"
    stream.encrypt(b"data" * 100, path, key, device="cpu")
    os.removexattr(path, "system.posix_acl_access")  # its owner took the inherited ACL away
    os.chmod(path, 0o640)
    stream.replace_envelope(path, key, b"\x01new envelope")
    assert "system.posix_acl_access" not in os.listxattr(path)
    assert os.stat(path).st_mode & 0o7777 == 0o640


# ------------------------------------------------------------------ lines
class _CountingReader(stream.SegmentReader):
    """A SegmentReader that counts the calls its readline makes to readinto."""

    calls = 0

    def readinto(self, buf):
        self.calls += 1
        return super().readinto(buf)


def _lines_file(tail: bytes = b"no newline at the end") -> bytes:
    """Lines of many lengths, several across the 4 KiB segment boundaries, one longer
    than a whole segment, empty ones, and a last line ``tail``."""
    lines = [b"x" * n + b"\n" for n in (0, 5, 4090, 1, 0, 3 * SEG, 17, SEG - 1, SEG)]
    return b"".join(lines) + tail


@pytest.mark.parametrize("tail", [b"no newline at the end", b""])
def test_readline_and_iteration_give_the_lines_across_segments(tail):
    data = _lines_file(tail)
    with stream.open(io.BytesIO(seal(data)), KEY) as f:
        assert list(f) == data.splitlines(keepends=True)
        assert f.readline() == b"" and f.tell() == len(data)
        f.seek(0)
        assert f.readlines() == data.splitlines(keepends=True)
        # from any position: the rest of its line, then reads go on where it ended
        for start in (0, 6, SEG - 3, SEG, SEG + 1, 2 * SEG + 5, len(data) - 3):
            f.seek(start)
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end + 1
            assert f.readline() == data[start:end] and f.tell() == end
            assert f.read(7) == data[end:end + 7]


def test_readline_keeps_to_its_limit():
    data = _lines_file()
    with stream.open(io.BytesIO(seal(data)), KEY) as f:
        for start, limit in ((0, 0), (0, 1), (6, 3), (SEG - 3, 10), (SEG - 3, 5000),
                             (12, 3 * SEG + 100), (len(data) - 4, 100), (0, None), (6, -1)):
            f.seek(start)
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end + 1
            if limit is not None and limit >= 0:
                end = min(end, start + limit)
            assert f.readline(limit) == data[start:end], (start, limit)
            assert f.tell() == end
        with pytest.raises(TypeError):
            f.readline(1.5)


def test_readline_reads_a_line_whole_not_a_byte_per_call():
    """IOBase's readline reads one byte per readinto call (a line of 4 KiB: 4096 calls,
    each through the segment cache); this one takes the line from the segments."""
    data = _lines_file()
    with _CountingReader(io.BytesIO(seal(data)), KEY) as f:
        assert sum(1 for _ in f) == len(data.splitlines())
        assert f.calls == 0


def test_readline_releases_no_byte_of_a_line_that_reaches_a_bad_segment():
    data = b"a" * (SEG - 10) + b"\n" + b"b" * 20 + b"\n" + b"c" * SEG + b"\n"
    header, segs = segments(seal(data))
    bad = bytearray(segs[1])
    bad[30] ^= 1
    tampered = header + segs[0] + bytes(bad) + b"".join(segs[2:])
    with stream.open(io.BytesIO(tampered), KEY) as f:  # the final segment (2) verifies
        assert f.readline() == data[:SEG - 9]  # segment 0 alone
        start = f.tell()
        with pytest.raises(stream.AuthenticationError) as caught:
            f.readline()  # starts in segment 0, ends in the bad segment 1
        assert caught.value.segment == 1
        assert f.tell() == start  # nothing of it consumed
        f.seek(2 * SEG)
        assert f.readline() == data[2 * SEG:]
