"""Block-sparse prefill attention for Hopper GPUs: a Mosaic GPU kernel (wgmma, TMA, warp specialisation).

Same contract as `block_sparse_attention` (the Triton-lowered kernel in `block_sparse_attention.py`) on
lists in `canonicalize_block_indices`' form; this one runs at the rate of cuDNN's dense kernel per
computed tile, which Triton's lowering could not reach on the H100 (BENCHMARKS.md, docs/kernel-notes.md).

Layout of one CTA, after FlashAttention-3: `compute_wgs` (1 or 2) compute warpgroups of 64 query rows each
(one query block = 64 * compute_wgs rows) and one memory warpgroup. The memory warpgroup walks the query
block's list and streams its K/V tiles into a ring of `stages` shared-memory slots with TMA; the compute
warpgroups run QK^T and PV on the tensor cores (wgmma) with the online softmax in registers, and hand each
slot back through a "consumed" barrier. With two compute warpgroups a schedule barrier makes one's softmax
overlap the other's matmuls. Both compute warpgroups share the block's list, so they take the same number
of steps and every barrier is used the same number of times by each side.

The kernel is persistent: `num_ctas` CTAs (by default one per SM) take the (head, query block) items in turns,
round the CTAs forwards then backwards (`snake_turn`), longest lists first within runs of KV heads whose K/V
fit L2 (`kv_heads_per_run`), so every CTA gets about the same work and the items in flight share their K/V
tiles. Within a CTA the memory warpgroup loads the next item's Q into a second Q tile and streams its K/V
tiles on through the same ring while the compute warpgroups finish the current one, so an item's fixed costs
(Q load, first tiles) overlap the previous item's work and no CTA pays a launch and a drain per item (a CTA per
item left SMs idle between CTAs on short lists: docs/kernel-notes.md).
An item's output leaves through its Q tile; the compute warpgroups do not wait for that copy but go on to the
next item, and hand the tile back once the copy has read it (checked after the next item's first QK^T).

The list's first `schedule[0]` tiles need no elementwise mask (wholly below the diagonal, inside kv_len):
they run a loop without one; the rest apply causal & (key < kv_len). The running max starts at a finite
floor, so rows whose keys are all masked get zeros, never NaN (see `_flash`).

Hopper only (sm_90), bfloat16 or float16, head_dim 64 or 128 (96 runs as 128, zero-padded); no interpret
mode on CPU (Mosaic GPU's interpreter cannot run wgmma), so its tests run on the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcjax.pallas import _common

ROWS_PER_WG = 64  # wgmma's M per warpgroup
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


# shared-memory layout of every wgmma operand tile: 8-row tiles of 64 elements with a 128-byte swizzle, the
# layout wgmma reads without bank conflicts (it also makes TMA row offsets multiples of 8)
WGMMA_TILES = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def copy_kv_tile(k_src, v_src, k_dst, v_dst, ready, free, refill) -> None:
    """The memory warpgroup's step: TMA-copies one K and one V tile into a slot (k_dst, v_dst; arrival on
    ready.at[0] / [1]). With `refill` (a Python bool, or traced) it first waits for the consumers to free the
    slot, K and V separately: K is free after QK^T, V only after PV, so K's copy can start earlier. A tile may
    come as a list of pieces (sources and destinations in pairs, e.g. 64-column halves), one copy each, all
    arriving on the same barrier (which then expects that many arrivals)."""
    (k_ready, v_ready), (k_free, v_free) = ready, free
    for src, dst, arrived, freed in ((k_src, k_dst, k_ready, k_free), (v_src, v_dst, v_ready, v_free)):
        if isinstance(refill, bool):
            if refill:
                plgpu.barrier_wait(freed)
        else:
            pl.when(refill)(lambda freed=freed: plgpu.barrier_wait(freed))
        for piece, into in zip(*((src, dst) if isinstance(src, list) else ([src], [dst]))):
            plgpu.copy_gmem_to_smem(piece, into, arrived)


def init_softmax_state(head_dim: int):
    """(acc `[64, head_dim]`, m `[64]`, l `[64]`) of one warpgroup's rows in wgmma's register layouts: the
    running max starts at the finite floor (see `_flash`), the sums and output at zero."""
    m = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), _common.M_FLOOR, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    return acc, m, l


def score_update(s, m, l, qk_scale: float, dtype):
    """The online softmax's step on unscaled scores s `[64, keys]` (masked entries -inf), before the output is
    touched: the new max, the factor alpha the output must be scaled by, the new sum, and the probabilities in
    `dtype` for PV. scale * log2(e) enters the max once and the exponent as one FMA."""
    m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
    return m_new, alpha, l * alpha + p.sum(axis=1), p.astype(dtype)


def rescale(acc, alpha):
    """acc `[64, d]` (or a tuple of column blocks) times alpha `[64]` row by row."""
    return jax.tree.map(lambda a: a * lax.broadcast_in_dim(alpha, a.shape, [0]), acc)


def softmax_update(s, acc, m, l, qk_scale: float, dtype):
    """`score_update`, then the output rescaled: (acc, new max, new sum, probabilities)."""
    m_new, alpha, l, p = score_update(s, m, l, qk_scale, dtype)
    return rescale(acc, alpha), m_new, l, p


def store_rows(acc, l, smem, rows_gmem, wait_read_only: bool = False, wait: bool = True) -> None:
    """Normalises acc by l and writes it through `smem` (the rows' Q tile, no longer needed) to `rows_gmem`,
    then waits for the copy (with wait_read_only, only until it has read `smem`; without `wait` not at all: the
    caller must wait before it reuses `smem`, and for the writes before the kernel ends). l >= 1 for a row
    with any allowed key (its max term is exp2(0)); l == 0 means acc == 0: zeros."""
    acc = acc / lax.broadcast_in_dim(jnp.maximum(l, 1e-30), acc.shape, [0])
    smem[...] = acc.astype(smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, rows_gmem)
    if wait:
        plgpu.wait_smem_to_gmem(0, wait_read_only=wait_read_only)


def snake_turn(i, cta, num_ctas: int):
    """The work item a CTA takes on its i-th turn: turns go round the CTAs forwards, then backwards (CTA c takes
    item c on its first turn, 2 num_ctas - 1 - c on its second, ...), so that CTAs that drew long items in one
    round draw short ones in the next when items come longest first. Works on traced or numpy integers."""
    return i * num_ctas + jnp.where(lax.rem(i, 2) == 0, cta, num_ctas - 1 - cta)


def snake_turns(cta, num_ctas: int, items: int):
    """How many of `items` items a CTA takes under `snake_turn`."""
    rounds, rest = divmod(items, num_ctas)
    position = jnp.where(rounds % 2 == 0, cta, num_ctas - 1 - cta)  # the CTA's place in the last, partial round
    return rounds + jnp.where(position < rest, 1, 0)


def kv_heads_per_run(kv_heads: int, kv_bytes_per_head: int, budget: int = 16 * 2**20, whole: int = 32 * 2**20) -> int:
    """How many KV heads' items run together, longest list first: all of them when their K and V together fit
    `whole` bytes (all of one sequence's K/V stays in L2), else the most (a divisor of kv_heads) whose K and V
    fit `budget` bytes (what L2 can serve to the items in flight), at least one. More heads per run means
    fewer restarts from the longest list, and so a better balance across CTAs. The two sizes are the H100's
    (50 MB of L2), chosen by measurement (docs/kernel-notes.md)."""
    if kv_heads * kv_bytes_per_head <= whole:
        return kv_heads
    fitting = [g for g in range(1, kv_heads + 1) if kv_heads % g == 0 and g * kv_bytes_per_head <= budget]
    return max(fitting, default=1)


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    idx_ref,
    sched_ref,
    o_ref,
    scoped,
    *,
    compute_wgs: int,
    block_k: int,
    stages: int,
    q_buffers: int,
    num_q_blocks: int,
    heads_per_run: int,
    batch: int,
    num_ctas: int,
    items: int,
    groups: int,
    kv_len: int,
    causal: bool,
    qk_scale: float,
):
    (q_smem, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_free, v_free, q_free), schedule = scoped
    cta = lax.axis_index("cta")
    wg = lax.axis_index("wg")
    block_q = ROWS_PER_WG * compute_wgs
    # work items are numbered in runs, one per batch element and group of KV heads (`kv_heads_per_run`): in a
    # run, query blocks longest list first and, within one, the run's query heads. CTAs take them in
    # `snake_turn` order, so the items in flight at any time are neighbours (their K/V tiles, of one run, are
    # what L2 holds) and every CTA's turns add up to about the same work
    my_items = snake_turns(cta, num_ctas, items)
    head_dim = q_smem.shape[-1]
    dtype = q_smem.dtype

    def item(i):
        t = snake_turn(i, cta, num_ctas)
        run, within = lax.div(t, num_q_blocks * heads_per_run), lax.rem(t, num_q_blocks * heads_per_run)
        qb = num_q_blocks - 1 - lax.div(within, heads_per_run)
        h = lax.div(run, batch) * heads_per_run + lax.rem(within, heads_per_run)
        return lax.rem(run, batch), h, qb, lax.rem(i, q_buffers)

    def take_turns():  # ping-pong between the two compute warpgroups
        if compute_wgs == 2:
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

    @pl.when(wg < compute_wgs)
    def _compute():
        plgpu.set_max_registers(232 if compute_wgs == 2 else 240, action="increase")

        def one_item(i, step0):
            """Item i's query rows against its list; step0 counts the ring's steps before it."""
            # the ping-pong starts and ends within each item: warpgroup 1 waits a turn at the start, 0 gives
            # one back at the end (so neither waits for the next item's Q while the other still needs a turn)
            if compute_wgs == 2:
                pl.when(wg == 1)(take_turns)
            b, h, qb, q_slot = item(i)
            n_plain, n_total = sched_ref[b, h, qb, 0], sched_ref[b, h, qb, 1]
            my_q = q_smem.at[q_slot, wg]

            def release_previous_q():
                """With several Q tiles the previous item's output copy runs on while this item starts: once
                the copy has read the tile (waited for here, after this item's first QK^T), it takes a later Q."""
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                plgpu.barrier_arrive(q_free.at[lax.rem(i - 1, q_buffers)])

            row0 = qb * block_q + wg * ROWS_PER_WG
            plgpu.barrier_wait(q_ready.at[q_slot])
            acc, m, l = init_softmax_state(head_dim)

            @pl.when(n_total > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[lax.rem(step0, stages)])

            def step(n, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(step0 + n, stages)

                def qk_scope(s_ref):
                    plgpu.wgmma(s_ref, my_q, k_smem.at[slot].transpose((1, 0)))
                    take_turns()
                    return s_ref[...]

                s = pl.run_scoped(qk_scope, plgpu.ACC((ROWS_PER_WG, block_k), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if q_buffers > 1:
                    pl.when((n == 0) & (i > 0))(release_previous_q)
                if masked:
                    start = idx_ref[b, h, qb, n] * block_k
                    rows = row0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    cols = start + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    allowed = cols < kv_len
                    if causal:
                        allowed &= rows >= cols
                    s = jnp.where(allowed, s, -jnp.inf)
                acc, m_new, l, p = softmax_update(s, acc, m, l, qk_scale, dtype)
                acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))  # softmax done before the PV wait
                if compute_wgs == 2:
                    plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_ready.at[slot])
                if compute_wgs == 2:
                    plgpu.barrier_wait(schedule)

                def pv_scope(acc_ref):
                    plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                    nxt = n + 1

                    @pl.when(nxt < n_total)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(step0 + nxt, stages)])

                acc = pl.run_state(pv_scope)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = lax.fori_loop(0, n_plain, functools.partial(step, masked=False), (acc, m, l))
            acc, m, l = lax.fori_loop(n_plain, n_total, functools.partial(step, masked=True), carry)
            # the output leaves through the rows' Q tile; once the copy has read it, the slot takes a later Q
            # (with one Q tile at once, since the next item's Q goes there)
            rows_out = o_ref.at[b, pl.ds(row0, ROWS_PER_WG), h]
            if q_buffers > 1:
                pl.when((n_total == 0) & (i > 0))(release_previous_q)
                store_rows(acc, l, my_q, rows_out, wait=False)
            else:
                store_rows(acc, l, my_q, rows_out, wait_read_only=True)
                plgpu.barrier_arrive(q_free.at[q_slot])
            if compute_wgs == 2:
                pl.when(wg == 0)(take_turns)
            return step0 + n_total

        lax.fori_loop(0, my_items, one_item, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == compute_wgs)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def one_item(i, step0):
            """Item i's Q rows (once its slot is free), then its K/V tiles through the ring: the next item's
            loads start while the compute warpgroups finish this one."""
            b, h, qb, q_slot = item(i)
            kv_head = lax.div(h, groups)
            pl.when(i >= q_buffers)(lambda: plgpu.barrier_wait(q_free.at[q_slot]))
            for w in range(compute_wgs):
                plgpu.copy_gmem_to_smem(
                    q_ref.at[b, pl.ds(qb * block_q + w * ROWS_PER_WG, ROWS_PER_WG), h],
                    q_smem.at[q_slot, w],
                    q_ready.at[q_slot],
                )

            n_total = sched_ref[b, h, qb, 1]

            @pl.loop(0, n_total)
            def _(n):
                slot = lax.rem(step0 + n, stages)
                tile = (b, pl.ds(idx_ref[b, h, qb, n] * block_k, block_k), kv_head)
                copy_kv_tile(
                    k_ref.at[tile],
                    v_ref.at[tile],
                    k_smem.at[slot],
                    v_smem.at[slot],
                    (k_ready.at[slot], v_ready.at[slot]),
                    (k_free.at[slot], v_free.at[slot]),
                    step0 + n >= stages,
                )

            return step0 + n_total

        lax.fori_loop(0, my_items, one_item, jnp.int32(0))


def _mosaic_forward(
    q,
    k,
    v,
    indices,
    schedule,
    *,
    kv_len: int,
    scale: float,
    causal: bool,
    block_q: int,
    block_k: int,
    stages: int,
    num_ctas: int,
) -> jax.Array:
    """The kernel on padded arrays: q `[b, nqb*block_q, h, d]`, k, v `[b, nkb*block_k, kvh, d]`, d 64 or 128."""
    batch, q_pad, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    compute_wgs = block_q // ROWS_PER_WG
    nqb = q_pad // block_q
    items = heads * nqb * batch
    num_ctas = min(num_ctas, items)
    # more Q tiles let later items' Q load while this one runs (and its output copy leave on its own time)
    fitting = [
        n
        for n in range(1, MAX_Q_BUFFERS + 1)
        if smem_bytes(block_q, block_k, stages, head_dim, q_buffers=n) <= SMEM_BYTES - SMEM_RESERVED
    ]
    q_buffers = max(fitting, default=1) if num_ctas < items else 1
    per_run = kv_heads_per_run(kv_heads, 2 * k.shape[1] * head_dim * k.dtype.itemsize)
    kernel = functools.partial(
        _kernel,
        compute_wgs=compute_wgs,
        block_k=block_k,
        stages=stages,
        q_buffers=q_buffers,
        num_q_blocks=nqb,
        heads_per_run=per_run * (heads // kv_heads),
        batch=batch,
        num_ctas=num_ctas,
        items=items,
        kv_len=kv_len,
        causal=causal,
        groups=heads // kv_heads,
        qk_scale=scale * _common.LOG2E,
    )

    def entry(q_ref, k_ref, v_ref, idx_ref, sched_ref, o_ref):
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, idx_ref, sched_ref, o_ref, scoped),
            (
                plgpu.SMEM((q_buffers, compute_wgs, ROWS_PER_WG, head_dim), q.dtype, **WGMMA_TILES),
                plgpu.SMEM((stages, block_k, head_dim), q.dtype, **WGMMA_TILES),
                plgpu.SMEM((stages, block_k, head_dim), q.dtype, **WGMMA_TILES),
            ),
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=q_buffers),
            ),
            (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages),) * 2
            + (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=q_buffers),),
            plgpu.Barrier(num_arrivals=compute_wgs),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, indices, schedule)


