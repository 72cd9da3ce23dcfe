/* Every decoder layer of a Llama-family model for one step, float32, in one call.

Called from Python once per step instead of ~15 torch ops and native calls per layer: on 2 cores
a single-token step is ~21 ms of weight streaming (GEMV) plus, in Python, ~3 ms of dispatch.
The matmuls are the BLAS sgemm torch itself calls for F.linear (its address comes from
libtorch_cpu), with the same arguments, so they are bit-identical to the torch path; so are
rope, the KV store and silu*mul. Steps with long prefill rows (SDPA) stay in Python. Exceptions:
with a GGUF's blocks in the table, steps of few rows multiply from those (cpu_qmatmul.c), equal
to the float32 products within rounding but not bit-identical; in bf16 mode steps of many rows
multiply in bf16: the blocks on AMX tiles, or the table's bf16 copies by MKL's bf16 GEMM. LoRA steps stay
here too: after each base product, the adapters' x @ A[s] @ B[s] of the tokens that have one
(cpu_lora.c). Qwen3's per-head q/k RMSNorm (before RoPE) runs when the layer table has its weights. */
#include <stdint.h>
#include <string.h>

#include "weft_cpu.h"

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);
static sgemm_fn sgemm_ptr;

void weft_set_sgemm(void *fn) { sgemm_ptr = (sgemm_fn)fn; }

/* MKL's gemm_bf16bf16f32 (exported by libtorch_cpu beside sgemm_): bf16 inputs, float32
   accumulation and output. On a CPU with AMX it runs on the tiles: measured on the default
   model's projections, 2 cores of a Xeon with AMX, 32 rows ~650 GFLOPS against sgemm's ~190. */
typedef void (*bf16_gemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                             const uint16_t *, const int *, const uint16_t *, const int *, const float *, float *,
                             const int *);
static bf16_gemm_fn bf16_gemm_ptr;

void weft_set_bf16_gemm(void *fn) { bf16_gemm_ptr = (bf16_gemm_fn)fn; }

/* y[T, N] = bf16(x[T, K]) @ w16[N, K]^T (+ bias), float32 sums and output; xb: T * K scratch.
   Returns -1 without the GEMM. */
int weft_bf16_linear_f32(const float *x, const uint16_t *w16, const float *bias, float *y, int64_t t, int64_t n,
                         int64_t k, uint16_t *xb, int num_threads) {
    if (!bf16_gemm_ptr) return -1;
    const int64_t total = t * k;
    const int threads = total < 65536 ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < total; i++) xb[i] = weft_to_bf16(x[i]);
    const int ti = (int)t, ni = (int)n, ki = (int)k;
    const float one = 1.0f;
    float beta = 0.0f;
    if (bias) {
        for (int64_t i = 0; i < t; i++) memcpy(y + i * n, bias, sizeof(float) * n);
        beta = 1.0f;
    }
    bf16_gemm_ptr("T", "N", &ni, &ti, &ki, &one, w16, &ki, xb, &ki, &beta, y, &ni);
    return 0;
}

/* y[T, N] = x[T, K] @ w[N, K]^T (+ bias): F.linear's BLAS call (bias preloaded, beta = 1). */
static void linear(const float *x, const float *w, const float *bias, float *y, int t, int n, int k) {
    const float one = 1.0f;
    float beta = 0.0f;
    if (bias) {
        for (int i = 0; i < t; i++) memcpy(y + (int64_t)i * n, bias, sizeof(float) * n);
        beta = 1.0f;
    }
    sgemm_ptr("T", "N", &n, &t, &k, &one, w, &k, x, &k, &beta, y, &n);
}

/* Which copy of a weight a step multiplies: in bf16 mode, its blocks on AMX tiles in steps of
   at least amx_min_rows rows (the caller passes more rows than any step has outside bf16 mode),
   its bf16 copy (w16; 0 where the tiles serve the steps of many rows) by bf16 GEMM in steps of at least
   bf16_min_rows; its GGUF blocks (cpu_qmatmul.c) when the layer table has them
   (fmt != 0) and the step is small enough for them to win (t <= packed_max_rows); else sgemm on
   the float32 weight. */
typedef struct {
    int64_t packed_max_rows, bf16_min_rows, amx_min_rows;
    uint16_t *xb;   /* scratch for x in bf16 */
    int num_threads;
} step_gemm;

static void add_bias(float *y, const float *bias, int t, int n) {
    if (bias)
        for (int i = 0; i < t; i++)
            for (int j = 0; j < n; j++) y[(int64_t)i * n + j] += bias[j];
}

