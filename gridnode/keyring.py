"""
Secret files as keyrings: the token secret (``--upload-secret``) and the
pool's peer secret (``--secret-file``) are both read here, the same way.

The file is text, one key a line::

    # newest first: the first key signs, every key verifies
    k2 7Q0f3cX0nOa2y7mJ0w8rS6uY4hB1vK9dE5tZ2pL3qM8=
    k1 Zm9vYmFyYmF6cXV4cXV1eGZvb2Jhcm...

- A line is ``ID SECRET``, split on its first run of blanks; a line with one
  word is a secret whose id is ``default`` (a file written before keyrings).
- Blanks around a line, and its line ending (``\\n`` or ``\\r\\n``), are not
  part of it: a file ending in a newline holds the same keys as one without.
  Empty lines and lines starting with ``#`` are skipped.
- The secret is the bytes of the word as written (printable ASCII, at least
  32 of them; ``head -c 32 /dev/urandom | base64`` gives 44), never decoded:
  an application's JWT library is handed the same string.
- Ids are 1-64 of ``A-Z a-z 0-9 . _ -``, each once; a ring has 1-16 keys.

Rotation without downtime: add the new key as the second line everywhere,
then move it first everywhere, then drop the old one (docs/operations.md).
A running node re-reads a changed file within `RELOAD_SECONDS`
(`KeyringFile`), so none of these steps needs a restart.

Only the standard library here: the command line client reads keyrings too.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from gridnode.errors import ConfigError

#: HS256 and the peer HMAC are SHA-256: RFC 7518 (3.2) wants a key at least as long as its output
MIN_SECRET_BYTES = 32
MAX_KEYS = 16
DEFAULT_ID = "default"
#: a file changed on disk is read again this long after (at most)
RELOAD_SECONDS = 5.0
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PRINTABLE = re.compile(rb"[\x21-\x7e]+")


@dataclass(frozen=True)
class Key:
    id: str
    secret: bytes

    def __repr__(self) -> str:  # never print a secret by accident
        return f"Key(id={self.id!r})"


@dataclass(frozen=True)
class Keyring:
    """Keys in order: the first signs, all verify."""

    keys: tuple[Key, ...]

    @property
    def signer(self) -> Key:
        return self.keys[0]

    def find(self, key_id: str) -> Key | None:
        return next((k for k in self.keys if k.id == key_id), None)

    @property
    def secrets(self) -> tuple[bytes, ...]:
        return tuple(k.secret for k in self.keys)


def parse_keyring(data: bytes, where: str) -> Keyring:
    """The keys of a keyring file's bytes, or a ConfigError naming ``where`` and the line."""
    keys: list[Key] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.strip()  # ASCII whitespace, the same that split() below separates words by
        if not line or line.startswith(b"#"):
            continue
        words = line.split(None, 1)
        key_id, secret = (DEFAULT_ID, words[0]) if len(words) == 1 else (words[0].decode("latin-1"), words[1])
        if not _ID.fullmatch(key_id):
            raise ConfigError(f"{where}, line {number}: the key id must be 1-64 of A-Z a-z 0-9 . _ -")
        if not _PRINTABLE.fullmatch(secret):
            raise ConfigError(f"{where}, line {number}: a secret is one word of printable ASCII; write random "
                              "bytes as base64 (head -c 32 /dev/urandom | base64)")
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"{where}, line {number}: the secret has {len(secret)} bytes; use at least "
                              f"{MIN_SECRET_BYTES} (head -c 32 /dev/urandom | base64)")
        if any(k.id == key_id for k in keys):
            raise ConfigError(f"{where}, line {number}: key id {key_id!r} is used twice")
        keys.append(Key(key_id, secret))
    if not keys:
        raise ConfigError(f"{where} holds no key: write one line 'ID SECRET' "
                          "(the secret: head -c 32 /dev/urandom | base64)")
    if len(keys) > MAX_KEYS:
        raise ConfigError(f"{where} holds {len(keys)} keys; at most {MAX_KEYS}")
    return Keyring(tuple(keys))


def read_keyring(path: str, setting: str) -> Keyring:
    """The keyring in file ``path``; ``setting`` names the option in errors."""
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024 + 1)
    except OSError as e:
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror}") from None
    if len(data) > 64 * 1024:
        raise ConfigError(f"{setting}: {path} is larger than 64 KiB; a keyring is a few lines")
    return parse_keyring(data, f"{setting}: {path}")


class KeyringFile:
    """A keyring file a running node follows: `ring()` answers the keys read last, and looks at
    the file again when `RELOAD_SECONDS` have passed. A changed file that does not parse keeps
    the keys in use (and ``error`` says why), so a half-written edit never locks anyone out."""

    def __init__(self, path: str, setting: str, now: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, Keyring | None, str | None], None] | None = None) -> None:
        self.path = path
        self.setting = setting
        self.now = now
        self.on_change = on_change
        self._ring = read_keyring(path, setting)
        self._seen = self._signature()
        self._checked = now()
        self.error: str | None = None

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def ring(self) -> Keyring:
        if self.now() - self._checked >= RELOAD_SECONDS:
            self.reload()
        return self._ring

    def reload(self) -> Keyring:
        """Read the file again if it changed since it was last read."""
        self._checked = self.now()
        signature = self._signature()
        if signature == self._seen:
            return self._ring
        self._seen = signature
        try:
            self._ring = read_keyring(self.path, self.setting)
            self.error = None
        except ConfigError as e:
            self.error = e.message
            if self.on_change is not None:
                self.on_change(self.setting, None, e.message)
            return self._ring
        if self.on_change is not None:
            self.on_change(self.setting, self._ring, None)
        return self._ring
