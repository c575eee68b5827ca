/* Fused passes of m2t's exact arithmetic on the CPU: the exact entropy model, the entropy
 * coder's probability tables and the integer g_s (m2t_core/cpu_kernels.py loads this library
 * with ctypes; it has no Python API). Every result is an integer computed exactly (integer
 * steps, or float steps on exact integers in the order of the torch passes they replace), so
 * it does not depend on the compiler, vectorisation or CPU: build with -ffp-contract=off and
 * no fast-math (pyproject.toml); the target clones below only pick wider instructions where
 * the CPU has them. */

#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define M2T_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define M2T_CLONES
#endif

/* The version of these functions' signatures: cpu_kernels.py loads a library only where it
 * matches its own (a library built from older sources is left unused, never misread). */
int64_t m2t_abi(void) { return 4; }

static inline float clampf(float t, float low, float high) {
    t = t < low ? low : t;
    return t > high ? high : t;
}

/* ------------------------------------------------------------------ threads
 * The g_s passes below split their pixels over the threads of torch's own OpenMP runtime,
 * whose entry points cpu_kernels.py finds in the process and hands over (m2t_use_openmp):
 * the same worker threads as torch's passes, still spinning after the convolution before,
 * so no second pool competes with them for the cores. Without them (another runtime, or
 * none found) every pass runs on the calling thread. Each thread computes whole pixels with
 * the same steps, so the results do not depend on the thread count. The entropy model's
 * passes stay on the calling thread: they are short and come between torch passes too small
 * to start threads, so torch's workers sleep, and waking them cost more than the pass (a
 * decode step on 2 threads got slower, measured). */

typedef void (*m2t_gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*m2t_omp_int_t)(void);
static m2t_gomp_parallel_t gomp_parallel;
static m2t_omp_int_t omp_thread_num, omp_num_threads;

void m2t_use_openmp(void *parallel, void *thread_num, void *num_threads) {
    gomp_parallel = (m2t_gomp_parallel_t)parallel;
    omp_thread_num = (m2t_omp_int_t)thread_num;
    omp_num_threads = (m2t_omp_int_t)num_threads;
}

typedef void (*m2t_range_t)(const void *args, int64_t begin, int64_t end);
struct m2t_job { m2t_range_t body; const void *args; int64_t n; };

static void run_share(void *p) {
    const struct m2t_job *job = p;
    const int64_t t = omp_thread_num(), T = omp_num_threads();
    const int64_t begin = job->n * t / T, end = job->n * (t + 1) / T;
    if (begin < end)
        job->body(job->args, begin, end);
}

#define M2T_SHARE_VALUES 32768  /* values per thread at least: below, a thread's start costs more */

/* body(args, begin, end) over [0, n) in one contiguous share per thread: at most `threads`
 * threads (the caller passes torch.get_num_threads()), each with at least `least` items. */
static void parallel_for(int64_t n, int64_t least, m2t_range_t body, const void *args, int64_t threads) {
    if (!gomp_parallel)
        threads = 1;
    if (threads > n / least)  /* least >= 1 from every caller */
        threads = n / least;
    if (threads <= 1) {
        body(args, 0, n);
        return;
    }
    struct m2t_job job = {body, args, n};
    gomp_parallel(run_share, &job, (unsigned)threads, 0);
}

/* x (M, K) float64 integers -> planes (2M, K) int8: rows a = floor(x / 256), then rows
 * b = (x mod 256) - 128, so that x = 256 a + b + 128; row_term (M,) = 32768 sum a + 128 sum b.
 * Returns 0 where some x lies outside [-32768, 32767] (the planes are then unusable). */
M2T_CLONES int m2t_split_planes(const double *restrict x, int64_t M, int64_t K, int8_t *restrict planes,
                                int64_t *restrict row_term) {
    int outside = 0;
    for (int64_t n = 0; n < M * K; n++)
        outside |= !((x[n] >= -32768.0) & (x[n] <= 32767.0));  /* NaN too */
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
            int32_t hi = (q - lo - 128) / 256;  /* an exact multiple of 256: floor(q / 256) */
            hi_row[k] = (int8_t)hi;
            lo_row[k] = (int8_t)lo;
            sa += hi;
            sb += lo;
        }
        row_term[i] = 32768 * (int64_t)sa + 128 * (int64_t)sb;
    }
    return 1;
}

