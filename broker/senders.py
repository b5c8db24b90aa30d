"""Who may send what to the coordinator: the one check of a message's sender, before any handler.

Only a worker key speaks the worker protocol and only a coordinator key asks for the state; a node
speaks only for itself. A refused message gets no answer at all (and is no failover vote either).
"""

from __future__ import annotations

from common.identity import PULSE_SUFFIX
from common.protocol import (
    Bundle,
    Heartbeat,
    Join,
    Leave,
    Message,
    Pulse,
    Ready,
    StateFetch,
    StateRequest,
    Stored,
    TaskResult,
)
from common.security import COORDINATOR, WORKER

# Messages whose node_id names their sender: it must equal the ROUTER identity the frame came
# from (a worker's DEALER identity is its node id). ReportBad is not one of them: its node_id
# names the replica being reported, and any reader may report one.
SENDER_NAMED: tuple[type[Message], ...] = (Join, Heartbeat, Leave, Ready, TaskResult, Stored)

# Who may send what, by the CURVE role of the sender's key (the ZAP User-Id of the frame, never a
# field of the message). Types not listed here are open to every authenticated key (commands, SDFS
# metadata). New coordinator-to-coordinator types (state transfer) belong with StateRequest.
# In plain mode (--insecure) there is no role to check: ``handle(..., sender_role=None)`` trusts every sender.
WORKER_ONLY = frozenset({WORKER})
COORDINATOR_ONLY = frozenset({COORDINATOR})
SENDER_ROLES: dict[type[Message], frozenset[str]] = {
    **{t: WORKER_ONLY for t in (Join, Heartbeat, Pulse, Leave, Ready, TaskResult, Stored, Bundle)},
    StateRequest: COORDINATOR_ONLY,
    StateFetch: COORDINATOR_ONLY,  # the chunks of a state transfer: only the other coordinator's key
}




def refusal(ident: bytes, msg: Message, sender_role: str | None) -> tuple[str, str] | None:
    """(reason, why) if ``msg`` from ROUTER peer ``ident`` with CURVE role ``sender_role`` must be
    dropped, else None. ``sender_role`` None is plain mode (--insecure): every role is trusted."""
    allowed = SENDER_ROLES.get(type(msg))
    if sender_role is not None and allowed is not None and sender_role not in allowed:
        return "wrong_role", f"{msg.TYPE} from a {sender_role or 'unknown'} key (sender {ident[:80]!r})"
    if isinstance(msg, SENDER_NAMED) and ident != msg.node_id.encode() or (
        # A worker's pulse sidecar speaks for its worker under the node id + /pulse identity.
        isinstance(msg, Pulse) and ident != (msg.node_id + PULSE_SUFFIX).encode()
    ):
        return "forged_sender", f"{msg.TYPE} claiming to be {msg.node_id[:80]!r} from sender {ident[:80]!r}"
    return None
