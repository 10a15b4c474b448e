// Rotary position embedding (PositionOps.rotary; see Sources/MoECompute/Ops/Rotary.swift).
// Element c of head h of token t is x[offX + t * ld + column + h * d + c];
// elements c and c + d/2 rotate together by the angle (float)pos[t] * f_c,
// negated when `inverse` is 1. One work-item per (token, frequency), looping
// over the heads, so each cos / sin is computed once per token.
//
// The inverse frequency f_c is computed here rather than uploaded: the same
// float32 values as RotaryConfig.inverseFrequencies() on the host (transformers'
// float32 inv_freq and Llama-3 scaling). With cl_khr_fp64 every float32
// division is done in float64 and rounded (exactly the correctly rounded
// float32 quotient; OpenCL's float division may be off by 2.5 ulp), pow and
// cos / sin in float64 and rounded. Without it, float32 built-ins (a few ulp).
// Products rounded separately, no fused multiply-add (Hugging Face's order).

#pragma OPENCL FP_CONTRACT OFF

#ifdef cl_khr_fp64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#define ROPE_DIV(a, b) ((float)((double)(a) / (double)(b)))
#define ROPE_POW(a, b) ((float)pow((double)(a), (double)(b)))
#define ROPE_COS(a) ((float)cos((double)(a)))
#define ROPE_SIN(a) ((float)sin((double)(a)))
#else
#define ROPE_DIV(a, b) ((a) / (b))
#define ROPE_POW(a, b) pow((a), (b))
#define ROPE_COS(a) cos(a)
#define ROPE_SIN(a) sin(a)
#endif

#define ROPE_TWO_PI 6.28318530717958647692f

// transformers' inv_freq (and _compute_llama3_parameters when scaled), float32.
static float rope_inv_freq(const int i, const int d, const float theta, const int scaled,
                           const float factor, const float lowFF, const float highFF, const float oldCtx)
{
    const float e = ROPE_DIV((float)(2 * i), (float)d);
    const float f = ROPE_DIV(1.0f, ROPE_POW(theta, e));
    if (!scaled) return f;
    const float lowWavelen = ROPE_DIV(oldCtx, lowFF), highWavelen = ROPE_DIV(oldCtx, highFF);
    const float wavelen = ROPE_DIV(ROPE_TWO_PI, f);
    if (wavelen > lowWavelen) return ROPE_DIV(f, factor);
    if (wavelen < highWavelen) return f;
    const float smooth = ROPE_DIV(ROPE_DIV(oldCtx, wavelen) - lowFF, highFF - lowFF);
    const float a = ROPE_DIV((1.0f - smooth) * f, factor);
    const float b = smooth * f;
    return a + b;
}

__kernel void rotary(__global float* x, const int offX, __global const int* pos, const int offP,
                     const int tokens, const int heads, const int d, const int ld, const int column,
                     const float theta, const int inverse, const int scaled,
                     const float factor, const float lowFF, const float highFF, const float oldCtx)
{
    const int hd = d / 2;
    const int gid = get_global_id(0);
    if (gid >= tokens * hd) return;
    const int t = gid / hd, i = gid - t * hd;
    const float f = rope_inv_freq(i, d, theta, scaled, factor, lowFF, highFF, oldCtx);
    const float angle = (float)pos[offP + t] * f;
    const float c = ROPE_COS(angle);
    const float s = inverse ? -ROPE_SIN(angle) : ROPE_SIN(angle);
    __global float* lo = x + offX + t * ld + column + i;
    for (int h = 0; h < heads; h++) {
        const float a = lo[h * d], b = lo[h * d + hd];
        const float ac = a * c, bs = b * s, bc = b * c, as = a * s;
        lo[h * d] = ac - bs;
        lo[h * d + hd] = bc + as;
    }
}
