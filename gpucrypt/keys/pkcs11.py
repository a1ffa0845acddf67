"""PKCS#11 key-encryption keys: data keys wrapped inside a token (an HSM, SoftHSM2, a
smart card), through ``python-pkcs11`` (``pip install 'gpucrypt[pkcs11]'``).

The key-encryption key never leaves the token. The data key does, by design: gpucrypt
encrypts the bulk data on the host or the GPU, so the token wraps and unwraps it.

==========================  ============================================================
key on the token            how the data key is wrapped (first byte of the stanza body)
==========================  ============================================================
AES (secret key)            1: ``CKM_AES_KEY_WRAP_KWP`` (RFC 5649), when the token has it;
                            2: ``CKM_AES_KEY_WRAP_PAD``, when it has that instead (SoftHSM2
                            2.6 implements it as RFC 5649); both ``C_WrapKey`` of a session
                            copy of the data key, then ``C_UnwrapKey``;
                            3: ``CKM_AES_GCM`` (``C_Encrypt``), when it has neither, or when
                            the URI asks for it (``x-wrap=aes-gcm``): a 12-byte random IV,
                            then ciphertext and 16-byte tag; associated data = the binding
                            context (:func:`gpucrypt.keys.references.context_bytes`)
RSA (key pair)              4: ``CKM_RSA_PKCS_OAEP`` with SHA-256 and MGF1-SHA-256;
                            5: the same with SHA-1, where the token refuses SHA-256
                            (SoftHSM2 2.6 does); ``C_Encrypt`` with the public key,
                            ``C_Decrypt`` with the private key of the same label
==========================  ============================================================

Only AES-GCM binds the file context; key wrap and OAEP have no associated data (the
stream header's MAC still binds the envelope to the file).

A reference opens only the codes of its own kind of key: 1-3 with ``type=secret-key``,
4-5 with ``type=private`` or ``public``, and with no ``type`` those of the key ``wrap``
would use (a secret key of the label if the token has one, else the key pair). The code
is the stanza's, chosen by whoever wrote the file: the key's type must not be.

The module comes from the URI's ``module-path``, else ``$GPUCRYPT_PKCS11_MODULE`` (either
an absolute path: a relative one would load whatever library the using process's folder
holds), else the first SoftHSM2 library found in the usual places; it is loaded once per
process, under the name given, and known by its real path too, so two spellings of one
file (a symlink) are one module, for gpucrypt and for an application's own
``pkcs11.lib()`` in either order. For that, importing this module replaces
``pkcs11.unload`` with one that drops every name of the module it unloads
(:func:`_unload_every_name`): a name left would hand out the closed module. The user
PIN comes from ``pin-source`` (``env:VAR`` or ``file:/path``), else
``$GPUCRYPT_PKCS11_PIN``; never from the URI itself. A session is opened (and logged in)
per operation, under one lock per process.

A PIN the token refused is not sent to that token again by this process (tokens lock
the user PIN after a few wrong tries, and a folder decrypt with a stale PIN would send it
once per file): a keyed digest of it is kept per module and token (HMAC-SHA256 under a
random per-process key, never the PIN), and the PIN source is read again each time, so
fixing the source needs no restart. Where the application is logged in to the token
already, no PIN is sent at all, and the operation goes ahead on that login, as it does for
any PIN. The memory is per process (forked workers each try once): the token's own retry
counter is the final guard.

Logging in is gpucrypt's own ``C_Login`` (:func:`_login`), not python-pkcs11's
``token.open(user_pin=...)``: that opens the session, then logs in, and a login that fails
(a wrong PIN) left the session open, one more each try; and a process already logged in
to the token (an application using it for other work) got ``UserAlreadyLoggedIn`` from
every gpucrypt call. Login is the application's, not the session's, in PKCS#11: a token
already logged in is used as it is and left so; a login gpucrypt made is logged out when
the operation ends, which also returns the application's other sessions on that token to
the public state they were in (one the application logs in meanwhile, from another
thread, is logged out with them: PKCS#11 cannot tell the two apart).

The login goes to the module instance python-pkcs11 opened the session on: the p11-kit
proxy (``p11-kit-proxy.so``) makes a new instance for every ``C_GetFunctionList`` call,
and an instance that is not the session's refuses it. Where gpucrypt cannot reach that
instance (for example the proxy with a python-pkcs11 other than 0.10), the operation is
refused before any PIN is sent
(:meth:`Pkcs11Key._unreachable`): python-pkcs11's own login would leave the sessions above
open, with no handle left to close them.
"""
from __future__ import annotations

import contextlib
import ctypes
import hmac
import os
import sys
import threading
from typing import Any, Iterator, Mapping

