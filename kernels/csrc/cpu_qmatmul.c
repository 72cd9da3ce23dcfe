/* y[M, N] = x[M, K] @ W^T with W from GGUF quantised rows (blocks of 32 along K), float32.

Why: a decode step on a CPU is a stream of GEMVs, bound by the bytes of weight read. The
default model's weights are de-quantised GGUF blocks, so reading the blocks (Q4_1: 0.75 byte
per weight as laid out here, Q8_0: 1.125) instead of their float32 copies cuts the bytes ~4-5x.
Each block is expanded to float32 in registers and multiplied into every row of x, so one pass
over W serves up to MAX_TILE rows at a time; the cost per row grows with M, which is why
callers use this only for a few rows (sgemm on the float32 weights wins above).

Layout (kernels/quant.py repacks the GGUF blocks at load): each weight row of K / 32 blocks is
  Q8_0: float d[nb], int8 q[nb][32]                     w = d * q
  Q4_1: float d[nb], float m[nb], uint8 qs[nb][16]      w[i] = d * (qs[i] & 15) + m, w[16 + i] = d * (qs[i] >> 4) + m
  Q5_1: float d[nb], float m[nb], uint32 qh[nb], uint8 qs[nb][16]
                                                        as Q4_1 with bit i of qh as the fifth bit of weight i
  Q6_K: float d[2 nb], int8 q[nb][32]                   w[i] = d[2 b + i / 16] * q[i] (a scale per 16 weights)
  BF16: uint16 w[nb][32]                                the weight's bfloat16 bits; w = bits << 16 as float32
GGUF's K-quants and the legacy types repack into these without changing a weight (Q4_K, Q4_0 ->
Q4_1; Q5_K, Q5_0, Q5_1 -> Q5_1; Q6_K -> Q6_K: the sub-block scale and min are folded into d and m). BF16 is not a GGUF type: a model
loaded with dtype bfloat16 on CPU keeps float32 weights rounded to bf16 and streams this half-size
copy of them (service/models/bf16_packed.py); widening bf16 to float32 is exact.
SEGMENTS: the rows of a fused tensor whose parts have different layouts (Q4_K_M's Q4_K q/k and
Q6_K v): int64 header {count, then per segment: fmt, rows, byte offset from w}, each segment one
of the layouts above.
Scales as float32 (GGUF has fp16): broadcast straight from memory, no conversion per block; the
arithmetic per block, not the bytes, is what bounds this kernel on 2 cores.
Accumulation is float32 in a different order than sgemm's: equal to F.linear within rounding,
not bit-identical. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "weft_cpu.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { FMT_Q8_0 = 1, FMT_Q4_1 = 2, FMT_Q5_1 = 3, FMT_Q6_K = 4, FMT_SEGMENTS = 5, FMT_BF16 = 6 };
#define QK 32
/* Rows of x sharing one pass over W; more rows take further passes (over W chunks still in
   cache), each pass de-quantising the blocks again. Each row has its own four accumulators in
   every tile height, so a row's result does not depend on how many rows share its step (a
   speculative verify row equals the plain decode of the same token, bit for bit). 6: 24
   accumulators and a block pair's weights still fit the 32 vector registers; 8 spills (15%
   slower at 8-32 rows). Against 4 (measured, all projections of the default model, 2 cores):
   5 rows -17% (a k = 4 verify was a 4-row pass plus a whole 1-row pass), 9-12 rows -4-8%. */
#define MAX_TILE 6

/* Bytes of one weight row of nb blocks. */
static inline int64_t row_bytes(int fmt, int64_t nb) {
    switch (fmt) {
        case FMT_Q8_0: return nb * (4 + 32);
        case FMT_Q4_1: return nb * (8 + 16);
        case FMT_Q5_1: return nb * (8 + 4 + 16);
        case FMT_BF16: return nb * 2 * QK;
        default: return nb * (8 + 32);   /* FMT_Q6_K */
    }
}

static inline int known_layout(int fmt) { return (fmt >= FMT_Q8_0 && fmt <= FMT_Q6_K) || fmt == FMT_BF16; }

/* Block b of a packed row as 32 floats, computed as gguf-py de-quantises: d * q, then + m, each
   product and sum rounded on its own (no FMA: the attribute keeps GCC from contracting across
   statements, separate statements keep clang from it). The load-time check's definition of a
   packed tensor's weights, and the kernel when AVX-512 is missing. */
