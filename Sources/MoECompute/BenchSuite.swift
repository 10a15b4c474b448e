import CBLAS
import Foundation

/// What a prepared benchmark case runs: the closure to time, the work it does
/// (FLOPs for compute-bound cases, the bytes it must read and write at minimum
/// for the rest), optional companions timed in the same loop (interleaved with
/// the main closure, so a ratio between them sees the same machine load), and
/// extra figures for the report.
public struct BenchWork {
    public var run: () throws -> Void
    public var flops: Double
    public var bytes: Double
    /// Timed alternately with `run`; each adds `<name>_ms` to the result's extras.
    public var companions: [(name: String, run: () throws -> Void)]
    /// Fixed extra figures (counts, parameters).
    public var extra: [String: Double]
    /// Derived figures from the medians: (main seconds, companion seconds by name) -> extras.
    public var derive: ((Double, [String: Double]) -> [String: Double])?
    /// Adds `mfu` (model FLOP rate / the device's FMA peak, a fraction) to the extras:
    /// for cases whose FLOPs are a model's (6 x active parameters x tokens).
    public var reportsMFU: Bool

    public init(run: @escaping () throws -> Void, flops: Double = 0, bytes: Double = 0,
                companions: [(name: String, run: () throws -> Void)] = [], extra: [String: Double] = [:],
                derive: ((Double, [String: Double]) -> [String: Double])? = nil, reportsMFU: Bool = false) {
        self.run = run; self.flops = flops; self.bytes = bytes
        self.companions = companions; self.extra = extra; self.derive = derive; self.reportsMFU = reportsMFU
    }
}

/// One benchmark case: a named kernel at a labelled shape. `prepare` allocates
/// inputs and returns the work to time, or nil when the case does not apply to
/// the backend (e.g. the host OpenBLAS reference on an OpenCL device).
public struct BenchCase: Sendable {
    public let kernel: String
    public let shape: String
    public let prepare: @Sendable (Backend) throws -> BenchWork?

    public init(kernel: String, shape: String, prepare: @escaping @Sendable (Backend) throws -> BenchWork?) {
        self.kernel = kernel; self.shape = shape; self.prepare = prepare
    }

    /// A case with no companions: `prepare` returns the closure and its FLOPs and bytes.
    public init(kernel: String, shape: String,
                simple: @escaping @Sendable (Backend) throws -> (run: () throws -> Void, flops: Double, bytes: Double)) {
        self.init(kernel: kernel, shape: shape) { backend in
            let (run, flops, bytes) = try simple(backend)
            return BenchWork(run: run, flops: flops, bytes: bytes)
        }
    }
}

public struct BenchResult: Sendable {
    public let kernel: String, shape: String
    public let medianSeconds: Double, minSeconds: Double, maxSeconds: Double
    public let runs: Int
    public let flops: Double, bytes: Double
    public let bandwidthCeiling: Double, computeCeiling: Double
    /// The device's measured fp32 FMA peak (GFLOP/s; 0 when not measured).
    public let fmaPeak: Double
    public let extra: [String: Double]

    public var gflops: Double { flops / medianSeconds / 1e9 }
    public var gbytes: Double { bytes / medianSeconds / 1e9 }
    /// Compute-bound cases are judged against the GEMM ceiling, the rest against bandwidth.
    public var isCompute: Bool { flops > 0 }
    public var percentOfCeiling: Double { isCompute ? 100 * gflops / computeCeiling : 100 * gbytes / bandwidthCeiling }
    /// Compute-bound cases: the share of the FMA peak (for a training step, the MFU); nil otherwise.
    public var percentOfPeak: Double? { isCompute && fmaPeak > 0 ? 100 * gflops / fmaPeak : nil }

