import CBLAS
import CKernels
import Foundation

/// The CPU backend: OpenBLAS for GEMM, plain Swift loops (auto-vectorised in
/// release builds) for the rest. A first-class backend, not a test double.
public final class CPUBackend: Backend, @unchecked Sendable {
    public let name = "cpu"
    public var deviceDescription: String {
        "CPU backend (OpenBLAS \(String(cString: openblas_get_config())), \(openblas_get_num_threads()) threads)"
    }

    public let counters = DeviceCounters()
    private var scratchBuffers: [String: HostBuffer] = [:]
    private let scratchLock = NSLock()

    /// A temporary of `count` elements for one op, grow-only per slot and not
    /// zeroed, so steady-state steps allocate nothing.
    func scratchTensor(_ slot: String, _ count: Int, dtype: DType = .f32) -> Tensor {
        scratchLock.lock(); defer { scratchLock.unlock() }
        let bytes = max(count, 1) * dtype.byteSize
        let buffer: HostBuffer
        if let b = scratchBuffers[slot], b.byteCount >= bytes { buffer = b } else {
            buffer = HostBuffer(byteCount: bytes)
            counters.allocation(bytes: bytes)
            scratchBuffers[slot] = buffer
        }
        return Tensor(shape: [count], dtype: dtype, storage: .host(buffer), backend: self)
    }

    public init() {}

    /// Runs `body(0..<parts)` on the CKernels thread pool (spin-then-sleep
    /// workers: no thread wake-up per op) and returns when every part is done.
    static func parallel(_ parts: Int, _ body: (Int) -> Void) {
        withoutActuallyEscaping(body) { escaping in
            let box = ParallelBody(escaping)
            ck_parallel_for(Int32(parts), { context, part in
                Unmanaged<ParallelBody>.fromOpaque(context!).takeUnretainedValue().body(Int(part))
            }, Unmanaged.passUnretained(box).toOpaque())
            withExtendedLifetime(box) {}
        }
    }

    private final class ParallelBody {
        let body: (Int) -> Void
        init(_ body: @escaping (Int) -> Void) { self.body = body }
    }

    /// The cores to spread work over. Read once: on Linux each
    /// `activeProcessorCount` opens and parses cgroup files (tens of microseconds,
    /// paid by every parallel op and batched GEMM when read per call).
    static let cores = ProcessInfo.processInfo.activeProcessorCount

    public func makeTensor(shape: [Int], dtype: DType) throws -> Tensor {
        try require(shape.allSatisfy { $0 >= 0 }, "negative dimension in shape \(shape)")
        let bytes = shape.reduce(1, *) * dtype.byteSize
        counters.allocation(bytes: bytes)
        return Tensor(shape: shape, dtype: dtype, storage: .host(HostBuffer(byteCount: bytes)), backend: self)
    }

    /// The host pointer to a tensor's first element.
    @inline(__always)
    func raw(_ t: Tensor) throws -> UnsafeMutableRawPointer {
        guard case .host(let buffer) = t.storage, t.backend === self else {
            throw ShapeError("tensor \(t.shape) does not live on the CPU backend")
        }
        return buffer.pointer + t.offset * t.dtype.byteSize
    }

    @inline(__always)
    func f32(_ t: Tensor) throws -> UnsafeMutablePointer<Float> {
        try require(t.dtype == .f32, "expected an f32 tensor, got \(t.dtype)")
        return try raw(t).assumingMemoryBound(to: Float.self)
    }

    @inline(__always)
    func i32(_ t: Tensor) throws -> UnsafeMutablePointer<Int32> {
        try require(t.dtype == .i32, "expected an i32 tensor, got \(t.dtype)")
        return try raw(t).assumingMemoryBound(to: Int32.self)
    }

    public func write(_ bytes: UnsafeRawBufferPointer, to tensor: Tensor) throws {
        try require(bytes.count == tensor.count * tensor.dtype.byteSize, "write of \(bytes.count) bytes into tensor \(tensor.shape)")
        counters.hostSync()
        if let base = bytes.baseAddress { try raw(tensor).copyMemory(from: base, byteCount: bytes.count) }
    }

