import COpenCL
import Foundation

/// Runs every op as an OpenCL kernel from Kernels/ on one device. Programs are
/// built on first use with the device's tile parameters and cached on disk.
public final class OpenCLBackend: Backend, @unchecked Sendable {
    public let context: CLContext
    public let cache: ProgramCache?
    public let tuning: KernelTuning
    public var device: CLDevice { context.device }
    public var name: String { device.selector }
    public var deviceDescription: String { "\(device.name) (\(device.platform.name), \(device.kind.rawValue))" }
    public var counters: DeviceCounters { context.counters }

    private var programs: [String: CLProgram] = [:]
    /// The programs built so far (for reporting build and cache times).
    public var builtPrograms: [CLProgram] {
        lock.lock(); defer { lock.unlock() }
        return programs.values.sorted { $0.file < $1.file }
    }
    private var kernels: [String: CLKernel] = [:]
    private let lock = NSLock()

    /// `tuning` defaults to the parameters chosen for the device's type.
    public init(device: CLDevice, cache: ProgramCache? = ProgramCache(), tuning: KernelTuning? = nil) throws {
        context = try CLContext(device: device)
        self.cache = cache
        self.tuning = tuning ?? KernelTuning(for: device)
    }

    /// The program built from Kernels/`file` for this device (built once per
    /// backend and set of extra `-D` options).
    public func program(_ file: String, defines: String = "") throws -> CLProgram {
        lock.lock(); defer { lock.unlock() }
        let key = defines.isEmpty ? file : file + " " + defines
        if let p = programs[key] { return p }
        let options = defines.isEmpty ? tuning.options(for: file) : tuning.options(for: file) + " " + defines
        let p = try CLProgram.build(file: file, source: try KernelSources.source(file),
                                    options: options, context: context, cache: cache)
        programs[key] = p
        return p
    }

    /// Kernel `name` from Kernels/`file` (built with `defines`), created once.
    public func kernel(_ name: String, in file: String, defines: String = "") throws -> CLKernel {
        let key = file + ":" + name + ":" + defines
        lock.lock()
        if let k = kernels[key] { lock.unlock(); return k }
        lock.unlock()
        let k = try program(file, defines: defines).kernel(name)
        lock.lock(); kernels[key] = k; lock.unlock()
        return k
    }

    func buffer(_ t: Tensor) throws -> CLBuffer {
        guard case .device(let b) = t.storage, t.backend === self else {
            throw ShapeError("tensor \(t.shape) does not live on \(name)")
        }
        return b
    }

    /// The (buffer, offset) argument pair every kernel takes for a tensor.
    func arg(_ t: Tensor) throws -> [CLArg] { [.buffer(try buffer(t)), .int(Int32(t.offset))] }

    public func makeTensor(shape: [Int], dtype: DType) throws -> Tensor {
        try require(shape.allSatisfy { $0 >= 0 }, "negative dimension in shape \(shape)")
        let count = shape.reduce(1, *)
        try require(count < Int(Int32.max), "tensor \(shape) is over 2^31 elements")
        let b = try context.makeBuffer(bytes: count * dtype.byteSize)
        let t = Tensor(shape: shape, dtype: dtype, storage: .device(b), backend: self)
        if count > 0 {
            // Zero with a kernel rather than clEnqueueFillBuffer: cheap and portable.
            try launch1D("fill_f32", in: "elementwise.cl", [.buffer(b), .int(0), .int(Int32(count)), .float(0)], count: count)
        }
        return t
    }

    public func write(_ bytes: UnsafeRawBufferPointer, to tensor: Tensor) throws {
        try require(bytes.count == tensor.count * tensor.dtype.byteSize, "write of \(bytes.count) bytes into tensor \(tensor.shape)")
        guard let base = bytes.baseAddress else { return }
        try buffer(tensor).write(from: base, byteOffset: tensor.offset * tensor.dtype.byteSize, bytes: bytes.count)
    }

    public func upload(_ bytes: UnsafeRawBufferPointer, to tensor: Tensor) throws {
        try require(bytes.count == tensor.count * tensor.dtype.byteSize, "upload of \(bytes.count) bytes into tensor \(tensor.shape)")
        guard let base = bytes.baseAddress else { return }
        try buffer(tensor).upload(from: base, byteOffset: tensor.offset * tensor.dtype.byteSize, bytes: bytes.count)
    }