SMEM_BYTES = 227 * 1024  # shared memory one CTA may use on sm_90
SMEM_RESERVED = 2560  # barriers and Mosaic GPU's reduction scratch (2 KiB by default)
MAX_Q_BUFFERS = 2  # a third Q tile (which fits beside 2 K/V slots of 128 x 128) measured no faster


def runs_on_hopper(q: jax.Array, interpret: bool = False) -> bool:
    """Whether lcjax's Mosaic GPU kernels can take q: an sm_90 GPU, bfloat16 or float16, not interpret mode."""
    if interpret or jax.default_backend() != "gpu" or q.dtype not in SUPPORTED_DTYPES:
        return False
    return getattr(jax.devices()[0], "compute_capability", "") == "9.0"


def default_num_ctas() -> int:
    """One CTA per SM: a CTA's shared memory (Q tiles and the K/V ring) leaves room for one per SM."""
    return int(getattr(jax.devices()[0], "core_count", 132))


def smem_bytes(block_q: int, block_k: int, stages: int, head_dim: int, itemsize: int = 2, q_buffers: int = 1) -> int:
    """Shared memory of one CTA: `q_buffers` query/output tiles and `stages` K and V tiles (barriers not
    counted)."""
    return (q_buffers * block_q + 2 * stages * block_k) * head_dim * itemsize


