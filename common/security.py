"""Optional CURVE encryption and authentication for every TCP socket (``zmq.auth``).

A key directory (``idunno keys init``) holds one server keypair shared by the cluster's servers
(coordinators and SDFS data servers), a client keypair, and ``authorized/`` with the public keys of
every allowed node or client. When ``curve_dir`` is configured, servers only complete a handshake
with an authorized key, so a stranger cannot join, submit, read or write anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import zmq

# zmq.auth (and its thread authenticator, which pulls in asyncio) is imported where keys are used:
# a client without CURVE should not pay for it at start-up.

log = logging.getLogger("idunno.security")


@dataclass
class Curve:
    server_public: bytes
    server_secret: bytes | None  # only processes that serve (hold the server secret) can bind securely
    client_public: bytes
    client_secret: bytes
    authorized_dir: Path


CURRENT: Curve | None = None
_authenticator = None  # zmq.auth.thread.ThreadAuthenticator once this process serves securely


def init_keys(directory: str | Path, overwrite: bool = False) -> Path:
    """Create the cluster's key directory: server.key(_secret), client.key(_secret), authorized/."""
    import zmq.auth  # noqa: PLC0415

    d = Path(directory)
    if (d / "server.key_secret").exists() and not overwrite:
        raise FileExistsError(f"keys already exist in {d} (use --force to replace them)")
    d.mkdir(parents=True, exist_ok=True)
    authorized = d / "authorized"
    authorized.mkdir(exist_ok=True)
    zmq.auth.create_certificates(str(d), "server")
    zmq.auth.create_certificates(str(d), "client")
    import shutil  # noqa: PLC0415 - keys are made once; shutil pulls in the compression modules

    shutil.copy(d / "client.key", authorized / "client.key")
    for p in d.glob("*.key_secret"):
        p.chmod(0o600)
    return d


def enable(directory: str | Path, serve: bool = True) -> Curve:
    """Turn CURVE on for every socket this process makes from now on (``serve=False``: client sockets only)."""
    global CURRENT, _authenticator
    import zmq.auth  # noqa: PLC0415

    d = Path(directory)
    server_public, _ = zmq.auth.load_certificate(str(d / "server.key"))
    server_secret = None
    if serve and (d / "server.key_secret").exists():
        _, server_secret = zmq.auth.load_certificate(str(d / "server.key_secret"))
    client_public, client_secret = zmq.auth.load_certificate(str(d / "client.key_secret"))
    CURRENT = Curve(server_public, server_secret, client_public, client_secret, d / "authorized")
    if server_secret is not None and _authenticator is None:
        from zmq.auth.thread import ThreadAuthenticator  # noqa: PLC0415

        _authenticator = ThreadAuthenticator(zmq.Context.instance())
        _authenticator.start()
        _authenticator.configure_curve(domain="*", location=str(d / "authorized"))
    log.info("CURVE security enabled (keys in %s)", d)
    return CURRENT


def apply(sock: zmq.Socket, server: bool) -> None:
    """Configure one socket as a CURVE server or client (no-op when security is off)."""
    if CURRENT is None:
        return
    if server:
        if CURRENT.server_secret is None:
            raise RuntimeError("this process has no server secret key and cannot serve securely")
        sock.curve_secretkey = CURRENT.server_secret
        sock.curve_publickey = CURRENT.server_public
        sock.curve_server = True
    else:
        sock.curve_secretkey = CURRENT.client_secret
        sock.curve_publickey = CURRENT.client_public
        sock.curve_serverkey = CURRENT.server_public


def disable() -> None:
    """Turn CURVE off again for sockets made from now on (tests, embedding)."""
    global CURRENT, _authenticator
    CURRENT = None
    if _authenticator is not None:
        _authenticator.stop()
        _authenticator = None
