"""Encrypted Hugging Face checkpoints: ``gpucrypt encrypt-model`` on a checkpoint folder,
:mod:`gpucrypt.hf` building a transformers model and a PEFT LoRA adapter from it.

The model is a tiny Llama built here from a config (no hub download: HF_HUB_OFFLINE=1),
saved sharded by ``save_pretrained(max_shard_size=...)``; its outputs on a fixed input
must be identical after encryption and loading. transformers is imported once, in the
module fixture (it takes seconds), so that the cost shows in ``--durations``.
"""
from __future__ import annotations

import contextlib
import copy
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from gpucrypt import hf, models
from gpucrypt.cli import main as cli
from gpucrypt.files import checkpoints
from gpucrypt.files._format import FormatError
from gpucrypt.stream import AuthenticationError
# SoftHSM2 and moto's KMS server, set up as for the key provider tests
from test_key_providers import (PIN, SO_PIN, TOKEN, _hsm_uri, _softhsm_module, env,  # noqa: F401
                                kms)
from _signals import dies_of, python_child

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the hub
INPUT = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127, 3, 0]])


@pytest.fixture(scope="module")
def lib():
    import peft
    import transformers

    return transformers, peft


@pytest.fixture(scope="module")
def tiny(lib, tmp_path_factory):
    """(folder, the model, its logits on INPUT, key file, encrypted folder)."""
    transformers, _ = lib
    d = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(d / "plain", max_shard_size="20KB")
    assert len([n for n in os.listdir(d / "plain") if n.endswith(".safetensors")]) > 3
    (d / "key").write_bytes(os.urandom(32))
    (d / "key").chmod(0o600)  # the CLI refuses key files others can read
    assert cli(["encrypt-model", "--key-file", str(d / "key"), "--segment-size", "4KiB",
                str(d / "plain"), str(d / "enc")]) == 0
    with torch.no_grad():
        logits = model(INPUT).logits
    return d, model, logits, (d / "key").read_bytes()


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def test_sharded_checkpoint_loads_with_identical_outputs(lib, tiny):
    transformers, _ = lib
    d, _, want, key = tiny
    plain, enc = d / "plain", d / "enc"
    assert sorted(os.listdir(enc)) == sorted(os.listdir(plain) + [checkpoints.MANIFEST_NAME])
    for name in ("model.safetensors.index.json", "config.json"):
        assert filecmp.cmp(plain / name, enc / name, shallow=False)  # copied as they are
    shards = sorted(n for n in os.listdir(enc) if n.endswith(".safetensors"))
    for name in shards:
        assert (enc / name).read_bytes()[:8] == models.MAGIC
    model = hf.from_pretrained(transformers.AutoModelForCausalLM, enc, key=key).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits_of(model), want)


@pytest.mark.parametrize("offload", [
    {"offload_folder": "OFFLOAD"},
    {"device_map": {"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                    "model.layers.1": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                    "lm_head": "cpu"}, "offload_folder": "OFFLOAD"},
    {"device_map": "auto", "offload_folder": "OFFLOAD"},
    {"offload_state_dict": True}])
def test_offloading_to_disk_is_refused_before_anything_is_decrypted(lib, tiny, tmp_path,
                                                                    monkeypatch, offload):
    """transformers saves the weights a device map sends to "disk" into offload_folder
    as plain safetensors files: the decrypted model was left there. Refused, before the
    folder's files are even read."""
    transformers, _ = lib
    d, _, _, key = tiny
    kwargs = {k: str(tmp_path / "offload") if v == "OFFLOAD" else v for k, v in offload.items()}
    monkeypatch.setattr(hf, "_load", lambda *a: pytest.fail("the folder was decrypted"))
    with pytest.raises(ValueError, match="offload weights to disk.*decrypt-model"):
        hf.from_pretrained(transformers.AutoModelForCausalLM, d / "enc", key=key, **kwargs)
    assert not (tmp_path / "offload").exists()


def test_folder_round_trip_is_byte_identical(tiny):
    d, _, _, _ = tiny
    assert cli(["decrypt-model", "--key-file", str(d / "key"), str(d / "enc"),
                str(d / "back")]) == 0
    assert sorted(os.listdir(d / "back")) == sorted(os.listdir(d / "plain"))
    for name in os.listdir(d / "plain"):
        assert filecmp.cmp(d / "plain" / name, d / "back" / name, shallow=False), name


def test_keyset_folder(lib, tiny, tmp_path):
    """One data key for the folder, wrapped for a keyset (and a recipient); loading
    unwraps it once for all shards (safe_open's tests cover identities)."""
    transformers, _ = lib
    from gpucrypt.keys import Identity, Keyset, generate_dek, seal_envelope

    d, _, want, _ = tiny
    keyset = Keyset.generate()
    dek = generate_dek()
    checkpoints.encrypt_checkpoint(d / "plain", tmp_path / "enc", dek, device="cpu",
                                   envelope=seal_envelope(dek, [Identity.generate().recipient,
                                                                keyset]))
    model = hf.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "enc", keyset=keyset)
    assert torch.equal(logits_of(model.eval()), want)


def test_a_shard_under_another_key_is_refused_even_for_the_same_recipient(lib, tiny, tmp_path):
    """Anyone with a recipient's public key can seal a file to it. A shard written under
    such a key of its own (the old salt copied from the public header) must not join the
    folder: every file opens with the one key unwrapped from the first file's envelope,
    and a first file replaced that way fails the manifest, MAC'd under the real key."""
    transformers, _ = lib
    from safetensors.torch import load_file

    from gpucrypt.keys import Identity, generate_dek, seal_envelope

    d, _, want, _ = tiny
    alice = Identity.generate()
    dek = generate_dek()
    checkpoints.encrypt_checkpoint(d / "plain", tmp_path / "enc", dek, device="cpu",
                                   envelope=seal_envelope(dek, alice.recipient))
    model = hf.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "enc", identity=alice)
    assert torch.equal(logits_of(model.eval()), want)
    shards = sorted(n for n in os.listdir(tmp_path / "enc") if n.endswith(".safetensors"))
    for i, (shard, message) in enumerate([
            (shards[2], f"{shards[2]} is not under this folder's data key"),
            (shards[0], f"{checkpoints.MANIFEST_NAME} failed authentication")]):
        enc = copy_folder(tmp_path / "enc", tmp_path / f"forged{i}")
        forged = {k: torch.full_like(v, 666) for k, v in load_file(d / "plain" / shard).items()}
        own = generate_dek()  # the forger's; only alice's public key is needed
        models.save_encrypted(forged, enc / shard, own, device="cpu",
                              envelope=seal_envelope(own, alice.recipient),
                              _salt=models.read_header(enc / shard).salt)
        refused_everywhere(transformers, enc, tmp_path / f"out{i}", AuthenticationError,
                           message, identity=alice)


@pytest.fixture(scope="module")
def hsm_gcm(env, tmp_path_factory):
    """The key URI of an AES key on a SoftHSM2 token, forced to AES-GCM (which binds the
    wrapped key to the file's salt). Made with softhsm2-util and used by the CLI in child
    processes only: a process loads the PKCS#11 module once, with the token folder it
    finds then, and the key provider tests may load it in this process for their own."""
    module = _softhsm_module()
    secret = tmp_path_factory.mktemp("hsm") / "aes.key"
    # hex digits: softhsm2-util --aes reads the key file as a line (to a newline or a zero)
    secret.write_bytes(os.urandom(16).hex().encode())
    for argv in (["--init-token", "--free", "--label", TOKEN, "--so-pin", SO_PIN],
                 ["--import", str(secret), "--aes", "--token", TOKEN, "--label", "kek",
                  "--id", "01"]):
        subprocess.run(["softhsm2-util", *argv, "--pin", PIN], check=True, capture_output=True)
    return _hsm_uri({"module": module}, "kek", "&x-wrap=aes-gcm")


