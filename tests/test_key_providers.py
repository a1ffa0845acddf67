"""Keys that stay in an HSM or a KMS: key reference URIs, the PKCS#11 provider against a real
SoftHSM2 token, the AWS KMS provider against moto's KMS server on the loopback (boto3's real
HTTP client), rekeying between providers, references across pickle and spawn, and audit
records that name providers and references but never a key or a PIN.

One SoftHSM2 token and one moto server serve the whole module (each takes seconds to start).
SoftHSM2 is a system package: without it these tests fail and say how to install it.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from gpucrypt import audit, keys
from gpucrypt.cli import main
from gpucrypt.files import stream
from gpucrypt.keys import KeyReference, file_context

TOKEN = "gpucrypt-test"
PIN = "pin-7f3a9c21e5"  # distinctive, so that a test can search for it
SO_PIN = "so-pin-0d6b1f"
AWS_SECRET = "aws-secret-5c2e8d14b7a9"
KNOWN_KEK = bytes(range(32))  # imported into the token, so cryptography can check the wrapping


# ------------------------------------------------------------------------------------ fixtures


def _softhsm_module() -> str:
    for path in ("/usr/lib/softhsm/libsofthsm2.so",
                 "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                 "/usr/local/lib/softhsm/libsofthsm2.so"):
        if os.path.exists(path):
            return path
    pytest.fail("SoftHSM2 is not installed: apt-get install softhsm2 (README, 'Keys in an HSM "
                "or a KMS'); these tests need a real PKCS#11 token", pytrace=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """SoftHSM2 configured into a temporary folder, and AWS credentials for moto."""
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\n"
                    f"log.level = ERROR\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        mp.setenv("GPUCRYPT_PKCS11_PIN", PIN)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "none"))
        yield folder


@pytest.fixture(scope="module")
def hsm(env):
    """A SoftHSM2 token with an AES key (made inside), an AES key imported from KNOWN_KEK
    and an RSA key pair, all created through python-pkcs11."""
    module = _softhsm_module()
    if shutil.which("softhsm2-util") is None:
        pytest.fail("softhsm2-util is missing: apt-get install softhsm2", pytrace=False)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--so-pin",
                    SO_PIN, "--pin", PIN], check=True, capture_output=True)
    from pkcs11 import Attribute, KeyType, ObjectClass

    from gpucrypt.keys.pkcs11 import _library

    token = _library(module).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN, rw=True) as session:
        session.generate_key(KeyType.AES, 256, label="kek", store=True)
        session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY,
                               Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE: KNOWN_KEK,
                               Attribute.LABEL: "known", Attribute.TOKEN: True,
                               Attribute.WRAP: True, Attribute.UNWRAP: True,
                               Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                               Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
        public, _ = session.generate_keypair(KeyType.RSA, 2048, label="rsa", store=True)
        numbers = rsa.RSAPublicNumbers(int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                                       int.from_bytes(public[Attribute.MODULUS], "big"))
    return {"module": module, "rsa_public": numbers.public_key()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kms(env):
    """moto's KMS on the loopback; yields a function making a fresh key (its ARN)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    client = boto3.client("kms", endpoint_url=endpoint, region_name="us-east-1")

    class Kms:
        def __init__(self):
            self.endpoint, self.client = endpoint, client

        def new_key(self, alias: str | None = None) -> str:
            meta = client.create_key(Description="gpucrypt test")["KeyMetadata"]
            if alias:
                client.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
            return meta["Arn"]

        def uri(self, key: str) -> str:
            return (f"awskms://{key}" if key.startswith("arn:") else f"awskms:///{key}?region=us-east-1") \
                + ("&" if not key.startswith("arn:") else "?") + f"endpoint={endpoint}"

    yield Kms()
    server.stop()


@pytest.fixture()
def plain(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(10_000))
    return path


def _hsm_uri(hsm, obj: str = "kek", extra: str = "") -> str:
    return f"pkcs11:token={TOKEN};object={obj}?module-path={hsm['module']}{extra}"


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _decrypts_to(path, plain, tmp_path, **kw) -> None:
    out = tmp_path / "out.bin"
    keys.decrypt_file(path, out, device="cpu", **kw)
    assert out.read_bytes() == plain.read_bytes()
    out.unlink()


# ------------------------------------------------------------------------------------ URIs


@pytest.mark.parametrize("uri, label, query", [
    ("pkcs11:token=prod;object=model-kek?module-path=/usr/lib/x.so&pin-source=env:HSM_PIN",
     "pkcs11:token=prod;object=model-kek", {"module-path": "/usr/lib/x.so", "pin-source": "env:HSM_PIN"}),
    ("pkcs11:object=k%20one;token=a%2Fb;id=%01%ab", "pkcs11:token=a%2Fb;object=k%20one;id=%01%AB", {}),
    ("awskms://arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
     "awskms://arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab", {}),
    ("awskms:///alias/models?region=eu-west-1&endpoint=http://127.0.0.1:4566",
     "awskms:///alias/models", {"region": "eu-west-1", "endpoint": "http://127.0.0.1:4566"}),
    ("file:///etc/gpucrypt/keyset.json", "file:///etc/gpucrypt/keyset.json", {}),
])
def test_uri_forms(uri, label, query):
    ref = KeyReference(uri)
    assert ref.label == label and ref.query == query
    assert KeyReference(ref.uri) == ref  # the canonical form parses back to itself


@pytest.mark.parametrize("uri, why", [
    ("pkcs11:token=t;object=o?pin-value=1234", "secret in the URI"),
    ("pkcs11:token=t;object=o;pin-value=1234", "unknown path attribute 'pin-value'"),
    ("pkcs11:token=t;object=o;key=1234", "unknown path attribute 'key'"),
    ("pkcs11:token=t;object=o;pin=1234", "unknown path attribute 'pin'"),
    ("pkcs11:token=t;object=o?pin=1234", "secret in the URI"),
    ("pkcs11:object=o", "name the token"),
    ("pkcs11:token=t;object=o;colour=red", "unknown path attribute"),
    ("pkcs11:token=t;object=o;object=p", "given twice"),
    ("awskms://arn:aws:kms:eu-west-1:111122223333:key/x?region=us-east-1", "region= differs"),
    ("awskms://nonsense", "ARN, alias/NAME or a key id"),
    ("file:relative/keys.json", "absolute path"),
    ("s3://bucket/key", "unknown scheme"),
])
def test_bad_uris_say_what_is_wrong(uri, why):
    with pytest.raises(keys.KeysetError, match=why) as info:
        KeyReference(uri)
    assert "1234" not in str(info.value)  # a refused PIN is not echoed


@pytest.mark.parametrize("uri", [
    "pkcs11:token=prod;object=kek?pin-source=env:HSM_PIN&Tr0ub4dorXyzzy42",
    "awskms:///alias/models?region=eu-west-1&=AKIAXYZZY42",
    "awskms:///alias/models?region=eu-west-1&AKIAXYZZY42==",  # base64: reads as a name
    "awskms:///alias/models?region=eu-west-1&AKIAXYZZY42=1&AKIAXYZZY42=2",
    "file:///etc/ks.json?passphrase-source=env:P&correct horse xyzzy42 staple",
])
def test_errors_quote_nothing_of_a_query_but_the_names_gpucrypt_knows(uri):
    """_shown leaves the query out of errors because an item there may be a secret pasted
    by mistake; the error about that item quoted it back ("attribute '=akiaexamplesecret'
    has no value"). Nothing of it is shown now, and the error still says what is wrong."""
    with pytest.raises(keys.KeysetError, match="name=value|unknown query attribute|given "
                                               "twice") as info:
        KeyReference(uri)
    assert "xyzzy42" not in str(info.value).lower(), info.value
    assert "not shown" in str(info.value)


def test_a_query_name_gpucrypt_knows_is_still_named():
    with pytest.raises(keys.KeysetError, match="unknown query attribute 'module-path'"):
        KeyReference("awskms:///alias/models?region=eu-west-1&module-path=/x.so")
    with pytest.raises(keys.KeysetError, match="query attribute 'region' is given twice"):
        KeyReference("awskms:///alias/models?region=eu-west-1&region=us-east-1")


@pytest.mark.parametrize("uri", [
    "pkcs11:token=prod;object=k;pin%2Dvalue=SECRET-7d1",
    "pkcs11:token=prod;object=k;pin%2dval%75e=SECRET-7d1",
    "pkcs11:token=prod;object=k;PIN-VALUE=SECRET-7d1",
    "pkcs11:token=prod;object=k;x-pin=SECRET-7d1;colour=red",
    "pkcs11:token=prod;object=k;%70assphrase=SECRET-7d1",
])
def test_a_secret_attribute_is_masked_however_its_name_is_spelled(uri):
    """docs/KEYS.md: secret values "are masked wherever an error quotes the URI": names are
    judged percent-decoded, so pin%2Dvalue is pin-value."""
    with pytest.raises(keys.KeysetError) as info:
        KeyReference(uri)
    assert "SECRET-7d1" not in str(info.value) and "=***" in str(info.value), info.value


@pytest.mark.parametrize("uri", [
    "awskms://AKIAEXAMPLE:SECRET-7d1@arn:aws:kms:eu-west-1:111122223333:key/1234",
    "awskms://AKIAEXAMPLE:SECRET-7d1@/alias/models",
    "file://backup:SECRET-7d1@localhost/etc/gpucrypt/ks.json",
    "awskms://AKIAEXAMPLE:SECRET-7d1/x+y@arn:aws:kms:eu-west-1:111122223333:key/1234",
    "awskms://AKIAEXAMPLE:SECRET-7d1?q#r@arn:aws:kms:eu-west-1:111122223333:key/1234",
    "awskms:AKIAEXAMPLE:SECRET-7d1@arn:aws:kms:eu-west-1:111122223333:key/1234",
    " AWSKMS://AKIAEXAMPLE:SECRET-7d1@/alias/models",
    "file:backup:SECRET-7d1@/etc/gpucrypt/ks.json",
])
def test_a_password_before_the_host_is_refused_and_not_shown(uri):
    """A user:password@ typed before a reference's host was quoted whole by the error that
    refused the reference (not an ARN, not a local file): an AWS secret key holding '/',
    a password holding '?' or '#', a URI without '//' or in capitals."""
    with pytest.raises(keys.KeysetError) as info:
        KeyReference(uri)
    assert "SECRET-7d1" not in str(info.value) and "***@" in str(info.value), info.value


def test_a_source_that_is_not_a_source_is_never_echoed(tmp_path, capsys, monkeypatch):
    """The passphrase itself pasted where its source goes: refused when the URI is parsed
    (the command line's usage error), and by whatever reads a source, without quoting it."""
    from gpucrypt.keys.pkcs11 import Pkcs11Key
    from gpucrypt.keys.references import read_secret_source

    pasted = "correct-horse-battery-42"
    for uri in (f"file://{tmp_path}/ks.json?passphrase-source={pasted}",
                f"pkcs11:token=t;object=o?pin-source={pasted}"):
        with pytest.raises(keys.KeysetError, match="must be env:VAR, file:/path") as info:
            KeyReference(uri)
        assert pasted not in str(info.value)
    with pytest.raises(keys.KeysetError, match="must be env:VAR, file:/path") as info:
        read_secret_source(pasted, "GPUCRYPT_PKCS11_PIN", "the PIN")
    assert pasted not in str(info.value)
    assert Pkcs11Key("t", "o", pin_source=pasted).pin_source == pasted  # refused when read
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").write_bytes(b"x")
    assert main(["keygen", "--out", "ks.json"]) == 0
    code, _, err = _cli(capsys, "encrypt", "--kek",
                        f"file://{tmp_path}/ks.json?passphrase-source={pasted}", "plain", "out")
    assert code == 2 and pasted not in err and err.count("\n") == 1, err
    # the accepted forms: env:VAR, file:/path and an absolute path (RFC 7512's pin-source)
    for source in ("env:X", f"file:{tmp_path}/pw", f"{tmp_path}/pw"):
        KeyReference(f"file://{tmp_path}/ks.json?passphrase-source={source}")