static inline double clampd(double v, double limit) {
    v = v < -limit ? -limit : v;
    return v > limit ? limit : v;
}

/* products (2M, 2N) = [[P_ac, P_ad], [P_bc, P_bd]] of the planes, int32 (torch._int_mm) or
 * float32 holding the same integers (oneDNN's matmul, each |P| < 2^24) -> out (M, N) float64,
 * row i at out + i * out_stride: clamp(floor((acc + offset_j) * scale_j), +-limit) where
 * acc = 65536 P_ac + 256 (P_ad + P_bc) + P_bd + row_term_i is the exact sum of products.
 * Every term is an integer below 2^53 and scale_j a power of two, so each float64 step is
 * exact. */
#define M2T_COMBINE(name, type)                                                                                    \
    M2T_CLONES void name(const type *products, int64_t M, int64_t N, const int64_t *row_term, const double *offset,  \
                         const double *scale, double limit, double *out, int64_t out_stride) {                      \
        for (int64_t i = 0; i < M; i++) {                                                                          \
            const type *restrict ac = products + i * 2 * N, *restrict bc = products + (M + i) * 2 * N;             \
            const type *restrict ad = ac + N, *restrict bd = bc + N;                                               \
            const double r = (double)row_term[i];                                                                  \
            double *restrict o = out + i * out_stride;                                                             \
            for (int64_t j = 0; j < N; j++) {                                                                      \
                double acc = 65536.0 * (double)ac[j] + 256.0 * ((double)ad[j] + (double)bc[j]) + (double)bd[j];    \
                o[j] = clampd(__builtin_floor((acc + (r + offset[j])) * scale[j]), limit);                        \
            }                                                                                                      \
        }                                                                                                          \
    }
M2T_COMBINE(m2t_combine, int32_t)
M2T_COMBINE(m2t_combine_f32, float)

/* The same for weights within int8 (one weight plane w, the format-7 entropy model):
 * products (2M, N) = [P_aw; P_bw] -> out: clamp(floor((256 P_aw + P_bw + offset_j) * scale_j)),
 * offset_j holding 128 sum_k w_jk (x = 256 a + b + 128) with the bias and the rounding half.
 * No row term: only the activation carries an offset. Exact as above (|256 P| < 2^32). */
#define M2T_COMBINE_ONE(name, type)                                                                                \
    M2T_CLONES void name(const type *products, int64_t M, int64_t N, const double *offset, const double *scale,     \
                         double limit, double *out, int64_t out_stride) {                                           \
        for (int64_t i = 0; i < M; i++) {                                                                          \
            const type *restrict aw = products + i * N, *restrict bw = products + (M + i) * N;                     \
            double *restrict o = out + i * out_stride;                                                             \
            for (int64_t j = 0; j < N; j++) {                                                                      \
                double acc = 256.0 * (double)aw[j] + (double)bw[j];                                                \
                o[j] = clampd(__builtin_floor((acc + offset[j]) * scale[j]), limit);                               \
            }                                                                                                      \
        }                                                                                                          \
    }
M2T_COMBINE_ONE(m2t_combine_one, int32_t)
M2T_COMBINE_ONE(m2t_combine_one_f32, float)

/* ------------------------------------------------------------------ the integer g_s */

/* The g_s kernels read and write blocks of pixels: B images of rows x cols pixels, each
 * pixel's values adjacent and each row's pixels one after another (a block of a channels-last
 * tensor: int8_conv._pixel_block gives the strides). Pixel (i, j) of image b of a block with
 * `ch` values a pixel is at base + b * image + i * row + j * ch. Threads take whole rows. */

/* Activation byte planes for oneDNN's uint8 convolution (int8_conv.plane_pack): float32
 * integers |x| <= 32639 (C a pixel) -> the high plane (x + 128) // 256 + 128 at hi and the
 * low plane (x + 128) mod 256 at lo, the two blocks with the same strides. */