def child_cli(*argv) -> None:
    done = subprocess.run([sys.executable, "-m", "gpucrypt", *map(str, argv)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("provider", ["kms", "hsm_gcm"])
def test_kek_folder_round_trip(request, provider, tiny, tmp_path):
    """encrypt-model FOLDER --kek with a key that binds the wrapped key to a file's salt
    (AWS KMS encryption context, PKCS#11 AES-GCM associated data): each model file gets
    an envelope sealed for its own salt, so that decrypt-model FOLDER --kek opens the
    folder, and each file opens on its own."""
    from gpucrypt.keys._envelope import decode

    d, _, _, _ = tiny
    if provider == "kms":
        kms = request.getfixturevalue("kms")
        uri = kms.uri(kms.new_key())
    else:
        uri = request.getfixturevalue("hsm_gcm")
    enc, back = tmp_path / "enc", tmp_path / "back"
    child_cli("encrypt-model", "--kek", uri, "--device", "cpu", d / "plain", enc)
    child_cli("decrypt-model", "--kek", uri, enc, back)
    assert sorted(os.listdir(back)) == sorted(os.listdir(d / "plain"))
    for name in os.listdir(d / "plain"):
        assert filecmp.cmp(d / "plain" / name, back / name, shallow=False), name
    shards = sorted(n for n in os.listdir(enc) if n.endswith(".safetensors"))
    stanzas = [decode(models.read_header(enc / n).envelope) for n in shards]
    assert all(len(s) == 1 and s[0].kind == "key-ref" for s in stanzas)
    assert len({s[0].body for s in stanzas}) == len(shards)  # one wrapping per file
    if provider == "hsm_gcm":
        assert {s[0].body[0] for s in stanzas} == {3}  # AES-GCM (pkcs11.WRAP_CODES)
    shard = shards[-1]
    child_cli("decrypt-model", "--kek", uri, enc / shard, tmp_path / shard)
    assert filecmp.cmp(d / "plain" / shard, tmp_path / shard, shallow=False)


def test_a_tampered_shard_fails_and_builds_no_model(lib, tiny, tmp_path):
    transformers, _ = lib
    d, _, _, key = tiny
    enc = tmp_path / "enc"
    enc.mkdir()
    for name in os.listdir(d / "enc"):
        (enc / name).write_bytes((d / "enc" / name).read_bytes())
    shard = sorted(n for n in os.listdir(enc) if n.endswith(".safetensors"))[2]
    header = models.read_header(enc / shard)
    blob = bytearray((enc / shard).read_bytes())
    blob[header.header_length + header.data_length // 2] ^= 1
    (enc / shard).write_bytes(bytes(blob))
    with pytest.raises(AuthenticationError, match="failed authentication"):
        hf.from_pretrained(transformers.LlamaForCausalLM, enc, key=key)


def test_generation_config_is_read_from_the_folder(lib, tiny, tmp_path):
    """transformers takes generation_config.json from the folder it loads; gpucrypt.hf
    reads it from the encrypted folder, after the manifest authenticated it."""
    transformers, _ = lib
    d, _, _, key = tiny
    plain = copy_folder(d / "plain", tmp_path / "plain")
    transformers.GenerationConfig(max_new_tokens=7, do_sample=True, top_k=3,
                                  eos_token_id=[2, 5]).save_pretrained(plain)
    checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", key, device="cpu")
    model = hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "enc", key=key)
    generation = model.generation_config
    assert (generation.max_new_tokens, generation.do_sample, generation.top_k,
            generation.eos_token_id) == (7, True, 3, [2, 5])
    given = transformers.GenerationConfig(max_new_tokens=2)
    model = hf.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "enc", key=key,
                               generation_config=given)
    assert model.generation_config.max_new_tokens == 2 and model.generation_config.top_k != 3
    model, info = hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "enc", key=key,
                                     output_loading_info=True)  # transformers' (model, info)
    assert model.generation_config.top_k == 3 and not info["missing_keys"]

    changed = tmp_path / "enc" / "generation_config.json"
    changed.write_text(changed.read_text().replace('"top_k": 3', '"top_k": 4'))
    with pytest.raises(AuthenticationError, match="generation_config.json"):
        hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "enc", key=key)


