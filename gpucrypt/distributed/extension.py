"""Encryption as a DCP stream transform, for DCP's stock ``FileSystemWriter``/``FileSystemReader``.

DCP's writer passes each item's bytes (``torch.save`` of a tensor, or a pickled
value) through the ``_extensions`` it was given, and records each extension's
descriptor beside the item; its reader looks the descriptors up in an
``ExtensionRegistry`` and undoes the transforms::

    ext = EncryptionExtension(keyset=keyset)                       # or recipients=[...]
    dcp.save(sd, storage_writer=FileSystemWriter(path, _extensions=[ext]))
    dcp.load(sd, storage_reader=FileSystemReader(path, _extension_registry=ext.registry()))

Every item becomes a gpucrypt stream (``docs/FORMAT.md``), whose header carries the
data key's envelope, and is authenticated on its own. The reader is random access,
but DCP's reader takes each item whole (``torch.load`` needs all of it). What this form cannot do,
because DCP gives a transform neither the item's name nor the metadata: bind an item
to its place (two items could be swapped), or protect ``.metadata``, which stays a
plain pickle (names, shapes, placement in the clear, and unauthenticated). Tensors
reach a transform on the host. :class:`~gpucrypt.distributed.EncryptedWriter` has none
of these limits; ``docs/DISTRIBUTED.md`` compares the two.

Only DCP's default ``serialization_format`` (``TORCH_SAVE``) passes tensors through the
extensions. With ``SerializationFormat.SAFETENSORS`` DCP writes the tensors with
``safetensors.save`` straight into the file, past every extension, so an extension that
allowed it would leave plaintext on disk: this one refuses such a writer's first item,
before DCP writes any tensor.
"""
from __future__ import annotations

import io
import sys
from typing import IO, Any

from torch.distributed.checkpoint import filesystem as _dcp_filesystem
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

from .. import pipeline
from .._buffers import new_bytes
from ..files import _format, stream
from ..files._format import DEFAULT_SEGMENT_SIZE, TAG_SIZE
from ..files.keyed import _identities_for, _primary_key_id, gather
from ..keys import NoMatchingRecipient, generate_dek
from ..keys.recipients import open_data_key
from ..keys.recipients import seal_envelope_with_labels
from .checkpoint import _refuse_pickling

__all__ = ["EncryptionExtension"]

_NAME = "gpucrypt.stream"
_VERSION = "1"
#: why a DCP writer is refused: its tensors would reach the file without this extension
_BYPASSED = ("EncryptionExtension cannot encrypt this checkpoint: {}, DCP writes the tensors "
             "into the file itself, past its extensions, in plaintext. Save with "
             "FileSystemWriter(path, _extensions=[ext]) and DCP's default serialization_format "
             "(SerializationFormat.TORCH_SAVE), or with gpucrypt.distributed.EncryptedWriter")