from .._errors import KeyNotFound, KeyProviderError, KeysetError, KeyUnavailable
from ._document import printable_text
from ._uri import _PKCS11_PATH, KeyUri, check_absolute, parse_key_uri, pkcs11_id_text
from .references import context_bytes, read_secret_source

try:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as _p11e
    from pkcs11.mechanisms import MGF, GCMParams
except ImportError as _exc:  # the caller (KeyReference) turns this into an install hint
    raise ImportError("python-pkcs11 is not installed: pip install 'gpucrypt[pkcs11]'",
                      name="python-pkcs11") from _exc

__all__ = ["Pkcs11Key", "MODULE_ENV", "PIN_ENV", "DEFAULT_MODULES", "WRAP_CODES"]

MODULE_ENV, PIN_ENV = "GPUCRYPT_PKCS11_MODULE", "GPUCRYPT_PKCS11_PIN"
DEFAULT_MODULES = ("/usr/lib/softhsm/libsofthsm2.so",
                   "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                   "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
                   "/usr/local/lib/softhsm/libsofthsm2.so",
                   "/opt/homebrew/lib/softhsm/libsofthsm2.so")

#: first byte of a stanza body -> how the rest was made
WRAP_CODES = {1: "aes-kwp", 2: "aes-key-wrap-pad", 3: "aes-gcm", 4: "rsa-oaep-sha256",
              5: "rsa-oaep-sha1"}
_CODE = {name: code for code, name in WRAP_CODES.items()}
_OAEP = {4: (Mechanism.SHA256, MGF.SHA256), 5: (Mechanism.SHA_1, MGF.SHA1)}
_GCM_IV, _GCM_TAG_BITS = 12, 128

#: codes each class of key makes (wrap) and so is asked to open (unwrap)
_SECRET_CODES, _PRIVATE_CODES = (1, 2, 3), (4, 5)

_lock = threading.Lock()
_libraries: dict[str, tuple[Any, int]] = {}  # module real path -> (library, pid that loaded it)

#: the key of the digests of refused PINs below, random per process: so that no PIN is kept
#: as it is, and a digest does not match the same PIN's in another process or a log. It is
#: in the same memory as the digests, so a core dump holding both lets a short PIN be
#: found by trying them all: a salted hash against casual disclosure, nothing more
_PIN_DIGEST_KEY = os.urandom(32)
#: (module real path, token label, token serial) -> digests of PINs that token refused
_refused_pins: dict[tuple, set] = {}


def _new_lock_in_child() -> None:
    # a fork while another thread holds the lock (a session open in a reader thread) would
    # leave the child's copy held for ever: no thread of the child will release it
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _library(given: str) -> Any:
    """The loaded module at ``given`` (an absolute path, as :func:`_module_path` gives it),
    once per process (re-initialised after a fork), whatever spelling of the file names it.

    python-pkcs11 keeps the modules it loaded by the exact name given to ``pkcs11.lib()``
    (``pkcs11._loaded``, in 0.10), and loads a name it does not hold again, which calls
    C_Initialize again: the module refuses that (CKR_CRYPTOKI_ALREADY_INITIALIZED). Debian's
    /usr/lib/softhsm/libsofthsm2.so, gpucrypt's first default, is a link to the multiarch
    file, so a second spelling is common. So gpucrypt keys its own caches by the real path,
    takes the module python-pkcs11 holds under any spelling of it, else loads it under the
    name given (as an application configured with that name would), and enters both that
    name and the real path in python-pkcs11's table: an application's ``pkcs11.lib()``
    with either, before or after gpucrypt, gets the same module. ``pkcs11.unload(name)``
    removes one name and closes the module: :func:`_unload_every_name` removes the other
    names too (one left would hand out the closed module: a crash at its next call), and
    a cached module no longer in the table is loaded again."""
    path = os.path.realpath(given)
    cached = _libraries.get(path)
    table = getattr(pkcs11, "_loaded", None)
    if cached is not None and isinstance(table, dict) and not any(
            lib is cached[0] for lib in list(table.values())):
        _libraries.pop(path, None)  # unloaded by the application: closed, never to be called
        cached = None
    if cached is not None:
        lib, pid = cached
        if pid != os.getpid():
            lib.reinitialize()
            _libraries[path] = (lib, os.getpid())
    else:
        lib = _loaded_elsewhere(path)
        if lib is None:
            try:
                lib = pkcs11.lib(given)
            except (RuntimeError, OSError) as exc:
                hint = (": another library than python-pkcs11 initialised it in this process, "
                        "and a module takes one C_Initialize per process: reach it through "
                        "python-pkcs11 there too, or use gpucrypt from a process of its own"
                        if "already initialized" in str(exc) else "")
                raise KeyProviderError(f"cannot load the PKCS#11 module {given} ({exc}){hint}") \
                    from None
        _libraries[path] = (lib, os.getpid())
    table = getattr(pkcs11, "_loaded", None)
    if isinstance(table, dict):  # python-pkcs11 0.10's registry: name -> lib
        table.setdefault(given, lib)
        table.setdefault(path, lib)
    return lib


