"""Keyring files: the one way every secret (token keys, the peer secret) is read, and reloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gridnode.errors import ConfigError
from gridnode.keyring import RELOAD_SECONDS, KeyringFile, parse_keyring, read_keyring

K1 = b"Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg="
K2 = b"7Q0f3cX0nOa2y7mJ0w8rS6uY4hB1vK9dE5tZ2pL3qM8="


class ParseTests:
    def test_lines_in_order(self) -> None:
        """Lines are 'ID SECRET', in order (the first signs); comments and blank lines are skipped."""
        ring = parse_keyring(b"# newest first\n\nk2 " + K2 + b"\n  k1\t" + K1 + b"  \n", "f")
        assert [k.id for k in ring.keys] == ["k2", "k1"]
        assert ring.signer.secret == K2 and ring.find("k1") is not None and ring.find("k1").secret == K1  # type: ignore[union-attr]
        assert ring.find("k3") is None

    @pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n", b"\n\n", b" \n"])
    def test_line_endings_are_not_part_of_a_secret(self, ending: bytes) -> None:
        """A file ending in a newline (as `echo` and editors write it), CRLF or not, holds the same
        secret as one without: the bytes of the word as written."""
        assert parse_keyring(K1 + ending, "f").signer.secret == K1
        assert parse_keyring(b"k1 " + K1 + ending, "f").signer.secret == K1

    def test_a_bare_secret_is_the_default_key(self) -> None:
        """A file written before keyrings (one secret, no id) is a ring of one key, id 'default'."""
        ring = parse_keyring(K1 + b"\n", "f")
        assert [(k.id, k.secret) for k in ring.keys] == [("default", K1)]

    @pytest.mark.parametrize(("data", "says"), [
        (b"", "no key"),
        (b"# only a comment\n\n", "no key"),
        (b"k1 short", "at least 32"),
        (b"k1 " + K1 + b"\nk1 " + K2, "used twice"),
        (K1 + b"\n" + K2, "used twice"),  # two bare secrets: both would be 'default'
        (b"k/1 " + K1, "key id"),
        (b"k1 " + K1 + b" trailing words", "one word"),
        (b"k1 " + b"\xff" * 40, "printable ASCII"),
        (b"\x00" * 40, "printable ASCII"),
        (b"".join(b"k%d %s\n" % (n, K1) for n in range(17)), "at most 16"),
    ])
    def test_refusals(self, data: bytes, says: str) -> None:
        """A bad file stops the node with one line naming the file (and line) and what to do."""
        with pytest.raises(ConfigError, match=says) as e:
            parse_keyring(data, "upload-secret: /etc/x")
        assert "upload-secret: /etc/x" in e.value.message

    def test_a_secret_never_prints(self) -> None:
        """A key's repr names its id only."""
        assert "Zm9v" not in repr(parse_keyring(K1, "f"))

    @example(b"\x0c")  # a line of whitespace that is neither space, tab nor CR: once an IndexError
    @example(b"\x0b\n" + K1)
    @given(st.binary(max_size=300))
    def test_garbage_is_refused_or_read(self, data: bytes) -> None:
        """Any bytes either parse into keys of 32+ printable bytes or raise ConfigError, nothing else."""
        try:
            ring = parse_keyring(data, "f")
        except ConfigError:
            return
        assert all(len(k.secret) >= 32 and k.secret.isascii() for k in ring.keys)


class FileTests:
    def test_read(self, tmp_path: Path) -> None:
        """read_keyring reads a file; a missing one is a ConfigError naming the setting."""
        path = tmp_path / "keys"
        path.write_bytes(b"k1 " + K1 + b"\n")
        assert read_keyring(str(path), "secret-file").signer.id == "k1"
        with pytest.raises(ConfigError, match="secret-file: cannot read"):
            read_keyring(str(tmp_path / "missing"), "secret-file")

    def test_a_running_node_follows_the_file(self, tmp_path: Path) -> None:
        """A changed file is read again once RELOAD_SECONDS have passed (on the injected clock); a
        changed file that does not parse keeps the keys in use, says why, and is read again once fixed."""
        path = tmp_path / "keys"
        path.write_bytes(b"k1 " + K1 + b"\n")
        now = [0.0]
        told: list[tuple[str, list[str] | None, str | None]] = []
        ring = KeyringFile(str(path), "upload-secret", now=lambda: now[0],
                           on_change=lambda s, r, e: told.append((s, r and [k.id for k in r.keys], e)))
        path.write_bytes(b"k2 " + K2 + b"\nk1 " + K1 + b"\n")
        assert [k.id for k in ring.ring().keys] == ["k1"]  # not looked at yet
        now[0] += RELOAD_SECONDS
        assert [k.id for k in ring.ring().keys] == ["k2", "k1"]
        path.write_bytes(b"k3 half-writ")
        now[0] += RELOAD_SECONDS
        assert [k.id for k in ring.ring().keys] == ["k2", "k1"] and ring.error and "k3" not in str(told[-1][1])
        path.write_bytes(b"k2 " + K2 + b"\n")
        now[0] += RELOAD_SECONDS
        assert [k.id for k in ring.ring().keys] == ["k2"] and ring.error is None
        assert [(s, r) for s, r, _ in told] == [("upload-secret", ["k2", "k1"]), ("upload-secret", None),
                                                ("upload-secret", ["k2"])]
