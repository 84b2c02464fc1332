/* The decoder's tokens-at-a-time step on a CPU, in one call: every layer of a Llama-family
 * model whose projections are 4-bit groups, over the paged KV cache.
 *
 * A decode step multiplies a few rows by every weight once: it is bound by reading the
 * weights and by the number of operators, not by arithmetic. This runs the whole step in
 * one call (no per-operator dispatch), reads each 4-bit weight once for all the step's
 * tokens, and splits each stage's output features between a few threads that wait for each
 * other at a spinning barrier between stages.
 *
 * Each output is computed by one thread, in an order that depends only on the weights'
 * shape: a token's arithmetic is the same whatever batch or thread count it runs in.
 * Activations are float32 throughout; the cache holds float32 or bfloat16.
 *
 * neuron/model/kernel.py builds this file with the host's C compiler and calls it through
 * ctypes; the structures below mirror the ones there.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HX_AVX2 1
#endif

#define GROUP 32 /* inputs per 4-bit group */
#define BLOCK 16 /* tokens per block of the paged cache */

/* A projection as 4-bit groups: weight[o][g * 32 + i] = code * scale[o][g] + low[o][g].
 * codes[o] holds 16 bytes per group: byte k is input k in its low nibble, input k + 16 in
 * its high nibble. */
typedef struct {
    const uint8_t *codes;
    const float *scale;
    const float *low;
    const float *bias; /* [out] or NULL */
    int64_t out, in;
} Q4;

typedef struct {
    const float *attn_norm, *mlp_norm;
    Q4 qkv, o, gate_up, down;
} Layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter;
    float eps;
    int64_t kv_bf16; /* cache element: 1 bfloat16, 0 float32 */
    void *pool;      /* [layers, 2, kv_heads, slots, head_dim] */
    int64_t slots;
    const Layer *layer;
    const float *norm;    /* the final norm: [hidden] */
    const void *lm_head;  /* [vocab, hidden], float32 or bfloat16 */
    const int8_t *lm_codes; /* or, where it is exactly 8-bit groups: codes [vocab, hidden] */
    const float *lm_scale;  /* and their scales [vocab, hidden / GROUP] */
    const float *lm_bias; /* [vocab] or NULL */
    int64_t vocab, lm_bf16;
} Model;

typedef struct {
    int64_t tokens;
    float *x;              /* [tokens, hidden]: the residual stream, in and out */
    const int64_t *pos;    /* [tokens] */
    const int64_t *slot;   /* [tokens]: where each token's key and value go */
    const int64_t *table;  /* [tokens, width]: the block table each token reads through */
    int64_t width;
    const float *cos, *sin; /* [tokens, head_dim] */
    int64_t outputs;
    const int64_t *chosen; /* [outputs]: the tokens whose logits are wanted */
    float *logits;         /* [outputs, vocab] */
} Step;

/* ---- threads: one call's stages run on every thread, a barrier between them ---------- */

typedef struct {
    int n;
    pthread_t *workers;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_long generation; /* bumped per call: the workers' signal to run */
    atomic_int arrived, sense, done;
    int stop;
    const Model *model;
    const Step *step;
    void *scratch;
} Pool;

static Pool pool_ = {.n = 0};

/* Spins a waiting thread makes before it yields its core at each further look: another
 * thread of the process (the server's) may hold the core the late one needs. */
#define SPINS 2000

static inline void relax(int *spins) {
    if (++*spins > SPINS) {
        sched_yield();
        return;
    }
#ifdef HX_AVX2
    _mm_pause();
#endif
}

static void barrier(Pool *p, int *local) {
    if (p->n == 1) return;
    *local = !*local;
    if (atomic_fetch_add(&p->arrived, 1) == p->n - 1) {
        atomic_store(&p->arrived, 0);
        atomic_store(&p->sense, *local);
    } else {
        int spins = 0;
        while (atomic_load_explicit(&p->sense, memory_order_acquire) != *local) relax(&spins);
    }
}