def _unload_every_name(so: str) -> None:
    """``pkcs11.unload``, which removes every name :func:`_library` entered for the module,
    not only ``so``, from python-pkcs11's table (installed in its place on import)."""
    table = getattr(pkcs11, "_loaded", {})
    lib = table.get(so)
    _python_pkcs11_unload(so)
    if lib is not None:
        for name in [name for name, other in list(table.items()) if other is lib]:
            table.pop(name, None)


_python_pkcs11_unload = pkcs11.unload
if isinstance(getattr(pkcs11, "_loaded", None), dict):  # the 0.10 registry _library uses
    pkcs11.unload = _unload_every_name


def _loaded_elsewhere(path: str) -> Any:
    """The module at real path ``path`` as python-pkcs11 loaded it under any name (the
    application's own ``pkcs11.lib(link)``), else None: loading it again would fail as
    above. python-pkcs11 0.10 keeps what it loaded in ``pkcs11._loaded`` (name -> lib)."""
    for name, lib in list(getattr(pkcs11, "_loaded", {}).items()):
        if os.path.realpath(name) == path:
            if not lib.initialized:  # as pkcs11.lib() does for a name it knows
                lib.initialize()
            return lib
    return None


# ------------------------------------------------------------------ C_Login, C_Logout
# python-pkcs11 0.10 calls C_Login only inside token.open(user_pin=...) (see the module
# docstring for why gpucrypt does not use that), so gpucrypt makes the call itself, through
# a CK_FUNCTION_LIST: the table of one module instance's entry points. It must be the
# instance python-pkcs11 opened the session on. A module may make a new instance for every
# C_GetFunctionList call: the p11-kit proxy (p11-kit-proxy.so, libp11-kit.so.0: how Debian,
# Fedora and RHEL usually reach an HSM) does, and a login sent to another instance fails
# (CKR_CRYPTOKI_NOT_INITIALIZED, or CKR_SESSION_HANDLE_INVALID: it has no such session).
# So the list is the module's C_GetFunctionList (the same list where the module has one
# instance: ctypes and python-pkcs11 share the one loaded copy of the file), else python-
# pkcs11's own (_pkcs11_function_list, read from its object layout: the proxy's case),
# whichever knows the session (C_GetSessionInfo); where neither does, the operation is
# refused (Pkcs11Key._unreachable says why python-pkcs11's own login is not the fallback).

_CKU_USER = 1
_CKS_USER_FUNCTIONS = (1, 3)  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS: the user is in
_CKR_OK, _CKR_USER_ALREADY_LOGGED_IN = 0x0, 0x100
_CKR_PIN_REFUSED = (0xA0, 0xA1, 0xA2)  # PIN_INCORRECT, PIN_INVALID, PIN_LEN_RANGE
_CKR_PIN_LOCKED = 0xA4
_CKR_NAMES = {0xA0: "PinIncorrect", 0xA1: "PinInvalid", 0xA2: "PinLenRange",
              0xA3: "PinExpired", 0xA4: "PinLocked", 0x101: "UserNotLoggedIn",
              0x102: "UserPinNotInitialized", 0x104: "AnotherUserAlreadyLoggedIn",
              0xB3: "SessionHandleInvalid", 0xE0: "TokenNotPresent", 0x32: "DeviceRemoved",
              0x190: "CryptokiNotInitialized"}
#: CK_FUNCTION_LIST up to C_Logout, in the order of the PKCS#11 headers (pkcs11f.h)
_FUNCTIONS = ("C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
              "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
              "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
              "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState",
              "C_SetOperationState", "C_Login", "C_Logout")


class _FunctionList(ctypes.Structure):
    if os.name == "nt":  # PKCS#11 packs its structures to 1 byte there (pkcs11.h)
        _pack_ = 1
    _fields_ = [("version", ctypes.c_ubyte * 2),
                *((name, ctypes.c_void_p) for name in _FUNCTIONS)]


_ulong = ctypes.c_ulong  # CK_ULONG, CK_RV, CK_SESSION_HANDLE, CK_USER_TYPE, CK_SLOT_ID