def copy_folder(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def refused_everywhere(transformers, folder, out, error, message, **keys) -> None:
    """Loading, building a model and decrypting ``folder`` (to ``out``, which must not
    appear) each raise ``error`` matching ``message``."""
    with pytest.raises(error, match=message):
        checkpoints.load_checkpoint(folder, **keys)
    with pytest.raises(error, match=message):
        hf.from_pretrained(transformers.LlamaForCausalLM, folder, **keys)
    with pytest.raises(error, match=message):
        checkpoints.decrypt_checkpoint(folder, out, **keys)
    assert not out.exists()


def reseal(folder, key):
    """A new manifest for the folder as it is now: what only the key's holder can make,
    to reach the checks behind the manifest."""
    salts = {n: models.read_header(folder / n).salt for n in os.listdir(folder)
             if n.endswith(".safetensors")}
    checkpoints._write_manifest(str(folder), key, salts)


def test_index_and_files_must_agree(tiny, tmp_path):
    d, _, _, key = tiny
    enc = copy_folder(d / "enc", tmp_path / "enc")
    index = json.loads((enc / "model.safetensors.index.json").read_text())
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    (enc / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(AuthenticationError, match="model.safetensors.index.json is not the file"):
        checkpoints.load_checkpoint(enc, key=key)
    reseal(enc, key)
    with pytest.raises(FormatError, match=r"1 not listed \(e.g. '" + dropped.replace(".", r"\.")):
        checkpoints.load_checkpoint(enc, key=key)
    shards = sorted(set(index["weight_map"].values()))
    a, b = enc / shards[0], enc / shards[1]
    a.rename(tmp_path / "x")
    b.rename(a)
    (tmp_path / "x").rename(b)
    with pytest.raises(AuthenticationError, match="swapped"):
        checkpoints.load_checkpoint(enc, key=key)
    reseal(enc, key)
    with pytest.raises(FormatError, match="renamed or swapped"):
        checkpoints.load_checkpoint(enc, key=key)


def test_the_manifest_authenticates_every_file(lib, tiny, tmp_path):
    """Changes that leave every model file intact: a changed config.json, a shard removed
    with its index entries, an added file, a shard from another encryption under the same
    key, a changed or missing manifest. Each fails before any tensor is decrypted, in
    loading, in building a model and in decrypting the folder (which leaves no output)."""
    transformers, _ = lib
    d, _, _, key = tiny
    other = tmp_path / "other"
    checkpoints.encrypt_checkpoint(d / "plain", other, key, device="cpu", segment_size=4096)
    shard = sorted(n for n in os.listdir(other) if n.endswith(".safetensors"))[1]
    manifest = checkpoints.MANIFEST_NAME

    def config_changed(f):
        config = json.loads((f / "config.json").read_text())
        config["rms_norm_eps"] = 0.5  # same weights, different model
        (f / "config.json").write_text(json.dumps(config))

    def shard_and_entries_removed(f):
        index = json.loads((f / "model.safetensors.index.json").read_text())
        gone = index["weight_map"][sorted(index["weight_map"])[-1]]
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != gone}
        (f / "model.safetensors.index.json").write_text(json.dumps(index))
        (f / gone).unlink()

    def manifest_changed(f):
        doc = json.loads((f / manifest).read_text())
        entry = doc["files"]["config.json"]
        entry["sha256"] = entry["sha256"][::-1]
        (f / manifest).write_text(json.dumps(doc))

    cases = {
        "config.json is not the file": config_changed,
        "missing model-": shard_and_entries_removed,
        "not in the manifest notes.txt": lambda f: (f / "notes.txt").write_text("added"),
        f"{shard} is not the file": lambda f: (f / shard).write_bytes((other / shard).read_bytes()),
        f"{manifest} failed authentication": manifest_changed,
        f"has no {manifest}": lambda f: (f / manifest).unlink(),
    }
    for i, (message, change) in enumerate(cases.items()):
        enc = copy_folder(d / "enc", tmp_path / f"enc{i}")
        change(enc)
        error = FormatError if "has no" in message else AuthenticationError
        refused_everywhere(transformers, enc, tmp_path / f"out{i}", error, message, key=key)
    with pytest.raises(AuthenticationError, match="failed authentication"):
        checkpoints.load_checkpoint(d / "enc", key=bytes(32))


def test_folders_that_are_refused(tiny, tmp_path, capsys):
    d, _, _, _ = tiny
    key = str(d / "key")
    assert cli(["encrypt-model", "--key-file", key, str(d / "plain"), str(d / "enc")]) == 2
    assert "nothing is deleted" in capsys.readouterr().err
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model.safetensors").write_bytes(b"not a safetensors file")
    (odd / "pytorch_model.bin").write_bytes(b"pickled weights")
    assert cli(["encrypt-model", "--key-file", key, str(odd), str(tmp_path / "out")]) == 1
    assert "would be copied in the clear" in capsys.readouterr().err
    (odd / "pytorch_model.bin").unlink()
    assert cli(["encrypt-model", "--key-file", key, str(odd), str(tmp_path / "out")]) == 1
    assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["odd"]  # no leftovers


def test_weights_are_found_whatever_the_suffix_case(tiny, tmp_path, capsys):
    """A .SafeTensors file is a model file (encrypted, not copied in the clear); NumPy
    and other weight files are refused, in any case, naming the file."""
    from safetensors.torch import load_file

    d, _, _, key = tiny
    shards = sorted(n for n in os.listdir(d / "plain") if n.endswith(".safetensors"))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.safetensors").write_bytes((d / "plain" / shards[0]).read_bytes())
    (plain / "b.SafeTensors").write_bytes((d / "plain" / shards[1]).read_bytes())
    (plain / "config.json").write_text("{}")
    checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", key, device="cpu")
    for name in ("a.safetensors", "b.SafeTensors"):
        assert (tmp_path / "enc" / name).read_bytes()[:8] == models.MAGIC, name
    got = checkpoints.load_checkpoint(tmp_path / "enc", key=key)
    want = {**load_file(plain / "a.safetensors"), **load_file(plain / "b.SafeTensors")}
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    for i, extra in enumerate(["extra_weights.npy", "adapter.NPZ", "model.Bin", "w.pickle"]):
        (plain / extra).write_bytes(b"\x93NUMPY weights")
        assert cli(["encrypt-model", "--key-file", str(d / "key"), str(plain),
                    str(tmp_path / f"out{i}")]) == 1
        assert f"{extra}: a " in capsys.readouterr().err
        assert not (tmp_path / f"out{i}").exists()
        (plain / extra).unlink()


def _one_shard_folder(folder):
    """A plain folder with one small safetensors file and a config (NumPy, no model)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir()
    save_file({"w": np.arange(16, dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("name", [
    "rust_model.ot", "model.ckpt.data-00000-of-00001", "model.ckpt.index", "ckpt-5.index",
    "checkpoint.pth.tar", "weights.tar", "model.pte", "model.engine", "model.plan",
    "model.mlmodel", "model.tflite", "adapter_model.bin.bak", "pytorch_model.bin~",
    "pytorch_model.bin.1", "model.GGUF.old", "model.onnx.orig", "model.pt2", "model.zip",
    "weights.tar.gz", "adapter_model.bin.gz", "model.pt.zst", "model.torchscript",
    "model.jit", "inference.pdmodel", "model.mar", "model.llamafile"])
def test_weights_in_other_formats_are_refused_also_under_backup_names(tmp_path, name):
    """Weight files the suffix list missed were copied in the clear into the encrypted
    folder: rust_model.ot (gpt2, bert-base-uncased and t5-small ship one), TensorFlow
    checkpoints, .pth.tar, ExecuTorch, TensorRT and Core ML files, and any listed format
    under a backup suffix (adapter_model.bin.bak)."""
    plain = _one_shard_folder(tmp_path / "plain")
    (plain / name).write_bytes(b"WEIGHTS" + bytes(range(256)))
    with pytest.raises(FormatError, match=r"1 file\(s\) would be copied in the clear \("
                       + re.escape(name) + r": a (\.\S+|TensorFlow checkpoint) file, a format "
                       r"that holds weights.*"
                       r"copy_unencrypted"):
        checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", os.urandom(32), device="cpu")
    assert sorted(os.listdir(tmp_path)) == ["plain"]  # nothing written, no leftovers
    # vouched for by the caller: copied as it is (authenticated by the manifest)
    key = os.urandom(32)
    checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", key, device="cpu",
                                   copy_unencrypted=[name])
    assert (tmp_path / "enc" / name).read_bytes() == (plain / name).read_bytes()
    assert sorted(checkpoints.load_checkpoint(tmp_path / "enc", key=key)) == ["w"]


def test_a_trainer_checkpoint_is_refused_naming_every_file_at_once(tmp_path):
    """A Trainer checkpoint's optimizer.pt, scheduler.pt, rng_state.pth and
    training_args.bin were refused one per run: all are named in one refusal, and vouched
    for together they are copied."""
    plain = _one_shard_folder(tmp_path / "plain")
    pickles = ["optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin", "last.ckpt"]
    for name in pickles:
        (plain / name).write_bytes(b"PK pickle")
    with pytest.raises(FormatError, match=r"5 file\(s\) would be copied in the clear") as info:
        checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", os.urandom(32), device="cpu")
    assert all(f"{name}: a ." in str(info.value) for name in pickles)  # .ckpt: Lightning's too
    (plain / "model.ckpt-1000").write_bytes(b"TF1 variables")
    with pytest.raises(FormatError, match="model.ckpt-1000: a TensorFlow checkpoint file"):
        checkpoints.checkpoint_layout(plain)
    (plain / "model.ckpt-1000").unlink()
    checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", os.urandom(32), device="cpu",
                                   copy_unencrypted=pickles)
    assert all((tmp_path / "enc" / name).exists() for name in pickles)


def test_a_safetensors_file_under_a_backup_name_is_refused(tmp_path):
    """model.safetensors.bak is no model file (its suffix is not .safetensors), so it was
    copied in the clear."""
    plain = _one_shard_folder(tmp_path / "plain")
    (plain / "model.safetensors.bak").write_bytes((plain / "model.safetensors").read_bytes())
    with pytest.raises(FormatError, match=r"copied in the clear \(model.safetensors.bak: a "
                                          r"safetensors file under a backup name"):
        checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", os.urandom(32), device="cpu")
    assert not (tmp_path / "enc").exists()


def test_a_large_binary_file_is_refused_unless_named_and_text_is_copied(tmp_path, capsys):
    """The second line of defence: a file over 16 MiB that is not text, in a format no
    list names, is refused; large text (a tokenizer.json, here with a two-byte character
    across every 1 MiB read) and small binary files (tokenizer.model) are copied, and
    so is a large binary file the caller names (copy_unencrypted, --copy-unencrypted)."""
    plain = _one_shard_folder(tmp_path / "plain")
    big = checkpoints.LARGE_PLAIN_FILE_BYTES + 1
    (plain / "tokenizer.json").write_text("x" + "é" * (big // 2), encoding="utf-8")
    (plain / "tokenizer.model").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, binary
    (plain / "vocab.txt").write_bytes(b"a\nb\n" * (big // 4))
    (plain / "layers.dat").write_bytes(os.urandom(big))
    key = os.urandom(32)
    with pytest.raises(FormatError, match=r"copied in the clear \(layers.dat: 16 MiB that are "
                       r"not UTF-8 text, in no known format.*--copy-unencrypted"):
        checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", key, device="cpu")
    (tmp_path / "key").write_bytes(key)
    (tmp_path / "key").chmod(0o600)
    argv = ["encrypt-model", "--key-file", str(tmp_path / "key"), str(plain),
            str(tmp_path / "enc")]
    assert cli(argv) == 1
    assert "layers.dat: 16 MiB that are not UTF-8 text" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["key", "plain"]
    # text just over the limit but ending inside a character is not text
    (plain / "layers.dat").write_bytes(b"x" * big + "é".encode()[:1])
    with pytest.raises(FormatError, match="layers.dat: 16 MiB that are not UTF-8 text"):
        checkpoints.checkpoint_layout(plain)
    assert cli(argv + ["--copy-unencrypted", "layers.dat"]) == 0, capsys.readouterr().err
    for name in ("tokenizer.json", "tokenizer.model", "vocab.txt", "layers.dat"):
        assert filecmp.cmp(plain / name, tmp_path / "enc" / name, shallow=False), name
    # the names must be the folder's files, and a model file is never copied
    with pytest.raises(FileNotFoundError, match="'layers.bin', which is not a file of"):
        checkpoints.checkpoint_layout(plain, copy_unencrypted=["layers.bin"])
    with pytest.raises(ValueError, match="model.safetensors, a .safetensors file"):
        checkpoints.checkpoint_layout(plain, copy_unencrypted=["model.safetensors"])
    with pytest.raises(TypeError, match="not one name"):
        checkpoints.checkpoint_layout(plain, copy_unencrypted="layers.dat")
    capsys.readouterr()
    assert cli(["encrypt-model", "--key-file", str(tmp_path / "key"), "--copy-unencrypted",
                "layers.dat", str(plain / "model.safetensors"), str(tmp_path / "m.gc")]) == 2
    assert "IN is a file: leave the option out" in capsys.readouterr().err


def test_folders_written_under_older_rules_still_load(tiny, tmp_path, capsys):
    """What a folder holds is its manifest's word (model files listed with a salt, copied
    files with a digest), not this version's suffix rules: a folder an earlier version
    wrote with a file it now refuses (scaler.npy) or one whose suffix it now reads as a
    model file (x.SAFETENSORS, then copied in the clear) loads and decrypts as before."""
    d, _, _, key = tiny
    shard = sorted(n for n in os.listdir(d / "plain") if n.endswith(".safetensors"))[0]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes((d / "plain" / shard).read_bytes())
    (plain / "scaler.dat").write_bytes(b"\x93NUMPY scaler")
    (plain / "extra.dat").write_bytes(b"copied as it is")
    enc = tmp_path / "enc"
    headers = checkpoints.encrypt_checkpoint(plain, enc, key, device="cpu")
    # as an earlier version would have written it: the same files under names it allowed
    (enc / "scaler.dat").rename(enc / "scaler.npy")
    (enc / "extra.dat").rename(enc / "extra.SAFETENSORS")
    checkpoints._write_manifest(str(enc), key, {"model.safetensors": headers[0].salt})
    loaded = checkpoints.load_checkpoint(enc, key=key)
    assert sorted(loaded) == sorted(models.load_encrypted(enc / "model.safetensors", key))
    from safetensors.torch import load_file

    original = load_file(str(plain / "model.safetensors"))
    assert sorted(loaded) == sorted(original)
    assert all(torch.equal(loaded[name], original[name]) for name in original)
    (d / "key").chmod(0o600)
    assert cli(["decrypt-model", "--key-file", str(d / "key"), str(enc), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "scaler.npy").read_bytes() == b"\x93NUMPY scaler"
    assert (tmp_path / "back" / "extra.SAFETENSORS").read_bytes() == b"copied as it is"


def test_a_changed_manifest_is_an_authentication_error_whatever_it_says(tiny, tmp_path):
    """Reading takes the model files from the manifest before its MAC is checked: a
    manifest edited to call a model file a copied one, to list none, or to call a copied
    file a model file fails as tampering (AuthenticationError naming the manifest), not
    as a folder of the wrong shape."""
    from gpucrypt.stream import AuthenticationError

    d, _, _, key = tiny
    src = tmp_path / "enc"
    checkpoints.encrypt_checkpoint(d / "plain", src, key, device="cpu")
    manifest = json.loads((src / checkpoints.MANIFEST_NAME).read_text())
    model_file = next(n for n, e in manifest["files"].items() if "salt" in e)
    copied = next(n for n, e in manifest["files"].items() if "sha256" in e)
    edits = [lambda files: files.__setitem__(model_file, {"sha256": "00" * 32}),
             lambda files: [files.__setitem__(n, {"sha256": "00" * 32}) for n in list(files)],
             lambda files: files.__setitem__(copied, {"salt": "00" * 32})]
    for i, change in enumerate(edits):
        folder = tmp_path / f"changed{i}"
        shutil.copytree(src, folder)
        doc = json.loads((folder / checkpoints.MANIFEST_NAME).read_text())
        change(doc["files"])
        (folder / checkpoints.MANIFEST_NAME).write_text(json.dumps(doc))
        for read in (lambda: checkpoints.load_checkpoint(folder, key=key),
                     lambda: checkpoints.decrypt_checkpoint(folder, tmp_path / f"out{i}", key=key)):
            with pytest.raises(AuthenticationError, match=checkpoints.MANIFEST_NAME):
                read()
        assert not (tmp_path / f"out{i}").exists()


def tuned_lora(peft, model, folder):
    """A LoRA adapter (random weights) on a copy of ``model``, saved in ``folder``; the
    tuned model."""
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(1)
    tuned = peft.get_peft_model(copy.deepcopy(model), lora).eval()
    tuned.save_pretrained(folder)
    return tuned


def test_lora_adapter(lib, tiny, tmp_path):
    transformers, peft = lib
    d, model, base_logits, key = tiny
    want = logits_of(tuned_lora(peft, model, tmp_path / "lora"))
    assert not torch.equal(want, base_logits)  # the adapter changes the outputs
    assert cli(["encrypt-model", "--key-file", str(d / "key"), str(tmp_path / "lora"),
                str(tmp_path / "lora-enc")]) == 0
    assert (tmp_path / "lora-enc" / "adapter_model.safetensors").read_bytes()[:8] == models.MAGIC
    base = hf.from_pretrained(transformers.AutoModelForCausalLM, d / "enc", key=key)
    loaded = hf.load_adapter(base, tmp_path / "lora-enc", key=key)
    assert isinstance(loaded, peft.PeftModelForCausalLM) and not loaded.training
    assert torch.equal(logits_of(loaded), want)
    # a second adapter into the same PeftModel, then switching between them
    again = hf.load_adapter(loaded, tmp_path / "lora-enc", key=key, adapter_name="second")
    assert again is loaded
    again.set_adapter("second")
    assert torch.equal(logits_of(again), want)


def test_an_adapter_lacking_a_weight_is_refused_and_names_match_whole(lib, tiny, tmp_path):
    """A missing weight raises KeyError naming it (peft only warns); another adapter whose
    name contains this one's (``math_v2`` beside ``math``) is not taken for it."""
    from safetensors.torch import load_file, save_file

    _, peft = lib
    d, model, _, key = tiny
    want = logits_of(tuned_lora(peft, model, tmp_path / "lora"))
    assert cli(["encrypt-model", "--key-file", str(d / "key"), str(tmp_path / "lora"),
                str(tmp_path / "lora-enc")]) == 0
    weights = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    removed = sorted(weights)[0]
    del weights[removed]
    save_file(weights, tmp_path / "lora" / "adapter_model.safetensors")
    assert cli(["encrypt-model", "--key-file", str(d / "key"), str(tmp_path / "lora"),
                str(tmp_path / "partial-enc")]) == 0
    stem = removed.rsplit(".", 1)[0]  # the weight under the adapter's name
    with pytest.raises(KeyError, match=f"lacks 1 weights.*{re.escape(stem)}.default"):
        hf.load_adapter(copy.deepcopy(model), tmp_path / "partial-enc", key=key)

    both = hf.load_adapter(copy.deepcopy(model), tmp_path / "lora-enc", key=key,
                           adapter_name="math_v2")
    both = hf.load_adapter(both, tmp_path / "lora-enc", key=key, adapter_name="math")
    assert sorted(both.peft_config) == ["math", "math_v2"]
    both.set_adapter("math")
    assert torch.equal(logits_of(both), want)


