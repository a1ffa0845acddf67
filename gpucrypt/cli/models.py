"""``gpucrypt encrypt-model IN.safetensors OUT`` and ``gpucrypt decrypt-model IN OUT.safetensors``;
both also take a Hugging Face checkpoint folder for IN and a new folder for OUT.

Converts between plain safetensors files (checked with the ``safetensors`` package:
``pip install "gpucrypt[models]"``) and gpucrypt model files (:mod:`gpucrypt.models`,
docs/MODEL_FORMAT.md). Every safetensors dtype of a byte or more is carried (bfloat16
and float8 included: the bytes are what is encrypted); the safetensors
``__metadata__`` is carried over both ways.

Keys as for ``gpucrypt encrypt``/``decrypt`` (the same functions, in
:mod:`gpucrypt.cli._common`, do the work): ``--key-file``/``--key-env``, and the
recipient, identity and keyset options from :mod:`gpucrypt.cli.keys` (the data key is
then wrapped in the file's envelope). Exit codes and one-line errors as there: 1 when the
data failed (wrong key, tampering, not a model file / not a safetensors file), 2 for
usage problems. Both write OUT atomically (:func:`gpucrypt.cli._common.destination`:
an unnamed file on Linux, fsync, then published), mode 0600, only once everything
verified, and never over a file without ``--force``; never over IN itself (or a link
to it), even with ``--force``: write elsewhere, then rename. An OUT that is a FIFO or a
character device (``/dev/null``) is written in place instead, never replaced;
``decrypt-model`` makes the file in the temporary directory (``TMPDIR``) first, as an
unnamed file on Linux (a safetensors file is not written in order: it needs that much free
space there), and copies it there once everything verified (:func:`_export_streamed`).

Memory: both work a batch of segments at a time, so a model converts in a few MiB plus
about 200 bytes per segment (the segment list and tags: 27 MB for 140 GB in the default
1 MiB segments, 64 times that in 16 KiB ones). ``encrypt-model`` reads the safetensors
file segment by segment (:mod:`gpucrypt.files._safetensors`; ``--device`` as for
``gpucrypt encrypt``);
``decrypt-model`` (:func:`gpucrypt.models.export_safetensors`, on the CPU's threads)
writes each verified batch where ``safetensors.save_file`` would have put it. To
decrypt onto a GPU, load the file with :func:`gpucrypt.models.load_encrypted` instead.

Folders (:mod:`gpucrypt.files.checkpoints`): every ``*.safetensors`` file (the shards a
``model.safetensors.index.json`` lists, a PEFT ``adapter_model.safetensors``) becomes a
model file of the same name under one data key; config, index and tokenizer files are
copied (readable: with ``--encrypt-names`` the index still lists every tensor name, and a
warning says so). A folder holding weights in another format (``.bin``, ``.ot``, ...), or
a file over 16 MiB that is not text, is refused (exit 1), unless ``--copy-unencrypted
NAME`` vouches that the file holds no weights
(:func:`gpucrypt.files.checkpoints.checkpoint_layout`). OUT must be new (or an empty
folder, not a symbolic link) and appears whole at the end. With ``--kek`` each model
file's envelope is sealed for its own salt (AWS KMS and PKCS#11 AES-GCM bind the wrapped
key to it), so each file opens on its own too; the other recipients' stanzas are the
same in every file.
"""
from __future__ import annotations

import argparse
import os
import sys

from ._common import (add_algorithm, add_device, add_force, add_input_output_and_keys,
                      add_key_management, audited, check_key_sources, check_output,
                      check_sealing_options, decrypt_key, destination, device_chosen,
                      encrypt_keys, parse_size, refuse_input_as_output, run_reporting_errors)
from . import CliError

__all__ = ["add_encrypt_model", "add_decrypt_model"]


def _safetensors():
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise CliError("the safetensors package is not installed: pip install "
                       "'gpucrypt[models]'", 2) from None
    return safetensors


def _common(parser: argparse.ArgumentParser, mode: str, what_in: str, what_out: str) -> None:
    add_input_output_and_keys(parser, what_in, what_out)
    add_force(parser, "overwrite an OUT file if it exists (an OUT folder, for a checkpoint "
                      "folder IN, must be new or empty: nothing is deleted to make room)")
    add_key_management(parser, mode)


