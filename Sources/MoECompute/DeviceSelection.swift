import Foundation

/// What `--device` (or `MOE_GPU_DEVICE`) asks for.
public enum DeviceSelector: Equatable, Sendable, CustomStringConvertible {
    /// The first OpenCL GPU or accelerator, else the CPU backend.
    case auto
    /// The CPU backend (OpenBLAS).
    case cpu
    /// Any OpenCL device, GPUs first (a CPU OpenCL device such as PoCL included).
    case openCL
    /// One OpenCL device by platform and device index.
    case openCLDevice(platform: Int, device: Int)

    public struct ParseError: Error, CustomStringConvertible {
        public let text: String
        public var description: String { "unknown device '\(text)': use auto, cpu, opencl or opencl:P:D (see `moe-gpu devices`)" }
    }

    public init(parsing text: String) throws {
        let t = text.trimmingCharacters(in: .whitespaces).lowercased()
        switch t {
        case "auto", "": self = .auto
        case "cpu": self = .cpu
        case "opencl": self = .openCL
        default:
            let parts = t.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 3, parts[0] == "opencl", let p = Int(parts[1]), let d = Int(parts[2]), p >= 0, d >= 0 else {
                throw ParseError(text: text)
            }
            self = .openCLDevice(platform: p, device: d)
        }
    }

    /// `--device` when given, else `MOE_GPU_DEVICE`, else auto.
    public static func resolve(_ flag: String?) throws -> DeviceSelector {
        if let flag { return try DeviceSelector(parsing: flag) }
        if let env = ProcessInfo.processInfo.environment["MOE_GPU_DEVICE"], !env.isEmpty { return try DeviceSelector(parsing: env) }
        return .auto
    }

    public var description: String {
        switch self {
        case .auto: return "auto"
        case .cpu: return "cpu"
        case .openCL: return "opencl"
        case .openCLDevice(let p, let d): return "opencl:\(p):\(d)"
        }
    }
}

public struct DeviceNotFound: Error, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
}

/// Every device this machine offers and the rule that picks one.
public struct DeviceCatalog: Sendable {
    public let openCLDevices: [CLDevice]

    public init() { openCLDevices = CLPlatform.all().flatMap { $0.devices() } }

    /// The device `auto` picks, and why.
    public var autoChoice: (selector: DeviceSelector, reason: String) {
        if let gpu = gpuForThisRank {
            let which = gpus.count > 1 ? "OpenCL \(gpu.kind.rawValue) \(Distributed.world.localRank % gpus.count) of \(gpus.count) (by local rank)" : "first OpenCL \(gpu.kind.rawValue)"
            return (.openCLDevice(platform: gpu.platform.index, device: gpu.index), "\(which): \(gpu.name)")
        }
        if openCLDevices.isEmpty {
            return (.cpu, "no OpenCL platform found, so the CPU backend (OpenBLAS)")
        }
        return (.cpu, "no OpenCL GPU or accelerator; the CPU backend (OpenBLAS) beats OpenCL on a CPU device (ask for opencl to use it)")
    }

    private var gpus: [CLDevice] { openCLDevices.filter { $0.kind == .gpu || $0.kind == .accelerator } }
    /// Several ranks on one host take one GPU each, by their local rank.
    private var gpuForThisRank: CLDevice? { gpus.isEmpty ? nil : gpus[Distributed.world.localRank % gpus.count] }

    /// The OpenCL device a selector names, if it names one.
    public func openCLDevice(for selector: DeviceSelector) throws -> CLDevice? {
        switch selector {
        case .cpu: return nil
        case .auto: return try openCLDevice(for: autoChoice.selector)
        case .openCL:
            guard let d = gpuForThisRank ?? openCLDevices.first else {
                throw DeviceNotFound(description: "no OpenCL device found: install an OpenCL driver (e.g. apt-get install pocl-opencl-icd) or use --device cpu")
            }
            return d
        case .openCLDevice(let p, let i):
            guard let d = openCLDevices.first(where: { $0.platform.index == p && $0.index == i }) else {
                throw DeviceNotFound(description: "no OpenCL device opencl:\(p):\(i); `moe-gpu devices` lists the devices here")
            }
            return d
        }
    }

    public func makeBackend(_ selector: DeviceSelector, cache: ProgramCache? = ProgramCache()) throws -> Backend {
        if let d = try openCLDevice(for: selector) { return try OpenCLBackend(device: d, cache: cache) }
        return CPUBackend()
    }
}
