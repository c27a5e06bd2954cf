"""Triton kernels of the fused distillation CE (`attnxfer.transfer.triton_ce` launches them and says why).

Logits are kept in base 2 (``c_s``, ``c_t`` fold the scale and log2 e; lse2 stored, × ln 2 once). A program
handles one (batch, student head) and one block of rows (forward, dq) or keys (dk), its g teacher heads
walked by ``tl.static_range``, their online state one (BLOCK_M, G_PAD) tile per quantity. Out-of-range keys
are −inf before any exponential; out-of-range rows load zeros and are never stored. Backward casts dz to the
operands' dtype for its products, as flash attention does with P. ``UPCAST`` (interpreter, bf16): NumPy has
no bf16 and the interpreter would multiply raw 16-bit patterns, so tiles load as fp32 (exact products).
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # ln 2: base-2 log-sum-exps to natural units (tensor * LN2: the
# interpreter cannot multiply a constexpr by a tensor from the left)


@triton.jit
def _load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols, UPCAST: tl.constexpr):
    """(len(rows), len(cols)) tile of a strided matrix, zeros outside (n_rows, n_cols); fp32 if UPCAST."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _column(tile, cols, t):
    """Column ``t`` of a (BLOCK, G_PAD) tile as a (BLOCK,) vector."""
    return tl.sum(tl.where(cols == t, tile, 0.0), 1)


@triton.jit
def _program(H_S):
    """(block index, batch·head, batch, student head) of this program."""
    pid_bh = tl.program_id(1)
    return tl.program_id(0), pid_bh, pid_bh // H_S, pid_bh % H_S


@triton.jit
def _load_lse_t(LSE_T, pid_bh, rows, row_ok, cols, N, G: tl.constexpr):
    """The saved lse2_t of the group's g teacher heads, (rows, G_PAD), zeros outside."""
    return tl.load(
        LSE_T + (pid_bh * G + cols) * N + rows[:, None], mask=row_ok[:, None] & (cols < G), other=0.0
    )


