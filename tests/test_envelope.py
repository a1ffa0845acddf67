"""Envelopes: every wrapping method round-trips, several recipients, clear errors for a
missing recipient, a tampered stanza or a malformed envelope, and interop with plain
``cryptography`` calls exactly as docs/KEYS.md describes them (parsed here by hand,
not with gpucrypt's decoder)."""
from __future__ import annotations

import base64
import json
import os
import struct

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

import _hpke_reference as hpke_ref
from _vectors import vector_path
from gpucrypt import keys
from gpucrypt.keys import (CallableKeyProvider, EnvelopeError, EnvKeyProvider, Identity, Keyset,
                           KeyUnavailable, NoMatchingRecipient, WrappingKey, open_envelope,
                           seal_envelope)
from gpucrypt.keys.recipients import describe_envelope

NO_MATCH = "no recipient in this file matches your key(s)"


def _parse_by_hand(envelope: bytes) -> list[tuple[int, bytes, bytes]]:
    """docs/KEYS.md's table, read independently of gpucrypt.keys._envelope."""
    assert envelope[:4] == b"GCEV" and envelope[4] == 1
    count, pos, out = envelope[5], 6, []
    for _ in range(count):
        kind, id_len = envelope[pos], envelope[pos + 1]
        rid = envelope[pos + 2:pos + 2 + id_len]
        pos += 2 + id_len
        (body_len,) = struct.unpack_from(">H", envelope, pos)
        out.append((kind, rid, envelope[pos + 2:pos + 2 + body_len]))
        pos += 2 + body_len
    assert pos == len(envelope)
    return out


@pytest.fixture(scope="module")
def x_identity():
    return Identity.generate("x25519")


@pytest.fixture(scope="module")
def pq_identity():
    return Identity.generate("mlkem768-x25519")


@pytest.mark.parametrize("dek_len", [16, 32, 64])
def test_round_trip_every_wrapping(x_identity, pq_identity, dek_len):
    dek = os.urandom(dek_len)
    ks = Keyset.generate()
    wk = WrappingKey("ops-kek", os.urandom(32))
    env = seal_envelope(dek, [x_identity.recipient, pq_identity.recipient, ks, wk])
    assert len(_parse_by_hand(env)) == 4
    for identity in (x_identity, pq_identity, ks, wk, ks.primary,
                     CallableKeyProvider({"ops-kek": wk.secret_bytes()}.__getitem__)):
        assert open_envelope(env, identity) == dek
        assert open_envelope(env, [Identity.generate(), identity]) == dek


def test_each_stanza_kind_alone(x_identity, pq_identity):
    dek = keys.generate_dek()
    for recipient, identity in ((x_identity.recipient, x_identity),
                                (pq_identity.recipient, pq_identity)):
        env = seal_envelope(dek, recipient)
        assert open_envelope(env, identity) == dek
        with pytest.raises(NoMatchingRecipient, match=NO_MATCH.replace("(", r"\(").replace(")", r"\)")):
            open_envelope(env, Identity.generate(identity.kem))


def test_fresh_wrapping_each_time(x_identity):
    dek = keys.generate_dek()
    assert seal_envelope(dek, x_identity) != seal_envelope(dek, x_identity)


def test_missing_recipient_is_a_clear_error(x_identity):
    env = seal_envelope(keys.generate_dek(), [x_identity, Keyset.generate()])
    with pytest.raises(NoMatchingRecipient) as info:
        open_envelope(env, [Identity.generate(), Keyset.generate(), WrappingKey("x", os.urandom(32))])
    # and who it is for (public labels): which key to look for
    assert str(info.value) == f"{NO_MATCH}; it is for {', '.join(describe_envelope(env))}"
    with pytest.raises(NoMatchingRecipient):
        open_envelope(env, [])


def test_disabled_and_destroyed_keys_refuse_with_reason():
    ks = Keyset.generate()
    old = ks.primary.id
    env = seal_envelope(keys.generate_dek(), ks)
    ks.add(primary=True)
    ks.disable(old)
    with pytest.raises(NoMatchingRecipient, match=f"key {old} is disabled"):
        open_envelope(env, ks)
    ks.enable(old)
    assert open_envelope(env, ks)
    ks.destroy(old)
    with pytest.raises(NoMatchingRecipient, match=f"key {old} was destroyed"):
        open_envelope(env, ks)


