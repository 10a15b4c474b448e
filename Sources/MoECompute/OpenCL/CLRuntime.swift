// A thin, honest wrapper over the OpenCL 1.2 C API: platforms, devices, a
// context with one in-order profiling queue, buffers, programs, kernels and
// events. Every failure becomes a `CLError` naming the call and the status.
import COpenCL
import Foundation

public struct CLError: Error, CustomStringConvertible {
    public let call: String
    public let status: cl_int
    public var description: String { "\(call) failed with \(CLError.statusName(status)) (\(status))" }

    static func check(_ status: cl_int, _ call: @autoclosure () -> String) throws {
        if status != CL_SUCCESS { throw CLError(call: call(), status: status) }
    }

    /// Every status of OpenCL 1.2 (and 2.0's two new ones), by the name the headers give it.
    static let statusNames: [cl_int: String] = [
        0: "CL_SUCCESS",
        -1: "CL_DEVICE_NOT_FOUND",
        -2: "CL_DEVICE_NOT_AVAILABLE",
        -3: "CL_COMPILER_NOT_AVAILABLE",
        -4: "CL_MEM_OBJECT_ALLOCATION_FAILURE",
        -5: "CL_OUT_OF_RESOURCES",
        -6: "CL_OUT_OF_HOST_MEMORY",
        -7: "CL_PROFILING_INFO_NOT_AVAILABLE",
        -8: "CL_MEM_COPY_OVERLAP",
        -9: "CL_IMAGE_FORMAT_MISMATCH",
        -10: "CL_IMAGE_FORMAT_NOT_SUPPORTED",
        -11: "CL_BUILD_PROGRAM_FAILURE",
        -12: "CL_MAP_FAILURE",
        -13: "CL_MISALIGNED_SUB_BUFFER_OFFSET",
        -14: "CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST",
        -15: "CL_COMPILE_PROGRAM_FAILURE",
        -16: "CL_LINKER_NOT_AVAILABLE",
        -17: "CL_LINK_PROGRAM_FAILURE",
        -18: "CL_DEVICE_PARTITION_FAILED",
        -19: "CL_KERNEL_ARG_INFO_NOT_AVAILABLE",
        -30: "CL_INVALID_VALUE",
        -31: "CL_INVALID_DEVICE_TYPE",
        -32: "CL_INVALID_PLATFORM",
        -33: "CL_INVALID_DEVICE",
        -34: "CL_INVALID_CONTEXT",
        -35: "CL_INVALID_QUEUE_PROPERTIES",
        -36: "CL_INVALID_COMMAND_QUEUE",
        -37: "CL_INVALID_HOST_PTR",
        -38: "CL_INVALID_MEM_OBJECT",
        -39: "CL_INVALID_IMAGE_FORMAT_DESCRIPTOR",
        -40: "CL_INVALID_IMAGE_SIZE",
        -41: "CL_INVALID_SAMPLER",
        -42: "CL_INVALID_BINARY",
        -43: "CL_INVALID_BUILD_OPTIONS",
        -44: "CL_INVALID_PROGRAM",
        -45: "CL_INVALID_PROGRAM_EXECUTABLE",
        -46: "CL_INVALID_KERNEL_NAME",
        -47: "CL_INVALID_KERNEL_DEFINITION",
        -48: "CL_INVALID_KERNEL",
        -49: "CL_INVALID_ARG_INDEX",
        -50: "CL_INVALID_ARG_VALUE",
        -51: "CL_INVALID_ARG_SIZE",
        -52: "CL_INVALID_KERNEL_ARGS",
        -53: "CL_INVALID_WORK_DIMENSION",
        -54: "CL_INVALID_WORK_GROUP_SIZE",
        -55: "CL_INVALID_WORK_ITEM_SIZE",
        -56: "CL_INVALID_GLOBAL_OFFSET",
        -57: "CL_INVALID_EVENT_WAIT_LIST",
        -58: "CL_INVALID_EVENT",
        -59: "CL_INVALID_OPERATION",
        -60: "CL_INVALID_GL_OBJECT",
        -61: "CL_INVALID_BUFFER_SIZE",
        -62: "CL_INVALID_MIP_LEVEL",
        -63: "CL_INVALID_GLOBAL_WORK_SIZE",
        -64: "CL_INVALID_PROPERTY",
        -65: "CL_INVALID_IMAGE_DESCRIPTOR",
        -66: "CL_INVALID_COMPILER_OPTIONS",
        -67: "CL_INVALID_LINKER_OPTIONS",
        -68: "CL_INVALID_DEVICE_PARTITION_COUNT",
        -69: "CL_INVALID_PIPE_SIZE",
        -70: "CL_INVALID_DEVICE_QUEUE",
        -1001: "CL_PLATFORM_NOT_FOUND_KHR"
    ]