def test_a_secret_source_that_is_not_utf8_is_one_line_and_quotes_nothing(tmp_path, monkeypatch):
    from gpucrypt.keys.references import read_secret_source

    (tmp_path / "pw").write_bytes(b"abc\xffdef\n")
    monkeypatch.setenv("BAD_PIN", b"abc\xffdef".decode("utf-8", "surrogateescape"))
    for source in (f"file:{tmp_path / 'pw'}", "env:BAD_PIN"):
        with pytest.raises(keys.KeyProviderError, match="is not valid UTF-8") as info:
            read_secret_source(source, "GPUCRYPT_PKCS11_PIN", "the PIN")
        for leak in ("0xff", "position", "udcff", "\udcff"):
            assert leak not in str(info.value), info.value


def test_file_reference_opens_a_sealed_keyset(plain, tmp_path, monkeypatch):
    monkeypatch.setattr(keys.passphrase, "MIN_LOG_N", 10)  # lets the test seal with 2**10
    keyset = keys.Keyset.generate()
    keyset.save(tmp_path / "ks.json", "correct horse", scrypt_n=2**10)
    (tmp_path / "pass").write_text("correct horse\n")
    ref = KeyReference(f"file://{tmp_path / 'ks.json'}?passphrase-source=file:{tmp_path / 'pass'}")
    enc = tmp_path / "m.gc"
    assert keys.encrypt_file(plain, enc, recipients=ref, device="cpu") == {
        "key_id": keyset.primary.id, "recipients": [f"aes-kwp:{keyset.primary.id}"]}  # as a keyset
    _decrypts_to(enc, plain, tmp_path, keyset=keyset)
    _decrypts_to(enc, plain, tmp_path, identities=pickle.loads(pickle.dumps(ref)))
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE", raising=False)
    with pytest.raises(keys.KeyProviderError, match="GPUCRYPT_PASSPHRASE"):
        keys.seal_envelope(keys.generate_dek(), KeyReference(f"file://{tmp_path / 'ks.json'}"))


def test_key_references_read_a_file_uri_with_passphrase_env(tmp_path, monkeypatch):
    """KeyReferences(keyset="file://...", passphrase_env=VAR) reads the passphrase from VAR
    and so expects the keyset sealed, as a path does (docs/DATASETS.md): the file: reference
    read $GPUCRYPT_PASSPHRASE instead, and took an unsealed keyset put in the sealed one's
    place, whose primary would then wrap every new data key."""
    from gpucrypt.keys.portable import KeyReferences

    monkeypatch.setattr(keys.passphrase, "MIN_LOG_N", 10)
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE", raising=False)
    monkeypatch.setenv("TEAM_PASS", "right horse")
    path = tmp_path / "ks.json"
    sealed = keys.Keyset.generate()
    sealed.save(path, "right horse", scrypt_n=2**10)
    for ref in (str(path), f"file://{path}"):
        resolved = pickle.loads(pickle.dumps(KeyReferences(keyset=ref, passphrase_env="TEAM_PASS")))
        assert resolved.resolve().keyset.primary.id == sealed.primary.id, ref
    path.unlink()
    keys.Keyset.generate().save(path)  # replaced by one that is not sealed
    for ref in (str(path), f"file://{path}"):
        with pytest.raises(keys.KeysetError, match="is not sealed"):
            KeyReferences(keyset=ref, passphrase_env="TEAM_PASS").resolve()
    # a reference naming its own passphrase source keeps it
    (tmp_path / "pw").write_text("other\n")
    own = KeyReferences(keyset=f"file://{path}?passphrase-source=file:{tmp_path / 'pw'}",
                        passphrase_env="TEAM_PASS")
    with pytest.raises(keys.KeysetError, match="is not sealed"):
        own.resolve()


def test_a_passphrase_given_refuses_an_unsealed_keyset_behind_a_file_reference(plain, tmp_path,
                                                                               capsys, monkeypatch):
    """A sealed keyset swapped for someone's unsealed one, with $GPUCRYPT_PASSPHRASE set:
    --keyset refused it, but --kek file:// to the same file (and the library's reference)
    read no passphrase for an unsealed file and wrapped the data key under the swapped
    keyset's primary. A reference naming a passphrase-source whose variable is unset is
    refused for the file too: an unsealed file is the problem, not the missing secret."""
    from gpucrypt.keys.portable import KeyReferences

    path = tmp_path / "ks.json"
    swapped = keys.Keyset.generate()
    swapped.save(path)  # not sealed, 0600: what an attacker who can write the folder leaves
    uri = f"file://{path}"
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", "correct horse")
    attempts = [lambda: KeyReference(uri).resolve(),
                lambda: keys.seal_envelope(keys.generate_dek(), KeyReference(uri)),
                lambda: KeyReferences(keyset=uri).resolve()]
    for attempt in attempts:
        with pytest.raises(keys.KeysetError, match="is not sealed, though a passphrase was "
                                                    "given: it may have been replaced") as info:
            attempt()
        assert "GPUCRYPT_PASSPHRASE unset" in str(info.value), info.value
    code, _, err = _cli(capsys, "encrypt", plain, tmp_path / "x", "--kek", uri)
    assert code == 1 and "is not sealed, though a passphrase was given" in err, err
    assert not (tmp_path / "x").exists()
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE")
    monkeypatch.delenv("NOT_SET_PASS", raising=False)
    with pytest.raises(keys.KeysetError, match="is not sealed.*without passphrase-source"):
        KeyReference(f"{uri}?passphrase-source=env:NOT_SET_PASS").resolve()
    # none given (unset, or set but empty as the command line counts it): used on purpose
    for value in (None, ""):
        if value is not None:
            monkeypatch.setenv("GPUCRYPT_PASSPHRASE", value)
        assert KeyReference(uri).resolve().primary.id == swapped.primary.id
    assert _cli(capsys, "encrypt", plain, tmp_path / "x", "--kek", uri)[0] == 0


def test_an_empty_passphrase_env_is_refused_naming_it_for_a_path_as_for_a_uri(tmp_path,
                                                                             monkeypatch):
    """KeyReferences(keyset=PATH, passphrase_env=V) with V set but empty passed "" on as the
    passphrase, and the load said "malformed protection block" of a sound file; the same
    keyset as a file:// URI said to set V. Both now refuse naming V and saying it is empty."""
    from gpucrypt.keys.portable import KeyReferences

    monkeypatch.setattr(keys.passphrase, "MIN_LOG_N", 10)
    path = tmp_path / "ks.json"
    keys.Keyset.generate().save(path, "right horse", scrypt_n=2**10)
    monkeypatch.setenv("KS_PASS", "")
    for ref in (str(path), f"file://{path}"):
        with pytest.raises(keys.KeyManagementError,
                           match="environment variable KS_PASS.*set but empty") as info:
            KeyReferences(keyset=ref, passphrase_env="KS_PASS").resolve()
        assert "malformed" not in str(info.value), info.value
    monkeypatch.setenv("KS_PASS", "right horse")
    for ref in (str(path), f"file://{path}"):
        assert KeyReferences(keyset=ref, passphrase_env="KS_PASS").resolve().keyset is not None


def test_a_sealed_key_file_by_path_says_what_opens_it_from_the_library(tmp_path, monkeypatch):
    """A sealed keyset given by path to KeyReferences or FileKeyProvider without a
    passphrase: the hint said to set GPUCRYPT_PASSPHRASE, which neither reads (doing so
    changed nothing). It names what each one takes instead, and stays a KeysetError."""
    from gpucrypt.keys.portable import KeyReferences

    monkeypatch.setattr(keys.passphrase, "MIN_LOG_N", 10)
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", "pw")  # following the old hint: no help here
    path, identity = tmp_path / "ks.json", tmp_path / "id.json"
    sealed = keys.Keyset.generate()
    sealed.save(path, "pw", scrypt_n=2**10)
    keys.Identity.generate().save(identity, "pw", scrypt_n=2**10)
    attempts = [(lambda: keys.FileKeyProvider(path).get_key(sealed.primary.id),
                 "FileKeyProvider(path, passphrase)"),
                (lambda: KeyReferences(keyset=str(path)).resolve(), "passphrase_env=VAR"),
                (lambda: KeyReferences(identities=[str(identity)]).resolve(),
                 "passphrase_env=VAR")]
    for attempt, hint in attempts:
        with pytest.raises(keys.KeysetError, match="is sealed with a passphrase") as info:
            attempt()
        message = str(info.value)
        assert hint in message and "not GPUCRYPT_PASSPHRASE" in message, message
        assert "--passphrase-file" not in message and "prompt" not in message, message
    # what the hints name works
    monkeypatch.setenv("KS_PASS", "pw")
    assert KeyReferences(keyset=str(path), passphrase_env="KS_PASS").resolve().keyset is not None
    assert keys.FileKeyProvider(path, "pw").get_key(sealed.primary.id) \
        == sealed.get_key(sealed.primary.id)
    # a file that is not a keyset keeps its own error
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(keys.KeysetError) as info:
        keys.FileKeyProvider(tmp_path / "junk.json").get_key("x")
    assert "sealed with a passphrase" not in str(info.value), info.value


@pytest.mark.parametrize("source", ["file:pin.txt", "file://pin.txt", "file:./pin.txt"])
def test_a_relative_secret_source_is_refused(source, tmp_path, monkeypatch):
    """docs/KEYS.md: pin-source and passphrase-source are env:VAR, file:/path or an absolute
    path. file:pin.txt was read relative to the current folder of whichever process resolved
    the reference (a worker's, say): refused, with what to give instead."""
    from gpucrypt.keys.references import read_secret_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pin.txt").write_text("1234\n")
    for uri in (f"pkcs11:token=prod;object=kek?pin-source={source}",
                f"file://{tmp_path}/ks.json?passphrase-source={source}"):
        with pytest.raises(keys.KeysetError, match="names a relative path: give an absolute"):
            KeyReference(uri)
    with pytest.raises(keys.KeysetError, match="names a relative path: give an absolute"):
        read_secret_source(source, "GPUCRYPT_PKCS11_PIN", "the PIN")
    assert read_secret_source(f"file:{tmp_path}/pin.txt", "X", "the PIN") == "1234"


@pytest.mark.parametrize("uri, why", [
    # a query typed with & for ?: its items became part of the label, shown everywhere
    ("pkcs11:token=t;object=kek&pin-value=S3CRET-6f?module-path=/x.so", "a '&' in the path"),
    ("pkcs11:token=t;object=kek&S3CRET-6f", "a '&' in the path"),
    # a name like pin, x- or encoded or not: was accepted, then silently dropped
    ("pkcs11:token=t;object=kek?x-pin-value=S3CRET-6f", "secret in the URI; use pin-source="),
    ("pkcs11:token=t;object=kek?X-Passphrase=S3CRET-6f", "secret in the URI; use pin-source="),
    ("pkcs11:token=t;object=kek?x-pin%2Dvalue=S3CRET-6f", "secret in the URI; use pin-source="),
    ("pkcs11:token=t;object=kek;x-pin-value=S3CRET-6f", "'x-pin-value' would put a secret"),
    ("file:///etc/ks.json?x-passphrase=S3CRET-6f", "secret in the URI"),
    # credentials in an endpoint: copied into errors and audit records
    ("awskms:///alias/models?region=us-east-1&endpoint=http://admin:S3CRET-6f@127.0.0.1:9",
     "endpoint holds a user name or password"),
    ("awskms:///alias/models?region=us-east-1&endpoint=https://S3CRET-6f@kms.example.com",
     "endpoint holds a user name or password"),
])
def test_a_secret_typed_into_a_uri_is_refused_and_not_shown(uri, why):
    """docs/KEYS.md: no secret in a URI. These reached the label (repr, audit key_ref,
    stderr), were accepted and dropped, or reached errors and audit records through the
    endpoint (the reviewer's repro_uri_secret_leaks.py): refused now, quoting none of it."""
    with pytest.raises(keys.KeysetError, match=why) as info:
        KeyReference(uri)
    assert "S3CRET-6f" not in str(info.value), info.value


