"""gpucrypt.tensor with JAX (CPU arrays here; GPU arrays under the ``gpu`` marker).

Every dtype JAX offers round-trips bit for bit (random bit patterns: NaN payloads,
infinities and subnormals included) to a ``jax.Array`` of the same dtype, shape and
device; the ciphertext equals ``cryptography``'s AEAD over the array's bytes and the
documented associated data, and equals NumPy's for the same bytes, key and nonce.
JAX arrays are immutable: ``inplace=True`` and ``out=`` are refused with
``ValueError``. 64-bit dtypes exist in JAX only with ``jax_enable_x64``, which the
``x64`` fixture turns on for one test and back off after it.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

import gpucrypt
from gpucrypt import EncryptedTensor, TensorCipher

from _reference import (check_tensor_is_reference_aead, hand_metadata, reference_seal,
                        require_gpu_backend)

X32_DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "float16",
              "bfloat16", "float32", "complex64", "float8_e4m3fn", "float8_e5m2",
              "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float8_e3m4",
              "float8_e4m3", "float8_e4m3b11fnuz"]
X64_DTYPES = ["int64", "uint64", "float64", "complex128"]
SUB_BYTE_DTYPES = ["int2", "uint2", "int4", "uint4", "float4_e2m1fn"]


def jax_has(name: str):
    return pytest.mark.skipif(name != "bool" and not hasattr(jnp, name),
                              reason=f"jax {jax.__version__} has no {name}")


DTYPES = [pytest.param(n, marks=jax_has(n)) for n in X32_DTYPES + X64_DTYPES]


@pytest.fixture
def x64():
    """64-bit types on for this test only (``jax_enable_x64`` is process-wide)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def random_array(shape, name, seed=0) -> jax.Array:
    """Random bit patterns of any dtype, made in JAX by bitcasting random bytes."""
    rng = np.random.default_rng(seed)
    if name == "bool":
        return jnp.asarray(rng.integers(0, 2, size=shape).astype(bool))
    dt = jnp.dtype(getattr(jnp, name))
    count = int(np.prod(shape, dtype=np.int64))
    raw = jnp.asarray(rng.integers(0, 256, size=count * dt.itemsize, dtype=np.uint8))
    return raw.view(dt).reshape(shape)


def as_bytes(a) -> bytes:
    if hasattr(a, "get") and hasattr(a, "__cuda_array_interface__"):  # a CuPy array: device memory
        a = a.get()
    return np.asarray(a).reshape(-1).view(np.uint8).tobytes()


def assert_same_array(y, x):
    assert isinstance(y, jax.Array)
    assert y.dtype == x.dtype and y.shape == x.shape and y.devices() == x.devices()
    assert as_bytes(y) == as_bytes(x)


# --------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 3, 4)])
def test_every_jax_dtype_roundtrips(dtype, shape, request):
    if dtype in X64_DTYPES:
        request.getfixturevalue("x64")
    key = os.urandom(32)
    x = random_array(shape, dtype)
    assert x.dtype == jnp.dtype(getattr(jnp, dtype) if dtype != "bool" else bool)
    enc = gpucrypt.encrypt_tensor(x, key)
    assert (enc.framework, enc.dtype, enc.shape, enc.on_device) == ("jax", dtype, shape, False)
    assert_same_array(gpucrypt.decrypt_tensor(enc, key), x)
    assert_same_array(gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(enc.to_bytes()), key), x)


def test_every_float8_and_sub_byte_dtype_of_jax_is_covered():
    exposed = {n for n in dir(jnp) if n.startswith(("float8_", "float4_", "int2", "uint2", "int4",
                                                     "uint4"))}
    assert exposed <= set(X32_DTYPES) | set(SUB_BYTE_DTYPES)


@pytest.mark.parametrize("dtype", [pytest.param(n, marks=jax_has(n)) for n in SUB_BYTE_DTYPES])
def test_sub_byte_dtypes_are_refused(dtype):
    x = jnp.zeros((4,), dtype=getattr(jnp, dtype))
    with pytest.raises(ValueError, match="sub-byte"):
        gpucrypt.encrypt_tensor(x, os.urandom(32))


def test_large_arrays_roundtrip():
    key = os.urandom(32)
    for x in (random_array((4, 256, 1024), "float32"), random_array((512, 2048), "bfloat16")):
        enc = gpucrypt.encrypt_tensor(x, key, algorithm="aes-gcm")
        assert_same_array(gpucrypt.decrypt_tensor(enc, key), x)


def test_64_bit_arrays_need_x64_to_be_decrypted(x64):
    key = os.urandom(32)
    x = random_array((3, 2), "float64")
    blob = gpucrypt.encrypt_tensor(x, key).to_bytes()
    jax.config.update("jax_enable_x64", False)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key)
    with pytest.raises(InvalidTag):   # tampered or wrong key: the tag decides first
        gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), os.urandom(32))
    jax.config.update("jax_enable_x64", True)
    assert_same_array(gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key), x)