struct pack_args { const float *x; int64_t x_row, n; uint8_t *hi, *lo; int64_t out_row; };

static M2T_CLONES void pack_range(const void *p, int64_t begin, int64_t end) {
    const struct pack_args *a = p;
    const int64_t n = a->n, x_row = a->x_row, out_row = a->out_row;  /* locals: the byte stores may alias *a */
    for (int64_t i = begin; i < end; i++) {
        const float *restrict xb = a->x + i * x_row;
        uint8_t *restrict hb = a->hi + i * out_row;
        uint8_t *restrict lb = a->lo + i * out_row;
        for (int64_t k = 0; k < n; k++) {
            int32_t v = (int32_t)xb[k] + 128;
            int32_t low = v & 255;                      /* two's complement: v mod 256 */
            hb[k] = (uint8_t)((v - low) / 256 + 128);  /* an exact multiple of 256 */
            lb[k] = (uint8_t)low;
        }
    }
}

void m2t_plane_pack(const float *x, int64_t x_image, int64_t x_row, int64_t B, int64_t rows, int64_t cols,
                    int64_t C, uint8_t *hi, uint8_t *lo, int64_t out_image, int64_t out_row, int64_t threads) {
    for (int64_t b = 0; b < B; b++) {
        struct pack_args a = {x + b * x_image, x_row, cols * C, hi + b * out_image, lo + b * out_image, out_row};
        parallel_for(rows, M2T_SHARE_VALUES / (cols * C + 1) + 1, pack_range, &a, threads);
    }
}

/* The rescaling of a convolution's plane products (int_synthesis._combine_into and, for
 * rows that all shift by 8 or more, _combine_products), clamped into out: the same float32
 * steps in the same order as those torch passes, each exact (or, where the float32 route
 * rounds beyond 2^24, rounded alike), so the same integers. raw: 2B images (the x_hi ones,
 * then the x_lo ones, `raw_image` apart) of planes R values a pixel as oneDNN returns them;
 * one weight plane: [x_hi w + f_lo | x_lo w + f_lo], two: [[hh, hl], [lh, ll]] on the rows.
 * out: B images of R values a pixel. A residual block's last convolution passes its input as
 * `residual` (out's strides, or NULL): then clamp(out + residual) into out, IntOps.conv_add
 * fused (integers below 2^16: the sum is exact). */
struct rescale_args {
    const float *raw_hi, *raw_lo;  /* image b's x_hi and x_lo products */
    int64_t raw_row, cols, R, planes;
    const float *lo_scale, *hi_scale, *delta, *scale, *b_int;
    float low, high;
    float *out;
    int64_t out_row;
    const float *residual;
};

static M2T_CLONES void rescale_range(const void *args, int64_t begin, int64_t end) {
    const struct rescale_args *a = args;
    const int64_t R = a->R, width = a->planes * R;  /* raw floats per pixel */
    const float *restrict lo_scale = a->lo_scale, *restrict hi_scale = a->hi_scale;
    const float *restrict delta = a->delta, *restrict scale = a->scale, *restrict b_int = a->b_int;
    const float low = a->low, high = a->high;
    const int64_t cols = a->cols, raw_row = a->raw_row, out_row = a->out_row, planes = a->planes;
    const float *raw_hi = a->raw_hi, *raw_lo = a->raw_lo, *residual = a->residual;
    float *out = a->out;
    for (int64_t i = begin; i < end; i++) {
        for (int64_t j = 0; j < cols; j++) {
            const float *restrict hi = raw_hi + i * raw_row + j * width;
            const float *restrict lo = raw_lo + i * raw_row + j * width;
            float *restrict o = out + i * out_row + j * R;
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
            if (residual) {
                const float *restrict x = residual + i * out_row + j * R;
                for (int64_t r = 0; r < R; r++)
                    o[r] = clampf(o[r] + x[r], low, high);
            }
        }
    }
}