    public func upload(_ bytes: UnsafeRawBufferPointer, to tensor: Tensor) throws {
        try require(bytes.count == tensor.count * tensor.dtype.byteSize, "upload of \(bytes.count) bytes into tensor \(tensor.shape)")
        if let base = bytes.baseAddress { try raw(tensor).copyMemory(from: base, byteCount: bytes.count) }
    }

    public func read(_ tensor: Tensor, into bytes: UnsafeMutableRawBufferPointer) throws {
        try require(bytes.count == tensor.count * tensor.dtype.byteSize, "read of tensor \(tensor.shape) into \(bytes.count) bytes")
        counters.hostSync()
        if let base = bytes.baseAddress { base.copyMemory(from: try raw(tensor), byteCount: bytes.count) }
    }

    public func synchronize() throws {}

    public func fill(_ x: Tensor, value: Float) throws {
        let p = try f32(x)
        for i in 0..<x.count { p[i] = value }
    }

    public func copy(_ src: Tensor, to dst: Tensor) throws {
        try require(src.dtype == dst.dtype && src.count == dst.count, "copy \(src.shape) \(src.dtype) to \(dst.shape) \(dst.dtype)")
        (try raw(dst)).copyMemory(from: try raw(src), byteCount: src.count * src.dtype.byteSize)
    }

    public func axpy(_ alpha: Float, _ x: Tensor, _ y: Tensor) throws {
        try ElementwiseCheck.same("axpy", x, y)
        let px = try f32(x), py = try f32(y)
        for i in 0..<x.count { py[i] += alpha * px[i] }
    }

    public func add(_ a: Tensor, _ b: Tensor, into c: Tensor) throws {
        try ElementwiseCheck.same("add", a, b, c)
        let pa = try f32(a), pb = try f32(b), pc = try f32(c)
        for i in 0..<a.count { pc[i] = pa[i] + pb[i] }
    }

    public func scale(_ x: Tensor, by alpha: Float) throws {
        let p = try f32(x)
        for i in 0..<x.count { p[i] *= alpha }
    }

    public func gemm(_ g: Gemm, _ a: Tensor, _ b: Tensor, _ c: Tensor, grouping: GemmGrouping, epilogue: GemmEpilogue) throws {
        try g.validate(a, b, c, grouping: grouping, epilogue: epilogue)
        counters.launch()
        if epilogue.swiGLU { return try gemmSwiGLU(g, a, b, c, grouping: grouping, bias: epilogue.bias) }
        let pa = try f32(a), pb = try f32(b), pc = try f32(c)
        let bias = try epilogue.bias.map { try f32($0) }
        guard g.m > 0, g.n > 0, g.batch > 0 else { return }
        switch grouping {
        case .batch:
            let perBatch = Double(g.m) * Double(g.n) * Double(g.k)
            if g.batch >= 2 && perBatch < CPUBackend.threadedGemmMACs {
                // Many small multiplies (attention heads): one single-threaded BLAS call
                // per batch, the batches spread over the cores. Each batch writes its own C.
                let (ua, ub, uc) = (UInt(bitPattern: pa), UInt(bitPattern: pb), UInt(bitPattern: pc))
                let biasAddress = bias.map { UInt(bitPattern: $0) }
                let workers = min(g.batch, CPUBackend.cores)
                CPUBackend.withBLASThreads(1) {
                    Self.parallel(workers) { w in
                        let a = UnsafeMutablePointer<Float>(bitPattern: ua)!, b = UnsafeMutablePointer<Float>(bitPattern: ub)!
                        let c = UnsafeMutablePointer<Float>(bitPattern: uc)!
                        let biasPointer = biasAddress.flatMap { UnsafeMutablePointer<Float>(bitPattern: $0) }
                        for bi in stride(from: w, to: g.batch, by: workers) {
                            self.sgemm(g, m: g.m, k: g.k, a + bi * g.strideA, b + bi * g.strideB, c + bi * g.strideC, manageThreads: false)
                            self.applyEpilogue(c + bi * g.strideC, rows: g.m, g, bias: biasPointer, activation: epilogue.activation)
                        }
                    }
                }
                return
            }
            for bi in 0..<g.batch {
                sgemm(g, m: g.m, k: g.k, pa + bi * g.strideA, pb + bi * g.strideB, pc + bi * g.strideC)
                applyEpilogue(pc + bi * g.strideC, rows: g.m, g, bias: bias, activation: epilogue.activation)
            }
        case .rows(let offsetsTensor):
            let offsets = try i32(offsetsTensor)
            for e in 0..<g.batch {
                let start = Int(offsets[e]), rows = Int(offsets[e + 1]) - start
                guard rows > 0 else { continue }
                sgemm(g, m: rows, k: g.k, pa + start * g.lda, pb + e * g.strideB, pc + start * g.ldc)
                applyEpilogue(pc + start * g.ldc, rows: rows, g, bias: bias.map { $0 + e * g.n }, activation: epilogue.activation)
            }
        case .contraction(let offsetsTensor):
            let offsets = try i32(offsetsTensor)
            for e in 0..<g.batch {
                let start = Int(offsets[e]), rows = Int(offsets[e + 1]) - start
                let aStart = g.transA ? start * g.lda : start
                let bStart = g.transB ? start : start * g.ldb
                sgemm(g, m: g.m, k: rows, pa + aStart, pb + bStart, pc + e * g.strideC)
                applyEpilogue(pc + e * g.strideC, rows: g.m, g, bias: bias.map { $0 + e * g.n }, activation: epilogue.activation)
            }
        }
    }