    public func read(_ tensor: Tensor, into bytes: UnsafeMutableRawBufferPointer) throws {
        try require(bytes.count == tensor.count * tensor.dtype.byteSize, "read of tensor \(tensor.shape) into \(bytes.count) bytes")
        guard let base = bytes.baseAddress else { return }
        try buffer(tensor).read(into: base, byteOffset: tensor.offset * tensor.dtype.byteSize, bytes: bytes.count)
    }

    public func synchronize() throws { try context.finish() }

    func launch1D(_ name: String, in file: String, _ args: [CLArg], count: Int) throws {
        try kernel(name, in: file).launch(args, global: [count], local: [tuning.elementwiseGroup])
    }

    public func fill(_ x: Tensor, value: Float) throws {
        try require(x.dtype == .f32, "fill takes an f32 tensor")
        try launch1D("fill_f32", in: "elementwise.cl", try arg(x) + [.int(Int32(x.count)), .float(value)], count: x.count)
    }

    public func copy(_ src: Tensor, to dst: Tensor) throws {
        try require(src.dtype == dst.dtype && src.count == dst.count, "copy \(src.shape) \(src.dtype) to \(dst.shape) \(dst.dtype)")
        // Same bit width: the f32 copy kernel moves i32 data unchanged.
        try launch1D("copy_f32", in: "elementwise.cl", try arg(src) + arg(dst) + [.int(Int32(src.count))], count: src.count)
    }

    public func axpy(_ alpha: Float, _ x: Tensor, _ y: Tensor) throws {
        try ElementwiseCheck.same("axpy", x, y)
        try launch1D("axpy_f32", in: "elementwise.cl", [.float(alpha)] + arg(x) + arg(y) + [.int(Int32(x.count))], count: x.count)
    }

    public func add(_ a: Tensor, _ b: Tensor, into c: Tensor) throws {
        try ElementwiseCheck.same("add", a, b, c)
        try launch1D("add_f32", in: "elementwise.cl", try arg(a) + arg(b) + arg(c) + [.int(Int32(a.count))], count: a.count)
    }

    public func scale(_ x: Tensor, by alpha: Float) throws {
        try require(x.dtype == .f32, "scale takes an f32 tensor")
        try launch1D("scale_f32", in: "elementwise.cl", try arg(x) + [.int(Int32(x.count)), .float(alpha)], count: x.count)
    }

    /// Grow-only scratch memory (packed operands). The queue is in order, so
    /// one op's scratch is free again when the next op is enqueued.
    private var scratch: [Int: CLBuffer] = [:]
    func scratchBuffer(bytes: Int, slot: Int = 0) throws -> CLBuffer {
        if let s = scratch[slot], s.byteCount >= bytes { return s }
        let s = try context.makeBuffer(bytes: bytes)
        scratch[slot] = s
        return s
    }