    /// The status's name, with what to do where the user can do something.
    static func statusName(_ s: cl_int) -> String {
        guard let name = statusNames[s] else {
            // NVIDIA reports a kernel's out-of-bounds access as -9999 (not in the headers).
            return s == -9999 ? "NVIDIA -9999 (illegal memory access in a kernel)" : "unknown OpenCL status"
        }
        switch s {
        case -4, -5: return name + " (device out of memory or resources: use a smaller --batch-size, or --device cpu)"
        case -6: return name + " (the host is out of memory)"
        case -61: return name + " (a tensor over the device's largest allocation: use a smaller --batch-size or model, or --device cpu)"
        case -1001: return name + " (no OpenCL platform installed)"
        default: return name
        }
    }
}

/// A tensor the device cannot hold, found before asking the driver.
public struct DeviceMemoryError: Error, CustomStringConvertible {
    public let description: String
}

/// The loader's status when no ICD is registered (cl_khr_icd).
let CL_PLATFORM_NOT_FOUND_KHR: cl_int = -1001

// MARK: - Info queries

private func infoString(_ query: (Int, UnsafeMutableRawPointer?, UnsafeMutablePointer<Int>?) -> cl_int) -> String {
    var size = 0
    guard query(0, nil, &size) == CL_SUCCESS, size > 0 else { return "" }
    var bytes = [CChar](repeating: 0, count: size + 1)
    guard query(size, &bytes, nil) == CL_SUCCESS else { return "" }
    return String(cString: bytes).trimmingCharacters(in: .whitespaces)
}

private func infoValue<T>(_ zero: T, _ query: (Int, UnsafeMutableRawPointer?, UnsafeMutablePointer<Int>?) -> cl_int) -> T {
    var value = zero
    _ = withUnsafeMutableBytes(of: &value) { query($0.count, $0.baseAddress, nil) }
    return value
}

// MARK: - Platforms and devices

public struct CLPlatform: @unchecked Sendable {
    public let id: cl_platform_id
    public let index: Int

    public var name: String { infoString { clGetPlatformInfo(id, cl_platform_info(CL_PLATFORM_NAME), $0, $1, $2) } }
    public var vendor: String { infoString { clGetPlatformInfo(id, cl_platform_info(CL_PLATFORM_VENDOR), $0, $1, $2) } }
    public var version: String { infoString { clGetPlatformInfo(id, cl_platform_info(CL_PLATFORM_VERSION), $0, $1, $2) } }

    /// Every platform the ICD loader knows. None installed is an empty list, not an error.
    public static func all() -> [CLPlatform] {
        var count: cl_uint = 0
        guard clGetPlatformIDs(0, nil, &count) == CL_SUCCESS, count > 0 else { return [] }
        var ids = [cl_platform_id?](repeating: nil, count: Int(count))
        guard clGetPlatformIDs(count, &ids, nil) == CL_SUCCESS else { return [] }
        return ids.enumerated().compactMap { i, id in id.map { CLPlatform(id: $0, index: i) } }
    }