static void qlinear(const float *x, const float *w, const float *bias, int64_t packed, int64_t fmt, int64_t w16,
                    const step_gemm *g, float *y, int t, int n, int k) {
    const uint8_t *blocks = packed && fmt ? (const uint8_t *)packed : 0;
    /* bf16 mode: a GGUF's blocks on AMX tiles where it can (their bytes, not the bf16 copy's),
       else MKL's bf16 GEMM on the copy; both bf16 products of the same bf16 weights. */
    if (blocks && t >= g->amx_min_rows &&
        weft_qmatmul_amx(x, t, k, blocks, (int)fmt, n, y, n, g->num_threads) == 0) {
        add_bias(y, bias, t, n);
        return;
    }
    if (w16 && t >= g->bf16_min_rows &&
        weft_bf16_linear_f32(x, (const uint16_t *)w16, bias, y, t, n, k, g->xb, g->num_threads) == 0)
        return;
    if (blocks && t <= g->packed_max_rows) {
        weft_qmatmul_f32(x, t, k, blocks, (int)fmt, n, y, n, g->num_threads);
        add_bias(y, bias, t, n);
        return;
    }
    linear(x, w, bias, y, t, n, k);
}

/* Pointers per layer in `layers` (int64 addresses, 0 = absent), in this order; each *_Q is the
   weight's GGUF blocks with its *_FMT (kernels/quant.py codes, 0 = none); Q_NORM / K_NORM the
   per-head q/k RMSNorm weights (Qwen3; 0 = none, as in Llama); *_W16 the weight's bf16 copy for
   bf16 GEMM (0 = none). */
enum { LN1, QKV_W, QKV_B, O_W, O_B, LN2, GU_W, DOWN_W, K_CACHE, V_CACHE,
       QKV_Q, QKV_FMT, O_Q, O_FMT, GU_Q, GU_FMT, DOWN_Q, DOWN_FMT, Q_NORM, K_NORM,
       QKV_W16, O_W16, GU_W16, DOWN_W16, NUM_PTRS };

/* RMSNorm of each q head and each k head of qkv [T, qkv_size], in place (the norm kernel writes
   elsewhere: its rows are restrict). tmp: T * num_heads * head_dim floats, one row per token. */
static void qk_norm(float *qkv, int64_t num_tokens, int64_t qkv_size, const float *q_w, const float *k_w,
                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float eps, float *tmp,
                    int num_threads) {
    const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    const int threads = num_tokens * qkv_size < 65536 ? 1 : num_threads;   /* as the norm kernel decides */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {
        float *row = qkv + t * qkv_size, *scratch = tmp + t * q_size;
        weft_add_rms_norm_f32(row, 0, q_w, scratch, num_heads, head_dim, eps, 1);
        memcpy(row, scratch, sizeof(float) * q_size);
        weft_add_rms_norm_f32(row + q_size, 0, k_w, scratch, num_kv_heads, head_dim, eps, 1);
        memcpy(row + q_size, scratch, sizeof(float) * kv_size);
    }
}

/* Per layer in `lora` (int64 addresses of LoRAStacks' stacked A^T / B^T), in this order. */
enum { L_QKV_A, L_QKV_B, L_O_A, L_O_B, L_GU_A, L_GU_B, L_DOWN_A, L_DOWN_B, NUM_LORA_PTRS };

/* The adapters of a step (lora == 0: none): each token's slot, grouped once for every projection. */
typedef struct {
    const int64_t *table, *slots;
    int64_t rank;
    const int32_t *order, *chunk_start;
    int64_t num_chunks;
} lora_step;

static void lora_add(const lora_step *ls, int64_t layer, int which, float *y, const float *x, int64_t k, int64_t n,
                     int64_t num_parts, const int64_t *part_cols, int num_threads) {
    if (!ls->table || !ls->num_chunks) return;
    const int64_t *p = ls->table + layer * NUM_LORA_PTRS;
    weft_lora_apply_f32(y, x, k, n, (const float *)p[2 * which], (const float *)p[2 * which + 1], ls->rank, num_parts,
                        part_cols, ls->slots, ls->order, ls->chunk_start, ls->num_chunks, num_threads);
}

/* h: [T, hidden] embeddings in, residual stream (updated in place); out: [T, hidden] final norm.
   scratch: T * (2 * hidden + (H + 2 * Hkv) * D + 2 * H * D + 3 * inter + max(hidden, H * D, inter) / 2)
   floats (the last part x in bf16 for bf16 GEMM, rounded up).
   kv_bf16: the KV caches hold bfloat16 (else float32).
   lora: num_layers * NUM_LORA_PTRS addresses or 0; lora_slots: [T] slot per token (-1: base).
   Returns 0, -1 without an sgemm, -2 if attention could not allocate. */