@triton.jit
def _ce_fwd(
    Qs, Ks, Qt, Kt,  # student (B, H_s, N, d_s) and teacher (B, H_t, N, d_t), any strides
    CE, ENT, LSE_S, LSE_T,  # outputs: CE_i, H_i (B, H_s, N); lse2_s (B, H_s, N), lse2_t (B, H_t, N); contiguous
    sqs_b, sqs_h, sqs_n, sqs_d, sks_b, sks_h, sks_n, sks_d,
    sqt_b, sqt_h, sqt_n, sqt_d, skt_b, skt_h, skt_n, skt_d,
    N, H_S, D_S, D_T, c_s, c_t,
    G: tl.constexpr, G_PAD: tl.constexpr, ENTROPY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):  # fmt: skip
    """Online softmax of both rows over key blocks: lse_s, every teacher head's lse_t, CE_i (and H_i, g = 1)."""
    pid_m, pid_bh, b, h = _program(H_S)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_DS)
    dt = tl.arange(0, BLOCK_DT)
    cols = tl.arange(0, G_PAD)[None, :]
    qs_base = Qs + b * sqs_b + h * sqs_h
    ks_base = Ks + b * sks_b + h * sks_h
    qt_base = Qt + b * sqt_b + h * G * sqt_h
    kt_base = Kt + b * skt_b + h * G * skt_h
    qs = _load_tile(qs_base, rows, ds, sqs_n, sqs_d, N, D_S, UPCAST)
    if G == 1:
        qt0 = _load_tile(qt_base, rows, dt, sqt_n, sqt_d, N, D_T, UPCAST)

    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of y_s
    l_s = tl.zeros([BLOCK_M], tl.float32)  # running Σ 2^(y_s − m_s)
    m_t = tl.full([BLOCK_M, G_PAD], float("-inf"), tl.float32)  # per teacher head: running max of y_t
    l_t = tl.zeros([BLOCK_M, G_PAD], tl.float32)  # Σ 2^(y_t − m_t)
    a_t = tl.zeros([BLOCK_M, G_PAD], tl.float32)  # Σ 2^(y_t − m_t)·y_s  (the cross term Σ p_t z_s)
    e_t = tl.zeros([BLOCK_M, G_PAD], tl.float32)  # Σ 2^(y_t − m_t)·y_t  (entropy, g = 1)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = (keys < N)[None, :]
        ks = _load_tile(ks_base, keys, ds, sks_n, sks_d, N, D_S, UPCAST)
        y_s = tl.dot(qs, tl.trans(ks), input_precision=PREC) * c_s  # masked keys: 0 (zero rows of k)
        y_s_m = tl.where(key_ok, y_s, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(y_s_m, 1))
        l_s = l_s * tl.exp2(m_s - m_new) + tl.sum(tl.exp2(y_s_m - m_new[:, None]), 1)
        m_s = m_new
        for t in tl.static_range(G):
            if G == 1:
                qt = qt0
            else:
                qt = _load_tile(qt_base + t * sqt_h, rows, dt, sqt_n, sqt_d, N, D_T, UPCAST)
            kt = _load_tile(kt_base + t * skt_h, keys, dt, skt_n, skt_d, N, D_T, UPCAST)
            y_t = tl.dot(qt, tl.trans(kt), input_precision=PREC) * c_t
            m_old = _column(m_t, cols, t)
            m_new_t = tl.maximum(m_old, tl.max(tl.where(key_ok, y_t, float("-inf")), 1))
            alpha = tl.exp2(m_old - m_new_t)[:, None]
            p = tl.exp2(tl.where(key_ok, y_t, float("-inf")) - m_new_t[:, None])  # masked keys: exactly 0
            sel = cols == t
            m_t = tl.where(sel, m_new_t[:, None], m_t)
            l_t = tl.where(sel, l_t * alpha + tl.sum(p, 1)[:, None], l_t)
            a_t = tl.where(sel, a_t * alpha + tl.sum(p * y_s, 1)[:, None], a_t)
            if ENTROPY:
                e_t = tl.where(sel, e_t * alpha + tl.sum(p * y_t, 1)[:, None], e_t)

    row_ok = rows < N
    head_ok = (rows[:, None] < N) & (cols < G)
    lse2_s = m_s + tl.log2(l_s)
    l_safe = tl.where(cols < G, l_t, 1.0)
    lse2_t = m_t + tl.log2(l_safe)
    cross = tl.sum(tl.where(cols < G, a_t / l_safe, 0.0), 1) * (1.0 / G)  # (1/g)·Σ_h Σ_j p_t,h y_s
    out = pid_bh * N + rows
    tl.store(CE + out, (lse2_s - cross) * LN2, mask=row_ok)
    tl.store(LSE_S + out, lse2_s, mask=row_ok)
    tl.store(LSE_T + (pid_bh * G + cols) * N + rows[:, None], lse2_t, mask=head_ok)
    if ENTROPY:  # H_i = lse_t − Σ_j p_t z_t (g = 1: the teacher row is one head's)
        tl.store(ENT + out, tl.sum(tl.where(cols < G, lse2_t - e_t / l_safe, 0.0), 1) * LN2, mask=row_ok)


