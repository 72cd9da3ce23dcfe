/* Every decoder layer of a Llama-family model for one step, float32, in one call.

Called from Python once per step instead of ~15 torch ops and native calls per layer: on 2 cores
a single-token step is ~21 ms of weight streaming (GEMV) plus, in Python, ~3 ms of dispatch.
The matmuls are the BLAS sgemm torch itself calls for F.linear (its address comes from
libtorch_cpu), with the same arguments, so they are bit-identical to the torch path; so are
rope, the KV store and silu*mul. Steps with long prefill rows (SDPA) stay in Python. */
#include <stdint.h>
#include <string.h>

#include "weft_cpu.h"

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);
static sgemm_fn sgemm_ptr;

void weft_set_sgemm(void *fn) { sgemm_ptr = (sgemm_fn)fn; }

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

/* Pointers per layer in `layers` (int64 addresses, 0 = absent), in this order: */
enum { LN1, QKV_W, QKV_B, O_W, O_B, LN2, GU_W, DOWN_W, K_CACHE, V_CACHE, NUM_PTRS };

/* h: [T, hidden] embeddings in, residual stream (updated in place); out: [T, hidden] final norm.
   scratch: T * (2 * hidden + (H + 2 * Hkv) * D + 2 * H * D + 3 * inter) floats.
   Returns 0, -1 without an sgemm, -2 if attention could not allocate. */
int weft_llama_layers_f32(
    float *h, float *out, float *scratch, int64_t num_tokens, int64_t hidden, int64_t inter,
    const int64_t *layers, int64_t num_layers, const float *final_norm, float eps,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    const float *cos, const float *sin, const int64_t *positions, const int64_t *slots,
    const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,
    const int64_t *query_start_loc, const int64_t *rows, int64_t num_rows, int64_t block_size,
    float scale, int num_threads) {
    if (!sgemm_ptr) return -1;
    const int t = (int)num_tokens, hd = (int)hidden, it = (int)inter;
    const int q_size = (int)(num_heads * head_dim), qkv_size = q_size + 2 * (int)(num_kv_heads * head_dim);
    float *x = scratch, *delta = x + num_tokens * hidden, *qkv = delta + num_tokens * hidden;
    float *q = qkv + num_tokens * qkv_size, *attn = q + num_tokens * q_size;
    float *gate_up = attn + num_tokens * q_size, *act = gate_up + num_tokens * 2 * inter;
    const float *pending = 0;   /* the previous sub-layer's output, added to h by the next norm */
    for (int64_t l = 0; l < num_layers; l++) {
        const int64_t *p = layers + l * NUM_PTRS;
        float *k_cache = (float *)p[K_CACHE], *v_cache = (float *)p[V_CACHE];
        weft_add_rms_norm_f32(h, pending, (const float *)p[LN1], x, num_tokens, hidden, eps, num_threads);
        linear(x, (const float *)p[QKV_W], (const float *)p[QKV_B], qkv, t, qkv_size, hd);
        weft_rope_store_f32(qkv, qkv_size, q, k_cache, v_cache, cos, sin, positions, slots, num_tokens,
                            num_heads, num_kv_heads, head_dim, num_threads);
        if (weft_paged_attention_f32(q, attn, k_cache, v_cache, block_tables, table_stride, seq_lens,
                                     query_start_loc, rows, num_rows, num_heads, num_kv_heads, head_dim,
                                     block_size, scale, num_threads))
            return -2;
        linear(attn, (const float *)p[O_W], (const float *)p[O_B], delta, t, hd, q_size);
        weft_add_rms_norm_f32(h, delta, (const float *)p[LN2], x, num_tokens, hidden, eps, num_threads);
        linear(x, (const float *)p[GU_W], 0, gate_up, t, 2 * it, hd);
        weft_silu_mul_f32(gate_up, act, num_tokens, inter, num_threads);
        linear(act, (const float *)p[DOWN_W], 0, delta, t, hd, it);
        pending = delta;
    }
    weft_add_rms_norm_f32(h, pending, final_norm, out, num_tokens, hidden, eps, num_threads);
    return 0;
}