    /// SwiGLU epilogue: the 2n-wide product (with bias) into scratch, then
    /// silu(gate) * value into C, row by row, touching only rows the grouping writes.
    private func gemmSwiGLU(_ g: Gemm, _ a: Tensor, _ b: Tensor, _ c: Tensor, grouping: GemmGrouping, bias: Tensor?) throws {
        let groups: Int
        if case .rows = grouping { groups = 1 } else { groups = g.batch }
        var wide = g
        wide.n = 2 * g.n
        wide.ldc = 2 * g.n
        wide.strideC = g.m * 2 * g.n
        if !g.transB && g.ldb < 2 * g.n { wide.ldb = 2 * g.n }
        let product = try scratchTensor("swiGLU", groups * g.m * 2 * g.n).reshaped([groups, g.m, 2 * g.n])
        try gemm(wide, a, b, product, grouping: grouping, epilogue: GemmEpilogue(bias: bias))
        let p = try f32(product), out = try f32(c)
        var rowRanges: [(group: Int, rows: Range<Int>)] = []
        if case .rows(let offsets) = grouping {
            let o = try i32(offsets)
            rowRanges = [(0, Int(o[0])..<Int(o[g.batch]))]
        } else {
            rowRanges = (0..<groups).map { ($0, 0..<g.m) }
        }
        for (group, rows) in rowRanges {
            for r in rows {
                let src = p + (group * g.m + r) * 2 * g.n, dst = out + group * g.strideC + r * g.ldc
                for j in 0..<g.n {
                    let gate = src[j]
                    dst[j] = gate / (1 + expf(-gate)) * src[g.n + j]
                }
            }
        }
    }

    /// Below this many multiply-adds threads cost more than they save.
    static let threadedGemmMACs = 4_000_000.0
    /// From this many multiply-adds on, OpenBLAS's own threads run the GEMM.
    static let blasThreadedGemmMACs = 256_000_000.0
    /// OpenBLAS's thread count (its default: the cores).
    static let blasThreads = Int(openblas_get_num_threads())
    private static let blasLock = NSLock()

    /// Runs `body` with OpenBLAS limited to `n` threads.
    static func withBLASThreads(_ n: Int, _ body: () -> Void) {
        blasLock.lock(); defer { blasLock.unlock() }
        openblas_set_num_threads(Int32(n))
        body()
        openblas_set_num_threads(Int32(blasThreads))
    }

