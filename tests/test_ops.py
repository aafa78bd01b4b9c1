"""CPU tests of the native ops against the pure-torch references in stratacache.ops.

Every destination is poisoned before a run and compared byte for byte, including
the bytes the op must not touch.
"""

import random
import zlib

import pytest
import torch

from stratacache import ops

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.uint8]
POISON = 0xA5


def stable_seed(*parts):
    """A seed that is the same in every process (hash() of str is salted)."""
    return zlib.crc32(repr(parts).encode())


def rand_tensor(shape, dtype, gen):
    """Random bits of any dtype (uint8 stands in for fp8 pages)."""
    n = 1
    for s in shape:
        n *= s
    elt = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * elt,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def same_bytes(a, b):
    """Byte equality (torch.equal is False for NaN payloads of random bits)."""
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def poisoned(nbytes):
    return torch.full((nbytes,), POISON, dtype=torch.uint8)


# --------------------------------------------------------------------------- checksum

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 1000, 4096 + 5, (1 << 20) + 3, (3 << 20) + 8])
def test_checksum64_matches_reference(n):
    gen = torch.Generator().manual_seed(n)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    value = ops.checksum64(data)
    assert 0 <= value < 1 << 64
    assert value == ops.ref_checksum64(data)
    assert ops.checksum64(bytes(data.numpy().tobytes())) == value


def test_checksum64_is_over_bytes_whatever_the_dtype():
    gen = torch.Generator().manual_seed(1)
    x = rand_tensor((33, 17), torch.bfloat16, gen)
    assert ops.checksum64(x) == ops.checksum64(x.view(torch.uint8)) == ops.ref_checksum64(x)
    # Same bytes, different length: the length is part of the checksum.
    z = torch.zeros(16, dtype=torch.uint8)
    assert ops.checksum64(z) != ops.checksum64(z[:15]) != ops.checksum64(z[:8])


