"""Fused attention, FlashAttention-2 (Dao 2023): tiled, online softmax, logsumexp saved, recomputation in
the backward. Causal or not, grouped-/multi-query heads, packed documents, sliding window.

Layout and masking. q (B, Hq, T, D), k/v (B, Hkv, S, D), Hq a multiple of Hkv. Queries are the LAST
T of the S key positions (query i sits at position S - T + i: prefill when T == S, KV-cached decode
when T < S), exactly as ``reference.attention_mask``. Key j is visible to query i when
    j <= pos(i) (causal),  pos(i) - j < window (sliding window),  doc[pos(i)] == doc[j] (packing).
Whole key blocks outside the causal/window band are never visited; with document ids a short scan
of the ids first narrows the range to the first .. last key block whose id range meets the query
block's (exact for any ids: blocks sharing an id always have intersecting ranges), so packed short
documents cost little more than their own size and the main loop has no data-dependent branch.

Forward. Program (query block, batch*head) keeps q in registers, streams K/V blocks, keeps a running
row max m and sum l in the exp2 domain (scores pre-multiplied by scale * log2 e), rescales the fp32
accumulator, divides once at the end, and stores lse2 = m + log2(l) per query row (fp32). Fully
masked rows (possible only with unusual doc ids) output 0 and lse2 = +inf, so their backward is 0.
The key range of a query block is split into blocks that every query sees entirely (no mask code
at all: a ``MASKED=False`` instance of the loop) and the few at the causal diagonal, the window's
lower edge and the sequence end (masked); with document ids every block is masked. Each loop body
is straight-line code, so Triton can software-pipeline its K/V loads (``num_stages``).

Backward (deterministic by construction: no atomics, every gradient element written by one program).
  1. delta_i = rowsum(dO_i * O_i).
  2. dK/dV: program (key block, batch*kv-head) holds K, V and the dK, dV accumulators, and walks every
     query head of its group and every query block that can see the key block (unmasked and masked
     ranges as in the forward):
     P = exp2(S - lse2), dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dK += dS^T Q, all computed
     transposed (keys as rows: P^T = exp2(K Q^T - lse2)) so no register tile needs a transpose.
  3. dQ: program (query block, batch*head) recomputes P and dS over its key blocks: dQ += dS K.
  This recomputes Q K^T twice (FA2's single pass adds dQ with atomics instead), the price of a
  bit-reproducible backward, and GQA needs no reduction of per-query-head dK/dV afterwards.

Offsets: batch/head origins are 64-bit scalars; offsets along the sequence are 32-bit (64-bit pointer
tiles cost twice the registers), so S x (sequence stride) must stay below 2^31 elements.
Head dims up to 256: the head dim is a compile-time constant (HEAD_DIM), padded to a power of two
(BLOCK_D, at least 16 for tensor-core dots) with a mask that folds away when it is one. Block sizes
and warps/stages come from autotune on a GPU over per-head-dim lists (Hopper: 128x64 tiles, 8 warps,
3 stages first for D <= 128; smaller tiles for D = 256); fp32 inputs use exact ("ieee")
dots, fp16/bf16 use tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634

def _tiles(spec):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in spec]


# (BLOCK_M, BLOCK_N, warps, stages) per kernel and head-dim class, chosen from sm_90 compiles of the
# candidates (tests/kernels/sm90_compile.py): each list starts with the tile that compiled with wgmma
# and no or the fewest register spills; autotune then times them on the GPU. dK/dV accumulate over
# BLOCK_N keys, so its BLOCK_N stays >= 64 (wgmma needs 64 rows per warpgroup).
_FWD_SMALL_D = _tiles([(128, 64, 8, 3), (128, 32, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)])
_FWD_LARGE_D = _tiles([(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3)])
_DKDV_SMALL_D = _tiles([(64, 64, 8, 3), (64, 64, 4, 3), (16, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2)])
_DKDV_LARGE_D = _tiles([(64, 64, 8, 3), (64, 64, 8, 2)])
_DQ_SMALL_D = _tiles([(64, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 3)])
_DQ_LARGE_D = _tiles([(64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3)])
_LARGE_D = _FWD_LARGE_D + _DKDV_LARGE_D + _DQ_LARGE_D
_INTERP = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)
_FWD_CONFIGS = launch.configs(_FWD_SMALL_D + _FWD_LARGE_D, _INTERP)
_DKDV_CONFIGS = launch.configs(_DKDV_SMALL_D + _DKDV_LARGE_D, _INTERP)
_DQ_CONFIGS = launch.configs(_DQ_SMALL_D + _DQ_LARGE_D, _INTERP)


def _prune_for_head_dim(configs, named_args, **kwargs):
    """Head dims above 128 get the small-tile lists (registers and the 228 KB of shared memory)."""
    if launch.INTERPRET:
        return configs
    large = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 0)) > 128
    keep = [c for c in configs if any(c is x for x in _LARGE_D) == large]  # identity:
    return keep or configs  # equal tiles may sit in both lists


@triton.jit
def _visible(q_pos, k_pos, S, q_valid, q_doc, k_doc, window,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr):
    # Boolean tile: key k_pos visible to query q_pos (positions in the key frame). Callers shape the
    # query arguments as rows or columns and the key arguments the other way; the result broadcasts.
    vis = q_valid & (k_pos < S)
    if CAUSAL:
        vis &= k_pos <= q_pos
    if HAS_WINDOW:
        vis &= (q_pos - k_pos) < window
    if HAS_DOC:
        vis &= q_doc == k_doc
    return vis


@triton.jit
def _doc_span(DOC_ROW, pos, valid, MISSING: tl.constexpr):
    # Document ids at ``pos`` (MISSING where not valid) and their min / max over the valid ones.
    ids = tl.load(DOC_ROW + pos, mask=valid, other=MISSING)
    return ids, tl.min(tl.where(valid, ids, 2147483647), axis=0), tl.max(tl.where(valid, ids, -2147483647), axis=0)


@triton.jit
def _doc_block_range(DOC_ROW, start, end, count, offset, id_lo, id_hi, BLOCK: tl.constexpr):
    # Narrow the block range [start, end) (indices < count, ids at DOC_ROW + offset + index) to the
    # first .. last block whose id range meets [id_lo, id_hi]. Reads only the ids (S ints against
    # S x D x 4 bytes of K and V), and keeps the main loops free of data-dependent branches.
    first = end
    last = start
    for b0 in range(start, end, BLOCK):
        idx = b0 + tl.arange(0, BLOCK)
        valid = idx < count
        ids = tl.load(DOC_ROW + offset + idx, mask=valid, other=0)
        hit = (tl.max(tl.where(valid, ids, -2147483647), axis=0) >= id_lo) & \
              (tl.min(tl.where(valid, ids, 2147483647), axis=0) <= id_hi)
        first = tl.where(hit & (b0 < first), b0, first)
        last = tl.where(hit, b0 + BLOCK, last)
    return first, tl.minimum(last, end)


@triton.jit
def _key_blocks(m0, T, S, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr):
    # Key blocks seen by queries m0 .. m0 + BLOCK_M - 1, as [lo, a) masked, [a, b) fully visible
    # (no mask needed), [b, hi) masked; all bounds but hi are multiples of BLOCK_N.
    q_first = S - T + m0
    q_last = S - T + tl.minimum(m0 + BLOCK_M, T) - 1
    hi = S
    full_hi = S
    if CAUSAL:
        hi = tl.minimum(S, q_last + 1)
        full_hi = tl.minimum(S, q_first + 1)
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, q_first - window + 1) // BLOCK_N * BLOCK_N
        full_lo = tl.maximum(lo, q_last - window + 1)
    a = tl.minimum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
    b = tl.maximum(tl.minimum(full_hi // BLOCK_N * BLOCK_N, hi), a)
    if HAS_DOC:  # every block needs the document mask
        a = lo
        b = lo
    return lo, a, b, hi


@triton.jit
def _query_block_keys(DOC_ROW, m0, q_pos, q_valid, T, S, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr):
    # What the forward and dQ programs of query block m0 visit: the queries' document ids and the key
    # blocks of ``_key_blocks``; with document ids only those that can hold the block's documents (masked).
    q_doc = q_pos
    q_doc_lo = 0
    q_doc_hi = 0
    if HAS_DOC:
        q_doc, q_doc_lo, q_doc_hi = _doc_span(DOC_ROW, q_pos, q_valid, -1)
    lo, a, b, hi = _key_blocks(m0, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_DOC)
    if HAS_DOC:
        lo, hi = _doc_block_range(DOC_ROW, lo, hi, S, 0, q_doc_lo, q_doc_hi, BLOCK_N)
        a = lo
        b = lo
    return q_doc, lo, a, b, hi


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, q_pos, q_valid, q_doc, k_base, v_base, skt, svt, DOC_ROW,
              start, end, S, window, qk_scale, offs_n, offs_d,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
              PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    d_ok = (offs_d < HEAD_DIM)[None, :]
    for n0 in range(start, end, BLOCK_N):
        k_pos = n0 + offs_n
        k_ok = (k_pos < S)[:, None]
        k_doc = k_pos
        if HAS_DOC:
            k_doc = tl.load(DOC_ROW + k_pos, mask=k_pos < S, other=-2)
        k = tl.load(k_base + k_pos[:, None] * skt + offs_d[None, :], mask=k_ok & d_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            vis = _visible(q_pos[:, None], k_pos[None, :], S, q_valid[:, None], q_doc[:, None], k_doc[None, :],
                           window, CAUSAL, HAS_WINDOW, HAS_DOC)
            s = tl.where(vis, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + k_pos[:, None] * svt + offs_d[None, :], mask=k_ok & d_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOC", "GROUP", "T_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE, DOC, qk_scale, T, S, window, T_BUCKET,
                          sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb,
                          HQ: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    m_block = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: start them first (shorter tail wave)
        m_block = tl.num_programs(0) - 1 - m_block
    m0 = m_block * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    kvh = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_valid = offs_m < T
    q_pos = S - T + offs_m
    io_mask = q_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=io_mask, other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    DOC_ROW = DOC + b * sdb
    q_doc, lo, a, b_, hi = _query_block_keys(DOC_ROW, m0, q_pos, q_valid, T, S, window, BLOCK_M, BLOCK_N,
                                             CAUSAL, HAS_WINDOW, HAS_DOC)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # fully visible blocks first (no mask code), then the window's lower edge and the causal diagonal
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, q_pos, q_valid, q_doc, k_base, v_base, skt, svt,
                              DOC_ROW, a, b_, S, window, qk_scale, offs_n, offs_d,
                              False, CAUSAL, HAS_WINDOW, HAS_DOC, PRECISION, HEAD_DIM, BLOCK_N)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, q_pos, q_valid, q_doc, k_base, v_base, skt, svt,
                              DOC_ROW, lo, a, S, window, qk_scale, offs_n, offs_d,
                              True, CAUSAL, HAS_WINDOW, HAS_DOC, PRECISION, HEAD_DIM, BLOCK_N)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, q_pos, q_valid, q_doc, k_base, v_base, skt, svt,
                              DOC_ROW, b_, hi, S, window, qk_scale, offs_n, offs_d,
                              True, CAUSAL, HAS_WINDOW, HAS_DOC, PRECISION, HEAD_DIM, BLOCK_N)
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=io_mask)
    lse2 = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse2, mask=q_valid)


@triton.jit
def _attention_bwd_preprocess_kernel(O, DO, DELTA, T, sob, soh, sot, sdob, sdoh, sdot, HQ: tl.constexpr,
                                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_loop(dk, dv, k, v, k_pos, k_doc, q_base, do_base, sqt, sdot, LSE_ROW, DELTA_ROW,
               DOC_ROW, start, end, T, S, window, qk_scale, offs_m, offs_d,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
               PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    d_ok = (offs_d < HEAD_DIM)[None, :]
    for m0 in range(start, end, BLOCK_M):
        q_idx = m0 + offs_m
        q_valid = q_idx < T
        q_pos = S - T + q_idx
        q_doc = q_idx
        if HAS_DOC:
            q_doc = tl.load(DOC_ROW + q_pos, mask=q_valid, other=-1)
        q_mask = q_valid[:, None] & d_ok
        q = tl.load(q_base + q_idx[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + q_idx[:, None] * sdot + offs_d[None, :], mask=q_mask, other=0.0)
        # rows past T load lse = +inf, so their P is 0 even in unmasked blocks
        lse2 = tl.load(LSE_ROW + q_idx, mask=q_valid, other=float("inf"))
        delta = tl.load(DELTA_ROW + q_idx, mask=q_valid, other=0.0)
        # Transposed frame (keys as rows): P^T and dS^T come out of the dots in the layout the
        # dV and dK products consume, so no register tile is ever transposed.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASKED:
            vis = _visible(q_pos[None, :], k_pos[:, None], S, q_valid[None, :], q_doc[None, :], k_doc[:, None],
                           window, CAUSAL, HAS_WINDOW, HAS_DOC)
            p_t = tl.where(vis, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOC", "GROUP", "T_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC, qk_scale, sm_scale, T, S, window, T_BUCKET,
                               sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
                               sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, sdb,
                               HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                               HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = (bkv // HKV).to(tl.int64)
    kvh = (bkv % HKV).to(tl.int64)
    T_OFF = S - T
    k_pos = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_valid = k_pos < S
    kv_mask = k_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * skb + kvh * skh + k_pos[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + k_pos[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
    DOC_ROW = DOC + b * sdb
    k_doc = k_pos
    k_doc_lo = 0
    k_doc_hi = 0
    if HAS_DOC:
        k_doc, k_doc_lo, k_doc_hi = _doc_span(DOC_ROW, k_pos, k_valid, -2)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query blocks that see this key block, [lo, a) masked, [a, b) fully visible, [b, hi) masked.
    # Keys past S need no mask here: their dK/dV rows are never stored and touch no other row.
    k_last = tl.minimum(n0 + BLOCK_N, S) - 1
    lo = 0
    full_lo = 0
    if CAUSAL:  # pos(i) >= n0 to see anything, >= k_last to see every key
        lo = tl.maximum(0, n0 - T_OFF) // BLOCK_M * BLOCK_M
        full_lo = tl.maximum(lo, k_last - T_OFF)
    hi = T
    full_hi = T
    if HAS_WINDOW:  # pos(i) - k_last < window to see anything, pos(i) - n0 < window for every key
        hi = tl.maximum(lo, tl.minimum(T, k_last + window - T_OFF))
        full_hi = tl.maximum(0, n0 + window - T_OFF - BLOCK_M + 1)
    a = tl.minimum((full_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M, hi)
    b_ = tl.maximum(tl.minimum((full_hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M, hi), a)
    if HAS_DOC:
        lo, hi = _doc_block_range(DOC_ROW, lo, hi, T, T_OFF, k_doc_lo, k_doc_hi, BLOCK_M)
        a = lo
        b_ = lo
    for g in range(GROUP):  # every query head sharing this kv head: dK/dV summed here, no atomics
        h = kvh * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        LSE_ROW = LSE + (b * HQ + h) * T
        DELTA_ROW = DELTA + (b * HQ + h) * T
        dk, dv = _dkdv_loop(dk, dv, k, v, k_pos, k_doc, q_base, do_base, sqt, sdot, LSE_ROW,
                            DELTA_ROW, DOC_ROW, a, b_, T, S, window, qk_scale, offs_m, offs_d,
                            False, CAUSAL, HAS_WINDOW, HAS_DOC, PRECISION, HEAD_DIM, BLOCK_M)
        dk, dv = _dkdv_loop(dk, dv, k, v, k_pos, k_doc, q_base, do_base, sqt, sdot, LSE_ROW,
                            DELTA_ROW, DOC_ROW, lo, a, T, S, window, qk_scale, offs_m, offs_d,
                            True, CAUSAL, HAS_WINDOW, HAS_DOC, PRECISION, HEAD_DIM, BLOCK_M)
        dk, dv = _dkdv_loop(dk, dv, k, v, k_pos, k_doc, q_base, do_base, sqt, sdot, LSE_ROW,
                            DELTA_ROW, DOC_ROW, b_, hi, T, S, window, qk_scale, offs_m, offs_d,
                            True, CAUSAL, HAS_WINDOW, HAS_DOC, PRECISION, HEAD_DIM, BLOCK_M)
    dk *= sm_scale
    tl.store(DK + b * sdkb + kvh * sdkh + k_pos[:, None] * sdkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + kvh * sdvh + k_pos[:, None] * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, q_pos, q_valid, q_doc, k_base, v_base, skt, svt, DOC_ROW,
             start, end, S, window, qk_scale, offs_n, offs_d,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
             PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    d_ok = (offs_d < HEAD_DIM)[None, :]
    for n0 in range(start, end, BLOCK_N):
        k_pos = n0 + offs_n
        k_ok = (k_pos < S)[:, None]
        k_doc = k_pos
        if HAS_DOC:
            k_doc = tl.load(DOC_ROW + k_pos, mask=k_pos < S, other=-2)
        k = tl.load(k_base + k_pos[:, None] * skt + offs_d[None, :], mask=k_ok & d_ok, other=0.0)
        v = tl.load(v_base + k_pos[:, None] * svt + offs_d[None, :], mask=k_ok & d_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            vis = _visible(q_pos[:, None], k_pos[None, :], S, q_valid[:, None], q_doc[:, None], k_doc[None, :],
                           window, CAUSAL, HAS_WINDOW, HAS_DOC)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOC", "GROUP", "T_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC, qk_scale, sm_scale, T, S, window, T_BUCKET,
                             sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt, sdb,
                             HQ: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    m_block = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: start them first (shorter tail wave)
        m_block = tl.num_programs(0) - 1 - m_block
    m0 = m_block * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    kvh = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_valid = offs_m < T
    q_pos = S - T + offs_m
    q_mask = q_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=q_mask,
                 other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=q_valid, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=q_valid, other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    DOC_ROW = DOC + b * sdb
    q_doc, lo, a, b_, hi = _query_block_keys(DOC_ROW, m0, q_pos, q_valid, T, S, window, BLOCK_M, BLOCK_N,
                                             CAUSAL, HAS_WINDOW, HAS_DOC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_loop(dq, q, do, lse2, delta, q_pos, q_valid, q_doc, k_base, v_base, skt, svt,
                  DOC_ROW, a, b_, S, window, qk_scale, offs_n, offs_d,
                  False, CAUSAL, HAS_WINDOW, HAS_DOC, PRECISION, HEAD_DIM, BLOCK_N)
    dq = _dq_loop(dq, q, do, lse2, delta, q_pos, q_valid, q_doc, k_base, v_base, skt, svt,
                  DOC_ROW, lo, a, S, window, qk_scale, offs_n, offs_d,
                  True, CAUSAL, HAS_WINDOW, HAS_DOC, PRECISION, HEAD_DIM, BLOCK_N)
    dq = _dq_loop(dq, q, do, lse2, delta, q_pos, q_valid, q_doc, k_base, v_base, skt, svt,
                  DOC_ROW, b_, hi, S, window, qk_scale, offs_n, offs_d,
                  True, CAUSAL, HAS_WINDOW, HAS_DOC, PRECISION, HEAD_DIM, BLOCK_N)
    dq *= sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------- launchers


def unsupported_reason(q, k, v, doc_ids) -> str | None:
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    if q.dtype == torch.float64:
        return "float64 is not supported by the Triton attention"
    if q.is_cuda and q.dtype == torch.float32 and D > 128:
        # every backward config needs more than an H100's 227 KiB of shared memory in fp32 at D 129-256
        # (dK/dV 279-411 KB, dQ 270-410 KB, compiled for sm_90); the interpreter has no such limit
        return f"float32 with head dim {D} > 128 (the backward's tiles exceed the GPU's shared memory)"
    if q.shape[0] * q.shape[1] > 65535:  # batch x heads is the grid's second axis (CUDA limit 65535)
        return f"batch x query heads = {q.shape[0] * q.shape[1]} > 65535"
    if max(t.shape[2] * t.stride(2) for t in (q, k, v)) >= 2 ** 31:
        return "sequence offsets exceed 32 bits (positions x sequence stride >= 2^31)"
    return None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bucket(T: int) -> int:
    """Autotune key for the sequence length: re-tune per power of two, not per length."""
    return triton.next_power_of_2(max(T, 1))


def _common(q, k, softmax_scale, doc_ids):
    D = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    block_d = max(16, triton.next_power_of_2(D))
    precision = "ieee" if q.dtype == torch.float32 else None  # exact fp32 dots; tensor cores for 16-bit
    doc = doc_ids.contiguous() if doc_ids is not None else None
    return scale, block_d, precision, doc


def attention_fwd(q, k, v, doc_ids, causal: bool, softmax_scale: float | None, window: int | None):
    """Returns (o (B, Hq, T, D) in q's dtype, lse2 (B, Hq, T) fp32 in log2 units)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, HQ, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    scale, BLOCK_D, precision, doc = _common(q, k, softmax_scale, doc_ids)
    o = torch.empty((B, HQ, T, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, HQ, T), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse.fill_(float("inf"))
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * HQ)  # noqa: E731
    _attention_fwd_kernel[grid](
        q, k, v, o, lse, doc if doc is not None else lse, scale * _LOG2E, T, S, window or 0, _bucket(T),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], doc.stride(0) if doc is not None else 0,
        HQ=HQ, GROUP=HQ // HKV, CAUSAL=causal, HAS_WINDOW=window is not None, HAS_DOC=doc is not None,
        PRECISION=precision, HEAD_DIM=D, BLOCK_D=BLOCK_D)
    return o, lse