    /// One OpenBLAS sgemm of `m` rows and contraction `k` with g's transposes, scalars and leading dims.
    private func sgemm(_ g: Gemm, m: Int, k: Int, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
                       manageThreads: Bool = true) {
        if k == 0 {
            // BLAS leaves C untouched for k == 0 only when beta == 1; make it exact.
            for i in 0..<m { for j in 0..<g.n { c[i * g.ldc + j] = g.beta == 0 ? 0 : g.beta * c[i * g.ldc + j] } }
            return
        }
        // C[r0..<r1, c0..<c1] on the calling thread (inside a single-threaded OpenBLAS window).
        func block(_ r0: Int, _ r1: Int, _ c0: Int, _ c1: Int) {
            let ap = g.transA ? a + r0 : a + r0 * g.lda
            let bp = g.transB ? b + c0 * g.ldb : b + c0
            cblas_sgemm(CblasRowMajor, g.transA ? CblasTrans : CblasNoTrans, g.transB ? CblasTrans : CblasNoTrans,
                        Int32(r1 - r0), Int32(c1 - c0), Int32(k), g.alpha, ap, Int32(g.lda), bp, Int32(g.ldb), g.beta,
                        c + r0 * g.ldc + c0, Int32(g.ldc))
        }
        let macs = Double(m) * Double(g.n) * Double(k)
        let workers = min(CPUBackend.blasThreads, CPUBackend.cores)
        // Only GEMMs from blasThreadedGemmMACs on use OpenBLAS's thread pool. Once
        // woken, the pool's idle threads spin in sched_yield for about 0.1 s
        // (OpenBLAS's thread timeout), longer than a training step of many small
        // ops: that spinning took a third of the CPU time and competed with the
        // element-wise loops' threads. Smaller GEMMs run with OpenBLAS set to one
        // thread for the call (the process default stays OpenBLAS's, so direct
        // cblas callers such as the bench's peer loop are unaffected).
        if !manageThreads || workers <= 1 {
            block(0, m, 0, g.n)
        } else if macs < CPUBackend.threadedGemmMACs {
            CPUBackend.withBLASThreads(1) { block(0, m, 0, g.n) }
        } else if macs >= CPUBackend.blasThreadedGemmMACs {
            block(0, m, 0, g.n)
        } else {
            // Split C over the cores in blocks of 16 rows (or columns when C is wider
            // than tall); each block is an independent single-threaded sgemm, and the
            // split depends only on the shape: deterministic.
            let byRows = m >= g.n
            let units = ((byRows ? m : g.n) + 15) / 16
            let parts = min(workers, units)
            CPUBackend.withBLASThreads(1) {
                Self.parallel(parts) { p in
                    let lo = min(p * units / parts * 16, byRows ? m : g.n), hi = min((p + 1) * units / parts * 16, byRows ? m : g.n)
                    guard lo < hi else { return }
                    if byRows { block(lo, hi, 0, g.n) } else { block(0, m, lo, hi) }
                }
            }
        }
    }

    private func applyEpilogue(_ c: UnsafeMutablePointer<Float>, rows: Int, _ g: Gemm, bias: UnsafeMutablePointer<Float>?,
                               activation: Activation) {
        guard bias != nil || activation != .none else { return }
        for i in 0..<rows {
            let row = c + i * g.ldc
            if let bias { for j in 0..<g.n { row[j] += bias[j] } }
            if activation != .none { for j in 0..<g.n { row[j] = activation.apply(row[j]) } }
        }
    }
}

extension Activation {
    /// The activation on one value, as the kernels compute it.
    @inline(__always)
    public func apply(_ x: Float) -> Float {
        switch self {
        case .none: return x
        case .gelu: return 0.5 * x * (1 + erff(x * 0.707_106_781_186_547_52))
        case .geluTanh: return 0.5 * x * (1 + tanhf(0.797_884_560_802_865_36 * (x + 0.044715 * x * x * x)))
        case .relu: return max(x, 0)
        case .silu: return x / (1 + expf(-x))
        }
    }
}
