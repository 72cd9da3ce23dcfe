/* Guided decoding's token bitmask on float32 logits, in place: token 32 * w + j of a row keeps its
logit where bit j of the row's word w is 1 and gets -inf where it is 0 (kernels/mask.py).

The torch reference expands the words into a [rows, V] tensor of bits and masks through it:
~180 us a row of 49,152 tokens on 2 cores of a Xeon, 1.2 ms for a verify step's 6 rows, about
what a verify row's whole forward adds. Here a word of all ones (everything allowed: most of a
JSON value's words) is skipped, and any other one is two masked 16-lane stores of -inf. */
#include <math.h>
#include <stdint.h>

#include "weft_cpu.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

static void mask_row(float *row, const int32_t *words, int64_t vocab) {
    const int64_t full = vocab / 32;
#ifdef __AVX512F__
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t w = 0; w < full; w++) {
        const uint32_t bits = (uint32_t)words[w];
        if (bits == 0xffffffffu) continue;
        _mm512_mask_storeu_ps(row + 32 * w, (__mmask16)~bits, ninf);
        _mm512_mask_storeu_ps(row + 32 * w + 16, (__mmask16)~(bits >> 16), ninf);
    }
#else
    for (int64_t w = 0; w < full; w++) {
        const uint32_t bits = (uint32_t)words[w];
        if (bits == 0xffffffffu) continue;
        for (int j = 0; j < 32; j++)
            if (!((bits >> j) & 1u)) row[32 * w + j] = -INFINITY;
    }
#endif
    for (int64_t t = 32 * full; t < vocab; t++)   /* the last, partial word */
        if (!(((uint32_t)words[full] >> (t - 32 * full)) & 1u)) row[t] = -INFINITY;
}

/* rows: the row indices (into logits and mask alike) to mask, or 0 for rows 0 .. num_rows-1. */
void weft_apply_bitmask_f32(float *logits, int64_t ld, const int32_t *mask, int64_t ldm, const int64_t *rows,
                            int64_t num_rows, int64_t vocab) {
    for (int64_t i = 0; i < num_rows; i++) {
        const int64_t r = rows ? rows[i] : i;
        mask_row(logits + r * ld, mask + r * ldm, vocab);
    }
}