@pytest.mark.gpu
def test_model_decrypted_onto_the_gpu(lib, tiny):
    transformers, _ = lib
    d, model, _, key = tiny
    loaded = hf.from_pretrained(transformers.LlamaForCausalLM, d / "enc", key=key, device="cuda")
    want = model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert t.is_cuda and torch.equal(t.cpu(), want[name]), name


@pytest.fixture
def small_folder(tmp_path):
    """(plain folder of two safetensors shards with an index and a config, its encrypted
    folder, the key): built with NumPy, no model needed."""
    import numpy as np
    from safetensors.numpy import save_file

    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"a": np.full(64, 7, np.float32)}, str(plain / "model-1.safetensors"))
    save_file({"b": np.full(64, 9, np.float32)}, str(plain / "model-2.safetensors"))
    (plain / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    (plain / "config.json").write_text("{}")
    key = os.urandom(32)
    checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", key, device="cpu")
    return plain, tmp_path / "enc", key


@pytest.mark.parametrize("name", [checkpoints.MANIFEST_NAME, "model.safetensors.index.json"])
def test_deeply_nested_json_in_a_folder_is_a_format_error(small_folder, tmp_path, capsys,
                                                          monkeypatch, name):
    """The manifest and the index are parsed before the manifest's MAC is checked: JSON
    nested past the parser's limit raised RecursionError from loading and decrypting, and
    ``decrypt-model FOLDER`` printed a 38-line traceback. Now a FormatError naming the
    file, and exit 1 with one line; no output appears."""
    _, enc, key = small_folder
    (enc / name).write_text("[" * 100_000 + "]" * 100_000)
    for read in (lambda: checkpoints.load_checkpoint(enc, key=key, framework="numpy"),
                 lambda: checkpoints.decrypt_checkpoint(enc, tmp_path / "out", key=key)):
        with pytest.raises(FormatError, match=f"{re.escape(name)}: JSON nested too deeply"):
            read()
    monkeypatch.setenv("GPUCRYPT_TEST_KEY", key.hex())
    capsys.readouterr()
    assert cli(["decrypt-model", "--key-env", "GPUCRYPT_TEST_KEY", str(enc),
                str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "JSON nested too deeply" in err and name in err, err
    assert sorted(os.listdir(tmp_path)) == ["enc", "plain"]  # no output, no temporary folder


@pytest.mark.parametrize("damage", ["surrogate", "surrogate in a key", "oversized"])
def test_a_manifest_no_writer_makes_is_a_format_error(small_folder, tmp_path, capsys,
                                                      monkeypatch, damage):
    """Read before its MAC is checked: a lone UTF-16 surrogate ("\\ud800", no key needed to
    write one) raised UnicodeEncodeError at the MAC's .encode() (decrypt-model exited 2,
    as for a usage error), and a manifest of tens of MB was parsed whole (hundreds of MiB).
    Now FormatError naming the manifest, exit 1."""
    _, enc, key = small_folder
    path = enc / checkpoints.MANIFEST_NAME
    doc = json.loads(path.read_text())
    if damage == "oversized":
        from gpucrypt.files import models

        text = json.dumps({**doc, "pad": "x" * models.MAX_UNVERIFIED_TABLE_BYTES})
        match = "larger than 16 MiB"
    else:
        text = json.dumps(doc).replace(doc["mac"], "\\ud800") if damage == "surrogate" else \
            json.dumps(doc).replace('"files"', '"fil\\udc00es"')
        match = "not UTF-8 JSON"
    path.write_text(text)
    with pytest.raises(FormatError, match=f"{re.escape(checkpoints.MANIFEST_NAME)}.*{match}"):
        checkpoints.load_checkpoint(enc, key=key, framework="numpy")
    monkeypatch.setenv("GPUCRYPT_TEST_KEY", key.hex())
    capsys.readouterr()
    assert cli(["decrypt-model", "--key-env", "GPUCRYPT_TEST_KEY", str(enc),
                str(tmp_path / "out")]) == 1
    assert checkpoints.MANIFEST_NAME in capsys.readouterr().err


def test_an_index_past_its_limit_is_refused_before_it_is_parsed(small_folder, monkeypatch):
    """The index is parsed before the manifest that lists it is checked: a 40 MB one took
    685 MiB and a second before the manifest's refusal. Past its limit (64 MiB; lowered
    here) it is a FormatError naming it, before it is parsed."""
    from gpucrypt.files import _safetensors

    _, enc, key = small_folder
    index = enc / "model.safetensors.index.json"
    monkeypatch.setattr(checkpoints, "_MAX_INDEX_BYTES", index.stat().st_size + 10)
    parsed = []
    load_json = _safetensors.load_json
    monkeypatch.setattr(_safetensors, "load_json", lambda data, what: parsed.append(what) or
                        load_json(data, what))
    assert set(checkpoints.load_checkpoint(enc, key=key, framework="numpy")) == {"a", "b"}
    index.write_text(index.read_text() + " " * 11)
    parsed.clear()
    with pytest.raises(FormatError, match="model.safetensors.index.json is larger than"):
        checkpoints.load_checkpoint(enc, key=key, framework="numpy")
    assert "model.safetensors.index.json" not in parsed


# a child that decrypts a checkpoint folder and stops, for the test's signal, once the
# first model file's plaintext is in the temporary folder; signals start at their default
# action, as in a shell
_FOLDER_DECRYPT = """
import signal, sys, time
for name in ("SIGTERM", "SIGHUP"):
    signal.signal(getattr(signal, name), signal.SIG_DFL)
from gpucrypt.files import models
export = models.export_safetensors
def export_then_wait(*args, **kwargs):
    header = export(*args, **kwargs)
    print("exported", flush=True)
    time.sleep(120)  # the signal ends the process here
    return header
models.export_safetensors = export_then_wait
from gpucrypt.cli import main
sys.exit(main(["decrypt-model", "--key-env", "GPUCRYPT_TEST_KEY", sys.argv[1], sys.argv[2]]))
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_signal_while_a_folder_is_decrypted_leaves_no_plaintext(small_folder, tmp_path,
                                                                  signame):
    """``decrypt-model FOLDER OUT`` fills ``.OUT.XXXX.gpucrypt-tmp/`` with verified
    plaintext files and renames it at the end; it was removed only on a Python
    exception, so a real SIGTERM or SIGHUP left it, plaintext weights included. Now the
    signal removes it before the process dies (SIGKILL still cannot be caught)."""

    plain, enc, key = small_folder
    out = tmp_path / "out"
    with python_child(_FOLDER_DECRYPT, str(enc), str(out),
                      env=dict(os.environ, GPUCRYPT_TEST_KEY=key.hex())) as child:
        assert child.stdout.readline().strip() == "exported", child.stderr.read()
        temp = [n for n in os.listdir(tmp_path) if n.endswith(".gpucrypt-tmp")]
        assert len(temp) == 1 and (tmp_path / temp[0] / "model-1.safetensors").read_bytes() \
            == (plain / "model-1.safetensors").read_bytes()  # the window the signal hits
        dies_of(child, signame)
    assert sorted(os.listdir(tmp_path)) == ["enc", "plain"]


# ---------------------------------------------------------------- changed after the check
@contextlib.contextmanager
def after_the_check(monkeypatch, change):
    """Within the block, ``change()`` runs right after the folder's manifest check passes:
    a writer racing the loader, between the check and the use of what it checked."""
    check = checkpoints._check_manifest

    def racing(layout, key):
        files = check(layout, key)
        change()
        return files

    with monkeypatch.context() as patched:
        patched.setattr(checkpoints, "_check_manifest", racing)
        yield


def test_a_model_file_swapped_after_the_check_is_refused(small_folder, tmp_path, monkeypatch):
    """Each model file's salt was checked, then loading and decrypting opened the file
    again by name: a file swapped in between for another encryption under the same key
    (an older version of the folder) was loaded, or decrypted into the output. Now the
    salt is compared again with the header the file is decrypted with, read from the
    same open file, whether the file is rewritten in place or renamed over."""
    import numpy as np
    from safetensors.numpy import save_file

    plain, enc, key = small_folder
    save_file({"a": np.full(64, 1, np.float32)}, str(plain / "model-1.safetensors"))
    checkpoints.encrypt_checkpoint(plain, tmp_path / "older", key, device="cpu")
    older = (tmp_path / "older" / "model-1.safetensors").read_bytes()

    def in_place(folder):
        (folder / "model-1.safetensors").write_bytes(older)

    def renamed_over(folder):
        (tmp_path / "swap").write_bytes(older)
        os.replace(tmp_path / "swap", folder / "model-1.safetensors")

    uses = {"load": lambda f: checkpoints.load_checkpoint(f, key=key, framework="numpy"),
            "decrypt": lambda f: checkpoints.decrypt_checkpoint(f, tmp_path / "out", key=key)}
    for swap in (in_place, renamed_over):
        for what, use in uses.items():
            folder = copy_folder(enc, tmp_path / f"{swap.__name__}-{what}")
            with after_the_check(monkeypatch, lambda f=folder: swap(f)), \
                    pytest.raises(AuthenticationError, match="model-1.safetensors is not the file"):
                use(folder)
            assert not (tmp_path / "out").exists()
    assert (checkpoints.load_checkpoint(enc, key=key, framework="numpy")["a"] == 7).all()


def test_an_index_changed_for_the_layout_and_put_back_is_refused(small_folder, monkeypatch):
    """The index's weight_map is read to lay the folder out before the manifest is
    checked: one changed for that read and put back before the check is refused as
    tampering, the weight_map used being the one in the bytes the check hashed."""
    _, enc, key = small_folder
    index = enc / "model.safetensors.index.json"
    good = index.read_bytes()
    layout = checkpoints.checkpoint_layout

    def changed_while_laid_out(folder, **options):
        index.write_text(json.dumps({"weight_map": {"a": "model-2.safetensors",
                                                    "b": "model-1.safetensors"}}))
        try:
            return layout(folder, **options)
        finally:
            index.write_bytes(good)

    monkeypatch.setattr(checkpoints, "checkpoint_layout", changed_while_laid_out)
    with pytest.raises(AuthenticationError, match="model.safetensors.index.json is not the file"):
        checkpoints.load_checkpoint(enc, key=key, framework="numpy")


def test_a_file_changed_after_the_check_is_not_copied_out(small_folder, tmp_path, monkeypatch):
    """Decrypting copied the other files by name after the check: a config.json changed
    in between reached the plaintext folder unchecked. Now each is hashed as it is
    copied; a change fails, and no output (or temporary folder) is left."""
    _, enc, key = small_folder
    with after_the_check(monkeypatch, lambda: (enc / "config.json").write_text('{"x": 1}')), \
            pytest.raises(AuthenticationError, match="config.json is not the file"):
        checkpoints.decrypt_checkpoint(enc, tmp_path / "out", key=key)
    assert sorted(os.listdir(tmp_path)) == ["enc", "plain"]


def test_config_files_changed_after_the_check_are_refused(lib, tiny, tmp_path, monkeypatch):
    """gpucrypt.hf had the manifest check config.json and generation_config.json, then let
    transformers read them from the folder again: a file changed in between was used
    unchecked (another rms_norm_eps, generation settings of the writer's choice). Now
    each config is built from the bytes the manifest checked; a changed file fails."""
    transformers, _ = lib
    d, _, _, key = tiny
    assert (d / "enc" / "generation_config.json").is_file()

    def edit(folder, name, **changes):
        doc = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**doc, **changes}))

    for i, (name, changes) in enumerate([("config.json", {"rms_norm_eps": 0.5}),
                                         ("generation_config.json", {"max_new_tokens": 1})]):
        enc = copy_folder(d / "enc", tmp_path / f"enc{i}")
        with after_the_check(monkeypatch, lambda f=enc, n=name, c=changes: edit(f, n, **c)), \
                pytest.raises(AuthenticationError, match=f"{name} is not the file"):
            hf.from_pretrained(transformers.AutoModelForCausalLM, enc, key=key)


def test_a_generation_config_added_after_the_check_is_not_read(lib, tiny, tmp_path,
                                                               monkeypatch):
    """A generation_config.json the manifest does not list was read when it was there
    after the check (the file test came after it). Now only files the manifest lists are
    read: one added later is ignored; one there at the check is refused."""
    transformers, _ = lib
    d, _, _, key = tiny
    plain = copy_folder(d / "plain", tmp_path / "plain")
    (plain / "generation_config.json").unlink()
    enc = tmp_path / "enc"
    checkpoints.encrypt_checkpoint(plain, enc, key, device="cpu")
    want = hf.from_pretrained(transformers.AutoModelForCausalLM, enc, key=key).generation_config
    added = enc / "generation_config.json"
    with after_the_check(monkeypatch, lambda: added.write_text('{"max_new_tokens": 1}')):
        model = hf.from_pretrained(transformers.AutoModelForCausalLM, enc, key=key)
    assert model.generation_config.to_dict() == want.to_dict()
    assert model.generation_config.max_new_tokens != 1
    with pytest.raises(AuthenticationError, match="not in the manifest generation_config.json"):
        hf.from_pretrained(transformers.AutoModelForCausalLM, enc, key=key)


def test_an_adapter_config_changed_after_the_check_is_refused(lib, tiny, tmp_path, monkeypatch):
    """As for config.json: adapter_config.json was read by peft after the check."""
    _, peft = lib
    d, model, _, key = tiny
    tuned_lora(peft, model, tmp_path / "lora")
    enc = tmp_path / "lora-enc"
    checkpoints.encrypt_checkpoint(tmp_path / "lora", enc, key, device="cpu")
    config = enc / "adapter_config.json"

    def scaled():
        config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 80}))

    with after_the_check(monkeypatch, scaled), \
            pytest.raises(AuthenticationError, match="adapter_config.json is not the file"):
        hf.load_adapter(copy.deepcopy(model), enc, key=key)


def test_configs_are_built_as_from_pretrained_builds_them(lib, tiny, tmp_path):
    """Built from the checked bytes, the configs are the ones AutoConfig,
    GenerationConfig and PeftConfig's from_pretrained build from the folder."""
    transformers, peft = lib
    d, model, _, key = tiny
    enc = str(d / "enc")
    _, read = hf._load(enc, key, None, None, "cpu", None)
    config, want = hf._auto_config(read, enc), transformers.AutoConfig.from_pretrained(enc)
    assert type(config) is type(want) and config.to_dict() == want.to_dict()
    loaded = hf.from_pretrained(transformers.AutoModelForCausalLM, enc, key=key)
    assert loaded.generation_config.__dict__ == \
        transformers.GenerationConfig.from_pretrained(enc).__dict__
    tuned_lora(peft, model, tmp_path / "lora")
    lora = str(tmp_path / "lora-enc")
    checkpoints.encrypt_checkpoint(tmp_path / "lora", lora, key, device="cpu")
    _, read = hf._load(lora, key, None, None, "cpu", None)
    config, want = hf._peft_config(read, lora), peft.PeftConfig.from_pretrained(lora)
    assert type(config) is type(want) is peft.LoraConfig and config.to_dict() == want.to_dict()


def test_a_config_given_as_a_path_is_loaded_from_it(lib, tiny):
    """transformers takes config= as a folder or name; the Auto class's pick needed an
    object (AttributeError on a str). The encrypted folder itself is read through its
    manifest; another folder is the caller's choice, read as transformers reads it."""
    transformers, _ = lib
    d, _, want, key = tiny
    for config in (str(d / "plain"), d / "enc"):
        model = hf.from_pretrained(transformers.AutoModelForCausalLM, d / "enc", key=key,
                                   config=config)
        assert isinstance(model, transformers.LlamaForCausalLM)
        assert torch.equal(logits_of(model), want)


def test_a_model_that_needs_its_own_code_is_refused_naming_the_folder(lib, tmp_path):
    """A config.json with auto_map for a model type transformers does not know said "pass
    trust_remote_code=True" (which gave the same error, after asking on stdin whether to
    run the code) and named the throwaway folder of the checked copy. Refused, naming the
    folder, with what works instead, which does: the model's own class and config=."""
    transformers, _ = lib
    plain = _one_shard_folder(tmp_path / "plain")
    (plain / "config.json").write_text(json.dumps(
        {"model_type": "gpucrypt-test-custom",
         "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                      "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    (plain / "configuration_my.py").write_text("raise SystemExit('custom code was run')\n")
    key = os.urandom(32)
    enc = tmp_path / "enc"
    checkpoints.encrypt_checkpoint(plain, enc, key, device="cpu")
    for extra in ({}, {"trust_remote_code": True}):
        with pytest.raises(ValueError) as info:
            hf.from_pretrained(transformers.AutoModelForCausalLM, enc, key=key, **extra)
        message = str(info.value)
        assert message.startswith(f"{enc}: its config.json needs the model's own code "
                                  f"(auto_map names 'configuration_my.MyConfig'"), message
        assert "trust_remote_code is not supported" in message
        assert "gpucrypt.hf.load_state_dict(" in message and "gpucrypt-config-" not in message
    # a model type this transformers does not know, without auto_map: upgrade
    (plain / "config.json").write_text(json.dumps({"model_type": "gpucrypt-test-custom"}))
    checkpoints.encrypt_checkpoint(plain, tmp_path / "enc2", key, device="cpu")
    with pytest.raises(ValueError, match=r"enc2: its config.json has model type "
                                         r"'gpucrypt-test-custom', which transformers .* does "
                                         r"not know: upgrade transformers"):
        hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "enc2", key=key)

    # what the message advises: the model's own class, given its config
    class MyConfig(transformers.PretrainedConfig):
        model_type = "gpucrypt-test-custom"

    class MyModel(transformers.PreTrainedModel):
        config_class = MyConfig

        def __init__(self, config):
            super().__init__(config)
            self.w = torch.nn.Parameter(torch.zeros(16))
            self.post_init()

    model = hf.from_pretrained(MyModel, enc, key=key, config=MyConfig())
    assert torch.equal(model.w.detach(), torch.arange(16, dtype=torch.float32))
    assert torch.equal(hf.load_state_dict(enc, key=key)["w"], model.w.detach())


def test_an_adapter_for_a_model_without_parameters_is_decrypted_on_the_cpu(lib, tiny, tmp_path,
                                                                          monkeypatch):
    """The default device is the model's first parameter's: none made StopIteration."""
    _, peft = lib
    d, model, _, key = tiny
    tuned_lora(peft, model, tmp_path / "lora")
    checkpoints.encrypt_checkpoint(tmp_path / "lora", tmp_path / "lora-enc", key, device="cpu")
    devices = []

    class Seen(Exception):
        pass

    def loads_on(folder, key, keyset, identity, device, threads):
        devices.append(device)
        raise Seen
    monkeypatch.setattr(hf, "_load", loads_on)
    with pytest.raises(Seen):
        hf.load_adapter(torch.nn.Module(), tmp_path / "lora-enc", key=key)
    assert devices == ["cpu"]


def test_copied_files_keep_their_mode_and_links_out_of_the_folder_are_warned_of(tmp_path):
    """Files copied in the clear came out 0644 whatever their mode; a symbolic link out of
    the folder (special.json -> ../key.bin) copied its target with no word. The mode is
    kept, and such a link is warned of, except into a Hugging Face cache's blobs, where
    every snapshot file leads."""
    import warnings

    plain = _one_shard_folder(tmp_path / "plain")
    (plain / "config.json").chmod(0o600)
    (tmp_path / "key.bin").write_bytes(b"secret")
    (plain / "special.json").symlink_to(tmp_path / "key.bin")
    with pytest.warns(UserWarning, match="special.json is a symbolic link to .*key.bin, "
                                         "outside the folder"):
        checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", os.urandom(32), device="cpu")
    assert (tmp_path / "enc" / "config.json").stat().st_mode & 0o777 == 0o600
    # a Hugging Face cache: models--x/snapshots/REV/* -> ../../blobs/*
    cache = tmp_path / "models--x"
    (cache / "blobs").mkdir(parents=True)
    (cache / "snapshots").mkdir()
    snapshot = _one_shard_folder(cache / "snapshots" / "rev")
    os.replace(snapshot / "config.json", cache / "blobs" / "abc")
    (snapshot / "config.json").symlink_to("../../blobs/abc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoints.encrypt_checkpoint(snapshot, tmp_path / "enc2", os.urandom(32), device="cpu")
    assert (tmp_path / "enc2" / "config.json").read_text() == "{}"
    # a component folder of a snapshot (a diffusers pipeline's text_encoder) leads there too
    component = _one_shard_folder(cache / "snapshots" / "rev2")
    os.replace(component, cache / "snapshots" / "text_encoder")
    (cache / "snapshots" / "rev2").mkdir()
    os.replace(cache / "snapshots" / "text_encoder", cache / "snapshots" / "rev2" / "text_encoder")
    component = cache / "snapshots" / "rev2" / "text_encoder"
    os.replace(component / "config.json", cache / "blobs" / "def")
    (component / "config.json").symlink_to("../../../blobs/def")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoints.encrypt_checkpoint(component, tmp_path / "enc3", os.urandom(32), device="cpu")


# ---------------------------------------------------------------- entries that are not files
# Each call runs in a child given a deadline: on a regression it waits forever on a FIFO,
# in places (safetensors' open) that hold the GIL, so that no thread of the test's could
# let it go, or copies /dev/zero without end, which RLIMIT_FSIZE stops at a small size
# instead of the disk's. ``after``: the checkpoints function after whose return ``victim``
# is swapped for a FIFO (a file changed between the check and the use).
_FOLDER_CHILD = r"""
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
from gpucrypt import hf
from gpucrypt.files import checkpoints
spec = json.loads(sys.argv[1])
key = bytes.fromhex(spec["key"])

def build():
    from transformers import AutoModelForCausalLM
    hf.from_pretrained(AutoModelForCausalLM, spec["enc"], key=key)

uses = {
    "layout": lambda: checkpoints.checkpoint_layout(spec["plain"]),
    "encrypt": lambda: checkpoints.encrypt_checkpoint(spec["plain"], spec["out"], key,
                                                      device="cpu"),
    "load": lambda: checkpoints.load_checkpoint(spec["enc"], key=key, framework="numpy"),
    "decrypt": lambda: checkpoints.decrypt_checkpoint(spec["enc"], spec["out"], key=key),
    "build": build,
}
if spec.get("after"):
    real = getattr(checkpoints, spec["after"])

    def swapped(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        finally:
            os.remove(spec["victim"])
            os.mkfifo(spec["victim"])
    setattr(checkpoints, spec["after"], swapped)
for use in spec["uses"]:
    try:
        uses[use]()
        print(use, "returned", flush=True)
    except Exception as exc:
        print(use, type(exc).__name__, str(exc).replace(chr(10), " "), flush=True)
"""


def _outcomes_in_child(uses, key, plain="", enc="", out="", after=None, victim="",
                       seconds=60) -> list:
    """One line per use (``use ExceptionName message``, or ``use returned``), from a child
    killed after ``seconds``: a call still blocked then fails the test."""
    spec = {"uses": uses, "key": key.hex(), "plain": str(plain), "enc": str(enc),
            "out": str(out), "after": after, "victim": str(victim)}
    try:
        done = subprocess.run([sys.executable, "-c", _FOLDER_CHILD, json.dumps(spec)],
                              capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired as exc:
        said = (exc.stdout or b"").decode(errors="replace")
        pytest.fail(f"{uses} still blocked after {seconds} s (on a FIFO?); said so far: {said!r}")
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == len(uses), (done.stdout, done.stderr[-2000:])
    return lines


@pytest.mark.parametrize("odd", [["fifo"], ["device"], ["fifo", "device"]])
def test_a_plain_folder_holding_a_fifo_or_a_device_is_refused_before_any_work(tmp_path, odd):
    """A FIFO named extra.safetensors made encrypt_checkpoint wait forever in its open;
    tokenizer.model -> /dev/zero passed the size rule (getsize is 0) and was copied
    without end, filling the disk. Every entry is stat'ed first: a FormatError names each
    one that is not a file, and what it is, before anything is read or written."""
    plain = _one_shard_folder(tmp_path / "plain")
    said = []
    if "fifo" in odd:
        os.mkfifo(plain / "extra.safetensors")
        said.append("extra.safetensors (a FIFO)")
    if "device" in odd:
        (plain / "tokenizer.model").symlink_to("/dev/zero")
        said.append("tokenizer.model (a character device)")
    for line in _outcomes_in_child(["layout", "encrypt"], os.urandom(32), plain=plain,
                                   out=tmp_path / "enc"):
        assert " FormatError not every entry of" in line and all(s in line for s in said), line
    assert sorted(os.listdir(tmp_path)) == ["plain"]  # no output, no temporary folder


def test_a_link_leading_nowhere_is_named_with_the_other_entries_that_are_not_files(tmp_path):
    """A dangling link was a bare FileNotFoundError from wherever it was first read; it
    is named in the one refusal, with what else is not a file (a subfolder too)."""
    plain = _one_shard_folder(tmp_path / "plain")
    (plain / "vocab.json").symlink_to(tmp_path / "gone")
    (plain / "sub").mkdir()
    with pytest.raises(FormatError, match=r"not every entry of .*: sub \(a directory\); "
                                          r"vocab.json \(a symbolic link that leads nowhere"):
        checkpoints.checkpoint_layout(plain)


def test_an_encrypted_folder_holding_a_fifo_is_refused_not_waited_on(small_folder, tmp_path):
    """A FIFO in place of a listed file: loading (gpucrypt.hf included) waited forever in
    the check that a listed model file is one, or in hashing the copied file for the
    manifest. Refused up front, naming both, by every reader."""
    _, enc, key = small_folder
    for name in ("config.json", "model-2.safetensors"):
        os.remove(enc / name)
        os.mkfifo(enc / name)
    for line in _outcomes_in_child(["load", "decrypt", "build"], key, enc=enc,
                                   out=tmp_path / "out"):
        assert " FormatError not every entry of" in line, line
        assert "config.json (a FIFO)" in line and "model-2.safetensors (a FIFO)" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("use, after, victim", [
    ("encrypt", "checkpoint_layout", "plain/model-1.safetensors"),   # the shard's open
    ("load", "_manifest_model_files", "enc/model-2.safetensors"),   # a listed model file's magic
    ("load", "checkpoint_layout", "enc/config.json"),               # the manifest check's digest
    ("decrypt", "_check_manifest", "enc/config.json"),              # the copy, hashed
    ("build", "_check_manifest", "enc/config.json"),                # gpucrypt.hf's checked bytes
    ("load", "_check_manifest", "enc/model-2.safetensors"),         # a model file's own open
    ("decrypt", "_check_manifest", "enc/model-2.safetensors"),      # (models.py's opens)
])
def test_a_file_swapped_for_a_fifo_after_the_check_is_refused_not_waited_on(
        small_folder, tmp_path, use, after, victim):
    """Every open of a folder's file here waited forever on a FIFO put in the file's
    place after the up-front check: each is now opened without waiting, and refused
    unless it is a regular file."""
    plain, enc, key = small_folder
    victim = tmp_path / victim
    [line] = _outcomes_in_child([use], key, plain=plain, enc=enc, out=tmp_path / "out",
                                after=after, victim=victim)
    assert line.startswith(f"{use} FormatError") and \
        f"{victim.name} is a FIFO, not a regular file" in line, line
    assert sorted(os.listdir(tmp_path)) == ["enc", "plain"]  # no output, no temporary folder


_LEASE_HOLDER = r"""
import fcntl, os, signal, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
except OSError as exc:  # leases off here (fs.leases, overlay or network file systems)
    print("unsupported", exc, flush=True)
    sys.exit(0)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
# asked to let go (another open): hold on for half a second, as a Samba or NFS server
# flushing its client's writes does, then let go
signal.signal(signal.SIGIO, lambda *a: (time.sleep(0.5),
                                        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)))
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("leased", flush=True)
time.sleep(30)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file leases are Linux's")
def test_a_file_under_a_lease_is_read_once_the_lease_breaks(tmp_path):
    """A file another process holds a lease on (Samba, an NFS server): a blocking open waits
    for the lease to break, and the non-blocking open that keeps a FIFO from hanging
    answered EWOULDBLOCK at once instead, which a checkpoint folder's reads reported as a
    file that is no checkpoint index. It now waits as the blocking open did."""
    from gpucrypt.files._atomic import open_regular

    path = tmp_path / "config.json"
    path.write_text('{"a": 1}')
    holder = subprocess.Popen([sys.executable, "-c", _LEASE_HOLDER, str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        said = holder.stdout.readline().strip()
        if said.startswith("unsupported"):
            pytest.skip(f"this file system takes no lease ({said}): nothing to wait for")
        assert said == "leased"
        start = time.monotonic()
        with open_regular(path, ValueError) as f:
            assert f.read() == b'{"a": 1}'
        assert time.monotonic() - start >= 0.4  # it waited for the lease to break
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- durability
def test_a_written_folder_is_fsynced_whole_before_it_is_renamed_into_place(small_folder,
                                                                          tmp_path, monkeypatch):
    """The copied files (config.json, the index) were never fsynced, and the temporary
    folder not after its last entries (the copies, the manifest) were made, so a power
    cut after the rename could publish a folder with empty or missing files. Now, at the
    rename, every file in it and then the folder have been fsynced. (A spy on os.fsync:
    a power cut cannot be reproduced here.) Files are known by inode, as the model files
    are written unnamed and linked in afterwards."""
    plain, enc, key = small_folder
    last_fsync, at_rename, clock = {}, {}, iter(range(1, 1 << 30))
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        real_fsync(fd)
        st = os.fstat(fd)
        last_fsync[st.st_dev, st.st_ino] = next(clock)

    def rename(src, dst, *args, **kwargs):
        at_rename[os.fspath(dst)] = dict(last_fsync)
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    for out, write in (
            (tmp_path / "enc2", lambda out: checkpoints.encrypt_checkpoint(plain, out, key,
                                                                           device="cpu")),
            (tmp_path / "back", lambda out: checkpoints.decrypt_checkpoint(enc, out, key=key))):
        write(out)
        synced = at_rename[str(out)]
        files = {name: ((st := (out / name).stat()).st_dev, st.st_ino) for name in os.listdir(out)}
        assert "config.json" in files and "model.safetensors.index.json" in files
        unsynced = sorted(name for name, ident in files.items() if ident not in synced)
        assert not unsynced, f"{out.name}: not fsynced before the rename: {unsynced}"
        folder = ((st := out.stat()).st_dev, st.st_ino)
        assert synced.get(folder, 0) > max(synced[ident] for ident in files.values()), \
            f"{out.name}: the folder was not fsynced after its last file"
