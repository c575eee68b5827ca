/* Fused integer passes of m2t's exact entropy model on the CPU (int8_linear.py loads this
 * library with ctypes; it has no Python API). Every result is an integer computed exactly,
 * so it does not depend on the compiler, vectorisation or CPU: the target clones below
 * only pick wider instructions where the CPU has them. */

#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define M2T_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define M2T_CLONES
#endif

/* x (M, K) float64 integers -> planes (2M, K) int8: rows a = floor(x / 256), then rows
 * b = (x mod 256) - 128, so that x = 256 a + b + 128; row_term (M,) = 32768 sum a + 128 sum b.
 * Returns 0 where some x lies outside [-32768, 32767] (the planes are then unusable). */
M2T_CLONES int m2t_split_planes(const double *restrict x, int64_t M, int64_t K, int8_t *restrict planes,
                                int64_t *restrict row_term) {
    int outside = 0;
    for (int64_t n = 0; n < M * K; n++)
        outside |= (x[n] < -32768.0) | (x[n] > 32767.0);
    if (outside)
        return 0;
    for (int64_t i = 0; i < M; i++) {
        const double *restrict xi = x + i * K;
        int8_t *restrict hi_row = planes + i * K;
        int8_t *restrict lo_row = planes + (M + i) * K;
        int32_t sa = 0, sb = 0;  /* |sums| <= 128 K: K < 2^17 (int8_linear.MAX_INNER) */
        for (int64_t k = 0; k < K; k++) {
            int32_t q = (int32_t)xi[k];
            int32_t lo = (q & 255) - 128;      /* two's complement: q mod 256, less 128 */
            int32_t hi = (q - lo - 128) >> 8;  /* an exact multiple of 256: floor(q / 256) */
            hi_row[k] = (int8_t)hi;
            lo_row[k] = (int8_t)lo;
            sa += hi;
            sb += lo;
        }
        row_term[i] = 32768 * (int64_t)sa + 128 * (int64_t)sb;
    }
    return 1;
}

static inline void combine_row(const int32_t *restrict ac, const int32_t *restrict ad, const int32_t *restrict bc,
                               const int32_t *restrict bd, double r, const double *restrict offset,
                               const double *restrict scale, double limit, double *restrict o, int64_t N) {
    for (int64_t j = 0; j < N; j++) {
        double acc = 65536.0 * (double)ac[j] + 256.0 * ((double)ad[j] + (double)bc[j]) + (double)bd[j];
        double q = __builtin_floor((acc + (r + offset[j])) * scale[j]);
        q = q < -limit ? -limit : q;
        o[j] = q > limit ? limit : q;
    }
}

/* products (2M, 2N) int32 = [[P_ac, P_ad], [P_bc, P_bd]] of the planes -> out (M, N) float64,
 * row i at out + i * out_stride: clamp(floor((acc + offset_j) * scale_j), +-limit) where
 * acc = 65536 P_ac + 256 (P_ad + P_bc) + P_bd + row_term_i is the exact sum of products.
 * Every term is an integer below 2^53 and scale_j a power of two, so each float64 step is
 * exact. */
M2T_CLONES void m2t_combine(const int32_t *products, int64_t M, int64_t N, const int64_t *row_term,
                            const double *offset, const double *scale, double limit, double *out, int64_t out_stride) {
    for (int64_t i = 0; i < M; i++) {
        const int32_t *ac = products + i * 2 * N, *bc = products + (M + i) * 2 * N;
        combine_row(ac, ac + N, bc, bc + N, (double)row_term[i], offset, scale, limit, out + i * out_stride, N);
    }
}
