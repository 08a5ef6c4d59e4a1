/* Compressed-domain CPU kernels of hf_signlock: y = x W^T with W read from its stored form, never made dense.
 *
 * Two codecs, one sign layout. Signs are bit-packed, LSB first, 1 = +1 (what every sign source decodes to).
 *   signmag: W[r, c] = s * levels[code] * scales[r, c / group]   codes `bits` wide, LSB first, row-major; scales fp16
 *   vq:      W[r, c] = s * codebook[code_j, k % group] * row_scale[r]   k = r * cols + c, j = k / group (groups run
 *            over the flattened matrix and may straddle rows); codes `bits` wide, LSB first
 * Stored magnitudes are clamped to a 1e-12 floor when decoded (so a zero level keeps its sign); the products here
 * leave the floor out: it moves an output by at most 1e-12 * sum |x|, far below float32 rounding of any real layer.
 *
 * Matrix-vector products (decode, batch 1) and small batches (up to SL_MAX_BATCH rows of x at a time; larger
 * batches are cut into such blocks): every weight is decoded once per block, in registers, and used for each row of
 * the block. Prefill and other large batches go through sl_*_decode_rows instead: row tiles decoded into a buffer
 * that fits in cache, multiplied by the caller's GEMM.
 *
 * With AVX-512 (F, VL, BW, DQ, VBMI) + FMA + F16C, signmag of 1-4-bit codes runs 16 weights a step: one load of their codes,
 * one shift and mask into 8 lanes, one permute into the level table (held in one or two registers), the signs
 * applied as a mask from one byte, one FMA per row of x. Everything else (wider codes, groups or widths that are not
 * multiples of 8, vq) takes the portable loop, which the compiler vectorises as it can.
 *
 * Threads: OpenMP over output rows, in the OpenMP runtime torch itself uses (libgomp.so.1, loaded by torch first),
 * with the thread count the caller passes (torch.get_num_threads()).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VBMI__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SL_SIMD 1
#else
#define SL_SIMD 0
#endif

#define SL_MAX_BATCH 4
#define SL_FLOOR 1e-12f

int sl_simd(void) { return SL_SIMD; }

int sl_version(void) { return 1; }

static inline float half_to_float(uint16_t h) {
#if SL_SIMD
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  /* subnormal: normalise */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400)) { mantissa <<= 1; exponent--; }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float value;
    memcpy(&value, &bits, 4);
    return value;
#endif
}

/* The `width`-bit value at bit `offset` of `codes` (width <= 8: it spans at most two bytes; `length` bytes exist). */
static inline uint32_t code_at(const uint8_t *codes, int64_t length, int64_t offset, int width) {
    int64_t byte = offset >> 3;
    uint32_t pair = codes[byte];
    if (byte + 1 < length) pair |= (uint32_t)codes[byte + 1] << 8;
    return (pair >> (offset & 7)) & ((1u << width) - 1);
}

/* +1 / -1 from bit k, without a branch (the bits are random: a branch would mispredict every other weight). */
static inline float sign_at(const uint8_t *signs, int64_t k) {
    return (float)((int)((signs[k >> 3] >> (k & 7)) & 1) * 2 - 1);
}

static int threads_for(int64_t work, int threads) {
    if (work < (1 << 16)) return 1;  /* a small layer: waking a second thread costs more than it saves */
    return threads < 1 ? 1 : threads;
}

/* --- signmag ---------------------------------------------------------------------------------------------------- */

static void signmag_rows_portable(const float *x, int64_t batch, int64_t r, int64_t cols, const uint8_t *codes,
                                  int64_t codes_len, int width, int64_t group, const float *levels,
                                  const uint16_t *scales, int64_t ngroups, const uint8_t *signs, float *y,
                                  int64_t rows) {
    float total[SL_MAX_BATCH] = {0};
    for (int64_t g = 0; g < ngroups; g++) {
        float partial[SL_MAX_BATCH] = {0};
        int64_t start = g * group, stop = start + group < cols ? start + group : cols;
        for (int64_t c = start; c < stop; c++) {
            int64_t k = r * cols + c;
            float w = sign_at(signs, k) * levels[code_at(codes, codes_len, k * width, width)];
            for (int64_t b = 0; b < batch; b++) partial[b] += w * x[b * cols + c];
        }
        float scale = half_to_float(scales[r * ngroups + g]);
        for (int64_t b = 0; b < batch; b++) total[b] += partial[b] * scale;
    }
    for (int64_t b = 0; b < batch; b++) y[b * rows + r] = total[b];
}