def add_encrypt_model(parser: argparse.ArgumentParser) -> None:
    """Encrypt a safetensors file into a gpucrypt model file (tensor data encrypted)."""
    from ..files.models import DEFAULT_SEGMENT_SIZE

    _common(parser, "encrypt", "a .safetensors file, or a Hugging Face checkpoint folder",
            "the encrypted model file (or new folder) to write")
    add_device(parser, "where to encrypt (default: auto)")
    add_algorithm(parser)
    parser.add_argument("--segment-size", type=parse_size, default=DEFAULT_SEGMENT_SIZE,
                        metavar="SIZE", help="bytes per segment, a power of two from 4KiB to "
                                             "64MiB (default: 1MiB)")
    parser.add_argument("--encrypt-names", action="store_true",
                        help="encrypt the tensor table too (names, dtypes, shapes, metadata); "
                             "a checkpoint folder's *.safetensors.index.json is still copied "
                             "as it is (authenticated, readable), so every tensor name stays "
                             "visible there: move it out of IN first to hide them")
    parser.add_argument("--copy-unencrypted", action="append", default=[], metavar="NAME",
                        help="a checkpoint folder's file to copy as it is (readable, "
                             "authenticated) although its name or size says weights: one "
                             "you know holds none, such as a pickled training_args.bin "
                             "(repeat for several)")
    parser.set_defaults(func=_run_encrypt_model)


def add_decrypt_model(parser: argparse.ArgumentParser) -> None:
    """Decrypt a gpucrypt model file back into a safetensors file."""
    _common(parser, "decrypt", "an encrypted model file, or an encrypted checkpoint folder",
            "the .safetensors file (or new folder) to write")
    parser.epilog = ("decrypt-model runs on the CPU's threads, by design: it has no --device, "
                     "and GPUCRYPT_DEVICE does not apply (GPUCRYPT_DEVICE=gpu is noted on "
                     "stderr and the CPU runs it). To decrypt onto a GPU, load the file with "
                     "gpucrypt.models.load_encrypted.")
    parser.set_defaults(func=_run_decrypt_model)


def _note_device_environment() -> None:
    """Say on stderr that ``GPUCRYPT_DEVICE=gpu`` is not followed: decrypt-model exports on
    the CPU's threads whatever the variable says, and doing so silently let a user believe
    the GPU had run it. Not refused: the variable may be set for a whole session on a GPU
    machine, where the other commands follow it."""
    from ..backends import _environment_device

    try:
        asks_gpu = _environment_device() == "gpu"
    except ValueError:  # no device at all: nothing here follows it either
        asks_gpu = False
    if asks_gpu:
        setting = os.environ["GPUCRYPT_DEVICE"].strip()
        print(f"gpucrypt decrypt-model: note: GPUCRYPT_DEVICE={setting} does not apply here: "
              f"decrypt-model runs on the CPU's threads (to decrypt onto a GPU, load the "
              f"file with gpucrypt.models.load_encrypted)", file=sys.stderr)


def _check_paths(args) -> None:
    if args.input == "-" or args.output == "-":
        raise CliError("model files need paths: stdin/stdout (-) are not supported", 2)
    if not os.path.exists(args.input):
        raise CliError(f"input file not found: {args.input}", 2)


