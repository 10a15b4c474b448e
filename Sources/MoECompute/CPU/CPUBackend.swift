import CBLAS
import Foundation

/// The CPU backend: OpenBLAS for GEMM, plain Swift loops (auto-vectorised in
/// release builds) for the rest. A first-class backend, not a test double.
public final class CPUBackend: Backend, @unchecked Sendable {
    public let name = "cpu"
    public var deviceDescription: String {
        "CPU backend (OpenBLAS \(String(cString: openblas_get_config())), \(openblas_get_num_threads()) threads)"
    }

    public init() {}

    public func makeTensor(shape: [Int], dtype: DType) throws -> Tensor {
        try require(shape.allSatisfy { $0 >= 0 }, "negative dimension in shape \(shape)")
        let bytes = shape.reduce(1, *) * dtype.byteSize
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
        if let base = bytes.baseAddress { try raw(tensor).copyMemory(from: base, byteCount: bytes.count) }
    }

    public func read(_ tensor: Tensor, into bytes: UnsafeMutableRawBufferPointer) throws {
        try require(bytes.count == tensor.count * tensor.dtype.byteSize, "read of tensor \(tensor.shape) into \(bytes.count) bytes")
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

    public func gemm(_ g: Gemm, _ a: Tensor, _ b: Tensor, _ c: Tensor) throws {
        try g.validate(a, b, c)
        let pa = try f32(a), pb = try f32(b), pc = try f32(c)
        guard g.m > 0, g.n > 0, g.batch > 0 else { return }
        if g.k == 0 {
            // BLAS leaves C untouched for k == 0 only when beta == 1; make it exact.
            for bi in 0..<g.batch { for i in 0..<g.m { for j in 0..<g.n {
                let idx = bi * g.strideC + i * g.ldc + j
                pc[idx] = g.beta == 0 ? 0 : g.beta * pc[idx]
            } } }
            return
        }
        let ta = g.transA ? CblasTrans : CblasNoTrans
        let tb = g.transB ? CblasTrans : CblasNoTrans
        for bi in 0..<g.batch {
            cblas_sgemm(CblasRowMajor, ta, tb, Int32(g.m), Int32(g.n), Int32(g.k), g.alpha,
                        pa + bi * g.strideA, Int32(g.lda), pb + bi * g.strideB, Int32(g.ldb),
                        g.beta, pc + bi * g.strideC, Int32(g.ldc))
        }
    }
}
