// Target the OpenCL 1.2 API: every vendor's driver and PoCL provide it.
#define CL_TARGET_OPENCL_VERSION 120
#define CL_USE_DEPRECATED_OPENCL_1_2_APIS
#include <CL/cl.h>
