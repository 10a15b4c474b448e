import Foundation

/// One benchmark case: a named kernel at a labelled shape. `prepare` allocates
/// inputs and returns the closure to time plus the work it does.
public struct BenchCase: Sendable {
    public let kernel: String
    public let shape: String
    public let prepare: @Sendable (Backend) throws -> (run: () throws -> Void, flops: Double, bytes: Double)

    public init(kernel: String, shape: String,
                prepare: @escaping @Sendable (Backend) throws -> (run: () throws -> Void, flops: Double, bytes: Double)) {
        self.kernel = kernel; self.shape = shape; self.prepare = prepare
    }
}

public struct BenchResult: Sendable {
    public let kernel: String, shape: String
    public let medianSeconds: Double, minSeconds: Double, maxSeconds: Double
    public let flops: Double, bytes: Double
    public let bandwidthCeiling: Double, computeCeiling: Double
    public let extra: [String: Double]

    public var gflops: Double { flops / medianSeconds / 1e9 }
    public var gbytes: Double { bytes / medianSeconds / 1e9 }
    /// Compute-bound cases are judged against the GEMM ceiling, the rest against bandwidth.
    public var isCompute: Bool { flops > 0 }
    public var percentOfCeiling: Double { isCompute ? 100 * gflops / computeCeiling : 100 * gbytes / bandwidthCeiling }

    public var tableRow: String {
        let rate = isCompute ? String(format: "%8.1f GFLOP/s", gflops) : String(format: "%8.1f GB/s   ", gbytes)
        var row = String(format: "  %-20@ %-38@ %9.3f   %7.3f..%-7.3f %@   %5.1f%%", kernel as NSString, shape as NSString,
                         medianSeconds * 1e3, minSeconds * 1e3, maxSeconds * 1e3, rate as NSString, percentOfCeiling)
        for (k, v) in extra.sorted(by: { $0.key < $1.key }) { row += String(format: "  %@=%.3f", k as NSString, v) }
        return row
    }

    public func json(device: String, description: String) -> [String: Any] {
        var o: [String: Any] = ["device": device, "device_name": description, "kernel": kernel, "shape": shape,
                                "median_ms": medianSeconds * 1e3, "min_ms": minSeconds * 1e3, "max_ms": maxSeconds * 1e3,
                                "bandwidth_ceiling_gbs": bandwidthCeiling, "compute_ceiling_gflops": computeCeiling,
                                "percent_of_ceiling": percentOfCeiling]
        if isCompute { o["gflops"] = gflops } else { o["gbs"] = gbytes }
        for (k, v) in extra { o[k] = v }
        return o
    }
}

/// Runs cases on one backend and measures the device's ceilings once.
public final class BenchSuite {
    public let backend: Backend
    public let runs: Int
    public private(set) var bandwidthCeiling = 0.0
    public private(set) var computeCeiling = 0.0

    public init(backend: Backend, runs: Int) throws {
        self.backend = backend; self.runs = runs
        // Bandwidth: a 256 MiB copy reads and writes every byte.
        let n = 1 << 26
        let src = try backend.zeros([n]), dst = try backend.zeros([n])
        let copy = try time { try backend.copy(src, to: dst) }
        bandwidthCeiling = 2.0 * Double(n * 4) / copy.median / 1e9
        // Compute: the best of a few large square GEMMs.
        for size in [1024, 2048] {
            let g = Gemm(m: size, n: size, k: size)
            let a = try backend.zeros([size, size]), b = try backend.zeros([size, size]), c = try backend.zeros([size, size])
            let t = try time { try backend.gemm(g, a, b, c) }
            computeCeiling = max(computeCeiling, g.flops / t.median / 1e9)
        }
    }

    /// Median, min and max wall time of `runs` runs after two warm-up runs (synchronised each run).
    public func time(_ body: () throws -> Void) throws -> (median: Double, min: Double, max: Double) {
        for _ in 0..<2 { try body() }
        try backend.synchronize()
        var samples: [Double] = []
        for _ in 0..<runs {
            let start = DispatchTime.now().uptimeNanoseconds
            try body()
            try backend.synchronize()
            samples.append(Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9)
        }
        samples.sort()
        let median = samples.count % 2 == 1 ? samples[samples.count / 2] : 0.5 * (samples[samples.count / 2 - 1] + samples[samples.count / 2])
        return (median, samples.first!, samples.last!)
    }

    public func measure(_ c: BenchCase) throws -> BenchResult {
        let (run, flops, bytes) = try c.prepare(backend)
        let t = try time(run)
        return BenchResult(kernel: c.kernel, shape: c.shape, medianSeconds: t.median, minSeconds: t.min, maxSeconds: t.max,
                           flops: flops, bytes: bytes, bandwidthCeiling: bandwidthCeiling, computeCeiling: computeCeiling, extra: [:])
    }

    /// Every registered case; op families append theirs in `extraCases`.
    public static var cases: [BenchCase] { gemmCases }

    static func gemmCase(_ label: String, _ g: Gemm) -> BenchCase {
        BenchCase(kernel: "gemm", shape: label) { backend in
            let (ar, ac) = g.transA ? (g.k, g.m) : (g.m, g.k)
            let (br, bc) = g.transB ? (g.n, g.k) : (g.k, g.n)
            let a = try backend.tensor(randomValues(g.batch * ar * ac, seed: 1), shape: [g.batch, ar, ac])
            let b = try backend.tensor(randomValues(g.batch * br * bc, seed: 2), shape: [g.batch, br, bc])
            let c = try backend.zeros([g.batch, g.m, g.n])
            return ({ try backend.gemm(g, a, b, c) }, g.flops, 0)
        }
    }

    static let gemmCases: [BenchCase] = [
        gemmCase("1024x1024x1024", Gemm(m: 1024, n: 1024, k: 1024)),
        gemmCase("8x(512x768x3072)", Gemm(m: 512, n: 768, k: 3072, batch: 8)),
        gemmCase("4096x3072x768 (MLP up)", Gemm(m: 4096, n: 3072, k: 768, transB: true)),
        gemmCase("4096x768x3072 (MLP down)", Gemm(m: 4096, n: 768, k: 3072, transB: true)),
        gemmCase("3072x768x4096 (dW, A^T)", Gemm(m: 3072, n: 768, k: 4096, transA: true)),
    ]
}

/// Seeded uniform values in [-1, 1] for benchmark inputs.
public func randomValues(_ n: Int, seed: UInt64) -> [Float] {
    var rng = SplitMix64(seed: seed)
    return (0..<n).map { _ in rng.nextFloat(in: -1...1) }
}
