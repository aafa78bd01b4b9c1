"""Every op on CUDA against the pure-torch reference (GPU machines only).

Covers both host paths (UVA through pinned memory, staging + DMA), a device
flat buffer, fused checksums equal to the CPU's checksum64, verified scatter,
pages larger than one warp's 32 KiB segment, zero-byte
transfers, host ranges only partly page-locked (must stage, never fault), and
torch-pinned buffers dropped while a copy of them is still queued.
"""

import pytest
import torch

from stratacache import ops

from .test_ops import CASES, POISON, make_layers, stable_seed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")


def flat(nbytes, where):
    if where == "device":
        return torch.full((nbytes,), POISON, dtype=torch.uint8, device=DEV)
    t = torch.full((nbytes,), POISON, dtype=torch.uint8, pin_memory=(where == "pinned"))
    return t


@pytest.mark.parametrize("n", [0, 1, 9, 4096 + 3, (5 << 20) + 1])
def test_checksums_on_cuda_equal_cpu(n):
    data = torch.randint(0, 256, (n,), dtype=torch.uint8)
    assert ops.checksum64(data.to(DEV)) == ops.checksum64(data)
    for chunk in (1, 7, 4096, 1 << 20):
        assert torch.equal(ops.chunk_checksums(data.to(DEV), chunk).cpu(), ops.chunk_checksums(data, chunk))
    assert ops.checksum64(data.to(DEV)[1:]) == ops.checksum64(data[1:])   # unaligned start


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}L-{c[4]}-{c[5]}n" for c in CASES])
@pytest.mark.parametrize("where,transfer", [("pinned", "uva"), ("pinned", "staging"), ("pageable", "auto"),
                                            ("device", "auto")])
