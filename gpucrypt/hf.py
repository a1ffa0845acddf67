"""Hugging Face models and PEFT adapters from encrypted checkpoint folders.

``pip install "gpucrypt[hf]"`` (transformers, peft, safetensors). The folders come from
``gpucrypt encrypt-model IN_FOLDER OUT_FOLDER`` (or
:func:`gpucrypt.files.checkpoints.encrypt_checkpoint`): the folder ``save_pretrained``
wrote, with every ``*.safetensors`` file (shards and index, or one file) encrypted::

    from transformers import AutoModelForCausalLM
    from gpucrypt import hf

    model = hf.from_pretrained(AutoModelForCausalLM, "llama-enc/", keyset=keyset,
                               device="cuda")           # decrypted on the GPU
    model = hf.load_adapter(model, "lora-enc/", keyset=keyset)   # a PeftModel

Plaintext weights never touch the disk: the tensors are decrypted into memory (on a GPU,
into device memory only) and handed to the libraries' own loading code; the arguments
that would make transformers offload weights to disk (``offload_folder``, a
``device_map`` entry ``"disk"``, ``offload_state_dict=True``) are refused.

**How the model is built.** :func:`from_pretrained` decrypts the state dict with
:func:`~gpucrypt.files.checkpoints.load_checkpoint` and calls the class's own
``from_pretrained(None, config=config, state_dict=state_dict, **kwargs)`` (for an Auto
class, on the class it picks for the config, as its own ``from_pretrained`` would): transformers'
documented way to build a pretrained model from weights it did not read itself. So
everything ``from_pretrained`` does on a checkpoint still happens (the model is made
on the meta device without random init, weight renaming and conversions, tied weights,
``dtype``, ``device_map``, warnings for missing or unexpected keys), and tensors that
already have the right device and dtype are taken as they are, not copied again.
The config is built from the folder's ``config.json`` (pass ``config=`` to override),
and a generative model's generation config from ``generation_config.json`` when the
folder's manifest lists one (pass ``generation_config=`` to override).

**Config files.** Each is read once, its bytes checked against the folder's manifest
(which authenticates every file), and the config built from those bytes:
``AutoConfig.from_pretrained``, ``GenerationConfig.from_pretrained`` and
``PeftConfig.from_pretrained`` run on a private copy of them (a 0700 temporary folder),
never on the folder, where a file could change after the check; ``name_or_path`` is the
folder, and no code is loaded from it. A model that needs its own code (``auto_map`` in
its ``config.json`` for a model type transformers does not know: what
``trust_remote_code=True`` would run) is refused with a ``ValueError`` naming the folder:
build it with its code and load the weights with :func:`load_state_dict`, or pass
``config=`` and the model's own class. A file changed after the manifest was checked
fails as it is read (``AuthenticationError`` naming it); one the manifest does not list,
such as a ``generation_config.json`` added later, is not read.

**Adapters.** :func:`load_adapter` does what ``PeftModel.from_pretrained`` (or
``PeftModel.load_adapter`` for a model that already is a ``PeftModel``) does, with the
adapter's weights decrypted instead of read by safetensors: the adapter config from
``adapter_config.json``, the task-specific ``PeftModel`` class, ``inference_mode = not
is_trainable``, then ``set_peft_model_state_dict``. Missing adapter weights raise
(peft only warns): an encrypted adapter that loads partly is a broken one.
"""
from __future__ import annotations

import os
from typing import Any

from .files.checkpoints import _load_checkpoint, load_checkpoint

__all__ = ["from_pretrained", "load_adapter", "load_state_dict"]


def load_state_dict(folder: Any, *, key: Any = None, keyset: Any = None, identity: Any = None,
                    device: str = "cpu", threads: int | None = None) -> dict:
    """The decrypted state dict (torch tensors on ``device``) of an encrypted checkpoint
    folder; see :func:`gpucrypt.files.checkpoints.load_checkpoint`."""
    return load_checkpoint(folder, key=key, keyset=keyset, identity=identity, device=device,
                           threads=threads)


