/* silu(gate) * up from the fused gate/up projection ([T, 2 * inter] -> [T, inter]), float32.

torch computes silu as x / (1 + exp(-x)) with Sleef's expf_u10 on AVX-512; this is the same
algorithm written so the compiler vectorizes it (the libm call per element would not be). */
#include <stdint.h>

#include "weft_cpu.h"

static inline float exp_u10(float d) {
    const float q = __builtin_rintf(d * 1.442695040888963407359924681001892137f);
    float s = __builtin_fmaf(q, -0.693145751953125f, d);
    s = __builtin_fmaf(q, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = __builtin_fmaf(u, s, 0.00139304355252534151077271f);
    u = __builtin_fmaf(u, s, 0.00833336077630519866943359f);
    u = __builtin_fmaf(u, s, 0.0416664853692054748535156f);
    u = __builtin_fmaf(u, s, 0.166666671633720397949219f);
    u = __builtin_fmaf(u, s, 0.5f);
    u = 1.0f + __builtin_fmaf(s * s, u, s);
    const float qc = q < -150.0f ? -150.0f : (q > 150.0f ? 150.0f : q);
    const int32_t e = (int32_t)qc, e1 = e >> 1, e2 = e - e1;
    union { int32_t i; float f; } p1 = {(e1 + 127) << 23}, p2 = {(e2 + 127) << 23};
    float r = u * p1.f * p2.f;
    r = d < -104.0f ? 0.0f : r;
    return d > 100.0f ? __builtin_inff() : r;
}

void weft_silu_mul_f32(const float *gate_up, float *out, int64_t num_tokens, int64_t inter, int num_threads) {
    const int threads = num_tokens * inter < 65536 ? 1 : num_threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *g = gate_up + t * 2 * inter, *u = g + inter;
        float *o = out + t * inter;
        for (int64_t i = 0; i < inter; i++) {
            const float silu = g[i] / (1.0f + exp_u10(-g[i]));
            o[i] = silu * u[i];
        }
    }
}