def check_dtype(name: str, q: jax.Array) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} takes bfloat16 or float16 (wgmma); got {q.dtype}.")


def check_config(q: jax.Array, block_q: int, block_k: int, stages: int) -> None:
    """Errors naming what the Hopper kernel supports."""
    check_dtype("block_sparse_attention_mgpu", q)
    if block_q not in (64, 128):
        raise ValueError(
            f"block_sparse_attention_mgpu: block_q={block_q} must be 64 or 128 (one or two warpgroups of 64 rows)."
        )
    if block_k not in (64, 128):
        raise ValueError(f"block_sparse_attention_mgpu: block_k={block_k} must be 64 or 128.")
    if stages < 2:
        raise ValueError(f"block_sparse_attention_mgpu: stages={stages} must be >= 2 (a ring of K/V slots).")
    head_dim = _common.padded_head_dim(q.shape[-1])
    if (need := smem_bytes(block_q, block_k, stages, head_dim)) > SMEM_BYTES:
        raise ValueError(
            f"block_sparse_attention_mgpu: block_q={block_q}, block_k={block_k}, stages={stages} at "
            f"head_dim={head_dim} need {need} bytes of shared memory, more than the {SMEM_BYTES} a "
            "CTA has; use fewer stages or smaller tiles."
        )


