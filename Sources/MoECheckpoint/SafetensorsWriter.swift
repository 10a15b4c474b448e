import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One tensor a writer has been told to expect.
public struct PlannedTensor: Sendable, Equatable {
    public let name: String
    public let dtype: StorageDType
    public let shape: [Int]
    public init(name: String, dtype: StorageDType, shape: [Int]) {
        self.name = name; self.dtype = dtype; self.shape = shape
    }
    public var byteCount: Int { dtype.byteCount(elements: shape.reduce(1, *)) ?? 0 }
}

/// Writes a safetensors file tensor by tensor, so that peak memory is one
/// tensor, not the model. The header is computed up front from the planned
/// list; data goes to a hidden temporary file beside the target, which is
/// renamed into place only by `finish()`. Until then — on any error, or if the
/// writer is dropped — the target is untouched and the temporary file removed.
public final class SafetensorsStreamWriter {
    public let url: URL
    private let tmpPath: String
    private var fd: Int32
    private let plan: [PlannedTensor]
    private var next = 0
    private var finished = false

    public init(url: URL, tensors: [PlannedTensor], metadata: [String: String]) throws {
        self.url = url
        plan = tensors
        var seen = Set<String>()
        for t in tensors {
            guard t.name != "__metadata__", seen.insert(t.name).inserted else {
                throw CheckpointError(.usage, "cannot write two tensors named \(t.name)")
            }
            guard Checked.product(t.shape) != nil else { throw CheckpointError(.usage, "tensor \(t.name) shape \(t.shape) overflows") }
        }
        let header = Self.header(tensors: tensors, metadata: metadata)
        let dir = url.deletingLastPathComponent()
        tmpPath = dir.appendingPathComponent(".\(url.lastPathComponent).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        fd = open(tmpPath, O_WRONLY | O_CREAT | O_EXCL, 0o644)
        guard fd >= 0 else {
            throw CheckpointError(.io, "cannot create a temporary file in \(dir.path): \(String(cString: strerror(errno)))")
        }
        do {
            var n = UInt64(header.count).littleEndian
            try withUnsafeBytes(of: &n) { try rawWrite($0) }
            try header.withUnsafeBytes { try rawWrite($0) }
        } catch { abort(); throw error }
    }

    deinit { if !finished { abort() } }

    /// The header bytes: JSON with `__metadata__` first, then the tensors in
    /// plan order, padded with spaces to a multiple of 8.
    public static func header(tensors: [PlannedTensor], metadata: [String: String]) -> [UInt8] {
        var members: [(String, JSONValue)] = []
        if !metadata.isEmpty {
            members.append(("__metadata__", .object(metadata.keys.sorted().map { ($0, .string(metadata[$0]!)) })))
        }
        var offset = 0
        for t in tensors {
            let end = offset + t.byteCount
            members.append((t.name, .object([("dtype", .string(t.dtype.rawValue)),
                                             ("shape", .array(t.shape.map { .int($0) })),
                                             ("data_offsets", .array([.int(offset), .int(end)]))])))
            offset = end
        }
        var bytes = Array(JSONValue.object(members).serialized().utf8)
        while bytes.count % 8 != 0 { bytes.append(0x20) }
        return bytes
    }

    private func rawWrite(_ buf: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buf.count {
            let r = posixWrite(fd, buf.baseAddress! + done, buf.count - done)
            if r < 0 {
                if errno == EINTR { continue }
                let e = errno
                let hint = e == ENOSPC || e == EFBIG || e == EDQUOT ? " (free disk space, or raise the file-size limit, and run again; the previous file is untouched)" : ""
                throw CheckpointError(.io, "writing \(url.path) failed: \(String(cString: strerror(e)))\(hint)")
            }
            done += r
        }
    }

    /// The next planned tensor's name, or nil when all are written.
    public var nextName: String? { next < plan.count ? plan[next].name : nil }

    /// Writes the next tensor's raw bytes (must match the plan's dtype and size).
    public func write(_ name: String, bytes: UnsafeRawBufferPointer) throws {
        guard next < plan.count, plan[next].name == name else {
            throw CheckpointError(.usage, "tensor \(name) written out of plan order (expected \(nextName ?? "none"))")
        }
        guard bytes.count == plan[next].byteCount else {
            throw CheckpointError(.usage, "tensor \(name): \(bytes.count) bytes given, \(plan[next].byteCount) planned")
        }
        if bytes.count > 0 { try rawWrite(bytes) }
        next += 1
    }

    /// Writes the next tensor from f32 values, converting to its planned F32, F16 or BF16 dtype.
    public func write(_ name: String, floats: [Float]) throws {
        guard next < plan.count else { throw CheckpointError(.usage, "tensor \(name) was not planned") }
        switch plan[next].dtype {
        case .F32: try floats.withUnsafeBytes { try write(name, bytes: $0) }
        case .F16: try floats.map { HalfConversion.f32ToF16($0) }.withUnsafeBytes { try write(name, bytes: $0) }
        case .BF16: try floats.map { HalfConversion.f32ToBF16($0) }.withUnsafeBytes { try write(name, bytes: $0) }
        default: throw CheckpointError(.usage, "tensor \(name) is planned as \(plan[next].dtype.rawValue); floats can only be written as F32, F16 or BF16")
        }
    }

    /// Flushes to disk and renames the temporary file onto the target.
    public func finish() throws {
        guard next == plan.count else {
            abort()
            throw CheckpointError(.usage, "only \(next) of \(plan.count) planned tensors were written")
        }
        guard fsync(fd) == 0, close(fd) == 0 else {
            let m = String(cString: strerror(errno)); fd = -1; abort()
            throw CheckpointError(.io, "flushing \(url.lastPathComponent) failed: \(m)")
        }
        fd = -1
        guard rename(tmpPath, url.path) == 0 else {
            let m = String(cString: strerror(errno)); abort()
            throw CheckpointError(.io, "cannot move the finished file onto \(url.path): \(m)")
        }
        finished = true
    }

    /// Closes and removes the temporary file; the target is left as it was.
    public func abort() {
        if fd >= 0 { close(fd); fd = -1 }
        unlink(tmpPath)
        finished = true
    }
}

/// Writes whole tensors at once (tests, small files): the same format and the same atomic rename.
public func writeSafetensors(to url: URL, tensors: [(name: String, dtype: StorageDType, shape: [Int], data: Data)],
                             metadata: [String: String] = [:]) throws {
    let w = try SafetensorsStreamWriter(url: url, tensors: tensors.map { PlannedTensor(name: $0.name, dtype: $0.dtype, shape: $0.shape) },
                                        metadata: metadata)
    for t in tensors { try t.data.withUnsafeBytes { try w.write(t.name, bytes: $0) } }
    try w.finish()
}

/// Little-endian bytes of f32 values converted to `dtype` (F32, F16 or BF16),
/// for `writeSafetensors`.
public func encodeFloats(_ values: [Float], as dtype: StorageDType) -> Data {
    switch dtype {
    case .F16: return values.map { HalfConversion.f32ToF16($0) }.withUnsafeBytes { Data($0) }
    case .BF16: return values.map { HalfConversion.f32ToBF16($0) }.withUnsafeBytes { Data($0) }
    default: return values.withUnsafeBytes { Data($0) }
    }
}

/// `write(2)`, named apart from the writer's own `write` methods.
@inline(__always) func posixWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int {
    #if canImport(Glibc)
    return Glibc.write(fd, p, n)
    #else
    return Darwin.write(fd, p, n)
    #endif
}