def attention_bwd(do, q, k, v, o, lse, doc_ids, causal: bool, softmax_scale: float | None, window: int | None):
    """Returns (dq, dk, dv) in the input dtypes (deterministic)."""
    q, k, v, o, do = (_unit_last(t) for t in (q, k, v, o, do))
    B, HQ, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    scale, BLOCK_D, precision, doc = _common(q, k, softmax_scale, doc_ids)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, HQ, T), device=q.device, dtype=torch.float32)
    pre_m = 16 if launch.INTERPRET else 64
    _attention_bwd_preprocess_kernel[(triton.cdiv(T, pre_m), B * HQ)](
        o, do, delta, T, *o.stride()[:3], *do.stride()[:3], HQ=HQ, HEAD_DIM=D, BLOCK_M=pre_m, BLOCK_D=BLOCK_D)
    common = dict(HQ=HQ, GROUP=HQ // HKV, CAUSAL=causal, HAS_WINDOW=window is not None, HAS_DOC=doc is not None,
                  PRECISION=precision, HEAD_DIM=D, BLOCK_D=BLOCK_D)
    doc_arg = doc if doc is not None else delta
    doc_stride = doc.stride(0) if doc is not None else 0
    _attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * HKV)](
        q, k, v, do, lse, delta, dk, dv, doc_arg, scale * _LOG2E, scale, T, S, window or 0, _bucket(T),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        doc_stride, HKV=HKV, **common)
    _attention_bwd_dq_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * HQ)](
        q, k, v, do, lse, delta, dq, doc_arg, scale * _LOG2E, scale, T, S, window or 0, _bucket(T),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], doc_stride,
        **common)
    return dq, dk, dv


# ------------------------------------------------------------------------------- autograd (custom ops)


@torch.library.custom_op("pyllm::attention_triton", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor],
                  causal: bool, softmax_scale: Optional[float], window: Optional[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, doc_ids, causal, softmax_scale, window)


@_attention_op.register_fake
def _(q, k, v, doc_ids, causal, softmax_scale, window):
    B, HQ, T, D = q.shape
    return q.new_empty((B, HQ, T, D)), q.new_empty((B, HQ, T), dtype=torch.float32)


@torch.library.custom_op("pyllm::attention_triton_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, doc_ids: Optional[torch.Tensor], causal: bool,
                      softmax_scale: Optional[float], window: Optional[int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse, doc_ids, causal, softmax_scale, window)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, doc_ids, causal, softmax_scale, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, doc_ids, ctx.causal, ctx.softmax_scale, ctx.window = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, doc_ids)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, doc_ids = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, doc_ids, ctx.causal, ctx.softmax_scale, ctx.window)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup)


def attention(q, k, v, causal=True, softmax_scale=None, doc_ids=None, window=None):
    """softmax(q k^T * scale + mask) v; see the module note for layout and masking."""
    o, _ = _attention_op(q, k, v, doc_ids, causal, softmax_scale, window)
    return o
