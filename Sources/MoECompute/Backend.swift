import Foundation

/// `C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]` for b in 0..<batch, row-major.
/// op(A) is m x k, op(B) is k x n. Leading dimensions and batch strides default
/// to the packed layout.
public struct Gemm: Sendable, Equatable {
    public var m: Int, n: Int, k: Int
    public var transA: Bool, transB: Bool
    public var alpha: Float, beta: Float
    public var batch: Int
    public var lda: Int, ldb: Int, ldc: Int
    public var strideA: Int, strideB: Int, strideC: Int

    public init(m: Int, n: Int, k: Int, transA: Bool = false, transB: Bool = false,
                alpha: Float = 1, beta: Float = 0, batch: Int = 1,
                lda: Int? = nil, ldb: Int? = nil, ldc: Int? = nil,
                strideA: Int? = nil, strideB: Int? = nil, strideC: Int? = nil) {
        self.m = m; self.n = n; self.k = k; self.transA = transA; self.transB = transB
        self.alpha = alpha; self.beta = beta; self.batch = batch
        self.lda = lda ?? (transA ? m : k)
        self.ldb = ldb ?? (transB ? k : n)
        self.ldc = ldc ?? n
        self.strideA = strideA ?? m * k
        self.strideB = strideB ?? k * n
        self.strideC = strideC ?? m * n
    }

    public var flops: Double { 2.0 * Double(m) * Double(n) * Double(k) * Double(batch) }

    /// Elements each operand must hold for this multiply to stay in bounds.
    func extent(rows: Int, cols: Int, ld: Int, stride: Int) -> Int {
        rows == 0 || cols == 0 || batch == 0 ? 0 : (batch - 1) * stride + (rows - 1) * ld + cols
    }

    func validate(_ a: Tensor, _ b: Tensor, _ c: Tensor, grouping: GemmGrouping, epilogue: GemmEpilogue) throws {
        guard epilogue.swiGLU else { return try validate(a, b, c, grouping: grouping, epilogue: epilogue, checkC: true) }
        try require(beta == 0 && epilogue.activation == .none, "SwiGLU epilogue needs beta 0 and no other activation")
        try require(transB || ldb >= 2 * n, "SwiGLU epilogue: B needs ldb >= 2n")
        // A, B and the bias as the multiply that produces gate and value (2n columns); C is n wide.
        var wide = self
        wide.n = 2 * n
        try wide.validate(a, b, c, grouping: grouping, epilogue: GemmEpilogue(bias: epilogue.bias), checkC: false)
        let groups: Int
        if case .rows = grouping { groups = 1 } else { groups = batch }
        let extent = m == 0 || n == 0 || groups == 0 ? 0 : (groups - 1) * strideC + (m - 1) * ldc + n
        try require(c.dtype == .f32 && c.count >= extent, "gemm C \(c.shape) too small for \(self)")
    }

    private func validate(_ a: Tensor, _ b: Tensor, _ c: Tensor, grouping: GemmGrouping, epilogue: GemmEpilogue,
                          checkC: Bool) throws {
        switch grouping {
        case .batch:
            try validate(a, b, c, checkC: checkC)
        case .rows(let offsets):
            try require(!transA, "grouped GEMM (rows) takes A untransposed")
            try require(offsets.dtype == .i32 && offsets.count == batch + 1, "grouped GEMM needs \(batch + 1) i32 offsets, got \(offsets.dtype) \(offsets.shape)")
            // Each group is an m-row multiply at worst; A and C are shared, B is per group.
            var one = self
            one.strideA = 0; one.strideC = 0
            try one.validate(a, b, c, checkC: checkC)
        case .contraction(let offsets):
            try require(offsets.dtype == .i32 && offsets.count == batch + 1, "grouped GEMM needs \(batch + 1) i32 offsets, got \(offsets.dtype) \(offsets.shape)")
            var one = self
            one.strideA = 0; one.strideB = 0
            try one.validate(a, b, c, checkC: checkC)
        }
        if let bias = epilogue.bias {
            let groups: Int
            if case .batch = grouping { groups = 1 } else { groups = batch }
            try require(bias.dtype == .f32 && bias.count >= groups * n, "GEMM bias \(bias.shape) needs \(groups) x \(n) values")
        }
    }

    func validate(_ a: Tensor, _ b: Tensor, _ c: Tensor, checkC: Bool = true) throws {
        try require(m >= 0 && n >= 0 && k >= 0 && batch >= 0, "gemm sizes must be non-negative: \(self)")
        try require(lda >= (transA ? m : k) && ldb >= (transB ? k : n) && (ldc >= n || !checkC), "gemm leading dimensions too small: \(self)")
        try require([a, b, c].allSatisfy { $0.dtype == .f32 }, "gemm takes f32 tensors")
        let (ar, ac) = transA ? (k, m) : (m, k)
        let (br, bc) = transB ? (n, k) : (k, n)
        try require(a.count >= extent(rows: ar, cols: ac, ld: lda, stride: strideA), "gemm A \(a.shape) too small for \(self)")
        try require(b.count >= extent(rows: br, cols: bc, ld: ldb, stride: strideB), "gemm B \(b.shape) too small for \(self)")
        if checkC { try require(c.count >= extent(rows: m, cols: n, ld: ldc, stride: strideC), "gemm C \(c.shape) too small for \(self)") }
        let limit = Int(Int32.max)
        try require([a.count + a.offset, b.count + b.offset, c.count + c.offset].allSatisfy { $0 < limit },
                    "gemm operands over 2^31 elements are not supported")
    }
}