    public func devices() -> [CLDevice] {
        var count: cl_uint = 0
        guard clGetDeviceIDs(id, cl_device_type(CL_DEVICE_TYPE_ALL), 0, nil, &count) == CL_SUCCESS, count > 0 else { return [] }
        var ids = [cl_device_id?](repeating: nil, count: Int(count))
        guard clGetDeviceIDs(id, cl_device_type(CL_DEVICE_TYPE_ALL), count, &ids, nil) == CL_SUCCESS else { return [] }
        return ids.enumerated().compactMap { i, d in d.map { CLDevice(id: $0, platform: self, index: i) } }
    }
}

public struct CLDevice: @unchecked Sendable {
    public enum Kind: String, Sendable { case gpu, cpu, accelerator, other }

    public let id: cl_device_id
    public let platform: CLPlatform
    public let index: Int

    private func string(_ p: Int32) -> String { infoString { clGetDeviceInfo(id, cl_device_info(p), $0, $1, $2) } }
    private func value<T>(_ p: Int32, _ zero: T) -> T { infoValue(zero) { clGetDeviceInfo(id, cl_device_info(p), $0, $1, $2) } }

    public var name: String { string(CL_DEVICE_NAME) }
    public var vendor: String { string(CL_DEVICE_VENDOR) }
    public var driverVersion: String { string(CL_DRIVER_VERSION) }
    public var deviceVersion: String { string(CL_DEVICE_VERSION) }
    public var openCLCVersion: String { string(CL_DEVICE_OPENCL_C_VERSION) }
    public var extensions: String { string(CL_DEVICE_EXTENSIONS) }
    public var computeUnits: Int { Int(value(CL_DEVICE_MAX_COMPUTE_UNITS, cl_uint(0))) }
    public var clockMHz: Int { Int(value(CL_DEVICE_MAX_CLOCK_FREQUENCY, cl_uint(0))) }
    public var globalMemoryBytes: UInt64 { value(CL_DEVICE_GLOBAL_MEM_SIZE, cl_ulong(0)) }
    public var localMemoryBytes: UInt64 { value(CL_DEVICE_LOCAL_MEM_SIZE, cl_ulong(0)) }
    public var maxAllocationBytes: UInt64 { value(CL_DEVICE_MAX_MEM_ALLOC_SIZE, cl_ulong(0)) }
    public var maxWorkGroupSize: Int { value(CL_DEVICE_MAX_WORK_GROUP_SIZE, 0) }
    public var supportsFP16: Bool { extensions.contains("cl_khr_fp16") }
    public var supportsFP64: Bool { extensions.contains("cl_khr_fp64") || value(CL_DEVICE_DOUBLE_FP_CONFIG, cl_ulong(0)) != 0 }

    public var kind: Kind {
        let t = value(CL_DEVICE_TYPE, cl_device_type(0))
        if t & cl_device_type(CL_DEVICE_TYPE_GPU) != 0 { return .gpu }
        if t & cl_device_type(CL_DEVICE_TYPE_ACCELERATOR) != 0 { return .accelerator }
        if t & cl_device_type(CL_DEVICE_TYPE_CPU) != 0 { return .cpu }
        return .other
    }

    /// `opencl:P:D`, the name `--device` accepts for this device.
    public var selector: String { "opencl:\(platform.index):\(index)" }
}

// MARK: - Context, queue, buffers, events

/// One device, its context and an in-order queue with profiling enabled.
public final class CLContext: @unchecked Sendable {
    public let device: CLDevice
    let context: cl_context
    let queue: cl_command_queue
    /// Every launch, blocking transfer, finish and allocation on this context.
    public let counters = DeviceCounters()

