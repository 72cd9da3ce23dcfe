/* Greedy tokens: the first index of each row's largest value, float32 rows of logits.

torch's max(dim=-1) on the CPU keeps its running (value, index) pair in a scalar loop: ~1.3 ms
for a c32 step's 32 x 49,152 logits on 2 cores of a Xeon, 4% of the step. Here a row is two
passes of 16 lanes: its maximum (and whether it holds a NaN), then the first position equal to
it, found a block at a time. Same answer as torch.max's indices (ties: the lowest index); a row
with a NaN reports NaN as its value (the caller fails that request, as it does for torch's). */
#include <math.h>
#include <stdint.h>

#include "weft_cpu.h"

typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));   /* unaligned loads */
typedef int32_t i16 __attribute__((vector_size(64)));

#define BLOCK 64

static void argmax_row(const float *row, int64_t n, int64_t *index, float *value) {
    v16 m = {0};
    i16 nan = {0};
    int64_t i = 0;
    float best = -INFINITY;
    int any_nan = 0;
    if (n >= 16) {
        m = *(const v16 *)row;
        for (; i + 16 <= n; i += 16) {
            const v16 v = *(const v16 *)(row + i);
            const i16 gt = v > m;
            m = (v16)(((i16)v & gt) | ((i16)m & ~gt));
            nan |= v != v;
        }
        for (int l = 0; l < 16; l++) {
            best = m[l] > best ? m[l] : best;
            any_nan |= nan[l] != 0;
        }
    }
    for (; i < n; i++) {
        best = row[i] > best ? row[i] : best;
        any_nan |= row[i] != row[i];
    }
    if (any_nan) {
        *value = NAN;
        *index = 0;
        return;
    }
    int64_t b = 0;
    for (; b + BLOCK <= n; b += BLOCK) {
        int hit = 0;
        for (int j = 0; j < BLOCK; j++) hit |= row[b + j] == best;
        if (hit) break;
    }
    while (b < n && row[b] != best) b++;
    *value = best;
    *index = b;
}

void weft_argmax_rows_f32(const float *x, int64_t rows, int64_t n, int64_t ld, int64_t *index, float *value,
                          int num_threads) {
    const int threads = rows * n < 65536 ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) argmax_row(x + r * ld, n, index + r, value + r);
}