def _run_encrypt_model(args) -> int:
    from ..files import models
    from ..files._atomic import open_regular
    from ..files._safetensors import open_safetensors

    check_key_sources(args)
    check_sealing_options(args)
    if os.path.isdir(args.input):
        return _run_encrypt_checkpoint(args)
    if args.copy_unencrypted:
        raise CliError("--copy-unencrypted names files of a checkpoint folder, and IN is a "
                       "file: leave the option out", 2)
    _check_paths(args)
    refuse_input_as_output(args, replacing="the plain model with its encryption")
    # OUT's and IN's refusals before a passphrase is asked for (typed twice with -p)
    check_output(args, binary_ciphertext=True)
    _refuse_missing_folder(args.output)
    _safetensors()

    def not_regular(kind: str) -> CliError:
        return CliError(f"IN {args.input} is a {kind}, not a regular file: a safetensors file "
                        f"is read at any position (its header, then each tensor where it "
                        f"lies), which a pipe or a device cannot give; save it to a file "
                        f"first and give that file", 2)

    try:
        # non-blocking, regular files only (as decrypt-model's IN): a FIFO's plain open
        # waited for a writer forever, and <(...) reached safetensors, which said "No such
        # device"
        source = open_regular(args.input, not_regular, buffering=0)
    except OSError as exc:
        raise CliError(f"cannot read {args.input}: {exc.strerror}", 2) from None
    fd = source.fileno()
    try:
        try:
            models._refuse_model_file(fd, args.input)  # its message names IN itself
        except models.FormatError as exc:
            raise CliError(str(exc), 1) from None
        try:
            tensors, metadata = open_safetensors(args.input, fd)
        except ValueError as exc:
            raise CliError(f"{args.input}: {exc}", 1) from None
        # --audit-log: as save_encrypted's own event, for the file written
        with audited(args, "model.encrypt", args.output) as event:
            key, key_id, envelope = encrypt_keys(args)
            event.update(algorithm=args.algorithm, device=args.device)
            with destination(args, binary_ciphertext=True) as dst, \
                    device_chosen(args, event) as ran_on:  # refuses a folder, an existing OUT
                run_reporting_errors(args, lambda: models.save_encrypted(
                    tensors, dst, key, metadata, algorithm=args.algorithm,
                    encrypt_names=args.encrypt_names, segment_size=args.segment_size,
                    device=args.device, key_id=key_id, envelope=envelope,
                    _salt=getattr(args, "file_salt", None),  # the envelope is bound to it (--kek)
                    _ran_on=ran_on))
    finally:
        source.close()
    return 0


def _run_decrypt_model(args) -> int:
    from ..files import models
    from ..files._atomic import AtomicFile

    check_key_sources(args)
    _note_device_environment()
    if os.path.isdir(args.input):
        return _run_decrypt_checkpoint(args)
    _check_paths(args)
    refuse_input_as_output(args, replacing="the encrypted model with its plaintext")
    # --audit-log: as load_encrypted's own event, for the file read
    with audited(args, "model.decrypt", args.input) as event, \
            destination(args, binary_ciphertext=True) as dst:  # refuses a folder, an existing OUT
        def work():
            # the header, unauthenticated, only to find the envelope (its table undecoded)
            key = decrypt_key(args, lambda: models._parse_path(args.input))
            event["device"] = "cpu"  # export_safetensors works on the CPU's threads
            if isinstance(dst, AtomicFile):
                models.export_safetensors(args.input, dst, key)
            else:  # a FIFO or a character device (_common.streamed_output)
                _export_streamed(args, dst, key)

        _run_export(args, work)
    return 0


def _run_export(args, work) -> None:
    """``run_reporting_errors(args, work)`` for decrypt-model, where a valid file under the
    right key that holds a dtype safetensors has no code for (``numpy:<U5``) is exit 1,
    the data's problem, not a usage error (2, as its ValueError would be)."""
    from ..files import models

    def exporting():
        try:
            work()
        except models.NotSafetensorsDtype as exc:
            raise CliError(f"{args.input}: {exc}", 1) from None

    run_reporting_errors(args, exporting)


#: the name a staged decrypted model's errors give, in the temporary directory (never made)
_STAGED_NAME = "gpucrypt-decrypt-model.safetensors"


def _export_streamed(args, dst, key: bytes) -> None:
    """Decrypt the model file into ``dst``, a FIFO or a character device opened for
    writing. ``export_safetensors`` puts each tensor where it goes in the file (pwrite,
    batches in the model file's order, not the safetensors file's), which a stream cannot
    take: the file is made whole and verified in the temporary directory, then copied
    (:class:`~gpucrypt.files._atomic.ScratchFile`). On Linux it is an unnamed file
    (``O_TMPFILE``) throughout, so no signal, not even SIGKILL, leaves the plaintext
    there. Where the temporary directory takes none, it is a named 0600 file
    ``.gpucrypt-decrypt-model.safetensors.XXXXXXXX.gpucrypt-tmp`` while it is filled
    (SIGTERM and SIGHUP remove it; SIGKILL then can leave it, to delete by hand), removed
    before the copy, which may wait on the FIFO's reader for as long as it likes. It
    needs as much free space there as the decrypted model: a failure there names the
    temporary directory (``TMPDIR`` chooses it), not OUT."""
    import tempfile

    from ..files import models
    from ..files._atomic import ScratchFile

    folder = tempfile.gettempdir()
    staged = None
    try:
        try:
            staged = ScratchFile(folder, _STAGED_NAME)
            models.export_safetensors(args.input, staged, key)
            reader = open(os.dup(staged.fileno()), "rb", buffering=0)
        except OSError as exc:
            if exc.filename != os.path.join(folder, _STAGED_NAME):
                raise  # IN's, said as run_reporting_errors says it
            raise _staging_failed(folder, exc) from None
        with reader:
            _copy_staged(args, reader, dst, folder)
    finally:
        if staged is not None:
            staged.abort()