class _SessionInfo(ctypes.Structure):  # CK_SESSION_INFO
    if os.name == "nt":
        _pack_ = 1
    _fields_ = [("slot", _ulong), ("state", _ulong), ("flags", _ulong), ("device_error", _ulong)]


_LoginFn = ctypes.CFUNCTYPE(_ulong, _ulong, _ulong, ctypes.c_char_p, _ulong)
_LogoutFn = ctypes.CFUNCTYPE(_ulong, _ulong)
_SessionInfoFn = ctypes.CFUNCTYPE(_ulong, _ulong, ctypes.POINTER(_SessionInfo))
#: module path -> (the module as ctypes loaded it, which keeps the list alive; the address
#: of the list its C_GetFunctionList gave, 0 for none)
_module_lists: dict[str, tuple[Any, int]] = {}


class _Calls:
    """C_Login, C_Logout and C_GetSessionInfo of one module instance (one function list)."""

    def __init__(self, address: int):
        functions = _FunctionList.from_address(address)
        self.usable = (functions.version[0] in (2, 3) and bool(functions.C_Login)
                       and bool(functions.C_Logout) and bool(functions.C_GetSessionInfo))
        if self.usable:
            self.login = _LoginFn(functions.C_Login)
            self.logout = _LogoutFn(functions.C_Logout)
            self._session_info = _SessionInfoFn(functions.C_GetSessionInfo)

    def knows(self, handle: int) -> bool:
        """Whether ``handle`` is a session of this instance (an instance that is not the
        session's says CKR_CRYPTOKI_NOT_INITIALIZED or CKR_SESSION_HANDLE_INVALID)."""
        return self._state(handle) is not None

    def user_logged_in(self, handle: int) -> bool:
        """Whether the user is logged in to the token of session ``handle`` (PKCS#11 logs in
        an application, so every session of it says so, the application's login or not)."""
        return self._state(handle) in _CKS_USER_FUNCTIONS

    def _state(self, handle: int) -> int | None:
        info = _SessionInfo()
        if not self.usable or self._session_info(handle, ctypes.byref(info)) != _CKR_OK:
            return None
        return info.state


def _pkcs11_function_list(session: Any) -> int:
    """The address of the function list python-pkcs11 calls ``session``'s module through;
    0 where this python-pkcs11 is not laid out as 0.10 is.

    python-pkcs11 keeps it in a C field of its objects, with no Python attribute: in 0.10,
    ``HasFuncList.funclist``, the first field after the object header, which ``Session``,
    ``Token`` and ``lib`` inherit. The layout is checked before the field is read: that
    base class, its size (the header and three pointers: funclist, funclist30,
    funclist32), and the session and its token holding the same value. Another layout (an
    older python-pkcs11 kept one list in a module global) reads as 0, never as a guess."""
    if sys.implementation.name != "cpython":  # id() is no address elsewhere
        return 0
    base = getattr(sys.modules.get("pkcs11._pkcs11"), "HasFuncList", None)
    header = object.__basicsize__
    if (not isinstance(base, type)
            or base.__basicsize__ != header + 3 * ctypes.sizeof(ctypes.c_void_p)
            or not isinstance(session, base)
            or not isinstance(getattr(session, "token", None), base)):
        return 0
    address = ctypes.c_void_p.from_address(id(session) + header).value or 0
    token = ctypes.c_void_p.from_address(id(session.token) + header).value or 0
    return address if address == token else 0


def _module_function_list(path: str) -> int:
    """The address of the function list the module at ``path``'s C_GetFunctionList gives
    (asked once per process, per real path); 0 where it gives none."""
    path = os.path.realpath(path)
    cached = _module_lists.get(path)
    if cached is None:
        functions = ctypes.POINTER(_FunctionList)()
        try:
            module = ctypes.CDLL(path)
            get_list = module.C_GetFunctionList
        except (OSError, AttributeError):
            module, address = None, 0
        else:
            get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
            get_list.restype = _ulong
            ok = get_list(ctypes.byref(functions)) == _CKR_OK and functions
            address = ctypes.addressof(functions.contents) if ok else 0
        cached = _module_lists[path] = (module, address)
    return cached[1]


def _session_calls(path: str, session: Any) -> _Calls | None:
    """C_Login and C_Logout of the module instance ``session`` is open on (see above);
    None where no list gpucrypt can reach knows the session."""
    tried = set()
    # the module's own list first: a documented call, and the instance python-pkcs11 uses
    # wherever the module has one (SoftHSM2, vendors' modules); python-pkcs11's, read from
    # its object layout, only for a module that makes an instance per call (the proxy)
    for address in (_module_function_list(path), _pkcs11_function_list(session)):
        if address and address not in tried:
            tried.add(address)
            calls = _Calls(address)
            if calls.knows(session.handle):
                return calls
    return None