# --------------------------------------------------------------------- byte identity
@pytest.mark.parametrize("algorithm,key_len", [("chacha20-poly1305", 32), ("aes-gcm", 16),
                                               ("aes-gcm", 32), ("xchacha20-poly1305", 32)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "bool", "complex64"])
def test_jax_ciphertext_is_the_reference_aead(algorithm, key_len, dtype):
    x = random_array((4, 5), dtype)
    check_tensor_is_reference_aead(x, framework="jax", dtype=dtype, shape=(4, 5),
                                   nbytes=x.size * x.dtype.itemsize, algorithm=algorithm,
                                   key=os.urandom(key_len), as_bytes=as_bytes)


def test_jax_and_numpy_ciphertexts_agree_for_the_same_nonce():
    key = os.urandom(32)
    x = random_array((6, 7), "bfloat16")
    host = np.asarray(x)                      # the same bytes as a NumPy (ml_dtypes) array
    ej = gpucrypt.encrypt_tensor(x, key, nonce=bytes(12))
    en = gpucrypt.encrypt_tensor(host, key, nonce=bytes(12))
    assert as_bytes(ej.ciphertext) == as_bytes(en.ciphertext)
    aj, an = ej.associated_data(), en.associated_data()
    assert [i for i in range(len(aj)) if aj[i] != an[i]] == [8]   # only the framework code
    assert ej.tag != en.tag
    a = TensorCipher(key, nonces="counter", prefix=b"jax")
    b = TensorCipher(key, nonces="counter", prefix=b"jax")
    ea, eb = a.encrypt(x), b.encrypt(host)
    assert ea.nonce == eb.nonce and as_bytes(ea.ciphertext) == as_bytes(eb.ciphertext)
    assert_same_array(a.decrypt(ea), x)


def test_jax_made_tensor_decrypts_as_numpy_where_jax_is_missing(monkeypatch):
    key = os.urandom(32)
    x = random_array((3, 4), "bfloat16")
    blob = gpucrypt.encrypt_tensor(x, key).to_bytes()
    monkeypatch.setitem(sys.modules, "jax", None)     # `import jax` now fails
    y = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key)
    assert isinstance(y, np.ndarray) and y.dtype.name == "bfloat16" and y.shape == (3, 4)
    assert as_bytes(y) == as_bytes(x)


# --------------------------------------------------------------------- tampering
TAMPERINGS = [("ciphertext", None), ("tag", None), ("nonce", None), ("aad", b"y"),
              ("dtype", "float16"), ("dtype", "int16"), ("shape", (4, 2)),
              ("framework", "numpy"), ("framework", "torch"), ("key_id", "other"),
              ("name", "w"), ("algorithm", "xchacha20-poly1305"),
              ("dtype+shape", ("float64", (2, 1)))]   # a 64-bit dtype JAX cannot make now


@pytest.mark.parametrize("field,value", TAMPERINGS, ids=[t[0] + "-" + str(t[1]) for t in TAMPERINGS])
def test_jax_tampering_fails(field, value):
    key = os.urandom(32)
    x = random_array((2, 4), "bfloat16")
    enc = gpucrypt.encrypt_tensor(x, key, aad=b"x")
    if field == "ciphertext":
        enc.ciphertext[3] ^= 1
    elif field == "tag":
        enc._tag = bytes([enc.tag[0] ^ 1]) + enc.tag[1:]
    elif field == "nonce":
        enc.nonce = bytes([enc.nonce[0] ^ 1]) + enc.nonce[1:]
    elif field == "algorithm":
        enc.algorithm, enc.nonce = value, enc.nonce + bytes(12)
    elif field == "dtype+shape":
        enc.dtype, enc.shape = value
    else:
        setattr(enc, field, value)
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, key)


def test_tampered_serialised_jax_tensor_fails():
    key = os.urandom(32)
    x = random_array((5,), "float32")
    blob = gpucrypt.encrypt_tensor(x, key).to_bytes()
    for pos in (len(blob) - 17, len(blob) - 1, len(blob) - 16 - 20 - 1):   # ciphertext, tag, nonce
        bad = bytearray(blob)
        bad[pos] ^= 0x80
        with pytest.raises(InvalidTag):
            gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(bytes(bad)), key)