/* ---- arithmetic ------------------------------------------------------------------------ */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    u += 0x7fff + ((u >> 16) & 1); /* round to nearest even, as torch */
    return (uint16_t)(u >> 16);
}

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(sum / n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

#ifdef HX_AVX2
static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#endif

/* A stage's input, prepared once per token for every projection that reads it: each group
 * of 32 as 16-bit integers with a scale (x ~ x16 * xs: off by at most 1/65534 of the group's
 * largest magnitude, finer than bfloat16 by 2^7), and its exact float sum. */
typedef struct {
    int16_t *x16; /* [tokens, stride] */
    float *xs;    /* [tokens, stride / GROUP] */
    float *sums;  /* [tokens, stride / GROUP] */
    int64_t stride;
} Input;

static void prepare(const Input *in, int64_t t, const float *x, int64_t n) {
    int64_t groups = in->stride / GROUP;
    int16_t *q = in->x16 + t * in->stride;
    for (int64_t g = 0; g < n / GROUP; g++) {
        const float *v = x + g * GROUP;
#ifdef HX_AVX2
        const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 x0 = _mm256_loadu_ps(v), x1 = _mm256_loadu_ps(v + 8);
        __m256 x2 = _mm256_loadu_ps(v + 16), x3 = _mm256_loadu_ps(v + 24);
        __m256 top8 = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(x0, magnitude),
                                                  _mm256_and_ps(x1, magnitude)),
                                    _mm256_max_ps(_mm256_and_ps(x2, magnitude),
                                                  _mm256_and_ps(x3, magnitude)));
        __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
        top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
        float top = _mm_cvtss_f32(_mm_max_ss(top4, _mm_movehdup_ps(top4)));
        float sum = hsum(_mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)));
        __m256 inverse = _mm256_set1_ps(top > 0 ? 32767.0f / top : 0);
        /* rounded to nearest even, as lrintf; packs interleaves 128-bit lanes: put back */
        __m256i lo = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(x0, inverse)),
                                        _mm256_cvtps_epi32(_mm256_mul_ps(x1, inverse)));
        __m256i hi = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(x2, inverse)),
                                        _mm256_cvtps_epi32(_mm256_mul_ps(x3, inverse)));
        _mm256_storeu_si256((__m256i *)(q + g * GROUP), _mm256_permute4x64_epi64(lo, 0xd8));
        _mm256_storeu_si256((__m256i *)(q + g * GROUP + 16), _mm256_permute4x64_epi64(hi, 0xd8));
        in->xs[t * groups + g] = top / 32767.0f;
        in->sums[t * groups + g] = sum;
#else
        float top = 0, sum = 0;
        for (int i = 0; i < GROUP; i++) {
            float a = fabsf(v[i]);
            top = a > top ? a : top;
            sum += v[i];
        }
        float scale = top / 32767.0f, inverse = top > 0 ? 32767.0f / top : 0;
        for (int i = 0; i < GROUP; i++) q[g * GROUP + i] = (int16_t)lrintf(v[i] * inverse);
        in->xs[t * groups + g] = scale;
        in->sums[t * groups + g] = sum;
#endif
    }
}

static inline float dotf(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0;
#ifdef HX_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One weight row of ``groups`` groups, as 4-bit codes ``c4`` (the Q4 packing) or else 8-bit
 * ones ``c8``, against ``n`` tokens (1..8: a constant where inlined) of ``in`` from token
 * ``t``: sum(x * code * scale) by group, the codes of a group unpacked once for all of them,
 * the products exact in integers. */
static inline __attribute__((always_inline)) void codes_tokens(const uint8_t *c4,
                                                               const int8_t *c8,
                                                               const float *scale,
                                                               int64_t groups, const Input *in,
                                                               int64_t t, int n, float *total) {
    int64_t gs = in->stride / GROUP, st = in->stride;
    const float *xs = in->xs + t * gs;
    const int16_t *x = in->x16 + t * in->stride;
#ifdef HX_AVX2
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0;
#define HX_TOKEN(k, acc)                                                                    \
    do {                                                                                    \
        const int16_t *v = x + (k) * st + g * GROUP;                                        \
        __m256i p = _mm256_add_epi32(                                                       \
            _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)v)),                  \
            _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(v + 16))));          \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale[g] * xs[(k) * gs + g]), \
                              acc);                                                         \
    } while (0)
    for (int64_t g = 0; g < groups; g++) {
        __m256i lo, hi;
        if (c4) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(c4 + g * 16));
            lo = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask));
            hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
        } else {
            lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c8 + g * GROUP)));
            hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c8 + g * GROUP + 16)));
        }
        HX_TOKEN(0, a0);
        if (n > 1) HX_TOKEN(1, a1);
        if (n > 2) HX_TOKEN(2, a2);
        if (n > 3) HX_TOKEN(3, a3);
        if (n > 4) HX_TOKEN(4, a4);
        if (n > 5) HX_TOKEN(5, a5);
        if (n > 6) HX_TOKEN(6, a6);
        if (n > 7) HX_TOKEN(7, a7);
    }
