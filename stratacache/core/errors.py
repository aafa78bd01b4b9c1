"""The plane's error types: who is at fault decides the type.

* ``InvalidArgument`` (a ``ValueError``) and ``InvalidType`` (also a
  ``TypeError``): the caller passed something wrong (a key, a payload, an
  ``out`` buffer, a mode). The message names the argument. Raised to the caller.
* ``ConfigError`` (an ``InvalidArgument``): a configuration key or value is
  wrong; the message names the key.
* ``TierFault``: a tier could not do its job (I/O error, dead server, full
  disk). The chain counts it and treats it as a miss or a refused store; it
  never reaches the engine's caller.
* ``CorruptArtifact``: stored bytes or their header failed validation. It is
  deliberately not a ``ValueError``, so no ``except ValueError`` that means
  "the caller's mistake" can swallow it. The object is dropped and the read is a
  counted miss.
"""

from __future__ import annotations


class StrataCacheError(Exception):
    """Base of every error the plane raises on purpose."""


class InvalidArgument(StrataCacheError, ValueError):
    """The caller passed a bad value; the message names the argument."""


class InvalidType(InvalidArgument, TypeError):
    """The caller passed a value of the wrong type; the message names the argument."""


class ConfigError(InvalidArgument):
    """A configuration key or value is wrong; the message names the key."""


class TierFault(StrataCacheError):
    """A tier failed (I/O error, dead server): a miss or a refused store, never a caller error."""


class CorruptArtifact(StrataCacheError):
    """A stored header or payload failed validation; callers treat it as a miss."""
