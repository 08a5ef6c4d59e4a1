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
 * applied as a mask from one byte, one FMA per row of x. vq with a book of up to 16 codewords multiplies through a
 * slot layout built at load (one permute of a codebook column gives 16 weights; see "the slot layout"); other vq
 * layers decode a chunk of rows into an L1 buffer, codeword by codeword, and multiply it 16 weights a step.
 * Everything else (wider signmag codes, groups or widths that are not multiples of 8, vq codewords over 64 weights)
 * takes the portable loop, which the compiler vectorises as it can.
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
#define SL_STACK_FLOATS 4096  /* activations up to this size are converted on the stack, not in a malloc'd buffer */
#define SL_FLOOR 1e-12f

int sl_simd(void) { return SL_SIMD; }

int sl_version(void) { return 4; }

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
static void signmag_decode_rows(int64_t first, int64_t count, int64_t cols, const uint8_t *codes, int64_t codes_len,
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

/* The matrix-vector product and the tiles both decode W a chunk of rows at a time into a thread's buffer that stays
 * in L1, codeword by codeword: one code read and a copy of the codeword per group, with no per-weight index work
 * (the weights' positions in the codebook follow from the codeword's). The product then reads the chunk 16 weights a
 * step, with the signs as a lane mask and one FMA per row of x; the tiles apply sign, row scale and floor. */
#define SL_VQ_CHUNK 4096     /* weights of W decoded at a time (16 KiB of float32) */
#define SL_VQ_SIMD_GROUP 64  /* the widest codeword the SIMD copy takes (wider ones: the portable copy) */
#define SL_VQ_PAD 80         /* buffer floats on either side of a chunk: a codeword starts up to group - 1 before
                              * it, and the last one's 16-float stores run up to 15 floats past its own end */

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

/* The codebook values (unsigned, unscaled) of the flattened weights k0 .. k0 + n - 1 (n >= 1) into out[0 .. n).
 * The SIMD copy stores whole 16-float blocks, so each codeword's stores run past its end (the next codeword's
 * overwrite them) and the first starts before out: out needs SL_VQ_PAD floats of room on either side. */
#if SL_SIMD
/* Codewords j .. stop from dst on: W (1, 2, 4, 8: a code within one byte; 0: any width, `width`) and BLOCKS (16-float
 * blocks a codeword spans; 0: a codeword of up to 8 floats) are constants in each instance, so the loop has no
 * per-codeword branches. */
static inline __attribute__((always_inline)) void vq_copy_codewords(
    const int W, const int64_t BLOCKS, int width, int64_t j, int64_t stop, const uint8_t *codes, int64_t codes_len,
    int64_t group, const float *codebook, float *dst) {
    const __mmask16 last = (__mmask16)((1u << (group - 16 * (BLOCKS > 0 ? BLOCKS - 1 : 0))) - 1);
    for (; j <= stop; j++, dst += group) {
        uint32_t code = W ? (uint32_t)(codes[(j * W) >> 3] >> ((j * W) & 7)) & ((1u << W) - 1)
                          : code_at(codes, codes_len, j * width, width);
        const float *src = codebook + (int64_t)code * group;
        if (BLOCKS == 0) {  /* a codeword of up to 8: one 8-float store (a 16-float one splits a line every other time) */
            _mm256_storeu_ps(dst, _mm256_maskz_loadu_ps((__mmask8)last, src));
            continue;
        }
        int64_t b = 0;
        for (; b + 1 < BLOCKS; b++) _mm512_storeu_ps(dst + 16 * b, _mm512_loadu_ps(src + 16 * b));
        _mm512_storeu_ps(dst + 16 * b, _mm512_maskz_loadu_ps(last, src + 16 * b));  /* no read past the book */
    }
}

#define SL_VQ_COPY_BLOCKS(W)                                                                                        \
    switch (blocks) {                                                                                             \
    case 0: vq_copy_codewords(W, 0, width, j, stop, codes, codes_len, group, codebook, dst); break;               \
    case 1: vq_copy_codewords(W, 1, width, j, stop, codes, codes_len, group, codebook, dst); break;               \
    case 2: vq_copy_codewords(W, 2, width, j, stop, codes, codes_len, group, codebook, dst); break;               \
    case 3: vq_copy_codewords(W, 3, width, j, stop, codes, codes_len, group, codebook, dst); break;               \
    default: vq_copy_codewords(W, 4, width, j, stop, codes, codes_len, group, codebook, dst);                     \
    }
#endif

static void vq_values(int64_t k0, int64_t n, const uint8_t *codes, int64_t codes_len, int width, int64_t group,
                      const float *codebook, float *out) {
    int64_t j = k0 / group, stop = (k0 + n - 1) / group;
    float *dst = out - (k0 - j * group);
#if SL_SIMD
    if (group <= SL_VQ_SIMD_GROUP) {
        const int64_t blocks = group <= 8 ? 0 : (group + 15) / 16;  /* 0: one 8-float store */
        switch (width) {
        case 1: SL_VQ_COPY_BLOCKS(1) break;
        case 2: SL_VQ_COPY_BLOCKS(2) break;
        case 4: SL_VQ_COPY_BLOCKS(4) break;
        case 8: SL_VQ_COPY_BLOCKS(8) break;
        default: SL_VQ_COPY_BLOCKS(0)
        }
        return;
    }
#endif
    for (; j <= stop; j++, dst += group) {  /* only the part inside out[0 .. n) */
        const float *src = codebook + (int64_t)code_at(codes, codes_len, j * width, width) * group;
        int64_t from = dst < out ? out - dst : 0, to = dst + group > out + n ? out + n - dst : group;
        memcpy(dst + from, src + from, sizeof(float) * (to - from));
    }
}

/* y[b * rows] = row_scale * sum_c s[k + c] * values[c] * x[b, c] for b < B (a constant in each caller, so that the
 * accumulators stay in registers): one row of W (its signs from bit k) against B rows of x. */
static inline __attribute__((always_inline)) void vq_dot(
    const int B, const float *x, int64_t cols, const float *values, const uint8_t *signs, int64_t signs_len,
    int64_t k, float row_scale, float *y, int64_t rows) {
#if SL_SIMD
    __m512 acc[SL_MAX_BATCH], odd[SL_MAX_BATCH];  /* two chains per row of x: an FMA waits on the one before */
    for (int b = 0; b < B; b++) acc[b] = odd[b] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
        __mmask16 plus0, plus1;  /* the lanes whose sign bit is 1 (+1) */
        if ((k & 7) == 0) {      /* the row starts on a byte of signs (every layer whose width is a multiple of 8) */
            plus0 = _load_mask16((__mmask16 *)(signs + ((k + c) >> 3)));
            plus1 = _load_mask16((__mmask16 *)(signs + ((k + c) >> 3) + 2));
        } else {
            plus0 = (__mmask16)sign_bits_at(signs, signs_len, k + c);
            plus1 = (__mmask16)sign_bits_at(signs, signs_len, k + c + 16);
        }
        __m512 w0 = _mm512_loadu_ps(values + c), w1 = _mm512_loadu_ps(values + c + 16);
        w0 = _mm512_mask_sub_ps(w0, _knot_mask16(plus0), _mm512_setzero_ps(), w0);
        w1 = _mm512_mask_sub_ps(w1, _knot_mask16(plus1), _mm512_setzero_ps(), w1);
        for (int b = 0; b < B; b++) {
            acc[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + b * cols + c), acc[b]);
            odd[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + b * cols + c + 16), odd[b]);
        }
    }
    for (; c < cols; c += 16) {
        __mmask16 lanes = cols - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cols - c)) - 1);
        __m512 w = _mm512_maskz_loadu_ps(lanes, values + c);
        __mmask16 negative = (__mmask16)~sign_bits_at(signs, signs_len, k + c) & lanes;
        w = _mm512_mask_sub_ps(w, negative, _mm512_setzero_ps(), w);
        for (int b = 0; b < B; b++)
            acc[b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, x + b * cols + c), acc[b]);
    }
    for (int b = 0; b < B; b++) y[b * rows] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b], odd[b])) * row_scale;
