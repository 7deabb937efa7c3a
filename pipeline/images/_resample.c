/*
 * Exact, vectorised re-implementation of Pillow's 8-bit separable resampling (Resample.c),
 * fused with what LLaVA's preprocessing does around it: expand2square padding, a center-crop
 * window, and the HWC -> CHW layout change.
 *
 * Bit-identical to ``Image.resize(size, filter)`` on RGB images (reducing_gap=None, no box):
 *   - the same filter weights, computed in double precision by the same expressions and
 *     converted to the same 22-bit fixed-point integers (build with -ffp-contract=off so that no
 *     multiply-add is fused: the doubles must round exactly as in Pillow's build);
 *   - the same two passes through a uint8 intermediate, in the order the caller gives (Pillow
 *     picks it from the sizes), each output = clip8((2^21 + sum pixel * weight) >> 22).
 * Integer sums are exact whatever their order, so the passes can run many pixels at once:
 *   - the vertical pass runs along contiguous rows, 32 bytes at a time;
 *   - the horizontal pass runs on blocks of 16 rows transposed so that one input column of the
 *     block (16 pixels x 3 channels) is contiguous, 48 lanes at a time.
 * On x86-64 both use AVX2 kernels when the CPU has them (chosen at import; the environment
 * variable LLAVA_FEATURES_RESAMPLE_NO_SIMD=1 turns them off), else portable C loops.
 * Only the outputs inside the crop window are computed, and only the input rows/columns that
 * they read. The padding of expand2square is never materialised: rows of the padded square that
 * hold only the background colour are resampled once and copied.
 *
 * The Python side (pipeline/images/native.py) checks this module against the installed Pillow
 * before using it and falls back to Pillow's own resize when they disagree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS (32 - 8 - 2)
#define HALF (1 << (PRECISION_BITS - 1))

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define HAVE_AVX2_KERNELS 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2")))
static int use_avx2 = -1; /* decided once, at module init */
#else
#define HAVE_AVX2_KERNELS 0
#endif

/* ---------------------------------------------------------------- filters (as Pillow) */

typedef double (*filter_fn)(double);

static double box_filter(double x) {
    if (x > -0.5 && x <= 0.5) {
        return 1.0;
    }
    return 0.0;
}

static double bilinear_filter(double x) {
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return 1.0 - x;
    }
    return 0.0;
}

static double bicubic_filter(double x) {
#define a -0.5
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
#undef a
}

/* PIL filter ids: 4 BOX, 2 BILINEAR, 3 BICUBIC. Others are not handled here. */
static int filter_for(int id, filter_fn *fn, double *support) {
    switch (id) {
        case 4:
            *fn = box_filter;
            *support = 0.5;
            return 1;
        case 2:
            *fn = bilinear_filter;
            *support = 1.0;
            return 1;
        case 3:
            *fn = bicubic_filter;
            *support = 2.0;
            return 1;
        default:
            return 0;
    }
}

/* ---------------------------------------------------------------- weights */

typedef struct {
    int n;        /* number of outputs described */
    int ksize;    /* stride of k */
    int *lo;      /* first input index of each output */
    int *cnt;     /* number of inputs of each output */
    int32_t *k;   /* fixed-point weights, n * ksize */
} Weights;

static void weights_free(Weights *w) {
    free(w->lo);
    free(w->cnt);
    free(w->k);
    w->lo = w->cnt = NULL;
    w->k = NULL;
}

/* Weights of outputs [o0, o0 + n) of a resize of in_size -> out_size. Pillow's
 * precompute_coeffs + normalize_coeffs_8bpc (box = (0, in_size)), or the identity when
 * in_size == out_size (Pillow skips that pass: a copy). Returns 0 on allocation failure. */
