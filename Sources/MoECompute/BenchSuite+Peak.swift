import CPeak
import Dispatch
import Foundation

/// A measured fp32 FMA peak: the FLOP rate of independent FMA chains kept in
/// registers on the whole device (every core of the CPU, or every compute unit
/// of an OpenCL device), the ceiling a compute-bound kernel cannot pass.
public struct FMAPeak: Sendable {
    /// Best FLOP rate over the repeats, GFLOP/s.
    public let gflops: Double
    /// What ran: "avx512f", "avx2+fma" or "portable" on the CPU; "opencl float16 x 8" etc. on OpenCL.
    public let isa: String
    /// Threads (CPU) or work-items (OpenCL) of one repeat.
    public let parallelism: Int
    /// Seconds of one repeat, and how many repeats the best is of.
    public let seconds: Double, repeats: Int

    public init(gflops: Double, isa: String, parallelism: Int, seconds: Double, repeats: Int) {
        self.gflops = gflops; self.isa = isa; self.parallelism = parallelism; self.seconds = seconds; self.repeats = repeats
    }

    /// The better of two measurements of the same probe (the machine is shared: the best is the least disturbed).
    public func best(_ other: FMAPeak) -> FMAPeak {
        let winner = other.gflops > gflops ? other : self
        return FMAPeak(gflops: winner.gflops, isa: winner.isa, parallelism: winner.parallelism, seconds: winner.seconds,
                       repeats: repeats + other.repeats)
    }
}

/// The CPU probes of `Sources/CPeak`: FMA chains at one vector width, picked at
/// run time (`__builtin_cpu_supports`), on one thread per core at once.
public enum CPUPeakISA: Int, CaseIterable, Sendable {
    case portable = 0, avx2 = 1, avx512 = 2

    var c: cpeak_isa { cpeak_isa(rawValue: UInt32(rawValue)) }

    /// "avx512f", "avx2+fma" or "portable".
    public var name: String { String(cString: cpeak_isa_name(c)) }
    /// fp32 lanes per vector.
    public var lanes: Int { Int(cpeak_lanes(c)) }
    /// Whether this CPU (and OS) runs the probe.
    public var isSupported: Bool { cpeak_supported(c) != 0 }
    /// The widest probe this CPU runs.
    public static var best: CPUPeakISA { CPUPeakISA(rawValue: Int(cpeak_best_isa().rawValue)) ?? .portable }
}

extension FMAPeak {
    /// The CPU's peak: `threads` threads (default one per core) each run the
    /// `isa` probe (default the widest) for `seconds`, started together; the
    /// rate of a repeat is all their FLOPs over the wall time of the whole
    /// repeat, and the result is the best of `repeats`.
    public static func cpu(isa: CPUPeakISA = .best, threads: Int = ProcessInfo.processInfo.activeProcessorCount,
                           seconds: Double = 0.1, repeats: Int = 3) -> FMAPeak {
        let n = max(threads, 1)
        let isa = isa.isSupported ? isa : .portable
        var best = 0.0
        for _ in 0..<max(repeats, 1) {
            let flops = UnsafeMutableBufferPointer<Double>.allocate(capacity: n)
            flops.initialize(repeating: 0)
            defer { flops.deallocate() }
            let start = DispatchTime.now().uptimeNanoseconds
            DispatchQueue.concurrentPerform(iterations: n) { i in
                var elapsed = 0.0
                flops[i] = cpeak_run(isa.c, seconds, &elapsed)
            }
            let wall = Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
            best = max(best, flops.reduce(0, +) / wall / 1e9)
        }
        return FMAPeak(gflops: best, isa: isa.name, parallelism: n, seconds: seconds, repeats: max(repeats, 1))
    }

    /// An OpenCL device's peak: `fma_peak` of Kernels/peak.cl (FMA chains in
    /// registers, one store per work-item) over the whole device, its iteration
    /// count grown until one launch takes about `seconds`; the best of `repeats`.
    /// CPU devices run 16 chains of 16-wide vectors (PoCL turns each into one zmm
    /// FMA on an AVX-512 host, as the CPU probe does), GPUs 4 x 4 per work-item;
    /// `MOE_GPU_PEAK="WIDTH,CHAINS[,LOCAL,ITEMS_PER_UNIT]"` overrides that, for tuning.
    public static func openCL(_ backend: OpenCLBackend, seconds: Double = 0.1, repeats: Int = 3) throws -> FMAPeak {
        let device = backend.device
        let cpuDevice = device.kind == .cpu
        var (width, chains) = cpuDevice ? (16, 16) : (4, 4)
        var local = cpuDevice ? 1 : min(256, max(device.maxWorkGroupSize, 1))
        // Enough work-groups to fill every compute unit several times over.
        var perUnit = cpuDevice ? 64 : 2048
        if let spec = ProcessInfo.processInfo.environment["MOE_GPU_PEAK"], !spec.isEmpty {
            let v = spec.split(separator: ",").compactMap { Int($0) }
            if v.count >= 2 { width = v[0]; chains = v[1] }
            if v.count >= 4 { local = max(v[2], 1); perUnit = max(v[3], 1) }
        }
        let units = max(device.computeUnits, 1)
        let workItems = (units * perUnit + local - 1) / local * local
        let kernel = try backend.kernel("fma_peak", in: "peak.cl", defines: "-DPEAK_WIDTH=\(width) -DPEAK_CHAINS=\(chains)")
        let out = try backend.context.makeBuffer(bytes: workItems * 4)
        func launch(_ iterations: Int) throws -> Double {
            let start = DispatchTime.now().uptimeNanoseconds
            try kernel.launch([.buffer(out), .float(0.99999), .float(1e-6), .int(Int32(iterations))],
                              global: [workItems], local: [local])
            try backend.synchronize()
            return Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
        }
        // Calibrate: double the iterations until a launch is a quarter of the target, then scale.
        var iterations = 64
        var t = try launch(iterations)
        while t < seconds / 4 && iterations < 1 << 28 {
            iterations *= 2
            t = try launch(iterations)
        }
        iterations = min(max(Int(Double(iterations) * seconds / max(t, 1e-9)), 1), Int(Int32.max))
        let flopsPerLaunch = 2.0 * Double(width * chains) * Double(iterations) * Double(workItems)
        var best = 0.0
        for _ in 0..<max(repeats, 1) { best = max(best, flopsPerLaunch / (try launch(iterations)) / 1e9) }
        return FMAPeak(gflops: best, isa: "opencl float\(width) x \(chains) chains", parallelism: workItems,
                       seconds: seconds, repeats: max(repeats, 1))
    }

    /// The peak of whichever backend this is (CPU probes for the CPU backend).
    public static func measure(on backend: Backend, seconds: Double, repeats: Int) throws -> FMAPeak {
        if let cl = backend as? OpenCLBackend { return try openCL(cl, seconds: seconds, repeats: repeats) }
        return cpu(seconds: seconds, repeats: repeats)
    }
}