#undef HX_TOKEN
    __m256 accs[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int k = 0; k < n; k++) total[k] = hsum(accs[k]);
#else
    for (int k = 0; k < n; k++) total[k] = 0;
    for (int64_t g = 0; g < groups; g++) {
        int32_t code[GROUP];
        for (int i = 0; i < 16; i++) {
            code[i] = c4 ? c4[g * 16 + i] & 15 : c8[g * GROUP + i];
            code[i + 16] = c4 ? c4[g * 16 + i] >> 4 : c8[g * GROUP + i + 16];
        }
        for (int k = 0; k < n; k++) {
            const int16_t *v = x + k * st + g * GROUP;
            int32_t p = 0;
            for (int i = 0; i < GROUP; i++) p += v[i] * code[i];
            total[k] += (float)p * (scale[g] * xs[k * gs + g]);
        }
    }
#endif
}

/* out[t * stride + o] (+)= x[t] . weight[o] + bias[o] for o in [o0, o1), eight tokens at a
 * time; sum(x * (code * scale + low)) taken as sum(x * code * scale) + low . sums(x). */
static void codes_row(const uint8_t *c4, const int8_t *c8, const float *scale,
                      int64_t groups, const Input *in, int64_t t, int64_t n, float *total) {
    switch (n) {
    case 1: codes_tokens(c4, c8, scale, groups, in, t, 1, total); break;
    case 2: codes_tokens(c4, c8, scale, groups, in, t, 2, total); break;
    case 3: codes_tokens(c4, c8, scale, groups, in, t, 3, total); break;
    case 4: codes_tokens(c4, c8, scale, groups, in, t, 4, total); break;
    case 5: codes_tokens(c4, c8, scale, groups, in, t, 5, total); break;
    case 6: codes_tokens(c4, c8, scale, groups, in, t, 6, total); break;
    case 7: codes_tokens(c4, c8, scale, groups, in, t, 7, total); break;
    default: codes_tokens(c4, c8, scale, groups, in, t, 8, total); break;
    }
}

static void q4_rows(const Q4 *w, const Input *in, int64_t tokens, int64_t o0, int64_t o1,
                    float *out, int64_t stride, int add) {
    float total[8] = {0};
    int64_t groups = w->in / GROUP, gs = in->stride / GROUP;
    for (int64_t o = o0; o < o1; o++)
        for (int64_t t = 0; t < tokens; t += 8) {
            codes_row(w->codes + o * (w->in / 2), NULL, w->scale + o * groups, groups, in, t,
                      tokens - t, total);
            for (int64_t k = 0; k < 8 && t + k < tokens; k++) {
                float v = total[k] + dotf(w->low + o * groups, in->sums + (t + k) * gs, groups);
                if (w->bias) v += w->bias[o];
                float *dst = out + (t + k) * stride + o;
                *dst = add ? *dst + v : v;
            }
        }
}

/* lm_head row ``o`` against ``n`` tokens (1..8: a constant where inlined) of ``h`` from
 * token ``t``, the weights converted once for all of them, the sums in registers. */