    public init(kernel: String, shape: String, medianSeconds: Double, minSeconds: Double, maxSeconds: Double, runs: Int,
                flops: Double, bytes: Double, bandwidthCeiling: Double, computeCeiling: Double, fmaPeak: Double = 0,
                extra: [String: Double]) {
        self.kernel = kernel; self.shape = shape
        self.medianSeconds = medianSeconds; self.minSeconds = minSeconds; self.maxSeconds = maxSeconds; self.runs = runs
        self.flops = flops; self.bytes = bytes
        self.bandwidthCeiling = bandwidthCeiling; self.computeCeiling = computeCeiling; self.fmaPeak = fmaPeak
        self.extra = extra
    }

    public static let columns: [(title: String, width: Int, left: Bool)] = [
        ("kernel", 23, true), ("shape", 50, true), ("median ms", 11, false), ("spread ms (min..max)", 22, false),
        ("rate", 18, false), ("% ceil", 7, false), ("% peak", 7, false),
    ]

    public static var tableHeader: String {
        "  " + columns.map { pad($0.title, $0.width, left: $0.left) }.joined(separator: " ") + "  extras"
    }

    public var tableRow: String {
        let rate = isCompute ? String(format: "%.1f GFLOP/s", gflops) : String(format: "%.2f GB/s", gbytes)
        let cells = [kernel, shape, String(format: "%.3f", medianSeconds * 1e3),
                     String(format: "%.3f..%.3f", minSeconds * 1e3, maxSeconds * 1e3), rate,
                     String(format: "%.1f%%", percentOfCeiling), percentOfPeak.map { String(format: "%.1f%%", $0) } ?? "-"]
        var row = "  " + zip(cells, BenchResult.columns).map { BenchResult.pad($0, $1.width, left: $1.left) }.joined(separator: " ")
        if !extra.isEmpty {
            row += "  " + extra.sorted(by: { $0.key < $1.key }).map { "\($0.key)=\(BenchResult.format($0.value))" }.joined(separator: " ")
        }
        return row
    }

    static func format(_ v: Double) -> String {
        if v == v.rounded() && abs(v) < 1e15 { return String(Int64(v)) }
        return abs(v) >= 100 ? String(format: "%.1f", v) : String(format: "%.3f", v)
    }

    /// Pads with spaces in Swift (Foundation's `%-20@` does not pad on Linux).
    public static func pad(_ s: String, _ width: Int, left: Bool) -> String {
        let n = s.count
        guard n < width else { return s }
        let fill = String(repeating: " ", count: width - n)
        return left ? s + fill : fill + s
    }

    /// One JSON object; `ceiling` (the suite's `ceilingJSON`) adds the device's measured ceilings to every row.
    public func json(device: String, description: String, ceiling: [String: Any] = [:]) -> [String: Any] {
        var o: [String: Any] = ["device": device, "device_name": description, "kernel": kernel, "shape": shape,
                                "median_ms": medianSeconds * 1e3, "min_ms": minSeconds * 1e3, "max_ms": maxSeconds * 1e3,
                                "runs": runs, "flops": flops, "bytes": bytes,
                                "bandwidth_ceiling_gbs": bandwidthCeiling, "compute_ceiling_gflops": computeCeiling,
                                "percent_of_ceiling": percentOfCeiling]
        if isCompute { o["gflops"] = gflops } else { o["gbs"] = gbytes }
        if let p = percentOfPeak { o["percent_of_peak"] = p }
        for (k, v) in ceiling { o[k] = v }
        for (k, v) in extra where v.isFinite { o[k] = v }
        return o
    }
}

