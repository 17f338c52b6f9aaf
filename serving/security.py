"""Transport security and authentication for every server and client of the project, in one place.

- TLS and mutual TLS from PEM files (`server_certificates`, `client_credentials`). Every TLS file of every
  port and hop is re-read when it changes, through one mechanism (`Reloading`): the user of the files asks
  for them when it needs them (gRPC's certificate fetcher and the HTTP port on every new connection's
  handshake, the channel makers before a new channel or call), only files whose identity (inode, mtime,
  size) changed are read again, and files that do not check out (half a rotation) keep the previous
  ones. So a rotated Kubernetes Secret (the kubelet swaps a symlink) takes effect without a restart.
  SIGHUP forces a re-read (`reload_all`).
- Bearer tokens: `BearerTokenInterceptor` checks "authorization: Bearer <token>" against every allowed
  token in constant time; tokens come from a file (one per line, re-read on change, so a new token can be
  added before the old one is removed) and/or an environment variable. Health stays open for probes.
  Clients send a token with `token_call_credentials` (also re-read from its file on change).

Nothing here logs or returns a token, a key or a server file path: a misconfiguration names the setting.
"""
from __future__ import annotations

import hmac
import logging
import os
import ssl
import threading
import weakref
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Generic, Iterable, Mapping, Sequence, TypeVar

import grpc

from serving.interceptors import GuardInterceptor

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
BEARER = "bearer "
# Kubernetes probes (grpc health) and nothing else may call without a token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
UNAUTHENTICATED_MESSAGE = "unauthenticated"


class SecurityConfigError(ValueError):
    """A TLS or token setting is unusable; the message names the setting, never the file's path or content."""


def _identity(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (inode: symlink swap or rename; mtime; size)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{setting}: cannot read the file ({exc.strerror})") from None


class WatchedFiles:
    """A set of files read together, re-read when any of them changes (or after `invalidate`)."""

    def __init__(self, files: Mapping[str, str]):  # setting name -> path
        self.files = dict(files)
        self._seen: tuple | None = None
        self._lock = threading.Lock()

    def changed(self) -> bool:
        """True once per change: the caller then reads the files again."""
        with self._lock:
            now = tuple(_identity(p) for p in self.files.values())
            if now == self._seen:
                return False
            self._seen = now
            return True

    def invalidate(self) -> None:
        with self._lock:
            self._seen = None

    def read(self) -> dict[str, bytes]:
        return {setting: _read(path, setting) for setting, path in self.files.items()}


# Everything that SIGHUP should re-read (weak: a stopped server's watchers go away with it).
_WATCHED: "weakref.WeakSet[WatchedFiles]" = weakref.WeakSet()


def reload_all() -> None:
    """Forces every certificate and token file of this process to be re-read at its next use (SIGHUP)."""
    for watched in list(_WATCHED):
        watched.invalidate()


def watch_files(files: Mapping[str, str]) -> WatchedFiles:
    """WatchedFiles that SIGHUP (reload_all) also invalidates."""
    watched = WatchedFiles(files)
    _WATCHED.add(watched)
    return watched


def _check_key_pair(cert_file: str, key_file: str) -> None:
    # The ssl module parses both and checks that the key belongs to the certificate; gRPC would only fail
    # the next handshake, with nothing in the log to say why.
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError, ValueError):
        raise SecurityConfigError("tls-cert-file / tls-key-file: not a PEM certificate and its private key") from None


def _check_ca(ca_file: str, setting: str) -> None:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_verify_locations(ca_file)
    except (ssl.SSLError, OSError, ValueError):
        raise SecurityConfigError(f"{setting}: not a PEM CA certificate") from None


T = TypeVar("T")


