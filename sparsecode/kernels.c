/* sparsecode's compiled CPU loops: one signal at a time, its state in cache.
 *
 * sparsecode/native.py compiles this file on first use with the system's C compiler for the machine it
 * runs on and calls it through ctypes. Each function handles a block of n signals (rows) and uses no
 * threads of its own: the encoders call it from worker threads, one block per call (ctypes releases the
 * GIL), so a core taken by another process slows only its own blocks. Matrices are dense and row-major.
 *
 * The pursuits follow encoders/greedy.py's batched torch kernels step for step (the same picks, ties
 * going to the first index) and the lasso's working sets follow encoders/iterative.py's
 * proximal_gradient on per-signal Gram blocks; the tests hold both to the same answers.
 *
 * The file instantiates itself (it includes itself once per type): REAL is the type of the signals'
 * state, ATOM that of the atoms, SUF the suffix of the exported names.
 */
#ifndef REAL

#include <stdint.h>
#include <tgmath.h>      /* fabs, sqrt and copysign of the argument's own type */
#include <stdlib.h>
#include <string.h>
#include <float.h>

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUF)

/* The version native.py checks, so that a stale build in the cache is never called. */
int sparsecode_kernels_version(void) { return 1; }

#define REAL float
#define ATOM float
#define SUF f32
#define PURSUITS
#include "kernels.c"
#undef PURSUITS
#undef SUF
#undef ATOM
#undef REAL

#define REAL double
#define ATOM double
#define SUF f64
#define PURSUITS
#include "kernels.c"
#undef PURSUITS
#undef SUF
#undef ATOM
#undef REAL

/* float32 atoms, float64 state: the lasso's working sets that moved to float64 read the input's atoms
 * without a float64 copy (a product of two float32 numbers is exact in float64). */
#define REAL double
#define ATOM float
#define SUF f32f64
#include "kernels.c"
#undef SUF
#undef ATOM
#undef REAL

#else  /* the body, once per type */

#ifdef PURSUITS

/* Index of the largest |a[t]| * scale[t] (scale NULL: 1), the first one on ties. The maximum is found
 * first (a vectorised reduction), then its first position. */
static int64_t FN(argmax_abs)(const REAL* a, const REAL* scale, int64_t N) {
    REAL best = -1;
    if (scale) {
        #pragma omp simd reduction(max:best)
        for (int64_t t = 0; t < N; t++) { REAL s = fabs(a[t]) * scale[t]; best = s > best ? s : best; }
        for (int64_t t = 0; t < N; t++) if (fabs(a[t]) * scale[t] == best) return t;
    } else {
        #pragma omp simd reduction(max:best)
        for (int64_t t = 0; t < N; t++) { REAL s = fabs(a[t]); best = s > best ? s : best; }
        for (int64_t t = 0; t < N; t++) if (fabs(a[t]) == best) return t;
    }
    return 0;
}

/* a -= sum_m c[m] * gram[rows[m]] for m < count: four rows per pass over a, so a is read and written
 * once for every four rows of the Gram matrix it takes in. */