#else
    (void)signs_len;
    float total[SL_MAX_BATCH] = {0};
    for (int64_t c = 0; c < cols; c++) {
        float w = sign_at(signs, k + c) * values[c];
        for (int b = 0; b < B; b++) total[b] += w * x[b * cols + c];
    }
    for (int b = 0; b < B; b++) y[b * rows] = total[b] * row_scale;
#endif
}

#define SL_VQ_BUFFER (SL_VQ_CHUNK + 2 * SL_VQ_PAD)
static _Thread_local float sl_vq_buffer[SL_VQ_BUFFER] __attribute__((aligned(64)));  /* one per thread (16.6 KiB) */

/* Rows of one chunk, signed, scaled and floored exactly as the decode path computes them (sign * max(value *
 * row_scale, floor), the product in float32). */
static void vq_finish_rows(int64_t r0, int64_t count, int64_t cols, const float *values, const float *row_scale,
                           const uint8_t *signs, int64_t signs_len, float *out) {
    for (int64_t i = 0; i < count; i++) {
        int64_t r = r0 + i, c = 0;
#if SL_SIMD  /* the same float32 product and floor, 16 at a time; lanes whose sign bit is 0 negated */
        const __m512 scale = _mm512_set1_ps(row_scale[r]), floor = _mm512_set1_ps(SL_FLOOR);
        for (; c + 16 <= cols; c += 16) {
            __m512 magnitude = _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(values + i * cols + c), scale), floor);
            __mmask16 minus = (__mmask16)~sign_bits_at(signs, signs_len, r * cols + c);
            _mm512_storeu_ps(out + i * cols + c, _mm512_mask_sub_ps(magnitude, minus, _mm512_setzero_ps(), magnitude));
        }