def _login(calls: _Calls, session: Any, pin: str) -> bool:
    """Log the user in through ``session`` (``calls``: its instance's): True when this
    login is gpucrypt's (to log out when done), False when the application was logged in
    already (left so); :class:`_LoginRefused`, carrying the ``CKR`` code, otherwise."""
    pin_bytes = pin.encode("utf-8")
    rv = calls.login(session.handle, _CKU_USER, pin_bytes, len(pin_bytes))
    if rv == _CKR_USER_ALREADY_LOGGED_IN:
        return False
    if rv != _CKR_OK:
        raise _LoginRefused(rv)
    return True


class _LoginRefused(Exception):
    """C_Login's return value, when not CKR_OK (nor already logged in)."""

    def __init__(self, rv: int):
        super().__init__(rv)
        self.rv = rv


def _module_path(given: str | None) -> str:
    """The module to load, as it is spelled (:func:`_library` knows it by its real path
    too): ``given`` (the URI's ``module-path``), else ``$GPUCRYPT_PKCS11_MODULE``, else the
    first of :data:`DEFAULT_MODULES` found. A relative one is refused (KeysetError), as a
    relative ``pin-source`` is: loading it would run whatever library the using process's
    folder (a worker's) holds under that name."""
    attribute, path = ("module-path", given) if given else (MODULE_ENV, os.environ.get(MODULE_ENV))
    if path:
        check_absolute(attribute, path, f"{attribute}=/path/to/module.so")
        if not os.path.exists(path):
            raise KeyProviderError(f"PKCS#11 module {path} does not exist")
        return path
    for candidate in DEFAULT_MODULES:
        if os.path.exists(candidate):
            return candidate
    raise KeyProviderError(f"no PKCS#11 module: give module-path=/path/lib.so in the key URI or "
                           f"set {MODULE_ENV} (SoftHSM2: apt-get install softhsm2)")


#: URI attributes that pick one of several tokens, not the key (see Pkcs11Key.owns)
_TOKEN_CHOICE = ("serial", "manufacturer", "model")


