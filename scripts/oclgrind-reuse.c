// The oclgrind 21.10 false positive that scripts/oclgrind.sh works around with
// MOE_GPU_CL_KEEP_BUFFERS=1. A kernel writes a 2-float buffer, the buffer is
// released, a new 8-float buffer gets the same buffer id, a kernel fills all 8
// floats and another scales them: oclgrind --uninitialized reports floats 2..7
// of the scale as uninitialized. Without the first buffer's kernel, or with the
// first buffer kept alive, there is no report.
//
//   gcc scripts/oclgrind-reuse.c -o /tmp/oclgrind-reuse -lOpenCL
//   oclgrind --uninitialized /tmp/oclgrind-reuse     # 6 reports: floats 2..7
//   oclgrind --uninitialized /tmp/oclgrind-reuse keep  # none
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <stdio.h>
#include <string.h>

static const char *source =
    "__kernel void fill(__global float* x, const int n, const float v) { int i = get_global_id(0); if (i < n) x[i] = v; }\n"
    "__kernel void scale(__global float* x, const int n, const float a) { int i = get_global_id(0); if (i < n) x[i] *= a; }\n";

static void launch(cl_command_queue queue, cl_kernel kernel, cl_mem buffer, int n, float value) {
    size_t global = 64;
    clSetKernelArg(kernel, 0, sizeof(cl_mem), &buffer);
    clSetKernelArg(kernel, 1, sizeof(int), &n);
    clSetKernelArg(kernel, 2, sizeof(float), &value);
    clEnqueueNDRangeKernel(queue, kernel, 1, NULL, &global, NULL, 0, NULL, NULL);
    clFinish(queue);
}

int main(int argc, char **argv) {
    int keep = argc > 1 && strcmp(argv[1], "keep") == 0;
    cl_platform_id platform;
    cl_device_id device;
    cl_int status;
    clGetPlatformIDs(1, &platform, NULL);
    clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 1, &device, NULL);
    cl_context context = clCreateContext(NULL, 1, &device, NULL, NULL, &status);
    cl_command_queue queue = clCreateCommandQueue(context, device, 0, &status);
    cl_program program = clCreateProgramWithSource(context, 1, &source, NULL, &status);
    if (clBuildProgram(program, 1, &device, "-cl-opt-disable", NULL, NULL) != CL_SUCCESS) { puts("build failed"); return 1; }
    cl_kernel fill = clCreateKernel(program, "fill", &status), scale = clCreateKernel(program, "scale", &status);

    cl_mem small = clCreateBuffer(context, CL_MEM_READ_WRITE, 2 * sizeof(float), NULL, &status);
    launch(queue, fill, small, 2, 1);
    if (!keep) clReleaseMemObject(small);

    cl_mem large = clCreateBuffer(context, CL_MEM_READ_WRITE, 8 * sizeof(float), NULL, &status);
    launch(queue, fill, large, 8, 1);
    launch(queue, scale, large, 8, 3);
    float out[8];
    clEnqueueReadBuffer(queue, large, CL_TRUE, 0, sizeof out, out, 0, NULL, NULL);
    printf("%g ... %g\n", out[0], out[7]);
    return 0;
}