#else
        (void)signs_len;
#endif
        for (; c < cols; c++) {
            float magnitude = values[i * cols + c] * row_scale[r];
            out[i * cols + c] = sign_at(signs, r * cols + c) * (magnitude > SL_FLOOR ? magnitude : SL_FLOOR);
        }
    }
}

/* Rows first .. first + count of W (float32, as the decode path gives them) into out, or (x != NULL) y[b, r] =
 * sum_c x[b, c] W[r, c] for those rows, b < batch. Returns -1 when the buffers cannot be allocated. */
static int vq_rows(int64_t first, int64_t count, int64_t rows, int64_t cols, const uint8_t *codes,
                   int64_t codes_len, int width, int64_t group, const float *codebook, const float *row_scale,
                   const uint8_t *signs, const float *x, int64_t batch, float *out, int threads) {
    if (count <= 0 || cols <= 0) return 0;
    int64_t per_chunk = cols < SL_VQ_CHUNK ? SL_VQ_CHUNK / cols : 1, chunks = (count + per_chunk - 1) / per_chunk;
    int64_t size = per_chunk * cols + 2 * SL_VQ_PAD, signs_len = (rows * cols + 7) >> 3;
    int team = threads_for(4 * count * cols * (x ? batch : 1), threads);  /* 4: a vq weight costs about 4 signmag ones */
    if (team > chunks) team = (int)chunks;
    /* Rows up to a chunk wide use each thread's own buffer, kept warm across calls: a buffer malloc'd a call cost
     * a small layer's product up to half its time in situ (fresh pages, cold lines). Wider rows allocate. */
    float *buffers = NULL;
    if (size > SL_VQ_BUFFER) {
        buffers = (float *)malloc(sizeof(float) * size * team);
        if (buffers == NULL) return -1;
    }
#pragma omp parallel for schedule(static) num_threads(team)
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
#ifdef _OPENMP
        float *values = (buffers ? buffers + size * omp_get_thread_num() : sl_vq_buffer) + SL_VQ_PAD;
#else
        float *values = (buffers ? buffers : sl_vq_buffer) + SL_VQ_PAD;
#endif
        int64_t r0 = first + chunk * per_chunk, n = count - chunk * per_chunk < per_chunk ? count - chunk * per_chunk
                                                                                           : per_chunk;
        vq_values(r0 * cols, n * cols, codes, codes_len, width, group, codebook, values);
        if (x == NULL) {
            vq_finish_rows(r0, n, cols, values, row_scale, signs, signs_len, out + (r0 - first) * cols);
            continue;
        }
        for (int64_t i = 0; i < n; i++) {
            int64_t r = r0 + i;
            for (int64_t b0 = 0; b0 < batch; b0 += SL_MAX_BATCH) {
                const float *xb = x + b0 * cols, *w = values + i * cols;
                float *yb = out + b0 * rows + r;
                switch (batch - b0 < SL_MAX_BATCH ? batch - b0 : SL_MAX_BATCH) {
                case 1: vq_dot(1, xb, cols, w, signs, signs_len, r * cols, row_scale[r], yb, rows); break;
                case 2: vq_dot(2, xb, cols, w, signs, signs_len, r * cols, row_scale[r], yb, rows); break;
                case 3: vq_dot(3, xb, cols, w, signs, signs_len, r * cols, row_scale[r], yb, rows); break;
                default: vq_dot(4, xb, cols, w, signs, signs_len, r * cols, row_scale[r], yb, rows);
                }
            }
        }
    }
    free(buffers);
    return 0;
}