void m2t_rescale_planes(const float *raw, int64_t raw_image, int64_t raw_row, int64_t B, int64_t rows,
                        int64_t cols, int64_t R, int64_t planes, const float *lo_scale, const float *hi_scale,
                        const float *delta, const float *scale, const float *b_int, float low, float high,
                        float *out, int64_t out_image, int64_t out_row, const float *residual, int64_t threads) {
    for (int64_t b = 0; b < B; b++) {
        struct rescale_args a = {raw + b * raw_image, raw + (B + b) * raw_image, raw_row, cols, R, planes,
                                 lo_scale, hi_scale, delta, scale, b_int, low, high, out + b * out_image, out_row,
                                 residual ? residual + b * out_image : 0};
        parallel_for(rows, M2T_SHARE_VALUES / (cols * R + 1) + 1, rescale_range, &a, threads);
    }
}

/* ------------------------------------------------------------------ the exact entropy model */

static inline int64_t floor_div(int64_t a, int64_t b) {  /* b > 0 */
    int64_t q = a / b;
    return q - ((a % b != 0) & (a < 0));
}

static inline int64_t clamp64(int64_t v, int64_t limit) {
    return v < -limit ? -limit : (v > limit ? limit : v);
}

/* exact.IntOps.layer_norm on rows of D float64 integers (|r| < 2^17): out (rows, D) float64.
 * mu = round(sum / D); d = r - mu; var = floor(2^16 sum d^2 / D) + eps; sigma = isqrt(var);
 * n = clamp(round(d 2^(e_n + 8) / sigma)); out = clamp(round((n gamma + beta) / 2^shift)),
 * rounding halves up, a negative shift multiplying. In int64 (sum d^2 2^16 < 2^60), but the
 * per-value division (the caller keeps 2^(19 + n_shift) below 2^50). */
M2T_CLONES void m2t_layer_norm(const double *r, int64_t rows, int64_t D, int64_t eps, int64_t n_shift,
                               const int16_t *gamma, const int64_t *beta, int64_t shift, int64_t limit, double *out) {
    /* The affine step's rounding right shift by `down` and left shift by `up` (one is 0), as
     * an add, an arithmetic shift and a multiply: GCC and Clang shift negatives arithmetically. */
    const int64_t down = shift > 0 ? shift : 0, up = shift < 0 ? -shift : 0;
    const int64_t half = down ? (int64_t)1 << (down - 1) : 0, times = (int64_t)1 << up;
    const double two_scale = (double)((int64_t)2 << n_shift), lim = (double)limit;
    for (int64_t i = 0; i < rows; i++) {
        const double *restrict x = r + i * D;
        double *restrict o = out + i * D;
        int64_t sum = 0, q = 0;
        for (int64_t j = 0; j < D; j++)
            sum += (int64_t)x[j];
        const int64_t mu = floor_div(2 * sum + D, 2 * D);
        for (int64_t j = 0; j < D; j++) {
            int64_t d = (int64_t)x[j] - mu;
            q += d * d;
        }
        const int64_t var = floor_div(q << 16, D) + eps;
        int64_t sigma = (int64_t)__builtin_sqrt((double)var);  /* within one of floor(sqrt(var)) */
        while (sigma * sigma > var)
            sigma--;
        while ((sigma + 1) * (sigma + 1) <= var)
            sigma++;
        /* round(d 2^n_shift / sigma) = floor((a + 1/2) / b), a = 2 d 2^n_shift + sigma, b = 2 sigma,
         * as a product by the rounded reciprocal of b: exact for |a| < 2^50 (the proof at
         * exact._floor_div_f64), and every step before it is exact on integers below 2^50. */
        const double inv = 1.0 / (double)(2 * sigma), m = (double)mu, sg = (double)sigma;
        for (int64_t j = 0; j < D; j++) {
            double n = clampd(__builtin_floor(((x[j] - m) * two_scale + sg + 0.5) * inv), lim);
            int64_t v = (((int64_t)n * gamma[j] + beta[j] + half) >> down) * times;
            o[j] = (double)clamp64(v, limit);
        }
    }
}

/* exact.Float64Ops.gelu: g (n,) float64 integers -> out: g above `half`, else the table's
 * entry at clamp(g + half, 0, 2 half) (the table starts at 0: GELU below -half is 0). */