static void FN(subtract_rows)(REAL* restrict a, const REAL* gram, int64_t N, const int64_t* rows,
                              const REAL* c, int64_t count) {
    int64_t m = 0;
    for (; m + 4 <= count; m += 4) {
        const REAL *r0 = gram + rows[m] * N, *r1 = gram + rows[m + 1] * N;
        const REAL *r2 = gram + rows[m + 2] * N, *r3 = gram + rows[m + 3] * N;
        REAL c0 = c[m], c1 = c[m + 1], c2 = c[m + 2], c3 = c[m + 3];
        #pragma omp simd
        for (int64_t t = 0; t < N; t++) a[t] -= c0 * r0[t] + c1 * r1[t] + c2 * r2[t] + c3 * r3[t];
    }
    if (count - m == 3) {
        const REAL *r0 = gram + rows[m] * N, *r1 = gram + rows[m + 1] * N, *r2 = gram + rows[m + 2] * N;
        REAL c0 = c[m], c1 = c[m + 1], c2 = c[m + 2];
        #pragma omp simd
        for (int64_t t = 0; t < N; t++) a[t] -= c0 * r0[t] + c1 * r1[t] + c2 * r2[t];
    } else if (count - m == 2) {
        const REAL *r0 = gram + rows[m] * N, *r1 = gram + rows[m + 1] * N;
        REAL c0 = c[m], c1 = c[m + 1];
        #pragma omp simd
        for (int64_t t = 0; t < N; t++) a[t] -= c0 * r0[t] + c1 * r1[t];
    } else if (count - m == 1) {
        const REAL* r0 = gram + rows[m] * N;
        REAL c0 = c[m];
        #pragma omp simd
        for (int64_t t = 0; t < N; t++) a[t] -= c0 * r0[t];
    }
}

/* Batch OMP from the Gram matrix (encoders/greedy.py: omp_chunk), signal by signal.
 * alpha (n, N): x D^T, overwritten. gram (N, N), diag (N): its diagonal. scale (N) or NULL: 1/||d_i||
 * where atoms are not unit norm. unexplained (n) or NULL: squared residual norm each signal may stop at.
 * eps: the relative squared distance to the span below which a pick does not count.
 * Out: idx (n, k) the picks, coef (n, k) their coefficients. Returns 0, or -1 when out of memory. */
int FN(omp_gram)(int64_t n, int64_t N, int64_t k, REAL* alpha, const REAL* gram, const REAL* diag,
                 const REAL* scale, const REAL* unexplained, REAL eps, int64_t* idx, REAL* coef) {
    /* inv: L^-1 row by row (lower triangular), L: the Cholesky factor of the picks' Gram matrix,
     * u: x in the orthonormal basis, w: the new atom's coordinates on it, g: its Gram entries, v: the
     * step's update coefficients */
    REAL* work = malloc(sizeof(REAL) * (2 * k * k + 4 * k));
    if (!work) return -1;
    REAL *inv = work, *L = inv + k * k, *u = L + k * k, *w = u + k, *g = w + k, *v = g + k;
    for (int64_t i = 0; i < n; i++) {
        REAL* a = alpha + i * N;
        int64_t* id = idx + i * k;
        REAL remaining = unexplained ? unexplained[i] : 1;
        memset(inv, 0, sizeof(REAL) * k * k);
        memset(L, 0, sizeof(REAL) * k * k);
        for (int64_t j = 0; j < k; j++) {
            int64_t p = FN(argmax_abs)(a, scale, N);
            for (int64_t m = 0; m < j; m++) g[m] = gram[id[m] * N + p];
            REAL ww = 0;
            for (int64_t r = 0; r < j; r++) {          /* w = L^-1 g */
                REAL s = 0;
                for (int64_t c = 0; c <= r; c++) s += inv[r * k + c] * g[c];
                w[r] = s;
                ww += s * s;
            }
            REAL norm2 = diag[p] - ww;
            int ok = norm2 > eps * diag[p] && (!unexplained || remaining > 0);
            REAL d_jj = ok ? sqrt(norm2 > eps ? norm2 : eps) : 1;
            id[j] = p;
            for (int64_t c = 0; c < j; c++) L[j * k + c] = ok ? w[c] : 0;
            L[j * k + j] = d_jj;
            REAL u_j = ok ? a[p] / d_jj : 0;
            u[j] = u_j;
            remaining -= u_j * u_j;
            if (j == k - 1) break;                     /* the last pick needs no residual update */
            /* row j of L^-1: (e_j - sum_m w_m L^-1[m]) / L[j, j]; zero for an atom that does not count */
            REAL inv_jj = ok ? 1 / d_jj : 0;
            for (int64_t c = 0; c < j; c++) {
                REAL s = 0;
                for (int64_t r = c; r < j; r++) s += w[r] * inv[r * k + c];
                inv[j * k + c] = -s * inv_jj;
            }
            inv[j * k + j] = inv_jj;
            /* the correlations fall by u_j D q_j, q_j = sum_m L^-1[j, m] d_(s_m) */
            for (int64_t m = 0; m <= j; m++) v[m] = inv[j * k + m] * u_j;
            FN(subtract_rows)(a, gram, N, id, v, j + 1);
        }
        /* the codes solve L^T gamma = u */
        REAL* cf = coef + i * k;
        for (int64_t r = k - 1; r >= 0; r--) {
            REAL s = u[r];
            for (int64_t m = r + 1; m < k; m++) s -= L[m * k + r] * cf[m];
            cf[r] = s / L[r * k + r];
        }
    }
    free(work);
    return 0;
}