@functools.partial(jax.jit, static_argnames=("scale", "causal", "block_q", "block_k", "stages", "num_ctas"))
def block_sparse_attention_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    schedule: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    block_q: int = 128,
    block_k: int = 128,
    stages: int = 2,
    num_ctas: int | None = None,
) -> jax.Array:
    """`block_sparse_attention_canonical` on Hopper: lists already in `canonicalize_block_indices`' form for
    these `block_q`, `block_k`.

    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, kv_heads, head_dim]`; bfloat16 or float16;
    head_dim 64, 96 or 128. indices int32 `[batch, heads, ceil(q_len / block_q), max_blocks]`, schedule int32
    `[batch, heads, ceil(q_len / block_q), 2]`. Returns `[batch, q_len, heads, head_dim]` in q's dtype.
    block_q: 64 or 128 query rows per (head, query block) item (one or two compute warpgroups); block_k: 64
    or 128 keys per tile; stages: K/V slots in shared memory. num_ctas: CTAs of the persistent grid (default
    `default_num_ctas`, one per SM); they take the items in `snake_turn` order, each loading its next item's Q
    and first K/V tiles while it finishes the current one.
    """
    _common.check_inputs("block_sparse_attention_mgpu", q, k, v)
    check_config(q, block_q, block_k, stages)
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if causal and q_len != kv_len:
        raise ValueError(
            f"causal block_sparse_attention_mgpu is prefill from position 0: q_len={q_len} must equal kv_len={kv_len}."
        )
    d_pad = _common.padded_head_dim(head_dim)
    q_pad, kv_pad = -(-q_len // block_q) * block_q, -(-kv_len // block_k) * block_k

    def run(q, k, v, lists):
        q_p = _common.pad_to(_common.pad_to(q, 1, q_pad), 3, d_pad)
        k_p = _common.pad_to(_common.pad_to(k, 1, kv_pad), 3, d_pad)
        v_p = _common.pad_to(_common.pad_to(v, 1, kv_pad), 3, d_pad)
        out = _mosaic_forward(
            q_p,
            k_p,
            v_p,
            *lists,
            kv_len=kv_len,
            scale=scale,
            causal=causal,
            block_q=block_q,
            block_k=block_k,
            stages=stages,
            num_ctas=num_ctas or default_num_ctas(),
        )
        return out[:, :q_len, :, :head_dim]

    return _common.by_head_groups(run, q, k, v, (indices, schedule), padded_len=q_pad, padded_head_dim=d_pad)