M2T_CLONES void m2t_gelu(const double *g, int64_t n, const double *table, int64_t half, double *out) {
    for (int64_t k = 0; k < n; k++) {
        int64_t v = (int64_t)g[k];
        int64_t idx = v + half;
        idx = idx < 0 ? 0 : (idx > 2 * half ? 2 * half : idx);
        out[k] = v > half ? g[k] : table[idx];
    }
}

/* entropy_coding._probabilities: per symbol i, the mixture's cdf at its num_edges bin edges,
 * c_e = sum_k weight[i, k] table[start[i, k] + e], and out (n, num_edges + 1) float64 =
 * the differences of [0, c_0 .. c_{E-1}, total] plus the floor (total >> precision) + 1,
 * total = (sum_k weight[i, k]) << cdf_bits. Integers throughout. */
M2T_CLONES void m2t_mixture_pmf(const int32_t *table, const int64_t *start, const int32_t *weight, int64_t n,
                                int64_t K, int64_t num_edges, int64_t cdf_bits, int64_t precision, double *out) {
    const int64_t ahead = 8;  /* symbols: the runs are scattered over a table of megabytes */
    for (int64_t i = 0; i < n; i++) {
        const int64_t *s = start + i * K;
        const int32_t *w = weight + i * K;
        double *restrict o = out + i * (num_edges + 1);
        if (i + ahead < n)
            for (int64_t k = 0; k < K; k++)
                __builtin_prefetch(table + start[(i + ahead) * K + k]);
        int64_t total = 0;
        for (int64_t k = 0; k < K; k++)
            total += w[k];
        total <<= cdf_bits;
        const double floor_add = (double)((total >> precision) + 1);
        /* One pass over the edges: the cdf at edge e in int64 (below 2^30), and its difference
         * from the edge before (exact integers, whatever the order). */
        int64_t prev = 0;
        if (K == 3) { /* the shipped models' mixtures: 2x the generic loop (6.8 vs 14.9 ms a Kodak decode) */
            const int32_t *restrict r0 = table + s[0], *restrict r1 = table + s[1], *restrict r2 = table + s[2];
            const int64_t w0 = w[0], w1 = w[1], w2 = w[2];
            for (int64_t e = 0; e < num_edges; e++) {
                const int64_t cur = w0 * r0[e] + w1 * r1[e] + w2 * r2[e];
                o[e] = (double)(cur - prev) + floor_add;
                prev = cur;
            }
        } else {
            for (int64_t e = 0; e < num_edges; e++) {
                int64_t cur = 0;
                for (int64_t k = 0; k < K; k++)
                    cur += (int64_t)w[k] * table[s[k] + e];
                o[e] = (double)(cur - prev) + floor_add;
                prev = cur;
            }
        }
        o[num_edges] = (double)(total - prev) + floor_add;
    }
}

