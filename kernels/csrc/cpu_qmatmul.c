/* y[M, N] = x[M, K] @ W^T with W stored as GGUF quantised rows (blocks of 32 along K), float32.

Why: a decode step on a CPU is a stream of GEMVs, bound by the bytes of weight read. The
default model's weights are de-quantised GGUF blocks, so reading the blocks themselves (Q4_1:
0.625 byte per weight, Q8_0: 1.06) instead of their float32 copies cuts the bytes ~4-6x. Each
block is expanded to float32 in registers (w = d * q + m, as the de-quantiser computes it, but
fused) and multiplied into every row of x, so one pass over W serves all M rows; the cost per
row grows with M, which is why callers use this only for a few rows (sgemm wins above).

Block layouts (as in the GGUF file, rows of K / 32 blocks):
  Q8_0 (34 bytes): fp16 d, int8 q[32];              w[i] = d * q[i]
  Q4_1 (20 bytes): fp16 d, fp16 m, uint8 qs[16];    w[i] = d * (qs[i] & 15) + m, w[16 + i] = d * (qs[i] >> 4) + m
Accumulation is float32 in a different order than sgemm's: equal to F.linear within rounding,
not bit-identical. */
#include <stdint.h>
#include <string.h>

#include "weft_cpu.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { FMT_Q8_0 = 1, FMT_Q4_1 = 2 };
#define QK 32
#define MAX_TILE 8 /* rows of x sharing one pass over W; more rows are done in further passes */

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
    union { uint32_t u; float f; } v;
    if (exp == 0) {                      /* zero or subnormal: man * 2^-24 */
        v.f = (float)man * 5.9604644775390625e-8f;
        v.u |= sign;
    } else if (exp == 31) {
        v.u = sign | 0x7f800000u | (man << 13);
    } else {
        v.u = sign | ((exp + 112) << 23) | (man << 13);
    }
    return v.f;
#endif
}

static inline int64_t block_bytes(int fmt) { return fmt == FMT_Q8_0 ? 34 : 20; }

#ifdef __AVX512F__
/* The 32 weights of one block as two vectors (elements 0..15, 16..31). */
static inline void load_block(int fmt, const uint8_t *b, __m512 *lo, __m512 *hi) {
    const __m512 d = _mm512_set1_ps(half_to_float(b));
    if (fmt == FMT_Q4_1) {
        const __m512 m = _mm512_set1_ps(half_to_float(b + 2));
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 4)));
        const __m512i nib = _mm512_set1_epi32(15);
        *lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(v, nib)), m);
        *hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), m);
    } else {
        *lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2)))));
        *hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18)))));
    }
}

/* Rows x[0..mt) times weight rows [n0, n1): always inlined with a constant mt so the 2 * mt
   accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(int fmt, int mt, const float *x, int64_t ldx,
                                                       const uint8_t *w, int64_t n0, int64_t n1, int64_t k,
                                                       float *y, int64_t ldy) {
    const int64_t nb = k / QK, row_bytes = nb * block_bytes(fmt), bb = block_bytes(fmt);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * row_bytes;
        __m512 acc[MAX_TILE][2];
        for (int r = 0; r < mt; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m512 lo, hi;
            load_block(fmt, wr + b * bb, &lo, &hi);
            for (int r = 0; r < mt; r++) {
                const float *xr = x + r * ldx + b * QK;
                acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), lo, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), hi, acc[r][1]);
            }
        }
        for (int r = 0; r < mt; r++) y[r * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
    }
}
#else
static inline void tile(int fmt, int mt, const float *x, int64_t ldx, const uint8_t *w, int64_t n0, int64_t n1,
                        int64_t k, float *y, int64_t ldy) {
    const int64_t nb = k / QK, bb = block_bytes(fmt), row_bytes = nb * bb;
    float wf[QK];
    for (int64_t n = n0; n < n1; n++) {
        float acc[MAX_TILE] = {0};
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + n * row_bytes + b * bb;
            const float d = half_to_float(blk);
            if (fmt == FMT_Q4_1) {
                const float m = half_to_float(blk + 2);
                for (int i = 0; i < 16; i++) {
                    wf[i] = d * (float)(blk[4 + i] & 15) + m;
                    wf[16 + i] = d * (float)(blk[4 + i] >> 4) + m;
                }
            } else {
                for (int i = 0; i < QK; i++) wf[i] = d * (float)(int8_t)blk[2 + i];
            }
            for (int r = 0; r < mt; r++) {
                const float *xr = x + r * ldx + b * QK;
                float s = 0.0f;
                for (int i = 0; i < QK; i++) s += xr[i] * wf[i];
                acc[r] += s;
            }
        }
        for (int r = 0; r < mt; r++) y[r * ldy + n] = acc[r];
    }
}
#endif

/* One rows-tile over weight rows [n0, n1); the switch gives each tile height its own code. */
static void tile_dispatch(int fmt, int mt, const float *x, int64_t ldx, const uint8_t *w, int64_t n0, int64_t n1,
                          int64_t k, float *y, int64_t ldy) {
    switch (mt) {
#define CASE(M) case M: if (fmt == FMT_Q4_1) tile(FMT_Q4_1, M, x, ldx, w, n0, n1, k, y, ldy); \
                        else tile(FMT_Q8_0, M, x, ldx, w, n0, n1, k, y, ldy); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        default: break;
    }
}

/* y[m, n] (row stride ldy) = sum_k x[m, k] w[n, k]; k a multiple of 32. Returns 0, or -1 for
   an unknown format / k. Threads split N (weight rows) so each thread reads its own weights. */
int weft_qmatmul_f32(const float *x, int64_t m, int64_t k, const uint8_t *w, int fmt, int64_t n, float *y,
                     int64_t ldy, int num_threads) {
    if ((fmt != FMT_Q8_0 && fmt != FMT_Q4_1) || k % QK != 0) return -1;
    /* Chunks of 16 weight rows: enough work per chunk, and y stores of neighbouring threads
       rarely share a cache line. */
    const int64_t chunk = 16, chunks = (n + chunk - 1) / chunk;
    const int threads = n * k < 65536 ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t n0 = c * chunk, n1 = n0 + chunk < n ? n0 + chunk : n;
        for (int64_t r = 0; r < m; r += MAX_TILE) {
            const int mt = (int)(m - r < MAX_TILE ? m - r : MAX_TILE);
            tile_dispatch(fmt, mt, x + r * k, k, w, n0, n1, k, y + r * ldy, ldy);
        }
    }
    return 0;
}
