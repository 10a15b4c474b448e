// Programs built from Kernels/*.cl, with compiled binaries cached on disk per
// (device, driver, source, options) so the second start skips the compiler.
import COpenCL
import Foundation

/// A kernel file that failed to compile: names the file and carries the full build log.
public struct KernelBuildError: Error, CustomStringConvertible {
    public let file: String
    public let device: String
    public let options: String
    public let log: String
    public var description: String {
        "OpenCL build of Kernels/\(file) failed on \(device) (options: \(options)).\n"
            + "Fix the kernel source (or set MOE_GPU_KERNELS to a folder of good sources). Build log:\n\(log)"
    }
}

/// Where kernel sources come from: the copies embedded in the binary, or a
/// folder named by `MOE_GPU_KERNELS` for kernel development.
public enum KernelSources {
    public struct MissingKernel: Error, CustomStringConvertible {
        public let file: String, folder: String?
        public var description: String {
            if let folder { return "kernel file \(file) not found in MOE_GPU_KERNELS=\(folder); unset it to use the embedded kernels" }
            return "kernel file \(file) is not embedded in this binary; rebuild moe-gpu"
        }
    }

    public static var overrideFolder: String? {
        guard let dir = ProcessInfo.processInfo.environment["MOE_GPU_KERNELS"], !dir.isEmpty else { return nil }
        return dir
    }

    public static func source(_ file: String) throws -> String {
        if let dir = overrideFolder {
            let url = URL(fileURLWithPath: dir).appendingPathComponent(file)
            guard let text = try? String(contentsOf: url, encoding: .utf8) else { throw MissingKernel(file: file, folder: dir) }
            return text
        }
        guard let text = EmbeddedKernels.sources[file] else { throw MissingKernel(file: file, folder: nil) }
        return text
    }

    public static var embeddedFiles: [String] { EmbeddedKernels.sources.keys.sorted() }
}

/// On-disk cache of program binaries under `$XDG_CACHE_HOME/moe-gpu`
/// (default `~/.cache/moe-gpu`). Each entry stores its full key, so a hash
/// collision, a stale driver or a corrupt file is simply a miss.
public struct ProgramCache: Sendable {
    public let directory: URL
    private static let magic = Array("MOEGPU-PROGRAM-2\n".utf8)

    public static var defaultDirectory: URL {
        let env = ProcessInfo.processInfo.environment
        if let xdg = env["XDG_CACHE_HOME"], !xdg.isEmpty {
            return URL(fileURLWithPath: xdg).appendingPathComponent("moe-gpu")
        }
        let home = env["HOME"] ?? FileManager.default.homeDirectoryForCurrentUser.path
        return URL(fileURLWithPath: home).appendingPathComponent(".cache/moe-gpu")
    }

    public init(directory: URL = ProgramCache.defaultDirectory) { self.directory = directory }

    static func key(device: CLDevice, source: String, options: String) -> String {
        [device.platform.name, device.platform.version, device.name, device.vendor, device.driverVersion,
         device.deviceVersion, options, source].joined(separator: "\u{1}")
    }

    /// FNV-1a 64: names entries and checks their contents (not a security boundary).
    static func fnv1a<S: Sequence>(_ bytes: S) -> UInt64 where S.Element == UInt8 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h
    }

    func url(for key: String) -> URL {
        // The full key inside the entry decides a hit; the hash only names the file.
        directory.appendingPathComponent(String(format: "%016llx.clbin", ProgramCache.fnv1a(key.utf8)))
    }

    func load(key: String) -> [UInt8]? {
        guard let data = try? Data(contentsOf: url(for: key)) else { return nil }
        let bytes = [UInt8](data)
        let keyBytes = Array(key.utf8)
        let header = ProgramCache.magic + withUnsafeBytes(of: UInt64(keyBytes.count).littleEndian, Array.init) + keyBytes
        guard bytes.count > header.count + 16, Array(bytes[0..<header.count]) == header else { return nil }
        var n: UInt64 = 0, sum: UInt64 = 0
        withUnsafeMutableBytes(of: &n) { $0.copyBytes(from: bytes[header.count..<header.count + 8]) }
        withUnsafeMutableBytes(of: &sum) { $0.copyBytes(from: bytes[header.count + 8..<header.count + 16]) }
        let start = header.count + 16
        guard UInt64(bytes.count - start) == UInt64(littleEndian: n) else { return nil }
        let binary = Array(bytes[start...])
        // Drivers do not all validate binaries (PoCL crashes on a damaged one): check it here.
        guard ProgramCache.fnv1a(binary) == UInt64(littleEndian: sum) else { return nil }
        return binary
    }

    func store(key: String, binary: [UInt8]) {
        let keyBytes = Array(key.utf8)
        var out = ProgramCache.magic
        out += withUnsafeBytes(of: UInt64(keyBytes.count).littleEndian, Array.init)
        out += keyBytes
        out += withUnsafeBytes(of: UInt64(binary.count).littleEndian, Array.init)
        out += withUnsafeBytes(of: ProgramCache.fnv1a(binary).littleEndian, Array.init)
        out += binary
        // Best effort: a read-only cache folder only costs a rebuild next time.
        try? FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        try? atomicWrite(Data(out), to: url(for: key))
    }
}