    public func gemm(_ g: Gemm, _ a: Tensor, _ b: Tensor, _ c: Tensor, grouping: GemmGrouping, epilogue: GemmEpilogue) throws {
        try g.validate(a, b, c, grouping: grouping, epilogue: epilogue)
        guard g.m > 0, g.n > 0, g.batch > 0 else { return }
        // Unused pointer arguments still need a valid buffer.
        let placeholder = try scratchPlaceholder()
        let mode: Int32, offsets: [CLArg]
        switch grouping {
        case .batch: (mode, offsets) = (0, [.buffer(placeholder), .int(0)])
        case .rows(let o): (mode, offsets) = (1, try arg(o))
        case .contraction(let o): (mode, offsets) = (2, try arg(o))
        }
        let tail: [CLArg] = [.int(mode)] + offsets + [.int(Int32(g.batch))]
            + (try epilogue.bias.map(arg) ?? [.buffer(placeholder), .int(0)])
            + [.int(epilogue.bias == nil ? 0 : 1), .int(epilogue.activation.rawValue)]
        // Row blocks: for grouped rows each expert rounds up to whole blocks, so
        // the grid covers the worst case of m rows plus one partial block per expert.
        func rowBlocks(_ rows: Int) -> Int {
            if case .rows = grouping { return (g.m + rows - 1) / rows + g.batch }
            return (g.m + rows - 1) / rows
        }
        let batches: Int
        if case .rows = grouping { batches = 1 } else { batches = g.batch }

        var aArgs = try arg(a) + [.int(Int32(g.lda)), .int(Int32(g.strideA)), .int(g.transA ? 1 : 0)]
        let head: [CLArg] = [.int(Int32(g.m)), .int(Int32(g.n)), .int(Int32(g.k)), .float(g.alpha), .float(g.beta)]
        let cArgs = try arg(c) + [.int(Int32(g.ldc)), .int(Int32(g.strideC))]

        // The SwiGLU epilogue is a compile-time variant of the same kernels.
        let defines = epilogue.swiGLU ? "-DGLU=1" : ""
        let bColumns = epilogue.swiGLU ? 2 * g.n : g.n
        if !tuning.cpuGemm {
            let t = tuning.gemm
            aArgs += try arg(b) + [.int(Int32(g.ldb)), .int(Int32(g.strideB)), .int(g.transB ? 1 : 0)]
            let local = [t.tileN / t.wptN, t.tileM / t.wptM, 1]
            let global = [(g.n + t.tileN - 1) / t.tileN * local[0], rowBlocks(t.tileM) * local[1], batches]
            return try kernel("gemm", in: "gemm.cl", defines: defines).launch(head + aArgs + cArgs + tail, global: global, local: local)
        }

        // CPU device: pack A^T to M x K so each row of op(A) streams contiguously
        // (reading A^T in place walks a cache line per k: 3x slower for dW).
        if g.transA {
            let groups: Int
            if case .contraction = grouping { groups = 1 } else { groups = g.batch }
            let packed = try scratchBuffer(bytes: groups * g.k * g.m * 4, slot: 1)
            try kernel("transpose", in: "gemm.cl").launch(
                try arg(a) + [.int(Int32(g.lda)), .int(Int32(g.strideA)), .buffer(packed), .int(Int32(g.k)), .int(Int32(g.m))],
                global: [g.m, g.k, groups])
            aArgs = [.buffer(packed), .int(0), .int(Int32(g.k)), .int(Int32(g.k * g.m)), .int(0)]
        }
        // Pack op(B) to K x N row-major when B is transposed.
        var bArgs = try arg(b) + [.int(Int32(g.ldb)), .int(Int32(g.strideB))]
        if g.transB {
            // Stored B is (groups of) n x k with leading dim ldb; the packed copy is k x n.
            let groups: Int
            if case .contraction = grouping { groups = 1 } else { groups = g.batch }
            let packed = try scratchBuffer(bytes: groups * g.k * bColumns * 4)
            try kernel("transpose", in: "gemm.cl").launch(
                try arg(b) + [.int(Int32(g.ldb)), .int(Int32(g.strideB)), .buffer(packed), .int(Int32(bColumns)), .int(Int32(g.k))],
                global: [g.k, bColumns, groups])
            bArgs = [.buffer(packed), .int(0), .int(Int32(bColumns)), .int(Int32(g.k * bColumns))]
        }
        let rows = tuning.cpuRows, cols = 16 * tuning.cpuVecs
        return try kernel("gemm_cpu", in: "gemm.cl", defines: defines).launch(
            head + aArgs + bArgs + cArgs + tail,
            global: [rowBlocks(rows), (g.n + cols - 1) / cols, batches], local: [1, 1, 1])
    }

    private var scratchTensors: [String: CLBuffer] = [:]
    /// A temporary of `count` elements for one op (partial sums, chunk counts):
    /// grow-only per slot and not zeroed, so steady-state steps allocate
    /// nothing. The queue is in order, so a slot is free again as soon as the
    /// next op is enqueued; ops needing two temporaries use two slots.
    func scratchTensor(_ slot: String, _ count: Int, dtype: DType = .f32) throws -> Tensor {
        let bytes = max(count, 1) * dtype.byteSize
        let buffer: CLBuffer
        if let s = scratchTensors[slot], s.byteCount >= bytes { buffer = s } else {
            buffer = try context.makeBuffer(bytes: bytes)
            scratchTensors[slot] = buffer
        }
        return Tensor(shape: [count], dtype: dtype, storage: .device(buffer), backend: self)
    }

