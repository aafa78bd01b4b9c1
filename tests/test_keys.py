"""ArtifactKey: canonical encoding round-trips; invalid keys are rejected with the field named."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratacache.core.keys import KINDS, ArtifactKey

component = st.text(alphabet=st.characters(blacklist_characters="\x1f", blacklist_categories=("Cs",)), min_size=1)


@given(st.sampled_from(KINDS), component, component)
def test_encode_decode_round_trip(kind, ns, name):
    k = ArtifactKey(kind, ns, name)
    raw = k.encode()
    assert isinstance(raw, bytes)
    assert ArtifactKey.decode(raw) == k
    assert hash(ArtifactKey.decode(raw)) == hash(k)


@given(component, component, component, component)
def test_distinct_keys_encode_distinctly(a, b, c, d):
    k1, k2 = ArtifactKey("kv", a, b), ArtifactKey("kv", c, d)
    assert (k1.encode() == k2.encode()) == (k1 == k2)


def test_kv_and_params_never_collide():
    assert ArtifactKey("kv", "m", "x") != ArtifactKey("params", "m", "x")
    assert ArtifactKey("kv", "m", "x").encode() != ArtifactKey("params", "m", "x").encode()


@pytest.mark.parametrize("args,word", [
    (("blob", "m", "x"), "kind"), (("kv", "", "x"), "namespace"), (("kv", "m", ""), "name"),
    (("kv", "a\x1fb", "x"), "namespace"), (("kv", "m", 5), "name"),
])
def test_invalid_keys(args, word):
    with pytest.raises(ValueError, match=word):
        ArtifactKey(*args)


def test_decode_rejects_garbage():
    with pytest.raises(ValueError, match="not an encoded ArtifactKey"):
        ArtifactKey.decode(b"no separators here")
    with pytest.raises(ValueError):
        ArtifactKey.decode(b"\xff\xfe")