class EncryptionExtension(StreamTransformExtension):
    """Seals each item DCP writes as a gpucrypt stream; opens them again on reading.

    To write: ``recipients`` and/or ``keyset`` (as :func:`gpucrypt.keys.encrypt_file`
    takes them), ``algorithm`` and ``segment_size`` (the stream format's). To read:
    ``identities`` and/or ``keyset``, and :meth:`registry` for DCP's reader. One data key
    per extension object and process, made on first use and wrapped once; every item
    has its own salt, so its segment key is its own.
    """

    def __init__(self, *, recipients: Any = None, keyset: Any = None, identities: Any = None,
                 algorithm: str = "chacha20-poly1305", segment_size: int = DEFAULT_SEGMENT_SIZE):
        super().__init__()
        algorithm = _format.check_algorithm(algorithm)
        _format.check_segment_size(segment_size)
        if recipients is None and keyset is None and identities is None:
            raise ValueError("give recipients= and/or keyset= (to write), identities= and/or "
                             "keyset= (to read)")
        writes = recipients is not None or keyset is not None
        reads = identities is not None or keyset is not None
        self._recipients = gather(recipients, keyset) if writes else []
        self._identities = _identities_for(identities, keyset) if reads else []
        self.algorithm, self.segment_size = algorithm, segment_size
        self._sealing: tuple[bytes, bytes, str | None] | None = None  # (key, envelope, key id)
        self._opened: dict[bytes, bytes] = {}  # envelope -> its data key, for reading

    def __getstate__(self) -> dict:
        _refuse_pickling(self)

    # ------------------------------------------------------------------ DCP's interface
    @staticmethod
    def registry_name() -> str:
        return _NAME

    @staticmethod
    def from_descriptor(version: str) -> "EncryptionExtension":
        raise ValueError("this checkpoint's items are encrypted by gpucrypt: read it with "
                         "FileSystemReader(path, _extension_registry=EncryptionExtension("
                         "keyset=... or identities=...).registry())")

    def get_descriptor(self) -> str:
        return f"{_NAME}/{_VERSION}"

    def registry(self) -> ExtensionRegistry:
        """An ``ExtensionRegistry`` (DCP's stock ones included) that resolves this
        extension's descriptor to this object, with its keys."""
        me = self

        def from_descriptor(version: str) -> "EncryptionExtension":
            if version.partition(".")[0] != _VERSION:
                raise ValueError(f"{_NAME} version {version!r} is not supported (this gpucrypt "
                                 f"reads version {_VERSION}); a newer gpucrypt may read it")
            return me

        bound = type("BoundEncryptionExtension", (EncryptionExtension,),
                     {"from_descriptor": staticmethod(from_descriptor)})
        registry = ExtensionRegistry()
        registry.register(bound)
        return registry

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        if not self._recipients:
            raise ValueError("this EncryptionExtension has no recipients or keyset to write "
                             "for: give recipients= and/or keyset=")
        self._refuse_unsealed_formats()
        if self._sealing is None:
            key = generate_dek()
            envelope, _ = seal_envelope_with_labels(key, self._recipients)
            self._sealing = (key, envelope, _primary_key_id(self._recipients))
        key, envelope, key_id = self._sealing
        return _SealingWriter(output, key, envelope, key_id, self.algorithm, self.segment_size)

    @staticmethod
    def _refuse_unsealed_formats() -> None:
        """Refuse a DCP writer whose tensors would bypass the extension (see the module
        docstring). DCP gives a transform neither its writer nor its serialization
        format, and has no hook before the data is written; its ``_write_item``, which
        asks for this transform once per item, holds the format as an argument, and
        calls it for every item before any tensor of the file is written. So the format
        is read there. Where DCP is not the caller (or no longer has that function),
        :meth:`_SealingWriter.close` still refuses an item closed without a single
        write, which is how DCP closes a tensor item whose bytes it writes itself."""
        write_item = getattr(getattr(_dcp_filesystem, "_write_item", None), "__code__", None)
        frame = sys._getframe(2)  # transform_to's caller (DCP: transform_save_stream)
        for _ in range(4):
            if frame is None or write_item is None:
                return
            if frame.f_code is write_item:
                fmt = frame.f_locals.get("serialization_format")
                if fmt is not None and fmt != _dcp_filesystem.SerializationFormat.TORCH_SAVE:
                    raise ValueError(_BYPASSED.format(f"with serialization_format={fmt}"))
                return
            frame = frame.f_back

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:  # noqa: A002 - DCP's name
        if not self._identities:
            raise ValueError("this EncryptionExtension has no identities or keyset to read "
                             "with: give identities= and/or keyset=")
        item = _Window(input)
        envelope = stream.read_header(item).envelope
        item.seek(0)  # the reader takes the stream from the item's position
        if not envelope:
            raise NoMatchingRecipient("this checkpoint item carries no envelope")
        key = self._opened.get(envelope)
        if key is None:
            key = self._opened[envelope] = open_data_key(envelope, self._identities)
        return _ItemReader(item, key)