class Pkcs11Key:
    """A key on a PKCS#11 token, named by token label and key label (and optionally its
    ``CKA_ID`` and type); the token's ``serial``, ``manufacturer`` and ``model``, when
    given, narrow which token; stanzas record them, and a stanza naming the same token
    label and key is this key's whatever they say (see ``owns``). See the module
    docstring for the mechanisms.

    ``Pkcs11Key("prod", "model-kek", module_path=..., pin_source="env:HSM_PIN")``, or from a
    URI through :class:`gpucrypt.keys.KeyReference`. No session is opened until used.
    """

    provider = "pkcs11"

    def __init__(self, token: str, label: str | None = None, *, key_id: bytes | None = None,
                 key_type: str | None = None, module_path: str | None = None,
                 pin_source: str | None = None, wrap: str | None = None,
                 serial: str | None = None, manufacturer: str | None = None,
                 model: str | None = None):
        if label is None and key_id is None:
            raise ValueError("name the key by label and/or key_id")
        if wrap not in (None, "aes-gcm"):
            raise ValueError("wrap may only force 'aes-gcm' (the rest follows the key's type)")
        self.token, self.label, self.key_id, self.key_type = token, label, key_id, key_type
        self.module_path, self.pin_source, self.force_gcm = module_path, pin_source, wrap == "aes-gcm"
        self.serial, self.manufacturer, self.model = serial, manufacturer, model
        # what stanzas record (no query), serial/manufacturer/model included: two tokens of
        # one label (an HSM and its twin) are two recipients. A stanza is this key's when it
        # names the same token label and key, whatever else it says: files written before
        # those attributes were recorded open with a URI that has them, and the other way
        path = {"token": token, **({"object": label} if label else {}),
                **({"id": pkcs11_id_text(key_id)} if key_id else {})}
        self._key_reference = KeyUri("pkcs11", path).canonical()
        path.update((k, v) for k, v in (("serial", serial), ("manufacturer", manufacturer),
                                        ("model", model)) if v is not None)
        self.reference = KeyUri("pkcs11", path).canonical()

    @classmethod
    def from_uri(cls, uri: KeyUri) -> "Pkcs11Key":
        from urllib.parse import unquote_to_bytes

        path, query = uri.path, uri.query
        raw_id = unquote_to_bytes(path["id"]) if "id" in path else None
        return cls(path["token"], path.get("object"), key_id=raw_id, key_type=path.get("type"),
                   module_path=query.get("module-path"), pin_source=query.get("pin-source"),
                   wrap=query.get("x-wrap"), serial=path.get("serial"),
                   manufacturer=path.get("manufacturer"), model=path.get("model"))

    def __repr__(self) -> str:
        return f"Pkcs11Key({self.reference!r})"

    # --- sessions and objects
    def _token(self, path: str) -> Any:
        """The one token of the module at ``path`` with this label (and serial, manufacturer,
        model when given); KeyProviderError for none or several."""
        lib = _library(path)
        serial = None if self.serial is None else self.serial.encode("utf-8")
        found = [t for t in lib.get_tokens(token_label=self.token, token_serial=serial)
                 if self.manufacturer in (None, t.manufacturer_id)
                 and self.model in (None, t.model)]
        if not found:
            narrowed = " with that serial, manufacturer or model" \
                if (self.serial, self.manufacturer, self.model) != (None, None, None) else ""
            raise KeyProviderError(f"{self.reference}: no token labelled {self.token!r}{narrowed} "
                                   f"in the PKCS#11 module (softhsm2-util --show-slots lists them)")
        if len(found) > 1:
            raise KeyProviderError(f"{self.reference}: {len(found)} tokens match; add serial= to "
                                   f"the URI to say which (softhsm2-util --show-slots lists "
                                   f"their serial numbers)")
        return found[0]

    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        """A session on the token, logged in as the user, closed when the block ends (and
        logged out if gpucrypt logged it in: the module docstring says why and when). A PIN
        this token refused before is not sent again (the module docstring says how it is
        remembered), unless the application is logged in to the token already: then no PIN
        is sent, as C_Login would only answer USER_ALREADY_LOGGED_IN. The caller holds
        ``_lock``, which guards that memory too."""
        path = _module_path(self.module_path)
        token = self._token(path)
        pin = read_secret_source(self.pin_source, PIN_ENV,
                                 f"the user PIN of PKCS#11 token {self.token!r}")
        refused = _refused_pins.setdefault((os.path.realpath(path), token.label, token.serial),
                                           set())
        digest = hmac.digest(_PIN_DIGEST_KEY, pin.encode("utf-8"), "sha256")
        try:
            session = token.open()  # public; logged in below, where a failure can close it
        except _p11e.PKCS11Error as exc:
            raise KeyProviderError(f"{self.reference}: cannot open a session "
                                   f"({type(exc).__name__})") from None
        try:
            calls = _session_calls(path, session)
            if calls is None:
                raise self._unreachable(path)
            if digest not in refused:
                ours = _login(calls, session, pin)
            elif calls.user_logged_in(session.handle):
                ours = False  # the application's login serves; no PIN is sent
            else:
                raise self._refused_before()
        except BaseException as exc:
            with contextlib.suppress(_p11e.PKCS11Error):
                session.close()
            if not isinstance(exc, _LoginRefused):
                raise
            if exc.rv in _CKR_PIN_REFUSED:
                refused.add(digest)
            raise self._login_error(exc.rv) from None
        try:
            yield session
        finally:
            # a failure here is not the operation's: its result, or its own error, stands
            with contextlib.suppress(_p11e.PKCS11Error):
                try:
                    if ours:
                        calls.logout(session.handle)
                finally:
                    session.close()

    def _unreachable(self, path: str) -> KeyProviderError:
        """The refusal where no function list gpucrypt can reach knows the session. What
        gpucrypt sees is only that: the cause may be a module that makes an instance per
        C_GetFunctionList (the p11-kit proxy) with a python-pkcs11 not laid out as 0.10 or
        a Python other than CPython, a function list of a version gpucrypt does not read,
        or a C_GetSessionInfo that fails.

        python-pkcs11's own login (``token.open(user_pin=)``) is not the fallback, because
        it leaks sessions no one can close: it opens a session, then logs in, and a login
        that fails raises before a Session object holds the handle. So each refused PIN
        left one session open, and where the application was logged in already
        (UserAlreadyLoggedIn) each operation left one, until the process exits; a token's
        session limit then denies every application on it. The handle cannot be closed
        afterwards either: only the instance gpucrypt cannot reach knows it, and
        C_CloseAllSessions would close the application's sessions too. Remembering the
        login state and refused PINs would only bound the leak; refusing ends it."""
        return KeyProviderError(
            f"{self.reference}: cannot log in through the PKCS#11 module {path}: the module "
            f"instance python-pkcs11 opened the session on cannot be reached (for example "
            f"the p11-kit proxy with a python-pkcs11 other than 0.10). With the proxy, "
            f"install python-pkcs11 0.10 on CPython (pip install 'python-pkcs11>=0.10,<0.11'), "
            f"or name the token's own module in module-path= instead; no PIN was sent")

    def _pin_source(self) -> str:
        return self.pin_source or f"env:{PIN_ENV}"

    def _refused_before(self) -> KeyProviderError:
        return KeyProviderError(
            f"{self.reference}: the token refused the PIN before, in this process, so it is "
            f"not sent again (tokens lock the user PIN after a few wrong tries): fix the PIN "
            f"source ({self._pin_source()}); the next operation reads it again (where the "
            f"token's PIN was changed to this one since, restart the process)")

    def _login_error(self, rv: int) -> KeyProviderError:
        if rv in _CKR_PIN_REFUSED:
            return KeyProviderError(f"{self.reference}: the token refused the PIN: check the "
                                    f"PIN source ({self._pin_source()}); this process will not "
                                    f"send that PIN to the token again")
        if rv == _CKR_PIN_LOCKED:
            return KeyProviderError(f"{self.reference}: the token's user PIN is locked")
        return KeyProviderError(f"{self.reference}: cannot log in to the token "
                                f"({_CKR_NAMES.get(rv, f'CKR 0x{rv:X}')})")

    def _find(self, session: Any, classes: tuple) -> Any:
        found = []
        for object_class in classes:
            try:
                found.append(session.get_key(object_class=object_class, label=self.label,
                                             id=self.key_id))
            except _p11e.NoSuchKey:
                continue
            except _p11e.MultipleObjectsReturned:
                raise KeysetError(f"{self.reference}: several keys match; add id= or type= to "
                                  f"the URI") from None
        if not found:
            raise KeyNotFound(f"{self.reference}: no such key on the token")
        return found[0]

    def _classes(self, for_wrap: bool) -> tuple:
        by_type = {"secret-key": (ObjectClass.SECRET_KEY,), "private": (ObjectClass.PRIVATE_KEY,),
                   "public": (ObjectClass.PUBLIC_KEY,)}
        if self.key_type:
            return by_type[self.key_type]
        return (ObjectClass.SECRET_KEY,
                ObjectClass.PUBLIC_KEY if for_wrap else ObjectClass.PRIVATE_KEY)

    # --- ExternalKey
    def owns(self, stanza_id: str) -> bool:
        if stanza_id in (self.reference, self._key_reference):
            return True
        try:
            uri = parse_key_uri(stanza_id)
        except (KeysetError, TypeError):
            return False
        if uri.scheme != "pkcs11" or any(k not in _PKCS11_PATH for k in uri.path):
            return False
        mine = {"serial": self.serial, "manufacturer": self.manufacturer, "model": self.model}
        if any(uri.path.get(k) not in (None, mine[k]) and mine[k] is not None
               for k in _TOKEN_CHOICE):
            return False  # both name the token, differently: another token's (a twin's)
        key_part = {k: v for k, v in uri.path.items() if k not in _TOKEN_CHOICE}
        return KeyUri("pkcs11", key_part).canonical() == self._key_reference

    def wrap(self, dek: bytes, context: Mapping[str, str]) -> tuple[str, bytes]:
        with _lock, self._session() as session:
            key = self._find(session, self._classes(for_wrap=True))
            try:
                if key.key_type == KeyType.AES:
                    code, body = self._wrap_aes(session, key, dek, context)
                elif key.key_type == KeyType.RSA:
                    code, body = self._wrap_rsa(key, dek)
                else:
                    raise KeysetError(f"{self.reference}: a {key.key_type.name} key cannot wrap "
                                      f"data keys (use an AES key or an RSA key pair)")
            except _p11e.PKCS11Error as exc:
                raise KeyUnavailable(f"{self.reference}: the token refused to wrap a data key "
                                     f"({type(exc).__name__}; the key needs CKA_WRAP or "
                                     f"CKA_ENCRYPT)") from None
        return self.reference, bytes([code]) + body

    def _wrap_aes(self, session: Any, key: Any, dek: bytes, context) -> tuple[int, bytes]:
        mechanisms = session.token.slot.get_mechanisms() if not self.force_gcm else set()
        for name, mechanism in (("aes-kwp", Mechanism.AES_KEY_WRAP_KWP),
                                ("aes-key-wrap-pad", Mechanism.AES_KEY_WRAP_PAD)):
            if mechanism in mechanisms:
                copy = session.create_object({
                    Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                    Attribute.VALUE: dek, Attribute.TOKEN: False, Attribute.EXTRACTABLE: True,
                    Attribute.SENSITIVE: False})
                try:
                    return _CODE[name], key.wrap_key(copy, mechanism=mechanism)
                finally:
                    copy.destroy()
        iv = os.urandom(_GCM_IV)
        sealed = key.encrypt(dek, mechanism=Mechanism.AES_GCM,
                             mechanism_param=GCMParams(iv, context_bytes(context), _GCM_TAG_BITS))
        return _CODE["aes-gcm"], iv + sealed

    def _wrap_rsa(self, public: Any, dek: bytes) -> tuple[int, bytes]:
        for code in (4, 5):
            try:
                return code, public.encrypt(dek, mechanism=Mechanism.RSA_PKCS_OAEP,
                                            mechanism_param=(*_OAEP[code], None))
            except (_p11e.ArgumentsBad, _p11e.MechanismParamInvalid):
                continue  # SoftHSM2 2.6 accepts only SHA-1 for OAEP
        raise KeyUnavailable(f"{self.reference}: the token supports RSA-OAEP with neither SHA-256 "
                             f"nor SHA-1")

    def _unwrapping_key(self, session: Any, code: int) -> Any:
        """The key that opens what this reference wraps: the secret key, or the private
        half of the key pair whose public half wraps; where the URI names no ``type``, the
        one ``wrap`` would use (a secret key of the label first). ``code`` checked against
        it (see ``_check_code``)."""
        if self.key_type is None:
            try:
                key, secret = self._find(session, (ObjectClass.SECRET_KEY,)), True
            except KeyNotFound:
                key, secret = self._find(session, (ObjectClass.PRIVATE_KEY,)), False
        else:
            secret = self.key_type == "secret-key"
            key = self._find(session, (ObjectClass.SECRET_KEY if secret
                                       else ObjectClass.PRIVATE_KEY,))
        self._check_code(secret, code)
        return key

    def _check_code(self, secret: bool, code: int) -> None:
        """KeyUnavailable unless ``code`` (the stanza body's first byte, which whoever wrote
        the file chose) is a wrapping this reference's key makes: a secret-key reference
        must not open RSA-OAEP stanzas, which anyone holding the public key of a pair with
        the same label can make, nor a key pair's reference AES ones."""
        if code not in (_SECRET_CODES if secret else _PRIVATE_CODES):
            kind = "a secret (AES) key" if secret else "an RSA key pair"
            raise KeyUnavailable(f"{self.reference} names {kind}, which does not make "
                                 f"{WRAP_CODES[code]} stanzas: this one was made with another "
                                 f"key of the same label, or forged (add type= to the URI to "
                                 f"name the other key)")

    def unwrap(self, stanza_id: str, body: bytes, context: Mapping[str, str]) -> bytes:
        if not self.owns(stanza_id):
            raise KeyNotFound(f"{self.reference} does not own {printable_text(stanza_id)}")
        code, data = (body[0], bytes(body[1:])) if body else (0, b"")
        if code not in WRAP_CODES:
            raise KeyUnavailable(f"{self.reference}: unknown wrapping {code} in the envelope")
        rsa = code in _OAEP
        if self.key_type is not None:  # plain from the URI: no session needed to refuse
            self._check_code(self.key_type == "secret-key", code)
        with _lock, self._session() as session:
            key = self._unwrapping_key(session, code)
            try:
                if rsa:
                    return key.decrypt(data, mechanism=Mechanism.RSA_PKCS_OAEP,
                                       mechanism_param=(*_OAEP[code], None))
                if code == _CODE["aes-gcm"]:
                    return key.decrypt(data[_GCM_IV:], mechanism=Mechanism.AES_GCM,
                                       mechanism_param=GCMParams(data[:_GCM_IV], context_bytes(context),
                                                                 _GCM_TAG_BITS))
                mechanism = (Mechanism.AES_KEY_WRAP_KWP if code == _CODE["aes-kwp"]
                             else Mechanism.AES_KEY_WRAP_PAD)
                copy = key.unwrap_key(ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, data,
                                      mechanism=mechanism,
                                      template={Attribute.EXTRACTABLE: True,
                                                Attribute.SENSITIVE: False,
                                                Attribute.TOKEN: False})
                try:
                    return bytes(copy[Attribute.VALUE])
                finally:
                    copy.destroy()
            except _p11e.PKCS11Error as exc:
                # RSA-OAEP: one message whatever the token's reason. Telling a decoding
                # failure from a padding one is what a chosen-ciphertext (Manger) attack on
                # a service that reports errors for files it is sent needs
                reason = "" if code in _PRIVATE_CODES else f" ({type(exc).__name__})"
                raise KeyUnavailable(f"{self.reference}: the token refused to unwrap the data key"
                                     f"{reason}: the envelope was altered, or made for another "
                                     f"file or with another key") from None

