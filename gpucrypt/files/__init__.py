"""Files: the bytes gpucrypt writes to disk, and the operations on them.

- :mod:`~gpucrypt.files.stream`: the segmented stream format (``gpucrypt.stream``);
- :mod:`~gpucrypt.files.models`: encrypted model files (``gpucrypt.models``), read with
  safetensors' API by ``_safe_open`` (``gpucrypt.models.safe_open``);
- :mod:`~gpucrypt.files.checkpoints`: Hugging Face checkpoint folders, file by file;
- :mod:`~gpucrypt.files.keyed`: files sealed for recipients or a keyset
  (``gpucrypt.keys.encrypt_file`` and friends);
- ``_format`` (header bytes, segment keys and nonces), ``_atomic`` (atomic output),
  ``_safetensors`` (reading and writing safetensors layouts).

May import: the ground floor (``_buffers``, ``_limits``, ``_host_primitives``, ``audit``),
:mod:`gpucrypt.backends`, :mod:`gpucrypt.pipeline`, :mod:`gpucrypt.keys` and
:mod:`gpucrypt.tensors`. Never the CLI.
"""