/* Matching pursuit from the Gram matrix (encoders/greedy.py: mp_chunk): k steps added into codes (n, N),
 * alpha (n, N) holding x D^T and overwritten with the final residual correlations. */
int FN(mp_gram)(int64_t n, int64_t N, int64_t k, REAL* alpha, const REAL* gram, const REAL* diag,
                const REAL* scale, const REAL* unexplained, REAL* codes) {
    for (int64_t i = 0; i < n; i++) {
        REAL* a = alpha + i * N;
        REAL* z = codes + i * N;
        REAL remaining = unexplained ? unexplained[i] : 1;
        for (int64_t j = 0; j < k; j++) {
            int64_t p = FN(argmax_abs)(a, scale, N);
            REAL step = a[p] / diag[p];
            if (unexplained) {
                step = remaining > 0 ? step : 0;
                remaining -= step * step * diag[p];
            }
            z[p] += step;
            FN(subtract_rows)(a, gram, N, &p, &step, 1);
        }
    }
    return 0;
}

/* Gradient pursuit from the Gram matrix (encoders/greedy.py: gp_chunk): k steps added into codes (n, N);
 * alpha (n, N) holds x D^T and is overwritten. Each step adds the unselected atom of largest score and
 * takes the exact line-search step along the support's gradient g: codes += a g, alpha -= a g G with
 * a = ||g||^2 / (g G_support g). Returns 0, or -1 when out of memory. */
int FN(gp_gram)(int64_t n, int64_t N, int64_t k, REAL* alpha, const REAL* gram, const REAL* diag,
                const REAL* scale, const REAL* unexplained, REAL* codes) {
    (void)diag;
    REAL* work = malloc(sizeof(REAL) * (N + 2 * k));
    int64_t* support = malloc(sizeof(int64_t) * k);
    if (!work || !support) { free(work); free(support); return -1; }
    REAL *gG = work, *g = gG + N, *kept = g + k;
    const REAL tiny = sizeof(REAL) == 4 ? FLT_MIN : DBL_MIN;
    for (int64_t i = 0; i < n; i++) {
        REAL* a = alpha + i * N;
        REAL* z = codes + i * N;
        REAL remaining = unexplained ? unexplained[i] : 1;
        for (int64_t j = 0; j < k; j++) {
            /* an atom is selected once: score the selected 0 while searching (every score is >= 0), and
             * where the best score is 0 take the first unselected atom, as a score of -1 would */
            for (int64_t m = 0; m < j; m++) { kept[m] = a[support[m]]; a[support[m]] = 0; }
            int64_t p = FN(argmax_abs)(a, scale, N);
            int none = (scale ? fabs(a[p]) * scale[p] : fabs(a[p])) == 0;
            for (int64_t m = 0; m < j; m++) a[support[m]] = kept[m];
            for (int64_t t = 0; none && t < N; t++) {
                int selected = 0;
                for (int64_t m = 0; m < j; m++) selected |= support[m] == t;
                if (!selected) { p = t; none = 0; }
            }
            support[j] = p;
            int live = !unexplained || remaining > 0;
            REAL gg = 0;
            for (int64_t m = 0; m <= j; m++) { g[m] = live ? a[support[m]] : 0; gg += g[m] * g[m]; }
            memset(gG, 0, sizeof(REAL) * N);
            for (int64_t m = 0; m <= j; m++) g[m] = -g[m];      /* subtract_rows subtracts */
            FN(subtract_rows)(gG, gram, N, support, g, j + 1);
            for (int64_t m = 0; m <= j; m++) g[m] = -g[m];
            REAL curvature = 0;
            for (int64_t m = 0; m <= j; m++) curvature += g[m] * gG[support[m]];
            REAL step = curvature > tiny ? gg / curvature : 0;
            for (int64_t m = 0; m <= j; m++) z[support[m]] += step * g[m];
            #pragma omp simd
            for (int64_t t = 0; t < N; t++) a[t] -= step * gG[t];
            if (unexplained) remaining -= step * gg;
        }
    }
    free(work);
    free(support);
    return 0;
}