static inline __attribute__((always_inline)) void dense_tokens(const Model *m, int64_t o,
                                                               const float *h, int n,
                                                               float *total) {
    int64_t H = m->hidden, i = 0;
    for (int k = 0; k < n; k++) total[k] = 0;
#ifdef HX_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0;
    for (; i + 8 <= H; i += 8) {
        __m256 wv;
        if (m->lm_bf16) {
            const uint16_t *row = (const uint16_t *)m->lm_head + o * H + i;
            __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)row));
            wv = _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
        } else {
            wv = _mm256_loadu_ps((const float *)m->lm_head + o * H + i);
        }
        const float *v = h + i;
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v), wv, a0);
        if (n > 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + H), wv, a1);
        if (n > 2) a2 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 2 * H), wv, a2);
        if (n > 3) a3 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 3 * H), wv, a3);
        if (n > 4) a4 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 4 * H), wv, a4);
        if (n > 5) a5 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 5 * H), wv, a5);
        if (n > 6) a6 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 6 * H), wv, a6);
        if (n > 7) a7 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 7 * H), wv, a7);
    }
    __m256 accs[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int k = 0; k < n; k++) total[k] = hsum(accs[k]);
#endif
    for (; i < H; i++) {
        float wv = m->lm_bf16 ? bf16_to_f32(((const uint16_t *)m->lm_head)[o * H + i])
                              : ((const float *)m->lm_head)[o * H + i];
        for (int k = 0; k < n; k++) total[k] += h[k * H + i] * wv;
    }
}

/* logits[k * vocab + o] = h[k] . lm_head[o] (+ bias) for o in [o0, o1), eight tokens at a
 * time, each weight row read once for them. */
static void dense_rows(const Model *m, const float *h, int64_t n, int64_t o0, int64_t o1,
                       float *logits) {
    float total[8] = {0};
    for (int64_t o = o0; o < o1; o++)
        for (int64_t t = 0; t < n; t += 8) {
            const float *v = h + t * m->hidden;
            switch (n - t) {
            case 1: dense_tokens(m, o, v, 1, total); break;
            case 2: dense_tokens(m, o, v, 2, total); break;
            case 3: dense_tokens(m, o, v, 3, total); break;
            case 4: dense_tokens(m, o, v, 4, total); break;
            case 5: dense_tokens(m, o, v, 5, total); break;
            case 6: dense_tokens(m, o, v, 6, total); break;
            case 7: dense_tokens(m, o, v, 7, total); break;
            default: dense_tokens(m, o, v, 8, total); break;
            }
            for (int64_t k = 0; k < 8 && t + k < n; k++)
                logits[(t + k) * m->vocab + o] = total[k] + (m->lm_bias ? m->lm_bias[o] : 0);
        }
}

/* logits[k * vocab + o] = x[k] . lm_head[o] (+ bias) for o in [o0, o1), from its 8-bit
 * codes, eight tokens at a time. */
static void q8_rows(const Model *m, const Input *in, int64_t n, int64_t o0, int64_t o1,
                    float *logits) {
    float total[8] = {0};
    int64_t H = m->hidden, groups = H / GROUP;
    for (int64_t o = o0; o < o1; o++)
        for (int64_t t = 0; t < n; t += 8) {
            codes_row(NULL, m->lm_codes + o * H, m->lm_scale + o * groups, groups, in, t, n - t,
                      total);
            for (int64_t k = 0; k < 8 && t + k < n; k++)
                logits[(t + k) * m->vocab + o] = total[k] + (m->lm_bias ? m->lm_bias[o] : 0);
        }
}

static int64_t widest_input(const Model *m) {
    int64_t w = m->hidden > m->inter ? m->hidden : m->inter;
    return w > m->heads * m->head_dim ? w : m->heads * m->head_dim;
}

static inline void slice(int64_t n, int tid, int threads, int64_t *a, int64_t *b) {
    *a = n * tid / threads;
    *b = n * (tid + 1) / threads;
}