def from_pretrained(model_class: Any, folder: Any, *, key: Any = None, keyset: Any = None,
                    identity: Any = None, device: str = "cpu", threads: int | None = None,
                    **kwargs: Any) -> Any:
    """A transformers model of ``model_class`` (``AutoModelForCausalLM``,
    ``LlamaForCausalLM``, ...) with the weights of the encrypted checkpoint ``folder``.

    Keys: ``key=`` (32 bytes) or ``keyset=``/``identity=`` for the files' envelope.
    ``device``: where the weights are decrypted, "cpu" or "cuda[:N]"; a GPU device is
    also passed on as ``device_map`` unless one is given. Other ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``config``, ``attn_implementation``, ...), except
    those that offload weights to disk (``offload_folder``, a ``device_map`` entry
    ``"disk"``, ``offload_state_dict=True``): ``ValueError``, as transformers would write
    the decrypted weights there as plain files.
    """
    _refuse_disk_offload(kwargs)
    folder = os.fspath(folder)
    # the weights first: loading checks the folder's manifest; read() gives the checked
    # bytes of the config files, which are built from those bytes only
    state, read = _load(folder, key, keyset, identity, device, threads)
    config = kwargs.get("config")
    if config is None or (isinstance(config, (str, os.PathLike))
                          and os.path.abspath(config) == os.path.abspath(folder)):
        kwargs["config"] = _auto_config(read, folder)
    elif isinstance(config, (str, os.PathLike)):  # a config's folder or name, as transformers
        from transformers import AutoConfig      # takes it: the caller's own, not checked here

        kwargs["config"] = AutoConfig.from_pretrained(
            config, trust_remote_code=kwargs.get("trust_remote_code", False))
    if device != "cpu":
        kwargs.setdefault("device_map", device)
    loaded = _concrete(model_class, kwargs["config"]).from_pretrained(None, state_dict=state,
                                                                      **kwargs)
    # (model, loading info) with output_loading_info=True
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    # transformers reads generation_config.json from the folder it loads, and it is given
    # none here: build it as it would (unless generation_config= was passed), from the
    # bytes the manifest checked; a file the manifest does not list is not read
    generation = None if kwargs.get("generation_config") is not None else \
        read("generation_config.json")
    if generation is not None and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = _from_checked(lambda name: generation, folder,
                                                ["generation_config.json"],
                                                GenerationConfig.from_pretrained)
    return loaded


def _refuse_disk_offload(kwargs: dict) -> None:
    """``ValueError`` for the ``from_pretrained`` arguments that put weights on disk:
    transformers saves offloaded weights as plain safetensors files (one per tensor, in
    ``offload_folder``), which would leave the decrypted model there."""
    device_map = kwargs.get("device_map")
    disk = isinstance(device_map, dict) and any(
        isinstance(v, str) and v == "disk" for v in device_map.values())
    asked = [name for name, given in (
        ("offload_folder", kwargs.get("offload_folder") is not None),
        ("device_map 'disk'", disk),
        ("offload_state_dict", bool(kwargs.get("offload_state_dict")))) if given]
    if asked:
        raise ValueError(f"{' and '.join(asked)} would offload weights to disk, where "
                         f"transformers writes them decrypted, as plain files: gpucrypt "
                         f"keeps the plaintext in memory. Give a device_map of GPUs and "
                         f"'cpu' only (without offload_folder), or decrypt the folder with "
                         f"gpucrypt decrypt-model onto storage you trust and load that")


def _load(folder: str, key: Any, keyset: Any, identity: Any, device: str,
          threads: int | None) -> tuple[dict, Any]:
    """The state dict of ``folder`` and ``read(name)``, the manifest-checked bytes of its
    copied file ``name`` (None when the manifest lists none)."""
    return _load_checkpoint(folder, key=key, keyset=keyset, identity=identity, device=device,
                            framework="torch", threads=threads)


