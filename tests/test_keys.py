"""Key building: safe by construction, user names never become keys."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridnode import keys
from gridnode.errors import InvalidKey

SAFE = string.ascii_letters + string.digits + "._-"
segments = st.text(alphabet=SAFE, min_size=1, max_size=40).filter(lambda s: s not in (".", ".."))


class KeyRuleTests:
    @given(st.lists(segments, min_size=1, max_size=8))
    def test_joined_safe_segments_are_keys(self, parts: list[str]) -> None:
        """Any join of safe segments within the size limit is a valid key."""
        assert keys.join(*parts) == "/".join(parts)

    @given(st.text(max_size=60))
    def test_check_segment_accepts_only_the_alphabet(self, text: str) -> None:
        """A segment passes exactly when it is 1+ safe characters and not '.'/'..'."""
        ok = bool(text) and all(c in SAFE for c in text) and text not in (".", "..")
        if ok:
            assert keys.check_segment(text) == text
        else:
            with pytest.raises(InvalidKey):
                keys.check_segment(text)

    @given(st.text(min_size=1, max_size=200))
    def test_arbitrary_text_never_escapes(self, text: str) -> None:
        """Whatever check_key accepts has no empty, '.' or '..' segment and only safe characters."""
        try:
            keys.check_key(text)
        except InvalidKey:
            return
        for seg in text.split("/"):
            assert seg and seg not in (".", "..") and all(c in SAFE for c in seg)

    def test_length_limit(self) -> None:
        """1024 bytes is the most a key may have."""
        keys.check_key("a" * 1024)
        with pytest.raises(InvalidKey):
            keys.check_key("a" * 1025)

    def test_layout(self) -> None:
        """The object layout of docs/api.md."""
        j = keys.new_id()
        assert keys.job_record(j) == f"jobs/{j}.json"
        assert keys.input_source(j) == f"inputs/{j}/source"
        assert keys.output(j, "hls/720p/index.m3u8") == f"outputs/{j}/hls/720p/index.m3u8"
        assert keys.node_record("prod", "east", "i-1") == "registry/prod/east/nodes/i-1.json"
        assert keys.nodes_list("prod", "east") == "registry/prod/east/nodes.json"
        with pytest.raises(InvalidKey):
            keys.output(j, "../../etc/passwd")
        with pytest.raises(InvalidKey):
            keys.node_record("prod", "east", "../x")


class IdTests:
    def test_ids_sort_by_time(self) -> None:
        """Ids made later sort later (millisecond prefix) and are recognised."""
        a = keys.new_id(1000.0)
        b = keys.new_id(1000.002)
        assert a < b and keys.is_id(a) and keys.is_id(b)
        assert not keys.is_id("../" + a[3:])

    def test_ids_unique(self) -> None:
        """Ids made in the same millisecond still differ."""
        assert len({keys.new_id(5.0) for _ in range(1000)}) == 1000