static int weights_make(int in_size, int out_size, int o0, int n, filter_fn fn, double fsupport,
                        Weights *w) {
    double *pre = NULL;
    memset(w, 0, sizeof(*w));
    w->n = n;
    if (in_size == out_size) {
        w->ksize = 1;
    } else {
        double scale = (double)((float)in_size - 0.0f) / out_size;
        double filterscale = scale < 1.0 ? 1.0 : scale;
        w->ksize = (int)ceil(fsupport * filterscale) * 2 + 1;
    }
    w->lo = malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    w->cnt = malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    w->k = malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1) * (size_t)w->ksize);
    pre = malloc(sizeof(double) * (size_t)w->ksize);
    if (!w->lo || !w->cnt || !w->k || !pre) {
        free(pre);
        weights_free(w);
        return 0;
    }
    if (in_size == out_size) {
        for (int i = 0; i < n; i++) {
            w->lo[i] = o0 + i;
            w->cnt[i] = 1;
            w->k[i] = 1 << PRECISION_BITS;
        }
        free(pre);
        return 1;
    }
    {
        float in0 = 0.0f, in1 = (float)in_size;
        double scale = (double)(in1 - in0) / out_size;
        double filterscale = scale < 1.0 ? 1.0 : scale;
        double support = fsupport * filterscale;
        for (int i = 0; i < n; i++) {
            int xx = o0 + i;
            double center = in0 + (xx + 0.5) * scale;
            double ww = 0.0;
            double ss = 1.0 / filterscale;
            int xmin = (int)(center - support + 0.5);
            int xmax;
            int32_t *k = w->k + (size_t)i * w->ksize;
            if (xmin < 0) {
                xmin = 0;
            }
            xmax = (int)(center + support + 0.5);
            if (xmax > in_size) {
                xmax = in_size;
            }
            xmax -= xmin;
            if (xmax > w->ksize) { /* cannot happen; guards the buffers */
                xmax = w->ksize;
            }
            for (int x = 0; x < xmax; x++) {
                double v = fn((x + xmin - center + 0.5) * ss);
                pre[x] = v;
                ww += v;
            }
            for (int x = 0; x < xmax; x++) {
                if (ww != 0.0) {
                    pre[x] /= ww;
                }
            }
            for (int x = 0; x < w->ksize; x++) {
                double v = x < xmax ? pre[x] : 0.0;
                if (v < 0) {
                    k[x] = (int32_t)(int)(-0.5 + v * (1 << PRECISION_BITS));
                } else {
                    k[x] = (int32_t)(int)(0.5 + v * (1 << PRECISION_BITS));
                }
            }
            w->lo[i] = xmin;
            w->cnt[i] = xmax;
        }
    }
    free(pre);
    return 1;
}

/* Input range [*first, *last) read by the outputs of w. */
static void weights_span(const Weights *w, int *first, int *last) {
    int lo = 0, hi = 0;
    for (int i = 0; i < w->n; i++) {
        int a = w->lo[i], b = w->lo[i] + w->cnt[i];
        if (i == 0 || a < lo) {
            lo = a;
        }
        if (i == 0 || b > hi) {
            hi = b;
        }
    }
    *first = lo;
    *last = hi;
}