def test_what_looks_like_a_secret_but_is_not_still_parses():
    """A '&' in a label is written %26 (RFC 7512), *-source names hold a source and are
    checked as such, and the AWS KMS key object refuses an endpoint with credentials too."""
    from gpucrypt.keys.awskms import AwsKmsKey

    ref = KeyReference("pkcs11:token=t;object=R%26D?pin-source=env:HSM_PIN")
    assert ref.attributes["object"] == "R&D" and KeyReference(ref.uri) == ref
    assert "%26" in ref.label
    assert KeyReference("pkcs11:token=t;object=o?x-pin-source=env:HSM_PIN").uri \
        == "pkcs11:token=t;object=o"  # an x- source gpucrypt does not read: dropped
    with pytest.raises(keys.KeysetError, match="must be env:VAR"):
        KeyReference("pkcs11:token=t;object=o?x-pin-source=S3CRET-6f")
    with pytest.raises(keys.KeysetError, match="user name or password") as info:
        AwsKmsKey("alias/models", region="us-east-1", endpoint="https://u:S3CRET-6f@kms.local")
    assert "S3CRET-6f" not in str(info.value)


#: what test endpoints' names resolve to (the test machine may have no DNS at all)
_RESOLVED = {"localhost.localstack.cloud": ["127.0.0.1"],  # LocalStack's default host
             "loopback6.test": ["::1", "127.0.0.1"],
             "localstack": ["172.18.0.2"],  # a compose service: another machine (container)
             "half.test": ["127.0.0.1", "10.0.0.9"]}


def _fake_resolver(monkeypatch) -> list:
    """The names asked of the resolver, which answers from _RESOLVED (the answers
    gpucrypt cached per process are forgotten first)."""
    from gpucrypt.keys import _uri

    asked = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        if host not in _RESOLVED:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, 0)) for a in _RESOLVED[host]]

    _uri._name_is_loopback.cache_clear()
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_kms_an_http_endpoints_name_is_resolved_once_per_process(monkeypatch):
    """The loopback check resolved the name at every parse: every Ray task and DCP rank
    unpickling a reference asked DNS again, and a resolver that never answers took its
    timeout (10 s, 20 s with search domains) each time, then said only "not known to be
    this machine". One lookup per name per process; a name that does not resolve says so."""
    asked = _fake_resolver(monkeypatch)
    uri = "awskms://alias/models?region=us-east-1&endpoint=http://localhost.localstack.cloud:4566"
    for _ in range(3):
        pickle.loads(pickle.dumps(KeyReference(uri)))
    assert asked == ["localhost.localstack.cloud"]
    with pytest.raises(keys.KeysetError, match="did not resolve here"):
        KeyReference("awskms://alias/models?region=us-east-1&endpoint=http://nowhere.test")


_NOT_LOOPBACK = ("plain http:// to a host not known to be this machine.*use https, or set "
                 "GPUCRYPT_KMS_ALLOW_HTTP=1 for a local emulator \\(the data key crosses the "
                 "network in the clear\\)")


@pytest.mark.parametrize("endpoint, refused", [
    ("http://192.0.2.2:4566", _NOT_LOOPBACK),
    ("http://kms.internal:80", _NOT_LOOPBACK),
    ("http://localhost.example.com", _NOT_LOOPBACK),
    ("http://localstack:4566", _NOT_LOOPBACK),
    ("http://half.test:4566", _NOT_LOOPBACK),  # one address of several is not the loopback
    ("http://[::ffff:10.0.0.1]:4566", _NOT_LOOPBACK),
    ("ftp://127.0.0.1", "endpoint must be a URL"),
    ("kms.us-east-1.amazonaws.com", "endpoint must be a URL"),
    ("http://127.0.0.1:4566", None),  # an emulator on this machine (moto, localstack)
    ("http://127.8.9.10", None),
    ("http://localhost:4566", None),
    ("http://LocalHost:4566", None),
    ("http://[::1]:4566", None),
    ("http://[::ffff:127.0.0.1]:4566", None),  # IPv4-mapped loopback
    ("http://localhost.localstack.cloud:4566", None),  # a name resolving to the loopback only
    ("http://loopback6.test:4566", None),
    ("https://vpce-0abc.kms.us-east-1.vpce.amazonaws.com", None),
    ("https://10.0.0.7:443/", None),
])
def test_kms_an_endpoint_over_plain_http_reaches_this_machine_only(endpoint, refused,
                                                                   monkeypatch):
    """KMS Encrypt carries the data key itself (Plaintext), and Decrypt returns it: over
    http:// to another host every file's data key crossed the network unencrypted (SigV4
    signs, it does not encrypt). Plain http is for an emulator on the loopback only: an
    address there, IPv4-mapped included, or a name all of whose addresses are there
    (LocalStack's localhost.localstack.cloud, refused by the first fix)."""
    from gpucrypt.keys.awskms import AwsKmsKey

    _fake_resolver(monkeypatch)
    monkeypatch.delenv("GPUCRYPT_KMS_ALLOW_HTTP", raising=False)
    uri = f"awskms:///alias/models?region=us-east-1&endpoint={endpoint}"
    if refused is None:
        assert KeyReference(uri).query["endpoint"] == endpoint
        AwsKmsKey("alias/models", region="us-east-1", endpoint=endpoint)
        return
    with pytest.raises(keys.KeysetError, match=refused):
        KeyReference(uri)
    with pytest.raises(keys.KeysetError, match=refused):
        AwsKmsKey("alias/models", region="us-east-1", endpoint=endpoint)


def test_kms_plain_http_to_a_private_network_is_a_deliberate_opt_in(monkeypatch):
    """An emulator reached by a compose service name (http://localstack:4566, usual in CI)
    was refused with no way out: GPUCRYPT_KMS_ALLOW_HTTP=1 allows it, and only 1 does.
    Credentials in the endpoint stay refused."""
    from gpucrypt.keys.awskms import AwsKmsKey

    _fake_resolver(monkeypatch)
    uri = "awskms:///alias/models?region=us-east-1&endpoint=http://localstack:4566"
    for value in ("0", "true", ""):
        monkeypatch.setenv("GPUCRYPT_KMS_ALLOW_HTTP", value)
        with pytest.raises(keys.KeysetError, match=_NOT_LOOPBACK):
            KeyReference(uri)
    monkeypatch.setenv("GPUCRYPT_KMS_ALLOW_HTTP", "1")
    assert KeyReference(uri).query["endpoint"] == "http://localstack:4566"
    AwsKmsKey("alias/models", region="us-east-1", endpoint="http://192.0.2.2:4566")
    with pytest.raises(keys.KeysetError, match="user name or password"):
        KeyReference(uri.replace("http://", "http://u:S3CRET-6f@"))


