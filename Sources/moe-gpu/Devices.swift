import ArgumentParser
import Foundation
import MoECompute

/// One line or JSON object per device, and which one `auto` picks.
struct Devices: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List every OpenCL platform and device, the CPU backend, and which one --device auto picks.")

    @Flag(name: .long, help: "Print one JSON object instead of a table.")
    var json = false

    func run() throws {
        // Under mpirun each rank lists what it sees and which device it takes.
        let world = try Distributed.start(timeout: 300)
        defer { Distributed.finish() }
        let catalog = DeviceCatalog()
        let auto = catalog.autoChoice
        if world.size > 1 { print("\(world.summary): auto picks \(auto.selector) (\(auto.reason))") }
        if json {
            var devices: [[String: Any]] = catalog.openCLDevices.map { d in
                ["selector": d.selector, "platform": d.platform.name, "platform_version": d.platform.version,
                 "name": d.name, "vendor": d.vendor, "type": d.kind.rawValue, "driver_version": d.driverVersion,
                 "device_version": d.deviceVersion, "opencl_c_version": d.openCLCVersion,
                 "compute_units": d.computeUnits, "clock_mhz": d.clockMHz,
                 "global_memory_bytes": d.globalMemoryBytes, "local_memory_bytes": d.localMemoryBytes,
                 "max_allocation_bytes": d.maxAllocationBytes, "max_work_group_size": d.maxWorkGroupSize,
                 "fp16": d.supportsFP16, "fp64": d.supportsFP64]
            }
            devices.append(["selector": "cpu", "name": CPUBackend().deviceDescription, "type": "cpu-backend",
                            "cores": ProcessInfo.processInfo.activeProcessorCount])
            let object: [String: Any] = ["devices": devices, "auto": ["selector": auto.selector.description, "reason": auto.reason]]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        if catalog.openCLDevices.isEmpty {
            print("No OpenCL platform found (install an OpenCL driver, e.g. apt-get install pocl-opencl-icd).")
        }
        for d in catalog.openCLDevices {
            print("\(d.selector)  \(d.name)")
            print("    platform      \(d.platform.name) (\(d.platform.version))")
            print("    vendor        \(d.vendor)")
            print("    type          \(d.kind.rawValue)")
            print("    driver        \(d.driverVersion); \(d.deviceVersion); \(d.openCLCVersion)")
            print("    compute units \(d.computeUnits) at \(d.clockMHz) MHz")
            print("    memory        global \(formatBytes(d.globalMemoryBytes)), local \(formatBytes(d.localMemoryBytes)), max allocation \(formatBytes(d.maxAllocationBytes))")
            print("    work-group    max \(d.maxWorkGroupSize)")
            print("    fp16 \(d.supportsFP16 ? "yes" : "no"), fp64 \(d.supportsFP64 ? "yes" : "no")")
        }
        print("cpu  \(CPUBackend().deviceDescription), \(ProcessInfo.processInfo.activeProcessorCount) cores")
        print("auto -> \(auto.selector) (\(auto.reason))")
    }
}

func formatBytes(_ b: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = Double(b), u = 0
    while v >= 1024 && u < units.count - 1 { v /= 1024; u += 1 }
    return u == 0 ? "\(b) B" : String(format: "%.1f %@", v, units[u])
}