@pytest.mark.parametrize("which", ["x25519", "mlkem768-x25519", "aes-kwp"])
def test_tampered_wrapped_key_fails(which, x_identity, pq_identity):
    ks = Keyset.generate()
    identity = {"x25519": x_identity, "mlkem768-x25519": pq_identity, "aes-kwp": ks}[which]
    env = bytearray(seal_envelope(keys.generate_dek(), identity))
    for offset in (len(env) - 1, len(env) - 20):  # the tag / the wrapped key or KEM ciphertext
        bad = bytearray(env)
        bad[offset] ^= 0x01
        with pytest.raises(NoMatchingRecipient, match="failed to authenticate"):
            open_envelope(bytes(bad), identity)


def test_tampered_recipient_id_no_longer_matches(x_identity):
    env = bytearray(seal_envelope(keys.generate_dek(), x_identity))
    env[8] ^= 0x80  # first byte of the fingerprint
    with pytest.raises(NoMatchingRecipient):
        open_envelope(bytes(env), x_identity)


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e[:5], "bad magic|truncated"),
    (lambda e: b"XXXX" + e[4:], "bad magic"),
    (lambda e: e[:4] + b"\x02" + e[5:], "version 2 is not supported"),
    (lambda e: e[:5] + b"\x00" + e[6:], "no stanza"),
    (lambda e: e[:5] + b"\x02" + e[6:], "truncated"),
    (lambda e: e + b"\x00", "trailing bytes"),
    (lambda e: e[:-1], "truncated"),
    (lambda e: e[:6] + b"\x09" + e[7:], "unknown stanza type"),
])
def test_malformed_envelope(mutate, message, x_identity):
    env = seal_envelope(keys.generate_dek(), x_identity)
    with pytest.raises(EnvelopeError, match=message):
        open_envelope(mutate(env), x_identity)


def test_argument_rules(x_identity):
    with pytest.raises(ValueError, match="16 to 64 bytes"):
        seal_envelope(b"short", x_identity)
    with pytest.raises(TypeError, match="dek must be bytes-like"):
        seal_envelope("a string", x_identity)
    with pytest.raises(ValueError, match="at least one recipient"):
        seal_envelope(keys.generate_dek(), [])
    with pytest.raises(TypeError, match="cannot wrap a data key for a str"):
        seal_envelope(keys.generate_dek(), ["alice.pub"])
    with pytest.raises(ValueError, match="1 to 255"):
        seal_envelope(keys.generate_dek(), [WrappingKey(f"k{i}", os.urandom(16)) for i in range(256)])


def test_open_with_wrong_kinds_of_object(x_identity):
    env = seal_envelope(keys.generate_dek(), x_identity)
    with pytest.raises(TypeError, match="is a public key"):
        open_envelope(env, x_identity.recipient)
    with pytest.raises(TypeError, match="cannot open an envelope with a str"):
        open_envelope(env, ["alice"])


def test_duplicates_wrapped_once(x_identity):
    env = seal_envelope(keys.generate_dek(), [x_identity, x_identity.recipient, x_identity])
    assert keys.describe_envelope(env) == [x_identity.fingerprint]


def test_two_different_keys_with_one_id_are_refused():
    """An envelope names a symmetric key by its id: two teams' different KEKs called "prod"
    cannot both have a stanza, so sealing says so instead of dropping one."""
    team_a, team_b = WrappingKey("prod", os.urandom(32)), WrappingKey("prod", os.urandom(32))
    with pytest.raises(ValueError, match="two different key-encryption keys have the id 'prod'.*"
                                         "give each key its own id") as info:
        seal_envelope(keys.generate_dek(), [team_a, team_b])
    for secret in (team_a.secret_bytes(), team_b.secret_bytes()):
        assert secret.hex() not in str(info.value) and repr(secret) not in str(info.value)
    # the same key given twice (as a keyset key and as bytes) is still wrapped once
    ks = Keyset.generate()
    same = WrappingKey(ks.primary.id, ks.primary.secret_bytes())
    dek = keys.generate_dek()
    env = seal_envelope(dek, [ks, same, ks.primary])
    assert keys.describe_envelope(env) == [f"aes-kwp:{ks.primary.id}"]
    assert open_envelope(env, same) == dek == open_envelope(env, ks)


