/* Residual add + RMSNorm, float32: h += delta (in place, when given), out = w * (h * rsqrt(mean(h^2) + eps)).

torch runs this as ~8 ops (add, pow, sum, div, add, rsqrt, mul, mul): ~35 us per call for one
token on a CPU, twice per layer. Every step but the sum of squares is the same IEEE operation
torch does (contraction into FMAs is off); the sum runs in 16 partial sums plus a fixed tree,
so results can differ from torch's in the last bit (torch's own order depends on its SIMD width). */
#pragma STDC FP_CONTRACT OFF
#include <math.h>
#include <stdint.h>

#include "weft_cpu.h"

#if defined(__GNUC__) && !defined(__clang__)
#define NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define NO_FMA
#endif

#define LANES 16

NO_FMA static void norm_row(float *restrict h, const float *restrict delta, const float *restrict w,
                            float *restrict out, int64_t n, float eps) {
    if (delta)
        for (int64_t i = 0; i < n; i++) h[i] = h[i] + delta[i];
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            const float sq = h[i + l] * h[i + l];
            acc[l] = acc[l] + sq;
        }
    float tail = 0.0f;
    for (; i < n; i++) {
        const float sq = h[i] * h[i];
        tail = tail + sq;
    }
    for (int s = LANES / 2; s; s >>= 1)
        for (int l = 0; l < s; l++) acc[l] = acc[l] + acc[l + s];
    const float mean = (acc[0] + tail) / (float)n;
    const float r = 1.0f / sqrtf(mean + eps);
    for (int64_t j = 0; j < n; j++) {
        const float x = h[j] * r;
        out[j] = w[j] * x;
    }
}

/* h, delta (may be NULL), out: [T, n] contiguous; w: [n]. */
void weft_add_rms_norm_f32(float *h, const float *delta, const float *w, float *out, int64_t num_tokens,
                           int64_t n, float eps, int num_threads) {
    const int threads = num_tokens * n < 65536 ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; t++)
        norm_row(h + t * n, delta ? delta + t * n : 0, w, out + t * n, n, eps);
}
