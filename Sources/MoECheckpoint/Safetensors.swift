import Foundation

/// A safetensors element type. Sizes are in bits because of the sub-byte
/// float formats (F4, F6_*); a tensor's byte size is `ceil(count * bits / 8)`.
public enum StorageDType: String, CaseIterable, Sendable {
    case BOOL, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, C64, F4, F6_E2M3, F6_E3M2

    public var bits: Int {
        switch self {
        case .F4: return 4
        case .F6_E2M3, .F6_E3M2: return 6
        case .BOOL, .U8, .I8, .F8_E5M2, .F8_E4M3, .F8_E8M0: return 8
        case .I16, .U16, .F16, .BF16: return 16
        case .I32, .U32, .F32: return 32
        case .F64, .I64, .U64, .C64: return 64
        }
    }

    /// Whether `floats(...)` converts this type to f32.
    public var isLoadableFloat: Bool { self == .F32 || self == .F16 || self == .BF16 || self == .F64 }

    /// Bytes for `count` elements, or nil on overflow.
    public func byteCount(elements count: Int) -> Int? {
        guard let b = Checked.mul(count, bits) else { return nil }
        return b / 8 + (b % 8 == 0 ? 0 : 1)
    }
}

/// Where one tensor lives in a safetensors buffer.
public struct SafetensorsEntry: Sendable {
    public let name: String
    public let dtype: StorageDType
    public let shape: [Int]
    /// Byte range relative to the start of the data buffer.
    public let begin: Int, end: Int
}

/// IEEE half and bfloat16 to float, exactly (including subnormals, inf, NaN).
public enum HalfConversion {
    @inline(__always) public static func f16ToF32(_ h: UInt16) -> Float {
        Float(Float16(bitPattern: h))
    }
    @inline(__always) public static func bf16ToF32(_ h: UInt16) -> Float {
        Float(bitPattern: UInt32(h) << 16)
    }
    /// Round-to-nearest-even f32 -> bf16 (NaN stays NaN).
    @inline(__always) public static func f32ToBF16(_ f: Float) -> UInt16 {
        let u = f.bitPattern
        if f.isNaN { return UInt16(u >> 16) | 0x40 }
        let rounding = 0x7FFF + ((u >> 16) & 1)
        return UInt16((u &+ rounding) >> 16)
    }
    @inline(__always) public static func f32ToF16(_ f: Float) -> UInt16 { Float16(f).bitPattern }
}