static inline int64_t floor_div_signed(int64_t a, int64_t b) { /* b != 0, either sign (numpy's //) */
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

/* entropy_coding._coding_batches' plan, from the snapped parameters mean_q, level, weight
 * (n, K) int64: each symbol's center (the mixture mean in integers, rounded half up) and
 * radius class (the first of classes[] that covers the reach of every component with weight,
 * else the last); then the symbols grouped by class, ascending within a class (a counting
 * sort): counts (n_classes) per class, order (n) the symbols, and per grouped symbol its
 * center, and per component the start of its run in the flattened phase-split table and its
 * weight as int32 (what m2t_mixture_pmf reads). scratch: 2n int64. Integers throughout, the
 * steps of entropy_coding's numpy passes. Returns 0, or -1 where a level is outside the
 * table or there are over 64 classes (nothing is read or written out of bounds). */
M2T_CLONES int m2t_coding_plan(const int64_t *mean_q, const int64_t *level, const int64_t *weight, int64_t n,
                               int64_t K, const int64_t *support_radius, int64_t levels, const int64_t *classes,
                               int64_t n_classes, int64_t mean_steps, int64_t half_width, int64_t margin,
                               int64_t row_len, int64_t *scratch, int64_t *counts, int64_t *order, int64_t *center,
                               int64_t *start, int32_t *weight_out) {
    int64_t *cls = scratch, *mid = scratch + n; /* per symbol: class and center */
    int64_t next[64];
    if (n_classes < 1 || n_classes > 64)
        return -1;
    for (int64_t c = 0; c < n_classes; c++)
        counts[c] = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t *m = mean_q + i * K, *l = level + i * K, *w = weight + i * K;
        int64_t total = 0, num = 0;
        for (int64_t k = 0; k < K; k++) {
            if (l[k] < 0 || l[k] >= levels)
                return -1;
            total += w[k];
            num += w[k] * m[k];
        }
        const int64_t den = total * mean_steps;
        const int64_t c = den ? floor_div_signed(2 * num + den, 2 * den) : 0; /* numpy's x // 0 is 0 */
        int64_t reach = 0;
        for (int64_t k = 0; k < K; k++) {
            if (w[k] > 0) {
                const int64_t d = floor_div(m[k] - c * mean_steps, mean_steps);
                const int64_t r = support_radius[l[k]] + (d < 0 ? -d : d);
                reach = r > reach ? r : reach;
            }
        }
        int64_t cl = 0;
        while (cl < n_classes - 1 && classes[cl] < reach)
            cl++;
        cls[i] = cl;
        mid[i] = c;
        counts[cl]++;
    }
    for (int64_t c = 0, at = 0; c < n_classes; c++) {
        next[c] = at;
        at += counts[c];
    }
    const int64_t lo = -half_width - margin;
    for (int64_t i = 0; i < n; i++) {
        const int64_t j = next[cls[i]]++, c = mid[i], radius = classes[cls[i]];
        order[j] = i;
        center[j] = c;
        const int64_t first_edge = (c - radius) * mean_steps - mean_steps / 2;
        for (int64_t k = 0; k < K; k++) {
            int64_t rel = first_edge - mean_q[i * K + k];
            rel = (rel < lo ? lo : (rel > half_width ? half_width : rel)) + half_width + margin; /* >= 0 */
            start[j * K + k] = (level[i * K + k] * mean_steps + rel % mean_steps) * row_len + rel / mean_steps;
            weight_out[j * K + k] = (int32_t)weight[i * K + k];
        }
    }
    return 0;
}

/* exact.Float64Ops.attention's weights, in place: each row of scores (rows, Tk) float64 (the
 * exact products q k^T) becomes s = floor(score * multiplier + 1/2) (exact: the multiplier
 * has 15 significant bits), -2^40 where valid (T, Tk) is 0 (NULL: all valid; row i is query
 * i mod T), then the exp table's entry at min(max_j s_j - s, table_last), and den (rows,) is
 * the row's sum (integers below 2^53). */
static inline double attention_score(const double *s, const uint8_t *ok, int64_t j, double multiplier) {
    double v = __builtin_floor(s[j] * multiplier + 0.5);
    return (ok && !ok[j]) ? -1099511627776.0 : v;  /* masked: -2^40 */
}

static inline double attention_weight(double top, double score, const double *table, int64_t table_last) {
    double gap = top - score;
    return table[gap < (double)table_last ? (int64_t)gap : table_last];
}