/* The cached vector at ``slot`` of head ``h`` (keys: kv 0, values: 1), as float32. */
static inline const float *cached(const Model *m, int64_t layer, int kv, int64_t h, int64_t slot,
                                  float *buf) {
    int64_t at = (((layer * 2 + kv) * m->kv_heads + h) * m->slots + slot) * m->head_dim;
    if (!m->kv_bf16) return (const float *)m->pool + at;
    const uint16_t *v = (const uint16_t *)m->pool + at;
    int64_t i = 0;
#ifdef HX_AVX2
    for (; i + 8 <= m->head_dim; i += 8) {
        __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(v + i)));
        _mm256_storeu_ps(buf + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
#endif
    for (; i < m->head_dim; i++) buf[i] = bf16_to_f32(v[i]);
    return buf;
}

static void store(const Model *m, int64_t layer, int kv, int64_t h, int64_t slot, const float *v) {
    int64_t at = (((layer * 2 + kv) * m->kv_heads + h) * m->slots + slot) * m->head_dim;
    if (!m->kv_bf16) {
        memcpy((float *)m->pool + at, v, m->head_dim * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)m->pool + at;
    for (int64_t i = 0; i < m->head_dim; i++) dst[i] = f32_to_bf16(v[i]);
}

/* Scratch for one call: every buffer sized for its token count. */
typedef struct {
    Input in; /* the stage's input, prepared for the projections */
    float *h, *qkv, *att, *act;
    float *scores; /* per thread: [groups, columns] */
    float *vec;    /* per thread: [2, head_dim] */
    int64_t columns;
} Scratch;

static void run(const Model *m, const Step *s, Scratch *w, int tid, int threads, int *sense) {
    int64_t T = s->tokens, H = m->hidden, D = m->head_dim, I = m->inter;
    int64_t heads = m->heads, kvh = m->kv_heads, groups = heads / kvh;
    int64_t qkv_n = (heads + 2 * kvh) * D;
    float *scores = w->scores + (int64_t)tid * groups * w->columns;
    float *vec = w->vec + (int64_t)tid * 2 * D;
    float scale = 1.0f / sqrtf((float)D);
    int64_t a, b;
    for (int64_t l = 0; l < m->layers; l++) {
        const Layer *L = &m->layer[l];
        /* 1. normalise; every thread takes its tokens */
        for (int64_t t = tid; t < T; t += threads) {
            rms_norm(s->x + t * H, L->attn_norm, H, m->eps, w->h + t * H);
            prepare(&w->in, t, w->h + t * H, H);
        }
        barrier(&pool_, sense);
        /* 2. queries, keys and values */
        slice(L->qkv.out, tid, threads, &a, &b);
        q4_rows(&L->qkv, &w->in, T, a, b, w->qkv, qkv_n, 0);
        barrier(&pool_, sense);
        /* 3. rotate queries and keys; keys and values to the cache */
        slice(T * (heads + kvh), tid, threads, &a, &b);
        for (int64_t u = a; u < b; u++) {
            int64_t t = u / (heads + kvh), hh = u % (heads + kvh), half = D / 2;
            float *v = w->qkv + t * qkv_n + hh * D;
            const float *c = s->cos + t * D, *sn = s->sin + t * D;
            for (int64_t i = 0; i < half; i++) {
                float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] - x2 * sn[i];
                v[i + half] = x2 * c[i + half] + x1 * sn[i + half];
            }
            if (hh >= heads) {
                int64_t k = hh - heads;
                store(m, l, 0, k, s->slot[t], v);
                store(m, l, 1, k, s->slot[t], w->qkv + t * qkv_n + (heads + kvh + k) * D);
            }
        }
        barrier(&pool_, sense);
        /* 4. attention: a token's query heads sharing a key head, over its columns */
        slice(T * kvh, tid, threads, &a, &b);
        for (int64_t u = a; u < b; u++) {
            int64_t t = u / kvh, k = u % kvh, seen = s->pos[t] + 1;
            const int64_t *table = s->table + t * s->width;
            const float *q = w->qkv + t * qkv_n + k * groups * D;
            for (int64_t j = 0; j < seen; j++) {
                int64_t slot = table[j / BLOCK] * BLOCK + j % BLOCK;
                const float *key = cached(m, l, 0, k, slot, vec);
                for (int64_t g = 0; g < groups; g++)
                    scores[g * w->columns + j] = dotf(q + g * D, key, D) * scale;
            }
            for (int64_t g = 0; g < groups; g++) {
                float *sc = scores + g * w->columns, top = -INFINITY, total = 0;
                for (int64_t j = 0; j < seen; j++) top = sc[j] > top ? sc[j] : top;
                for (int64_t j = 0; j < seen; j++) total += sc[j] = expf(sc[j] - top);
                for (int64_t j = 0; j < seen; j++) sc[j] /= total;
            }
            float *out = w->att + t * heads * D + k * groups * D;
            memset(out, 0, groups * D * sizeof(float));
            for (int64_t j = 0; j < seen; j++) {
                int64_t slot = table[j / BLOCK] * BLOCK + j % BLOCK;
                const float *value = cached(m, l, 1, k, slot, vec + D);
                for (int64_t g = 0; g < groups; g++) {
                    float p = scores[g * w->columns + j];
                    for (int64_t i = 0; i < D; i++) out[g * D + i] += p * value[i];
                }
            }
        }
        barrier(&pool_, sense);
        /* 5. output projection onto the residual */
        for (int64_t t = tid; t < T; t += threads)
            prepare(&w->in, t, w->att + t * heads * D, heads * D);
        barrier(&pool_, sense);
        slice(L->o.out, tid, threads, &a, &b);
        q4_rows(&L->o, &w->in, T, a, b, s->x, H, 1);
        barrier(&pool_, sense);
        /* 6. normalise */
        for (int64_t t = tid; t < T; t += threads) {
            rms_norm(s->x + t * H, L->mlp_norm, H, m->eps, w->h + t * H);
            prepare(&w->in, t, w->h + t * H, H);
        }
        barrier(&pool_, sense);
        /* 7. gate and up (row i and row I + i by the same thread), their product */
        slice(I, tid, threads, &a, &b);
        float *gate = w->qkv; /* free again: [T, I] each half */
        q4_rows(&L->gate_up, &w->in, T, a, b, gate, 2 * I, 0);
        q4_rows(&L->gate_up, &w->in, T, I + a, I + b, gate, 2 * I, 0);
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = a; i < b; i++) {
                float g = gate[t * 2 * I + i], up = gate[t * 2 * I + I + i];
                w->act[t * I + i] = g / (1.0f + expf(-g)) * up;
            }
        barrier(&pool_, sense);
        for (int64_t t = tid; t < T; t += threads) prepare(&w->in, t, w->act + t * I, I);
        barrier(&pool_, sense);
        /* 8. down projection onto the residual */
        slice(L->down.out, tid, threads, &a, &b);
        q4_rows(&L->down, &w->in, T, a, b, s->x, H, 1);
        barrier(&pool_, sense);
    }
    /* the chosen tokens' logits */
    for (int64_t k = tid; k < s->outputs; k += threads) {
        rms_norm(s->x + s->chosen[k] * H, m->norm, H, m->eps, w->h + k * H);
        if (m->lm_codes) prepare(&w->in, k, w->h + k * H, H);
    }
    barrier(&pool_, sense);
    slice(m->vocab, tid, threads, &a, &b);
    if (m->lm_codes)
        q8_rows(m, &w->in, s->outputs, a, b, s->logits);
    else
        dense_rows(m, w->h, s->outputs, a, b, s->logits);
    barrier(&pool_, sense);
}