/* --- entry points ---------------------------------------------------------------------------------------------- */

/* One layer's stored weight, as the caller keeps it for the layer's lifetime (one pointer a call instead of ten
 * arguments: at batch 1 a small layer's product takes a few microseconds, as long as passing them). kind 0: signmag
 * (table: the levels, scales: float16 group scales), 1: vq (table: the codebook, scales: float32 row scales). */
typedef struct {
    int64_t kind, rows, cols, codes_len, width, group, table_rows;
    const uint8_t *codes;
    const float *table;
    const void *scales;
    const uint8_t *signs;
    const void *slots;  /* vq with a small codebook: the slot layout (sl_vq_slots_build), else NULL */
} SlLayer;

/* --- vq with a codebook of up to 16 codewords: the slot layout ------------------------------------------------- */

/* A row's columns are cut into slots of `group` columns (slot s: columns s * group .. s * group + group - 1, the
 * last padded), 16 slots to a block. Column c = s * group + q of row r is weight k = r * cols + c, at position
 * (o + q) mod group of codeword J + s + (o + q) / group, where J = r * cols / group and o = r * cols mod group: for
 * q < group - o the codes of codewords J + s (vector A), else those of J + s + 1 (vector B), and the position is the
 * same for every slot. So one permute of a codebook column (held in a register: 16 codewords) by A or B gives 16
 * weights, one per slot, at position q of each; x is laid out once a call in the same order (zero past the row),
 * and the signs are laid out once at load: per row and block, one 16-bit mask per q. Per 16 weights: a permute, a
 * masked negate, one FMA per row of x; no per-weight index work. The layout built at load (`slots`):
 *   float columns[group][16]       the codebook transposed: columns[p][code] (codes past the book: 0)
 *   uint16 masks[rows][blocks][group]  bit j: the sign of row r, column (16 * block + j) * group + q is +1 */
#define SL_SLOT_CODES 16

static inline int64_t slot_blocks(int64_t cols, int64_t group) {
    return ((cols + group - 1) / group + 15) / 16;
}

/* Bytes of the slot layout of this layer, or 0 where it does not apply (not vq, a codebook over 16 codewords, half
 * the lanes or more idle, a build without the SIMD paths). */
int64_t sl_vq_slots_bytes(const SlLayer *l) {
#if SL_SIMD
    if (l->kind != 1 || l->table_rows > SL_SLOT_CODES || l->group < 1 || l->rows < 1 || l->cols < 1) return 0;
    /* rows of fewer than 8 slots a block (codewords long against the row) would leave most lanes idle: there the
     * chunk decode is as fast */
    const int64_t slots = (l->cols + l->group - 1) / l->group;
    if (2 * slots < 16 * slot_blocks(l->cols, l->group)) return 0;
    return (int64_t)sizeof(float) * l->group * SL_SLOT_CODES +
           (int64_t)sizeof(uint16_t) * l->rows * slot_blocks(l->cols, l->group) * l->group;
#else
    (void)l;
    return 0;
#endif
}

/* Fill `out` (sl_vq_slots_bytes(l) bytes) with the slot layout. Returns 0, or -1 when it does not apply. */
int sl_vq_slots_build(const SlLayer *l, void *out) {
    if (sl_vq_slots_bytes(l) == 0) return -1;
    const int64_t rows = l->rows, cols = l->cols, group = l->group, blocks = slot_blocks(cols, group);
    float *columns = (float *)out;
    uint16_t *masks = (uint16_t *)(columns + group * SL_SLOT_CODES);
    for (int64_t p = 0; p < group; p++)
        for (int64_t code = 0; code < SL_SLOT_CODES; code++)
            columns[p * SL_SLOT_CODES + code] = code < l->table_rows ? l->table[code * group + p] : 0.0f;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < blocks; b++)
            for (int64_t q = 0; q < group; q++) {
                uint16_t mask = 0;
                for (int64_t j = 0; j < 16; j++) {
                    int64_t c = (16 * b + j) * group + q;
                    int64_t k = r * cols + c;
                    if (c < cols && ((l->signs[k >> 3] >> (k & 7)) & 1)) mask |= (uint16_t)(1u << j);
                }
                masks[(r * blocks + b) * group + q] = mask;
            }
    return 0;
}