#if SL_SIMD
/* The SIMD row loop walks three pointers (codes, signs, x) and does no index arithmetic: per 16 weights, one load of
 * their codes (a broadcast for codes of up to 2 bits; else 8 bytes and a byte permute giving each lane the two bytes
 * holding its code), a shift per lane and a mask, one permute into the 16-entry level table (held negated), the
 * signs as a lane mask loaded from memory (lanes with bit 1, +1, negated back), one FMA per row of x. Rows whose
 * codes end fewer than 8 bytes before the buffer does take the portable loop (no read past the codes). */
typedef struct {
    __m512i bytes, shifts, mask;
    __m512 negated;
    __m256i shifts8, mask8;
    __m256 negated_low, negated_high;
    int width;
} Lanes;

static Lanes lanes_for(int width, const float *levels) {
    Lanes l;
    float table[16] = {0};
    uint8_t byte_index[64];
    uint32_t shift[16];
    for (int i = 0; i < (1 << width) && i < 16; i++) table[i] = -levels[i];
    for (int i = 0; i < 16; i++) {
        int bit = i * width, low = bit >> 3, high = low + 1 < 8 ? low + 1 : 7;
        byte_index[4 * i] = (uint8_t)low, byte_index[4 * i + 1] = (uint8_t)high;
        byte_index[4 * i + 2] = byte_index[4 * i + 3] = 0;
        shift[i] = (uint32_t)(width <= 2 ? bit : bit & 7);  /* <= 2 bits: lane i shifts the whole word */
    }
    l.bytes = _mm512_loadu_si512(byte_index), l.shifts = _mm512_loadu_si512(shift);
    l.mask = _mm512_set1_epi32((1 << width) - 1);
    l.negated = _mm512_loadu_ps(table);
    l.shifts8 = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(width));
    l.mask8 = _mm256_set1_epi32((1 << width) - 1);
    l.negated_low = _mm256_loadu_ps(table), l.negated_high = _mm256_loadu_ps(table + 8);
    l.width = width;
    return l;
}

static inline __m512 sixteen(const Lanes *l, const uint8_t *code, const uint8_t *sign) {
    __m512i words = l->width <= 2 ? _mm512_set1_epi32(*(const int32_t *)code)
                                  : _mm512_permutexvar_epi8(l->bytes, _mm512_castsi128_si512(
                                        _mm_loadl_epi64((const __m128i *)code)));
    __m512 negated = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srlv_epi32(words, l->shifts), l->mask),
                                           l->negated);
    return _mm512_mask_sub_ps(negated, _load_mask16((__mmask16 *)sign), _mm512_setzero_ps(), negated);
}

/* The negated levels of 8 weights (their codes at ``code``). */
static inline __m256 negated_eight(const Lanes *l, const uint8_t *code) {
    __m256i index = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*(const int32_t *)code), l->shifts8),
                                     l->mask8);
    return l->width == 4 ? _mm256_permutex2var_ps(l->negated_low, index, l->negated_high)
                         : _mm256_permutevar8x32_ps(l->negated_low, index);
}

/* The signed levels of 8 weights: lanes whose sign bit is 1 (+1) negated back. */
static inline __m256 eight(const Lanes *l, const uint8_t *code, const uint8_t *sign) {
    __m256 negated = negated_eight(l, code);
    return _mm256_mask_sub_ps(negated, (__mmask8)*sign, _mm256_setzero_ps(), negated);
}

