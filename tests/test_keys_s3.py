"""
Keys against a real S3 server: every key `gridnode.keys` can build is
written, listed and deleted again, and no user-supplied name becomes a key.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gridnode import keys
from gridnode.errors import InvalidKey
from gridnode.store.s3 import S3Backend

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.s3server"]

SAFE = string.ascii_letters + string.digits + "._-"


def safe_path(name: str) -> bool:
    """Every '/'-separated segment of ``name`` is a safe key segment (so ``name`` is a valid key)."""
    return all(seg and seg not in (".", "..") and all(c in SAFE for c in seg) for seg in name.split("/"))
B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

segments = st.text(alphabet=SAFE, min_size=1, max_size=30).filter(lambda s: s not in (".", ".."))
ids = st.one_of(st.text(alphabet=B32, min_size=26, max_size=26), segments)
hls_names = st.one_of(
    st.sampled_from(["video.mp4", "video.webm", "poster.jpg", "hls/master.m3u8"]),
    st.builds(lambda r, n: f"hls/{r}/seg{n}.ts", st.sampled_from(["240p", "720p", "1080p"]),
              st.integers(0, 99999)),
    st.builds(lambda r: f"hls/{r}/index.m3u8", segments),
    st.lists(segments, min_size=1, max_size=5).map("/".join),
)


@st.composite
def built_keys(draw: st.DrawFn) -> list[str]:
    """A batch of keys made only by the builders of gridnode.keys."""
    env, pool, node, job = draw(segments), draw(segments), draw(ids), draw(ids)
    made = [
        keys.job_record(job),
        keys.input_source(job),
        keys.node_record(env, pool, node),
        keys.nodes_list(env, pool),
        keys.registry_page(env, pool),
    ]
    made += [keys.output(job, name) for name in draw(st.lists(hls_names, min_size=1, max_size=4))]
    return sorted(set(made), key=lambda k: k.encode())


NASTY = ["../etc/passwd", "..", ".", "a/../b", "/abs", "a//b", "a\x00b", "\x00", "é.mp4", "ａ", "a b", "a\\b",
         "a/", "", "CON", "name\n", "%2e%2e", "hls/../../x", "\u202emp4.exe", "a" * 1100]


def round_trip(backend: S3Backend, made: list[str]) -> None:
    """Put every key, list them back exactly and in order, delete them all, list nothing."""
    for k in made:
        backend.put_bytes(k, k.encode())
    listed = [i.key for i in backend.list("", limit=1000).items]
    assert listed == made
    for k in made:
        assert backend.get_bytes(k)[0] == k.encode()
        backend.delete(k)
    assert backend.list("").items == []


ROUND_TRIP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class BuiltKeysRoundTripTests:
    # Two methods rather than a parametrized fixture: pytest-twisted's call hook
    # trips over a parametrized fixture under @given.

    @ROUND_TRIP
    @given(made=built_keys())
    def test_built_keys_round_trip_in_bucket(self, s3_endpoint: str, s3_bucket: str, made: list[str]) -> None:
        """Every builder-made key is stored as given, listed back exactly, and deleted to nothing."""
        backend = S3Backend(s3_bucket, endpoint_url=s3_endpoint)
        try:
            round_trip(backend, made)
        finally:
            backend.close()

    @ROUND_TRIP
    @given(made=built_keys())
    def test_built_keys_round_trip_under_prefix(self, s3_endpoint: str, s3_bucket: str, made: list[str]) -> None:
        """The same under a store prefix: listed with the prefix stripped, nothing left after deletes."""
        backend = S3Backend(s3_bucket, prefix="grid/", endpoint_url=s3_endpoint)
        try:
            round_trip(backend, made)
        finally:
            backend.close()


class UserNamesNeverKeysTests:
    @settings(max_examples=200, deadline=None)
    @given(name=st.one_of(st.text(), st.sampled_from(NASTY),
                          st.lists(st.sampled_from(["..", ".", "", "a", "é", "\x00", "x y"]), min_size=1,
                                   max_size=5).map("/".join)))
    @example(name="../")
    @example(name="a/\x00/b")
    def test_user_names_refused_or_safe(self, name: str) -> None:
        """A user's name is refused as a segment and by every builder, unless it is already a safe segment."""
        safe = bool(name) and all(c in SAFE for c in name) and name not in (".", "..")
        if safe:
            assert keys.check_segment(name) == name
            return
        with pytest.raises(InvalidKey):
            keys.check_segment(name)
        for build in (keys.input_source, keys.outputs_prefix, keys.upload_prefix,
                      lambda n: keys.nodes_list(n, "default"), lambda n: keys.registry_prefix("dev", n)):
            with pytest.raises(InvalidKey):
                build(name)
        # job_record and node_record append ".json" to the id, so "", "." and ".."
        # make the safe (if odd) keys "jobs/.json", "jobs/..json" and "jobs/...json".
        if name not in ("", ".", ".."):
            for build in (keys.job_record, lambda n: keys.node_record("dev", "default", n)):
                with pytest.raises(InvalidKey):
                    build(name)

    @settings(max_examples=200, deadline=None)
    @given(name=st.one_of(st.text(), st.sampled_from(NASTY)))
    def test_output_names_refused_unless_safe_path(self, name: str) -> None:
        """An output name (which may hold '/') becomes a key only if every segment is safe."""
        job = keys.new_id()
        try:
            key = keys.output(job, name)
        except InvalidKey:
            return
        assert key == f"outputs/{job}/{name}"
        assert safe_path(name)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=st.one_of(st.text(min_size=1), st.sampled_from(NASTY)))
    def test_unsafe_keys_never_reach_the_bucket(self, s3_endpoint: str, s3_bucket: str, s3_client: object,
                                                name: str) -> None:
        """The S3 backend refuses an unsafe key before any request: the bucket stays empty."""
        assume(not safe_path(name))  # "0/0" is two safe segments: a valid key
        backend = S3Backend(s3_bucket, endpoint_url=s3_endpoint, client=s3_client)
        with pytest.raises(InvalidKey):
            backend.put_bytes(name, b"x")
        with pytest.raises(InvalidKey):
            backend.put_bytes("outputs/J/" + name, b"x")
        with pytest.raises(InvalidKey):
            backend.delete(name)
        assert backend.list("").items == []