def test_primary_of_keyset_is_used_and_recorded():
    ks = Keyset.generate()
    first = ks.primary.id
    second = ks.add(primary=True).id
    env = seal_envelope(keys.generate_dek(), ks)
    assert keys.describe_envelope(env) == [f"aes-kwp:{second}"]
    ks.disable(first)
    assert open_envelope(env, ks)


def test_disabled_key_cannot_wrap():
    ks = Keyset.generate()
    old = ks.primary
    ks.add(primary=True)
    ks.disable(old.id)
    with pytest.raises(KeyUnavailable, match="disabled"):
        seal_envelope(keys.generate_dek(), old)


def test_env_provider_hex_and_base64(monkeypatch):
    kek = os.urandom(32)
    dek = keys.generate_dek()
    env = seal_envelope(dek, WrappingKey("env-kek", kek))
    for text in (kek.hex(), base64.b64encode(kek).decode(), base64.urlsafe_b64encode(kek).decode().rstrip("=")):
        monkeypatch.setenv("GPUCRYPT_TEST_KEK", text)
        provider = EnvKeyProvider("env-kek", "GPUCRYPT_TEST_KEK")
        assert open_envelope(env, provider) == dek
        assert kek.hex() not in repr(provider)
        # a provider also wraps, through WrappingKey.from_provider
        assert open_envelope(seal_envelope(dek, WrappingKey.from_provider(provider, "env-kek")),
                             WrappingKey("env-kek", kek)) == dek
    with pytest.raises(NoMatchingRecipient):
        open_envelope(env, EnvKeyProvider("another-id", "GPUCRYPT_TEST_KEK"))
    monkeypatch.delenv("GPUCRYPT_TEST_KEK")
    with pytest.raises(NoMatchingRecipient):
        open_envelope(env, EnvKeyProvider("env-kek", "GPUCRYPT_TEST_KEK"))
    monkeypatch.setenv("GPUCRYPT_TEST_KEK", "not a key")
    with pytest.raises(NoMatchingRecipient, match="64 hex digits or base64"):
        open_envelope(env, EnvKeyProvider("env-kek", "GPUCRYPT_TEST_KEK"))


def test_callable_provider_unknown_id():
    env = seal_envelope(keys.generate_dek(), WrappingKey("kms-1", os.urandom(32)))

    def kms(key_id):
        raise KeyError(key_id)

    with pytest.raises(NoMatchingRecipient):
        open_envelope(env, CallableKeyProvider(kms, "kms"))


def test_key_provider_protocol():
    assert isinstance(Keyset.generate(), keys.KeyProvider)
    assert isinstance(EnvKeyProvider("a"), keys.KeyProvider)
    assert isinstance(CallableKeyProvider(lambda k: b""), keys.KeyProvider)
    assert isinstance(keys.FileKeyProvider("nowhere"), keys.KeyProvider)


# ---------------------------------------------------------------- interop, as docs/KEYS.md says


def test_interop_aes_kwp_with_plain_cryptography(tmp_path):
    ks = Keyset.generate()
    ks.save(tmp_path / "ks.json")
    dek = keys.generate_dek()
    env = seal_envelope(dek, ks)
    doc = json.loads((tmp_path / "ks.json").read_text())
    entry = doc["keys"][0]
    [(kind, rid, body)] = _parse_by_hand(env)
    assert kind == 1 and rid.decode() == entry["id"]
    assert aes_key_unwrap_with_padding(base64.b64decode(entry["material"]), body) == dek


