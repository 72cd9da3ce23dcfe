/* Batched LoRA for the native loop: y[t] += x[t] @ A[s] @ B[s] for each token t of adapter slot
s = slots[t] (-1: the base model alone), float32, in one call per projection.

The layout is service/models/lora.py's LoRAStacks: A [S, k, parts * r] and B [S, parts * r, n],
the scaling folded into B, and B block-diagonal over the parts of a fused projection (q/k/v,
gate/up): part p's ranks p*r..p*r+r feed only its own columns part_cols[p]..part_cols[p+1].
Only those blocks are read: the rest of B is zeros, which are most of a fused B and would be
most of the memory traffic (the adapters, not the arithmetic, are what a step streams).

Tokens are grouped by slot (counting sort, no Python loop) and taken in chunks of up to
CHUNK tokens of one slot, so that each row of A is read once for the chunk; chunks run in
parallel and never share an output row. Rank is small (<= 64): plain vectorizable loops. */
#include <stdint.h>
#include <string.h>

#include "weft_cpu.h"

enum { CHUNK = 4 };

/* One chunk: m tokens tok[0..m) of slot s. */
static void lora_chunk(float *y, const float *x, int64_t k, int64_t n, const float *a, const float *b, int64_t r,
                       int64_t num_parts, const int64_t *part_cols, const int32_t *tok, int m) {
    const int64_t pr = num_parts * r;
    float tmp[CHUNK * pr];
    memset(tmp, 0, sizeof(float) * CHUNK * pr);
    for (int64_t kk = 0; kk < k; kk++) {
        const float *arow = a + kk * pr;
        for (int g = 0; g < m; g++) {
            const float xv = x[(int64_t)tok[g] * k + kk];
            float *acc = tmp + g * pr;
            for (int64_t j = 0; j < pr; j++) acc[j] += xv * arow[j];
        }
    }
    for (int g = 0; g < m; g++) {
        float *yrow = y + (int64_t)tok[g] * n;
        for (int64_t p = 0; p < num_parts; p++) {
            const int64_t c0 = part_cols[p], width = part_cols[p + 1] - c0;
            for (int64_t j = p * r; j < (p + 1) * r; j++) {
                const float c = tmp[g * pr + j];
                const float *brow = b + j * n + c0;
                float *yp = yrow + c0;
                for (int64_t col = 0; col < width; col++) yp[col] += c * brow[col];
            }
        }
    }
}

int64_t weft_lora_order(const int64_t *slots, int64_t num_tokens, int64_t num_slots, int32_t *order,
                        int32_t *chunk_start) {
    /* Counting sort of the adapted tokens by slot, then cut into chunks of one slot each.
       order: [num_tokens], chunk_start: [num_tokens + 1]; returns the number of chunks. */
    int64_t count[num_slots + 1];
    memset(count, 0, sizeof(int64_t) * (num_slots + 1));
    for (int64_t t = 0; t < num_tokens; t++)
        if (slots[t] >= 0 && slots[t] < num_slots) count[slots[t] + 1]++;
    for (int64_t s = 0; s < num_slots; s++) count[s + 1] += count[s];
    const int64_t adapted = count[num_slots];
    int64_t next[num_slots];
    memcpy(next, count, sizeof(int64_t) * num_slots);
    for (int64_t t = 0; t < num_tokens; t++)
        if (slots[t] >= 0 && slots[t] < num_slots) order[next[slots[t]]++] = (int32_t)t;
    int64_t chunks = 0;
    for (int64_t s = 0; s < num_slots; s++)
        for (int64_t i = count[s]; i < count[s + 1]; i += CHUNK) chunk_start[chunks++] = (int32_t)i;
    chunk_start[chunks] = (int32_t)adapted;
    return chunks;
}

void weft_lora_apply_f32(float *y, const float *x, int64_t k, int64_t n, const float *a_stack,
                         const float *b_stack, int64_t r, int64_t num_parts, const int64_t *part_cols,
                         const int64_t *slots, const int32_t *order, const int32_t *chunk_start,
                         int64_t num_chunks, int num_threads) {
    const int64_t pr = num_parts * r;
    /* One thread below ~4M multiply-adds (~250 us on one core): a decode step's adapters are
       ~100 us a projection, and on a busy machine a parallel region's wake-up and barrier cost
       more than that (measured: qkv of 32 tokens, 8 adapters, 90 us on one thread, 12-14 ms on
       two with the 2 cores oversubscribed). */
    int64_t tokens = chunk_start[num_chunks], width = 0;
    for (int64_t p = 0; p < num_parts; p++) width += part_cols[p + 1] - part_cols[p];
    const int threads = num_chunks < 2 || tokens * (k * pr + r * width) < (1 << 22) ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < num_chunks; c++) {
        const int32_t *tok = order + chunk_start[c];
        const int m = chunk_start[c + 1] - chunk_start[c];
        const int64_t s = slots[tok[0]];
        lora_chunk(y, x, k, n, a_stack + s * k * pr, b_stack + s * pr * n, r, num_parts, part_cols, tok, m);
    }
}

void weft_lora_add_f32(float *y, const float *x, int64_t num_tokens, int64_t k, int64_t n, const float *a_stack,
                       const float *b_stack, int64_t r, int64_t num_parts, const int64_t *part_cols,
                       const int64_t *slots, int64_t num_slots, int num_threads) {
    int32_t order[num_tokens + 1], chunk_start[num_tokens + 2];
    const int64_t chunks = weft_lora_order(slots, num_tokens, num_slots, order, chunk_start);
    weft_lora_apply_f32(y, x, k, n, a_stack, b_stack, r, num_parts, part_cols, slots, order, chunk_start, chunks,
                        num_threads);
}