# --------------------------------------------------------------------- immutability
def test_inplace_and_out_are_refused_with_what_to_do():
    key = os.urandom(32)
    x = random_array((4,), "float32")
    original = as_bytes(x)
    with pytest.raises(ValueError, match=r"immutable.*leave it False"):
        gpucrypt.encrypt_tensor(x, key, inplace=True)
    mixed = {"n": np.arange(4, dtype=np.float32), "j": x}
    with pytest.raises(ValueError, match="immutable"):
        gpucrypt.encrypt_tensors(mixed, key, inplace=True)
    assert np.array_equal(mixed["n"], np.arange(4, dtype=np.float32))   # refused before any work
    assert as_bytes(x) == original
    enc = gpucrypt.encrypt_tensor(x, key)
    assert not enc.inplace
    with pytest.raises(ValueError, match=r"immutable.*inplace=False"):
        gpucrypt.decrypt_tensor(enc, key, inplace=True)
    with pytest.raises(ValueError, match="writable"):
        gpucrypt.decrypt_tensor(enc, key, out=jnp.zeros_like(x))
    assert_same_array(gpucrypt.decrypt_tensor(enc, key), x)   # enc is still usable


# --------------------------------------------------------------------- batches
def test_batch_of_jax_arrays(x64):
    key = os.urandom(32)
    tensors = {"w": random_array((3, 5), "bfloat16"), "b": random_array((5,), "float32"),
               "step": random_array((), "int64"), "mask": random_array((2, 2), "bool"),
               "empty": random_array((0, 4), "float8_e5m2"), "np": np.arange(3, dtype=np.int16)}
    encs = gpucrypt.encrypt_tensors(tensors, key)
    assert list(encs) == list(tensors) and [e.name for e in encs.values()] == list(tensors)
    assert [e.framework for e in encs.values()] == ["jax"] * 5 + ["numpy"]
    assert len({e.nonce for e in encs.values()}) == len(tensors)
    back = gpucrypt.decrypt_tensors(encs, key)
    for n in list(tensors)[:-1]:
        assert_same_array(back[n], tensors[n])
    assert isinstance(back["np"], np.ndarray) and np.array_equal(back["np"], tensors["np"])
    blobs = {n: e.to_bytes() for n, e in encs.items()}
    again = gpucrypt.decrypt_tensors({n: EncryptedTensor.from_bytes(b) for n, b in blobs.items()},
                                     key)
    assert all(as_bytes(again[n]) == as_bytes(tensors[n]) for n in tensors)
    encs["w"], encs["b"] = encs["b"], encs["w"]
    with pytest.raises(InvalidTag) as info:
        gpucrypt.decrypt_tensors(encs, key)
    assert sorted(info.value.failed) == ["b", "w"]
    as_list = gpucrypt.decrypt_tensors(gpucrypt.encrypt_tensors(list(tensors.values()), key), key)
    assert all(as_bytes(a) == as_bytes(b) for a, b in zip(as_list, tensors.values()))


# --------------------------------------------------------------------- GPU backend
@pytest.mark.cudasim
def test_jax_arrays_through_the_gpu_backend():
    """``device="gpu"``: the GPU backend (simulated here) encrypts and decrypts; the result
    is a JAX array on JAX's default device (the CPU here, where JAX sees no GPU)."""
    require_gpu_backend()
    key = os.urandom(32)
    tensors = {"w": random_array((3, 5), "bfloat16"), "m": random_array((4,), "bool")}
    encs = gpucrypt.encrypt_tensors(tensors, key, device="gpu")
    for n, x in tensors.items():
        aad = hand_metadata(algorithm="chacha20-poly1305", framework="jax", dtype=encs[n].dtype,
                            shape=x.shape, nbytes=x.size * x.dtype.itemsize, name=n)
        assert as_bytes(encs[n].ciphertext) + encs[n].tag == reference_seal(
            "chacha20-poly1305", key, encs[n].nonce, as_bytes(x), aad)
    default = jax.devices()[0]
    back = gpucrypt.decrypt_tensors(encs, key, device="gpu")
    for n, x in tensors.items():
        assert isinstance(back[n], jax.Array) and back[n].devices() == {default}
        assert back[n].dtype == x.dtype and as_bytes(back[n]) == as_bytes(x)
    host = gpucrypt.decrypt_tensors(encs, key, device="cpu")
    assert all(as_bytes(host[n]) == as_bytes(x) for n, x in tensors.items())


# ------------------------------------------------------------------ real GPU only
def jax_gpu_device():
    """JAX's first GPU, or a skip with the reason (a failure under GPUCRYPT_REQUIRE_GPU=1)."""
    try:
        return jax.devices("gpu")[0]
    except RuntimeError as exc:
        if os.environ.get("GPUCRYPT_REQUIRE_GPU") == "1":
            pytest.fail(f"GPUCRYPT_REQUIRE_GPU=1 but JAX sees no GPU: {exc}")
        pytest.skip(f"JAX sees no GPU (a CPU-only jaxlib): {exc}")