def test_interop_hpke_x25519_with_plain_cryptography(tmp_path):
    identity = Identity.generate("x25519")
    identity.save(tmp_path / "me.json")
    dek = keys.generate_dek()
    env = seal_envelope(dek, identity.recipient)
    doc = json.loads((tmp_path / "me.json").read_text())
    private = x25519.X25519PrivateKey.from_private_bytes(base64.b64decode(doc["private_key"]))
    [(kind, rid, body)] = _parse_by_hand(env)
    assert kind == 2 and rid.hex() == doc["fingerprint"].split(":")[1]
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
    assert suite.decrypt(body, private, info=b"gpucrypt-envelope-v1") == dek


def test_interop_hpke_hybrid_with_plain_cryptography(tmp_path):
    identity = Identity.generate("mlkem768-x25519")
    identity.save(tmp_path / "me.json")
    dek = keys.generate_dek()
    env = seal_envelope(dek, identity.recipient)
    raw = base64.b64decode(json.loads((tmp_path / "me.json").read_text())["private_key"])
    private = hpke.MLKEM768X25519PrivateKey(mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:64]),
                                            x25519.X25519PrivateKey.from_private_bytes(raw[64:]))
    [(kind, _, body)] = _parse_by_hand(env)
    assert kind == 3
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
    assert suite.decrypt(body, private, info=b"gpucrypt-envelope-v1") == dek


def test_fingerprint_is_documented_hash(tmp_path):
    import hashlib

    identity = Identity.generate()
    pub = identity.recipient.public_bytes
    expected = hashlib.sha256(b"gpucrypt-recipient-v1\x00x25519\x00" + pub).hexdigest()[:32]
    assert identity.fingerprint == "x25519:" + expected


def test_a_key_provider_is_asked_at_most_max_provider_unwraps_key_ids():
    """A KeyProvider identity (a CallableKeyProvider over a KMS or a vault, say) is asked
    for the key id of each aes-kwp stanza, an id whoever wrote the file chose: a forged
    envelope of 254 such stanzas and one key-ref stanza made 508 calls (each stanza
    twice: with the file context, then without). At most MAX_PROVIDER_UNWRAPS now, and
    the error says why the rest were not tried. A file with several stanzas still opens,
    and local providers (a Keyset) are not limited."""
    from gpucrypt.keys import _envelope
    from gpucrypt.keys.recipients import MAX_PROVIDER_UNWRAPS, open_file_envelope

    asked = []
    kek = os.urandom(32)

    def fetch(key_id):
        asked.append(key_id)
        if key_id != "mine":
            raise KeyError(key_id)
        return kek

    provider = CallableKeyProvider(fetch, "vault")
    forged = [_envelope.Stanza("aes-kwp", f"../secret/{i}".encode(), b"x" * 40)
              for i in range(254)]
    forged.append(_envelope.Stanza(
        "key-ref", b"awskms://arn:aws:kms:us-east-1:111122223333:key/x", b"y"))
    with pytest.raises(NoMatchingRecipient, match="the others were not tried") as info:
        open_file_envelope(_envelope.encode(forged), [provider], os.urandom(16))
    assert len(asked) == MAX_PROVIDER_UNWRAPS, len(asked)
    assert "WrappingKey.from_provider" in str(info.value)

    # what a writer makes: several recipients, the provider's key among them
    dek, salt = keys.generate_dek(), os.urandom(16)
    others = [WrappingKey(f"team-{i}", os.urandom(32)) for i in range(5)]
    envelope = seal_envelope(dek, [*others, WrappingKey("mine", kek), Identity.generate()])
    asked.clear()
    assert open_file_envelope(envelope, [provider], salt) == dek
    assert asked == [f"team-{i}" for i in range(5)] + ["mine"]
    # a keyset is looked up in this process: no limit (its key after 20 others opens)
    keyset = Keyset.generate()
    many = seal_envelope(dek, [*(WrappingKey(f"k{i}", os.urandom(32)) for i in range(20)),
                               keyset])
    assert open_file_envelope(many, [keyset], salt) == dek


