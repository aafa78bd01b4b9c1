"""Namespaced artifact keys.

Every object in the plane is identified by ``(kind, namespace, name)``:

* ``kind`` says what the bytes are: ``kv`` chunks, model ``params`` chunks, or
  ``custom`` user artifacts. KV and parameter chunks can never collide because
  the kind is part of the identity.
* ``namespace`` is the tenant or model identity. For KV it also carries
  everything that makes bytes incompatible (dtype, layout, head geometry,
  block size, TP rank/size); for params the model and revision.
* ``name`` is the key proper (a chunk hash, a parameter chunk name, ...).

Quotas and priorities are configured per ``kind`` (see ``namespaces`` in
config.yaml). ``encode()`` gives the canonical byte form that every tier stores
and compares in full; tiers never identify an object by a hash alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

KINDS = ("kv", "params", "custom")
_SEP = "\x1f"  # ASCII unit separator: cannot appear in a valid component


@dataclass(frozen=True, slots=True)
class ArtifactKey:
    kind: str
    namespace: str
    name: str
    # encode(), computed once: every tier operation encodes its keys.
    _encoded: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ArtifactKey.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("namespace", "name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ArtifactKey.{name} must be a non-empty str, got {value!r}")
            if _SEP in value:
                raise ValueError(f"ArtifactKey.{name} must not contain the \\x1f separator")
        object.__setattr__(self, "_encoded",
                           _SEP.join((self.kind, self.namespace, self.name)).encode("utf-8"))

    def encode(self) -> bytes:
        """Canonical bytes of the key, stored and compared in full by every tier."""
        return self._encoded

    @classmethod
    def decode(cls, raw: bytes) -> "ArtifactKey":
        try:
            kind, namespace, name = raw.decode("utf-8").split(_SEP)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"not an encoded ArtifactKey: {raw[:64]!r}") from exc
        return cls(kind, namespace, name)

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


# ``key.encode()`` without a Python-level call, for loops over many keys: the canonical
# bytes are hashed and compared in C, where the dataclass key would run Python __hash__/__eq__.
key_bytes = operator.attrgetter("_encoded")
