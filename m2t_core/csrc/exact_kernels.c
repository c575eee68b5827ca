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

/* ------------------------------------------------------------------ the integer g_s */

/* Activation byte planes for oneDNN's uint8 convolution (int8_conv.plane_pack): for each of
 * B images, n float32 integers |x| <= 32639 at x + b * x_stride -> the high plane
 * (x + 128) // 256 + 128 at hi + b * out_stride and the low plane (x + 128) mod 256 at
 * lo + b * out_stride. */
M2T_CLONES void m2t_plane_pack(const float *x, int64_t x_stride, int64_t B, int64_t n, uint8_t *hi,
                               int64_t out_stride, uint8_t *lo) {
    for (int64_t b = 0; b < B; b++) {
        const float *restrict xb = x + b * x_stride;
        uint8_t *restrict hb = hi + b * out_stride;
        uint8_t *restrict lb = lo + b * out_stride;
        for (int64_t k = 0; k < n; k++) {
            int32_t v = (int32_t)xb[k] + 128;
            int32_t low = v & 255;                      /* two's complement: v mod 256 */
            hb[k] = (uint8_t)(((v - low) >> 8) + 128);  /* an exact multiple of 256 */
            lb[k] = (uint8_t)low;
        }
    }
}

static inline float clampf(float t, float low, float high) {
    t = t < low ? low : t;
    return t > high ? high : t;
}

/* The rescaling of a convolution's plane products (int_synthesis._combine_into and, for
 * rows that all shift by 8 or more, _combine_products), clamped into out: the same float32
 * steps in the same order as those torch passes, each exact (or, where the float32 route
 * rounds beyond 2^24, rounded alike), so the same integers. raw (2B, planes R, pixels)
 * channels-last float32 as oneDNN returns it (the x_hi images, then the x_lo ones); one
 * weight plane: [x_hi w + f_lo | x_lo w + f_lo], two: [[hh, hl], [lh, ll]] on the rows. out:
 * image b's pixels at out + b * out_stride, R floats each. */
M2T_CLONES void m2t_rescale_planes(const float *raw, int64_t B, int64_t pixels, int64_t R, int64_t planes,
                                   const float *lo_scale, const float *hi_scale, const float *delta,
                                   const float *scale, const float *b_int, float low, float high, float *out,
                                   int64_t out_stride) {
    const int64_t width = planes * R;  /* raw floats per pixel */
    for (int64_t b = 0; b < B; b++) {
        for (int64_t p = 0; p < pixels; p++) {
            const float *restrict hi = raw + (b * pixels + p) * width;
            const float *restrict lo = raw + ((B + b) * pixels + p) * width;
            float *restrict o = out + b * out_stride + p * R;
            if (planes == 1) {
                for (int64_t r = 0; r < R; r++) {
                    float q = __builtin_floorf(lo[r] * lo_scale[r]);
                    float t = hi[r] * hi_scale[r] + q;
                    t = __builtin_floorf((t + delta[r]) * scale[r]) + b_int[r];
                    o[r] = clampf(t, low, high);
                }
            } else {
                for (int64_t r = 0; r < R; r++) {
                    float t = __builtin_floorf(lo[R + r] * (1.0f / 256.0f)) + lo[r];
                    t = (t + hi[R + r]) + 256.0f * hi[r];
                    t = __builtin_floorf((t + delta[r]) * scale[r]) + b_int[r];
                    o[r] = clampf(t, low, high);
                }
            }
        }
    }
}