def test_a_keyset_file_that_does_not_load_is_loaded_once_per_envelope(tmp_path, monkeypatch):
    """A sealed keyset named by a file: reference or a FileKeyProvider, with a wrong
    passphrase, was loaded again (scrypt again) for every stanza, public-key ones too:
    a forged envelope of 255 stanzas cost 255 scrypt runs (13 minutes at N=2**20) before
    the error. Once now, and the error still says why."""
    from gpucrypt.keys import _document, _envelope
    from gpucrypt.keys.recipients import open_file_envelope

    monkeypatch.setattr(keys.passphrase, "MIN_LOG_N", 10)  # writers refuse 2**10 otherwise
    path = tmp_path / "ks.json"
    keyset = Keyset.generate()
    keyset.save(path, "right passphrase", scrypt_n=2**10)
    runs = []
    real = _document.Scrypt
    monkeypatch.setattr(_document, "Scrypt", lambda *a, **k: runs.append(1) or real(*a, **k))
    monkeypatch.setenv("KS_PW", "wrong passphrase")
    forged = _envelope.encode([_envelope.Stanza("aes-kwp", f"id{i}".encode(), os.urandom(40))
                               for i in range(8)])
    genuine = seal_envelope(keys.generate_dek(),
                            [Identity.generate().recipient for _ in range(3)] + [keyset])
    for envelope in (forged, genuine):
        for reader in (keys.KeyReference(f"file://{path}?passphrase-source=env:KS_PW"),
                       keys.FileKeyProvider(path, "wrong passphrase")):
            runs.clear()
            with pytest.raises(NoMatchingRecipient, match="wrong passphrase"):
                open_file_envelope(envelope, reader, os.urandom(16))
            assert len(runs) == 1, (reader, len(runs))


@pytest.mark.parametrize("size", [0, 15, 65, 4000])
def test_a_data_key_of_a_length_sealing_refuses_is_refused_when_opened(size):
    """Anyone holding alice's public key can wrap bytes of any length for her: open_envelope
    (the public call) returned 0 or 4000 of them as "the data key", which sealing refuses
    (16 to 64 bytes) and HKDF or HMAC would take without a word."""
    from gpucrypt.keys import _envelope
    from gpucrypt.keys.recipients import _KEMS, HPKE_INFO

    alice = Identity.generate()
    body = _KEMS["x25519"][1].encrypt(b"A" * size, alice.recipient._public_key, info=HPKE_INFO)
    envelope = _envelope.encode([_envelope.Stanza("hpke-x25519", alice.recipient.stanza_id, body)])
    with pytest.raises(EnvelopeError, match=f"is {size} bytes, not 16 to 64"):
        open_envelope(envelope, alice)


def test_two_references_making_one_stanza_id_are_refused(monkeypatch):
    """Two different key references whose wrappings have the same stanza id (an alias and
    its key's ARN, a PKCS#11 key with and without x-wrap) made one stanza, the second
    silently dropped; the same reference given twice is still wrapped once."""
    import sys
    import types

    from gpucrypt.keys import references

    class Provider:  # one key, whatever the reference's query says
        provider = "test"

        @classmethod
        def from_uri(cls, parsed):
            return cls()

        def wrap(self, dek, context):
            return "awskms://arn:aws:kms:eu-west-1:111122223333:key/k", b"wrapped" + dek

    module = types.ModuleType("gpucrypt_test_same_stanza_provider")
    module.Provider = Provider
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(references.PROVIDERS, "awskms", f"{module.__name__}:Provider")
    alias = keys.KeyReference("awskms:///alias/models?region=eu-west-1")
    arn = keys.KeyReference("awskms://arn:aws:kms:eu-west-1:111122223333:key/k")
    dek = keys.generate_dek()
    with pytest.raises(ValueError, match="awskms:///alias/models and awskms://arn:aws:kms:"
                                         "eu-west-1:111122223333:key/k both wrap as"):
        seal_envelope(dek, [alias, arn])
    assert len(_parse_by_hand(seal_envelope(dek, [alias, keys.KeyReference(alias.uri)]))) == 1