/* Row r for B rows of x (B a constant in each caller: the accumulators stay in registers). */
static inline __attribute__((always_inline)) void signmag_row_simd(
    const int B, const Lanes *l, const float *x, int64_t r, int64_t cols, const uint8_t *codes, int64_t group,
    const uint16_t *scales, int64_t ngroups, const uint8_t *signs, float *y, int64_t rows) {
    const int64_t step = 2 * l->width;  /* code bytes of 16 weights */
    const uint8_t *code = codes + ((r * cols * l->width) >> 3), *sign = signs + ((r * cols) >> 3);
    const uint16_t *scale_row = scales + r * ngroups;
    __m512 total[SL_MAX_BATCH];
    for (int b = 0; b < B; b++) total[b] = _mm512_setzero_ps();
    int64_t c = 0;
    for (int64_t g = 0; g < ngroups; g++) {
        __m512 even[SL_MAX_BATCH], odd[SL_MAX_BATCH];
        for (int b = 0; b < B; b++) even[b] = odd[b] = _mm512_setzero_ps();
        int64_t stop = c + group < cols ? c + group : cols;
        for (; c + 32 <= stop; c += 32, code += 2 * step, sign += 4) {
            __m512 v0 = sixteen(l, code, sign), v1 = sixteen(l, code + step, sign + 2);
            for (int b = 0; b < B; b++) {
                even[b] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + b * cols + c), even[b]);
                odd[b] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + b * cols + c + 16), odd[b]);
            }
        }
        if (c + 16 <= stop) {
            __m512 v0 = sixteen(l, code, sign);
            for (int b = 0; b < B; b++) even[b] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + b * cols + c), even[b]);
            c += 16, code += step, sign += 2;
        }
        if (c < stop) {  /* 8 left: the group ends mid-way through 16 */
            __m256 v0 = eight(l, code, sign);
            for (int b = 0; b < B; b++)
                odd[b] = _mm512_add_ps(odd[b], _mm512_zextps256_ps512(_mm256_mul_ps(v0, _mm256_loadu_ps(
                    x + b * cols + c))));
            c += 8, code += l->width, sign += 1;
        }
        __m512 s = _mm512_set1_ps(_cvtsh_ss(scale_row[g]));
        for (int b = 0; b < B; b++) total[b] = _mm512_fmadd_ps(_mm512_add_ps(even[b], odd[b]), s, total[b]);
    }
    for (int b = 0; b < B; b++) y[b * rows + r] = _mm512_reduce_add_ps(total[b]);
}

/* Whether row r's codes end at least 8 bytes before the buffer does (the SIMD loads read up to 8 bytes at a time). */
static inline int row_has_slack(int64_t r, int64_t cols, int width, int64_t codes_len) {
    return (((r + 1) * cols * width) >> 3) + 8 <= codes_len;
}
#endif

/* y[b, r] = sum_c x[b, c] W[r, c] for b < block <= SL_MAX_BATCH; x: block x cols, y: block x rows, float32. */
static void signmag_block(const float *x, int64_t block, int64_t rows, int64_t cols, const uint8_t *codes,
                          int64_t codes_len, int width, int64_t group, const float *levels, const uint16_t *scales,
                          const uint8_t *signs, float *y, int threads) {
    int64_t ngroups = (cols + group - 1) / group;
#if SL_SIMD
    int fast = width <= 4 && cols % 8 == 0 && group % 8 == 0;
    Lanes lanes = lanes_for(width <= 4 ? width : 1, levels);
#endif
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols * block, threads))
    for (int64_t r = 0; r < rows; r++) {
#if SL_SIMD
        if (fast && row_has_slack(r, cols, width, codes_len)) {
            switch (block) {
            case 1: signmag_row_simd(1, &lanes, x, r, cols, codes, group, scales, ngroups, signs, y, rows); break;
            case 2: signmag_row_simd(2, &lanes, x, r, cols, codes, group, scales, ngroups, signs, y, rows); break;
            case 3: signmag_row_simd(3, &lanes, x, r, cols, codes, group, scales, ngroups, signs, y, rows); break;
            default: signmag_row_simd(4, &lanes, x, r, cols, codes, group, scales, ngroups, signs, y, rows);
            }
            continue;
        }
#endif
        signmag_rows_portable(x, block, r, cols, codes, codes_len, width, group, levels, scales, ngroups, signs, y,
                              rows);
    }
}

/* Rows first .. first + count of W, float32, exactly as the decode path computes them (sign * max(level * scale,
 * floor), the product in float32): a tile for the caller's GEMM. */