    private var placeholder: CLBuffer?
    /// A small buffer bound to pointer arguments a kernel will not read.
    func scratchPlaceholder() throws -> CLBuffer {
        if let p = placeholder { return p }
        let p = try context.makeBuffer(bytes: 64)
        placeholder = p
        return p
    }
}

/// Kernel parameters per device, passed to the compiler as -D defines.
public struct KernelTuning: Sendable, Equatable {
    public struct GemmTiles: Sendable, Equatable {
        public var tileM: Int, tileN: Int, tileK: Int, wptM: Int, wptN: Int
        public init(tileM: Int, tileN: Int, tileK: Int, wptM: Int, wptN: Int) {
            self.tileM = tileM; self.tileN = tileN; self.tileK = tileK; self.wptM = wptM; self.wptN = wptN
        }
        var defines: String { "-DTILE_M=\(tileM) -DTILE_N=\(tileN) -DTILE_K=\(tileK) -DWPT_M=\(wptM) -DWPT_N=\(wptN)" }
    }
    public var gemm: GemmTiles
    /// CPU devices use the register-blocked `gemm_cpu` kernel instead of tiles.
    public var cpuGemm: Bool
    public var cpuRows = 4, cpuVecs = 2
    /// CPU-device shapes for the reductions and row kernels: one work-item per
    /// row and no work-group trees (PoCL runs a work-group as loops on one core).
    public var cpuShapes = false
    public var elementwiseGroup: Int

    /// GEMM tiles for GPU (and other non-CPU) devices by max work-group size,
    /// largest first: 64x64 tiles take 16x16 = 256 work-items, 32x32 ones 8x8 = 64.
    static let gpuTileTable: [(minWorkGroup: Int, tiles: GemmTiles)] = [
        (256, GemmTiles(tileM: 64, tileN: 64, tileK: 16, wptM: 4, wptN: 4)),
        (0, GemmTiles(tileM: 32, tileN: 32, tileK: 16, wptM: 4, wptN: 4)),
    ]

    /// What a GPU gets, without a device, at each vendor's usual max work-group
    /// size (NVIDIA 1024, AMD 256, Intel 512) and for a small GPU (128): every
    /// entry of the tile table `init(for:)` uses. No MOE_GPU_GEMM override.
    public static var gpuProfiles: [(name: String, tuning: KernelTuning)] {
        [("NVIDIA", 1024), ("AMD", 256), ("Intel", 512), ("small GPU", 128)].map { ($0, KernelTuning(gpuMaxWorkGroup: $1)) }
    }

    init(gpuMaxWorkGroup maxGroup: Int) {
        gemm = Self.gpuTileTable.first { maxGroup >= $0.minWorkGroup }!.tiles   // the last entry takes any size
        cpuGemm = false
        elementwiseGroup = min(256, max(1, maxGroup))
    }

    public init(for device: CLDevice) {
        let maxGroup = device.maxWorkGroupSize
        self.init(gpuMaxWorkGroup: maxGroup)
        if device.kind == .cpu {
            // PoCL runs a work-group as loops on one core: big register blocks, few groups.
            gemm = GemmTiles(tileM: 64, tileN: 64, tileK: 32, wptM: 8, wptN: 8)
            cpuGemm = true
            cpuShapes = true
        }
        // MOE_GPU_GEMM="TM,TN,TK,WM,WN" or "cpu:ROWS,VECS" overrides the choice, for tuning.
        if let spec = ProcessInfo.processInfo.environment["MOE_GPU_GEMM"], !spec.isEmpty {
            if spec.hasPrefix("cpu:") {
                let v = spec.dropFirst(4).split(separator: ",").compactMap { Int($0) }
                if v.count == 2 { cpuGemm = true; cpuRows = v[0]; cpuVecs = v[1] }
            } else {
                let v = spec.split(separator: ",").compactMap { Int($0) }
                if v.count == 5 { cpuGemm = false; gemm = GemmTiles(tileM: v[0], tileN: v[1], tileK: v[2], wptM: v[3], wptN: v[4]) }
            }
        }
    }

    /// Compiler options for one kernel file.
    public func options(for file: String) -> String {
        var opts = "-cl-std=CL1.2"
        if file == "gemm.cl" { opts += " " + gemm.defines + " -DCPU_ROWS=\(cpuRows) -DCPU_VECS=\(cpuVecs)" }
        return opts
    }
}
