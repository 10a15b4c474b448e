import ArgumentParser
import Foundation
import MoECompute

/// Kernel microbenchmarks: median of timed runs after warm-up, GFLOP/s or
/// GB/s, and the share of the device's own measured ceilings.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Kernel microbenchmarks (GEMM, grouped GEMM, routing, permute, combine, nn, whole MoE layer).",
        discussion: "Reports the median of --runs timed runs after warm-up with the spread (min..max), GFLOP/s or GB/s, and the percentage of the ceilings this bench measures on the device itself: a large copy for bandwidth, its best GEMM for compute.")

    @Option(name: .long, help: "Device(s) to bench: auto, cpu, opencl, opencl:P:D or all.")
    var device = "all"
    @Option(name: .long, help: "Only kernels whose name contains this text.")
    var kernel: String?
    @Option(name: .long, help: "Only shapes whose label contains this text.")
    var shape: String?
    @Option(name: .long, help: "Timed runs per case (at least 10 recommended).")
    var runs = 10
    @Flag(name: .long, help: "One JSON object per line instead of a table.")
    var json = false

    func run() throws {
        let catalog = DeviceCatalog()
        let selectors: [DeviceSelector] = device == "all"
            ? [.cpu] + catalog.openCLDevices.map { .openCLDevice(platform: $0.platform.index, device: $0.index) }
            : [try DeviceSelector.resolve(device)]
        for selector in selectors {
            let backend = try catalog.makeBackend(selector)
            let suite = try BenchSuite(backend: backend, runs: max(runs, 1))
            let cases = BenchSuite.cases.filter { c in
                (kernel.map { c.kernel.contains($0) } ?? true) && (shape.map { c.shape.contains($0) } ?? true)
            }
            if !json {
                print("\(backend.name): \(backend.deviceDescription)")
                print(String(format: "  ceilings measured here: %.1f GB/s copy, %.1f GFLOP/s best GEMM", suite.bandwidthCeiling, suite.computeCeiling))
                print("  kernel               shape                                  median ms   spread ms         rate        % ceiling")
            }
            for c in cases {
                let r = try suite.measure(c)
                if json {
                    let data = try JSONSerialization.data(withJSONObject: r.json(device: backend.name, description: backend.deviceDescription), options: [.sortedKeys])
                    print(String(decoding: data, as: UTF8.self))
                } else {
                    print(r.tableRow)
                }
                fflush(stdout)
            }
        }
    }
}