    public init(device: CLDevice) throws {
        self.device = device
        let limit = device.maxAllocationBytes
        maxAllocation = limit > 0 ? Int(clamping: limit) : Int.max
        var status: cl_int = 0
        var dev: cl_device_id? = device.id
        guard let ctx = clCreateContext(nil, 1, &dev, nil, nil, &status), status == CL_SUCCESS else {
            throw CLError(call: "clCreateContext", status: status)
        }
        context = ctx
        guard let q = clCreateCommandQueue(ctx, device.id, cl_command_queue_properties(CL_QUEUE_PROFILING_ENABLE), &status),
              status == CL_SUCCESS else {
            clReleaseContext(ctx)
            throw CLError(call: "clCreateCommandQueue", status: status)
        }
        queue = q
    }

    deinit {
        // Drain the queue first: a non-blocking upload still reads its staging
        // buffer, freed with this object (an error thrown mid-step gets here with
        // uploads in flight). If the device is lost, keep the staging memory.
        if clFinish(queue) != CL_SUCCESS { for b in staging { _ = Unmanaged.passRetained(b) } }
        clReleaseCommandQueue(queue)
        clReleaseContext(context)
    }

    private let maxAllocation: Int
    private func mebibytes(_ b: Int) -> String { String(format: "%.1f MiB", Double(b) / 1_048_576) }

    public func finish() throws {
        counters.hostSync()
        try CLError.check(clFinish(queue), "clFinish")
        stagingInUse = 0
    }

    // Host copies of non-blocking uploads. The queue is in order, so after any
    // blocking read, write or finish every earlier upload is done and the
    // staging buffers are free again (`synced`). Grow-only: steady-state
    // steps allocate nothing.
    private var staging: [HostBuffer] = []
    private var stagingInUse = 0
    private let stagingLock = NSLock()

    /// A host buffer of at least `bytes` that stays untouched until the next sync.
    func stagingBuffer(bytes: Int) -> HostBuffer {
        stagingLock.lock(); defer { stagingLock.unlock() }
        if stagingInUse < staging.count, staging[stagingInUse].byteCount >= bytes {
            stagingInUse += 1
            return staging[stagingInUse - 1]
        }
        let b = HostBuffer(byteCount: bytes)
        if stagingInUse < staging.count { staging[stagingInUse] = b } else { staging.append(b) }
        stagingInUse += 1
        return b
    }

    /// Every command enqueued so far has completed (after a blocking call).
    func synced() {
        stagingLock.lock(); stagingInUse = 0; stagingLock.unlock()
    }

    public func makeBuffer(bytes: Int) throws -> CLBuffer {
        if bytes > maxAllocation {
            throw DeviceMemoryError(description: "a tensor of \(mebibytes(bytes)) is over \(device.name)'s largest allocation "
                + "(\(mebibytes(maxAllocation))): use a smaller --batch-size or model, or --device cpu")
        }
        var status: cl_int = 0
        // OpenCL forbids zero-sized buffers; an empty tensor still gets a valid handle.
        let mem = clCreateBuffer(context, cl_mem_flags(CL_MEM_READ_WRITE), max(bytes, 4), nil, &status)
        guard let mem, status == CL_SUCCESS else {
            throw CLError(call: "clCreateBuffer(\(bytes) bytes)", status: status)
        }
        counters.allocation(bytes: bytes)
        return CLBuffer(mem: mem, byteCount: bytes, context: self)
    }
}

/// A device allocation. Released when the last reference goes.
public final class CLBuffer: @unchecked Sendable {
    public let mem: cl_mem
    public let byteCount: Int
    unowned let context: CLContext

    init(mem: cl_mem, byteCount: Int, context: CLContext) {
        self.mem = mem; self.byteCount = byteCount; self.context = context
    }
    deinit {
        if !Self.keepReleased { clReleaseMemObject(mem) }
    }

    /// MOE_GPU_CL_KEEP_BUFFERS=1 (set by scripts/oclgrind.sh) leaks every buffer, so
    /// no buffer id is reused: oclgrind 21.10's uninitialized-memory plugin keeps the
    /// shadow of a released buffer that a kernel touched, and a larger buffer given the
    /// same id then reads as uninitialized past the old size (scripts/oclgrind-reuse.c).
    static let keepReleased = ProcessInfo.processInfo.environment["MOE_GPU_CL_KEEP_BUFFERS"] == "1"