#endif  /* PURSUITS */

/* ACC: the type dot products are summed in, REAL's (float32 sets sum as torch's float32 products do;
 * float64 sets of float32 atoms sum exact products in double). */
#undef ACC
#define ACC REAL

static ACC FN(dot_signal)(const ATOM* a, const REAL* x, int64_t d) {
    ACC s = 0;
    #pragma omp simd reduction(+:s)
    for (int64_t t = 0; t < d; t++) s += (ACC)a[t] * (ACC)x[t];
    return s;
}

/* Q = A A^T for the w atoms of a working set (rows set[] of atoms, d wide; Q's rows ld apart). Tiles of
 * 4 x 4 dot products share their loads: each pass over t reads 8 rows for 16 products. */
static void FN(set_gram)(const ATOM* atoms, const int64_t* set, int64_t w, int64_t d, REAL* Q, int64_t ld) {
    int64_t full = w - w % 4;
    for (int64_t p = 0; p < full; p += 4) {
        const ATOM *a0 = atoms + set[p] * d, *a1 = atoms + set[p + 1] * d;
        const ATOM *a2 = atoms + set[p + 2] * d, *a3 = atoms + set[p + 3] * d;
        for (int64_t q = p; q < full; q += 4) {
            const ATOM *b0 = atoms + set[q] * d, *b1 = atoms + set[q + 1] * d;
            const ATOM *b2 = atoms + set[q + 2] * d, *b3 = atoms + set[q + 3] * d;
            ACC s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
            ACC s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
            #pragma omp simd reduction(+:s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
            for (int64_t t = 0; t < d; t++) {
                ACC x0 = a0[t], x1 = a1[t], x2 = a2[t], x3 = a3[t];
                ACC y0 = b0[t], y1 = b1[t], y2 = b2[t], y3 = b3[t];
                s00 += x0 * y0; s01 += x0 * y1; s02 += x0 * y2; s03 += x0 * y3;
                s10 += x1 * y0; s11 += x1 * y1; s12 += x1 * y2; s13 += x1 * y3;
                s20 += x2 * y0; s21 += x2 * y1; s22 += x2 * y2; s23 += x2 * y3;
                s30 += x3 * y0; s31 += x3 * y1; s32 += x3 * y2; s33 += x3 * y3;
            }
            ACC tile[16] = {s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33};
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) Q[(p + i) * ld + q + j] = Q[(q + j) * ld + p + i] = (REAL)tile[4 * i + j];
        }
    }
    /* the last w % 4 rows against every row */
    for (int64_t p = full; p < w; p++) {
        const ATOM* ap = atoms + set[p] * d;
        for (int64_t q = 0; q <= p; q++) {
            const ATOM* bq = atoms + set[q] * d;
            ACC s = 0;
            #pragma omp simd reduction(+:s)
            for (int64_t t = 0; t < d; t++) s += (ACC)ap[t] * (ACC)bq[t];
            Q[p * ld + q] = Q[q * ld + p] = (REAL)s;
        }
    }
}

