/* Entry points of the native CPU kernels (one shared library, see kernels/cpu_native.py). */
#ifndef WEFT_CPU_H
#define WEFT_CPU_H
#include <stdint.h>

/* Asks for one cache line into L2 (prefetcht2). Inline asm: GCC 12 at -O1 and above deleted some
   loops of __builtin_prefetch (they write nothing). */
static inline void weft_prefetch_l2(const void *p) {
#if defined(__x86_64__)
    __asm__ volatile("prefetcht2 %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 0, 1);
#endif
}

/* float32 -> bfloat16, round to nearest even (torch's .bfloat16() for finite values), and back. */
static inline uint16_t weft_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float weft_from_bf16(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* The KV caches of the next two entry points hold float32, or bfloat16 where kv_bf16 is set
   (--kv-cache-dtype): stored rounded, read back into float32 arithmetic. */
int weft_paged_attention_f32(
    const float *q, float *out, const void *k_cache, const void *v_cache,
    const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,
    const int64_t *query_start_loc, const int64_t *rows, int64_t num_rows,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    float scale, int kv_bf16, int num_threads);

void weft_rope_store_f32(const float *qkv, int64_t qkv_stride, float *q_out, void *k_cache,
                         void *v_cache, const float *cos, const float *sin, const int64_t *positions,
                         const int64_t *slots, int64_t num_tokens, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, int kv_bf16, int num_threads);

void weft_add_rms_norm_f32(float *h, const float *delta, const float *w, float *out, int64_t num_tokens,
                           int64_t n, float eps, int num_threads);

void weft_silu_mul_f32(const float *gate_up, float *out, int64_t num_tokens, int64_t inter, int num_threads);

void weft_argmax_rows_f32(const float *x, int64_t rows, int64_t n, int64_t ld, int64_t *index, float *value,
                          int num_threads);

/* Guided decoding's token bitmask (bit j of word w: token 32 w + j allowed), in place: -inf where
   a bit is 0. rows: indices into logits and mask alike, or 0 for 0 .. num_rows-1. */
void weft_apply_bitmask_f32(float *logits, int64_t ld, const int32_t *mask, int64_t ldm, const int64_t *rows,
                            int64_t num_rows, int64_t vocab);

/* y[m, n] = x[m, k] @ W^T, W as GGUF Q8_0 (fmt 1) or Q4_1 (fmt 2) rows (kernels/csrc/cpu_qmatmul.c). */
int weft_qmatmul_f32(const float *x, int64_t m, int64_t k, const uint8_t *w, int fmt, int64_t n, float *y,
                     int64_t ldy, int num_threads);
/* y[t, n] = bf16(x) @ w16^T (+ bias), float32 sums and output, by MKL's bf16 GEMM (cpu_llama.c). */
int weft_bf16_linear_f32(const float *x, const uint16_t *w16, const float *bias, float *y, int64_t t, int64_t n,
                         int64_t k, uint16_t *xb, int num_threads);
/* The same product in bf16 on AMX tiles (GGUF layouts, n % 16 == 0); -2 without AMX. */
int weft_qmatmul_amx(const float *x, int64_t m, int64_t k, const uint8_t *w, int fmt, int64_t n, float *y,
                     int64_t ldy, int num_threads);
int weft_qmatmul_amx_available(void);
/* Count of weights of w [n, k] that differ from the packed tensor de-quantised (load-time check). */
int64_t weft_qcheck_f32(const uint8_t *packed, int fmt, int64_t n, int64_t k, const float *w, int num_threads);

/* LoRA (kernels/csrc/cpu_lora.c): y[t] += x[t] @ A[slots[t]] @ B[slots[t]] over LoRAStacks' layout. */
int64_t weft_lora_order(const int64_t *slots, int64_t num_tokens, int64_t num_slots, int32_t *order,
                        int32_t *chunk_start);
void weft_lora_apply_f32(float *y, const float *x, int64_t k, int64_t n, const float *a_stack,
                         const float *b_stack, int64_t r, int64_t num_parts, const int64_t *part_cols,
                         const int64_t *slots, const int32_t *order, const int32_t *chunk_start,
                         int64_t num_chunks, int num_threads);
void weft_lora_add_f32(float *y, const float *x, int64_t num_tokens, int64_t k, int64_t n, const float *a_stack,
                       const float *b_stack, int64_t r, int64_t num_parts, const int64_t *part_cols,
                       const int64_t *slots, int64_t num_slots, int num_threads);

#endif