def _copy_staged(args, reader, dst, folder: str) -> None:
    """Send the staged file (``reader``, unbuffered, at any position) to ``dst``, a MiB at a
    time through one buffer."""
    buffer = memoryview(bytearray(1 << 20))
    reader.seek(0)
    while True:
        try:
            n = reader.readinto(buffer)
        except OSError as exc:
            raise _staging_failed(folder, exc) from None
        if not n:
            return
        try:
            dst.write(buffer[:n])
        except BrokenPipeError:
            raise
        except OSError as exc:  # said of OUT: the staged file means nothing to the user
            raise CliError(f"cannot write {args.output}: {exc.strerror or exc}", 1) from None


def _staging_failed(folder: str, exc: OSError) -> CliError:
    return CliError(f"cannot stage the decrypted model in {folder}: {exc.strerror or exc} (to "
                    f"a FIFO or a device, decrypt-model makes the whole file in the temporary "
                    f"directory first, so it needs as much free space there as the model "
                    f"takes decrypted; set TMPDIR to a folder with room)", 1)


# --------------------------------------------------------------------------- checkpoint folders
def _refuse_missing_folder(out: str) -> None:
    """A CliError when OUT's folder does not exist (said after the work, it named the
    temporary file beside OUT instead of OUT): exit 1, an I/O error, as for every command
    whose OUT's folder is missing (docs/FORMAT.md)."""
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise CliError(f"cannot write {out}: the folder {folder} does not exist", 1)


def _check_folder_output(args, done: str) -> None:
    """Refuse (before any key is read) an OUT a checkpoint folder cannot be written to:
    exit 2, but 1 for a missing folder above OUT (an I/O error, as for a file OUT);
    ``done``: what OUT will hold ("encrypted", "decrypted"), for the suggested name."""
    if args.output == "-":
        raise CliError("a checkpoint folder is written to a folder: give OUT as a path", 2)
    _refuse_file_name(args.input, args.output)
    _refuse_nested_folders(args.input, args.output, done)
    _refuse_missing_folder(args.output)
    if os.path.islink(args.output):  # refused at the end otherwise, after all the work
        raise CliError(f"output is a symbolic link: {args.output} (a checkpoint folder is "
                       f"renamed into place, which cannot go through a link: give the folder "
                       f"it points to, or a new path)", 2)
    if os.path.lexists(args.output) and not (os.path.isdir(args.output)
                                             and not os.listdir(args.output)):
        raise CliError(f"output exists: {args.output} (a checkpoint folder is written to a new "
                       f"or empty folder; nothing is deleted to make room)", 2)


def _refuse_file_name(folder: str, out: str) -> None:
    """A usage CliError when IN is a checkpoint folder and OUT is named like a weights file
    (``llama-enc/model.safetensors``): the folder written there was named
    model.safetensors, where the user meant a file, or the folder above it."""
    from ..files.checkpoints import PLAIN_WEIGHT_SUFFIXES

    name = os.path.basename(os.path.normpath(out)).lower()
    suffix = next((s for s in (".safetensors", ".gcsafetensors") + PLAIN_WEIGHT_SUFFIXES
                   if name.endswith(s)), None)
    if suffix is not None:
        raise CliError(f"OUT {out} is named like a weights file ({suffix}), but IN {folder} is a "
                       f"checkpoint folder, so OUT must be a folder: give the new folder's "
                       f"path (its model files keep their names inside it)", 2)


def _refuse_nested_folders(folder: str, out: str, done: str) -> None:
    """:func:`gpucrypt.files.checkpoints.refuse_nested_folders`, as a usage CliError, before
    any key is read."""
    from ..files.checkpoints import refuse_nested_folders

    try:
        refuse_nested_folders(folder, out, done, names=("IN", "OUT"))
    except ValueError as exc:
        raise CliError(str(exc), 2) from None