static inline uint8_t clip8(int32_t acc) {
    int32_t v = acc >> PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

/* ---------------------------------------------------------------- vertical pass */

#define VCHUNK 64

/* dst row i (len bytes) = pass over src rows w->lo[i] - row0 ... (each row len bytes at src_stride). */
static void vertical_pass_c(const uint8_t *src, ptrdiff_t src_stride, int row0, int len,
                                     const Weights *w, uint8_t *dst, ptrdiff_t dst_stride) {
    for (int i = 0; i < w->n; i++) {
        const int32_t *k = w->k + (size_t)i * w->ksize;
        const uint8_t *base = src + (ptrdiff_t)(w->lo[i] - row0) * src_stride;
        const int cnt = w->cnt[i];
        uint8_t *d = dst + (ptrdiff_t)i * dst_stride;
        int x = 0;
        for (; x + VCHUNK <= len; x += VCHUNK) {
            int32_t acc[VCHUNK];
            for (int l = 0; l < VCHUNK; l++) {
                acc[l] = HALF;
            }
            for (int t = 0; t < cnt; t++) {
                const uint8_t *p = base + (ptrdiff_t)t * src_stride + x;
                const int32_t kt = k[t];
                for (int l = 0; l < VCHUNK; l++) {
                    acc[l] += (int32_t)p[l] * kt;
                }
            }
            for (int l = 0; l < VCHUNK; l++) {
                d[x + l] = clip8(acc[l]);
            }
        }
        for (; x < len; x++) {
            int32_t acc = HALF;
            for (int t = 0; t < cnt; t++) {
                acc += (int32_t)base[(ptrdiff_t)t * src_stride + x] * k[t];
            }
            d[x] = clip8(acc);
        }
    }
}

/* ---------------------------------------------------------------- horizontal pass */

#define HROWS 16
#define HLANES (HROWS * 3)

/* One output column of a block: lane group r (3 bytes) -> row r of the output. */
static inline void store_column(const uint8_t *v, int rows, uint8_t *out, ptrdiff_t out_stride) {
    for (int r = 0; r < rows; r++, out += out_stride) {
        out[0] = v[3 * r];
        out[1] = v[3 * r + 1];
        out[2] = v[3 * r + 2];
    }
}

/* One block: blk holds input columns [col0, ...) of HROWS rows, column-major (HLANES bytes per
 * column). Writes output column j of row r to out[r * out_stride + 3 * j + c]. */
static void horizontal_block_c(const uint8_t *blk, int col0, const Weights *w, int rows,
                                        uint8_t *out, ptrdiff_t out_stride) {
    for (int j = 0; j < w->n; j++) {
        const int32_t *k = w->k + (size_t)j * w->ksize;
        const uint8_t *base = blk + (ptrdiff_t)(w->lo[j] - col0) * HLANES;
        const int cnt = w->cnt[j];
        int32_t acc[HLANES];
        for (int l = 0; l < HLANES; l++) {
            acc[l] = HALF;
        }
        for (int t = 0; t < cnt; t++) {
            const uint8_t *p = base + (ptrdiff_t)t * HLANES;
            const int32_t kt = k[t];
            for (int l = 0; l < HLANES; l++) {
                acc[l] += (int32_t)p[l] * kt;
            }
        }
        uint8_t v[HLANES];
        for (int l = 0; l < HLANES; l++) {
            v[l] = clip8(acc[l]);
        }
        store_column(v, rows, out + 3 * (ptrdiff_t)j, out_stride);
    }
}

#if HAVE_AVX2_KERNELS
/* 32 int32 sums (4 vectors) -> clip8 -> 32 bytes, in order. packs/packus saturate exactly as
 * clip8 does for sums in Pillow's range; they work per 128-bit lane, the permute restores order. */
AVX2_FN static inline __m256i pack32(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
    a0 = _mm256_srai_epi32(a0, PRECISION_BITS);
    a1 = _mm256_srai_epi32(a1, PRECISION_BITS);
    a2 = _mm256_srai_epi32(a2, PRECISION_BITS);
    a3 = _mm256_srai_epi32(a3, PRECISION_BITS);
    __m256i w01 = _mm256_packs_epi32(a0, a1); /* lanes: a0lo a1lo | a0hi a1hi */
    __m256i w23 = _mm256_packs_epi32(a2, a3);
    __m256i b = _mm256_packus_epi16(w01, w23); /* a0lo a1lo a2lo a3lo | a0hi a1hi a2hi a3hi */
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

#define LOAD8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))

/* acc[v] += weight[t] * (8 pixels at p + t * step + 8 * v, widened to int32), over the taps.
 * Inlined with a constant nvec, the accumulators stay in registers. */
__attribute__((always_inline)) AVX2_FN static inline void mac_taps(__m256i *acc, const int nvec,
                                                                   const uint8_t *p, ptrdiff_t step,
                                                                   const int32_t *k, int cnt) {
    for (int t = 0; t < cnt; t++, p += step) {
        const __m256i kt = _mm256_set1_epi32(k[t]);
        for (int v = 0; v < nvec; v++) {
            acc[v] = _mm256_add_epi32(acc[v], _mm256_mullo_epi32(LOAD8(p + 8 * v), kt));
        }
    }
}

AVX2_FN static void vertical_pass_avx2(const uint8_t *src, ptrdiff_t src_stride, int row0, int len,
                                       const Weights *w, uint8_t *dst, ptrdiff_t dst_stride) {
    if (len < 32) {
        vertical_pass_c(src, src_stride, row0, len, w, dst, dst_stride);
        return;
    }
    const __m256i half = _mm256_set1_epi32(HALF);
    for (int i = 0; i < w->n; i++) {
        const int32_t *k = w->k + (size_t)i * w->ksize;
        const uint8_t *base = src + (ptrdiff_t)(w->lo[i] - row0) * src_stride;
        const int cnt = w->cnt[i];
        uint8_t *d = dst + (ptrdiff_t)i * dst_stride;
        for (int x = 0;; x += 32) {
            if (x + 32 > len) {
                x = len - 32; /* last chunk overlaps the previous one: same values rewritten */
            }
            __m256i a[4] = {half, half, half, half};
            mac_taps(a, 4, base + x, src_stride, k, cnt);
            _mm256_storeu_si256((__m256i *)(d + x), pack32(a[0], a[1], a[2], a[3]));
            if (x + 32 >= len) {
                break;
            }
        }
    }
}

AVX2_FN static void horizontal_block_avx2(const uint8_t *blk, int col0, const Weights *w, int rows,
                                          uint8_t *out, ptrdiff_t out_stride) {
    const __m256i half = _mm256_set1_epi32(HALF);
    uint8_t v[64];
    for (int j = 0; j < w->n; j++) {
        const int32_t *k = w->k + (size_t)j * w->ksize;
        const uint8_t *p = blk + (ptrdiff_t)(w->lo[j] - col0) * HLANES;
        const int cnt = w->cnt[j];
        __m256i a[HLANES / 8] = {half, half, half, half, half, half};
        mac_taps(a, HLANES / 8, p, HLANES, k, cnt);
        _mm256_storeu_si256((__m256i *)v, pack32(a[0], a[1], a[2], a[3]));
        _mm256_storeu_si256((__m256i *)(v + 32), pack32(a[4], a[5], half, half));
        store_column(v, rows, out + 3 * (ptrdiff_t)j, out_stride);
    }
}
#endif

static void vertical_pass(const uint8_t *src, ptrdiff_t src_stride, int row0, int len, const Weights *w,
                          uint8_t *dst, ptrdiff_t dst_stride) {
#if HAVE_AVX2_KERNELS
    if (use_avx2) {
        vertical_pass_avx2(src, src_stride, row0, len, w, dst, dst_stride);
        return;
    }
#endif
    vertical_pass_c(src, src_stride, row0, len, w, dst, dst_stride);
}

static void horizontal_block(const uint8_t *blk, int col0, const Weights *w, int rows, uint8_t *out,
                             ptrdiff_t out_stride) {
#if HAVE_AVX2_KERNELS
    if (use_avx2) {
        horizontal_block_avx2(blk, col0, w, rows, out, out_stride);
        return;
    }
#endif
    horizontal_block_c(blk, col0, w, rows, out, out_stride);
}

/* A virtual RGB image: `img` (h x w, row stride `stride`) placed at (oy, ox) on a canvas_h x
 * canvas_w canvas filled with `bg` (expand2square), or the image itself (canvas == image). */
typedef struct {
    const uint8_t *img;
    ptrdiff_t stride;
    int h, w, oy, ox, canvas_h, canvas_w;
    uint8_t bg[3];
} Source;

static int source_row_is_bg(const Source *s, int y) { return y < s->oy || y >= s->oy + s->h; }

static inline void put3(uint8_t *dst, const uint8_t *src, int wide) {
    if (wide) { /* 4-byte copy: its 4th byte lands in a lane that is written later */
        uint32_t v;
        memcpy(&v, src, 4);
        memcpy(dst, &v, 4);
    } else {
        dst[0] = src[0];
        dst[1] = src[1];
        dst[2] = src[2];
    }
}

/* Columns [c0, c1) of canvas row y into lane group r of a column-major block. Lane groups must be
 * filled in increasing r (a group's 4-byte copies spill one byte into group r + 1). */
static void gather_row(const Source *s, int y, int c0, int c1, uint8_t *blk, int r) {
    uint8_t *dst = blk + 3 * r;
    const int wide = r < HROWS - 1;
    uint8_t bg4[4] = {s->bg[0], s->bg[1], s->bg[2], 0};
    if (source_row_is_bg(s, y)) {
        for (int c = c0; c < c1; c++, dst += HLANES) {
            put3(dst, bg4, wide);
        }
        return;
    }
    const uint8_t *row = s->img + (ptrdiff_t)(y - s->oy) * s->stride;
    const int img0 = s->ox, img1 = s->ox + s->w; /* canvas columns holding the image */
    int c = c0;
    for (; c < c1 && c < img0; c++, dst += HLANES) {
        put3(dst, bg4, wide);
    }
    /* Image columns; the last one is copied with 3 bytes so the source is never over-read. */
    const int last = (c1 < img1 ? c1 : img1) - 1;
    const uint8_t *p = row + 3 * (ptrdiff_t)(c - s->ox);
    for (; c < last; c++, dst += HLANES, p += 3) {
        put3(dst, p, wide);
    }
    if (c == last) {
        put3(dst, p, 0);
        c++;
        dst += HLANES;
    }
    for (; c < c1; c++, dst += HLANES) {
        put3(dst, bg4, wide);
    }
}

/* Horizontal pass of canvas rows [y0, y1) through weights w: output row (y - y0) at
 * out + (y - y0) * out_stride, 3 * w->n bytes. Returns 0 on allocation failure. */
static int horizontal_pass(const Source *s, int y0, int y1, const Weights *w, uint8_t *out,
                           ptrdiff_t out_stride) {
    int c0, c1;
    weights_span(w, &c0, &c1);
    const int ncols = c1 - c0;
    uint8_t *blk = malloc((size_t)(ncols > 0 ? ncols : 1) * HLANES);
    uint8_t *bg_row = NULL; /* the output of a background row, computed once */
    if (!blk) {
        return 0;
    }
    int y = y0;
    while (y < y1) {
        if (source_row_is_bg(s, y)) {
            if (!bg_row) {
                bg_row = malloc((size_t)3 * (w->n > 0 ? w->n : 1));
                if (!bg_row) {
                    free(blk);
                    return 0;
                }
                memset(blk, 0, (size_t)(ncols > 0 ? ncols : 1) * HLANES);
                gather_row(s, y, c0, c1, blk, 0);
                horizontal_block(blk, c0, w, 1, bg_row, 0);
            }
            memcpy(out + (ptrdiff_t)(y - y0) * out_stride, bg_row, (size_t)3 * w->n);
            y++;
            continue;
        }
        /* A block of up to HROWS consecutive image rows. */
        int rows = 0;
        while (rows < HROWS && y + rows < y1 && !source_row_is_bg(s, y + rows)) {
            gather_row(s, y + rows, c0, c1, blk, rows);
            rows++;
        }
        if (rows < HROWS) {
            /* Unused lanes: defined values (their outputs are not stored). */
            for (int c = 0; c < ncols; c++) {
                memset(blk + (ptrdiff_t)c * HLANES + 3 * rows, 0, (size_t)3 * (HROWS - rows));
            }
        }
        horizontal_block(blk, c0, w, rows, out + (ptrdiff_t)(y - y0) * out_stride, out_stride);
        y += rows;
    }
    free(bg_row);
    free(blk);
    return 1;
}

/* HWC (h x w x 3, stride) -> CHW planes of h x w. */
static void to_chw(const uint8_t *src, ptrdiff_t stride, int h, int w, uint8_t *dst) {
    const size_t plane = (size_t)h * w;
    for (int y = 0; y < h; y++) {
        const uint8_t *p = src + (ptrdiff_t)y * stride;
        uint8_t *r = dst + (size_t)y * w, *g = r + plane, *b = g + plane;
        for (int x = 0; x < w; x++) {
            r[x] = p[3 * x];
            g[x] = p[3 * x + 1];
            b[x] = p[3 * x + 2];
        }
    }
}

/* ---------------------------------------------------------------- the whole operation */

typedef struct {
    int out_h, out_w;          /* size of the full resize */
    int top, left, crop_h, crop_w; /* window of it to produce (inside [0, out_h) x [0, out_w)) */
    int filter;
    int horizontal_first;
} Plan;

/* Returns 0 on success, -1 on allocation failure. */
static int run(const Source *s, const Plan *p, uint8_t *dst_chw) {
    filter_fn fn;
    double support;
    Weights wh, wv;
    uint8_t *tmp = NULL, *fin = NULL;
    int ok = 0;
    if (!filter_for(p->filter, &fn, &support)) {
        return -1;
    }
    if (!weights_make(s->canvas_w, p->out_w, p->left, p->crop_w, fn, support, &wh)) {
        return -1;
    }
    if (!weights_make(s->canvas_h, p->out_h, p->top, p->crop_h, fn, support, &wv)) {
        weights_free(&wh);
        return -1;
    }
    const ptrdiff_t out_stride = (ptrdiff_t)3 * p->crop_w;
    fin = malloc((size_t)p->crop_h * out_stride + 1);
    if (!fin) {
        goto done;
    }
    if (p->horizontal_first) {
        int r0, r1;
        weights_span(&wv, &r0, &r1);
        tmp = malloc((size_t)(r1 - r0) * out_stride + 1);
        if (!tmp || !horizontal_pass(s, r0, r1, &wh, tmp, out_stride)) {
            goto done;
        }
        vertical_pass(tmp, out_stride, r0, (int)out_stride, &wv, fin, out_stride);
    } else {
        /* Vertical first: on the columns the horizontal pass reads (no padding on this path). */
        int c0, c1;
        weights_span(&wh, &c0, &c1);
        const ptrdiff_t tmp_stride = (ptrdiff_t)3 * (c1 - c0);
        tmp = malloc((size_t)p->crop_h * tmp_stride + 1);
        if (!tmp) {
            goto done;
        }
        vertical_pass(s->img + 3 * (ptrdiff_t)c0, s->stride, 0, (int)tmp_stride, &wv, tmp, tmp_stride);
        Source mid = {tmp, tmp_stride, p->crop_h, c1 - c0, 0, 0, p->crop_h, c1 - c0, {0, 0, 0}};
        /* The horizontal weights index canvas columns; shift them to tmp's columns. */
        for (int j = 0; j < wh.n; j++) {
            wh.lo[j] -= c0;
        }
        if (!horizontal_pass(&mid, 0, p->crop_h, &wh, fin, out_stride)) {
            goto done;
        }
    }
    to_chw(fin, out_stride, p->crop_h, p->crop_w, dst_chw);
    ok = 1;
done:
    free(tmp);
    free(fin);
    weights_free(&wh);
    weights_free(&wv);
    return ok ? 0 : -1;
}

/* ---------------------------------------------------------------- Python binding */

PyDoc_STRVAR(resize_window_doc,
             "resize_window(src, height, width, dst, canvas, offset, background, out_size, window, "
             "filter, horizontal_first)\n--\n\n"
             "Write the CHW uint8 window (top, left, crop_h, crop_w) of the PIL resize to "
             "out_size=(out_h, out_w) of an RGB image into `dst`.\n\n"
             "src: HWC uint8 bytes of a height x width RGB image. canvas=(canvas_h, canvas_w) and "
             "offset=(oy, ox): the image placed on a canvas filled with `background` (r, g, b), "
             "as expand2square does; canvas == (height, width) and offset == (0, 0) for none. "
             "dst: writable buffer of 3 * crop_h * crop_w bytes. filter: PIL id 2, 3 or 4. "
             "horizontal_first: the pass order Pillow uses for these sizes. Releases the GIL.");

static PyObject *py_resize_window(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int h, w, ch, cw, oy, ox, bgr, bgg, bgb, oh, ow, top, left, croph, cropw, filter, hfirst;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iiw*(ii)(ii)(iii)(ii)(iiii)ip", &src, &h, &w, &dst, &ch, &cw, &oy,
                          &ox, &bgr, &bgg, &bgb, &oh, &ow, &top, &left, &croph, &cropw, &filter,
                          &hfirst)) {
        return NULL;
    }
    PyObject *result = NULL;
    filter_fn fn;
    double support;
    if (h <= 0 || w <= 0 || ch < h || cw < w || oy < 0 || ox < 0 || oy + h > ch || ox + w > cw ||
        oh <= 0 || ow <= 0 || croph <= 0 || cropw <= 0 || top < 0 || left < 0 ||
        top + croph > oh || left + cropw > ow) {
        PyErr_SetString(PyExc_ValueError, "resize_window: inconsistent sizes");
        goto out;
    }
    if (!filter_for(filter, &fn, &support)) {
        PyErr_Format(PyExc_ValueError, "resize_window: unsupported filter %d", filter);
        goto out;
    }
    if (!hfirst && (ch != h || cw != w)) {
        PyErr_SetString(PyExc_ValueError, "resize_window: padding needs horizontal_first");
        goto out;
    }
    if (src.len < (Py_ssize_t)h * w * 3) {
        PyErr_SetString(PyExc_ValueError, "resize_window: src is smaller than height * width * 3");
        goto out;
    }
    if (dst.len < (Py_ssize_t)croph * cropw * 3) {
        PyErr_SetString(PyExc_ValueError, "resize_window: dst is smaller than 3 * crop_h * crop_w");
        goto out;
    }
    {
        Source s = {(const uint8_t *)src.buf, (ptrdiff_t)w * 3, h, w, oy, ox, ch, cw,
                    {(uint8_t)bgr, (uint8_t)bgg, (uint8_t)bgb}};
        Plan p = {oh, ow, top, left, croph, cropw, filter, hfirst};
        int rc;
        Py_BEGIN_ALLOW_THREADS rc = run(&s, &p, (uint8_t *)dst.buf);
        Py_END_ALLOW_THREADS if (rc != 0) {
            PyErr_NoMemory();
            goto out;
        }
    }
    result = Py_None;
    Py_INCREF(result);
out:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {
    {"resize_window", py_resize_window, METH_VARARGS, resize_window_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_resample",
    "Exact vectorised PIL resampling for LLaVA preprocessing (see pipeline/images/native.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__resample(void) {
#if HAVE_AVX2_KERNELS
    if (use_avx2 < 0) {
        const char *env = getenv("LLAVA_FEATURES_RESAMPLE_NO_SIMD");
        __builtin_cpu_init();
        use_avx2 = __builtin_cpu_supports("avx2") && !(env && env[0] && env[0] != '0');
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "SIMD", HAVE_AVX2_KERNELS ? use_avx2 : 0) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