#if SL_SIMD
/* The codes of codewords j .. j + 15 (A) and j + 1 .. j + 16 (B), one per 32-bit lane (past the last codeword: 0).
 * Codes of 1, 2, 4 or 8 bits come from one load, spread over the lanes by shifts; other widths, and the end of the
 * codes, one code at a time. */
static inline void slot_codes(const SlLayer *l, int64_t j, int64_t codewords, __m512i *a, __m512i *b) {
    const int width = (int)l->width;
    int32_t last;
    if (width == 4 && j + 17 <= codewords && (j >> 1) + 9 <= l->codes_len) {
        uint64_t word;
        memcpy(&word, l->codes + (j >> 1), 8);
        uint64_t extra = l->codes[(j >> 1) + 8];
        if (j & 1) {  /* starts on a high nibble: the 16 codes span 8.5 bytes */
            word = (word >> 4) | (extra << 60);
            last = (int32_t)((extra >> 4) & 15);
        } else {
            last = (int32_t)(extra & 15);
        }
        /* qword i of v: the word shifted by 8 i bits; its two nibbles go to lanes 2 i and 2 i + 1 */
        const __m512i v = _mm512_srlv_epi64(_mm512_set1_epi64((long long)word),
                                            _mm512_set_epi64(56, 48, 40, 32, 24, 16, 8, 0));
        const __m512i nibble = _mm512_set1_epi64(15);
        *a = _mm512_or_si512(_mm512_and_si512(v, nibble),
                             _mm512_slli_epi64(_mm512_and_si512(_mm512_srli_epi64(v, 4), nibble), 32));
    } else if ((width == 1 || width == 2) && j + 17 <= codewords && ((j * width) >> 3) + 8 <= l->codes_len) {
        uint64_t word;  /* 17 codes of 1 or 2 bits: at most 34 + 7 bits from where they start */
        memcpy(&word, l->codes + ((j * width) >> 3), 8);
        word >>= (j * width) & 7;
        const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __m512i shifts = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(width));
        *a = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)(uint32_t)word), shifts),
                              _mm512_set1_epi32((1 << width) - 1));
        last = (int32_t)((word >> (16 * width)) & ((1u << width) - 1));
    } else if (width == 8 && j + 17 <= codewords && j + 17 <= l->codes_len) {
        *a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(l->codes + j)));
        last = l->codes[j + 16];
    } else {
        int32_t codes[16];
        for (int i = 0; i < 16; i++)
            codes[i] = j + i < codewords ? (int32_t)code_at(l->codes, l->codes_len, (j + i) * width, width) : 0;
        last = j + 16 < codewords ? (int32_t)code_at(l->codes, l->codes_len, (j + 16) * width, width) : 0;
        *a = _mm512_loadu_si512(codes);
    }
    *b = _mm512_alignr_epi32(_mm512_set1_epi32(last), *a, 1);  /* lanes 1 .. 15 of A, then code j + 16 */
}

/* 16 weights (one per slot) at column offset q: codebook column p permuted by the slots' codes, signs applied. */
static inline __m512 slot_weights(const float *columns, int64_t p, __m512i codes, uint16_t plus) {
    __m512 w = _mm512_permutexvar_ps(codes, _mm512_loadu_ps(columns + p * SL_SLOT_CODES));
    return _mm512_mask_sub_ps(w, (__mmask16)~plus, _mm512_setzero_ps(), w);
}

/* y[b, r] for rows first .. first + count, b < B (a constant per instance), from the slot layout; xs: x laid out
 * as slots (B x blocks x group x 16 floats, `stride` floats apart). */