def test_kms_the_endpoint_boto3_takes_from_its_own_settings_is_checked_too(env, tmp_path,
                                                                          monkeypatch):
    """boto3 also takes the KMS endpoint from AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL or the
    profile's endpoint_url: plain http to another host there was used unchecked, and
    Encrypt sent the data key in the clear (the reviewer's repro_kms_env_endpoint.py). The
    endpoint the client was made with is checked now, before any request."""
    from gpucrypt.keys import awskms

    _fake_resolver(monkeypatch)
    monkeypatch.delenv("GPUCRYPT_KMS_ALLOW_HTTP", raising=False)
    (tmp_path / "config").write_text("[profile emu]\nregion = us-east-1\n"
                                     "endpoint_url = http://192.0.2.2:9\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    sent = []
    monkeypatch.setattr(awskms.AwsKmsKey, "_check_enabled", lambda self: sent.append(self))
    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    refused = ("AWS KMS: refused the endpoint boto3 was configured with \\(AWS_ENDPOINT_URL_KMS, "
               "AWS_ENDPOINT_URL or endpoint_url in the profile\\): endpoint is " + _NOT_LOOPBACK)
    for variable, profile in (("AWS_ENDPOINT_URL_KMS", None), ("AWS_ENDPOINT_URL", None),
                              (None, "emu")):
        monkeypatch.setattr(awskms, "_clients", {})  # a client is made per profile and region
        for name in ("AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        if variable:
            monkeypatch.setenv(variable, "http://192.0.2.2:9")
        with pytest.raises(keys.KeyProviderError, match=refused):
            awskms._client(profile, "us-east-1", None)
        assert awskms._clients == {}  # not kept
        query = f"?profile={profile}" if profile else ""
        with pytest.raises(keys.KeyProviderError, match=refused):
            keys.seal_envelope(keys.generate_dek(), KeyReference(f"awskms://{arn}{query}"))
    assert sent == []  # refused before any request
    # the loopback, and any host with the opt-in, are used as configured
    monkeypatch.setattr(awskms, "_clients", {})
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://localhost.localstack.cloud:4566")
    assert awskms._client(None, "us-east-1", None).meta.endpoint_url \
        == "http://localhost.localstack.cloud:4566"
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # (it would stand before the profile's)
    monkeypatch.setenv("GPUCRYPT_KMS_ALLOW_HTTP", "1")
    assert awskms._client("emu", "us-east-1", None).meta.endpoint_url == "http://192.0.2.2:9"


# ------------------------------------------------------------------------------------ PKCS#11


def test_pkcs11_kwp_is_rfc5649_and_roundtrips(hsm):
    ref = KeyReference(_hsm_uri(hsm, "known"))
    dek = keys.generate_dek()
    envelope = keys.seal_envelope(dek, ref)
    [stanza] = keys._envelope.decode(envelope)
    assert stanza.kind == "key-ref" and stanza.recipient_id == b"pkcs11:token=gpucrypt-test;object=known"
    assert stanza.body[0] == 2  # CKM_AES_KEY_WRAP_PAD: SoftHSM2 2.6 lists no CKM_AES_KEY_WRAP_KWP
    assert aes_key_unwrap_with_padding(KNOWN_KEK, stanza.body[1:]) == dek  # what the token made
    assert keys.open_envelope(envelope, ref) == dek


def test_pkcs11_gcm_binds_the_context(hsm):
    ref = KeyReference(_hsm_uri(hsm, "kek", "&x-wrap=aes-gcm"))
    dek = keys.generate_dek()
    envelope = keys.seal_envelope(dek, ref, context={"gpucrypt-file": "aa"})
    assert keys._envelope.decode(envelope)[0].body[0] == 3
    assert keys.open_envelope(envelope, ref, context={"gpucrypt-file": "aa"}) == dek
    with pytest.raises(keys.NoMatchingRecipient, match="refused to unwrap"):
        keys.open_envelope(envelope, ref, context={"gpucrypt-file": "bb"})


def test_x_wrap_survives_pickle_copy_and_key_references(hsm):
    """x-wrap=aes-gcm changes how a reference wraps (AES-GCM binds the file context, key
    wrap binds nothing): a reference pickled to a worker, copied with KeyReference(ref), or
    carried by KeyReferences still wraps with AES-GCM, and it is not equal to the same key
    without x-wrap. (The canonical URI had dropped it: workers fell back to key wrap.)"""
    from gpucrypt.keys.portable import KeyReferences

    ref = KeyReference(_hsm_uri(hsm, "kek", "&x-wrap=aes-gcm"))
    assert "x-wrap=aes-gcm" in ref.uri and "x-wrap" not in ref.label
    context = {"gpucrypt-file": "aa"}
    dek = keys.generate_dek()
    travelled = KeyReferences(recipients=ref.uri)
    copies = {"pickle": pickle.loads(pickle.dumps(ref)), "KeyReference(ref)": KeyReference(ref),
              "canonical": KeyReference(ref.uri),
              "KeyReferences": pickle.loads(pickle.dumps(travelled)).recipients[0]}
    for how, copy in copies.items():
        assert copy == ref and hash(copy) == hash(ref), how
        envelope = keys.seal_envelope(dek, copy, context=context)
        assert keys._envelope.decode(envelope)[0].body[0] == 3, how  # AES-GCM, not key wrap
        assert keys.open_envelope(envelope, ref, context=context) == dek
    plain = KeyReference(_hsm_uri(hsm, "kek"))
    assert plain != ref and plain.label == ref.label  # the same key, wrapped differently
    assert keys._envelope.decode(keys.seal_envelope(dek, plain))[0].body[0] == 2
    with pytest.raises(keys.KeysetError, match="x-wrap may only be aes-gcm"):
        KeyReference(_hsm_uri(hsm, "kek", "&x-wrap=aes-kwp"))  # said in the driver
    # vendor attributes gpucrypt does not read are not carried
    assert KeyReference(_hsm_uri(hsm, "kek", "&x-vendor=1")) == plain


def test_pkcs11_rsa_oaep_interoperates_with_cryptography(hsm):
    ref = KeyReference(_hsm_uri(hsm, "rsa"))
    dek = keys.generate_dek()
    [stanza] = keys._envelope.decode(keys.seal_envelope(dek, ref))
    assert stanza.body[0] == 5  # SoftHSM2 2.6 refuses OAEP with SHA-256; SHA-1 it is
    # an envelope wrapped by cryptography with the token's public key opens on the token
    sha1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    body = bytes([5]) + hsm["rsa_public"].encrypt(dek, sha1)
    envelope = keys._envelope.encode([keys.Stanza("key-ref", stanza.recipient_id, body)])
    assert keys.open_envelope(envelope, ref) == dek


def test_pkcs11_pin_from_a_file_and_wrong_pins(hsm, tmp_path, monkeypatch):
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    monkeypatch.delenv("GPUCRYPT_PKCS11_PIN")
    dek = keys.generate_dek()
    ref = KeyReference(_hsm_uri(hsm, extra=f"&pin-source=file:{pin_file}"))
    assert keys.open_envelope(keys.seal_envelope(dek, ref), ref) == dek
    with pytest.raises(keys.KeyProviderError, match="GPUCRYPT_PKCS11_PIN"):
        keys.seal_envelope(dek, KeyReference(_hsm_uri(hsm)))
    monkeypatch.setenv("WRONG_PIN", "not-the-pin")
    with pytest.raises(keys.KeyProviderError, match="refused the PIN") as info:
        keys.seal_envelope(dek, KeyReference(_hsm_uri(hsm, extra="&pin-source=env:WRONG_PIN")))
    assert "not-the-pin" not in str(info.value)


def _handle_mark(module: str) -> int:
    """A handle SoftHSM2 gives next: that of a session opened and closed now. SoftHSM2
    numbers sessions (and objects) from one counter that only counts up (a closed
    session's handle is not given again), so every session opened before this call has a
    lower handle, every one opened after a higher."""
    from gpucrypt.keys.pkcs11 import _library

    session = _library(module).get_token(token_label=TOKEN).open()
    try:
        return session.handle
    finally:
        session.close()


def _sessions_left_since(module: str, mark: int) -> int:
    """How many sessions opened on SoftHSM2 since ``mark`` (from :func:`_handle_mark`), by
    any path to it (the p11-kit proxy's sessions are SoftHSM2's too), are open still
    (SoftHSM2 reports no session count in C_GetTokenInfo): the handles between ``mark`` and
    a fresh mark that C_GetSessionInfo knows. (Probing a fixed range, 1 to 512, stopped
    seeing anything once the counter passed it.)"""
    import ctypes

    now = _handle_mark(module)
    assert now > mark, (f"SoftHSM2 gave handle {now} after {mark}: it no longer counts up, "
                        f"and this count relies on it")
    info = (ctypes.c_ulong * 4)()  # CK_SESSION_INFO: slot, state, flags, device error
    lib = ctypes.CDLL(module)
    return sum(lib.C_GetSessionInfo(ctypes.c_ulong(handle), ctypes.byref(info)) == 0
               for handle in range(mark + 1, now))


def test_the_session_count_sees_a_session_whatever_its_handle(hsm):
    """The count the leak tests below rely on sees a session left open however many
    handles SoftHSM2 gave before it (it gives each once: past 512, a fixed probe of 1 to
    512 counted nothing, and a leak passed unseen)."""
    from gpucrypt.keys.pkcs11 import _library

    token = _library(hsm["module"]).get_token(token_label=TOKEN)
    while _handle_mark(hsm["module"]) < 600:
        pass  # a long-running process, or a long test run: handles past any fixed range
    mark = _handle_mark(hsm["module"])
    left = token.open()
    try:
        assert left.handle > 512
        assert _sessions_left_since(hsm["module"], mark) == 1
    finally:
        left.close()
    assert _sessions_left_since(hsm["module"], mark) == 0


def test_pkcs11_a_refused_pin_leaves_no_session_open(hsm, monkeypatch):
    """python-pkcs11's token.open(user_pin=...) opens the session, then logs in: a PIN the
    token refused left that session open, one more per try (a retry loop, or a server
    handed a wrong PIN, ran the token out of sessions). None stays open now. (Each try is
    another wrong PIN: one the token refused already is not sent again.)"""
    dek = keys.generate_dek()
    ref = KeyReference(_hsm_uri(hsm))
    keys.seal_envelope(dek, ref)  # the module loaded, as in a long-running process
    mark = _handle_mark(hsm["module"])
    wrong = KeyReference(_hsm_uri(hsm, extra="&pin-source=env:WRONG_PIN"))
    for attempt in range(3):
        monkeypatch.setenv("WRONG_PIN", f"not-the-pin-leak-{attempt}")
        with pytest.raises(keys.KeyProviderError, match="the token refused the PIN: check"):
            keys.seal_envelope(dek, wrong)
    assert _sessions_left_since(hsm["module"], mark) == 0
    assert keys.open_envelope(keys.seal_envelope(dek, ref), ref) == dek
    assert _sessions_left_since(hsm["module"], mark) == 0


def _works_beside_the_applications_login(token, dek: bytes, ref) -> bytes:
    """An envelope sealed to ``ref`` and opened while the application is logged in to
    ``token`` (its own session, with the right PIN), which is still logged in after."""
    from pkcs11 import ObjectClass

    app = token.open(user_pin=PIN)
    try:
        envelope = keys.seal_envelope(dek, ref)
        assert keys.open_envelope(envelope, ref) == dek
        app.get_key(object_class=ObjectClass.SECRET_KEY, label="kek")  # still logged in
    finally:
        app.close()  # logs the application out
    return envelope


def test_pkcs11_works_beside_the_applications_own_login_and_undoes_only_its_own(hsm):
    """PKCS#11 logs in an application, not a session. An application already logged in to
    the token (using it for other work) got UserAlreadyLoggedIn from every gpucrypt call:
    gpucrypt now uses that login and leaves it in place (the application's session still
    sees private objects afterwards). A login gpucrypt made itself is logged out when its
    operation ends: a public session sees no private key after it."""
    from gpucrypt.keys.pkcs11 import _library

    token = _library(hsm["module"]).get_token(token_label=TOKEN)
    _logins_are_left_as_found(token, keys.generate_dek(), KeyReference(_hsm_uri(hsm)))


def test_pkcs11_serial_manufacturer_and_model_pick_the_token(hsm):
    """Two tokens with one label: the URI's serial says which, and the stanza id records
    it, so the twins are two recipients; without it the error says to add it. A stanza
    naming the same label and key is the key's whatever its serial says: files written
    before serials were recorded open with a URI that has one. A serial or manufacturer no
    token has is refused."""
    from pkcs11 import KeyType

    from gpucrypt.keys.pkcs11 import _library

    for _ in range(2):
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "twin", "--so-pin",
                        SO_PIN, "--pin", PIN], check=True, capture_output=True)
    lib = _library(hsm["module"])
    lib.reinitialize()  # a module sees tokens made after it started only then
    twins = list(lib.get_tokens(token_label="twin"))
    for token in twins:
        with token.open(user_pin=PIN, rw=True) as session:
            session.generate_key(KeyType.AES, 256, label="kek", store=True)
    first, second = (t.serial.decode() for t in twins)
    query = f"?module-path={hsm['module']}"
    dek = keys.generate_dek()
    with pytest.raises(keys.KeyProviderError, match="2 tokens match; add serial="):
        keys.seal_envelope(dek, KeyReference("pkcs11:token=twin;object=kek" + query))
    on_first = KeyReference(f"pkcs11:token=twin;object=kek;serial={first}" + query)
    on_second = KeyReference(f"pkcs11:token=twin;object=kek;serial={second}" + query)
    envelope = keys.seal_envelope(dek, on_first)
    assert keys.describe_envelope(envelope) == [f"pkcs11:token=twin;object=kek;serial={first}"]
    assert keys.open_envelope(envelope, on_first) == dek
    # the first token's stanza, by its serial, is not the second's to try
    with pytest.raises(keys.NoMatchingRecipient, match="no recipient in this file matches"):
        keys.open_envelope(envelope, on_second)
    both = keys.seal_envelope(dek, [on_first, on_second])  # an HSM and its twin
    assert len(keys.describe_envelope(both)) == 2
    assert keys.open_envelope(both, on_first) == keys.open_envelope(both, on_second) == dek
    # a third twin, offline, does not claim its siblings' stanzas (it would stop the search)
    offline = KeyReference("pkcs11:token=twin;object=kek;serial=OFFLINE" + query)
    assert keys.open_envelope(both, [offline, on_second]) == dek
    # a stanza as files written before serials were recorded name it: still the key's
    body = keys._envelope.decode(envelope)[0].body
    older = keys._envelope.encode([keys._envelope.Stanza(
        "key-ref", b"pkcs11:token=twin;object=kek", body)])
    assert keys.open_envelope(older, on_first) == dek
    with pytest.raises(keys.NoMatchingRecipient, match="refused to unwrap"):
        keys.open_envelope(older, on_second)  # claimed (no serial to tell), not unwrapped
    token = twins[0]  # manufacturer and model narrow the match too, and are recorded
    exact = KeyReference(f"pkcs11:token=twin;object=kek;serial={first};manufacturer="
                         f"{token.manufacturer_id};model={token.model}" + query)
    assert keys.open_envelope(keys.seal_envelope(dek, exact), exact) == dek
    assert keys.open_envelope(envelope, exact) == dek
    assert "manufacturer=" in exact.label and "model=" in exact.label
    for absent in (f"serial=NOT-{first}", f"serial={first};manufacturer=Nobody",
                   f"serial={first};model=Nothing"):
        with pytest.raises(keys.KeyProviderError, match="no token labelled 'twin' with that "):
            keys.seal_envelope(dek, KeyReference(f"pkcs11:token=twin;object=kek;{absent}" + query))


def test_pkcs11_unknown_key_and_token(hsm):
    with pytest.raises(keys.KeyNotFound, match="no such key"):
        keys.seal_envelope(keys.generate_dek(), KeyReference(_hsm_uri(hsm, "absent")))
    with pytest.raises(keys.KeyProviderError, match="no token labelled"):
        keys.seal_envelope(keys.generate_dek(), KeyReference(
            f"pkcs11:token=absent;object=kek?module-path={hsm['module']}"))


def test_pkcs11_a_reference_opens_only_what_its_kind_of_key_makes(hsm):
    """The wrapping code is the stanza body's first byte, chosen by whoever wrote the file.
    It chose the key's class too: a type=secret-key reference opened RSA-OAEP stanzas under
    a key pair of the same label, which anyone holding the (public) public key can make.
    A reference with a type opens that type's codes only; one without, those of the key
    wrap() would use (the secret key, where the label has one)."""
    from pkcs11 import KeyType

    from gpucrypt.keys.pkcs11 import _library

    with _library(hsm["module"]).get_token(token_label=TOKEN).open(user_pin=PIN, rw=True) as s:
        s.generate_key(KeyType.AES, 256, label="dual", store=True)
        public, _ = s.generate_keypair(KeyType.RSA, 2048, label="dual", store=True)
        from pkcs11 import Attribute
        rsa_public = rsa.RSAPublicNumbers(
            int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(public[Attribute.MODULUS], "big")).public_key()
    secret_ref, untyped, private_ref = (
        KeyReference(f"pkcs11:token={TOKEN};object=dual{t}?module-path={hsm['module']}")
        for t in (";type=secret-key", "", ";type=private"))
    stanza_id = b"pkcs11:token=gpucrypt-test;object=dual"
    forged_dek = os.urandom(32)
    oaep = bytes([5]) + rsa_public.encrypt(
        forged_dek, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    forged = keys._envelope.encode([keys.Stanza("key-ref", stanza_id, oaep)])
    for ref in (secret_ref, untyped):
        with pytest.raises(keys.NoMatchingRecipient,
                           match="names a secret \\(AES\\) key, which does not make rsa-oaep-sha1"):
            keys.open_envelope(forged, ref)
        dek = keys.generate_dek()  # what the reference wraps still opens
        envelope = keys.seal_envelope(dek, ref)
        assert keys._envelope.decode(envelope)[0].body[0] == 2
        assert keys.open_envelope(envelope, ref) == dek
        with pytest.raises(keys.NoMatchingRecipient, match="an RSA key pair, which does not make"):
            keys.open_envelope(envelope, private_ref)  # and the pair does not open AES stanzas
    assert keys.open_envelope(forged, private_ref) == forged_dek  # the pair's own kind
    # an RSA-OAEP body the token refuses: one message, whatever the token's reason (a
    # failure's class told apart decoding from padding errors: a Manger-style oracle)
    for body in (oaep[:1] + bytes(len(oaep) - 1), oaep[:1] + b"\xff" * (len(oaep) - 1),
                 oaep[:-1] + bytes([oaep[-1] ^ 1])):
        bad = keys._envelope.encode([keys.Stanza("key-ref", stanza_id, body)])
        with pytest.raises(keys.NoMatchingRecipient) as refused:
            keys.open_envelope(bad, private_ref)
        assert "refused to unwrap the data key: the envelope was altered" in str(refused.value)


#: the p11-kit proxy (p11-kit-proxy.so is a link to libp11-kit.so.0, which every Debian, Ubuntu,
#: Fedora and RHEL system has: GnuTLS needs it): one module for every token the system
#: registers with p11-kit, SoftHSM2's included (its package installs softhsm2.module)
_P11_KIT_PROXIES = tuple(f"{lib}/{name}" for name in ("p11-kit-proxy.so", "libp11-kit.so.0")
                         for lib in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                                     "/usr/lib64", "/usr/lib"))