/* Entries of REAL in a 64-byte vector: a working set's rows are padded to a multiple of it. */
#undef VB
#define VB ((int64_t)(64 / sizeof(REAL)))

/* out[a0 .. a0 + n) of Q y, summed in n registers' worth of locals across Q's rows (a sum kept in out
 * itself would wait on its own store every row). */
#define APPLY_SPAN(n)                                                                              \
    do {                                                                                           \
        REAL acc[n];                                                                               \
        for (int64_t j = 0; j < (n); j++) acc[j] = 0;                                              \
        for (int64_t b = 0; b < w; b++) {                                                          \
            REAL yb = y[b];                                                                        \
            if (yb == 0) continue;                                                                 \
            const REAL* q = Q + b * ld + a0;                                                       \
            _Pragma("omp simd")                                                                    \
            for (int64_t j = 0; j < (n); j++) acc[j] += yb * q[j];                                 \
        }                                                                                          \
        for (int64_t j = 0; j < (n); j++) out[a0 + j] = acc[j];                                    \
    } while (0)

/* out = Q y for a symmetric w x w block Q whose rows are ld apart (ld a multiple of VB, the padding
 * zero; encoders/iterative.py: _apply), as a sum of Q's rows scaled by y's entries: no reduction across
 * a vector, and the iterate's zeros (most of it, after the soft threshold) are skipped. */
static void FN(apply)(const REAL* Q, const REAL* y, REAL* restrict out, int64_t w, int64_t ld) {
    for (int64_t a0 = 0; a0 < ld; a0 += 4 * VB) {
        switch ((ld - a0 < 4 * VB ? ld - a0 : 4 * VB) / VB) {
            case 1: APPLY_SPAN(VB); break;
            case 2: APPLY_SPAN(2 * VB); break;
            case 3: APPLY_SPAN(3 * VB); break;
            default: APPLY_SPAN(4 * VB); break;
        }
    }
}

/* The lasso on each signal's working set by (accelerated) proximal gradient, as
 * encoders/iterative.py's _iterate_sets does it with torch operations:
 * minimise 0.5 z Q z^T - b z^T + lam ||z||_1 over the set's w atoms, with Q = A A^T and b = A x for the
 * set's atoms A, or gathered from gram (N, N) and bmat rows brow[i] (with gram).
 * The step is 1/L for the block's largest eigenvalue L (20 power iterations, 10% margin, at most
 * `bound`). Every check_every iterations (and at the budget) a signal stops once its stopping quantity
 * is at most tol[i]: with gap_criterion the relative duality gap of the set's lasso (xx[i] = ||x||^2),
 * else the relative step; with leave_unresolvable it also stops, unmet, when tol[i] lies below the gap
 * REAL resolves.
 * In/out: z (m, w), the warm start and the answer. Out: iters (m), met (m), and r (m, d) = x - z A.
 * Returns 0, or -1 when out of memory. */