def test_labels_from_a_header_are_shown_escaped():
    """Stanza ids are unauthenticated header bytes that errors and the command line print:
    a terminal escape or a line break in one (a forged "decrypted OK" line) is escaped."""
    from gpucrypt.keys._envelope import Stanza, encode

    envelope = encode([Stanza("key-ref", b"pkcs11:token=t;object=o\x1b[2J\nFAKE: decrypted OK",
                              b"x"), Stanza("aes-kwp", b"\x1b[31mred", b"y" * 40)])
    labels = describe_envelope(envelope)
    assert labels == ["pkcs11:token=t;object=o\\x1b[2J\\nFAKE: decrypted OK",
                      "aes-kwp:\\x1b[31mred"], labels
    with pytest.raises(NoMatchingRecipient) as info:
        open_envelope(envelope, [Keyset.generate()])
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)


def _hpke_vectors() -> list[dict]:
    """RFC 9180's base-mode vectors (and the X-Wing draft's) for gpucrypt's two suites:
    DHKEM(X25519) or X-Wing, HKDF-SHA256, ChaCha20-Poly1305."""
    found = []
    for name in ("test-vectors.json", "hpke-pq-test-vectors.json"):
        with open(vector_path("HPKE", name)) as f:
            found += [v for v in json.load(f) if int(v["mode"]) == 0 and int(v["kdf_id"]) == 1
                      and int(v["aead_id"]) == 3
                      and int(v["kem_id"]) in (hpke_ref.DHKEM_X25519, hpke_ref.XWING)]
    return found


@pytest.mark.parametrize("vector", _hpke_vectors(), ids=lambda v: f"kem{int(v['kem_id']):#06x}")
def test_the_independent_hpke_opener_meets_the_published_vectors(vector):
    """The check of the opener the next test uses: shared secret, key schedule and the
    first encryptions of each vector, from the RFC's formulas alone."""
    h = bytes.fromhex
    kem_id = int(vector["kem_id"])
    private = h(vector["skRm"]) if kem_id == hpke_ref.DHKEM_X25519 else \
        hpke_ref.xwing_keys(h(vector["skRm"]))
    assert hpke_ref.decapsulate(kem_id, private, h(vector["enc"])) == h(vector["shared_secret"])
    assert hpke_ref.key_schedule(kem_id, h(vector["shared_secret"]), h(vector["info"])) == \
        (h(vector["key"]), h(vector["base_nonce"]))
    for seq, encryption in enumerate(vector["encryptions"][:3]):
        assert hpke_ref.open_sealed(kem_id, private, h(vector["enc"]), h(encryption["ct"]),
                                    h(vector["info"]), h(encryption["aad"]), seq) == \
            h(encryption["pt"])


@pytest.mark.parametrize("kem", ["x25519", "mlkem768-x25519"])
def test_stanzas_are_rfc9180_base_mode_as_documented(kem):
    """docs/KEYS.md: a public-key stanza's body is enc || ct of RFC 9180 base mode (info
    gpucrypt-envelope-v1, no aad) under DHKEM(X25519) or X-Wing; opened here by the
    independent opener, not by cryptography's hpke module that made it. And an X-Wing
    decapsulation key's 96 bytes are its seed expanded by SHAKE256: the draft's vector's
    public key comes out of that identity."""
    from gpucrypt.keys import _envelope
    from gpucrypt.keys.recipients import HPKE_INFO

    identity = Identity.generate(kem)
    dek = keys.generate_dek()
    (stanza,) = _envelope.decode(seal_envelope(dek, identity.recipient))
    secret = identity._private_bytes
    if kem == "x25519":
        kem_id, private, enc_size = hpke_ref.DHKEM_X25519, secret, 32
    else:
        kem_id, private, enc_size = hpke_ref.XWING, (secret[:64], secret[64:]), 1120
    assert hpke_ref.open_sealed(kem_id, private, stanza.body[:enc_size], stanza.body[enc_size:],
                                HPKE_INFO, b"") == dek
    if kem != "x25519":
        (vector,) = [v for v in _hpke_vectors() if int(v["kem_id"]) == hpke_ref.XWING][:1]
        seeded = Identity(kem, b"".join(hpke_ref.xwing_keys(bytes.fromhex(vector["skRm"]))))
        assert seeded.recipient.public_bytes == bytes.fromhex(vector["pkRm"])
