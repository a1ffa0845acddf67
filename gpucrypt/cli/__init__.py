"""The ``gpucrypt`` command line.

Each subcommand lives in its own module and registers itself through
:data:`SUBCOMMANDS` (name -> "module:function"); the function receives the
argparse sub-parser, adds its arguments and sets ``func``. Errors the user can
fix are printed as one line on stderr, with exit code 2 for usage problems and 1
for failed operations; no tracebacks.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

#: subcommand -> "module:function that configures its parser"
SUBCOMMANDS = {
    "encrypt": "gpucrypt.cli.files:add_encrypt",
    "decrypt": "gpucrypt.cli.files:add_decrypt",
    "info": "gpucrypt.cli:_add_info",
    "selftest": "gpucrypt.cli:_add_selftest",
    "keygen": "gpucrypt.cli.keys:add_keygen",
    "keys": "gpucrypt.cli.keys:add_keys",
    "rekey": "gpucrypt.cli.keys:add_rekey",
    "bench": "gpucrypt.cli.bench:add_bench",
    "encrypt-model": "gpucrypt.cli.models:add_encrypt_model",
    "decrypt-model": "gpucrypt.cli.models:add_decrypt_model",
}


class CliError(Exception):
    """A problem the user can fix; printed without a traceback. ``exit_code`` says which kind."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _add_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from .._info import info

    report = info()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"gpucrypt {report['gpucrypt']} on Python {report['python']} ({report['platform']})")
    for name, version in report["libraries"].items():
        print(f"  {name:14s} {version or '-'}")
    print("backends available:")
    for name, details in report["backends"].items():
        extra = ", ".join(f"{k}={v}" for k, v in details.items() if k != "name")
        print(f"  {name}: {extra}")
    for name, reason in report["unavailable"].items():
        print(f"backend {name} unavailable: {reason}")
    return 0


def _add_selftest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per message (default 1 MiB)")
    parser.set_defaults(func=_run_selftest)


def _run_selftest(args) -> int:
    """Encrypt and decrypt random data with every AEAD on every backend, checked against
    ``cryptography`` (and libsodium for XChaCha20-Poly1305 when PyNaCl is installed)."""
    import os

    from cryptography.hazmat.primitives.ciphers import aead as reference

    from .. import AESGCM, ChaCha20Poly1305, XChaCha20Poly1305
    from ..backends import available_backends

    data, aad = os.urandom(args.size), os.urandom(37)
    failures = 0
    for device in available_backends():
        cases = [(ChaCha20Poly1305, 32, 12, reference.ChaCha20Poly1305),
                 (AESGCM, 32, 12, reference.AESGCM), (XChaCha20Poly1305, 32, 24, None)]
        for cls, key_len, nonce_len, ref_cls in cases:
            key, nonce = os.urandom(key_len), os.urandom(nonce_len)
            sealed = cls(key, device=device).encrypt(nonce, data, aad)
            if ref_cls is not None:
                expected = ref_cls(key).encrypt(nonce, data, aad)
            else:
                expected = _libsodium_xchacha(key, nonce, data, aad)
            same = expected is None or sealed == expected
            back = cls(key, device=device).decrypt(nonce, sealed, aad) == data
            ok = same and back
            failures += not ok
            ref_name = "libsodium" if ref_cls is None else "cryptography"
            note = "" if expected is not None else " (PyNaCl not installed: reference not checked)"
            print(f"{device:4s} {cls.__name__:18s} {args.size} bytes: "
                  f"{'ok' if ok else 'FAILED'} (matches {ref_name}: {same}, round trip: {back}){note}")
    return 1 if failures else 0


def _libsodium_xchacha(key, nonce, data, aad):
    try:
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt
    except ImportError:
        return None
    return crypto_aead_xchacha20poly1305_ietf_encrypt(data, aad, nonce, key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpucrypt", description="GPU-accelerated bulk encryption")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in SUBCOMMANDS.items():
        module_name, func_name = target.split(":")
        configure = getattr(importlib.import_module(module_name), func_name)
        doc = (configure.__doc__ or "").strip().splitlines()
        configure(sub.add_parser(name, help=doc[0] if doc else None))
    return parser


def _version() -> str:
    from .. import __version__

    return f"gpucrypt {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"gpucrypt {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