@triton.jit
def _teacher_probs(
    qt_base, kt_base, qt0, kt0, rows, keys, dt, lse_t, cols, key_ok,
    sqt_h, sqt_n, sqt_d, skt_h, skt_n, skt_d, N, D_T, c_t,
    G: tl.constexpr, HOIST_Q: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """P̄_t tile (rows × keys): the g teacher heads' probabilities from their saved lse2_t, averaged.
    For g = 1 the loop-invariant teacher tile (q of the dq kernel, k of the dk kernel) comes in preloaded."""
    pbar = tl.zeros([rows.shape[0], keys.shape[0]], tl.float32)
    for t in tl.static_range(G):
        if G == 1 and HOIST_Q:
            qt = qt0
        else:
            qt = _load_tile(qt_base + t * sqt_h, rows, dt, sqt_n, sqt_d, N, D_T, UPCAST)
        if G == 1 and not HOIST_Q:
            kt = kt0
        else:
            kt = _load_tile(kt_base + t * skt_h, keys, dt, skt_n, skt_d, N, D_T, UPCAST)
        y_t = tl.dot(qt, tl.trans(kt), input_precision=PREC) * c_t
        pbar += tl.exp2(tl.where(key_ok, y_t, float("-inf")) - _column(lse_t, cols, t)[:, None])
    return pbar * (1.0 / G)


@triton.jit
def _ce_bwd_dq(
    Qs, Ks, Qt, Kt, LSE_S, LSE_T, GRAD, GSCALE, DQ,
    sqs_b, sqs_h, sqs_n, sqs_d, sks_b, sks_h, sks_n, sks_d,
    sqt_b, sqt_h, sqt_n, sqt_d, skt_b, skt_h, skt_n, skt_d,
    sg_b, sg_h, sg_n, sdq_b, sdq_h, sdq_n, sdq_d,
    N, H_S, D_S, D_T, c_s, c_t, scale_s,
    G: tl.constexpr, G_PAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):  # fmt: skip
    """dq_s for one block of query rows: dq_i = s_s·w_i·Σ_j (p_s − p̄_t)_ij k_s,j over key blocks."""
    pid_m, pid_bh, b, h = _program(H_S)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ds = tl.arange(0, BLOCK_DS)
    dt = tl.arange(0, BLOCK_DT)
    cols = tl.arange(0, G_PAD)[None, :]
    ks_base = Ks + b * sks_b + h * sks_h
    qt_base = Qt + b * sqt_b + h * G * sqt_h
    kt_base = Kt + b * skt_b + h * G * skt_h
    qs = _load_tile(Qs + b * sqs_b + h * sqs_h, rows, ds, sqs_n, sqs_d, N, D_S, UPCAST)
    qt0 = _load_tile(qt_base, rows, dt, sqt_n, sqt_d, N, D_T, UPCAST)  # used when g = 1 (hoisted)
    lse_s = tl.load(LSE_S + pid_bh * N + rows, mask=row_ok, other=0.0)
    lse_t = _load_lse_t(LSE_T, pid_bh, rows, row_ok, cols, N, G)
    # w_i / max|w|: the row's incoming gradient, normalised so that dz fits fp16 (max|w| multiplies at the end)
    w = tl.load(GRAD + b * sg_b + h * sg_h + rows * sg_n, mask=row_ok, other=0.0) / tl.load(GSCALE)
    acc = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = (keys < N)[None, :]
        ks = _load_tile(ks_base, keys, ds, sks_n, sks_d, N, D_S, UPCAST)
        y_s = tl.dot(qs, tl.trans(ks), input_precision=PREC) * c_s
        p_s = tl.exp2(tl.where(key_ok, y_s, float("-inf")) - lse_s[:, None])
        pbar = _teacher_probs(
            qt_base, kt_base, qt0, qt0, rows, keys, dt, lse_t, cols, key_ok,
            sqt_h, sqt_n, sqt_d, skt_h, skt_n, skt_d, N, D_T, c_t, G, True, PREC, UPCAST,
        )  # fmt: skip
        dz = (p_s - pbar) * w[:, None]
        acc += tl.dot(dz.to(Ks.dtype.element_ty).to(ks.dtype), ks, input_precision=PREC)
    acc *= scale_s * tl.load(GSCALE)
    dq_ptr = DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_n + ds[None, :] * sdq_d
    tl.store(dq_ptr, acc.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (ds[None, :] < D_S))


@triton.jit
def _ce_bwd_dk(
    Qs, Ks, Qt, Kt, LSE_S, LSE_T, GRAD, GSCALE, DK,
    sqs_b, sqs_h, sqs_n, sqs_d, sks_b, sks_h, sks_n, sks_d,
    sqt_b, sqt_h, sqt_n, sqt_d, skt_b, skt_h, skt_n, skt_d,
    sg_b, sg_h, sg_n, sdk_b, sdk_h, sdk_n, sdk_d,
    N, H_S, D_S, D_T, c_s, c_t, scale_s,
    G: tl.constexpr, G_PAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):  # fmt: skip
    """dk_s for one block of keys: dk_j = s_s·Σ_i w_i (p_s − p̄_t)_ij q_s,i over query blocks."""
    pid_n, pid_bh, b, h = _program(H_S)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = (keys < N)[None, :]
    ds = tl.arange(0, BLOCK_DS)
    dt = tl.arange(0, BLOCK_DT)
    cols = tl.arange(0, G_PAD)[None, :]
    qs_base = Qs + b * sqs_b + h * sqs_h
    qt_base = Qt + b * sqt_b + h * G * sqt_h
    kt_base = Kt + b * skt_b + h * G * skt_h
    ks = _load_tile(Ks + b * sks_b + h * sks_h, keys, ds, sks_n, sks_d, N, D_S, UPCAST)
    kt0 = _load_tile(kt_base, keys, dt, skt_n, skt_d, N, D_T, UPCAST)  # used when g = 1 (hoisted)
    gscale = tl.load(GSCALE)
    acc = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        qs = _load_tile(qs_base, rows, ds, sqs_n, sqs_d, N, D_S, UPCAST)
        lse_s = tl.load(LSE_S + pid_bh * N + rows, mask=row_ok, other=0.0)
        lse_t = _load_lse_t(LSE_T, pid_bh, rows, row_ok, cols, N, G)
        w = tl.load(GRAD + b * sg_b + h * sg_h + rows * sg_n, mask=row_ok, other=0.0) / gscale
        y_s = tl.dot(qs, tl.trans(ks), input_precision=PREC) * c_s
        p_s = tl.exp2(tl.where(key_ok, y_s, float("-inf")) - lse_s[:, None])
        pbar = _teacher_probs(
            qt_base, kt_base, kt0, kt0, rows, keys, dt, lse_t, cols, key_ok,
            sqt_h, sqt_n, sqt_d, skt_h, skt_n, skt_d, N, D_T, c_t, G, False, PREC, UPCAST,
        )  # fmt: skip
        dz = tl.where(row_ok[:, None], (p_s - pbar) * w[:, None], 0.0)
        acc += tl.dot(tl.trans(dz.to(Qs.dtype.element_ty).to(qs.dtype)), qs, input_precision=PREC)
    acc *= scale_s * gscale
    dk_ptr = DK + b * sdk_b + h * sdk_h + keys[:, None] * sdk_n + ds[None, :] * sdk_d
    tl.store(dk_ptr, acc.to(DK.dtype.element_ty), mask=(keys[:, None] < N) & (ds[None, :] < D_S))


@triton.jit
def _grouped_entropy(
    Qt, Kt, LSE_T, ENT,
    sqt_b, sqt_h, sqt_n, sqt_d, skt_b, skt_h, skt_n, skt_d,
    N, H_S, D_T, c_t,
    G: tl.constexpr, G_PAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DT: tl.constexpr,
):  # fmt: skip
    """H(P̄_t)_i = −Σ_j p̄ log p̄ for g > 1 (an average's entropy has no online form): a second pass over key
    blocks that rebuilds P̄_t tiles from the forward's lse2_t. Logged only; the loss never needs it."""
    pid_m, pid_bh, b, h = _program(H_S)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dt = tl.arange(0, BLOCK_DT)
    cols = tl.arange(0, G_PAD)[None, :]
    qt_base = Qt + b * sqt_b + h * G * sqt_h
    kt_base = Kt + b * skt_b + h * G * skt_h
    lse_t = _load_lse_t(LSE_T, pid_bh, rows, row_ok, cols, N, G)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = (keys < N)[None, :]
        pbar = _teacher_probs(
            qt_base, kt_base, qt_base, kt_base, rows, keys, dt, lse_t, cols, key_ok,
            sqt_h, sqt_n, sqt_d, skt_h, skt_n, skt_d, N, D_T, c_t, G, True, PREC, UPCAST,
        )  # fmt: skip
        acc += tl.sum(tl.where(pbar > 0, pbar * tl.log2(tl.where(pbar > 0, pbar, 1.0)), 0.0), 1)
    tl.store(ENT + pid_bh * N + rows, acc * (-LN2), mask=row_ok)