@pytest.fixture()
def proxy(hsm):
    """The p11-kit proxy's path, reaching the module's SoftHSM2 token."""
    from gpucrypt.keys.pkcs11 import _library

    path = next((p for p in _P11_KIT_PROXIES if os.path.exists(p)), None)
    if path is None:
        pytest.skip("the p11-kit proxy is not installed (none of "
                    f"{', '.join(_P11_KIT_PROXIES)}): apt-get install p11-kit-modules")
    if not list(_library(path).get_tokens(token_label=TOKEN)):
        pytest.fail(f"the p11-kit proxy {path} does not reach SoftHSM2: SoftHSM2 is not "
                    f"registered with p11-kit (/usr/share/p11-kit/modules/softhsm2.module, "
                    f"which Debian's libsofthsm2 installs)", pytrace=False)
    return path


def _logins_are_left_as_found(token, dek: bytes, reference) -> None:
    """An application's own login (through ``token``) is used and kept by gpucrypt's
    operations on ``reference``; a login gpucrypt made for itself is undone after."""
    from pkcs11 import ObjectClass
    from pkcs11 import exceptions as p11e

    _works_beside_the_applications_login(token, dek, reference)
    public = token.open()
    try:
        assert keys.open_envelope(keys.seal_envelope(dek, reference), reference) == dek
        with pytest.raises(p11e.NoSuchKey):  # gpucrypt logged in, then out
            public.get_key(object_class=ObjectClass.SECRET_KEY, label="kek")
    finally:
        public.close()


def test_pkcs11_through_the_p11_kit_proxy(hsm, proxy, monkeypatch):
    """The p11-kit proxy makes a new module instance for every C_GetFunctionList call: a
    C_Login through the list gpucrypt got itself went to an instance that had never been
    initialised (CKR_CRYPTOKI_NOT_INITIALIZED), and every call failed. The login goes to
    python-pkcs11's own instance now: the proxy wraps and unwraps, for files the module
    itself opens, with what gpucrypt's own login does (a refused PIN leaves no session, the
    application's login is used and left, gpucrypt's own is undone)."""
    from pkcs11 import ObjectClass
    from pkcs11 import exceptions as p11e

    from gpucrypt.keys.pkcs11 import _library

    direct, proxied = KeyReference(_hsm_uri(hsm)), KeyReference(
        f"pkcs11:token={TOKEN};object=kek?module-path={proxy}")
    rsa_proxied = KeyReference(f"pkcs11:token={TOKEN};object=rsa?module-path={proxy}")
    dek = keys.generate_dek()
    for ref in (proxied, rsa_proxied):
        assert keys.open_envelope(keys.seal_envelope(dek, ref), ref) == dek
    assert keys.open_envelope(keys.seal_envelope(dek, proxied), direct) == dek  # one token
    assert keys.open_envelope(keys.seal_envelope(dek, direct), proxied) == dek
    mark = _handle_mark(hsm["module"])
    wrong = KeyReference(f"pkcs11:token={TOKEN};object=kek?module-path={proxy}"
                         f"&pin-source=env:WRONG_PIN")
    for attempt in range(3):  # each a PIN not refused yet, so that each reaches C_Login
        monkeypatch.setenv("WRONG_PIN", f"not-the-pin-proxy-{attempt}")
        with pytest.raises(keys.KeyProviderError, match="the token refused the PIN: check"):
            keys.seal_envelope(dek, wrong)
    assert _sessions_left_since(hsm["module"], mark) == 0
    _logins_are_left_as_found(_library(proxy).get_token(token_label=TOKEN), dek, proxied)
    assert _sessions_left_since(hsm["module"], mark) == 0


def test_pkcs11_login_goes_to_the_instance_python_pkcs11_uses(hsm, proxy):
    """The function list gpucrypt reads from python-pkcs11's objects is the module's own
    where the module has one instance (SoftHSM2: what its C_GetFunctionList gives), and
    through the proxy the one that knows python-pkcs11's sessions, which the list the
    proxy's C_GetFunctionList gives gpucrypt does not (CKR 0x190, now named)."""
    from gpucrypt.keys import pkcs11 as p11

    for path in (hsm["module"], proxy):
        session = p11._library(path).get_token(token_label=TOKEN).open()
        try:
            own, module = p11._pkcs11_function_list(session), p11._module_function_list(path)
            assert own and module
            assert (own == module) == (path == hsm["module"])
            assert p11._Calls(own).knows(session.handle)
            assert p11._Calls(module).knows(session.handle) == (path == hsm["module"])
            assert p11._session_calls(path, session) is not None
        finally:
            session.close()
    message = str(p11.Pkcs11Key(TOKEN, "kek")._login_error(0x190))
    assert "CryptokiNotInitialized" in message


def _refused_leaving_no_session(module: str, dek: bytes, reference, token, monkeypatch) -> None:
    """Every operation on ``reference`` is refused for want of the session's module instance,
    with a wrong PIN and with the application logged in, and leaves no session open."""
    from gpucrypt.keys import pkcs11 as p11

    sent = []
    monkeypatch.setattr(p11, "_login", lambda *args: sent.append(args))
    unreachable = ("cannot log in through the PKCS#11 module .*: the module instance "
                   "python-pkcs11 opened the session on cannot be reached \\(for example the "
                   "p11-kit proxy with a python-pkcs11 other than 0.10\\).*no PIN was sent")
    mark = _handle_mark(module)
    for attempt in range(3):  # python-pkcs11's login left one session per refused PIN
        monkeypatch.setenv("GPUCRYPT_PKCS11_PIN", f"not-the-pin-fallback-{attempt}")
        with pytest.raises(keys.KeyProviderError, match=unreachable):
            keys.seal_envelope(dek, reference)
    assert _sessions_left_since(module, mark) == 0
    monkeypatch.setenv("GPUCRYPT_PKCS11_PIN", PIN)
    app = token.open(user_pin=PIN)  # ... and one per operation beside the application's login
    try:
        mark = _handle_mark(module)
        for _ in range(3):
            with pytest.raises(keys.KeyProviderError, match=unreachable):
                keys.seal_envelope(dek, reference)
        assert _sessions_left_since(module, mark) == 0
    finally:
        app.close()
    assert sent == []  # refused before any login


def test_pkcs11_where_gpucrypt_cannot_reach_the_sessions_instance_it_refuses_and_leaks_nothing(
        hsm, monkeypatch):
    """Where no function list gpucrypt can reach knows the session (a module making an
    instance per caller, as the p11-kit proxy does, with a python-pkcs11 not laid out as
    0.10), python-pkcs11's own login did the work: token.open(user_pin=) raises on a
    refused PIN before anything holds the session's handle, so each refused PIN left a
    session open, and so did each operation of an application already logged in
    (UserAlreadyLoggedIn), until the process exits. Refused now, saying what to do, with no
    PIN sent and no session left (counted as the reviewer's reproducer counts them)."""
    from gpucrypt.keys import pkcs11 as p11

    monkeypatch.setattr(p11, "_session_calls", lambda path, session: None)
    token = p11._library(hsm["module"]).get_token(token_label=TOKEN)
    _refused_leaving_no_session(hsm["module"], keys.generate_dek(),
                                KeyReference(_hsm_uri(hsm)), token, monkeypatch)


def test_pkcs11_through_the_proxy_without_python_pkcs11s_list_is_refused(hsm, proxy, monkeypatch):
    """The same through the real p11-kit proxy, where python-pkcs11's function list cannot
    be read (a python-pkcs11 laid out otherwise than 0.10): the proxy's C_GetFunctionList
    gives gpucrypt an instance that knows no session of python-pkcs11's."""
    from gpucrypt.keys import pkcs11 as p11

    monkeypatch.setattr(p11, "_pkcs11_function_list", lambda session: 0)
    proxied = KeyReference(f"pkcs11:token={TOKEN};object=kek?module-path={proxy}")
    _refused_leaving_no_session(hsm["module"], keys.generate_dek(), proxied,
                                p11._library(proxy).get_token(token_label=TOKEN), monkeypatch)


def _pins_sent(monkeypatch) -> list:
    """The PINs gpucrypt's C_Login sends from now on, in order (each still sent)."""
    from gpucrypt.keys import pkcs11 as p11

    sent = []
    login = p11._login
    monkeypatch.setattr(p11, "_login", lambda calls, session, pin: (sent.append(pin),
                                                                    login(calls, session, pin))[1])
    return sent


def test_pkcs11_a_pin_the_token_refused_is_not_sent_again(hsm, monkeypatch):
    """A wrong PIN went to the token once per operation (per file of a folder decrypt, with
    a stale mounted secret): smart cards and many HSMs lock the user PIN after 3 tries.
    The token's refusal is remembered per module and token, as a keyed digest, never the
    PIN: the same PIN is refused without C_Login, whatever reference on that token asks,
    and the source is read again each time, so a fixed source works at once."""
    from gpucrypt.keys import pkcs11 as p11

    sent = _pins_sent(monkeypatch)
    wrong = "not-the-pin-remembered"
    monkeypatch.setenv("GPUCRYPT_PKCS11_PIN", wrong)
    dek, ref = keys.generate_dek(), KeyReference(_hsm_uri(hsm))
    mark = _handle_mark(hsm["module"])
    with pytest.raises(keys.KeyProviderError, match="the token refused the PIN: check the PIN "
                                                    "source"):
        keys.seal_envelope(dek, ref)
    real = KeyReference(f"pkcs11:token={TOKEN};object=kek?module-path="
                        f"{os.path.realpath(hsm['module'])}")  # the module by another spelling
    for other in (ref, KeyReference(_hsm_uri(hsm, "rsa")), real):  # the same token
        for _ in range(2):
            with pytest.raises(keys.KeyProviderError, match="refused the PIN before, in this "
                                                            "process, so it is not sent again .*"
                                                            "fix the PIN source \\(env:"
                                                            "GPUCRYPT_PKCS11_PIN\\)") as info:
                keys.seal_envelope(dek, other)
            assert wrong not in str(info.value)
    assert sent == [wrong]  # once
    assert _sessions_left_since(hsm["module"], mark) == 0
    remembered = set().union(*p11._refused_pins.values())
    assert remembered and all(len(d) == 32 and wrong.encode() not in d for d in remembered)
    # keyed by a per-process secret: an unkeyed digest of a short PIN is a table look-up
    assert hmac.digest(p11._PIN_DIGEST_KEY, wrong.encode(), "sha256") in remembered
    assert hashlib.sha256(wrong.encode()).digest() not in remembered
    monkeypatch.setenv("GPUCRYPT_PKCS11_PIN", PIN)  # the source fixed: read again, works
    envelope = keys.seal_envelope(dek, ref)
    assert keys.open_envelope(envelope, ref) == dek and sent[-1] == PIN
    monkeypatch.setenv("GPUCRYPT_PKCS11_PIN", wrong)  # the stale one back: still not sent
    with pytest.raises(keys.KeyProviderError, match="refused the PIN before"):
        keys.open_envelope(envelope, ref)
    assert sent.count(wrong) == 1