void sl_signmag_decode_rows(int64_t first, int64_t count, int64_t cols, const uint8_t *codes, int64_t codes_len,
                            int width, int64_t group, const float *levels, const uint16_t *scales,
                            const uint8_t *signs, float *out, int threads) {
    int64_t ngroups = (cols + group - 1) / group;
#if SL_SIMD
    int fast = width <= 4 && cols % 8 == 0 && group % 8 == 0;
    Lanes lanes = lanes_for(width <= 4 ? width : 1, levels);
    __m256 floor = _mm256_set1_ps(SL_FLOOR), zero = _mm256_setzero_ps();
#endif
#pragma omp parallel for schedule(static) num_threads(threads_for(count * cols, threads))
    for (int64_t i = 0; i < count; i++) {
        int64_t r = first + i;
#if SL_SIMD
        if (fast && row_has_slack(r, cols, width, codes_len)) {  /* the same float32 product, floor and sign */
            const uint8_t *code = codes + ((r * cols * width) >> 3), *sign = signs + ((r * cols) >> 3);
            for (int64_t g = 0, c = 0; g < ngroups; g++) {
                __m256 scale = _mm256_set1_ps(_cvtsh_ss(scales[r * ngroups + g]));
                for (int64_t stop = c + group < cols ? c + group : cols; c < stop; c += 8, code += width, sign += 1) {
                    __m256 level = _mm256_sub_ps(zero, negated_eight(&lanes, code));
                    __m256 magnitude = _mm256_max_ps(_mm256_mul_ps(level, scale), floor);
                    _mm256_storeu_ps(out + i * cols + c, _mm256_mask_sub_ps(magnitude, (__mmask8)~*sign, zero,
                                                                            magnitude));
                }
            }
            continue;
        }
#endif
        for (int64_t g = 0; g < ngroups; g++) {
            float scale = half_to_float(scales[r * ngroups + g]);
            int64_t start = g * group, stop = start + group < cols ? start + group : cols;
            for (int64_t c = start; c < stop; c++) {
                int64_t k = r * cols + c;
                float magnitude = levels[code_at(codes, codes_len, k * width, width)] * scale;
                out[i * cols + c] = sign_at(signs, k) * (magnitude > SL_FLOOR ? magnitude : SL_FLOOR);
            }
        }
    }
}

/* --- vq --------------------------------------------------------------------------------------------------------- */

#if SL_SIMD
/* 16 sign bits starting at bit k (any k), from a buffer of `length` bytes. */
static inline uint32_t sign_bits_at(const uint8_t *signs, int64_t length, int64_t k) {
    int64_t byte = k >> 3;
    uint32_t word = 0;
    if (byte + 4 <= length) {
        memcpy(&word, signs + byte, 4);
    } else {
        for (int64_t i = byte; i < length; i++) word |= (uint32_t)signs[i] << (8 * (i - byte));
    }
    return word >> (k & 7);
}
#endif

/* Row r of vq for B rows of x (B a constant in each caller: the accumulators stay in registers). The row is walked
 * codeword by codeword (the group index counted, not divided per weight); with SIMD, up to 16 weights of a codeword
 * a step: a masked load of the codeword's values and of x (masked lanes are never read), the signs as a lane mask,
 * one FMA per row of x. */
static inline __attribute__((always_inline)) void vq_row(
    const int B, const float *x, int64_t r, int64_t rows, int64_t cols, const uint8_t *codes, int64_t codes_len,
    int width, int64_t group, const float *codebook, const float *row_scale, const uint8_t *signs, float *y) {
    int64_t first = r * cols, j = first / group, p = first - j * group, c = 0;
#if SL_SIMD
    int64_t signs_len = (rows * cols + 7) >> 3;
    __m512 acc[SL_MAX_BATCH];
    for (int b = 0; b < B; b++) acc[b] = _mm512_setzero_ps();
#else
    float total[SL_MAX_BATCH] = {0};
#endif
    while (c < cols) {
        int64_t take = group - p < cols - c ? group - p : cols - c;
        const float *word = codebook + (int64_t)code_at(codes, codes_len, j * width, width) * group + p;
#if SL_SIMD
        for (int64_t i = 0; i < take; i += 16) {
            int64_t n = take - i < 16 ? take - i : 16;
            __mmask16 lanes = (__mmask16)((1u << n) - 1);
            __m512 w = _mm512_maskz_loadu_ps(lanes, word + i);
            __mmask16 negative = (__mmask16)(~sign_bits_at(signs, signs_len, first + c + i)) & lanes;
            w = _mm512_mask_sub_ps(w, negative, _mm512_setzero_ps(), w);
            for (int b = 0; b < B; b++)
                acc[b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, x + b * cols + c + i), acc[b]);
        }
#else
        for (int64_t q = 0; q < take; q++) {
            float w = sign_at(signs, first + c + q) * word[q];
            for (int b = 0; b < B; b++) total[b] += w * x[b * cols + c + q];
        }
#endif
        c += take, j += 1, p = 0;
    }
    for (int b = 0; b < B; b++)
