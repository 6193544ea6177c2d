"""Signed membership statements: this node's ed25519 key and the check of others' (issue 11).

Each node has an ed25519 key (in its state dir, next to its VTEP MAC) and
publishes the public half in its etcd lease value, so etcd, already the
authority on who owns which subnet, also binds each node name to its key.
`NodeKey.sign` makes the node's proof of its own record; `verify` checks
a proof against a published key; `gate` is the admission of news
(`admission.Gate`, the rules, pure) with the real decoding and check.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

from overlay.membership.admission import Gate
from overlay.membership.swim import Proof, Record, State
from overlay.membership.wire import parse_statement, statement_bytes
from overlay.model import PUBLIC_KEY_PREFIX

# Domain separation: the node key signs nothing else that could be replayed as this.
SIGNING_CONTEXT = b"overlay.v1.Statement\x00"


def encode_public_key(raw: bytes) -> str:
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()


def decode_public_key(value: str) -> bytes:
    return base64.b64decode(value[len(PUBLIC_KEY_PREFIX):], validate=True)


class NodeKey:
    """This node's signing key."""

    def __init__(self, private: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.from_private_bytes(private)
        self.public = encode_public_key(self._key.public_key().public_bytes_raw())
        self.signatures = 0

    @staticmethod
    def generate() -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.generate().private_bytes_raw()

    def sign(self, rec: Record, incarnation: int, state: State) -> Proof:
        st = statement_bytes(rec, incarnation, state)
        self.signatures += 1
        return Proof(st, self._key.sign(SIGNING_CONTEXT + st), self.public)


@functools.lru_cache(maxsize=4096)
def _public_key(key: str) -> Any:
    """The published key, decoded once (None: not a valid ed25519 key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        return Ed25519PublicKey.from_public_bytes(decode_public_key(key))
    except ValueError:
        return None


def verify(key: str, statement: bytes, signature: bytes) -> bool:
    """Whether `signature` is the holder of `key`'s over `statement`."""
    from cryptography.exceptions import InvalidSignature

    pub = _public_key(key)
    if pub is None:
        return False
    try:
        pub.verify(signature, SIGNING_CONTEXT + statement)
    except InvalidSignature:
        return False
    return True


def gate(me: str, **budget: Any) -> Gate:
    """The admission of news for node `me` (`rate`, `burst`, `cache_size`: admission.Gate)."""
    return Gate(me, parse_statement, verify, **budget)