def test_pkcs11_two_spellings_of_one_module_are_one_module(hsm, tmp_path):
    """python-pkcs11 keeps modules by the name given: a second spelling of one file (on
    Debian, /usr/lib/softhsm/libsofthsm2.so, gpucrypt's first default, is a link to the
    multiarch path) called C_Initialize again, and the module's "already initialized" made
    the second reference fail. gpucrypt knows a module by its real path now, takes the one
    python-pkcs11 holds under another name (an application's own), and enters each name it
    was given in python-pkcs11's table (an application's pkcs11.lib() with it afterwards)."""
    import pkcs11

    from gpucrypt.keys.pkcs11 import _library

    link = tmp_path / "libsofthsm2.so"
    link.symlink_to(os.path.realpath(hsm["module"]))
    dek = keys.generate_dek()
    envelope = keys.seal_envelope(dek, KeyReference(_hsm_uri(hsm)))
    via_link = KeyReference(f"pkcs11:token={TOKEN};object=kek?module-path={link}")
    assert keys.open_envelope(envelope, via_link) == dek
    assert _library(str(link)) is _library(hsm["module"])
    assert pkcs11.lib(str(link)) is _library(hsm["module"])  # the application's, after
    # the application loaded the module itself, through the link, before gpucrypt did
    script = ("import sys, pkcs11\n"
              "pkcs11.lib(sys.argv[1])\n"
              "from gpucrypt import keys\n"
              "ref = keys.KeyReference(sys.argv[2])\n"
              "dek = keys.generate_dek()\n"
              "assert keys.open_envelope(keys.seal_envelope(dek, ref), ref) == dek\n"
              "print('opened')\n")
    done = subprocess.run([sys.executable, "-c", script, str(link),
                           f"pkcs11:token={TOKEN};object=kek?module-path="
                           f"{os.path.realpath(hsm['module'])}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "opened\n", done.stderr[-2000:]


_APP_UNLOADS = """\
import sys, pkcs11
from gpucrypt import keys
token, link, real, then = sys.argv[1:]
ref = keys.KeyReference(f"pkcs11:token={token};object=kek?module-path={link}")
dek = keys.generate_dek()
envelope = keys.seal_envelope(dek, ref)
pkcs11.unload(link)  # the application drops the module it configured
if then == "gpucrypt":
    assert keys.open_envelope(envelope, ref) == dek
else:
    assert token in [t.label for t in pkcs11.lib(real if then == "real" else link).get_tokens()]
print("ok")
"""


@pytest.mark.parametrize("then", ["real", "link", "gpucrypt"])
def test_pkcs11_a_module_the_application_unloads_is_not_handed_out_closed(hsm, tmp_path, then):
    """gpucrypt enters both spellings of a module in python-pkcs11's table; unload() under
    one removed that name only and closed the module: the other, or gpucrypt's own cache,
    handed out the closed module, and its next call crashed the process (a review's
    p2_unload.py, exit 139). Every name goes with it now, and gpucrypt loads it again."""
    link = tmp_path / "libsofthsm2.so"
    link.symlink_to(os.path.realpath(hsm["module"]))
    done = subprocess.run([sys.executable, "-c", _APP_UNLOADS, TOKEN, str(link),
                           os.path.realpath(hsm["module"]), then],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", (done.returncode, done.stderr[-2000:])


_APP_AFTER_GPUCRYPT = """\
import os, sys, pkcs11
from gpucrypt import keys
from gpucrypt.keys import pkcs11 as p11
token, given, spelling = sys.argv[1:]  # given: the URI's module-path, if any
ref = keys.KeyReference(f"pkcs11:token={token};object=kek"
                        + (f"?module-path={given}" if given else ""))
dek = keys.generate_dek()
assert keys.open_envelope(keys.seal_envelope(dek, ref), ref) == dek
ours = p11._library(spelling)
assert ours.so == spelling  # loaded under the name given
for name in (spelling, os.path.realpath(spelling)):  # the application, configured so
    lib = pkcs11.lib(name)
    assert lib is ours and lib.get_token(token_label=token).label == token
print("one module")
"""


@pytest.mark.parametrize("given", ["link", "default"])
def test_pkcs11_an_application_loading_the_module_after_gpucrypt_gets_the_same_module(
        given, hsm, tmp_path):
    """An application that loads the module itself after gpucrypt did, with the spelling it
    gave gpucrypt (a module-path that is a link, or no module-path: gpucrypt's first
    default, /usr/lib/softhsm/libsofthsm2.so, is a link on Debian), got "already
    initialized" from python-pkcs11, which keeps modules by the name given: gpucrypt had
    loaded the real path only (the reviewer's repro_app_loads_after.py). gpucrypt loads
    the name given now, and enters the real path too; in a fresh process, as the
    application's would be."""
    from gpucrypt.keys.pkcs11 import DEFAULT_MODULES

    if given == "link":
        link = tmp_path / "libsofthsm2.so"
        link.symlink_to(os.path.realpath(hsm["module"]))
        given = spelling = str(link)
    else:  # the application names the default as it is spelled (SoftHSM2's usual path)
        given, spelling = "", next(m for m in DEFAULT_MODULES if os.path.exists(m))
        if not os.path.islink(spelling):
            pytest.skip(f"{spelling}, gpucrypt's default here, is no symbolic link")
    environ = {k: v for k, v in os.environ.items() if k != "GPUCRYPT_PKCS11_MODULE"}
    done = subprocess.run([sys.executable, "-c", _APP_AFTER_GPUCRYPT, TOKEN, given, spelling],
                          capture_output=True, text=True, timeout=120, env=environ)
    assert done.returncode == 0 and done.stdout == "one module\n", done.stderr[-2000:]


def test_pkcs11_a_remembered_refused_pin_is_not_needed_where_the_application_is_logged_in(
        hsm, monkeypatch):
    """A PIN the token refused is not sent again; but where the application is logged in
    to the token already, no PIN is needed (C_Login would answer USER_ALREADY_LOGGED_IN),
    and the operation went ahead at HEAD: it was refused from memory (the reviewer's
    repro_pin_memory.py, case b). Now it goes ahead on the application's login, sending no
    PIN and leaving that login; without it, the remembered PIN is still not sent."""
    from gpucrypt.keys import pkcs11 as p11

    sent = _pins_sent(monkeypatch)
    stale = "not-the-pin-app-logged-in"
    monkeypatch.setenv("GPUCRYPT_PKCS11_PIN", stale)
    dek, ref = keys.generate_dek(), KeyReference(_hsm_uri(hsm))
    with pytest.raises(keys.KeyProviderError, match="the token refused the PIN: check"):
        keys.seal_envelope(dek, ref)
    assert sent == [stale]
    mark = _handle_mark(hsm["module"])
    token = p11._library(hsm["module"]).get_token(token_label=TOKEN)
    envelope = _works_beside_the_applications_login(token, dek, ref)
    assert sent == [stale]  # no PIN sent: the application's login served
    with pytest.raises(keys.KeyProviderError, match="refused the PIN before"):
        keys.open_envelope(envelope, ref)
    assert sent == [stale] and _sessions_left_since(hsm["module"], mark) == 0


def test_pkcs11_a_refused_pin_is_remembered_per_token_not_per_label(hsm, monkeypatch):
    """Two tokens of one label (an HSM and its twin, told apart by serial) with different
    PINs: the PIN one of them refused is the other's, and is sent to it."""
    from pkcs11 import KeyType

    from gpucrypt.keys.pkcs11 import _library

    second_pin = "pin-of-the-second-twin"
    lib, twins = _library(hsm["module"]), {}
    for pin in (PIN, second_pin):
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "pin-twin",
                        "--so-pin", SO_PIN, "--pin", pin], check=True, capture_output=True)
        lib.reinitialize()  # a module sees tokens made after it started only then
        [token] = [t for t in lib.get_tokens(token_label="pin-twin")
                   if t.serial.decode() not in twins.values()]
        with token.open(user_pin=pin, rw=True) as session:
            session.generate_key(KeyType.AES, 256, label="kek", store=True)
        twins[pin] = token.serial.decode()
    query = f"?module-path={hsm['module']}&pin-source=env:TWIN_PIN"
    monkeypatch.setenv("TWIN_PIN", second_pin)
    dek = keys.generate_dek()
    first = KeyReference(f"pkcs11:token=pin-twin;object=kek;serial={twins[PIN]}" + query)
    second = KeyReference(f"pkcs11:token=pin-twin;object=kek;serial={twins[second_pin]}"
                          + query)
    with pytest.raises(keys.KeyProviderError, match="the token refused the PIN: check"):
        keys.seal_envelope(dek, first)
    assert keys.open_envelope(keys.seal_envelope(dek, second), second) == dek
    with pytest.raises(keys.KeyProviderError, match="refused the PIN before"):
        keys.seal_envelope(dek, first)


@pytest.mark.parametrize("module", ["lib/evil.so", "./evil.so", "evil.so"])
def test_a_relative_module_path_is_refused(module, hsm, tmp_path, monkeypatch):
    """A relative module-path (or $GPUCRYPT_PKCS11_MODULE) was loaded from the current
    folder of whichever process used the reference (a Ray worker's, a DCP rank's), running
    that library's code there: refused as a relative pin-source is, in the driver for a
    URI, before anything is loaded for the variable and for Pkcs11Key."""
    from gpucrypt.keys import pkcs11 as p11

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lib").mkdir()
    (tmp_path / module).write_bytes(b"not a library")  # what the folder holds under that name
    refusal = "names a relative path: give an absolute one"
    with pytest.raises(keys.KeysetError, match=f"module-path {refusal} \\(module-path=/path"):
        KeyReference(f"pkcs11:token={TOKEN};object=kek?module-path={module}")
    loaded = dict(p11._libraries)
    monkeypatch.setenv("GPUCRYPT_PKCS11_MODULE", module)
    with pytest.raises(keys.KeysetError, match=f"GPUCRYPT_PKCS11_MODULE {refusal}"):
        keys.seal_envelope(keys.generate_dek(), KeyReference(f"pkcs11:token={TOKEN};object=kek"))
    with pytest.raises(keys.KeysetError, match=f"module-path {refusal}"):
        p11.Pkcs11Key(TOKEN, "kek", module_path=module).wrap(keys.generate_dek(), {})
    assert p11._libraries == loaded  # nothing was loaded
    monkeypatch.setenv("GPUCRYPT_PKCS11_MODULE", str(tmp_path / module))  # absolute: tried
    with pytest.raises(keys.KeyProviderError, match="cannot load the PKCS#11 module"):
        keys.seal_envelope(keys.generate_dek(), KeyReference(f"pkcs11:token={TOKEN};object=kek"))


def test_a_provider_names_a_stanza_it_does_not_own_escaped():
    """A stanza's id comes from the file's header, unauthenticated until a key opens it: a
    PKCS#11 or AWS KMS reference asked to unwrap one it does not own named it as it was,
    a terminal's escape sequences and line breaks included."""
    from gpucrypt.keys.awskms import AwsKmsKey
    from gpucrypt.keys.pkcs11 import Pkcs11Key

    forged = "pkcs11:token=x;object=y\x1b]0;pwned\x07\r\ngpucrypt: all good"
    for key in (Pkcs11Key(TOKEN, "kek"),
                AwsKmsKey("arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-"
                          "1234567890ab")):
        with pytest.raises(keys.KeyNotFound) as refused:
            key.unwrap(forged, b"\x01", {})
        assert str(refused.value).isprintable(), str(refused.value)
        assert "y\\x1b]0;pwned\\x07\\r\\ngpucrypt" in str(refused.value)


# ------------------------------------------------------------------------------------ AWS KMS


def test_kms_file_roundtrip_and_alias(kms, plain, tmp_path):
    arn = kms.new_key(alias="alias/gpucrypt-roundtrip")
    enc = tmp_path / "model.gc"
    result = keys.encrypt_file(plain, enc, recipients=KeyReference(kms.uri("alias/gpucrypt-roundtrip")),
                               device="cpu")
    assert result["recipients"] == ["awskms://" + arn]  # the stanza names the key by its ARN
    _decrypts_to(enc, plain, tmp_path, identities=KeyReference(kms.uri(arn)))
    _decrypts_to(enc, plain, tmp_path, identities=KeyReference(kms.uri("alias/gpucrypt-roundtrip")))
    other = KeyReference(kms.uri(kms.new_key()))
    with pytest.raises(keys.NoMatchingRecipient):
        keys.decrypt_file(enc, tmp_path / "x", identities=other, device="cpu")


def test_kms_context_is_the_files_salt(kms, plain, tmp_path):
    """A KMS-wrapped data key moved into another file's header does not unwrap: KMS checks
    the encryption context, which is that file's salt."""
    ref = KeyReference(kms.uri(kms.new_key()))
    enc = tmp_path / "a.gc"
    keys.encrypt_file(plain, enc, recipients=ref, device="cpu")
    header = stream.read_header(str(enc))
    blob = keys._envelope.decode(header.envelope)[0].body
    answer = kms.client.decrypt(CiphertextBlob=blob, EncryptionContext=file_context(header.salt))
    assert len(answer["Plaintext"]) == keys.DEK_SIZE  # bound to exactly this context
    moved = tmp_path / "b.gc"  # another file (its own key and salt) carrying a's envelope
    stream.encrypt(plain.read_bytes(), str(moved), keys.generate_dek(), envelope=header.envelope,
                   device="cpu")
    with pytest.raises(keys.NoMatchingRecipient, match="encryption context does not match"):
        keys.decrypt_file(moved, tmp_path / "x", identities=ref, device="cpu")
    assert not (tmp_path / "x").exists()


def test_kms_cli_failures_are_one_line_exit_1(kms, plain, tmp_path, capsys):
    arn = kms.new_key()
    enc = tmp_path / "a.gc"
    assert _cli(capsys, "encrypt", plain, enc, "--kek", kms.uri(arn), "--device", "cpu")[0] == 0
    code, _, err = _cli(capsys, "decrypt", enc, tmp_path / "a.out", "--kek", kms.uri(arn))
    assert code == 0 and (tmp_path / "a.out").read_bytes() == plain.read_bytes()

    header = stream.read_header(str(enc))  # wrong context: the envelope moved into another file
    moved = tmp_path / "b.gc"
    stream.encrypt(b"other", str(moved), keys.generate_dek(), envelope=header.envelope, device="cpu")
    code, _, err = _cli(capsys, "decrypt", moved, tmp_path / "b.out", "--kek", kms.uri(arn))
    assert code == 1 and err.count("\n") == 1 and "encryption context does not match" in err

    kms.client.disable_key(KeyId=arn.rsplit("/", 1)[1])
    try:
        code, _, err = _cli(capsys, "decrypt", enc, tmp_path / "c.out", "--kek", kms.uri(arn))
        assert code == 1 and err.count("\n") == 1 and "is disabled: enable it" in err
        code, _, err = _cli(capsys, "encrypt", plain, tmp_path / "d.gc", "--kek", kms.uri(arn))
        assert code == 1 and err.count("\n") == 1 and "is disabled" in err
    finally:
        kms.client.enable_key(KeyId=arn.rsplit("/", 1)[1])

    dead = f"awskms://{arn}?endpoint=http://127.0.0.1:{_free_port()}"
    code, _, err = _cli(capsys, "decrypt", enc, tmp_path / "e.out", "--kek", dead)
    assert code == 1 and err.count("\n") == 1 and "could not be reached" in err
    assert not any((tmp_path / f"{n}.out").exists() for n in "bce")
    code, _, err = _cli(capsys, "decrypt", enc, tmp_path / "f.out", "--kek", "awskms://nonsense")
    assert code == 2 and "ARN, alias/NAME or a key id" in err


def test_kms_a_stanza_id_that_is_no_arn_is_no_key_of_ours(env, tmp_path, capsys):
    """A key-ref stanza whose id starts awskms:// but holds no key ARN (a damaged or forged
    file) is no KMS key's: opening says no recipient matches (exit 1, one line) where it
    raised a bare IndexError (a traceback on the command line). Nothing asks KMS: the
    endpoint is a closed port, which any call would report as unreachable."""
    from gpucrypt.keys.awskms import AwsKmsKey, _region_of

    dead = f"http://127.0.0.1:{_free_port()}"
    refs = [KeyReference(f"awskms:///alias/models?endpoint={dead}"),  # region: the environment's
            KeyReference(f"awskms:///alias/models?region=eu-west-1&endpoint={dead}"),
            KeyReference("awskms://arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-"
                         f"56ef-1234567890ab?endpoint={dead}")]
    body = b"\x01" * 40
    for damaged in ("awskms://arn:x", "awskms://arn:aws:kms:us-east-1", "awskms://",
                    "awskms://alias/models", "awskms://arn:aws:kms:us-east-1:1:key/k"):
        envelope = keys._envelope.encode([keys.Stanza("key-ref", damaged.encode(), body)])
        for ref in refs:
            assert not ref.owns(damaged), (damaged, ref)
            with pytest.raises(keys.NoMatchingRecipient, match="no recipient in this file matches"):
                keys.open_envelope(envelope, ref)
            with pytest.raises(keys.KeyNotFound, match="is not the AWS KMS key"):
                ref.unwrap(damaged, body, {})
    with pytest.raises(keys.KeyNotFound, match="'arn:x' is not an AWS KMS key ARN"):
        _region_of("arn:x")
    with pytest.raises(keys.KeysetError, match="is not an AWS KMS key ARN"):
        AwsKmsKey("arn:x")
    damaged_file = tmp_path / "damaged.gc"
    envelope = keys._envelope.encode([keys.Stanza("key-ref", b"awskms://arn:x", body)])
    stream.encrypt(b"data", str(damaged_file), keys.generate_dek(), envelope=envelope, device="cpu")
    code, _, err = _cli(capsys, "decrypt", damaged_file, tmp_path / "out", "--kek", refs[0].uri)
    assert code == 1 and err.count("\n") == 1 and "no recipient in this file matches" in err, err
    assert not (tmp_path / "out").exists()


def _kms_calls(monkeypatch, deny_describe: bool) -> list:
    """Record every KMS call gpucrypt makes from now on as (region, operation, KeyId), and
    refuse DescribeKey as IAM does (a ClientError AccessDeniedException, raised by a
    botocore hook before the request is sent) when ``deny_describe``. Fresh clients, so
    the hooks leave with the test."""
    import botocore.exceptions

    from gpucrypt.keys import awskms

    calls: list = []
    real = getattr(awskms._client, "unhooked", awskms._client)  # called twice in one test
    monkeypatch.setattr(awskms, "_clients", {})

    def hooked(profile, region, endpoint):
        client = real(profile, region, endpoint)
        if not getattr(client, "_test_hooked", False):
            def record(model, params, **_):
                sent = json.loads(params["body"] or b"{}")  # the request as it goes out
                calls.append((client.meta.region_name, model.name, sent.get("KeyId")))
                if deny_describe and model.name == "DescribeKey":
                    raise botocore.exceptions.ClientError(
                        {"Error": {"Code": "AccessDeniedException",
                                   "Message": "User: arn:aws:sts::111122223333:assumed-role/r "
                                              "is not authorized to perform: kms:DescribeKey"}},
                        "DescribeKey")
            client.meta.events.register("before-call.kms.*", record)
            client._test_hooked = True
        return client

    hooked.unhooked = real
    monkeypatch.setattr(awskms, "_client", hooked)
    return calls


def test_kms_an_alias_sends_nothing_where_a_stanza_says(kms, plain, tmp_path, monkeypatch):
    """docs/KEYS.md, "What an awskms:// reference opens". A reference by alias whose role may not
    DescribeKey cannot tell which key the alias names: it owned every ARN, and sent
    DescribeKey and Decrypt to the stanza's region naming the stanza's key, with the
    reader's credentials; a file an attacker made under its own key opened. Now every
    request goes to the configured region and names the alias: an attacker's key in
    another region is not asked at all, one in the same region is refused by KMS (the
    ciphertext is not the alias's key's), and the reader's own file still opens, in one
    DescribeKey and one Decrypt."""
    import boto3

    alias_name = "alias/gpucrypt-deputy"
    kms.new_key(alias=alias_name)
    near = kms.new_key()  # the attacker's keys: in the reader's region, and in another
    far = boto3.client("kms", endpoint_url=kms.endpoint, region_name="eu-west-1").create_key(
        )["KeyMetadata"]["Arn"]
    files = {}
    for name, uri in (("mine", kms.uri(alias_name)), ("near", kms.uri(near)),
                      ("far", kms.uri(far))):
        files[name] = tmp_path / f"{name}.gc"
        keys.encrypt_file(plain, files[name], recipients=KeyReference(uri), device="cpu")

    calls = _kms_calls(monkeypatch, deny_describe=True)
    for name, expected in (("far", []), ("near", ["DescribeKey", "Decrypt", "Decrypt"])):
        calls.clear()
        with pytest.raises(keys.NoMatchingRecipient):
            keys.decrypt_file(files[name], tmp_path / "x", identities=KeyReference(
                kms.uri(alias_name)), device="cpu")
        assert not (tmp_path / "x").exists()
        # nothing to another region, nothing naming the attacker's key; for "near", one
        # Decrypt per context (the file's, then none), each refused by KMS
        assert [op for _, op, _ in calls] == expected, calls
        assert all(region == "us-east-1" and key == alias_name for region, _, key in calls), calls
    calls.clear()
    _decrypts_to(files["mine"], plain, tmp_path, identities=KeyReference(kms.uri(alias_name)))
    assert [op for _, op, _ in calls] == ["DescribeKey", "Decrypt"], calls  # not 4 calls
    # a stanza naming another key than the one KMS used is refused, not opened
    dek = keys.generate_dek()
    [stanza] = keys._envelope.decode(keys.seal_envelope(dek, KeyReference(kms.uri(alias_name))))
    relabelled = keys._envelope.encode([keys.Stanza("key-ref", f"awskms://{near}".encode(),
                                                    stanza.body)])
    with pytest.raises(keys.NoMatchingRecipient, match="names another key than the one that "
                                                       "wrapped it"):
        keys.open_envelope(relabelled, KeyReference(kms.uri(alias_name)))

    # allowed to DescribeKey: the attacker's key in the reader's region is told apart by
    # its ARN, without a Decrypt
    calls = _kms_calls(monkeypatch, deny_describe=False)
    with pytest.raises(keys.NoMatchingRecipient):
        keys.decrypt_file(files["near"], tmp_path / "x", identities=KeyReference(
            kms.uri(alias_name)), device="cpu")
    assert [op for _, op, _ in calls] == ["DescribeKey"], calls


def test_kms_describe_denied_is_told_by_the_error_code(kms, monkeypatch):
    """A DescribeKey refused with AccessDeniedException skips the state check (whatever its
    message says: IAM's reads "is not authorized to perform"); any other refusal stops."""
    from gpucrypt.keys.awskms import AwsKmsKey

    arn = kms.new_key()
    calls = _kms_calls(monkeypatch, deny_describe=True)
    dek = keys.generate_dek()
    key = AwsKmsKey(arn, endpoint=kms.endpoint)
    stanza_id, body = key.wrap(dek, {})
    assert key.unwrap(stanza_id, body, {}) == dek
    assert [op for _, op, _ in calls] == ["DescribeKey", "Encrypt", "Decrypt"], calls


# ------------------------------------------------------------------------------------ between providers


def test_model_files_bind_their_salt_too(kms, tmp_path, capsys):
    """encrypt-model --kek draws the model header's salt first, as encrypt does, so that KMS
    (which checks the context) opens what it wrapped."""
    import numpy
    from safetensors.numpy import save_file

    save_file({"w": numpy.arange(300, dtype=numpy.float32)}, str(tmp_path / "m.safetensors"))
    uri = kms.uri(kms.new_key())
    assert _cli(capsys, "encrypt-model", tmp_path / "m.safetensors", tmp_path / "m.gc",
                "--kek", uri)[0] == 0
    code, _, err = _cli(capsys, "decrypt-model", tmp_path / "m.gc", tmp_path / "back.safetensors",
                        "--kek", uri)
    assert code == 0, err
    assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    # the library opens it too, with the key's reference: bound to the file's salt as the
    # command line sealed it (the library opened without that context and was refused)
    from gpucrypt import models

    with models.safe_open(tmp_path / "m.gc", "np", identity=KeyReference(uri)) as f:
        assert numpy.array_equal(f.get_tensor("w"), numpy.arange(300, dtype=numpy.float32))
    # and an envelope that gpucrypt.keys.seal_envelope made with no context, which
    # save_encrypted takes as it is
    dek = keys.generate_dek()
    models.save_encrypted({"w": numpy.arange(5.0)}, tmp_path / "lib.gc", dek,
                          envelope=keys.seal_envelope(dek, KeyReference(uri)))
    with models.safe_open(tmp_path / "lib.gc", "np", identity=KeyReference(uri)) as f:
        assert numpy.array_equal(f.get_tensor("w"), numpy.arange(5.0))
    # ... which the command line decrypts and rekeys too, as every other reader does
    code, _, err = _cli(capsys, "decrypt-model", tmp_path / "lib.gc", tmp_path / "lib.safetensors",
                        "--kek", uri)
    assert code == 0, err
    other = keys.WrappingKey("other", os.urandom(32))
    keys.rekey_file(tmp_path / "lib.gc", recipients=[other], identities=[KeyReference(uri)])
    with models.safe_open(tmp_path / "lib.gc", "np", identity=other) as f:
        assert numpy.array_equal(f.get_tensor("w"), numpy.arange(5.0))
    # save_encrypted(recipients=) binds the wrapped key to the file's salt, as the command
    # line does: KMS opens it under that context, and the command line decrypts it
    models.save_encrypted({"w": numpy.arange(7.0)}, tmp_path / "bound.gc",
                          recipients=KeyReference(uri), device="cpu")
    header = models.read_header(tmp_path / "bound.gc")
    blob = keys._envelope.decode(header.envelope)[0].body
    answer = kms.client.decrypt(CiphertextBlob=blob, EncryptionContext=file_context(header.salt))
    assert len(answer["Plaintext"]) == keys.DEK_SIZE
    code, _, err = _cli(capsys, "decrypt-model", tmp_path / "bound.gc",
                        tmp_path / "bound.safetensors", "--kek", uri)
    assert code == 0, err
    assert numpy.array_equal(models.load_encrypted(tmp_path / "bound.gc", identity=KeyReference(uri),
                                                   framework="numpy", device="cpu")["w"],
                             numpy.arange(7.0))


def test_a_file_envelope_is_tried_without_its_context_only_for_key_references(monkeypatch):
    """Opening a file's envelope with its context, then without, is for key references
    alone (stanzas sealed before contexts, or by seal_envelope's default): a passphrase
    or a wrapping key takes no context, so their failure is not tried twice (scrypt run
    twice, every failure audited twice)."""
    from gpucrypt.keys import passphrase, recipients

    monkeypatch.setattr(passphrase, "MIN_LOG_N", 10)
    calls = []
    real = recipients.open_envelope

    def counted(*args, **kwargs):
        calls.append(kwargs.get("context"))
        return real(*args, **kwargs)

    monkeypatch.setattr(recipients, "open_envelope", counted)
    dek, salt = keys.generate_dek(), os.urandom(16)
    for sealed_for, opened_with in ((keys.Passphrase("right", log_n=10), keys.Passphrase("wrong")),
                                    (keys.WrappingKey("k", os.urandom(32)),
                                     keys.WrappingKey("k", os.urandom(32)))):
        envelope = keys.seal_envelope(dek, sealed_for)
        calls.clear()
        with pytest.raises(keys.NoMatchingRecipient):
            recipients.open_file_envelope(envelope, opened_with, salt)
        assert calls == [keys.file_context(salt)]



def test_rekey_file_to_hsm_to_kms(hsm, kms, plain, tmp_path, capsys):
    """A keyset file, then the HSM, then KMS: each step rewrites the header only, and each
    old key stops opening the file."""
    keyset_path = tmp_path / "keyset.json"
    keys.Keyset.generate().save(keyset_path)
    file_ref, hsm_ref = f"file://{keyset_path}", _hsm_uri(hsm)
    kms_ref = kms.uri(kms.new_key())
    enc = tmp_path / "model.gc"
    assert _cli(capsys, "encrypt", plain, enc, "--kek", file_ref, "--device", "cpu")[0] == 0
    segments = enc.read_bytes()[stream.read_header(str(enc)).header_length:]

    for old, new, stanza in ((file_ref, hsm_ref, KeyReference(hsm_ref).label),
                             (hsm_ref, kms_ref, "awskms://arn:aws:kms:us-east-1:")):
        code, out, err = _cli(capsys, "rekey", enc, "--old-kek", old, "--kek", new)
        assert code == 0, err
        assert f"data key now wrapped for {stanza}" in out
        assert keys.describe_envelope(stream.read_header(str(enc)).envelope)[0].startswith(stanza)
        assert enc.read_bytes().endswith(segments)  # the header changed, the data did not
        code, _, err = _cli(capsys, "decrypt", enc, tmp_path / "stale.out", "--kek", old)
        assert code == 1 and "no recipient in this file matches" in err

    assert _cli(capsys, "decrypt", enc, tmp_path / "final.out", "--kek", kms_ref)[0] == 0
    assert (tmp_path / "final.out").read_bytes() == plain.read_bytes()
    # and back into the HSM through the library, with a public-key recipient alongside
    alice = keys.Identity.generate()
    keys.rekey_file(enc, recipients=[KeyReference(hsm_ref), alice.recipient],
                    identities=KeyReference(kms_ref))
    _decrypts_to(enc, plain, tmp_path, identities=alice)
    _decrypts_to(enc, plain, tmp_path, identities=KeyReference(hsm_ref))


# ------------------------------------------------------------------------------------ pickle, spawn, audit


def _open_in_child(refs_pickled: bytes, envelopes: list, contexts: list, queue) -> None:
    try:
        refs = pickle.loads(refs_pickled)
        queue.put([keys.open_envelope(e, r, context=c).hex()
                   for r, e, c in zip(refs, envelopes, contexts)])
    except BaseException as exc:  # report, so the parent fails with the reason
        queue.put(f"{type(exc).__name__}: {exc}")


def test_references_pickle_without_secrets_and_resolve_in_a_spawned_child(hsm, kms):
    refs = [KeyReference(_hsm_uri(hsm)), KeyReference(kms.uri(kms.new_key()))]
    dek = keys.generate_dek()
    contexts = [file_context(os.urandom(32)) for _ in refs]
    envelopes = [keys.seal_envelope(dek, r, context=c) for r, c in zip(refs, contexts)]
    for r, e, c in zip(refs, envelopes, contexts):  # used: sessions, clients and ARNs are cached
        assert keys.open_envelope(e, r, context=c) == dek
    data = pickle.dumps(refs)
    for secret in (PIN.encode(), SO_PIN.encode(), AWS_SECRET.encode(), dek, dek.hex().encode(),
                   base64.b64encode(dek), KNOWN_KEK):
        assert secret not in data
    assert pickle.loads(data) == refs

    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_open_in_child, args=(data, envelopes, contexts, queue))
    child.start()
    answer = queue.get(timeout=60)
    child.join(30)
    assert answer == [dek.hex()] * 2, answer