/// Sizes of the bench: the realistic shapes, or small ones (`quick`) so
/// a test can run every case in seconds.
public struct BenchShapes: Sendable {
    /// Tokens, hidden width, expert hidden width, experts, choices per token.
    public var t: Int, h: Int, i: Int, e: Int, k: Int
    /// Fine-grained experts: E, k and the expert width (I * k / fineK keeps the FLOPs per token).
    public var fineE: Int, fineK: Int, fineI: Int
    /// Token count of the second size of the bandwidth-bound ops.
    public var bigT: Int
    /// Square GEMM size, and the strided-batched GEMM batch x (m x n x k).
    public var square: Int
    public var batched: (batch: Int, m: Int, n: Int, k: Int)
    /// Classes of the cross-entropy head, attention (batch, sequence, heads, head dim).
    public var classes: Int
    public var attention: (b: Int, t: Int, heads: Int, d: Int)
    /// Parameters in the AdamW / global-norm tensors.
    public var parameters: Int
    /// Copy size and GEMM sizes of the ceiling measurement.
    public var copyElements: Int
    public var ceilingGemms: [Int]
    public var quick: Bool
    /// Seconds of one FMA-peak probe repeat, and repeats before and after the ceiling GEMMs (the best counts).
    public var peakSeconds = 0.1
    public var peakRepeats = 3

    public static let full = BenchShapes(t: 4096, h: 768, i: 3072, e: 8, k: 2, fineE: 64, fineK: 8, fineI: 768, bigT: 16384,
                                         square: 1024, batched: (8, 512, 768, 3072), classes: 1000,
                                         attention: (8, 512, 12, 64), parameters: 8 * 2 * 768 * 3072,
                                         copyElements: 1 << 26, ceilingGemms: [1024, 2048], quick: false)
    public static let quick = BenchShapes(t: 256, h: 64, i: 256, e: 8, k: 2, fineE: 16, fineK: 4, fineI: 128, bigT: 1024,
                                          square: 128, batched: (4, 64, 64, 128), classes: 10,
                                          attention: (2, 32, 4, 16), parameters: 1 << 16,
                                          copyElements: 1 << 20, ceilingGemms: [256], quick: true,
                                          peakSeconds: 0.025, peakRepeats: 1)
}

/// Runs cases on one backend and measures the device's ceilings once.
public final class BenchSuite {
    public let backend: Backend
    public let runs: Int
    public let warmup: Int
    public private(set) var bandwidthCeiling = 0.0
    public private(set) var computeCeiling = 0.0
    public private(set) var ceilingGemmSize = 0
    /// The device's fp32 FMA peak, measured by a probe (`FMAPeak`) before and after the ceiling GEMMs.
    public private(set) var fmaPeak: FMAPeak

    /// Set when the probe's peak is below the best GEMM rate of the same run:
    /// the probe is wrong (or the machine was busy while it ran), and `% peak` is not to be trusted.
    public var peakWarning: String? {
        guard fmaPeak.gflops < computeCeiling else { return nil }
        return String(format: "the FMA peak probe (%@, %.1f GFLOP/s) is below the best GEMM of the same run (%.1f GFLOP/s, %d^3): "
                      + "a wrong probe or a busy machine; %% peak is not to be trusted",
                      fmaPeak.isa, fmaPeak.gflops, computeCeiling, ceilingGemmSize)
    }

    /// The measured ceilings, as added to every JSON row: `fma_peak_gflops`,
    /// `fma_isa`, `gemm_ceiling_size` and, when the peak is below the best GEMM, `peak_warning`.
    public var ceilingJSON: [String: Any] {
        var o: [String: Any] = ["fma_peak_gflops": fmaPeak.gflops, "fma_isa": fmaPeak.isa, "gemm_ceiling_size": ceilingGemmSize]
        if let w = peakWarning { o["peak_warning"] = w }
        return o
    }