@pytest.mark.parametrize("chunk", [1, 5, 8, 64, 1000, 4096, 1 << 22])
def test_chunk_checksums_equal_checksum64_of_each_slice(chunk):
    gen = torch.Generator().manual_seed(chunk)
    data = torch.randint(0, 256, (50_003,), dtype=torch.uint8, generator=gen)
    got = ops.chunk_checksums(data, chunk)
    starts = list(range(0, data.numel(), chunk))
    assert got.dtype == torch.int64 and got.shape == (len(starts),)
    sample = starts if len(starts) <= 64 else random.Random(chunk).sample(starts, 64) + [starts[-1]]
    for s in sample:
        assert int(got[s // chunk]) & ops.MASK64 == ops.checksum64(data[s:s + chunk])
    assert ops.chunk_checksums(data[:0], chunk).shape == (0,)


def test_checksum64_detects_every_single_bit_flip_and_word_swap():
    gen = torch.Generator().manual_seed(7)
    data = torch.randint(0, 256, (131,), dtype=torch.uint8, generator=gen)
    base = ops.checksum64(data)
    seen = {base}
    for byte in range(data.numel()):
        for bit in range(8):
            d = data.clone()
            d[byte] ^= 1 << bit
            seen.add(ops.checksum64(d))
    assert len(seen) == 1 + data.numel() * 8
    words = data[:128].clone().view(torch.int64)
    for i, j in [(0, 1), (3, 9), (14, 15)]:
        w = words.clone()
        w[i], w[j] = words[j], words[i]
        assert ops.checksum64(w) != ops.checksum64(words)


def test_checksum64_of_large_buffer_is_split_invariant():
    """The multithreaded result equals the sum of independently computed pieces."""
    gen = torch.Generator().manual_seed(3)
    data = torch.randint(0, 256, ((9 << 20) + 24,), dtype=torch.uint8, generator=gen)
    assert ops.checksum64(data) == ops.ref_checksum64(data)


# --------------------------------------------------------------------------- block gather / scatter

def make_layers(gen, kind, n_layers, num_blocks, page_shape, dtype):
    """Layers as vLLM hands them over, in three memory arrangements."""
    if kind == "separate":
        return [rand_tensor((num_blocks, *page_shape), dtype, gen) for _ in range(n_layers)]
    if kind == "shared":       # one buffer [L, B, ...], as the vLLM 0.32 CPU backend
        buf = rand_tensor((n_layers, num_blocks, *page_shape), dtype, gen)
        return list(buf.unbind(0))
    if kind == "interleaved":  # one buffer [B, L, ...]: block stride is L pages
        buf = rand_tensor((num_blocks, n_layers, *page_shape), dtype, gen)
        return [buf[:, l] for l in range(n_layers)]
    raise AssertionError(kind)


CASES = [
    # kind, layers, num_blocks, page shape ([H, N, 2D] like vLLM CPU, or flat), dtype, n, chunk_blocks
    ("shared", 4, 16, (2, 16, 2 * 8), torch.bfloat16, 10, 3),
    ("separate", 3, 9, (4, 8, 16), torch.float16, 9, 4),
    ("interleaved", 5, 12, (1, 4, 32), torch.float32, 7, 2),
    ("shared", 32, 8, (2, 4, 16), torch.uint8, 8, 1),
    ("separate", 1, 5, (3, 5, 7), torch.uint8, 5, 5),        # 105-byte pages: not word aligned
    ("interleaved", 2, 30, (2, 2, 3), torch.float16, 25, 4),  # 24-byte pages
    ("shared", 2, 6, (1 << 17,), torch.float32, 4, 3),       # 512 KiB pages (segmented)
    ("separate", 2, 4, (8,), torch.bfloat16, 0, 2),            # no blocks
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}L-{c[4]}-{c[5]}n" for c in CASES])
@pytest.mark.parametrize("order", ["random", "sorted", "repeats"])
def test_gather_blocks_matches_reference(case, order):
    kind, L, nb, page, dtype, n, cb = case
    gen = torch.Generator().manual_seed(stable_seed((case, order)))
    layers = make_layers(gen, kind, L, nb, page, dtype)
    if order == "random":
        ids = torch.randperm(nb, generator=gen)[:n]
    elif order == "sorted":
        ids = torch.randperm(nb, generator=gen)[:n].sort().values
    else:
        ids = torch.randint(0, nb, (n,), generator=gen)
    P = layers[0][0].numel() * layers[0].element_size()
    extra = 13
    out = poisoned(n * L * P + extra)
    sums = ops.gather_blocks(layers, ids, out, chunk_blocks=cb)
    ref, ref_sums = ops.ref_gather_blocks(layers, ids, cb)
    assert torch.equal(out[: n * L * P], ref.reshape(-1))
    assert bool((out[n * L * P:] == POISON).all()), "wrote past n*L*P"
    assert [int(s) & ops.MASK64 for s in sums] == ref_sums
    if n:
        assert torch.equal(sums, ops.chunk_checksums(out[: n * L * P], cb * L * P))
    assert ops.gather_blocks(layers, ids, poisoned(n * L * P)).numel() == 0


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}L-{c[4]}-{c[5]}n" for c in CASES])
def test_scatter_blocks_matches_reference_and_verifies(case):
    kind, L, nb, page, dtype, n, cb = case
    gen = torch.Generator().manual_seed(stable_seed(case))
    layers = make_layers(gen, kind, L, nb, page, dtype)
    ids = torch.randperm(nb, generator=gen)[:n]
    P = layers[0][0].numel() * layers[0].element_size()
    src = torch.randint(0, 256, (n * L * P,), dtype=torch.uint8, generator=gen)
    expect = [t.clone() for t in layers]
    ops.ref_scatter_blocks(src, ids, expect)
    good = ops.chunk_checksums(src, cb * L * P) if n else torch.empty(0, dtype=torch.int64)
    ok = ops.scatter_blocks(src, ids, layers, chunk_blocks=cb, expected=good)
    assert ok.dtype == torch.bool and bool(ok.all()) and ok.numel() == good.numel()
    for got, want in zip(layers, expect):
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    if n == 0:
        return
    # Corrupt one byte of one chunk: exactly that chunk fails verification.
    bad_chunk = int(torch.randint(0, good.numel(), (1,), generator=gen))
    lo = bad_chunk * cb * L * P
    hi = min(lo + cb * L * P, src.numel())
    pos = int(torch.randint(lo, hi, (1,), generator=gen))
    src[pos] ^= 0x10
    ok = ops.scatter_blocks(src, ids, layers, chunk_blocks=cb, expected=good)
    assert ok.tolist() == [c != bad_chunk for c in range(good.numel())]
    assert ops.scatter_blocks(src, ids, layers).numel() == 0


def test_block_round_trip_randomized():
    """Many random shapes: gather then scatter into poisoned layers restores the pages."""
    rng = random.Random(11)
    for trial in range(25):
        gen = torch.Generator().manual_seed(trial)
        dtype = rng.choice(DTYPES)
        L, nb = rng.randint(1, 9), rng.randint(1, 20)
        page = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3)))
        kind = rng.choice(["separate", "shared", "interleaved"])
        layers = make_layers(gen, kind, L, nb, page, dtype)
        n = rng.randint(0, nb)
        ids = torch.randperm(nb, generator=gen)[:n]
        P = layers[0][0].numel() * layers[0].element_size()
        cb = rng.randint(1, 4)
        out = poisoned(n * L * P)
        sums = ops.gather_blocks(layers, ids, out, chunk_blocks=cb)
        dest = make_layers(gen, kind, L, nb, page, dtype)
        for t in dest:
            t.view(torch.uint8).fill_(POISON)
        before = [t.clone() for t in dest]
        ok = ops.scatter_blocks(out, ids, dest, chunk_blocks=cb, expected=sums)
        assert bool(ok.all())
        touched = set(ids.tolist())
        for src_l, dst_l, old_l in zip(layers, dest, before):
            for b in range(nb):
                want = src_l[b] if b in touched else old_l[b]
                assert torch.equal(dst_l[b].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("case", CASES[:6], ids=[f"{c[0]}-{c[1]}L" for c in CASES[:6]])
def test_layer_slices_of_a_payload_move_like_the_whole(case):
    """Layer-wise loads: scatter_blocks(payload[:, l:l+1], ids, [layer l]) per layer (and a
    multi-layer slice) writes exactly what one whole-payload scatter writes; gathering slices
    into a poisoned payload rebuilds the whole gather."""
    kind, L, nb, page, dtype, n, _ = case
    gen = torch.Generator().manual_seed(stable_seed(("slices", case)))
    layers = make_layers(gen, kind, L, nb, page, dtype)
    ids = torch.randperm(nb, generator=gen)[:n]
    P = layers[0][0].numel() * layers[0].element_size()
    payload = torch.randint(0, 256, (n, L, P), dtype=torch.uint8, generator=gen)
    whole = make_layers(gen, kind, L, nb, page, dtype)
    ops.scatter_blocks(payload, ids, whole)
    sliced = make_layers(gen, kind, L, nb, page, dtype)
    for t, w in zip(sliced, whole):     # unloaded blocks must match too: start from the same bytes
        t.copy_(w)
        t.view(torch.uint8)[ids] = POISON
    cut = L // 2
    for l in range(cut):
        ops.scatter_blocks(payload[:, l:l + 1], ids, [sliced[l]])
    ops.scatter_blocks(payload[:, cut:], ids, sliced[cut:])
    assert all(same_bytes(a, b) for a, b in zip(sliced, whole))

    back = torch.full((n, L, P), POISON, dtype=torch.uint8)
    for l in range(L):
        assert ops.gather_blocks([whole[l]], ids, back[:, l:l + 1]).numel() == 0
    assert torch.equal(back, payload)
    partial = torch.full((n, L, P), POISON, dtype=torch.uint8)
    ops.gather_blocks(whole[cut:], ids, partial[:, cut:])
    assert torch.equal(partial[:, cut:], payload[:, cut:]) and bool((partial[:, :cut] == POISON).all())


def test_layer_slices_take_no_checksums_and_need_page_rows():
    layers, ids, _ = _blocks()
    payload = torch.zeros(2, 4, 32, dtype=torch.uint8)     # a chunk of 4 layers, 2 of them wanted
    with pytest.raises(ValueError, match="checksums \\(chunk_blocks > 0\\) need a contiguous src"):
        ops.scatter_blocks(payload[:, 1:3], ids, layers, chunk_blocks=1,
                           expected=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="checksums \\(chunk_blocks > 0\\) need a contiguous out"):
        ops.gather_blocks(layers, ids, payload[:, 1:3], chunk_blocks=2)
    for bad in (payload[:, :, ::2][:, :2], payload.transpose(0, 1)[:2], payload[:, 0:3:2]):
        with pytest.raises(ValueError, match="src must be contiguous, or a \\[2, 2, 32\\] view"):
            ops.scatter_blocks(bad, ids, layers)
    assert bool((payload == 0).all())


# --------------------------------------------------------------------------- opcheck

def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                 "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_every_op():
    gen = torch.Generator().manual_seed(5)
    data = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=gen)
    _opcheck(torch.ops.stratacache.checksum64.default, (data,))
    _opcheck(torch.ops.stratacache.chunk_checksums.default, (data, 96))
    layers = make_layers(gen, "shared", 3, 8, (2, 4, 8), torch.float16)
    ids = torch.tensor([5, 1, 7, 2], dtype=torch.int64)
    out = torch.empty(4 * 3 * 128, dtype=torch.uint8)
    _opcheck(torch.ops.stratacache.gather_blocks.default, (layers, ids, out, 3))
    sums = ops.gather_blocks(layers, ids, out, 3)
    _opcheck(torch.ops.stratacache.scatter_blocks.default, (out, ids, layers, 3, sums))
    _opcheck(torch.ops.stratacache.scatter_blocks.default, (out, ids, layers, 0, None))
    payload = out.view(4, 3, 128)
    _opcheck(torch.ops.stratacache.scatter_blocks.default, (payload[:, 1:], ids, layers[1:], 0, None))
    _opcheck(torch.ops.stratacache.gather_blocks.default, (layers[:1], ids, payload[:, :1], 0))