def test_key_references_refuse_a_wrapping_key_over_a_keyset(tmp_path):
    """A WrappingKey built from a loaded Keyset, or from a FileKeyProvider (which caches its
    keyset once used), would carry the keyset in every pickle: refused like the keyset itself."""
    from gpucrypt.keys.portable import KeyReferences

    keyset = keys.Keyset.generate()
    keyset.save(tmp_path / "ks.json")
    used = keys.FileKeyProvider(tmp_path / "ks.json")
    used.get_key(keyset.primary.id)
    for provider, why in ((keyset, "a loaded Keyset holds key material"),
                          (used, "a FileKeyProvider caches its keyset")):
        wrapping = keys.WrappingKey.from_provider(provider, keyset.primary.id)
        for where in ("identities", "recipients"):
            with pytest.raises(TypeError, match=f"is built from a provider that may not travel: "
                                                f"{why}.*give the (path of its file|keyset path)"):
                KeyReferences(**{where: [wrapping]})
    env_backed = keys.WrappingKey.from_provider(keys.EnvKeyProvider("kek", "SOME_VAR"), "kek")
    assert KeyReferences(recipients=[env_backed]).recipients == (env_backed,)  # holds no key


def test_audit_names_providers_and_references_never_keys_or_pins(hsm, kms, plain, tmp_path):
    log = io.StringIO()
    handler = audit.enable(log)
    try:
        hsm_ref, kms_ref = KeyReference(_hsm_uri(hsm)), KeyReference(kms.uri(kms.new_key()))
        enc = tmp_path / "model.gc"
        keys.encrypt_file(plain, enc, recipients=hsm_ref, device="cpu")
        keys.rekey_file(enc, recipients=kms_ref, identities=hsm_ref)
        _decrypts_to(enc, plain, tmp_path, identities=kms_ref)
        with pytest.raises(keys.NoMatchingRecipient):
            keys.decrypt_file(enc, tmp_path / "x", identities=hsm_ref, device="cpu")
        header = stream.read_header(str(enc))
        dek = keys.open_envelope(header.envelope, kms_ref, context=file_context(header.salt))
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    text = log.getvalue()
    events = [json.loads(line) for line in text.splitlines()]
    wraps = [(e["operation"], e["provider"], e["key_ref"]) for e in events
             if e["operation"].startswith("kek.")]
    assert ("kek.wrap", "pkcs11", hsm_ref.label) in wraps
    assert ("kek.unwrap", "pkcs11", hsm_ref.label) in wraps
    assert ("kek.wrap", "awskms", kms_ref.label) in wraps
    assert ("kek.unwrap", "awskms", kms_ref.label) in wraps
    assert "module-path" not in text and "endpoint" not in text  # labels carry no query
    for secret in (PIN, SO_PIN, AWS_SECRET, dek.hex(), base64.b64encode(dek).decode(),
                   KNOWN_KEK.hex()):
        assert secret not in text