def _from_checked(read: Any, folder: str, names: list, build: Any) -> Any:
    """``build(copy)``, where ``copy`` is a private folder (0700, removed after) holding the
    manifest-checked bytes of ``folder``'s files ``names`` (``read``: see :func:`_load`):
    transformers' and peft's own ``from_pretrained`` build the config, with everything
    they do (version-specific files, special floats, their heuristics), from those bytes
    only; they never read ``folder``, where a file could have changed since the check.
    ``FileNotFoundError`` when the manifest lists the first of ``names`` not."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpucrypt-config-") as copy:
        for name in names:
            data = read(name)
            if data is None:
                if name == names[0]:
                    raise FileNotFoundError(f"{folder} has no {name} (its manifest lists none)")
                continue
            with open(os.path.join(copy, name), "xb") as f:
                f.write(data)
        return build(copy)


def _auto_config(read: Any, folder: str) -> Any:
    """What ``AutoConfig.from_pretrained(folder)`` builds, from the checked bytes of
    ``config.json`` and of the versioned files it names (``configuration_files``), with
    ``name_or_path`` the folder. No code is loaded from the folder (no
    ``trust_remote_code``), as before."""
    from transformers import AutoConfig

    from .files._safetensors import load_json

    names = ["config.json"]
    data = read("config.json")
    doc = load_json(data, "config.json") if data is not None else {}
    versioned = doc.get("configuration_files", []) if isinstance(doc, dict) else []
    # plain names only: they come from an authenticated file, but are joined to a path
    names += [n for n in versioned if isinstance(n, str) and n == os.path.basename(n)
              and n not in ("", ".", "..", "config.json")]
    if data is not None:
        _refuse_custom_code(doc, folder)
    config = _from_checked(read, folder, names, AutoConfig.from_pretrained)
    config.name_or_path = folder
    return config


def _refuse_custom_code(doc: Any, folder: str) -> None:
    """``ValueError`` naming ``folder`` when its ``config.json`` (parsed: ``doc``) is one
    transformers builds only with code from the folder (``auto_map`` and a model type it
    does not know), or with no model type, or one this transformers does not know.
    Said here because transformers, given the private copy (:func:`_from_checked`),
    named that throwaway folder, asked on stdin whether to run the code, and said to
    pass ``trust_remote_code=True``, which gpucrypt.hf does not pass on (it runs no code
    from an encrypted folder: the copied ``.py`` files are authenticated, not vetted),
    so the advice gave the same error."""
    from transformers import CONFIG_MAPPING, __version__

    if not isinstance(doc, dict):
        return  # not an object: transformers says what is wrong with it
    model_type = doc.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return  # transformers' own classes, even where auto_map also names custom code
    instead = (f"build the model with its own code and load the decrypted weights into it "
               f"(state = gpucrypt.hf.load_state_dict({folder!r}, key=...); "
               f"model.load_state_dict(state)), or pass config= a config built with that "
               f"code and the model's own class instead of an Auto class")
    auto_map = doc.get("auto_map")
    if isinstance(auto_map, dict) and "AutoConfig" in auto_map:
        raise ValueError(f"{folder}: its config.json needs the model's own code (auto_map "
                         f"names {auto_map['AutoConfig']!r} for model type {model_type!r}, "
                         f"which transformers does not know), and gpucrypt.hf does not run "
                         f"code from a checkpoint folder (trust_remote_code is not "
                         f"supported): {instead}")
    if model_type is None:
        raise ValueError(f"{folder}: its config.json has no model_type, so transformers "
                         f"cannot tell which model it is: add the model_type to the "
                         f"plaintext config.json and encrypt the folder again, or {instead}")
    raise ValueError(f"{folder}: its config.json has model type {model_type!r}, which "
                     f"transformers {__version__} does not know: upgrade transformers; a "
                     f"model that needs its own code (trust_remote_code) is not supported "
                     f"by gpucrypt.hf: {instead}")


def _concrete(model_class: Any, config: Any) -> Any:
    """The model class an Auto class picks for ``config`` (Auto classes' from_pretrained
    needs a path, and a state dict comes with none); other classes as they are."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return model_class
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, mapping)


def load_adapter(model: Any, folder: Any, *, key: Any = None, keyset: Any = None,
                 identity: Any = None, adapter_name: str = "default", is_trainable: bool = False,
                 device: str | None = None, threads: int | None = None) -> Any:
    """``model`` with the encrypted PEFT adapter in ``folder`` loaded as ``adapter_name``:
    a new ``PeftModel`` around a plain model, or the same ``PeftModel`` with one more
    adapter. ``device``: where the adapter weights are decrypted (default: the model's
    device). ``KeyError`` naming the missing weights when the files lack any."""
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
    from peft.utils import set_peft_model_state_dict

    folder = os.fspath(folder)
    if device is None:  # a model without parameters (yet) has no device: the CPU
        first = next(iter(model.parameters()), None)
        device = str(first.device) if first is not None else "cpu"
    # the weights first: loading checks the folder's manifest; the adapter config is built
    # from the bytes it checked
    weights, read = _load(folder, key, keyset, identity, device, threads)
    config = _peft_config(read, folder)
    if config.is_prompt_learning and is_trainable:
        raise ValueError("a prompt learning adapter cannot be loaded as trainable (as in peft)")
    config.inference_mode = not is_trainable
    adding = isinstance(model, PeftModel)
    if adding:
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
        peft_model = cls(model, config, adapter_name)
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if _is_adapter_key(k, config, adapter_name)]
    if missing:
        raise KeyError(f"the encrypted adapter lacks {len(missing)} weights of the adapter "
                       f"config (e.g. {missing[0]!r}): wrong folder, or files removed")
    if is_trainable and adding:  # add_adapter leaves a new adapter frozen (as in peft)
        peft_model.set_requires_grad(adapter_name)
    elif not is_trainable:
        peft_model.eval()
    return peft_model


def _peft_config(read: Any, folder: str) -> Any:
    """What ``PeftConfig.from_pretrained(folder)`` builds, from the checked bytes of
    ``adapter_config.json``."""
    from peft import PeftConfig

    return _from_checked(read, folder, ["adapter_config.json"], PeftConfig.from_pretrained)


def _is_adapter_key(name: str, config: Any, adapter_name: str) -> bool:
    """Whether the model's parameter ``name`` is one of adapter ``adapter_name``'s weights:
    the adapter name is a whole part of the dotted name (``lora_A.math.weight``; a
    substring test would take ``math_v2``'s weights, or any name containing "b", for
    it), and the tuner's prefix (``lora_``) is in it."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING  # peft.utils does not export it

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type, "")
    return bool(prefix) and prefix in name and adapter_name in name.split(".")