int weft_llama_layers_f32(
    float *h, float *out, float *scratch, int64_t num_tokens, int64_t hidden, int64_t inter,
    const int64_t *layers, int64_t num_layers, const float *final_norm, float eps,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    const float *cos, const float *sin, const int64_t *positions, const int64_t *slots,
    const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,
    const int64_t *query_start_loc, const int64_t *rows, int64_t num_rows, int64_t block_size,
    float scale, int kv_bf16, int64_t packed_max_rows, int64_t bf16_min_rows, int64_t amx_min_rows,
    const int64_t *lora, const int64_t *lora_slots, int64_t lora_num_slots, int64_t lora_rank, int num_threads) {
    if (!sgemm_ptr) return -1;
    const int t = (int)num_tokens, hd = (int)hidden, it = (int)inter;
    const int q_size = (int)(num_heads * head_dim), qkv_size = q_size + 2 * (int)(num_kv_heads * head_dim);
    const int64_t kv_size = num_kv_heads * head_dim;
    /* Output columns of each part of the fused projections (LoRAStacks' block-diagonal B). */
    const int64_t qkv_cols[4] = {0, q_size, q_size + kv_size, qkv_size}, h_cols[2] = {0, hidden},
                  gu_cols[3] = {0, inter, 2 * inter};
    int32_t order[lora ? num_tokens + 1 : 1], chunk_start[lora ? num_tokens + 2 : 1];
    lora_step ls = {lora, lora_slots, lora_rank, order, chunk_start, 0};
    if (lora) ls.num_chunks = weft_lora_order(lora_slots, num_tokens, lora_num_slots, order, chunk_start);
    float *x = scratch, *delta = x + num_tokens * hidden, *qkv = delta + num_tokens * hidden;
    float *q = qkv + num_tokens * qkv_size, *attn = q + num_tokens * q_size;
    float *gate_up = attn + num_tokens * q_size, *act = gate_up + num_tokens * 2 * inter;
    const step_gemm g = {packed_max_rows, bf16_min_rows, amx_min_rows, (uint16_t *)(act + num_tokens * inter),
                         num_threads};
    const float *pending = 0;   /* the previous sub-layer's output, added to h by the next norm */
    for (int64_t l = 0; l < num_layers; l++) {
        const int64_t *p = layers + l * NUM_PTRS;
        void *k_cache = (void *)p[K_CACHE], *v_cache = (void *)p[V_CACHE];
        weft_add_rms_norm_f32(h, pending, (const float *)p[LN1], x, num_tokens, hidden, eps, num_threads);
        qlinear(x, (const float *)p[QKV_W], (const float *)p[QKV_B], p[QKV_Q], p[QKV_FMT], p[QKV_W16], &g, qkv, t,
                qkv_size, hd);
        lora_add(&ls, l, 0, qkv, x, hidden, qkv_size, 3, qkv_cols, num_threads);
        if (p[Q_NORM])   /* attn is free until attention writes it */
            qk_norm(qkv, num_tokens, qkv_size, (const float *)p[Q_NORM], (const float *)p[K_NORM], num_heads,
                    num_kv_heads, head_dim, eps, attn, num_threads);
        weft_rope_store_f32(qkv, qkv_size, q, k_cache, v_cache, cos, sin, positions, slots, num_tokens,
                            num_heads, num_kv_heads, head_dim, kv_bf16, num_threads);
        if (weft_paged_attention_f32(q, attn, k_cache, v_cache, block_tables, table_stride, seq_lens,
                                     query_start_loc, rows, num_rows, num_heads, num_kv_heads, head_dim,
                                     block_size, scale, kv_bf16, num_threads))
            return -2;
        qlinear(attn, (const float *)p[O_W], (const float *)p[O_B], p[O_Q], p[O_FMT], p[O_W16], &g, delta, t, hd,
                q_size);
        lora_add(&ls, l, 1, delta, attn, q_size, hidden, 1, h_cols, num_threads);
        weft_add_rms_norm_f32(h, delta, (const float *)p[LN2], x, num_tokens, hidden, eps, num_threads);
        qlinear(x, (const float *)p[GU_W], 0, p[GU_Q], p[GU_FMT], p[GU_W16], &g, gate_up, t, 2 * it, hd);
        lora_add(&ls, l, 2, gate_up, x, hidden, 2 * inter, 2, gu_cols, num_threads);
        weft_silu_mul_f32(gate_up, act, num_tokens, inter, num_threads);
        qlinear(act, (const float *)p[DOWN_W], 0, p[DOWN_Q], p[DOWN_FMT], p[DOWN_W16], &g, delta, t, hd, it);
        lora_add(&ls, l, 3, delta, act, inter, hidden, 1, h_cols, num_threads);
        pending = delta;
    }
    weft_add_rms_norm_f32(h, pending, final_norm, out, num_tokens, hidden, eps, num_threads);
    return 0;
}