@pytest.mark.parametrize("module_name, lock_name", [("gpucrypt.keys.pkcs11", "_lock"),
                                                    ("gpucrypt.keys.awskms", "_clients_lock")])
def test_a_fork_while_a_provider_lock_is_held_leaves_the_child_a_free_lock(module_name,
                                                                            lock_name):
    """A fork while another thread holds the provider's lock (a PKCS#11 session open, a
    boto3 client being made) copied the lock held into the child, where no thread would
    ever release it: the child's first HSM or KMS call hung. The child gets a new lock."""
    import importlib
    import threading

    module = importlib.import_module(module_name)
    held, release = threading.Event(), threading.Event()

    def hold():
        with getattr(module, lock_name):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                code = 0 if getattr(module, lock_name).acquire(timeout=2) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join()
    assert os.waitstatus_to_exitcode(status) == 0, "the child could not take the lock"


def test_kms_an_alias_without_a_region_leaves_the_file_to_the_other_identities(
        kms, monkeypatch):
    """A reference by alias with no region= on a machine with no default region owns no
    stanza (it sends nothing where a stanza says, and has nowhere else to send): the other
    identities given with it still open the file. Its 'no region' error stopped the open."""
    from gpucrypt.keys import awskms
    from gpucrypt.keys.recipients import open_file_envelope
    from gpucrypt.keys.references import file_context

    alias_name = "alias/gpucrypt-no-region"
    kms.new_key(alias=alias_name)
    ops = keys.Keyset.generate()
    dek, salt = keys.generate_dek(), os.urandom(16)
    envelope = keys.seal_envelope(dek, [KeyReference(kms.uri(alias_name)), ops],
                                  context=file_context(salt))
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setattr(awskms, "_clients", {})
    no_region = KeyReference(f"awskms:///{alias_name}?endpoint={kms.endpoint}")
    assert open_file_envelope(envelope, [no_region, ops], salt) == dek
    with pytest.raises(keys.NoMatchingRecipient, match="no region; add \\?region="):
        open_file_envelope(envelope, [no_region], salt)  # and the reason is said