def test_the_op_library_holds_only_the_ops_the_package_uses():
    """The library declares the checksum and block ops; the token-granular gather/scatter,
    which nothing in the package called, are not part of it or of stratacache.ops."""
    declared = {name for name in dir(torch.ops.stratacache) if not name.startswith("_")}
    assert {"checksum64", "chunk_checksums", "gather_blocks", "scatter_blocks"} <= declared
    assert not declared & {"gather_tokens", "scatter_tokens"}
    assert not {"gather_tokens", "scatter_tokens", "token_view", "LAYOUTS"} & set(dir(ops))


# --------------------------------------------------------------------------- bad input

def _blocks(gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    layers = make_layers(gen, "shared", 2, 4, (2, 8), torch.float16)
    return layers, torch.tensor([0, 3], dtype=torch.int64), torch.empty(2 * 2 * 32, dtype=torch.uint8)


BAD_GATHER = {
    "block id out of range": (lambda L, i, o: (L, torch.tensor([0, 4]), o), IndexError, "block_ids\\[1\\] = 4"),
    "negative block id": (lambda L, i, o: (L, torch.tensor([-1, 0]), o), IndexError, "block_ids\\[0\\] = -1"),
    "block_ids dtype": (lambda L, i, o: (L, i.int(), o), TypeError, "block_ids must be int64"),
    "block_ids 2-D": (lambda L, i, o: (L, i.view(1, 2), o), ValueError, "block_ids must be 1-D"),
    "out dtype": (lambda L, i, o: (L, i, o.view(torch.int16)), TypeError, "out must be uint8"),
    "out too small": (lambda L, i, o: (L, i, o[:-1]), ValueError, "out is too small"),
    "out not contiguous": (lambda L, i, o: (L, i, o.view(2, -1)[:, ::2]), ValueError, "out must be contiguous"),
    "mismatched page sizes": (lambda L, i, o: ([L[0], L[1][:, :1]], i, o), ValueError,
                              "layers\\[1\\] has 16-byte pages but layers\\[0\\] has 32-byte"),
    "non-contiguous page": (lambda L, i, o: ([L[0], L[1].transpose(1, 2)], i, o), ValueError,
                            "layers\\[1\\] has non-contiguous pages"),
    "mismatched dtypes": (lambda L, i, o: ([L[0], L[1].view(torch.bfloat16)], i, o), TypeError,
                          "layers\\[1\\] has dtype"),
    "no layers": (lambda L, i, o: ([], i, o), ValueError, "layers must hold at least one"),
    "0-d layer": (lambda L, i, o: ([torch.tensor(1.0)], i, o), ValueError, "layers\\[0\\] must have a block"),
}


@pytest.mark.parametrize("case", sorted(BAD_GATHER))
def test_gather_blocks_rejects_bad_input(case):
    make, exc, match = BAD_GATHER[case]
    layers, ids, out = _blocks()
    out.fill_(POISON)
    before = [t.clone() for t in layers]
    with pytest.raises(exc, match=match):
        ops.gather_blocks(*make(layers, ids, out), chunk_blocks=1)
    assert bool((out == POISON).all()), "a rejected call wrote to out"
    assert all(same_bytes(a, b) for a, b in zip(before, layers))


@pytest.mark.parametrize("case", ["block id out of range", "out too small", "mismatched page sizes",
                                  "non-contiguous page", "out dtype"])
def test_scatter_blocks_rejects_bad_input(case):
    make, exc, match = BAD_GATHER[case]
    layers, ids, src = _blocks()
    before = [t.clone() for t in layers]
    L2, i2, s2 = make(layers, ids, src)
    with pytest.raises(exc, match=match.replace("out", "src")):
        ops.scatter_blocks(s2, i2, L2)
    assert all(same_bytes(a, b) for a, b in zip(before, layers)), "a rejected call wrote to the layers"


def test_scatter_blocks_rejects_bad_expected():
    layers, ids, src = _blocks()
    with pytest.raises(ValueError, match="expected has 1 checksums but there are 2 chunks"):
        ops.scatter_blocks(src, ids, layers, chunk_blocks=1, expected=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected needs chunk_blocks > 0"):
        ops.scatter_blocks(src, ids, layers, expected=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="expected must be int64"):
        ops.scatter_blocks(src, ids, layers, chunk_blocks=1, expected=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk_blocks must be >= 0"):
        ops.gather_blocks(layers, ids, src, chunk_blocks=-1)


def test_checksum_rejects_bad_input():
    with pytest.raises(ValueError, match="data must be contiguous"):
        ops.checksum64(torch.zeros(4, 4)[:, 1])
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        ops.chunk_checksums(torch.zeros(4), 0)
    with pytest.raises(TypeError, match="data must be a torch.Tensor or a bytes-like"):
        ops.checksum64("text")
