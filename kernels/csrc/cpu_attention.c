/* Paged attention for the CPU, float32: queries read K/V straight out of the cache blocks,
float32 ones or bfloat16 ones (kv_bf16) widened on load (a shift: exact), the arithmetic float32
either way. bf16 blocks halve what a step streams; at 32 sequences of the engine bench that made
a bf16-mode step ~5% faster, not the sixth the halved bytes promised: the kernel is not bound by
its bytes alone (its prefetches of the next item's rows are its hottest instructions, perf says).

The torch reference gathers every row's blocks into a contiguous copy, then permutes it for
the matmuls: per layer and step that writes and re-reads the whole batch's KV two more times,
and costs ~20 small ops. Here a work item is a query token and a chunk of its keys, over every
KV head (the G query heads that share a KV head are scored together); the chunks of a query are
joined at the end (flash-decoding's split), so one long decode keeps both cores busy.

Plain C on raw pointers (called through ctypes, built at first use by kernels/cpu_native.py),
OpenMP from torch's own libgomp (same soname: the loader reuses the copy torch loaded, so there
is one thread pool, not two competing for the cores).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "weft_cpu.h"

#define LANES 16
#define INLINE static inline __attribute__((always_inline))

/* Element `at` of a cache, float32 or bf16. The fast path passes kv_bf16 as a constant (it is
   compiled once per layout, and the branch disappears); the plain loop for other head sizes
   branches per element. */
INLINE float kv_at(const void *cache, int64_t at, int kv_bf16) {
    return kv_bf16 ? weft_from_bf16(((const uint16_t *)cache)[at]) : ((const float *)cache)[at];
}

/* Dot product in LANES independent partial sums (one vector register), then a fixed tree:
   the result does not depend on thread count or on where the row sits in the batch. */
INLINE float dot(const float *restrict a, const void *cache, int64_t at, int64_t n, int kv_bf16) {
    float acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[d + l] * kv_at(cache, at + d + l, kv_bf16);
    float tail = 0.0f;
    for (; d < n; d++) tail += a[d] * kv_at(cache, at + d, kv_bf16);
    for (int w = LANES / 2; w; w >>= 1)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0] + tail;
}

/* exp(x) for x <= 0 in a form the compiler vectorizes (a libm call per element does not):
   Sleef's expf_u10 algorithm (the one torch's vectorized softmax uses), accurate to 1 ulp. */
static inline float exp_nonpos(float d) {
    const float q = __builtin_rintf(d * 1.442695040888963407359924681001892137f);
    float s = q * -0.693145751953125f + d;
    s = q * -1.428606765330187045e-06f + s;
    float u = 0.000198527617612853646278381f;
    u = u * s + 0.00139304355252534151077271f;
    u = u * s + 0.00833336077630519866943359f;
    u = u * s + 0.0416664853692054748535156f;
    u = u * s + 0.166666671633720397949219f;
    u = u * s + 0.5f;
    u = s * s * u + s + 1.0f;
    /* u * 2^q, in two halves so that 2^(q/2) stays a normal float down to q = -150 */
    const int32_t e = (int32_t)q, e1 = e >> 1, e2 = e - e1;
    union { int32_t i; float f; } p1 = {(e1 + 127) << 23}, p2 = {(e2 + 127) << 23};
    const float r = u * p1.f * p2.f;
    return d < -104.0f ? 0.0f : r;
}