/// Activations the GEMM epilogue can apply (after alpha, beta and bias).
public enum Activation: Int32, Sendable, CaseIterable {
    case none = 0
    /// x * Phi(x), exact erf form (BERT, ViT).
    case gelu = 1
    /// tanh approximation (GPT-2).
    case geluTanh = 2
    case relu = 3
    case silu = 4
}

/// How a GEMM is split into independent multiplies.
public enum GemmGrouping {
    /// `g.batch` strided batches (the plain batched GEMM).
    case batch
    /// Grouped GEMM for experts: group e owns rows `offsets[e]..<offsets[e+1]`
    /// of A and C and multiplies them by B + e * strideB. `offsets` holds
    /// `g.batch + 1` ints and stays on the device; `g.m` is the row capacity
    /// of A and C. op(A) must not be transposed.
    case rows(offsets: Tensor)
    /// Weight-gradient form: C + e * strideC = op(A_e) op(B_e) where A_e and B_e
    /// are rows `offsets[e]..<offsets[e+1]` of the stored A and B (the
    /// contraction runs over expert e's rows, e.g. dW_e = dY_e^T X_e).
    /// `g.k` is the row capacity of A and B.
    case contraction(offsets: Tensor)
}

/// Applied to every output element: `act(alpha * acc + beta * C + bias[col])`.
/// For grouped GEMMs the bias holds one row of `n` values per group.
///
/// With `swiGLU`, op(B) has `2n` columns, the gate then the value, and the
/// output is `silu(alpha * gate + bias[j]) * (alpha * value + bias[n + j])`
/// (the bias then holds `2n` values per group; `beta` must be 0 and
/// `activation` none): the SwiGLU expert's first layer in one pass, without
/// writing the `2n`-wide product.
public struct GemmEpilogue {
    public var bias: Tensor?
    public var activation: Activation
    public var swiGLU: Bool
    public init(bias: Tensor? = nil, activation: Activation = .none, swiGLU: Bool = false) {
        self.bias = bias; self.activation = activation; self.swiGLU = swiGLU
    }
    public static let none = GemmEpilogue()
}

/// Where tensors live and how ops run on them. Model code only talks to this
/// protocol; `CPUBackend` and `OpenCLBackend` compute the same functions.
public protocol Backend: AnyObject, Sendable, RoutingOps, PermuteOps, NNOps, OptimOps, AttentionOps, PositionOps {
    /// `cpu` or `opencl:P:D`: what `--device` takes to get this backend again.
    var name: String { get }
    /// A human description of the device.
    var deviceDescription: String { get }
    /// Launches, host syncs and allocations so far (see `DeviceCounters`).
    var counters: DeviceCounters { get }

    /// A new zero-filled tensor.
    func makeTensor(shape: [Int], dtype: DType) throws -> Tensor
    func write(_ bytes: UnsafeRawBufferPointer, to tensor: Tensor) throws
    func read(_ tensor: Tensor, into bytes: UnsafeMutableRawBufferPointer) throws
    /// Copies host bytes into `tensor` without waiting for the device: the
    /// backend stages its own copy, so the caller may reuse `bytes` at once, and
    /// the host goes on (preparing the next batch) while the transfer and the
    /// queued ops run. Not a host sync.
    func upload(_ bytes: UnsafeRawBufferPointer, to tensor: Tensor) throws
    /// Waits until every queued op has finished.
    func synchronize() throws

    func fill(_ x: Tensor, value: Float) throws
    func copy(_ src: Tensor, to dst: Tensor) throws
    /// y += alpha * x
    func axpy(_ alpha: Float, _ x: Tensor, _ y: Tensor) throws
    /// c = a + b
    func add(_ a: Tensor, _ b: Tensor, into c: Tensor) throws
    /// x *= alpha
    func scale(_ x: Tensor, by alpha: Float) throws
    /// GEMM with batching or expert grouping and a fused bias/activation epilogue.
    func gemm(_ g: Gemm, _ a: Tensor, _ b: Tensor, _ c: Tensor, grouping: GemmGrouping, epilogue: GemmEpilogue) throws
}

extension Backend {
    /// Plain (strided-batched) GEMM.
    public func gemm(_ g: Gemm, _ a: Tensor, _ b: Tensor, _ c: Tensor) throws {
        try gemm(g, a, b, c, grouping: .batch, epilogue: .none)
    }

    public func zeros(_ shape: [Int], dtype: DType = .f32) throws -> Tensor {
        try makeTensor(shape: shape, dtype: dtype)
    }

    public func tensor(_ values: [Float], shape: [Int]) throws -> Tensor {
        let t = try makeTensor(shape: shape, dtype: .f32)
        try t.write(values)
        return t
    }

    public func tensor(ints values: [Int32], shape: [Int]) throws -> Tensor {
        let t = try makeTensor(shape: shape, dtype: .i32)
        try t.write(values)
        return t
    }
}

/// Checks shared by both backends for the element-wise ops.
enum ElementwiseCheck {
    static func same(_ op: String, _ tensors: Tensor...) throws {
        let n = tensors[0].count
        for t in tensors {
            try require(t.dtype == .f32, "\(op) takes f32 tensors, got \(t.dtype)")
            try require(t.count == n, "\(op): element counts differ (\(tensors.map(\.shape)))")
        }
    }
}