    public init(backend: Backend, runs: Int, shapes: BenchShapes = .full, warmup: Int = 2) throws {
        self.backend = backend; self.runs = max(runs, 1); self.warmup = max(warmup, 1)
        // FMA peak: the probe runs before and after the GEMMs (the machine is shared; the best counts).
        fmaPeak = try FMAPeak.measure(on: backend, seconds: shapes.peakSeconds, repeats: shapes.peakRepeats)
        // Bandwidth: a large copy reads and writes every byte.
        let n = shapes.copyElements
        let src = try backend.tensor(randomValues(n, seed: 9), shape: [n]), dst = try backend.zeros([n])
        let copy = try time { try backend.copy(src, to: dst) }
        bandwidthCeiling = 2.0 * Double(n * 4) / copy.median / 1e9
        // Compute: the best of a few large square GEMMs.
        for size in shapes.ceilingGemms {
            let g = Gemm(m: size, n: size, k: size)
            let a = try backend.tensor(randomValues(size * size, seed: 3), shape: [size, size])
            let b = try backend.tensor(randomValues(size * size, seed: 4), shape: [size, size])
            let c = try backend.zeros([size, size])
            let t = try time { try backend.gemm(g, a, b, c) }
            let rate = g.flops / t.median / 1e9
            if rate > computeCeiling { computeCeiling = rate; ceilingGemmSize = size }
        }
        fmaPeak = fmaPeak.best(try FMAPeak.measure(on: backend, seconds: shapes.peakSeconds, repeats: shapes.peakRepeats))
    }

    /// Median, min and max wall time of `runs` runs after warm-up runs (synchronised each run).
    public func time(_ body: () throws -> Void) throws -> (median: Double, min: Double, max: Double) {
        try withoutActuallyEscaping(body) { try timeInterleaved([$0])[0] }
    }

    /// Times several closures in one loop, alternating between them every run,
    /// so that their ratios see the same machine load.
    public func timeInterleaved(_ bodies: [() throws -> Void]) throws -> [(median: Double, min: Double, max: Double)] {
        for body in bodies { for _ in 0..<warmup { try body() } }
        try backend.synchronize()
        var samples = [[Double]](repeating: [], count: bodies.count)
        for _ in 0..<runs {
            for (j, body) in bodies.enumerated() {
                let start = DispatchTime.now().uptimeNanoseconds
                try body()
                try backend.synchronize()
                samples[j].append(Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9)
            }
        }
        return samples.map { s in
            let s = s.sorted()
            let median = s.count % 2 == 1 ? s[s.count / 2] : 0.5 * (s[s.count / 2 - 1] + s[s.count / 2])
            return (median, s.first!, s.last!)
        }
    }

    /// Runs a case; nil when it does not apply to this backend.
    public func measure(_ c: BenchCase) throws -> BenchResult? {
        guard let work = try c.prepare(backend) else { return nil }
        let times = try timeInterleaved([work.run] + work.companions.map(\.run))
        var extra = work.extra
        var companions: [String: Double] = [:]
        for (j, comp) in work.companions.enumerated() {
            companions[comp.name] = times[j + 1].median
            extra["\(comp.name)_ms"] = times[j + 1].median * 1e3
        }
        if let derive = work.derive { extra.merge(derive(times[0].median, companions)) { _, new in new } }
        if work.reportsMFU, work.flops > 0, fmaPeak.gflops > 0 { extra["mfu"] = work.flops / times[0].median / 1e9 / fmaPeak.gflops }
        return BenchResult(kernel: c.kernel, shape: c.shape, medianSeconds: times[0].median, minSeconds: times[0].min,
                           maxSeconds: times[0].max, runs: runs, flops: work.flops, bytes: work.bytes,
                           bandwidthCeiling: bandwidthCeiling, computeCeiling: computeCeiling, fmaPeak: fmaPeak.gflops,
                           extra: extra)
    }

    /// Every registered case of MoECompute at the given sizes, in report order.
    public static func cases(_ s: BenchShapes = .full) -> [BenchCase] {
        gemmCases(s) + groupedCases(s) + routingCases(s) + permuteCases(s) + nnCases(s) + optimCases(s)
    }

    /// The full-size cases (kept for callers of the old API).
    public static var cases: [BenchCase] { cases(.full) }