public final class CLProgram: @unchecked Sendable {
    public let file: String
    public let options: String
    /// True when this program came from the on-disk cache rather than the compiler.
    public let fromCache: Bool
    /// Wall time of creating and building the program.
    public let buildSeconds: Double
    let program: cl_program
    unowned let context: CLContext

    private init(file: String, options: String, program: cl_program, context: CLContext, fromCache: Bool, seconds: Double) {
        self.file = file; self.options = options; self.program = program; self.context = context
        self.fromCache = fromCache; self.buildSeconds = seconds
    }
    deinit { clReleaseProgram(program) }

    public func kernel(_ name: String) throws -> CLKernel {
        var status: cl_int = 0
        guard let k = clCreateKernel(program, name, &status), status == CL_SUCCESS else {
            throw CLError(call: "clCreateKernel(\(name)) from Kernels/\(file)", status: status)
        }
        return CLKernel(name: name, kernel: k, context: context)
    }

    /// Builds `source` (the text of Kernels/`file`) for the context's device.
    public static func build(file: String, source: String, options: String, context: CLContext,
                             cache: ProgramCache?) throws -> CLProgram {
        // MOE_GPU_CL_OPTIONS adds build options (e.g. -cl-opt-disable for oclgrind's checks).
        let options = options + (ProcessInfo.processInfo.environment["MOE_GPU_CL_OPTIONS"].map { " " + $0 } ?? "")
        let start = Date()
        let device = context.device
        let key = ProgramCache.key(device: device, source: source, options: options)
        if let cache, let binary = cache.load(key: key),
           let program = try? fromBinary(binary, options: options, context: context) {
            return CLProgram(file: file, options: options, program: program, context: context, fromCache: true,
                             seconds: Date().timeIntervalSince(start))
        }
        var status: cl_int = 0
        let program: cl_program? = source.withCString { ptr in
            var p: UnsafePointer<CChar>? = ptr
            var len = strlen(ptr)
            return clCreateProgramWithSource(context.context, 1, &p, &len, &status)
        }
        guard let program, status == CL_SUCCESS else { throw CLError(call: "clCreateProgramWithSource(\(file))", status: status) }
        var dev: cl_device_id? = device.id
        let buildStatus = clBuildProgram(program, 1, &dev, options, nil, nil)
        if buildStatus != CL_SUCCESS {
            let log = buildLog(program, device)
            clReleaseProgram(program)
            throw KernelBuildError(file: file, device: device.name, options: options,
                                   log: log.isEmpty ? CLError(call: "clBuildProgram", status: buildStatus).description : log)
        }
        if let cache, let binary = binary(of: program) { cache.store(key: key, binary: binary) }
        return CLProgram(file: file, options: options, program: program, context: context, fromCache: false,
                         seconds: Date().timeIntervalSince(start))
    }

    private static func fromBinary(_ binary: [UInt8], options: String, context: CLContext) throws -> cl_program {
        var status: cl_int = 0, binaryStatus: cl_int = 0
        var dev: cl_device_id? = context.device.id
        var length = binary.count
        let program: cl_program? = binary.withUnsafeBufferPointer { buf in
            var ptr: UnsafePointer<UInt8>? = buf.baseAddress
            return clCreateProgramWithBinary(context.context, 1, &dev, &length, &ptr, &binaryStatus, &status)
        }
        guard let program, status == CL_SUCCESS, binaryStatus == CL_SUCCESS else {
            if let program { clReleaseProgram(program) }
            throw CLError(call: "clCreateProgramWithBinary", status: status != CL_SUCCESS ? status : binaryStatus)
        }
        let s = clBuildProgram(program, 1, &dev, options, nil, nil)
        guard s == CL_SUCCESS else { clReleaseProgram(program); throw CLError(call: "clBuildProgram(binary)", status: s) }
        return program
    }

    private static func binary(of program: cl_program) -> [UInt8]? {
        var size = 0
        guard clGetProgramInfo(program, cl_program_info(CL_PROGRAM_BINARY_SIZES), MemoryLayout<Int>.size, &size, nil) == CL_SUCCESS,
              size > 0 else { return nil }
        var bytes = [UInt8](repeating: 0, count: size)
        let ok = bytes.withUnsafeMutableBufferPointer { buf -> Bool in
            var ptr: UnsafeMutablePointer<UInt8>? = buf.baseAddress
            return clGetProgramInfo(program, cl_program_info(CL_PROGRAM_BINARIES), MemoryLayout<UnsafeMutablePointer<UInt8>?>.size, &ptr, nil) == CL_SUCCESS
        }
        return ok ? bytes : nil
    }

    private static func buildLog(_ program: cl_program, _ device: CLDevice) -> String {
        var size = 0
        guard clGetProgramBuildInfo(program, device.id, cl_program_build_info(CL_PROGRAM_BUILD_LOG), 0, nil, &size) == CL_SUCCESS,
              size > 0 else { return "" }
        var bytes = [CChar](repeating: 0, count: size + 1)
        _ = clGetProgramBuildInfo(program, device.id, cl_program_build_info(CL_PROGRAM_BUILD_LOG), size, &bytes, nil)
        return String(cString: bytes).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