#if SL_SIMD
        y[b * rows + r] = _mm512_reduce_add_ps(acc[b]) * row_scale[r];
#else
        y[b * rows + r] = total[b] * row_scale[r];
#endif
}

/* As signmag_block, for vq. */
static void vq_block(const float *x, int64_t block, int64_t rows, int64_t cols, const uint8_t *codes,
                     int64_t codes_len, int width, int64_t group, const float *codebook, const float *row_scale,
                     const uint8_t *signs, float *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols * block, threads))
    for (int64_t r = 0; r < rows; r++) {
        switch (block) {
        case 1: vq_row(1, x, r, rows, cols, codes, codes_len, width, group, codebook, row_scale, signs, y); break;
        case 2: vq_row(2, x, r, rows, cols, codes, codes_len, width, group, codebook, row_scale, signs, y); break;
        case 3: vq_row(3, x, r, rows, cols, codes, codes_len, width, group, codebook, row_scale, signs, y); break;
        default: vq_row(4, x, r, rows, cols, codes, codes_len, width, group, codebook, row_scale, signs, y);
        }
    }
}

void sl_vq_decode_rows(int64_t first, int64_t count, int64_t cols, const uint8_t *codes, int64_t codes_len,
                       int width, int64_t group, const float *codebook, const float *row_scale, const uint8_t *signs,
                       float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(count * cols, threads))
    for (int64_t i = 0; i < count; i++) {
        int64_t r = first + i;
        for (int64_t c = 0; c < cols; c++) {
            int64_t k = r * cols + c, j = k / group;
            float magnitude = codebook[(int64_t)code_at(codes, codes_len, j * width, width) * group + (k - j * group)]
                              * row_scale[r];
            out[i * cols + c] = sign_at(signs, k) * (magnitude > SL_FLOOR ? magnitude : SL_FLOOR);
        }
    }
}

/* --- entry point with the activations' own dtype --------------------------------------------------------------- */

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

static inline uint16_t float_to_bf16(float value) {  /* round to nearest even, as torch casts (NaN kept NaN) */
    uint32_t bits;
    memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

/* y = x W^T with x and y float32 (dtype 0) or bfloat16 (dtype 1), so that a bf16 model's activations need no cast
 * on either side (two torch ops a layer, a tenth of a small layer's time). kind 0: signmag, 1: vq. Returns 0, or -1
 * when a buffer cannot be allocated. */
int sl_matmul(int kind, const void *x, int x_dtype, int64_t batch, int64_t rows, int64_t cols, const uint8_t *codes,
              int64_t codes_len, int width, int64_t group, const float *table, const void *scales,
              const uint8_t *signs, void *y, int y_dtype, int threads) {
    float *xf = (float *)x, *yf = (float *)y;
    if (x_dtype == 1) {
        xf = (float *)malloc(sizeof(float) * batch * cols);
        if (xf == NULL) return -1;
        for (int64_t i = 0; i < batch * cols; i++) xf[i] = bf16_to_float(((const uint16_t *)x)[i]);
    }
    if (y_dtype == 1) {
        yf = (float *)malloc(sizeof(float) * batch * rows);
        if (yf == NULL) {
            if (x_dtype == 1) free(xf);
            return -1;
        }
    }
    for (int64_t b0 = 0; b0 < batch; b0 += SL_MAX_BATCH) {  /* each weight decoded once per block of x's rows */
        int64_t block = batch - b0 < SL_MAX_BATCH ? batch - b0 : SL_MAX_BATCH;
        if (kind == 0)
            signmag_block(xf + b0 * cols, block, rows, cols, codes, codes_len, width, group, table,
                          (const uint16_t *)scales, signs, yf + b0 * rows, threads);
        else
            vq_block(xf + b0 * cols, block, rows, cols, codes, codes_len, width, group, table, (const float *)scales,
                     signs, yf + b0 * rows, threads);
    }
    if (y_dtype == 1) {
        for (int64_t i = 0; i < batch * rows; i++) ((uint16_t *)y)[i] = float_to_bf16(yf[i]);
        free(yf);
    }
    if (x_dtype == 1) free(xf);
    return 0;
}