M2T_CLONES void m2t_softmax_weights(double *scores, int64_t rows, int64_t T, int64_t Tk, double multiplier,
                                    const uint8_t *valid, const double *table, int64_t table_last, double *den) {
    /* The row's maximum and sum run in 8 lanes (one vector): a single chain of float64 steps
     * waits on each, and the compiler may not reorder them. A maximum does not depend on the
     * order, nor does a sum whose terms and partial sums are all integers below 2^53. */
    const int64_t body = Tk - Tk % 8;
    for (int64_t i = 0; i < rows; i++) {
        double *s = scores + i * Tk;
        const uint8_t *ok = valid ? valid + (i % T) * Tk : 0;
        double lane[8];
        for (int l = 0; l < 8; l++)
            lane[l] = -1099511627776.0;
        for (int64_t j0 = 0; j0 < body; j0 += 8)
            for (int l = 0; l < 8; l++) {
                s[j0 + l] = attention_score(s, ok, j0 + l, multiplier);
                lane[l] = s[j0 + l] > lane[l] ? s[j0 + l] : lane[l];
            }
        for (int64_t j = body; j < Tk; j++) {
            s[j] = attention_score(s, ok, j, multiplier);
            lane[0] = s[j] > lane[0] ? s[j] : lane[0];
        }
        double top = lane[0];
        for (int l = 1; l < 8; l++)
            top = lane[l] > top ? lane[l] : top;
        for (int l = 0; l < 8; l++)
            lane[l] = 0.0;
        for (int64_t j0 = 0; j0 < body; j0 += 8)
            for (int l = 0; l < 8; l++) {
                s[j0 + l] = attention_weight(top, s[j0 + l], table, table_last);
                lane[l] += s[j0 + l];
            }
        for (int64_t j = body; j < Tk; j++) {
            s[j] = attention_weight(top, s[j], table, table_last);
            lane[0] += s[j];
        }
        den[i] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    }
}

/* round(num / den) halves up, (rows, n) float64 integers by den (rows,) > 0: attention's
 * output. As exact._floor_div_f64 does it, floor((a + 1/2) / b) with a = 2 num + den and
 * b = 2 den: a correctly rounded division of values below 2^50 (here |num| < 2^40, den <
 * 2^24), whose floor is exact (the proof is in that function's docstring); vectorised, where
 * an int64 division per value is not. */
M2T_CLONES void m2t_round_div_rows(const double *num, int64_t rows, int64_t n, const double *den, double *out) {
    for (int64_t i = 0; i < rows; i++) {
        const double d = den[i], b = 2.0 * d;
        for (int64_t j = 0; j < n; j++)
            out[i * n + j] = __builtin_floor((2.0 * num[i * n + j] + d + 0.5) / b);
    }
}

/* int_synthesis.IntOps.gate over n values of equal layout: clamp(x + floor((table[m + half] t
 * + 2^(bits-1)) 2^-bits), +-limit), float32 integers, the same steps in the same order (every
 * result exact: |table t| < 2^23). */
struct gate_args { const float *x, *t, *m, *table; int64_t half; float round_half, scale, limit; float *out; };

static M2T_CLONES void gate_range(const void *p, int64_t begin, int64_t end) {
    const struct gate_args *a = p;
    const float *restrict x = a->x, *restrict t = a->t, *restrict m = a->m, *restrict table = a->table;
    float *restrict out = a->out;
    const float round_half = a->round_half, scale = a->scale, limit = a->limit;
    for (int64_t k = begin; k < end; k++) {
        float g = __builtin_floorf((table[(int64_t)m[k] + a->half] * t[k] + round_half) * scale);
        float v = x[k] + g;
        v = v < -limit ? -limit : v;
        out[k] = v > limit ? limit : v;
    }
}

void m2t_gate(const float *x, const float *t, const float *m, int64_t n, const float *table, int64_t half,
              int64_t bits, float limit, float *out, int64_t threads) {
    struct gate_args a = {x, t, m, table, half, (float)((int64_t)1 << (bits - 1)),
                          1.0f / (float)((int64_t)1 << bits), limit, out};
    parallel_for(n, M2T_SHARE_VALUES, gate_range, &a, threads);
}

/* ------------------------------------------------------------------ weights' fingerprints */

/* model._bit_sum: the sum, mod 2^64, of n bytes read as uint32 words in the host's order (the
 * caller checks that it is little-endian) where n is a multiple of 4, else as bytes: the
 * same integer as its numpy form. */
M2T_CLONES uint64_t m2t_word_sum(const uint8_t *restrict p, int64_t n) {
    uint64_t sum = 0;
    if (n % 4 == 0) {
        for (int64_t i = 0; i < n; i += 4) {
            uint32_t word;
            __builtin_memcpy(&word, p + i, 4);  /* any alignment */
            sum += word;
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            sum += p[i];
    }
    return sum;
}
