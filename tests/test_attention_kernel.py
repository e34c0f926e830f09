"""megaswift.kernels.attention (fused vs reference) and megaswift.model.core_attention.CoreAttention."""

import contextlib
import socket

import pytest
import torch

from megaswift.kernels import attention as attn
from megaswift.context_parallel import load_balanced_indices

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}
HEADS = [pytest.param((6, 2), id="gqa6x2"), pytest.param((4, 4), id="mha4")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
IMPLS = [pytest.param(attn.fused, id="fused"), pytest.param(attn.reference, id="reference")]
D = 16


def _qkv(lead, hq, hkv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(*lead, h, D, generator=g).to(dtype).requires_grad_()
    return mk(hq), mk(hkv), mk(hkv)


def _fwd_bwd(fn, q, k, v, **kw):
    """Output and (dq, dk, dv) for a fixed random upstream gradient."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    g = torch.Generator().manual_seed(123)
    dout = torch.randn(out.shape, generator=g).to(out.dtype)
    out.backward(dout)
    return out.detach(), (q.grad, k.grad, v.grad)


def _assert_match(a, b, dtype):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, **TOL[dtype])
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, **GRAD_TOL[dtype])


def _padding_mask(lengths, s):
    """[b, 1, s, s] bool, True = masked: keys and queries past each sample's length."""
    valid = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # [b, s]
    ok = valid[:, None, :, None] & valid[:, None, None, :]
    return ~ok


# ------------------------------------------------------------------------------ kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal", [True, False])
def test_sbhd_fused_matches_reference(dtype, heads, causal):
    hq, hkv = heads
    q, k, v = _qkv((12, 3), hq, hkv, dtype)
    ref = _fwd_bwd(attn.reference, q, k, v, causal=causal)
    fus = _fwd_bwd(attn.fused, q, k, v, causal=causal)
    assert ref[0].shape == (12, 3, hq * D) and ref[0].dtype == dtype
    _assert_match(fus, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
def test_thd_fused_matches_reference(dtype, heads):
    hq, hkv = heads
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    q, k, v = _qkv((17,), hq, hkv, dtype)
    ref = _fwd_bwd(attn.reference, q, k, v, cu_seqlens=cu)
    fus = _fwd_bwd(attn.fused, q, k, v, cu_seqlens=cu)
    assert ref[0].shape == (17, hq * D) and ref[0].dtype == dtype
    _assert_match(fus, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
def test_masked_fused_matches_reference(dtype, heads):
    hq, hkv = heads
    lengths = [7, 4, 10]
    q, k, v = _qkv((10, 3), hq, hkv, dtype)
    mask = _padding_mask(lengths, 10)
    ref = _fwd_bwd(attn.reference, q, k, v, attention_mask=mask)
    fus = _fwd_bwd(attn.fused, q, k, v, attention_mask=mask)
    _assert_match(fus, ref, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", HEADS)
def test_thd_equals_each_sample_alone(impl, heads):
    hq, hkv = heads
    lengths = [5, 9, 3]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    q, k, v = _qkv((17,), hq, hkv, torch.float32)
    packed = impl(q, k, v, cu_seqlens=cu)
    for i, n in enumerate(lengths):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        alone = impl(q[sl, None], k[sl, None], v[sl, None])  # sbhd with b=1
        torch.testing.assert_close(packed[sl], alone[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_thd_tail_tokens_outside_samples_are_zero(impl):
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    q, k, v = _qkv((12,), 6, 2, torch.float32)
    out = impl(q, k, v, cu_seqlens=cu)
    assert torch.equal(out[9:], torch.zeros_like(out[9:]))
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", HEADS)
def test_padded_batch_matches_unpadded(impl, heads):
    hq, hkv = heads
    lengths = [7, 4, 10]
    s = max(lengths)
    q, k, v = _qkv((s, 3), hq, hkv, torch.float32)
    out = impl(q, k, v, attention_mask=_padding_mask(lengths, s), causal=True)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lengths):
        alone = impl(q[:n, b : b + 1], k[:n, b : b + 1], v[:n, b : b + 1])
        torch.testing.assert_close(out[:n, b], alone[:, 0], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[n:, b], torch.zeros_like(out[n:, b]))  # padding query rows -> 0
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
def test_no_cross_sample_leakage(impl):
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    q, k, v = _qkv((17,), 6, 2, torch.float32)
    base = impl(q, k, v, cu_seqlens=cu).detach()
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[5:14] += 3.0 * torch.randn_like(k2[5:14])
    v2[5:14] += 3.0 * torch.randn_like(v2[5:14])
    out = impl(q, k2, v2, cu_seqlens=cu).detach()
    assert torch.equal(out[:5], base[:5])  # sample 1 untouched
    assert torch.equal(out[14:], base[14:])  # sample 3 untouched
    assert not torch.allclose(out[5:14], base[5:14])  # sample 2 itself does change


@pytest.mark.parametrize("sq,sk", [(4, 10), (10, 4)])
def test_causal_bottom_right_when_lengths_differ(sq, sk):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sq, 2, 6, D, generator=g)
    k, v = (torch.randn(sk, 2, 2, D, generator=g) for _ in range(2))
    ref = attn.reference(q, k, v, causal=True)
    fus = attn.fused(q, k, v, causal=True)
    torch.testing.assert_close(fus, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(fus).all()
    # last query sees every key
    full = attn.reference(q[-1:], k, v, causal=False)
    torch.testing.assert_close(ref[-1:], full, atol=1e-5, rtol=1e-5)


def test_softmax_scale_is_used():
    q, k, v = _qkv((6, 1), 4, 4, torch.float32)
    a = attn.fused(q, k, v, softmax_scale=0.3)
    b = attn.reference(q * 0.3 * D**0.5, k, v)  # default scale is 1/sqrt(D)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_selector_runs_the_named_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(attn, "reference", lambda *a, **kw: calls.append("reference"))
    monkeypatch.setattr(attn, "fused", lambda *a, **kw: calls.append("fused"))
    q, k, v = _qkv((3, 1), 2, 2, torch.float32)
    attn.attention(q, k, v)
    attn.attention(q, k, v, kernel="reference")
    assert calls == ["fused", "reference"]
    with pytest.raises(ValueError, match="attention kernel"):
        attn.attention(q, k, v, kernel="bogus")


def test_bad_inputs_raise():
    q, k, v = _qkv((5,), 6, 4, torch.float32)  # 6 not a multiple of 4
    with pytest.raises(ValueError, match="multiple"):
        attn.fused(q, k, v, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    q, k, v = _qkv((5,), 4, 4, torch.float32)
    with pytest.raises(ValueError, match="sbhd only"):
        attn.fused(q, k, v, cu_seqlens=torch.tensor([0, 5]), attention_mask=torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="cu_seqlens"):
        attn.reference(q, k, v, cu_seqlens=torch.tensor([0, 7]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CP_CASES = {
    # name: (layout, causal, padding mask, heads)
    "sbhd_causal_gqa": ("sbhd", True, False, (6, 2)),
    "sbhd_causal_padmask": ("sbhd", True, True, (4, 4)),
    "sbhd_bidirectional": ("sbhd", False, False, (6, 2)),
    "thd_causal_gqa": ("thd", True, False, (6, 2)),
    "thd_bidirectional": ("thd", False, False, (4, 4)),
}


def _cp_problem(case: str, cp: int):
    """(q, k, v, kwargs without cp_group, sequence lengths for the load-balanced split, seq dim)."""
    layout, causal, padmask, (hq, hkv) = CP_CASES[case]
    if layout == "sbhd":
        s = 4 * cp * 2  # 4 tokens per chunk
        q, k, v = _qkv((s, 2), hq, hkv, torch.float32, seed=7)
        kw = dict(causal=causal)
        if padmask:
            kw["attention_mask"] = _padding_mask([s - 3, s], s)
        return q, k, v, kw, [s]
    lens = [2 * cp * n for n in (3, 1, 2)]  # segments, each a multiple of 2 x cp
    q, k, v = _qkv((sum(lens),), hq, hkv, torch.float32, seed=7)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, dict(cu_seqlens=cu, causal=causal), lens


def _cp_worker(rank, world, port, case, impl_name, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        impl = getattr(attn, impl_name)
        q, k, v, kw, lens = _cp_problem(case, world)
        idx = load_balanced_indices(lens, world, rank)
        local = [x.detach()[idx].clone().requires_grad_() for x in (q, k, v)]
        if "attention_mask" in kw:
            kw["attention_mask"] = kw["attention_mask"][:, :, idx, :]  # local queries, global keys
        out = impl(*local, cp_group=dist.group.WORLD, **kw)
        dout = torch.randn(_cp_full_out_shape(q, v, kw), generator=torch.Generator().manual_seed(123))
        out.backward(dout[idx])
        torch.save({"idx": idx, "out": out.detach(), "grads": [x.grad for x in local]},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _cp_full_out_shape(q, v, kw):
    return (*q.shape[:-2], q.shape[-2] * v.shape[-1])


@pytest.mark.parametrize("case,cp,impl_name", [
    *[(case, 2, "fused") for case in sorted(CP_CASES)],
    ("sbhd_causal_padmask", 2, "reference"), ("thd_causal_gqa", 2, "reference"),
    ("sbhd_causal_padmask", 3, "fused"), ("thd_causal_gqa", 3, "fused"),
])
def test_context_parallel_matches_one_rank(case, cp, impl_name, tmp_path):
    """Outputs and q/k/v gradients of every CP rank equal the single-rank problem's, at their
    load-balanced positions (real gloo ranks; K/V gathered and gradients reduce-scattered)."""
    import torch.multiprocessing as mp

    mp.spawn(_cp_worker, args=(cp, _free_port(), case, impl_name, str(tmp_path)), nprocs=cp, join=True)
    impl = getattr(attn, impl_name)
    q, k, v, kw, _ = _cp_problem(case, cp)
    dout = torch.randn(_cp_full_out_shape(q, v, kw), generator=torch.Generator().manual_seed(123))
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    full = impl(q, k, v, **kw)
    full.backward(dout)
    covered = torch.zeros(q.shape[0], dtype=torch.bool)
    for rank in range(cp):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        idx = got["idx"]
        covered[idx] = True
        torch.testing.assert_close(got["out"], full.detach()[idx], atol=1e-5, rtol=1e-5)
        for mine, ref in zip(got["grads"], (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(mine, ref[idx], atol=1e-5, rtol=1e-4)
    assert covered.all()  # the ranks' chunks tile every sequence


# ------------------------------------------------------------------------------ CoreAttention


@pytest.fixture(scope="module")
def mpu():
    """A one-process gloo world with megatron's model-parallel groups (tp = pp = cp = 1)."""
    from megatron.core import parallel_state

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        parallel_state.initialize_model_parallel()
        yield parallel_state
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _config(hq, hkv, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw.setdefault("attention_dropout", 0.0)
    return TransformerConfig(
        num_layers=1,
        hidden_size=hq * D,
        num_attention_heads=hq,
        num_query_groups=hkv,
        use_cpu_initialization=True,
        **kw,
    )


def _core(config, mask_type=None):
    from megatron.core.transformer.enums import AttnMaskType

    from megaswift.model.core_attention import CoreAttention

    return CoreAttention(config, 1, mask_type or AttnMaskType.causal, "self").eval()


@pytest.fixture
def megatron_dpa_on_cpu(monkeypatch):
    """megatron's DotProductAttention hard-codes CUDA in three places; point them at CPU."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions import fused_softmax

    class CPUBuffer:
        def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
            return torch.empty(*shape, dtype=dtype)

    class NoRNGTracker:
        def fork(self, *a, **kw):
            return contextlib.nullcontext()

    monkeypatch.setattr(parallel_state, "get_global_memory_buffer", lambda: CPUBuffer())
    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda *a, **kw: NoRNGTracker())
    monkeypatch.setattr(
        fused_softmax,
        "get_default_causal_mask",
        lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool(),
    )


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("explicit_mask", [False, True], ids=["mask_none", "mask_given"])
def test_core_attention_matches_megatron_dot_product_attention(mpu, megatron_dpa_on_cpu, heads, explicit_mask):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    hq, hkv = heads
    config = _config(hq, hkv)
    ours = _core(config)
    theirs = DotProductAttention(config, 1, AttnMaskType.causal, "self").eval()
    s, b = 11, 2
    q, k, v = _qkv((s, b), hq, hkv, torch.float32, seed=3)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None] if explicit_mask else None
    out_ours, grads_ours = _fwd_bwd(lambda *x: ours(*x, mask), q, k, v)
    out_theirs, grads_theirs = _fwd_bwd(lambda *x: theirs(*x, mask), q, k, v)
    assert out_ours.shape == out_theirs.shape == (s, b, hq * D)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
    for a, b_ in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_padded", [False, True])
def test_core_attention_packed_thd(mpu, use_padded):
    from megatron.core.packed_seq_params import PackedSeqParams

    core = _core(_config(6, 2))
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    if use_padded:  # the padded boundaries win; cu_seqlens_q is deliberately different
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=torch.tensor([0, 4, 12, 15], dtype=torch.int32),
            cu_seqlens_kv=torch.tensor([0, 4, 12, 15], dtype=torch.int32),
            cu_seqlens_q_padded=cu,
            cu_seqlens_kv_padded=cu,
        )
    else:
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    q, k, v = _qkv((17,), 6, 2, torch.float32)
    out = core(q, k, v, None, packed_seq_params=params)
    assert out.shape == (17, 6 * D)
    torch.testing.assert_close(out, attn.reference(q, k, v, cu_seqlens=cu), atol=1e-5, rtol=1e-5)


def test_core_attention_padding_mask_type_is_not_causal(mpu):
    from megatron.core.transformer.enums import AttnMaskType

    core = _core(_config(4, 4), AttnMaskType.padding)
    q, k, v = _qkv((8, 2), 4, 4, torch.float32)
    mask = _padding_mask([8, 5], 8)
    torch.testing.assert_close(
        core(q, k, v, mask), attn.reference(q, k, v, attention_mask=mask, causal=False), atol=1e-5, rtol=1e-5
    )
    # the forward's attn_mask_type overrides the constructor's
    torch.testing.assert_close(
        core(q, k, v, None, attn_mask_type=AttnMaskType.causal),
        attn.reference(q, k, v, causal=True),
        atol=1e-5,
        rtol=1e-5,
    )


def test_core_attention_dropout(mpu):
    from megatron.core.packed_seq_params import PackedSeqParams

    core = _core(_config(4, 4, attention_dropout=0.5))
    q, k, v = _qkv((8, 2), 4, 4, torch.float32)
    ev = core(q, k, v, None)
    torch.testing.assert_close(ev, core(q, k, v, None))  # eval: deterministic, no dropout
    core.train()
    tr = core(q, k, v, None)
    assert torch.isfinite(tr).all() and not torch.allclose(tr, ev)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    qt, kt, vt = _qkv((8,), 4, 4, torch.float32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    assert torch.isfinite(core(qt, kt, vt, None, packed_seq_params=params)).all()


def test_core_attention_rejects_unsupported(mpu):
    from megatron.core.packed_seq_params import PackedSeqParams

    core = _core(_config(4, 4))
    q, k, v = _qkv((6, 1), 4, 4, torch.float32)
    with pytest.raises(ValueError, match="attention_bias"):
        core(q, k, v, None, attention_bias=torch.zeros(1, 4, 6, 6))
    with pytest.raises(ValueError, match="qkv_format"):
        core(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="bshd"))
    with pytest.raises(ValueError, match="'cp' process group of that size"):
        _core(_config(4, 4, context_parallel_size=2))  # the process groups have CP = 1