__attribute__((optimize("fp-contract=off")))
static void dequant_block_ref(int fmt, const uint8_t *row, int64_t nb, int64_t b, float *v) {
    float d, d1, m;
    if (fmt == FMT_BF16) {   /* exact: a bf16 is the top half of the float32 it rounds */
        const uint8_t *q = row + 2 * QK * b;
        for (int i = 0; i < QK; i++) {
            uint16_t h;
            memcpy(&h, q + 2 * i, 2);
            const uint32_t bits = (uint32_t)h << 16;
            memcpy(&v[i], &bits, 4);
        }
    } else if (fmt == FMT_Q4_1 || fmt == FMT_Q5_1) {
        uint32_t qh = 0;
        const uint8_t *qs = row + 8 * nb + 16 * b;
        memcpy(&d, row + 4 * b, 4);
        memcpy(&m, row + 4 * (nb + b), 4);
        if (fmt == FMT_Q5_1) {
            memcpy(&qh, row + 8 * nb + 4 * b, 4);
            qs = row + 12 * nb + 16 * b;
        }
        for (int i = 0; i < 16; i++) {
            v[i] = d * (float)((qs[i] & 15) | ((qh >> i) & 1) << 4);
            v[16 + i] = d * (float)((qs[i] >> 4) | ((qh >> (16 + i)) & 1) << 4);
        }
        for (int i = 0; i < QK; i++) v[i] += m;
    } else if (fmt == FMT_Q6_K) {
        const int8_t *q = (const int8_t *)(row + 8 * nb + 32 * b);
        memcpy(&d, row + 8 * b, 4);
        memcpy(&d1, row + 8 * b + 4, 4);
        for (int i = 0; i < QK; i++) v[i] = (i < 16 ? d : d1) * (float)q[i];
    } else {
        const int8_t *q = (const int8_t *)(row + 4 * nb + 32 * b);
        memcpy(&d, row + 4 * b, 4);
        for (int i = 0; i < QK; i++) v[i] = d * (float)q[i];
    }
}

/* How far ahead of its reads a thread asks for the weight rows it reads next (they follow in
   memory: a thread's rows are one range). Without it the hardware prefetchers alone kept a core
   at ~6 GB/s and the de-quantising waited on memory: the default model's 120 projections at one
   row took 6.5 ms out of cache against 3.3 with them in cache (2 cores of a Xeon with AMX);
   asking 1 / 2 / 4 / 8 KB ahead: 4.5 / 3.8 / 3.7 / 3.8 ms (~22 GB/s, the machine's streaming
   read speed). */
#define PREFETCH_AHEAD 4096

#ifdef __AVX512F__
/* Rows x[0..mt) times weight rows [n0, n1): always inlined with a constant mt so the 2 * mt
   accumulators live in registers. Q4_1 de-quantises through a 16-entry table per block
   (d * i + m for i = 0..15) indexed by the nibbles with vpermps, which reads only the low 4
   bits of each index: no masking, no int->float conversion. */
static inline __attribute__((always_inline)) void dequant_block(int fmt, const uint8_t *wr, int64_t nb, int64_t b,
                                                                __m512 *lo, __m512 *hi) {
    const float *d = (const float *)wr;
    if (fmt == FMT_BF16) {   /* widen 16 bf16 to 32-bit lanes, shift into the float32's top half */
        const uint8_t *q = wr + 2 * QK * b;
        *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)q)), 16));
        *hi = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(q + 32))), 16));
    } else if (fmt == FMT_Q4_1) {
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(d[b]), iota, _mm512_set1_ps(d[nb + b]));
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr + 8 * nb + 16 * b)));
        *lo = _mm512_permutexvar_ps(v, table);
        *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    } else if (fmt == FMT_Q5_1) {
        /* Two 16-entry tables (d * i + m for i = 0..15 and 16..31); vpermt2ps picks the table
           by bit 4 of each index, which the qh mask sets. d * i is exact (a 24-bit product), so
           the FMA rounds once, as d * q + m does in two steps. */
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 db = _mm512_set1_ps(d[b]), mb = _mm512_set1_ps(d[nb + b]);
        const __m512 t0 = _mm512_fmadd_ps(db, iota, mb);
        const __m512 t1 = _mm512_fmadd_ps(db, _mm512_add_ps(iota, _mm512_set1_ps(16.0f)), mb);
        uint32_t qh;
        memcpy(&qh, wr + 8 * nb + 4 * b, 4);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr + 12 * nb + 16 * b)));
        const __m512i bit4 = _mm512_set1_epi32(16);
        const __m512i vl = _mm512_and_si512(v, _mm512_set1_epi32(15)), vh = _mm512_srli_epi32(v, 4);
        *lo = _mm512_permutex2var_ps(t0, _mm512_mask_or_epi32(vl, (__mmask16)qh, vl, bit4), t1);
        *hi = _mm512_permutex2var_ps(t0, _mm512_mask_or_epi32(vh, (__mmask16)(qh >> 16), vh, bit4), t1);
    } else {
        /* Q8_0: one scale per block of 32; Q6_K: one per 16. */
        const int q6 = fmt == FMT_Q6_K;
        const __m512 d0 = _mm512_set1_ps(q6 ? d[2 * b] : d[b]), d1 = _mm512_set1_ps(q6 ? d[2 * b + 1] : d[b]);
        const int8_t *q = (const int8_t *)(wr + (q6 ? 8 : 4) * nb + 32 * b);
        *lo = _mm512_mul_ps(d0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))));
        *hi = _mm512_mul_ps(d1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))));
    }
}