int FN(lasso_sets)(int64_t m, int64_t d, int64_t N, int64_t w, const REAL* x, const ATOM* atoms,
                   const REAL* gram, const REAL* bmat, const int64_t* brow, const int64_t* W, REAL* z,
                   const int64_t* budget, const REAL* tol, const REAL* xx, REAL bound, REAL lam,
                   int positive, int momentum, int restart, int gap_criterion, int64_t check_every,
                   int leave_unresolvable, int64_t* iters, uint8_t* met, REAL* r) {
    const int64_t ld = (w + VB - 1) / VB * VB;     /* Q's rows and the vectors, padded with zeros */
    REAL* work = calloc((size_t)(ld * ld + 7 * ld), sizeof(REAL));
    double* acc = malloc(sizeof(double) * d);
    if (!work || !acc) { free(work); free(acc); return -1; }
    REAL *Q = work, *b = Q + ld * ld, *y = b + ld, *zn = y + ld, *g = zn + ld, *v = g + ld, *qv = v + ld;
    REAL *delta = qv + ld;
    const REAL tiny = sizeof(REAL) == 4 ? FLT_MIN : DBL_MIN;
    const REAL eps = sizeof(REAL) == 4 ? FLT_EPSILON : DBL_EPSILON;
    for (int64_t i = 0; i < m; i++) {
        const int64_t* set = W + i * w;
        const REAL* xi = x + i * d;
        REAL* zi = z + i * w;
        /* the set's Gram block and right-hand side */
        if (gram) {
            for (int64_t p = 0; p < w; p++) {
                const REAL* row = gram + set[p] * N;
                for (int64_t q = p; q < w; q++) Q[p * ld + q] = Q[q * ld + p] = row[set[q]];
                b[p] = bmat[brow[i] * N + set[p]];
            }
        } else {
            FN(set_gram)(atoms, set, w, d, Q, ld);
            for (int64_t p = 0; p < w; p++) b[p] = (REAL)FN(dot_signal)(atoms + set[p] * d, xi, d);
        }
        /* the step 1/L (encoders/iterative.py: _block_lipschitz), by power iteration started from
         * 1 + frac(p / golden ratio), as _power_start there: ones can be orthogonal to the top
         * eigenvector */
        for (int64_t p = 0; p < w; p++) {
            double f = (double)p * 0.6180339887498949;
            v[p] = (REAL)(1 + (f - floor(f)));
        }
        for (int s = 0; s < 20; s++) {
            FN(apply)(Q, v, qv, w, ld);
            REAL nrm = 0;
            for (int64_t p = 0; p < w; p++) nrm += qv[p] * qv[p];
            nrm = sqrt(nrm);
            nrm = nrm > tiny ? nrm : tiny;
            for (int64_t p = 0; p < w; p++) v[p] = qv[p] / nrm;
        }
        FN(apply)(Q, v, qv, w, ld);
        REAL rayleigh = 0;
        for (int64_t p = 0; p < w; p++) rayleigh += qv[p] * v[p];
        REAL lip = 1.1 * rayleigh < bound ? (REAL)(1.1 * rayleigh) : bound;
        REAL step = 1 / (lip > tiny ? lip : bound);
        REAL threshold = lam * step;
        /* iterate (encoders/iterative.py: proximal_gradient) */
        int64_t it = 0, limit = budget[i];
        int ok = 0;
        if (limit > 0) {
            memcpy(y, zi, sizeof(REAL) * w);
            REAL t = 1;
            int64_t next_check = check_every < limit ? check_every : limit;
            for (;;) {
                it++;
                FN(apply)(Q, y, g, w, ld);
                for (int64_t p = 0; p < w; p++) {
                    REAL u = y[p] - step * (g[p] - b[p]);
                    REAL s = positive ? (u - threshold > 0 ? u - threshold : 0)
                                      : (fabs(u) - threshold > 0 ? copysign(fabs(u) - threshold, u) : 0);
                    zn[p] = s;
                    delta[p] = s - zi[p];
                }
                if (momentum) {
                    if (restart) {
                        REAL uphill = 0;
                        for (int64_t p = 0; p < w; p++) uphill += (y[p] - zn[p]) * delta[p];
                        if (uphill > 0) t = 1;
                    }
                    REAL t_next = (1 + sqrt(1 + 4 * t * t)) / 2;
                    REAL c = (t - 1) / t_next;
                    for (int64_t p = 0; p < w; p++) y[p] = zn[p] + c * delta[p];
                    t = t_next;
                } else {
                    memcpy(y, zn, sizeof(REAL) * w);
                }
                memcpy(zi, zn, sizeof(REAL) * w);
                if (it < next_check) continue;
                int stop;
                if (gap_criterion) {
                    /* encoders/iterative.py: _subproblem_gap and _relative_gap */
                    FN(apply)(Q, zi, qv, w, ld);
                    REAL l1 = 0, zb = 0, zqz = 0, worst = positive ? -INFINITY : 0, zcorr = 0;
                    for (int64_t p = 0; p < w; p++) {
                        REAL corr = b[p] - qv[p];
                        l1 += fabs(zi[p]);
                        zb += zi[p] * b[p];
                        zqz += zi[p] * qv[p];
                        zcorr += zi[p] * corr;
                        REAL c = positive ? corr : fabs(corr);
                        worst = c > worst ? c : worst;
                    }
                    REAL rr = xx[i] - 2 * zb + zqz;
                    rr = rr > 0 ? rr : 0;
                    REAL primal = (REAL)0.5 * rr + lam * l1;
                    primal = primal > tiny ? primal : tiny;
                    REAL floor_gap = 4 * eps * xx[i] / primal;
                    REAL s = lam / (worst > tiny ? worst : tiny);
                    s = s < 1 ? s : 1;
                    REAL gap = ((REAL)0.5 * (1 - s) * (1 - s) * rr + lam * l1 - s * zcorr) / primal;
                    ok = gap <= tol[i];
                    stop = ok || (leave_unresolvable && floor_gap > tol[i]);
                } else {
                    REAL dd = 0, zz = 0;
                    for (int64_t p = 0; p < w; p++) { dd += delta[p] * delta[p]; zz += zi[p] * zi[p]; }
                    zz = sqrt(zz);
                    ok = sqrt(dd) <= tol[i] * (zz > tiny ? zz : tiny);
                    stop = ok;
                }
                if (stop || it >= limit) break;
                next_check = it + check_every < limit ? it + check_every : limit;
            }
        }
        iters[i] = it;
        met[i] = (uint8_t)ok;
        /* the residual, summed in double from the set's own atoms */
        for (int64_t t = 0; t < d; t++) acc[t] = xi[t];
        for (int64_t p = 0; p < w; p++) {
            double c = zi[p];
            if (c == 0) continue;
            const ATOM* ap = atoms + set[p] * d;
            #pragma omp simd
            for (int64_t t = 0; t < d; t++) acc[t] -= c * (double)ap[t];
        }
        REAL* ri = r + i * d;
        for (int64_t t = 0; t < d; t++) ri[t] = (REAL)acc[t];
    }
    free(work);
    free(acc);
    return 0;
}