class Reloading(Generic[T]):
    """What is built from a set of TLS files (server credentials, an SSL context, client credentials), built
    again when any of them changes: the one reload mechanism of every TLS port and hop of the project.

    `build` reads the files and checks them (a key that does not match its certificate, a CA file that is
    not PEM); when it fails, a rotation is half done (the kubelet writes files one by one) or the Secret is
    broken: the previous value is kept and the next change is tried again. Callers ask `current()` (or
    `refresh()`) at the moment they need the files: a handshake, a new channel, a call. Checking costs a
    stat of each file. SIGHUP (reload_all) forces a rebuild at the next ask."""

    def __init__(self, what: str, files: Mapping[str, str], build: Callable[[], T]):
        self.what = what
        self.watched = watch_files(files)
        self.watched.changed()  # the initial contents are current
        self._build = build
        self._lock = threading.Lock()  # gRPC's handshakes call from several threads
        self.value: T = build()  # a broken file at start-up is an error, not a warning
        self.loads = 1  # values built, the first one included: tests and logs

    def refresh(self) -> bool:
        """Rebuilds if the files changed since the last look; True when a new value was built."""
        with self._lock:
            if not self.watched.changed():
                return False
            try:
                value = self._build()
            except SecurityConfigError as exc:
                log.warning("%s: TLS files changed but are unusable (%s); keeping the previous ones", self.what, exc)
                return False
            except Exception:  # noqa: BLE001 - a handshake must not fail inside gRPC or ssl because of this
                log.exception("%s: reloading the TLS files failed; keeping the previous ones", self.what)
                return False
            self.value = value
            self.loads += 1
        log.info("%s: TLS files reloaded", self.what)
        return True

    def current(self) -> T:
        self.refresh()
        return self.value


def _present(files: Mapping[str, str | None]) -> dict[str, str]:
    return {setting: path for setting, path in files.items() if path}


# ---------------------------------------------------------------------------------------------- servers


class ServerCertificates:
    """The server's certificate, key and (for mutual TLS) client CA, reloaded when the files change."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None = None):
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self.reloading = Reloading("gRPC port", _present(
            {"tls-cert-file": cert_file, "tls-key-file": key_file, "tls-client-ca-file": client_ca_file}),
            self._configuration)
        self.initial = self.reloading.value

    @property
    def loads(self) -> int:
        return self.reloading.loads

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        _check_key_pair(self.cert_file, self.key_file)
        if self.client_ca_file:
            _check_ca(self.client_ca_file, "tls-client-ca-file")
        pair = (_read(self.key_file, "tls-key-file"), _read(self.cert_file, "tls-cert-file"))
        client_ca = _read(self.client_ca_file, "tls-client-ca-file") if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher (every new connection's handshake): None keeps the
        current configuration."""
        return self.reloading.value if self.reloading.refresh() else None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self.client_ca_file is not None)


def server_certificates(cert_file: str | None, key_file: str | None,
                        client_ca_file: str | None = None) -> ServerCertificates | None:
    """None (plaintext) without a certificate; mutual TLS when a client CA is given."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise SecurityConfigError("tls-client-ca-file needs tls-cert-file and tls-key-file")
        return None
    if not (cert_file and key_file):
        raise SecurityConfigError("tls-cert-file and tls-key-file go together")
    return ServerCertificates(cert_file, key_file, client_ca_file or None)


class AllowedTokens:
    """Tokens a server accepts: lines of a file (re-read when it changes; blank lines and # comments are
    skipped) plus those of an environment variable (comma- or whitespace-separated)."""

    def __init__(self, file: str | None = None, env_var: str | None = None,
                 environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self._fixed = [t.encode() for t in _split_tokens(environ.get(env_var, ""))] if env_var else []
        if env_var and not self._fixed:
            raise SecurityConfigError(f"auth-tokens-env: the variable {env_var} holds no token")
        self.watched = watch_files({"auth-tokens-file": file}) if file else None
        self._from_file: list[bytes] = []
        self.tokens()  # fail at start-up, not at the first call, when the file is unreadable or empty

    def tokens(self) -> list[bytes]:
        if self.watched is not None and self.watched.changed():
            try:
                text = self.watched.read()["auth-tokens-file"].decode("utf-8")
                tokens = [t.encode() for t in _split_tokens(text, lines_only=True)]
            except (SecurityConfigError, UnicodeDecodeError) as exc:
                if not self._from_file:
                    raise SecurityConfigError(f"auth-tokens-file: unusable ({exc})") from None
                log.warning("auth tokens file changed but is unusable; keeping the previous tokens")
                return [*self._fixed, *self._from_file]
            if not tokens:
                if not self._from_file:
                    raise SecurityConfigError("auth-tokens-file holds no token")
                # An empty file mid-rotation would lock everyone out: keep the previous tokens.
                log.warning("auth tokens file is empty; keeping the previous tokens")
            else:
                if self._from_file:
                    log.info("auth tokens reloaded (%d allowed)", len(tokens))
                self._from_file = tokens
        return [*self._fixed, *self._from_file]

    def allows(self, presented: bytes) -> bool:
        # Compare against every token, without stopping at the first match: the time taken says nothing
        # about which token (or which prefix) matched.
        ok = False
        for token in self.tokens():
            ok |= hmac.compare_digest(presented, token)
        return ok


def _split_tokens(text: str, lines_only: bool = False) -> list[str]:
    if lines_only:
        lines = (line.strip() for line in text.splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    return [t for t in text.replace(",", " ").split() if t]


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if value[: len(BEARER)].lower() == BEARER:
                return value[len(BEARER):].strip().encode("utf-8", "replace")
            return None
    return None


class BearerTokenInterceptor(GuardInterceptor):
    """UNAUTHENTICATED unless the call carries an allowed bearer token; health stays open for probes.

    The answer is the same whatever failed (no header, wrong scheme, unknown token), and the presented
    value is never logged."""

    def __init__(self, tokens: AllowedTokens, open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES):
        self.allowed = tokens
        self.open_prefixes = tuple(open_prefixes)

    @asynccontextmanager
    async def guard(self, method: str, context: grpc.aio.ServicerContext):
        if not method.startswith(self.open_prefixes):
            presented = _bearer(context.invocation_metadata())
            if presented is None or not self.allowed.allows(presented):
                log.info("%s: UNAUTHENTICATED from %s", method, context.peer())
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield


def auth_interceptors(tokens_file: str | None, tokens_env: str | None = None) -> list[grpc.aio.ServerInterceptor]:
    """[BearerTokenInterceptor] when tokens are configured, else [] (no authentication)."""
    if not tokens_file and not tokens_env:
        return []
    return [BearerTokenInterceptor(AllowedTokens(tokens_file, tokens_env))]


# ---------------------------------------------------------------------------------------------- clients


def client_credentials(ca_file: str | None = None, cert_file: str | None = None,
                       key_file: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS for a client: the CA that signed the server's certificate (None: the system's roots), and for
    mutual TLS the client's certificate and key. None (plaintext) when nothing is given. The files are
    checked (the key belongs to the certificate, the CA is PEM) and read once: a channel's credentials are
    fixed, so a rotated client certificate takes a new channel (`reloading_client_credentials`)."""
    if not (ca_file or cert_file or key_file):
        return None
    if bool(cert_file) != bool(key_file):
        raise SecurityConfigError("the client certificate and its key go together")
    if cert_file:
        _check_key_pair(cert_file, key_file)
    if ca_file:
        _check_ca(ca_file, "tls-ca-file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "tls-ca-file") if ca_file else None,
        private_key=_read(key_file, "tls-key-file") if key_file else None,
        certificate_chain=_read(cert_file, "tls-cert-file") if cert_file else None,
    )