static void *worker(void *arg) {
    int tid = (int)(intptr_t)arg, sense = 0;
    long seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool_.generation, memory_order_acquire) == seen) {
            if (++spins < 20000) {
#ifdef HX_AVX2
                _mm_pause();
#endif
                continue;
            }
            pthread_mutex_lock(&pool_.lock);
            while (atomic_load(&pool_.generation) == seen && !pool_.stop)
                pthread_cond_wait(&pool_.wake, &pool_.lock);
            pthread_mutex_unlock(&pool_.lock);
            break;
        }
        if (pool_.stop) return NULL;
        seen = atomic_load(&pool_.generation);
        run(pool_.model, pool_.step, pool_.scratch, tid, pool_.n, &sense);
        atomic_fetch_add(&pool_.done, 1);
    }
}

static int main_sense = 0;

static void pool_resize(int n) {
    if (pool_.n == n) return;
    if (pool_.n > 1) {
        pthread_mutex_lock(&pool_.lock);
        pool_.stop = 1;
        pthread_cond_broadcast(&pool_.wake);
        pthread_mutex_unlock(&pool_.lock);
        for (int i = 0; i < pool_.n - 1; i++) pthread_join(pool_.workers[i], NULL);
        free(pool_.workers);
    }
    if (pool_.n == 0) {
        pthread_mutex_init(&pool_.lock, NULL);
        pthread_cond_init(&pool_.wake, NULL);
    }
    pool_.stop = 0;
    pool_.n = n;
    atomic_store(&pool_.arrived, 0);
    atomic_store(&pool_.sense, 0);
    main_sense = 0;
    atomic_store(&pool_.generation, 0);
    pool_.workers = NULL;
    if (n > 1) {
        pool_.workers = calloc(n - 1, sizeof(pthread_t));
        for (int i = 0; i < n - 1; i++)
            pthread_create(&pool_.workers[i], NULL, worker, (void *)(intptr_t)(i + 1));
    }
}