/* One (token, KV head) item: scores over keys [0, num_keys), softmax, weighted sum of V. */
static void attend(const float *q, float *out, const void *k_cache, const void *v_cache,
                   const int64_t *table, int64_t num_keys, int64_t kvh, int64_t group,
                   int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                   float *scores, int kv_bf16) {
    const int64_t row_stride = num_kv_heads * head_dim;      /* one token slot in a block */
    for (int64_t j0 = 0, blk = 0; j0 < num_keys; j0 += block_size, blk++) {
        const int64_t base = (table[blk] * block_size * num_kv_heads + kvh) * head_dim;
        const int64_t n = num_keys - j0 < block_size ? num_keys - j0 : block_size;
        for (int64_t o = 0; o < n; o++)
            for (int64_t g = 0; g < group; g++)
                scores[g * num_keys + j0 + o] = dot(q + g * head_dim, k_cache, base + o * row_stride, head_dim,
                                                    kv_bf16) * scale;
    }
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * num_keys;
        float m = -INFINITY;
        for (int64_t j = 0; j < num_keys; j++) m = s[j] > m ? s[j] : m;
        float sum = 0.0f;
        for (int64_t j = 0; j < num_keys; j++) s[j] = exp_nonpos(s[j] - m);
        for (int64_t j = 0; j < num_keys; j++) sum += s[j];
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < num_keys; j++) s[j] *= inv;
        float *o = out + g * head_dim;
        for (int64_t d = 0; d < head_dim; d++) o[d] = 0.0f;
    }
    for (int64_t j0 = 0, blk = 0; j0 < num_keys; j0 += block_size, blk++) {
        const int64_t base = (table[blk] * block_size * num_kv_heads + kvh) * head_dim;
        const int64_t n = num_keys - j0 < block_size ? num_keys - j0 : block_size;
        for (int64_t o = 0; o < n; o++) {
            const int64_t vp = base + o * row_stride;
            for (int64_t g = 0; g < group; g++) {
                const float p = scores[g * num_keys + j0 + o];
                float *restrict dst = out + g * head_dim;
                for (int64_t d = 0; d < head_dim; d++) dst[d] += p * kv_at(v_cache, vp + d, kv_bf16);
            }
        }
    }
}

/* ---- fast path: head_dim a multiple of 16, vectors of 16 floats (GCC/clang vector extensions) ---- */

typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));   /* unaligned loads, aliases float */
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t bf16x16 __attribute__((vector_size(32), aligned(2), may_alias));
#ifdef __clang__
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (i16){__VA_ARGS__})
#endif

/* The 16-lane sums of a0..a3 in lanes 0..3, by a fixed tree of shuffles and adds: 12 vector
   instructions for 4 keys instead of a full horizontal reduction each. */
