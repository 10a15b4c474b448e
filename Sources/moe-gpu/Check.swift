import ArgumentParser
import Foundation
import MoECompute

/// Runs GEMM on every device against a float64 reference: a quick proof that
/// the kernels build and compute correctly on this machine.
struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Self-check: build the kernels and compare GEMM on every device with a float64 reference.")

    @Option(name: .long, help: "Check only this device (auto, cpu, opencl, opencl:P:D); default every device.")
    var device: String?

    func run() throws {
        let catalog = DeviceCatalog()
        var selectors: [DeviceSelector] = [.cpu] + catalog.openCLDevices.map { .openCLDevice(platform: $0.platform.index, device: $0.index) }
        if let device { selectors = [try DeviceSelector.resolve(device)] }
        var failures = 0
        for selector in selectors {
            let start = Date()
            let backend = try catalog.makeBackend(selector)
            var worst = 0.0
            for (shape, transA, transB) in SelfCheck.cases {
                worst = max(worst, try SelfCheck.gemmError(backend: backend, m: shape.0, n: shape.1, k: shape.2,
                                                          transA: transA, transB: transB, batch: 2, seed: 7))
            }
            let ok = worst < 1e-5
            if !ok { failures += 1 }
            print("\(ok ? "PASS" : "FAIL")  \(backend.name)  gemm max rel. error \(String(format: "%.2e", worst))  \(backend.deviceDescription)  (\(String(format: "%.2f", Date().timeIntervalSince(start))) s)")
            if let cl = backend as? OpenCLBackend {
                for p in cl.builtPrograms {
                    print("      Kernels/\(p.file): \(p.fromCache ? "loaded from cache" : "compiled") in \(String(format: "%.3f", p.buildSeconds)) s")
                }
            }
        }
        if failures > 0 { throw CommandError("self-check failed on \(failures) device(s)") }
    }
}