    /// A GEMM case; on the CPU backend the same multiply is also timed as a plain
    /// `cblas_sgemm` loop (the OpenBLAS reference), interleaved, with the ratio.
    static func gemmCase(kernel: String = "gemm", _ label: String, _ g: Gemm) -> BenchCase {
        BenchCase(kernel: kernel, shape: label) { backend in
            let (ar, ac) = g.transA ? (g.k, g.m) : (g.m, g.k)
            let (br, bc) = g.transB ? (g.n, g.k) : (g.k, g.n)
            let a = try backend.tensor(randomValues(g.batch * ar * ac, seed: 1), shape: [g.batch, ar, ac])
            let b = try backend.tensor(randomValues(g.batch * br * bc, seed: 2), shape: [g.batch, br, bc])
            let c = try backend.zeros([g.batch, g.m, g.n])
            var work = BenchWork(run: { try backend.gemm(g, a, b, c) }, flops: g.flops)
            if let reference = openBLASReference(g, on: backend) {
                work.companions = [("openblas", reference)]
                work.derive = { t, comp in comp["openblas"].map { ["vs_openblas": t / $0] } ?? [:] }
            }
            return work
        }
    }

    /// A plain host loop of `cblas_sgemm` calls over the batch, on host buffers of
    /// the same sizes (only for the CPU backend, whose peer this is).
    static func openBLASReference(_ g: Gemm, on backend: Backend) -> (() throws -> Void)? {
        guard backend is CPUBackend else { return nil }
        let (ar, ac) = g.transA ? (g.k, g.m) : (g.m, g.k)
        let (br, bc) = g.transB ? (g.n, g.k) : (g.k, g.n)
        let a = HostBuffer(byteCount: g.batch * ar * ac * 4), b = HostBuffer(byteCount: g.batch * br * bc * 4)
        let c = HostBuffer(byteCount: g.batch * g.m * g.n * 4)
        let va = randomValues(g.batch * ar * ac, seed: 1), vb = randomValues(g.batch * br * bc, seed: 2)
        va.withUnsafeBytes { a.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        vb.withUnsafeBytes { b.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        return {
            let pa = a.pointer.assumingMemoryBound(to: Float.self), pb = b.pointer.assumingMemoryBound(to: Float.self)
            let pc = c.pointer.assumingMemoryBound(to: Float.self)
            for i in 0..<g.batch {
                cblas_sgemm(CblasRowMajor, g.transA ? CblasTrans : CblasNoTrans, g.transB ? CblasTrans : CblasNoTrans,
                            Int32(g.m), Int32(g.n), Int32(g.k), g.alpha, pa + i * g.strideA, Int32(g.lda),
                            pb + i * g.strideB, Int32(g.ldb), g.beta, pc + i * g.strideC, Int32(g.ldc))
            }
        }
    }

    static func gemmCases(_ s: BenchShapes) -> [BenchCase] {
        let rows = s.t, (bb, bm, bn, bk) = s.batched
        return [
            gemmCase("\(s.square)x\(s.square)x\(s.square)", Gemm(m: s.square, n: s.square, k: s.square)),
            gemmCase(kernel: "strided-batched", "\(bb)x(\(bm)x\(bn)x\(bk))", Gemm(m: bm, n: bn, k: bk, batch: bb)),
            gemmCase("\(rows)x\(s.i)x\(s.h) (MLP up, B^T)", Gemm(m: rows, n: s.i, k: s.h, transB: true)),
            gemmCase("\(rows)x\(s.h)x\(s.i) (MLP down, B^T)", Gemm(m: rows, n: s.h, k: s.i, transB: true)),
            gemmCase("\(s.i)x\(s.h)x\(rows) (dW, A^T)", Gemm(m: s.i, n: s.h, k: rows, transA: true)),
        ]
    }
}

/// Seeded uniform values in [-1, 1] for benchmark inputs.
public func randomValues(_ n: Int, seed: UInt64) -> [Float] {
    var rng = SplitMix64(seed: seed)
    return (0..<n).map { _ in rng.nextFloat(in: -1...1) }
}