static inline v16 hsum4(v16 a0, v16 a1, v16 a2, v16 a3) {
    const v16 b01 = SHUF(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
                  + SHUF(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const v16 b23 = SHUF(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
                  + SHUF(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const v16 c = SHUF(b01, b23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
                + SHUF(b01, b23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const v16 d = SHUF(c, c, 0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13)
                + SHUF(c, c, 2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15);
    return SHUF(d, d, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6)
         + SHUF(d, d, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7);
}

/* 16 cache elements from `at` as floats: bf16 ones widened (zero-extend, shift into the high half). */
INLINE v16 kv_load16(const void *cache, int64_t at, int kv_bf16) {
    if (kv_bf16)
        return (v16)(__builtin_convertvector(*(const bf16x16 *)((const uint16_t *)cache + at), u32x16) << 16);
    return *(const v16 *)((const float *)cache + at);
}

#define MAX_GROUP 8
#define MAX_CHUNKS 16   /* head_dim <= 256 */

/* The K and V rows (all heads) of the next work item a thread will take, asked for a few cache
   lines at a time while it computes the current one (prefetcht2: into L2), so that memory and
   arithmetic overlap. Measured on 2 cores of an AMD EPYC, 30 layers of SmolLM2-135M's heads,
   block tables shuffled, caches far larger than L3, ms a step: one query over 2,048 keys 15.0
   with (token, KV head) items, 9.2 with chunks, 8.1 asking for each item's rows in one burst
   when it starts, 5.7-6.1 this way; 32 queries over 150-300 keys 28.7, 22.1 (burst), 16-21 this
   way (a noisy machine), ~8.3 with the whole KV in cache. The rows of a paged block table break the hardware
   prefetchers' streams every block, and a core otherwise keeps too few misses in flight. */
typedef struct {
    const char *k_cache, *v_cache;
    const int64_t *table;
    int64_t j, jb, line;                      /* next key, end of the keys, next line of its row */
    int64_t lines_per_row, row_bytes, block_size, per_call;
} prefetcher;

/* Ask for up to n more lines of the planned rows (a key's K line, then its V line). */
static inline void prefetch_some(prefetcher *pf, int64_t n) {
    for (; n > 0 && pf->j < pf->jb; n -= 2) {
        const int64_t at = (pf->table[pf->j / pf->block_size] * pf->block_size + pf->j % pf->block_size) * pf->row_bytes;
        weft_prefetch_l2(pf->k_cache + at + pf->line * 64);
        weft_prefetch_l2(pf->v_cache + at + pf->line * 64);
        if (++pf->line == pf->lines_per_row) {
            pf->line = 0;
            pf->j++;
        }
    }
}

static inline void prefetch_plan(prefetcher *pf, const int64_t *table, int64_t ja, int64_t jb) {
    pf->table = table;
    pf->j = ja;
    pf->jb = jb;
    pf->line = 0;
}

/* Keys [ja, jb) of one (query token, KV head), for each of its `group` query heads: the range's
   largest score m, l = the sum of exp(score - m), and o = the sum of exp(score - m) * v, not yet
   divided by l. part: `group` rows of head_dim + 2 floats (o, then m and l). Every 4 keys of
   each pass it asks `pf` for a few more lines of the next item. */
INLINE void attend_part_v16(const float *q, const void *k_cache, const void *v_cache, const int64_t *table,
                            int64_t ja, int64_t jb, int64_t kvh, int64_t group, int64_t num_kv_heads,
                            int64_t head_dim, int64_t block_size, float scale, float *scores, float *part,
                            prefetcher *pf, int kv_bf16) {
    const int64_t row_stride = num_kv_heads * head_dim, chunks = head_dim / 16, nk = jb - ja;
    for (int64_t j = ja; j < jb;) {
        const int64_t off = j % block_size, n = block_size - off < jb - j ? block_size - off : jb - j;
        const int64_t kb = ((table[j / block_size] * block_size + off) * num_kv_heads + kvh) * head_dim;
        int64_t o = 0;
        for (; o + 4 <= n; o += 4) {
            prefetch_some(pf, pf->per_call);
            const int64_t k0 = kb + o * row_stride, k1 = k0 + row_stride, k2 = k1 + row_stride, k3 = k2 + row_stride;
            /* Up to 4 query heads at once: each K vector is loaded (and widened) once for all of
               them, not once per head, and the 4 x 4 sums stay in registers. */
            for (int64_t g0 = 0; g0 < group; g0 += 4) {
                const int64_t gn = group - g0 < 4 ? group - g0 : 4;
                v16 a[4][4];
                for (int64_t g = 0; g < gn; g++) a[g][0] = a[g][1] = a[g][2] = a[g][3] = (v16){0};
                for (int64_t c = 0; c < chunks; c++) {
                    const v16 kc0 = kv_load16(k_cache, k0 + c * 16, kv_bf16), kc1 = kv_load16(k_cache, k1 + c * 16, kv_bf16);
                    const v16 kc2 = kv_load16(k_cache, k2 + c * 16, kv_bf16), kc3 = kv_load16(k_cache, k3 + c * 16, kv_bf16);
                    for (int64_t g = 0; g < gn; g++) {
                        const v16 qc = ((const v16 *)(q + (g0 + g) * head_dim))[c];
                        a[g][0] += qc * kc0;
                        a[g][1] += qc * kc1;
                        a[g][2] += qc * kc2;
                        a[g][3] += qc * kc3;
                    }
                }
                for (int64_t g = 0; g < gn; g++) {
                    const v16 sum = hsum4(a[g][0], a[g][1], a[g][2], a[g][3]);
                    float *dst = scores + (g0 + g) * nk + (j - ja) + o;
                    for (int l = 0; l < 4; l++) dst[l] = sum[l] * scale;
                }
            }
        }
        for (; o < n; o++)
            for (int64_t g = 0; g < group; g++)
                scores[g * nk + (j - ja) + o] = dot(q + g * head_dim, k_cache, kb + o * row_stride, head_dim, kv_bf16) * scale;
        j += n;
    }
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * nk;
        float m = -INFINITY;
        for (int64_t j = 0; j < nk; j++) m = s[j] > m ? s[j] : m;
        float sum = 0.0f;
        for (int64_t j = 0; j < nk; j++) s[j] = exp_nonpos(s[j] - m);
        for (int64_t j = 0; j < nk; j++) sum += s[j];
        part[g * (head_dim + 2) + head_dim] = m;
        part[g * (head_dim + 2) + head_dim + 1] = sum;
    }
    v16 acc[MAX_GROUP * MAX_CHUNKS];
    for (int64_t i = 0; i < group * chunks; i++) acc[i] = (v16){0};
    for (int64_t j = ja; j < jb;) {
        const int64_t off = j % block_size, n = block_size - off < jb - j ? block_size - off : jb - j;
        const int64_t vb = ((table[j / block_size] * block_size + off) * num_kv_heads + kvh) * head_dim;
        for (int64_t o = 0; o < n; o++) {
            if (o % 4 == 0) prefetch_some(pf, pf->per_call);
            const int64_t vp = vb + o * row_stride;
            for (int64_t c = 0; c < chunks; c++) {
                const v16 vc = kv_load16(v_cache, vp + c * 16, kv_bf16);
                for (int64_t g = 0; g < group; g++) acc[g * chunks + c] += scores[g * nk + (j - ja) + o] * vc;
            }
        }
        j += n;
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < chunks; c++) {
            const v16 a = acc[g * chunks + c];
            __builtin_memcpy(part + g * (head_dim + 2) + c * 16, &a, sizeof a);
        }
}

/* attend_part_v16 compiled for each cache layout, and with the common group sizes and head sizes
   as constants (GQA groups 1-8 of heads of 64 or 128): the group * chunks sums of V then live in
   registers and the loops unroll, instead of a load, FMA and store per vector per key. Measured
   in the engine, SmolLM2-135M (group 3, head 64), c32 decode step in bf16 mode, 2 cores of a
   Xeon: 33.2 -> 32.0 and 32.2 -> 31.0 ms (medians of 120 steps, two sets of four passes,
   alternating builds). The price: the one-time build of the kernels, 4 s before, takes 12 s on 2 cores. */
#define PART_ARGS                                                                                          \
    const float *q, const void *k_cache, const void *v_cache, const int64_t *table, int64_t ja, int64_t jb, \
        int64_t kvh, int64_t group, int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, \
        float *scores, float *part, prefetcher *pf
#define PART_CALL(G, D, BF16)                                                                              \
    attend_part_v16(q, k_cache, v_cache, table, ja, jb, kvh, G, num_kv_heads, D, block_size, scale, scores, \
                    part, pf, BF16)
#define FIXED(G, D, BF16)     \
    case (G) * 1000 + (D):    \
        PART_CALL(G, D, BF16); \
        return;
#define FIXED_GROUPS(D, BF16)                                                                           \
    FIXED(1, D, BF16) FIXED(2, D, BF16) FIXED(3, D, BF16) FIXED(4, D, BF16) FIXED(5, D, BF16) FIXED(6, D, BF16) \
        FIXED(7, D, BF16) FIXED(8, D, BF16)

static void attend_part_f32(PART_ARGS) {
    switch (group * 1000 + head_dim) {
        FIXED_GROUPS(64, 0)
        FIXED_GROUPS(128, 0)
        default: PART_CALL(group, head_dim, 0);
    }
}

static void attend_part_bf16(PART_ARGS) {
    switch (group * 1000 + head_dim) {
        FIXED_GROUPS(64, 1)
        FIXED_GROUPS(128, 1)
        default: PART_CALL(group, head_dim, 1);
    }
}

/* Keys a work item of the fast path covers (the last item of a query may have fewer). */
#define KEY_CHUNK 32

static inline int64_t chunk_end(int64_t ja, int64_t num_keys) {
    return ja + KEY_CHUNK < num_keys ? ja + KEY_CHUNK : num_keys;
}

/* The fast path. Work items are (query token, KEY_CHUNK keys) over every KV head, not (token,
   KV head) over all keys: a block holds a key's heads side by side, so an item now reads whole
   rows rather than a third of each (the prefetchers fetched the rest anyway), and a single long
   query splits across the threads (one decode had 3 items for 2 threads). Then one pass per
   (token, head) joins its chunks, in order. The split depends on the query's own key count
   alone, so a row's result does not depend on its batch (a verify row equals the plain decode of
   its token, bit for bit). Returns 0, or -1 if scratch memory could not be allocated. */
static int attention_chunked(const float *q, float *out, const void *k_cache, const void *v_cache,
                             const int64_t *block_tables, int64_t table_stride, const int64_t *tok_of,
                             const int64_t *row_of, const int64_t *key_count, const int64_t *query_start_loc,
                             int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, float scale, int kv_bf16, int threads) {
    const int64_t group = num_heads / num_kv_heads, part_size = num_heads * (head_dim + 2);
    int64_t *first = malloc(sizeof(int64_t) * (num_tokens + 1));   /* first[k]: token k's first item */
    if (!first) return -1;
    first[0] = 0;
    for (int64_t k = 0; k < num_tokens; k++) first[k + 1] = first[k] + (key_count[k] + KEY_CHUNK - 1) / KEY_CHUNK;
    const int64_t num_items = first[num_tokens];
    int64_t *item_tok = malloc(sizeof(int64_t) * num_items);
    float *parts = malloc(sizeof(float) * num_items * part_size);
    int failed = !item_tok || !parts;
    if (!failed)
        for (int64_t k = 0; k < num_tokens; k++)
            for (int64_t i = first[k]; i < first[k + 1]; i++) item_tok[i] = k;
    if (!failed)   /* item_tok and parts are there */
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * group * KEY_CHUNK);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
        /* Items it, it + threads, ...: a thread knows its next item, and prefetches it. */
        const int nth = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t row_bytes = num_kv_heads * head_dim * (kv_bf16 ? 2 : 4);
        /* lines of an item's rows spread over its 2 * num_kv_heads passes of chunk / 4 calls */
        prefetcher pf = {k_cache, v_cache, 0, 0, 0, 0, (row_bytes + 63) / 64, row_bytes, block_size, head_dim / 4};
        for (int64_t it = me; it < num_items && scores; it += nth) {
            const int64_t k = item_tok[it], t = tok_of[k], r = row_of[k];
            const int64_t ja = (it - first[k]) * KEY_CHUNK, jb = chunk_end(ja, key_count[k]);
            const int64_t *table = block_tables + r * table_stride;
            /* Only a row's first query streams its keys from memory: the row's other queries
               (a speculative verify row, a short chunk) read the same rows, in cache by then,
               and asking for them again only costs instructions. */
            if (it == me && t == query_start_loc[r]) {   /* the thread's first item: nothing asked yet */
                prefetch_plan(&pf, table, ja, jb);
                prefetch_some(&pf, INT64_MAX);
            }
            pf.j = pf.jb = 0;
            const int64_t k2 = it + nth < num_items ? item_tok[it + nth] : -1;
            if (k2 >= 0 && tok_of[k2] == query_start_loc[row_of[k2]]) {
                const int64_t ja2 = (it + nth - first[k2]) * KEY_CHUNK;
                prefetch_plan(&pf, block_tables + row_of[k2] * table_stride, ja2, chunk_end(ja2, key_count[k2]));
            }
            for (int64_t kvh = 0; kvh < num_kv_heads; kvh++)
                (kv_bf16 ? attend_part_bf16 : attend_part_f32)(
                    q + (t * num_heads + kvh * group) * head_dim, k_cache, v_cache, table, ja, jb, kvh, group,
                    num_kv_heads, head_dim, block_size, scale, scores,
                    parts + it * part_size + kvh * group * (head_dim + 2), &pf);
            prefetch_some(&pf, INT64_MAX);   /* what a short last chunk left */
        }
        free(scores);
#pragma omp barrier   /* every part is written */
#pragma omp for schedule(static)
        for (int64_t kh = 0; kh < num_tokens * num_heads; kh++) {
            if (failed) continue;
            const int64_t k = kh / num_heads, h = kh % num_heads;
            float m = -INFINITY, l = 0.0f;
            for (int64_t i = first[k]; i < first[k + 1]; i++) {
                const float mi = parts[i * part_size + h * (head_dim + 2) + head_dim];
                m = mi > m ? mi : m;
            }
            float *o = out + (tok_of[k] * num_heads + h) * head_dim;
            for (int64_t d = 0; d < head_dim; d++) o[d] = 0.0f;
            for (int64_t i = first[k]; i < first[k + 1]; i++) {
                const float *p = parts + i * part_size + h * (head_dim + 2);
                const float w = exp_nonpos(p[head_dim] - m);
                l += w * p[head_dim + 1];
                for (int64_t d = 0; d < head_dim; d++) o[d] += w * p[d];
            }
            const float inv = 1.0f / l;
            for (int64_t d = 0; d < head_dim; d++) o[d] *= inv;
        }
    }
    free(first);
    free(item_tok);
    free(parts);
    return failed ? -1 : 0;
}

/* Rows listed in `rows` (indices into query_start_loc / seq_lens / block_tables): query i of a
   row with nq queries sits at position seq_len - nq + i and sees keys [0, position].
   q, out: [T, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
   all contiguous. Returns 0, or -1 if scratch memory could not be allocated. */
int weft_paged_attention_f32(
    const float *q, float *out, const void *k_cache, const void *v_cache,
    const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,
    const int64_t *query_start_loc, const int64_t *rows, int64_t num_rows,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    float scale, int kv_bf16, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    int64_t num_tokens = 0, max_keys = 1, work = 0;
    for (int64_t i = 0; i < num_rows; i++) {
        const int64_t r = rows[i];
        const int64_t nq = query_start_loc[r + 1] - query_start_loc[r];
        num_tokens += nq;
        max_keys = seq_lens[r] > max_keys ? seq_lens[r] : max_keys;
        work += nq * seq_lens[r];
    }
    if (num_tokens == 0) return 0;
    /* k -> token, its row, and the keys it sees (query i of a row of nq: seq_len - nq + i + 1),
       tokens of the listed rows in order */
    int64_t *tok_of = malloc(sizeof(int64_t) * 3 * num_tokens);
    if (!tok_of) return -1;
    int64_t *row_of = tok_of + num_tokens, *key_count = row_of + num_tokens;
    for (int64_t i = 0, k = 0; i < num_rows; i++) {
        const int64_t r = rows[i];
        for (int64_t t = query_start_loc[r]; t < query_start_loc[r + 1]; t++, k++) {
            tok_of[k] = t;
            row_of[k] = r;
            key_count[k] = seq_lens[r] - query_start_loc[r + 1] + t + 1;
        }
    }
    const int fast = head_dim % 16 == 0 && head_dim <= 16 * MAX_CHUNKS && group <= MAX_GROUP;
    /* A tiny batch (one short decode) costs less than waking the other threads. */
    const int threads = work * num_heads * head_dim < 65536 ? 1 : num_threads;
    if (fast) {
        const int rc = attention_chunked(q, out, k_cache, v_cache, block_tables, table_stride, tok_of, row_of, key_count,
                                         query_start_loc, num_tokens, num_heads, num_kv_heads, head_dim, block_size,
                                         scale, kv_bf16, threads);
        free(tok_of);
        return rc;
    }
    /* Any other head size: one item per (token, KV head), over all its keys. */
    const int64_t num_items = num_tokens * num_kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * group * max_keys);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < num_items; it++) {
            if (!scores) continue;
            const int64_t k = it / num_kv_heads, kvh = it % num_kv_heads;
            const int64_t t = tok_of[k], r = row_of[k];
            const int64_t off = (t * num_heads + kvh * group) * head_dim;
            attend(q + off, out + off, k_cache, v_cache, block_tables + r * table_stride, key_count[k], kvh, group,
                   num_kv_heads, head_dim, block_size, scale, scores, kv_bf16);
        }
        free(scores);
    }
    free(tok_of);
    return failed ? -1 : 0;
}