/* A round's check (encoders/iterative.py: _Checker._recheck): for each row i of corr (m, N), the
 * product of residual r_i with every atom in a coarser type (corr_bf16: bfloat16 bit patterns, else
 * float32), the largest correlation the dual constraint bounds (one-sided with positive), computed
 * exactly in REAL from the atoms whose coarse value reaches cut[i]. A row with more than max_near such
 * atoms is marked crowded (its caller takes a whole product instead) and its worst left undefined. */
int FN(recheck)(int64_t m, int64_t N, int64_t d, const void* corr, int corr_bf16, const ATOM* atoms,
                const REAL* r, const REAL* cut, int positive, int64_t max_near, REAL* worst, uint8_t* crowded) {
    for (int64_t i = 0; i < m; i++) {
        const REAL* ri = r + i * d;
        REAL best = positive ? -INFINITY : 0;
        int64_t near = 0;
        crowded[i] = 0;
        for (int64_t t = 0; t < N; t++) {
            float c;
            if (corr_bf16) {
                uint32_t bits = (uint32_t)((const uint16_t*)corr)[i * N + t] << 16;
                memcpy(&c, &bits, sizeof c);
            } else {
                c = ((const float*)corr)[i * N + t];
            }
            if (!(positive ? c >= cut[i] : fabs(c) >= cut[i])) continue;
            if (++near > max_near) { crowded[i] = 1; break; }
            REAL e = FN(dot_signal)(atoms + t * d, ri, d);
            e = positive ? e : fabs(e);
            best = e > best ? e : best;
        }
        worst[i] = best;
    }
    return 0;
}

#endif
