// Element-wise kernels over contiguous f32 ranges. Every buffer argument is
// followed by its offset in elements, so tensors can be views into a buffer.

__kernel void fill_f32(__global float* x, const int offX, const int n, const float value)
{
    const int i = get_global_id(0);
    if (i < n) x[offX + i] = value;
}

__kernel void copy_f32(__global const float* src, const int offSrc,
                       __global float* dst, const int offDst, const int n)
{
    const int i = get_global_id(0);
    if (i < n) dst[offDst + i] = src[offSrc + i];
}

// y = alpha * x + y
__kernel void axpy_f32(const float alpha, __global const float* x, const int offX,
                       __global float* y, const int offY, const int n)
{
    const int i = get_global_id(0);
    if (i < n) y[offY + i] = fma(alpha, x[offX + i], y[offY + i]);
}

// c = a + b
__kernel void add_f32(__global const float* a, const int offA, __global const float* b, const int offB,
                      __global float* c, const int offC, const int n)
{
    const int i = get_global_id(0);
    if (i < n) c[offC + i] = a[offA + i] + b[offB + i];
}

// x = alpha * x
__kernel void scale_f32(__global float* x, const int offX, const int n, const float alpha)
{
    const int i = get_global_id(0);
    if (i < n) x[offX + i] *= alpha;
}
