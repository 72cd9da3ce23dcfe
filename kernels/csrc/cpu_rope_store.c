/* Rotary embedding of q and k straight out of the fused qkv projection, and the store of k and
v into their paged-cache slots: one call per layer instead of ~20 small torch ops.

Bit-identical to the torch reference (x * cos + rotate_half(x) * sin, each op rounded on its own,
as transformers computes it): contraction into fused multiply-adds is off in this file. */
#pragma STDC FP_CONTRACT OFF
#include <stdint.h>
#include <string.h>

#include "weft_cpu.h"

#if defined(__GNUC__) && !defined(__clang__)
#define NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define NO_FMA
#endif

NO_FMA static void rotate(const float *restrict x, float *restrict out, const float *restrict c,
                          const float *restrict s, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t d = 0; d < half; d++) {
        const float a = x[d] * c[d];
        const float b = -x[d + half] * s[d];
        out[d] = a + b;
    }
    for (int64_t d = half; d < head_dim; d++) {
        const float a = x[d] * c[d];
        const float b = x[d - half] * s[d];
        out[d] = a + b;
    }
}

/* qkv: [T, qkv_stride] rows holding q (H*D), k (Hkv*D), v (Hkv*D); cos/sin: [max_pos, D];
   q_out: [T, H, D]; caches [num_blocks, block_size, Hkv, D] seen as [slots, Hkv, D], float32 or
   (kv_bf16) bfloat16: k rotated in float32, then each value rounded as torch's .to(bfloat16).
   A negative slot skips the token's store (padding). */
void weft_rope_store_f32(const float *qkv, int64_t qkv_stride, float *q_out, void *k_cache,
                         void *v_cache, const float *cos, const float *sin, const int64_t *positions,
                         const int64_t *slots, int64_t num_tokens, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, int kv_bf16, int num_threads) {
    const int64_t kv = num_kv_heads * head_dim;
    const int threads = num_tokens * (num_heads + 2 * num_kv_heads) * head_dim < 32768 ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *row = qkv + t * qkv_stride;
        const float *c = cos + positions[t] * head_dim, *s = sin + positions[t] * head_dim;
        for (int64_t h = 0; h < num_heads; h++)
            rotate(row + h * head_dim, q_out + (t * num_heads + h) * head_dim, c, s, head_dim);
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        const float *k = row + num_heads * head_dim;
        if (!kv_bf16) {
            float *k_out = (float *)k_cache + slot * kv;
            for (int64_t h = 0; h < num_kv_heads; h++)
                rotate(k + h * head_dim, k_out + h * head_dim, c, s, head_dim);
            memcpy((float *)v_cache + slot * kv, k + kv, sizeof(float) * kv);
            continue;
        }
        float rotated[kv];
        for (int64_t h = 0; h < num_kv_heads; h++) rotate(k + h * head_dim, rotated + h * head_dim, c, s, head_dim);
        uint16_t *k_out = (uint16_t *)k_cache + slot * kv, *v_out = (uint16_t *)v_cache + slot * kv;
        for (int64_t i = 0; i < kv; i++) {
            k_out[i] = weft_to_bf16(rotated[i]);
            v_out[i] = weft_to_bf16(k[kv + i]);
        }
    }
}