def test_block_ops_on_cuda_match_reference(case, where, transfer):
    kind, L, nb, page, dtype, n, cb = case
    gen = torch.Generator().manual_seed(stable_seed((case, where)))
    cpu_layers = make_layers(gen, kind, L, nb, page, dtype)
    buf_layers = [t.to(DEV) for t in cpu_layers] if kind == "separate" else None
    if buf_layers is None:   # keep the shared / interleaved memory arrangement on the device
        base = cpu_layers[0]._base if cpu_layers[0]._base is not None else cpu_layers[0]
        dev_base = base.to(DEV)
        offsets = [t.storage_offset() for t in cpu_layers]
        buf_layers = [dev_base.as_strided(t.shape, t.stride(), o) for t, o in zip(cpu_layers, offsets)]
    ids = torch.randperm(nb, generator=gen)[:n]
    P = cpu_layers[0][0].numel() * cpu_layers[0].element_size()
    out = flat(n * L * P + 5, where)
    sums = ops.gather_blocks(buf_layers, ids, out, cb, transfer=transfer)
    torch.cuda.synchronize()
    ref, ref_sums = ops.ref_gather_blocks(cpu_layers, ids, cb)
    assert torch.equal(out[: n * L * P].cpu(), ref.reshape(-1))
    assert bool((out[n * L * P:].cpu() == POISON).all())
    assert [int(s) & ops.MASK64 for s in sums.cpu()] == ref_sums

    src = torch.randint(0, 256, (n * L * P,), dtype=torch.uint8, generator=gen)
    src = src.pin_memory() if where == "pinned" else (src.to(DEV) if where == "device" else src)
    good = ops.chunk_checksums(src.cpu(), max(cb * L * P, 1)) if n else torch.empty(0, dtype=torch.int64)
    want = [t.clone() for t in cpu_layers]
    ops.ref_scatter_blocks(src.cpu(), ids, want)
    ok = ops.scatter_blocks(src, ids, buf_layers, cb, good, transfer=transfer)
    torch.cuda.synchronize()
    assert bool(ok.all())
    for got, w in zip(buf_layers, want):
        assert torch.equal(got.cpu().reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
    if n:
        bad = src.clone()                                    # clone() does not keep the pin
        bad = bad.pin_memory() if where == "pinned" else bad
        bad[0] ^= 1
        ok = ops.scatter_blocks(bad, ids, buf_layers, cb, good, transfer=transfer).cpu()
        assert not bool(ok[0]) and bool(ok[1:].all())


@pytest.mark.parametrize("where,transfer", [("pinned", "uva"), ("pinned", "staging"), ("pageable", "auto"),
                                            ("device", "auto")])
def test_layer_slices_on_cuda(where, transfer):
    """Layer-wise loads on CUDA: one layer (or a slice of layers) of a [n, L, P] payload at a
    time, through each host path (a row-pitched DMA for staging), equals the whole-payload copy."""
    gen = torch.Generator().manual_seed(stable_seed(("cuda-slices", where, transfer)))
    L, nb, n = 6, 20, 11
    layers = [t.to(DEV) for t in make_layers(gen, "separate", L, nb, (2, 4, 16), torch.float16)]
    P = 2 * 4 * 16 * 2
    ids = torch.randperm(nb, generator=gen)[:n]
    payload = torch.randint(0, 256, (n, L, P), dtype=torch.uint8, generator=gen)
    payload = payload.pin_memory() if where == "pinned" else (payload.to(DEV) if where == "device" else payload)
    want = [t.cpu() for t in layers]
    ops.ref_scatter_blocks(payload.cpu(), ids, want)
    for l in range(L - 2):
        ops.scatter_blocks(payload[:, l:l + 1], ids, [layers[l]], transfer=transfer)
    ops.scatter_blocks(payload[:, L - 2:], ids, layers[L - 2:], transfer=transfer)
    torch.cuda.synchronize()
    for got, w in zip(layers, want):
        assert torch.equal(got.cpu().reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
    back = torch.full((n, L, P), POISON, dtype=torch.uint8)
    back = back.pin_memory() if where == "pinned" else (back.to(DEV) if where == "device" else back)
    for l in range(1, L):
        ops.gather_blocks([layers[l]], ids, back[:, l:l + 1], transfer=transfer)
    torch.cuda.synchronize()
    assert torch.equal(back[:, 1:].cpu(), payload[:, 1:].cpu()) and bool((back[:, 0].cpu() == POISON).all())


def test_cuda_bad_input_names_the_argument():
    layers = [torch.zeros(4, 64, device=DEV) for _ in range(2)]
    out = torch.empty(2 * 2 * 256, dtype=torch.uint8, pin_memory=True)
    with pytest.raises(IndexError, match="block_ids\\[1\\] = 9"):
        ops.gather_blocks(layers, torch.tensor([0, 9]), out)
    with pytest.raises(ValueError, match="transfer='uva' needs all 1024 bytes of out"):
        ops.gather_blocks(layers, torch.tensor([0, 1]), torch.empty(2 * 2 * 256, dtype=torch.uint8),
                          transfer="uva")
    with pytest.raises(ValueError, match="transfer must be"):
        ops.gather_blocks(layers, torch.tensor([0, 1]), out, transfer="dma")
    with pytest.raises(ValueError, match="out is too small"):
        ops.gather_blocks(layers, torch.tensor([0, 1]), out[:-1])


def test_opcheck_on_cuda():
    layers = [torch.randn(8, 2, 16, device=DEV) for _ in range(3)]
    ids = torch.tensor([3, 1, 6])
    out = torch.empty(3 * 3 * 128, dtype=torch.uint8, device=DEV)
    torch.library.opcheck(torch.ops.stratacache.gather_blocks.default, (layers, ids, out, 2, "auto"))
    sums = ops.gather_blocks(layers, ids, out, 2)
    torch.library.opcheck(torch.ops.stratacache.scatter_blocks.default, (out, ids, layers, 2, sums, "auto"))
    torch.library.opcheck(torch.ops.stratacache.checksum64.default, (out,))
    torch.library.opcheck(torch.ops.stratacache.chunk_checksums.default, (out, 100))


@pytest.mark.parametrize("transfer", ["uva", "staging", "auto"])
def test_zero_byte_transfers_return_at_once(transfer):
    """An empty pinned tensor has no address (pin_memory() of it is a null pointer): a transfer
    of no bytes returns before choosing a host path."""
    layers = [torch.zeros(4, 64, dtype=torch.uint8, device=DEV) for _ in range(2)]
    none = torch.empty(0, dtype=torch.int64)
    empty = torch.empty(0, dtype=torch.uint8).pin_memory()
    sums = ops.gather_blocks(layers, none, empty, 2, transfer=transfer)
    assert sums.shape == (0,)
    ok = ops.scatter_blocks(empty, none, layers, 2, torch.empty(0, dtype=torch.int64), transfer=transfer)
    assert ok.shape == (0,)


@pytest.mark.parametrize("page", [32 * 1024, 100 * 1024 + 16, 3 * 32 * 1024 + 8])
@pytest.mark.parametrize("where", ["pinned", "device"])
def test_pages_larger_than_a_warp_segment(page, where):
    """Pages are split into 32 KiB warp segments: bytes and fused checksums stay exact."""
    gen = torch.Generator().manual_seed(stable_seed(("segments", page, where)))
    L, nb, n, cb = 3, 9, 7, 2
    layers = [torch.randint(0, 256, (nb, page), dtype=torch.uint8, generator=gen).to(DEV) for _ in range(L)]
    ids = torch.randperm(nb, generator=gen)[:n]
    out = flat(n * L * page, where)
    sums = ops.gather_blocks(layers, ids, out, cb)
    torch.cuda.synchronize()
    ref, ref_sums = ops.ref_gather_blocks([t.cpu() for t in layers], ids, cb)
    assert torch.equal(out.cpu(), ref.reshape(-1))
    assert [int(s) & ops.MASK64 for s in sums.cpu()] == ref_sums
    fresh = [torch.zeros_like(t) for t in layers]
    ok = ops.scatter_blocks(out, ids, fresh, cb, sums.cpu())
    torch.cuda.synchronize()
    assert bool(ok.all())
    for f, t in zip(fresh, layers):
        assert torch.equal(f[ids.to(DEV)].cpu(), t[ids.to(DEV)].cpu())


def _page_aligned_host(nbytes: int) -> torch.Tensor:
    raw = torch.zeros(nbytes + 4096, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % 4096
    return raw[skip:skip + nbytes]


def test_a_host_range_only_partly_page_locked_is_staged_never_read_through_uva():
    """The first byte is registered, the last is not (an object straddling the end of a pinned
    arena piece): 'auto' must stage (a UVA read would be a sticky illegal-address fault) and
    'uva' must refuse, naming the range."""
    L, nb, page, n = 2, 8, 64 * 1024, 6
    layers = [torch.randint(0, 256, (nb, page), dtype=torch.uint8).to(DEV) for _ in range(L)]
    host = _page_aligned_host(n * L * page)
    half = (host.numel() // 2) // 4096 * 4096
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(host.data_ptr(), half, 0)) == 0
    try:
        ids = torch.arange(n)
        with pytest.raises(ValueError, match="needs all .* bytes of out in one pinned"):
            ops.gather_blocks(layers, ids, host, transfer="uva")
        ops.gather_blocks(layers, ids, host, transfer="auto")
        torch.cuda.synchronize()
        ref, _ = ops.ref_gather_blocks([t.cpu() for t in layers], ids)
        assert torch.equal(host, ref.reshape(-1))
        fresh = [torch.zeros_like(t) for t in layers]
        ops.scatter_blocks(host, ids, fresh, transfer="auto")
        torch.cuda.synchronize()
        assert all(torch.equal(f[:n].cpu(), t[:n].cpu()) for f, t in zip(fresh, layers))
    finally:
        assert int(cudart.cudaHostUnregister(host.data_ptr())) == 0


@pytest.mark.parametrize("transfer", ["uva", "staging"])
def test_a_dropped_pinned_source_is_not_recycled_while_its_copy_is_queued(transfer):
    """The scatter is queued behind a long kernel; the torch-pinned source is dropped and a new
    pinned tensor of the same size is written at once. Recorded with the caching host
    allocator for the stream, the old block is not handed out again until the copy ran, so the
    pages get the original bytes."""
    L, nb, page, n = 2, 16, 16 * 1024, 12
    layers = [torch.zeros(nb, page, dtype=torch.uint8, device=DEV) for _ in range(L)]
    payload = torch.randint(0, 256, (n, L, page), dtype=torch.uint8)
    src = payload.clone().pin_memory()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)                       # keeps the stream busy ~0.1 s
        ops.scatter_blocks(src, torch.arange(n), layers, transfer=transfer)
    del src
    reuse = torch.empty((n, L, page), dtype=torch.uint8).pin_memory()
    reuse.fill_(0x5A)
    stream.synchronize()
    for l, layer in enumerate(layers):
        assert torch.equal(layer[:n].cpu(), payload[:, l])