static inline __attribute__((always_inline)) void vq_slot_rows(const int B, const SlLayer *l, const float *xs,
                                                               int64_t stride, int64_t first, int64_t count,
                                                               float *y) {
    const int64_t rows = l->rows, cols = l->cols, group = l->group, blocks = slot_blocks(cols, group);
    const int64_t codewords = (rows * cols + group - 1) / group;
    const float *columns = (const float *)l->slots;
    const uint16_t *masks = (const uint16_t *)(columns + group * SL_SLOT_CODES);
    const float *row_scale = (const float *)l->scales;
    for (int64_t r = first; r < first + count; r++) {
        const int64_t j0 = r * cols / group, o = r * cols - j0 * group;
        __m512 acc[SL_MAX_BATCH], odd[SL_MAX_BATCH];  /* two chains per row of x: an FMA waits on the one before */
        for (int b = 0; b < B; b++) acc[b] = odd[b] = _mm512_setzero_ps();
        for (int64_t block = 0; block < blocks; block++) {
            __m512i a, next;
            slot_codes(l, j0 + 16 * block, codewords, &a, &next);
            const uint16_t *m = masks + (r * blocks + block) * group;
            const float *xb = xs + block * group * 16;
            int64_t q = 0;
            /* q < group - o: codewords j0 + s, position o + q; then codewords j0 + s + 1, position o + q - group */
            for (; q + 1 < group - o; q += 2) {
                __m512 w0 = slot_weights(columns, o + q, a, m[q]), w1 = slot_weights(columns, o + q + 1, a, m[q + 1]);
                for (int b = 0; b < B; b++) {
                    acc[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + b * stride + q * 16), acc[b]);
                    odd[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + b * stride + q * 16 + 16), odd[b]);
                }
            }
            for (; q < group; q++) {
                __m512 w = q < group - o ? slot_weights(columns, o + q, a, m[q])
                                         : slot_weights(columns, o + q - group, next, m[q]);
                for (int b = 0; b < B; b++)
                    acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + b * stride + q * 16), acc[b]);
            }
        }
        for (int b = 0; b < B; b++)
            y[b * rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b], odd[b])) * row_scale[r];
    }
}

/* y = x W^T through the slot layout, x and y float32, batch rows of x at most SL_MAX_BATCH at a time. Returns 0,
 * or -1 when the laid-out x cannot be allocated. */
static int vq_slot_matmul(const SlLayer *l, const float *x, int64_t batch, float *y, int threads) {
    const int64_t rows = l->rows, cols = l->cols, group = l->group, blocks = slot_blocks(cols, group);
    const int64_t stride = blocks * group * 16, block_rows = batch < SL_MAX_BATCH ? batch : SL_MAX_BATCH;
    float stack[SL_STACK_FLOATS];
    float *xs = stride * block_rows <= SL_STACK_FLOATS ? stack : (float *)malloc(sizeof(float) * stride * block_rows);
    if (xs == NULL) return -1;
    /* a slot weight costs about a fifth of a signmag one (measured): small layers stay on one thread */
    const int team = threads_for(rows * cols * block_rows / 4, threads);
    for (int64_t b0 = 0; b0 < batch; b0 += SL_MAX_BATCH) {
        const int64_t n = batch - b0 < SL_MAX_BATCH ? batch - b0 : SL_MAX_BATCH;
        for (int64_t b = 0; b < n; b++)  /* xs[b][block][q][j] = x[b, (16 * block + j) * group + q] (0 past cols) */
            for (int64_t block = 0; block < blocks; block++)
                for (int64_t j = 0; j < 16; j++)
                    for (int64_t q = 0, c = (16 * block + j) * group; q < group; q++, c++)
                        xs[b * stride + (block * group + q) * 16 + j] = c < cols ? x[(b0 + b) * cols + c] : 0.0f;
        float *yb = y + b0 * rows;
        const int64_t chunk = (rows + team - 1) / team;
#pragma omp parallel for schedule(static) num_threads(team)
        for (int t = 0; t < team; t++) {
            const int64_t first = t * chunk, count = rows - first < chunk ? rows - first : chunk;
            if (count <= 0) continue;
            switch (n) {
            case 1: vq_slot_rows(1, l, xs, stride, first, count, yb); break;
            case 2: vq_slot_rows(2, l, xs, stride, first, count, yb); break;
            case 3: vq_slot_rows(3, l, xs, stride, first, count, yb); break;
            default: vq_slot_rows(4, l, xs, stride, first, count, yb);
            }
        }
    }
    if (xs != stack) free(xs);
    return 0;
}
#endif

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


/* y = x W^T, x: batch x cols and y: batch x rows, both float32 (dtype 0) or bfloat16 (dtype 1; read and written
 * directly, so a bf16 model's activations need no cast op on either side). Returns 0, or -1 when a buffer cannot be
 * allocated. */