/* Rows x[0..mt) times weight rows [n0, n1): always inlined with a constant mt so the
   accumulators live in registers. Q4_1 de-quantises through a 16-entry table per block
   (d * i + m for i = 0..15) indexed by the nibbles with vpermps, which reads only the low 4
   bits of each index: no masking, no int->float conversion. Odd blocks go to a second set of
   accumulators: at one row the FMA latency chain, not the ports, would bound. */
static inline __attribute__((always_inline)) void tile(int fmt, int mt, const float *x, int64_t ldx,
                                                       const uint8_t *w, int64_t n0, int64_t n1, int64_t k,
                                                       float *y, int64_t ldy) {
    const int64_t nb = k / QK, rb = row_bytes(fmt, nb);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * rb;
        __m512 acc[MAX_TILE][4];
        for (int r = 0; r < mt; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
        int64_t b = 0;
        const uint8_t *ahead = wr + PREFETCH_AHEAD;
        const int64_t block_bytes = rb / nb;   /* a step covers two blocks' share of the row: ~a line */
        for (; b + 1 < nb; b += 2) {   /* two blocks a step: constant accumulator indices */
            __m512 lo0, hi0, lo1, hi1;
            weft_prefetch_l2(ahead + b * block_bytes);
            dequant_block(fmt, wr, nb, b, &lo0, &hi0);
            dequant_block(fmt, wr, nb, b + 1, &lo1, &hi1);
            for (int r = 0; r < mt; r++) {
                const float *xr = x + r * ldx + b * QK;
                acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), lo0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), hi0, acc[r][1]);
                acc[r][2] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 32), lo1, acc[r][2]);
                acc[r][3] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 48), hi1, acc[r][3]);
            }
        }
        if (b < nb) {
            __m512 lo, hi;
            dequant_block(fmt, wr, nb, b, &lo, &hi);
            for (int r = 0; r < mt; r++) {
                const float *xr = x + r * ldx + b * QK;
                acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), lo, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), hi, acc[r][1]);
            }
        }
        for (int r = 0; r < mt; r++) {
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
            y[r * ldy + n] = _mm512_reduce_add_ps(sum);
        }
    }
}
#else
static inline void tile(int fmt, int mt, const float *x, int64_t ldx, const uint8_t *w, int64_t n0, int64_t n1,
                        int64_t k, float *y, int64_t ldy) {
    const int64_t nb = k / QK, rb = row_bytes(fmt, nb);
    float wf[QK];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * rb;
        float acc[MAX_TILE] = {0};
        for (int64_t b = 0; b < nb; b++) {
            dequant_block_ref(fmt, wr, nb, b, wf);
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

#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
/* bf16 mode's steps on a CPU with AMX (see weft_qmatmul_amx): the weights'
   blocks de-quantised 16 rows x 32 at a time, rounded to bf16, into one AMX tile (A), times x's
   rows in bf16 laid out once per call as B tiles (pairs of k per 32-bit column), summed in
   float32 C tiles over the whole row. The blocks stream at 0.75-1.1 bytes a weight instead of a
   bf16 copy's 2, and the multiplies cost the tiles ~16 cycles per 16 x 16 x 32. */
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_ROWS 16
#define AMX_MAX_MB 2   /* m-blocks of 16 rows per pass over W: B tiles 1-2 */

/* GCC's tile intrinsics are asm statements that name no memory: without this barrier the
   compiler may drop the stores a tile load reads, or read a tile store's buffer early. */
#define AMX_MEMORY_BARRIER() __asm__ volatile("" ::: "memory")

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* The kernel asks once per process for the tile state (Linux: arch_prctl XCOMP_PERM). */
static int amx_permitted(void) {
    static int state;   /* 0 unknown, 1 yes, -1 no; a race only repeats the same syscall */
    if (!state) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state > 0;
}

/* x's B tiles are stored by pairs of m blocks, then k block, then the pair's two tiles: a block
   kernel's k loop reads one contiguous stream, 2 KB a step (kb-major order, 64 KB apart at 1,024
   rows, left the tiles to L2 misses). Storage for an even number of m blocks. */
static inline int64_t amx_x_tile(int64_t kb, int64_t mb, int64_t nkb) { return ((mb >> 1) * nkb + kb) * 2 + (mb & 1); }
static inline int64_t amx_x_tiles(int64_t nkb, int64_t mbs) { return nkb * (mbs + (mbs & 1)); }

/* out[j] lane i = in[i] lane j, for 16 x 16 32-bit lanes. */
static inline __attribute__((always_inline)) void transpose16_epi32(const __m512i in[16], __m512i out[16]) {
    __m512i t[16], u[16], v[16];
    for (int i = 0; i < 8; i++) {   /* per 128-bit lane: r0[0] r1[0] r0[1] r1[1] / r0[2] r1[2] r0[3] r1[3] */
        t[2 * i] = _mm512_unpacklo_epi32(in[2 * i], in[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(in[2 * i], in[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {   /* u[4i + j], lane L: column 4L + j of rows 4i..4i+3 */
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* v: lanes L = 0, 2 (0x88) or 1, 3 (0xdd) of row groups g and g + 1: 8 rows of one column pair */
    for (int j = 0; j < 4; j++) {
        v[j] = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);        /* rows 0-7: columns j, 8 + j */
        v[4 + j] = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);    /* rows 0-7: columns 4 + j, 12 + j */
        v[8 + j] = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
        v[12 + j] = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    }
    for (int j = 0; j < 4; j++) {
        out[j] = _mm512_shuffle_i32x4(v[j], v[8 + j], 0x88);
        out[8 + j] = _mm512_shuffle_i32x4(v[j], v[8 + j], 0xdd);
        out[4 + j] = _mm512_shuffle_i32x4(v[4 + j], v[12 + j], 0x88);
        out[12 + j] = _mm512_shuffle_i32x4(v[4 + j], v[12 + j], 0xdd);
    }
}

/* x [m, k] in bf16 as B tiles (amx_x_tile): for each k block kb and m block mb, 16 rows (pairs of
   k) of 16 columns (rows of x, zero past m) of 2 bf16. */
static void amx_layout_x(const float *x, int64_t m, int64_t k, int64_t mbs, uint32_t *xv, int num_threads) {
    const int64_t nkb = k / QK;
    const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
    /* Threads take whole m blocks: no two write one tile's cache lines. */
#pragma omp parallel for num_threads(mbs > 1 ? num_threads : 1) schedule(static)
    for (int64_t mb = 0; mb < mbs; mb++) {
        const int64_t r1 = (mb + 1) * AMX_ROWS < m ? (mb + 1) * AMX_ROWS : m;
        if (r1 - mb * AMX_ROWS < AMX_ROWS) {   /* a partial block: row by row, zero past m */
            for (int64_t kb = 0; kb < nkb; kb++) memset(xv + amx_x_tile(kb, mb, nkb) * 256, 0, 1024);
            for (int64_t r = mb * AMX_ROWS; r < r1; r++)
                for (int64_t kb = 0; kb < nkb; kb++) {
                    const float *xr = x + r * k + kb * QK;
                    const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + 16),
                                                                      _mm512_loadu_ps(xr));
                    uint32_t *tile = xv + amx_x_tile(kb, mb, nkb) * 256 + r % AMX_ROWS;
                    _mm512_i32scatter_epi32(tile, col, pairs, 4);   /* pair p of the row to tile row p */
                }
            continue;
        }
        /* A whole block: 16 rows' pairs, transposed in registers (pair p of row r to tile row p,
           column r), 4x fewer operations than 16 scatters. */
        for (int64_t kb = 0; kb < nkb; kb++) {
            __m512i a[16], b[16];
            for (int i = 0; i < 16; i++) {
                const float *xr = x + (mb * AMX_ROWS + i) * k + kb * QK;
                a[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + 16), _mm512_loadu_ps(xr));
            }
            transpose16_epi32(a, b);
            uint32_t *tile = xv + amx_x_tile(kb, mb, nkb) * 256;
            for (int p = 0; p < 16; p++) _mm512_store_si512(tile + 16 * p, b[p]);
        }
    }
}


static inline __attribute__((always_inline)) void amx_load_a(int fmt, const uint8_t *w, int64_t rb, int64_t nb,
                                                             int64_t kb, uint16_t *a) {
    for (int r = 0; r < AMX_ROWS; r++) {
        __m512 lo, hi;
        dequant_block(fmt, w + r * rb, nb, kb, &lo, &hi);
        _mm512_store_si512(a + r * QK, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* One 16 x 16 C tile to y (C rows are weight rows, columns rows of x). A whole block of x's rows
   is transposed in registers and stored as 16 vectors: element by element, the stores took about
   as long as the tiles' products (the Q8_0 lm_head at 64 rows: 6.8 ms, 3.9 this way). */
static inline void amx_store_c(const float *c, int64_t m, int64_t r0, int64_t n0, float *y, int64_t ldy) {
    if (r0 + AMX_ROWS <= m) {
        __m512i in[AMX_ROWS], out[AMX_ROWS];
        for (int i = 0; i < AMX_ROWS; i++) in[i] = _mm512_load_si512(c + i * AMX_ROWS);
        transpose16_epi32(in, out);   /* out[j]: row r0 + j of y, columns n0 .. n0 + 15 */
        for (int j = 0; j < AMX_ROWS; j++) _mm512_storeu_si512(y + (r0 + j) * ldy + n0, out[j]);
        return;
    }
    for (int64_t r = r0; r < m && r < r0 + AMX_ROWS; r++)
        for (int i = 0; i < AMX_ROWS; i++) y[r * ldy + n0 + i] = c[i * AMX_ROWS + (r - r0)];
}

/* The C tiles of one block to y: 3 (first A tile, first m block), 4 (second m block), 6-7 (the
   second A tile's). */
static inline __attribute__((always_inline)) void amx_store_tiles(int count, int pair, int64_t mb0, int64_t m,
                                                                  int64_t n0, float *y, int64_t ldy) {
    __attribute__((aligned(64))) float c[AMX_ROWS * AMX_ROWS];
    const int64_t r0 = mb0 * AMX_ROWS, r1 = r0 + AMX_ROWS, n1 = n0 + AMX_ROWS;
    /* A tile number must be a constant: one statement per C tile. */
#define STORE_C(TILE, R, N)                \
    do {                                   \
        _tile_stored(TILE, c, 64);         \
        AMX_MEMORY_BARRIER();              \
        amx_store_c(c, m, R, N, y, ldy);   \
    } while (0)
    STORE_C(3, r0, n0);
    if (count > 1) STORE_C(4, r1, n0);
    if (pair > 1) STORE_C(6, r0, n1);
    if (pair > 1 && count > 1) STORE_C(7, r1, n1);
#undef STORE_C
}

static inline __attribute__((always_inline)) void amx_zero_tiles(int count, int pair) {
    _tile_zero(3);
    if (count > 1) _tile_zero(4);
    if (pair > 1) _tile_zero(6);
    if (pair > 1 && count > 1) _tile_zero(7);
}

/* One k block: A tiles a0 (and a1 when pair > 1) times the B tiles at b (b + 256 the second m
   block), into C tiles 3-4 (a0) and 6-7 (a1). */
static inline __attribute__((always_inline)) void amx_k_step(int count, int pair, const uint16_t *a0,
                                                             const uint16_t *a1, const uint32_t *b) {
    _tile_loadd(0, a0, 64);
    _tile_loadd(1, b, 64);
    if (pair > 1) _tile_loadd(5, a1, 64);
    _tile_dpbf16ps(3, 0, 1);
    if (pair > 1) _tile_dpbf16ps(6, 5, 1);
    if (count > 1) {
        _tile_loadd(2, b + 256, 64);
        _tile_dpbf16ps(4, 0, 2);
        if (pair > 1) _tile_dpbf16ps(7, 5, 2);
    }
}

/* Weight rows [n0, n0 + 16 * pair) (one or two A tiles: 0 and 5) against the m blocks [mb0,
   mb0 + count) of x (B tiles 1-2); C tiles 3-4 for the first A tile, 6-7 for the second. Two A
   tiles share each B tile load and give the tiles four independent sums. */
static inline __attribute__((always_inline)) void amx_block(int fmt, int count, int pair, const uint8_t *w,
                                                            int64_t rb, int64_t nb, const uint32_t *xv,
                                                            int64_t mb0, int64_t m, int64_t n0, float *y,
                                                            int64_t ldy) {
    /* Two A buffers, alternating: the next block's de-quantised stores need not wait for the
       tile loads of the current one. */
    __attribute__((aligned(64))) uint16_t a[2][2 * AMX_ROWS * QK];
    amx_zero_tiles(count, pair);
    /* The rows are read as 16-32 (Q8_0) to 48-96 (Q4_1: scales, offsets, quants) interleaved
       streams, more than the hardware prefetchers follow: measured, the blocks came at ~5 GB/s.
       The next rows are one contiguous range; each block step asks for its share of it. */
    const int64_t span = pair * AMX_ROWS * rb;
    const uint8_t *next = w + span;
    const int64_t ahead = (span + nb * 64 - 1) / (nb * 64) * 64;   /* bytes per block step */
    for (int64_t kb = 0; kb < nb; kb++) {
        for (int64_t off = kb * ahead; off < (kb + 1) * ahead && off < span; off += 64) weft_prefetch_l2(next + off);
        uint16_t *ak = a[kb & 1];
        amx_load_a(fmt, w, rb, nb, kb, ak);
        if (pair > 1) amx_load_a(fmt, w + AMX_ROWS * rb, rb, nb, kb, ak + AMX_ROWS * QK);
        AMX_MEMORY_BARRIER();
        /* mb0 even: the B tile of mb0 + 1 follows */
        amx_k_step(count, pair, ak, ak + AMX_ROWS * QK, xv + amx_x_tile(kb, mb0, nb) * 256);
    }
    amx_store_tiles(count, pair, mb0, m, n0, y, ldy);
}

/* As amx_block, the A tiles read from `abuf` (the weight rows de-quantised once by amx_rows:
   tile kb of the first 16 rows at 2 kb, of the second at 2 kb + 1: one stream). The same tiles
   multiplied in the same order: the same sums, bit for bit, as a step of few rows gets. */
static inline __attribute__((always_inline)) void amx_block_cached(int count, int pair, const uint16_t *abuf,
                                                                   int64_t nb, const uint32_t *xv,
                                                                   int64_t mb0, int64_t m, int64_t n0, float *y,
                                                                   int64_t ldy) {
    amx_zero_tiles(count, pair);
    for (int64_t kb = 0; kb < nb; kb++)
        amx_k_step(count, pair, abuf + 2 * kb * AMX_ROWS * QK, abuf + (2 * kb + 1) * AMX_ROWS * QK,
                   xv + amx_x_tile(kb, mb0, nb) * 256);
    amx_store_tiles(count, pair, mb0, m, n0, y, ldy);
}

/* Weight rows [n0, n0 + 16 * pair) against every row of x, AMX_MAX_MB m blocks a pass. With more
   rows than one pass takes (prefill chunks, large batches) the rows are de-quantised once into
   `abuf` (2 * nb tiles of 1 KB, the caller's) and every pass reads them from there: de-quantising
   per pass made 1,024 rows 2.3x slower than MKL's GEMM on bf16 copies. */
static void amx_rows(int fmt, int pair, const uint8_t *w, int64_t rb, int64_t nb, const uint32_t *xv, int64_t mbs,
                     int64_t m, int64_t n0, float *y, int64_t ldy, uint16_t *abuf) {
    if (mbs > AMX_MAX_MB && abuf) {
        for (int p = 0; p < pair; p++)
            for (int64_t kb = 0; kb < nb; kb++)
                amx_load_a(fmt, w + p * AMX_ROWS * rb, rb, nb, kb, abuf + (2 * kb + p) * AMX_ROWS * QK);
        AMX_MEMORY_BARRIER();
        for (int64_t mb = 0; mb < mbs; mb += AMX_MAX_MB) {
            const int count = mbs - mb < AMX_MAX_MB ? (int)(mbs - mb) : AMX_MAX_MB;
            if (count == 2 && pair == 2) amx_block_cached(2, 2, abuf, nb, xv, mb, m, n0, y, ldy);
            else if (count == 1 && pair == 2) amx_block_cached(1, 2, abuf, nb, xv, mb, m, n0, y, ldy);
            else if (count == 2) amx_block_cached(2, 1, abuf, nb, xv, mb, m, n0, y, ldy);
            else amx_block_cached(1, 1, abuf, nb, xv, mb, m, n0, y, ldy);
        }
        return;
    }
    for (int64_t mb = 0; mb < mbs; mb += AMX_MAX_MB) {
        const int count = mbs - mb < AMX_MAX_MB ? (int)(mbs - mb) : AMX_MAX_MB;
        switch (fmt) {
#define SHAPE_CASE(F, C, P) \
    if (count == C && pair == P) amx_block(F, C, P, w, rb, nb, xv, mb, m, n0, y, ldy);
#define FMT_CASE(F)                                                                   \
    case F:                                                                           \
        SHAPE_CASE(F, 1, 1) SHAPE_CASE(F, 2, 1) SHAPE_CASE(F, 1, 2) SHAPE_CASE(F, 2, 2) \
        break;
            FMT_CASE(FMT_Q4_1) FMT_CASE(FMT_Q5_1) FMT_CASE(FMT_Q6_K)
            default: FMT_CASE(FMT_Q8_0)
#undef FMT_CASE
#undef SHAPE_CASE
        }
    }
}
#endif

/* One rows-tile over weight rows [n0, n1); the switch gives each tile height its own code. */
static void tile_dispatch(int fmt, int mt, const float *x, int64_t ldx, const uint8_t *w, int64_t n0, int64_t n1,
                          int64_t k, float *y, int64_t ldy) {
    switch (mt) {
#define CASE(M)                                                                      \
    case M:                                                                          \
        switch (fmt) {                                                               \
            case FMT_Q4_1: tile(FMT_Q4_1, M, x, ldx, w, n0, n1, k, y, ldy); break;   \
            case FMT_Q5_1: tile(FMT_Q5_1, M, x, ldx, w, n0, n1, k, y, ldy); break;   \
            case FMT_Q6_K: tile(FMT_Q6_K, M, x, ldx, w, n0, n1, k, y, ldy); break;   \
            case FMT_BF16: tile(FMT_BF16, M, x, ldx, w, n0, n1, k, y, ldy); break;   \
            default: tile(FMT_Q8_0, M, x, ldx, w, n0, n1, k, y, ldy); break;         \
        }                                                                            \
        break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
#undef CASE
        default: break;
    }
}

/* y[m, n] (row stride ldy) = sum_k x[m, k] w[n, k]; k a multiple of 32. Returns 0, or -1 for
   an unknown format / k. Threads split N (weight rows) so each thread reads its own weights. */
int weft_qmatmul_f32(const float *x, int64_t m, int64_t k, const uint8_t *w, int fmt, int64_t n, float *y,
                     int64_t ldy, int num_threads) {
    if (fmt == FMT_SEGMENTS) {   /* each segment its own product into its columns of y */
        const int64_t *h = (const int64_t *)w;
        int64_t row0 = 0;
        for (int64_t s = 0; s < h[0]; s++) {
            const int64_t sfmt = h[1 + 3 * s], rows = h[2 + 3 * s];
            if (!known_layout((int)sfmt) || row0 + rows > n ||
                weft_qmatmul_f32(x, m, k, w + h[3 + 3 * s], (int)sfmt, rows, y + row0, ldy, num_threads))
                return -1;
            row0 += rows;
        }
        return row0 == n ? 0 : -1;
    }
    if (!known_layout(fmt) || k % QK != 0) return -1;
    /* Chunks of 16 weight rows: enough work per chunk, and y stores of neighbouring threads
       rarely share a cache line. */
    const int64_t chunk = 16, chunks = (n + chunk - 1) / chunk;
    const int threads = n * k < 65536 ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t n0 = c * chunk, n1 = n0 + chunk < n ? n0 + chunk : n;
        const int64_t tiles = (m + MAX_TILE - 1) / MAX_TILE;
        for (int64_t t = 0, r = 0; t < tiles; t++) {
            const int mt = (int)((m - r) / (tiles - t));   /* balanced: 8 rows as 4 + 4, not 6 + 2 */
            tile_dispatch(fmt, mt, x + r * k, k, w, n0, n1, k, y + r * ldy, ldy);
            r += mt;
        }
    }
    return 0;
}

/* y[m, n] = bf16(x) @ bf16(W)^T with float32 sums, on AMX tiles: the product bf16 mode runs for
   a GGUF's blocks on a CPU with AMX (kernels/csrc/cpu_llama.c, the logits in service/models/llama.py). W's weights are de-quantised as the float32
   kernel does, then rounded to bf16 (RNE): torch's .bfloat16() of the float32 weight. Returns 0;
   -1 for FMT_BF16 or an unknown format / shape (n a multiple of 16, k of 32); -2 where this
   build or CPU has no AMX (weft_qmatmul_amx_available says which up front). */
int weft_qmatmul_amx_available(void) {
#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
    return amx_permitted();
#else
    return 0;
#endif
}

int weft_qmatmul_amx(const float *x, int64_t m, int64_t k, const uint8_t *w, int fmt, int64_t n, float *y,
                     int64_t ldy, int num_threads) {
#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
    if (!amx_permitted()) return -2;
    /* FMT_BF16: the weights are bf16 already, and MKL's bf16 GEMM reads them as they lie. */
    if (k % QK != 0 || m <= 0 || fmt == FMT_BF16) return -1;
    const int64_t mbs = (m + AMX_ROWS - 1) / AMX_ROWS, nkb = k / QK;
    uint32_t *xv = aligned_alloc(64, sizeof(uint32_t) * amx_x_tiles(nkb, mbs) * 256);
    if (!xv) return -1;
    amx_layout_x(x, m, k, mbs, xv, num_threads);
    AMX_MEMORY_BARRIER();
    amx_config cfg = {.palette = 1};   /* every tile 16 rows of 64 bytes */
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = AMX_ROWS;
        cfg.colsb[t] = 64;
    }
    int rc = 0;
    const int64_t *h = (const int64_t *)w;
    const int64_t segments = fmt == FMT_SEGMENTS ? h[0] : 1;
    for (int64_t s = 0, row0 = 0; s < segments && !rc; s++) {
        const int sfmt = fmt == FMT_SEGMENTS ? (int)h[1 + 3 * s] : fmt;
        const int64_t rows = fmt == FMT_SEGMENTS ? h[2 + 3 * s] : n;
        const uint8_t *sw = fmt == FMT_SEGMENTS ? w + h[3 + 3 * s] : w;
        if (!known_layout(sfmt) || rows % AMX_ROWS || row0 + rows > n) {
            rc = -1;
            break;
        }
        const int64_t rb = row_bytes(sfmt, nkb);
        const int64_t blocks = rows / AMX_ROWS;   /* of 16 weight rows, taken two at a time */
#pragma omp parallel num_threads(num_threads)
        {
            /* Each thread's de-quantised rows, when a pass cannot take every row of x (NULL if the
               allocation fails: the rows are then de-quantised per pass, the same sums). */
            uint16_t *abuf = mbs > AMX_MAX_MB ? aligned_alloc(64, sizeof(uint16_t) * 2 * nkb * AMX_ROWS * QK) : 0;
            AMX_MEMORY_BARRIER();
            _tile_loadconfig(&cfg);
#pragma omp for schedule(static)
            for (int64_t q = 0; q < (blocks + 1) / 2; q++)
                amx_rows(sfmt, 2 * q + 1 < blocks ? 2 : 1, sw + 2 * q * AMX_ROWS * rb, rb, nkb, xv, mbs, m,
                         row0 + 2 * q * AMX_ROWS, y, ldy, abuf);
            _tile_release();
            free(abuf);
        }
        row0 += rows;
        if (s == segments - 1 && row0 != n) rc = -1;
    }
    free(xv);
    return rc;
#else
    (void)x, (void)m, (void)k, (void)w, (void)fmt, (void)n, (void)y, (void)ldy, (void)num_threads;
    return -2;
#endif
}

/* How many weights of w (float32 [n, k]) differ from the packed tensor de-quantised as gguf-py
   does (dequant_block_ref); -1 for an unknown format / k. Used at load to check every packed
   tensor against the model's weight in one pass over both. */
int64_t weft_qcheck_f32(const uint8_t *packed, int fmt, int64_t n, int64_t k, const float *w, int num_threads) {
    if (fmt == FMT_SEGMENTS) {
        const int64_t *h = (const int64_t *)packed;
        int64_t row0 = 0, bad = 0;
        for (int64_t s = 0; s < h[0]; s++) {
            const int64_t sfmt = h[1 + 3 * s], rows = h[2 + 3 * s];
            if (!known_layout((int)sfmt) || row0 + rows > n) return -1;
            const int64_t b = weft_qcheck_f32(packed + h[3 + 3 * s], (int)sfmt, rows, k, w + row0 * k, num_threads);
            if (b < 0) return -1;
            bad += b;
            row0 += rows;
        }
        return row0 == n ? bad : -1;
    }
    if (!known_layout(fmt) || k % QK != 0) return -1;
    const int64_t nb = k / QK, rb = row_bytes(fmt, nb);
    int64_t bad = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(+ : bad)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = packed + r * rb;
        const float *wr = w + r * k;
        float v[QK];
        for (int64_t b = 0; b < nb; b++) {
            dequant_block_ref(fmt, row, nb, b, v);
            for (int i = 0; i < QK; i++) bad += v[i] != wr[b * QK + i];
        }
    }
    return bad;
}