class _ItemReader(stream.SegmentReader):
    """An item's plaintext for DCP's reader: random access for whoever seeks, but declared
    unseekable, so that DCP reads it whole (``readall``) before ``torch.load``. torch's zip
    reader would otherwise call ``read`` from C++ and turn gpucrypt's AuthenticationError
    into an AttributeError; it needs every byte of the item anyway."""

    def seekable(self) -> bool:
        return False

    def readall(self) -> bytes:
        # decrypted straight into the bytes returned: no zeroed bytearray, no copy of it
        out, view = new_bytes(max(0, self.size - self.tell()))
        done = 0
        while done < len(view):
            done += self.readinto(view[done:])
        return out


class _SealingWriter(io.RawIOBase):
    """A writable stream that seals what it is given as a gpucrypt stream into ``output``,
    a segment at a time: a full segment is sealed once more bytes arrive (so that the
    final one, sealed by ``close``, carries the last flag). Memory: one segment.

    Only an explicit ``close()`` seals the final segment and so completes the item. A
    ``with`` block left by an exception, :meth:`discard`, and a writer collected unclosed
    (DCP's ``_write_item`` dropping it when serialisation fails) abandon it: ``output``
    keeps the header and the whole segments sealed so far, a stream without its final
    segment, which every reader refuses (``TruncatedError``) instead of taking the
    prefix as a complete, authentic item."""

    def __init__(self, output: IO[bytes], key: bytes, envelope: bytes, key_id: str | None,
                 algorithm: str, segment_size: int):
        super().__init__()
        self._written = False  # whether write() was called at all (see close)
        header, header_bytes = _format.new_header(key, algorithm, segment_size, key_id=key_id,
                                                  envelope=envelope)
        self._segments = stream._Segments(header, key, "cpu", 1, 0, "seal", inline=True)
        self._output = output
        self._slot = memoryview(bytearray(segment_size + TAG_SIZE))
        self._filled = self._index = 0
        self._size = segment_size
        output.write(header_bytes)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._written = True
        view = memoryview(data).cast("B")
        total = len(view)
        while len(view):
            if self._filled == self._size:
                self._seal(last=False)
            n = min(self._size - self._filled, len(view))
            self._slot[self._filled:self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
        return total

    def _seal(self, last: bool) -> None:
        n = self._filled
        job = self._segments.job(self._index, last, self._slot[:n], self._slot, n)
        self._segments.runner.start(pipeline.Batch([job]))()
        self._output.write(self._slot[:n + TAG_SIZE])
        self._index, self._filled = self._index + 1, 0

    def close(self) -> None:
        if not self.closed and not self._written:
            # DCP writes every item it passes through its extensions, an empty value's
            # too (its write gets zero bytes); it closes an item without a write only when
            # it writes the item's bytes itself, past the extensions (SAFETENSORS), which
            # it does once every item of the file is closed: refuse before that, leaving
            # this item incomplete
            self.discard()
            raise ValueError(_BYPASSED.format(
                "an item was closed without being written, as when, with "
                "serialization_format=SerializationFormat.SAFETENSORS"))
        if not self.closed:
            try:
                self._seal(last=True)
                self._output.close()  # DCP's wrapper only flushes: the file stays open
            finally:
                self._release()
        super().close()

    def discard(self) -> None:
        """Abandon the item without its final segment (see the class docstring)."""
        if not self.closed:
            self._release()
        super().close()  # io's close: flushes nothing here, marks the writer closed

    def _release(self) -> None:
        try:
            self._segments.close()
        finally:
            self._slot = memoryview(b"")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()  # io's __exit__ would close(), which seals what was cut short
        else:
            self.close()

    def __del__(self) -> None:
        # dropped without close: abandoned (io's finaliser would close(), which seals)
        try:
            if not self.closed:
                self.discard()
        except Exception:  # noqa: BLE001 - a finaliser must not raise
            pass


class _Window(io.RawIOBase):
    """DCP's item view with positions relative to the item (its ``seek`` returns the
    position in the whole file, which the stream reader would take as the item's)."""

    def __init__(self, view: IO[bytes]):
        super().__init__()
        self._view = view
        view.seek(0, io.SEEK_END)
        self._size = view.tell()
        view.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._view.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self._size}[whence]
        position = min(max(0, base + offset), self._size)
        self._view.seek(position)
        return position

    def readinto(self, buffer: Any) -> int:
        return self._view.readinto(buffer)
