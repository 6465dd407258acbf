/* Inner loops of the hot path, in C so the compiler can build one clone per instruction set
 * (target_clones: AVX-512, AVX2, baseline) and pick at load time. No -march=native: the same
 * binary runs on any x86-64; elsewhere the attribute is dropped and the plain loop is built. */
#ifndef GZ_SIMD_H
#define GZ_SIMD_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define GZ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GZ_CLONES
#endif

/* AdaGrad, one pass: G += g*g; theta -= lr * g / (sqrt(G) + eps). */
GZ_CLONES static void gz_adagrad(float *restrict theta, float *restrict accum, const float *restrict grad,
                                 ptrdiff_t n, float lr, float eps) {
    for (ptrdiff_t i = 0; i < n; i++) {
        float g = grad[i];
        float G = accum[i] + g * g;
        accum[i] = G;
        theta[i] -= lr * g / (sqrtf(G) + eps);
    }
}

/* Adam (as torch.optim.Adam, no weight decay, no amsgrad), one pass over (theta, m, v, g):
 * m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  theta -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)
 * with step_size = lr / (1 - b1^t) and inv_sqrt_bc2 = 1 / sqrt(1 - b2^t), computed by the caller. */
GZ_CLONES static void gz_adam(float *restrict theta, float *restrict m, float *restrict v, const float *restrict grad,
                              ptrdiff_t n, float b1, float b2, float step_size, float inv_sqrt_bc2, float eps) {
    for (ptrdiff_t i = 0; i < n; i++) {
        float g = grad[i];
        float mi = b1 * m[i] + (1.0f - b1) * g;
        float vi = b2 * v[i] + (1.0f - b2) * g * g;
        m[i] = mi;
        v[i] = vi;
        theta[i] -= step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
    }
}

/* 1 when no element is NaN or +-Inf: OR-reduce "exponent bits all ones" over the bit patterns. */
GZ_CLONES static int gz_all_finite(const float *restrict x, ptrdiff_t n) {
    const uint32_t *u = (const uint32_t *)x;
    uint32_t bad = 0;
    for (ptrdiff_t i = 0; i < n; i++)
        bad |= (uint32_t)((u[i] & 0x7f800000u) == 0x7f800000u);
    return bad == 0;
}
#endif