static int decode_locked(const Model *m, const Step *s, int threads);

/* Run every layer for ``step``'s tokens on ``threads`` threads (the caller's one of them),
 * one call at a time. Returns 0, or -1 when memory ran out. */
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;

int helexa_decode(const Model *m, const Step *s, int threads) {
    pthread_mutex_lock(&call_lock);
    int rc = decode_locked(m, s, threads);
    pthread_mutex_unlock(&call_lock);
    return rc;
}

static int decode_locked(const Model *m, const Step *s, int threads) {
    int64_t T = s->tokens, H = m->hidden, I = m->inter, D = m->head_dim;
    int64_t groups = m->heads / m->kv_heads, maxin = widest_input(m);
    int64_t qkv_n = (m->heads + 2 * m->kv_heads) * D, columns = 1;
    for (int64_t t = 0; t < T; t++) columns = s->pos[t] + 1 > columns ? s->pos[t] + 1 : columns;
    if (threads < 1) threads = 1;
    int64_t wide = qkv_n > 2 * I ? qkv_n : 2 * I;
    /* the 16-bit inputs take half a float each, rounded up */
    size_t floats = T * H + 2 * T * (maxin / GROUP) + T * maxin / 2 + 8 + T * wide +
                    T * m->heads * D + T * I + (size_t)threads * (groups * columns + 2 * D) + 64;
    float *block = aligned_alloc(32, ((floats * sizeof(float)) + 31) / 32 * 32);
    if (!block) return -1;
    Scratch w;
    float *p = block;
    w.h = p, p += T * H;
    w.in.stride = maxin;
    w.in.x16 = (int16_t *)p, p += (T * maxin + 1) / 2 + 8;
    w.in.xs = p, p += T * (maxin / GROUP);
    w.in.sums = p, p += T * (maxin / GROUP);
    w.qkv = p, p += T * wide;
    w.att = p, p += T * m->heads * D;
    w.act = p, p += T * I;
    w.scores = p, p += (size_t)threads * groups * columns;
    w.vec = p;
    w.columns = columns;
    pool_resize(threads);
    pool_.model = m, pool_.step = s, pool_.scratch = &w;
    atomic_store(&pool_.done, 0);
    if (threads > 1) {
        pthread_mutex_lock(&pool_.lock);
        atomic_fetch_add_explicit(&pool_.generation, 1, memory_order_release);
        pthread_cond_broadcast(&pool_.wake);
        pthread_mutex_unlock(&pool_.lock);
    }
    run(m, s, &w, 0, threads, &main_sense);
    int spins = 0;
    while (atomic_load(&pool_.done) < threads - 1) relax(&spins);
    free(block);
    return 0;
}