@pytest.mark.gpu
def test_jax_gpu_arrays_roundtrip_and_batch():
    dev = jax_gpu_device()
    key = os.urandom(32)
    tensors = {n: jax.device_put(random_array(shape, n), dev)
               for n, shape in [("bfloat16", (33, 17)), ("bool", (7,)), ("complex64", ()),
                                ("float8_e4m3fn", (0, 3)), ("uint8", (1000,))]}
    for n, x in tensors.items():
        enc = gpucrypt.encrypt_tensor(x, key)
        assert enc.on_device
        blob = enc.to_bytes()
        aad = hand_metadata(algorithm="chacha20-poly1305", framework="jax", dtype=n,
                            shape=x.shape, nbytes=x.size * x.dtype.itemsize)
        assert blob[-16 - x.size * x.dtype.itemsize:] == reference_seal(
            "chacha20-poly1305", key, enc.nonce, as_bytes(x), aad)
        assert_same_array(gpucrypt.decrypt_tensor(enc, key), x)
        y = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key)   # a host result
        assert isinstance(y, jax.Array) and y.devices() == {jax.devices("cpu")[0]}
        assert as_bytes(y) == as_bytes(x)
        z = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key, device="gpu")
        assert z.devices() == {jax.devices()[0]} and as_bytes(z) == as_bytes(x)
    encs = gpucrypt.encrypt_tensors(tensors, key)
    back = gpucrypt.decrypt_tensors(encs, key)
    for n, x in tensors.items():
        assert_same_array(back[n], x)


def _runs_ok_with_two_cpu_devices(code: str, cwd) -> None:
    """Run ``code`` in a Python process whose JAX has two CPU devices (the flag must be set
    before JAX starts); it must print "ok"."""
    import subprocess

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_host_array_comes_back_on_its_own_cpu_device(tmp_path):
    """JAX can have several CPU devices (``--xla_force_host_platform_device_count``), which
    the result's place ("the host") does not tell apart: an array on the second one was
    decrypted onto the first. It comes back where it was, alone and in a batch; a pickled
    result, which keeps no device object of this process, on JAX's first CPU device.
    In a process of its own: the flag must be set before JAX starts."""
    code = """if True:
        import os, pickle
        import jax, jax.numpy as jnp, numpy as np, gpucrypt
        key = os.urandom(32)
        cpu = jax.devices("cpu")
        assert len(cpu) == 2, cpu
        x = jax.device_put(jnp.arange(4.0), cpu[1])
        enc = gpucrypt.encrypt_tensor(x, key)
        for back in (gpucrypt.decrypt_tensor(enc, key), gpucrypt.decrypt_tensors([enc], key)[0],
                     gpucrypt.decrypt_tensors(gpucrypt.encrypt_tensors({"x": x}, key), key)["x"]):
            assert back.devices() == {cpu[1]}, back.devices()
            assert (back == x).all()
        again = gpucrypt.decrypt_tensor(pickle.loads(pickle.dumps(enc)), key)
        assert again.devices() == {cpu[0]} and (np.asarray(again) == np.asarray(x)).all()
        print("ok")
    """
    _runs_ok_with_two_cpu_devices(code, tmp_path)


def test_a_deep_copy_comes_back_on_the_cpu_device_of_its_original(tmp_path):
    """A deep copy lives in the same process as its original, so its result goes back to
    the CPU device the array was on; it went through the pickle's state, which keeps no
    device object, and came back on JAX's first CPU device. A pickle still does (and
    holds no ``_home`` for another process or version to load). In a process of its own:
    the flag must be set before JAX starts."""
    code = """if True:
        import copy, os, pickle
        import jax, jax.numpy as jnp, gpucrypt
        key = os.urandom(32)
        cpu = jax.devices("cpu")
        assert len(cpu) == 2, cpu
        x = jax.device_put(jnp.arange(4.0), cpu[1])
        enc = gpucrypt.encrypt_tensor(x, key)
        encs = gpucrypt.encrypt_tensors({"x": x, "y": jax.device_put(x, cpu[0])}, key)
        for back in (gpucrypt.decrypt_tensor(copy.deepcopy(enc), key),
                     gpucrypt.decrypt_tensor(copy.deepcopy(copy.deepcopy(enc)), key),
                     gpucrypt.decrypt_tensors(copy.deepcopy(encs), key)["x"]):
            assert back.devices() == {cpu[1]}, back.devices()
            assert (back == x).all()
        assert gpucrypt.decrypt_tensors(copy.deepcopy(encs), key)["y"].devices() == {cpu[0]}
        assert "_home" not in enc.__getstate__()[1]
        again = gpucrypt.decrypt_tensor(copy.deepcopy(pickle.loads(pickle.dumps(enc))), key)
        assert again.devices() == {cpu[0]} and (again == jax.device_put(x, cpu[0])).all()
        print("ok")
    """
    _runs_ok_with_two_cpu_devices(code, tmp_path)