def _run_encrypt_checkpoint(args) -> int:
    """IN is a Hugging Face checkpoint folder: every .safetensors file encrypted under one
    data key, the rest copied (:func:`gpucrypt.files.checkpoints.encrypt_checkpoint`)."""
    from ..files import checkpoints

    _check_folder_output(args, "encrypted")
    _safetensors()
    layouts = []  # the folder's refusals (weights in the clear, ...) before a passphrase
    run_reporting_errors(args, lambda: layouts.append(checkpoints.checkpoint_layout(
        args.input, copy_unencrypted=args.copy_unencrypted)))
    with audited(args, "model.encrypt", args.output) as event:  # --audit-log: the folder
        key, key_id, envelope = encrypt_keys(args)
        if envelope is not None and getattr(args, "kek", None):
            envelope = _envelope_per_file(args, key, envelope)
        event.update(algorithm=args.algorithm, device=args.device)
        with device_chosen(args, event) as ran_on:
            _encrypt_checkpoint(args, layouts[0], key, key_id, envelope, ran_on)
    return 0


def _encrypt_checkpoint(args, layout, key: bytes, key_id, envelope, ran_on: list) -> None:
    from ..files import checkpoints

    def work():
        index = layout.index
        if args.encrypt_names and index:
            # copied in the clear: the folder keeps its checkpoint's shape, and loading checks
            # each tensor against it (authenticated by the manifest, not encrypted)
            print(f"gpucrypt encrypt-model: warning: --encrypt-names hides the names in the "
                  f"model files only: {index} is copied as it is and lists every tensor name "
                  f"and its shard in the clear; to hide them, move it out of {args.input} "
                  f"first (gpucrypt's loaders merge the shards without it)", file=sys.stderr)
        checkpoints.encrypt_checkpoint(
            args.input, args.output, key, key_id=key_id, envelope=envelope,
            algorithm=args.algorithm, encrypt_names=args.encrypt_names,
            segment_size=args.segment_size, device=args.device,
            copy_unencrypted=args.copy_unencrypted, _ran_on=ran_on)

    run_reporting_errors(args, work)


def _envelope_per_file(args, key: bytes, envelope: bytes):
    """``envelope`` for a folder, whose model files each have their own random salt (their
    keys derive from it). It was sealed for one file (``args.file_salt``), and its
    ``--kek`` stanzas bind that salt (AWS KMS encryption context, PKCS#11 AES-GCM
    associated data: :func:`gpucrypt.keys.file_context`), so they would open in no other
    file. The envelope of each file (a function of its salt, for ``encrypt_checkpoint``):
    those stanzas wrapped again for its salt, the others (public keys, keysets, which
    bind nothing) as they are. ``envelope`` itself when it has no such stanza."""
    from ..keys import _envelope, file_context, seal_envelope
    from .keys import _key_references, _keys_call

    stanzas = _envelope.decode(envelope)
    if not any(s.kind == "key-ref" for s in stanzas):
        return envelope
    kept = [s for s in stanzas if s.kind != "key-ref"]
    # a file: reference is a keyset (an aes-kwp stanza, kept); the others make key-ref stanzas
    references = [r for r in _key_references(args.kek, args) if r.scheme != "file"]

    def for_salt(salt: bytes) -> bytes:
        bound = _keys_call(seal_envelope, key, references, context=file_context(salt))
        return _envelope.encode(kept + _envelope.decode(bound))

    return for_salt


def _run_decrypt_checkpoint(args) -> int:
    from ..files import checkpoints, models

    _check_folder_output(args, "decrypted")

    def work():
        layout = checkpoints.checkpoint_layout(args.input, encrypted=True)
        # unauthenticated, only to find the envelope (one data key for the folder)
        first = os.path.join(args.input, layout.tensor_files[0])
        key = decrypt_key(args, lambda: models._parse_path(first))
        event["device"] = "cpu"  # as export_safetensors, on the CPU's threads
        checkpoints.decrypt_checkpoint(args.input, args.output, key=key)

    with audited(args, "model.decrypt", args.input) as event:  # --audit-log: the folder
        _run_export(args, work)
    return 0