def reloading_client_credentials(what: str, ca_file: str | None = None, cert_file: str | None = None,
                                 key_file: str | None = None) -> Reloading[grpc.ChannelCredentials | None]:
    """`client_credentials`, built again when the files change: whoever makes channels (the orchestrator
    towards the model services, the model services towards Triton) asks `current()` and makes new ones
    when the value changed."""
    return Reloading(what, _present({"tls-ca-file": ca_file, "tls-cert-file": cert_file, "tls-key-file": key_file}),
                     lambda: client_credentials(ca_file, cert_file, key_file))


class _TokenPlugin(grpc.AuthMetadataPlugin):
    """Adds "authorization: Bearer <token>" to every call; a file is re-read when it changes."""

    def __init__(self, token: Callable[[], str]):
        self._token = token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            callback(((AUTH_HEADER, f"Bearer {self._token()}"),), None)
        except Exception as exc:  # noqa: BLE001 - gRPC fails the call with this error
            callback((), exc)


class _TokenFile:
    def __init__(self, path: str):
        self.watched = watch_files({"token-file": path})
        self._token = ""
        self()  # fail now if unreadable

    def __call__(self) -> str:
        if self.watched.changed() or not self._token:
            lines = _split_tokens(self.watched.read()["token-file"].decode("utf-8"), lines_only=True)
            if not lines:
                raise SecurityConfigError("token-file holds no token")
            self._token = lines[0]  # the first line is the one to send; the server may allow more
        return self._token


def token_call_credentials(token: str | None = None, token_file: str | None = None) -> grpc.CallCredentials | None:
    """Call credentials sending a bearer token (given, or the first line of `token_file`, re-read on
    change); None when neither is given. gRPC sends them only over TLS or local (loopback) credentials."""
    if token_file:
        return grpc.metadata_call_credentials(_TokenPlugin(_TokenFile(token_file)), name="bearer-token-file")
    if token:
        token = token.strip()
        return grpc.metadata_call_credentials(_TokenPlugin(lambda: token), name="bearer-token")
    return None