/// Converts `count` little-endian elements of `dtype` at `src` to f32.
func convertToFloats(_ src: UnsafeRawBufferPointer, dtype: StorageDType, count: Int, name: String) throws -> [Float] {
    var out = [Float](repeating: 0, count: count)
    out.withUnsafeMutableBufferPointer { dst in
        switch dtype {
        case .F32:
            if count > 0 { UnsafeMutableRawPointer(dst.baseAddress!).copyMemory(from: src.baseAddress!, byteCount: count * 4) }
        case .F16:
            for i in 0..<count { dst[i] = HalfConversion.f16ToF32(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .BF16:
            for i in 0..<count { dst[i] = HalfConversion.bf16ToF32(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .F64:
            for i in 0..<count { dst[i] = Float(src.loadUnaligned(fromByteOffset: 8 * i, as: Double.self)) }
        default: break
        }
    }
    guard dtype.isLoadableFloat else {
        throw CheckpointError(.unsupported, "tensor \(name) has dtype \(dtype.rawValue), which cannot be loaded as floats; only F32, F16, BF16 and F64 can")
    }
    return out
}

/// One safetensors file, memory-mapped; tensors are converted only when asked for.
/// Opening enforces every check of the reference reader (huggingface/safetensors).
public final class SafetensorsFile: @unchecked Sendable {
    public static let maxHeaderSize = 100_000_000

    public let path: String
    public let entries: [SafetensorsEntry]          // in header order
    public let metadata: [String: String]
    public let dataStart: Int
    let file: MappedFile
    private let index: [String: Int]

    public convenience init(path: String) throws {
        try self.init(file: MappedFile(path: path))
    }

    init(file: MappedFile) throws {
        self.file = file
        path = file.path
        let name = (file.path as NSString).lastPathComponent
        func bad(_ m: String) -> CheckpointError { .format(name, "not a valid safetensors file: \(m)") }

        guard file.count >= 8 else { throw bad("only \(file.count) bytes, shorter than the 8-byte header length") }
        let n64 = file.bytes(0..<8).loadUnaligned(as: UInt64.self).littleEndian
        guard n64 <= UInt64(Self.maxHeaderSize) else {
            throw bad("header length \(n64) exceeds the 100,000,000-byte limit")
        }
        let n = Int(n64)
        guard 8 + n <= file.count else {
            throw bad("header length \(n) runs past the end of the \(file.count)-byte file (truncated?)")
        }
        let headerBytes = Array(file.bytes(8..<8 + n))
        guard String(validating: headerBytes, as: UTF8.self) != nil else { throw bad("header is not valid UTF-8") }
        guard headerBytes.first == UInt8(ascii: "{") else { throw bad("header does not start with '{'") }
        let json: JSONValue
        do { json = try JSONParser.parse(headerBytes) } catch let e as JSONParser.Failure {
            throw bad("header is not valid JSON (\(e.message))")
        }
        guard case .object(let members) = json else { throw bad("header is not a JSON object") }

        var seen = Set<String>()
        var list: [SafetensorsEntry] = []
        var meta: [String: String] = [:]
        for (key, value) in members {
            guard seen.insert(key).inserted else { throw bad("duplicate tensor name \"\(key)\"") }
            if key == "__metadata__" {
                guard case .object(let kv) = value else { throw bad("__metadata__ is not an object") }
                for (k, v) in kv {
                    guard let s = v.stringValue else { throw bad("__metadata__ value for \"\(k)\" is not a string") }
                    meta[k] = s
                }
                continue
            }
            guard case .object = value else { throw bad("entry \"\(key)\" is not an object") }
            guard let dt = value["dtype"]?.stringValue else { throw bad("tensor \"\(key)\" has no dtype") }
            guard let dtype = StorageDType(rawValue: dt) else {
                throw bad("tensor \"\(key)\" has unknown dtype \"\(dt)\" (known: \(StorageDType.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            guard let dims = value["shape"]?.arrayValue else { throw bad("tensor \"\(key)\" has no shape") }
            var shape: [Int] = []
            for d in dims {
                guard let v = d.exactInt else { throw bad("tensor \"\(key)\" has a shape entry that is not a non-negative integer") }
                shape.append(v)
            }
            guard let offs = value["data_offsets"]?.arrayValue, offs.count == 2,
                  let b = offs[0].exactInt, let e = offs[1].exactInt else {
                throw bad("tensor \"\(key)\" needs data_offsets [begin, end] of non-negative integers")
            }
            list.append(SafetensorsEntry(name: key, dtype: dtype, shape: shape, begin: b, end: e))
        }

        // Sorted by offsets, the tensors must tile the buffer exactly.
        let sorted = list.sorted { ($0.begin, $0.end) < ($1.begin, $1.end) }
        var previousEnd = 0
        for e in sorted {
            if e.begin != previousEnd {
                throw bad(e.begin > previousEnd
                          ? "hole in the data buffer before tensor \"\(e.name)\" (begins at \(e.begin), previous tensor ends at \(previousEnd))"
                          : "tensor \"\(e.name)\" overlaps the previous tensor (begins at \(e.begin), previous ends at \(previousEnd))")
            }
            guard e.end >= e.begin else { throw bad("tensor \"\(e.name)\" ends (\(e.end)) before it begins (\(e.begin))") }
            guard let count = Checked.product(e.shape), let size = e.dtype.byteCount(elements: count) else {
                throw bad("tensor \"\(e.name)\" shape \(e.shape) overflows")
            }
            guard size == e.end - e.begin else {
                throw bad("tensor \"\(e.name)\" has \(e.end - e.begin) bytes but shape \(e.shape) of \(e.dtype.rawValue) needs \(size)")
            }
            previousEnd = e.end
        }
        let bufferLength = file.count - 8 - n
        guard bufferLength == previousEnd else {
            throw bad("data buffer is \(bufferLength) bytes but the tensors cover \(previousEnd) (truncated or trailing data)")
        }
        entries = list
        metadata = meta
        dataStart = 8 + n
        var idx: [String: Int] = [:]
        for (i, e) in list.enumerated() { idx[e.name] = i }
        index = idx
    }

    public func entry(_ name: String) -> SafetensorsEntry? { index[name].map { entries[$0] } }

    /// The raw little-endian bytes of a tensor, straight from the map.
    public func rawBytes(_ e: SafetensorsEntry) -> UnsafeRawBufferPointer {
        file.bytes(dataStart + e.begin..<dataStart + e.end)
    }

    public func floats(_ name: String) throws -> [Float] {
        guard let e = entry(name) else { throw CheckpointError(.usage, "no tensor named \(name) in \(path)") }
        return try convertToFloats(rawBytes(e), dtype: e.dtype, count: Checked.product(e.shape)!, name: name)
    }
}