    /// A blocking write (one host sync).
    public func write(from host: UnsafeRawPointer, byteOffset: Int = 0, bytes: Int) throws {
        guard bytes > 0 else { return }
        context.counters.hostSync()
        try CLError.check(clEnqueueWriteBuffer(context.queue, mem, cl_bool(CL_TRUE), byteOffset, bytes, host, 0, nil, nil),
                          "clEnqueueWriteBuffer")
        context.synced()
    }

    /// A non-blocking write from a staging copy of `host` (not a host sync; see `CLContext.stagingBuffer`).
    public func upload(from host: UnsafeRawPointer, byteOffset: Int = 0, bytes: Int) throws {
        guard bytes > 0 else { return }
        let stage = context.stagingBuffer(bytes: bytes)
        stage.pointer.copyMemory(from: host, byteCount: bytes)
        try CLError.check(clEnqueueWriteBuffer(context.queue, mem, cl_bool(CL_FALSE), byteOffset, bytes, stage.pointer, 0, nil, nil),
                          "clEnqueueWriteBuffer (non-blocking)")
    }

    /// A blocking read (one host sync).
    public func read(into host: UnsafeMutableRawPointer, byteOffset: Int = 0, bytes: Int) throws {
        guard bytes > 0 else { return }
        context.counters.hostSync()
        try CLError.check(clEnqueueReadBuffer(context.queue, mem, cl_bool(CL_TRUE), byteOffset, bytes, host, 0, nil, nil),
                          "clEnqueueReadBuffer")
        context.synced()
    }
}

// MARK: - Kernels

/// A kernel argument: a buffer, or a scalar passed by value.
public enum CLArg {
    case buffer(CLBuffer)
    case int(Int32)
    case float(Float)
}

public final class CLKernel: @unchecked Sendable {
    public let name: String
    let kernel: cl_kernel
    unowned let context: CLContext

    init(name: String, kernel: cl_kernel, context: CLContext) {
        self.name = name; self.kernel = kernel; self.context = context
    }
    deinit { clReleaseKernel(kernel) }

    /// Sets the arguments and enqueues an NDRange of `global` work-items,
    /// rounded up to a multiple of `local` when `local` is given. No event
    /// object is created: the queue is in order, and timing uses `finish`.
    public func launch(_ args: [CLArg], global: [Int], local: [Int]? = nil) throws {
        for (i, arg) in args.enumerated() {
            let status: cl_int
            switch arg {
            case .buffer(let b):
                var mem: cl_mem? = b.mem
                status = clSetKernelArg(kernel, cl_uint(i), MemoryLayout<cl_mem>.size, &mem)
            case .int(var v):
                status = clSetKernelArg(kernel, cl_uint(i), 4, &v)
            case .float(var v):
                status = clSetKernelArg(kernel, cl_uint(i), 4, &v)
            }
            try CLError.check(status, "clSetKernelArg(\(name), arg \(i))")
        }
        var globalSize = global
        if let local {
            for d in 0..<global.count { globalSize[d] = (global[d] + local[d] - 1) / local[d] * local[d] }
        }
        // A zero-sized launch is a no-op, not an error.
        if globalSize.contains(0) { return }
        context.counters.launch(kernel: name)
        let status = globalSize.withUnsafeBufferPointer { g -> cl_int in
            if let local {
                return local.withUnsafeBufferPointer { l in
                    clEnqueueNDRangeKernel(context.queue, kernel, cl_uint(global.count), nil, g.baseAddress, l.baseAddress, 0, nil, nil)
                }
            }
            return clEnqueueNDRangeKernel(context.queue, kernel, cl_uint(global.count), nil, g.baseAddress, nil, 0, nil, nil)
        }

        try CLError.check(status, "clEnqueueNDRangeKernel(\(name), global \(globalSize), local \(local.map { "\($0)" } ?? "auto"))")
    }
}