int sl_matmul(const SlLayer *l, const void *x, int64_t batch, void *y, int dtype, int threads) {
    const int64_t rows = l->rows, cols = l->cols;
    float x_stack[SL_STACK_FLOATS], y_stack[SL_STACK_FLOATS];
    float *xf = (float *)x, *yf = (float *)y;
    int status = 0;
    if (batch <= 0 || rows <= 0) return 0;
    if (dtype == 1) {
        xf = batch * cols <= SL_STACK_FLOATS ? x_stack : (float *)malloc(sizeof(float) * batch * cols);
        yf = batch * rows <= SL_STACK_FLOATS ? y_stack : (float *)malloc(sizeof(float) * batch * rows);
        if (xf == NULL || yf == NULL) {
            status = -1;
            goto done;
        }
        for (int64_t i = 0; i < batch * cols; i++) xf[i] = bf16_to_float(((const uint16_t *)x)[i]);
    }
    if (cols <= 0) {
        memset(yf, 0, sizeof(float) * batch * rows);
    } else if (l->kind == 0) {
        for (int64_t b0 = 0; b0 < batch; b0 += SL_MAX_BATCH)  /* each weight decoded once per block of x's rows */
            signmag_block(xf + b0 * cols, batch - b0 < SL_MAX_BATCH ? batch - b0 : SL_MAX_BATCH, rows, cols,
                          l->codes, l->codes_len, (int)l->width, l->group, l->table, (const uint16_t *)l->scales,
                          l->signs, yf + b0 * rows, threads);
#if SL_SIMD
    } else if (l->slots != NULL) {  /* set only where sl_vq_slots_bytes applies: a SIMD build */
        status = vq_slot_matmul(l, xf, batch, yf, threads);
#endif
    } else {
        status = vq_rows(0, rows, rows, cols, l->codes, l->codes_len, (int)l->width, l->group, l->table,
                         (const float *)l->scales, l->signs, xf, batch, yf, threads);
    }
    if (dtype == 1 && status == 0)
        for (int64_t i = 0; i < batch * rows; i++) ((uint16_t *)y)[i] = float_to_bf16(yf[i]);
done:
    if (dtype == 1) {
        if (xf != x_stack) free(xf);
        if (yf != y_stack) free(yf);
    }
    return status;
}

/* Rows first .. first + count of W, float32, exactly as the decode path computes them (sign * max(magnitude,
 * floor), the magnitude's product in float32): a tile for the caller's GEMM. Returns 0, or -1 when a buffer
 * cannot be allocated. */
int sl_decode_rows(const SlLayer *l, int64_t first, int64_t count, float *out, int threads) {
    if (l->kind == 0) {
        signmag_decode_rows(first, count, l->cols, l->codes, l->codes_len, (int)l->width, l->group, l->table,
                            (const uint16_t *)l->scales, l->signs, out, threads);
        return 0;
    }
    return vq_rows(first, count, l->rows, l->cols, l->codes, l->codes_len, (int)l->width, l->group, l->table,
                   (const float *)l->scales, l->signs, NULL, 0, out, threads);
}

/* Rows index[0 .. n) of W (as sl_decode_rows gives them) into out, float32 (dtype 0) or bfloat16 (dtype 1, rounded
 * as torch casts): an embedding lookup, written in the model's dtype so that no cast op follows. Returns 0, -1 when
 * a buffer cannot be allocated, or -2 (nothing written) when an index is outside [0, rows). */
int sl_gather_rows(const SlLayer *l, const int64_t *index, int64_t n, void *out, int dtype) {
    const int64_t cols = l->cols;
    float row_stack[SL_STACK_FLOATS];
    for (int64_t i = 0; i < n; i++)
        if (index[i] < 0 || index[i] >= l->rows) return -2;
    float *row = dtype == 0 || cols <= SL_STACK_FLOATS ? row_stack : (float *)malloc(sizeof(float) * cols);
    if (row == NULL) return -1;
    int status = 0;
    for (int64_t i = 0; i < n && status == 0; i++) {
        if (dtype == 0) {
            status = sl_decode_rows(l, index[i], 1, (float *)out + i * cols, 1);
            continue;
        }
        status = sl_decode_rows(l, index[i], 1, row, 1);
        for (int64_t c = 0; c < cols; c++) ((uint16_t *)out)[i * cols + c] = float_to_bf16(row[c]);
    }
    if (row != row_stack) free(row);
    return status;
}
