"""CURVE encryption and authentication for every TCP socket (``zmq.auth``), with separate roles.

A cluster's key directory (made by ``idunno up`` in its data directory on first use, or by
``idunno keys init`` for a multi-host cluster) holds:

  coordinator.key(_secret)  the coordinators: they serve the control/PUB/log ports with it
  worker.key(_secret)       the workers: they serve the SDFS data ports with it and join with it
  client.key(_secret)       operators, scripts, the CLI: commands and SDFS reads/puts only
  grant.key                 HMAC secret of the coordinators and workers: write grants (below)
  authorized/               public keys of further clients (``*.key``); each is a client

Every server completes a handshake only with a key it knows, and the ZAP handler reports the
peer's *role* as the ZAP User-Id, so a daemon checks each message against who sent it
(:func:`role_of`): a client key cannot speak the worker protocol, and the log port (ZAP domain
``nodes``) admits coordinator and worker keys only. A write to a data port needs a grant
(:func:`grant`) the master signed for exactly that name, version, size and checksum: a client key
can only store what the master allocated to it.

Processes serve with their own role's key (``enable(dir, role)``); a client socket uses the keys
of ``Config.curve_dir`` (:func:`select`), so one process can talk to several clusters.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils import z85

log = logging.getLogger("idunno.security")

COORDINATOR, WORKER, CLIENT = "coordinator", "worker", "client"
ROLES = (COORDINATOR, WORKER, CLIENT)
SERVING_ROLES = (COORDINATOR, WORKER)
# ZAP domains: "" (every known key) and NODES (the log port: coordinators and workers only).
NODES = "nodes"
# Which server a client socket connects to decides the server key it expects.
DATA = "data"
GRANT_TTL = 3600.0  # seconds a write grant stays valid (puts time out after 600 s)


class KeysError(RuntimeError):
    """The key directory is missing what this role needs."""


@dataclass
class Curve:
    role: str
    directory: Path
    public: bytes
    secret: bytes
    coordinator_public: bytes
    worker_public: bytes
    grant_key: bytes | None = None  # coordinators and workers only
    roles: dict[bytes, str] = field(default_factory=dict)  # z85 public key -> role (servers)

    def server_key(self, peer: str) -> bytes:
        return self.worker_public if peer == DATA else self.coordinator_public


CURRENT: Curve | None = None  # this process's own keys (daemons); clients may use select(cfg.curve_dir)
# Client keys for a client socket given no key directory: a launcher's clients reach the cluster it
# started (`LocalCluster` sets it) without every call naming the keys.
DEFAULT_CLIENT: Curve | None = None
_authenticator = None  # the ZAP thread once this process serves securely
_cache: dict[tuple[str, str], Curve] = {}


def init_keys(directory: str | Path, overwrite: bool = False) -> Path:
    """Create a cluster key directory: one keypair per role, the grant secret, ``authorized/``."""
    import zmq.auth  # noqa: PLC0415 - only processes that make or load keys pay for it

    d = Path(directory)
    if (d / "coordinator.key_secret").exists() and not overwrite:
        raise FileExistsError(f"keys already exist in {d} (use --force to replace them)")
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    (d / "authorized").mkdir(exist_ok=True)
    for role in ROLES:
        zmq.auth.create_certificates(str(d), role)
    grant = d / "grant.key"
    grant.write_text(secrets.token_hex(32) + "\n")
    for p in [*d.glob("*.key_secret"), grant]:
        p.chmod(0o600)
    _cache.clear()
    return d


def has_keys(directory: str | Path) -> bool:
    return (Path(directory) / "coordinator.key").exists()


def load(directory: str | Path, role: str = CLIENT) -> Curve:
    """The keys of ``role`` from a key directory (cached); a clear error for what is missing."""
    import zmq.auth  # noqa: PLC0415

    d = Path(directory)
    cached = _cache.get((str(d), role))
    if cached is not None:
        return cached
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    try:
        coordinator_public, _ = zmq.auth.load_certificate(str(d / "coordinator.key"))
        worker_public, _ = zmq.auth.load_certificate(str(d / "worker.key"))
        public, secret = zmq.auth.load_certificate(str(d / f"{role}.key_secret"))
    except (OSError, ValueError) as exc:
        raise KeysError(f"{d} is not a usable key directory for a {role} ({exc}); "
                        f"create one with `idunno keys init`") from None
    if secret is None:
        raise KeysError(f"{d / (role + '.key_secret')} holds no secret key")
    grant_key = None
    roles: dict[bytes, str] = {}
    if role in SERVING_ROLES:
        try:
            grant_key = bytes.fromhex((d / "grant.key").read_text().strip())
        except (OSError, ValueError) as exc:
            raise KeysError(f"{d / 'grant.key'}: {exc}") from None
        roles = {coordinator_public: COORDINATOR, worker_public: WORKER}
        for p in [d / "client.key", *sorted((d / "authorized").glob("*.key"))]:
            try:
                pub, _ = zmq.auth.load_certificate(str(p))
            except (OSError, ValueError):
                continue
            roles.setdefault(pub, CLIENT)  # a copy of a node's key in authorized/ keeps the node's role
    curve = Curve(role, d, public, secret, coordinator_public, worker_public, grant_key, roles)
    _cache[(str(d), role)] = curve
    return curve


def enable(directory: str | Path, role: str = CLIENT, serve: bool = True) -> Curve:
    """This process uses ``role``'s keys for every TCP socket from now on; a coordinator or worker
    (``serve``) also starts the ZAP handler that admits known keys and names their role."""
    global CURRENT, _authenticator
    curve = load(directory, role)
    CURRENT = curve
    if serve and role in SERVING_ROLES and _authenticator is None:
        _authenticator = _start_authenticator(curve)
    log.info("CURVE security enabled as %s (keys in %s)", role, curve.directory)
    return curve


def _start_authenticator(curve: Curve):  # noqa: ANN202 - zmq.auth type imported lazily
    from zmq.auth.thread import ThreadAuthenticator  # noqa: PLC0415

    class RoleAuthenticator(ThreadAuthenticator):
        def curve_user_id(self, client_public_key: bytes) -> str:
            # The User-Id of every message from this peer: its role, not its key.
            return curve.roles.get(z85.encode(client_public_key), "")

    class Allowed:
        def __init__(self, roles: tuple[str, ...]) -> None:
            self.roles = roles

        def callback(self, domain: str, key: bytes) -> bool:
            return curve.roles.get(key) in self.roles

    auth = RoleAuthenticator(zmq.Context.instance())
    auth.start()
    auth.configure_curve_callback("*", Allowed(ROLES))
    auth.configure_curve_callback(NODES, Allowed(SERVING_ROLES))
    return auth


def select(curve_dir: str = "", plain: bool = False) -> Curve | None:
    """The keys for a client socket: this process's own when it has them for that directory (a
    daemon), else the client keys of ``curve_dir``; without a directory, the process's (or none);
    none at all for a cluster known to be ``plain`` (--insecure)."""
    if plain:
        return None
    if not curve_dir:
        return CURRENT or DEFAULT_CLIENT
    if CURRENT is not None and Path(curve_dir) == CURRENT.directory:
        return CURRENT
    return load(curve_dir, CLIENT)


def apply(sock: zmq.Socket, server: bool, curve: Curve | None = None, peer: str = COORDINATOR,
          domain: str = "") -> None:
    """Configure one socket as a CURVE server (own key, ZAP ``domain``) or a client of ``peer``
    (a coordinator or a data port); no-op when security is off."""
    curve = curve or CURRENT
    if curve is None:
        return
    if server:
        if curve.role not in SERVING_ROLES:
            raise RuntimeError(f"a {curve.role} key cannot serve: only coordinators and workers do")
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_server = True
        if domain:
            sock.zap_domain = domain.encode()
    else:
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_serverkey = curve.server_key(peer)


def role_of(frame: zmq.Frame) -> str | None:
    """The role of the peer that sent ``frame`` (received with ``copy=False``): None when the socket
    is not CURVE-secured (plain mode trusts everyone), "" for a key with no role."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None


def grant(key: bytes, name: str, version: int, size: int, checksum: str, now: float | None = None) -> str:
    """A write grant for one file version: ``<expiry>.<hmac>`` over exactly what may be written."""
    expires = int((time.time() if now is None else now) + GRANT_TTL)
    return f"{expires}.{_mac(key, expires, name, version, size, checksum)}"


def check_grant(key: bytes, token: str, name: str, version: int, size: int, checksum: str,
                now: float | None = None) -> str:
    """"" if ``token`` grants this write, else why not."""
    expires, _, mac = token.partition(".")
    if not expires.isdigit() or not mac:
        return "no write grant from the master"
    if int(expires) < (time.time() if now is None else now):
        return "write grant expired"
    if not hmac.compare_digest(mac, _mac(key, int(expires), name, version, size, checksum)):
        return "write grant does not match this file version"
    return ""


def _mac(key: bytes, expires: int, name: str, version: int, size: int, checksum: str) -> str:
    msg = "\0".join((str(expires), name, str(version), str(size), checksum)).encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def disable() -> None:
    """Turn CURVE off again for sockets made from now on (tests, embedding)."""
    global CURRENT, _authenticator
    CURRENT = None
    if _authenticator is not None:
        _authenticator.stop()
        _authenticator = None

