import Foundation

/// The ggml tensor types this reader can dequantise, with their block geometry.
public enum GGMLType: UInt32, CaseIterable, Sendable {
    case F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q6_K = 14, BF16 = 30

    /// Values per block and bytes per block.
    public var block: (values: Int, bytes: Int) {
        switch self {
        case .F32: return (1, 4)
        case .F16, .BF16: return (1, 2)
        case .Q4_0: return (32, 18)
        case .Q4_1: return (32, 20)
        case .Q5_0: return (32, 22)
        case .Q5_1: return (32, 24)
        case .Q8_0: return (32, 34)
        case .Q4_K: return (256, 144)
        case .Q6_K: return (256, 210)
        }
    }
    public var name: String { "\(self)" }
}

/// A GGUF metadata value.
public enum GGUFValue: Sendable, Equatable {
    case int(Int64), uint(UInt64), float(Double), bool(Bool), string(String)
    /// Arrays are kept only as their element count and, for short numeric or string arrays, the values as text.
    case array(count: Int, preview: [String])

    public var text: String {
        switch self {
        case .int(let v): return "\(v)"
        case .uint(let v): return "\(v)"
        case .float(let v): return "\(v)"
        case .bool(let v): return v ? "true" : "false"
        case .string(let s): return s
        case .array(let n, let p): return p.count == n ? "[" + p.joined(separator: ", ") + "]" : "[\(n) values]"
        }
    }
    public var intValue: Int? {
        switch self {
        case .int(let v): return Int(exactly: v)
        case .uint(let v): return Int(exactly: v)
        default: return nil
        }
    }
    public var doubleValue: Double? {
        switch self {
        case .float(let v): return v
        case .int(let v): return Double(v)
        case .uint(let v): return Double(v)
        default: return nil
        }
    }
}

/// One tensor of a GGUF file, as stored: ggml dims are fastest-first.
public struct GGUFTensorInfo: Sendable {
    public let name: String
    public let dims: [Int]
    public let type: GGMLType
    /// Absolute byte range in the file.
    public let range: Range<Int>
    /// Hugging Face order (the reverse of `dims`).
    public var shape: [Int] { dims.reversed() }
}

/// A GGUF (v2/v3, little-endian) file, memory-mapped and fully validated on open.
public final class GGUFFile: @unchecked Sendable {
    public let path: String
    public let version: UInt32
    public let metadata: [String: GGUFValue]
    public let tensors: [GGUFTensorInfo]
    let file: MappedFile

    public convenience init(path: String) throws { try self.init(file: MappedFile(path: path)) }

    init(file: MappedFile) throws {
        self.file = file
        path = file.path
        let fname = (file.path as NSString).lastPathComponent
        func bad(_ m: String) -> CheckpointError { .format(fname, "not a valid GGUF file: \(m)") }
        var r = Reader(bytes: file.all, bad: bad)

        let magic = try r.bytes(4)
        guard Array(magic) == Array("GGUF".utf8) else {
            throw bad("bad magic \(Array(magic).map { String(format: "%02x", $0) }.joined()) (expected 47475546, \"GGUF\")")
        }
        version = try r.u32()
        guard version == 2 || version == 3 else { throw bad("version \(version) is not supported (only 2 and 3)") }
        let tensorCount = try r.count64("tensor count")
        let kvCount = try r.count64("metadata count")

        var meta: [String: GGUFValue] = [:]
        for _ in 0..<kvCount {
            let key = try r.string()
            let type = try r.u32()
            meta[key] = try r.value(type: type, depth: 0)
        }
        metadata = meta
        var alignment = 32
        if let a = meta["general.alignment"] {
            guard let v = a.intValue, v > 0, v & (v - 1) == 0, v <= 1 << 20 else { throw bad("general.alignment must be a power of two") }
            alignment = v
        }

        var infos: [(String, [Int], GGMLType, Int, Int)] = []
        var seen = Set<String>()
        for _ in 0..<tensorCount {
            let name = try r.string()
            guard seen.insert(name).inserted else { throw bad("duplicate tensor name \(name)") }
            let nd = try r.u32()
            guard nd <= 8 else { throw bad("tensor \(name) has \(nd) dimensions (at most 8)") }
            var dims: [Int] = []
            for _ in 0..<nd { dims.append(try r.count64("dimension of \(name)")) }
            let rawType = try r.u32()
            guard let type = GGMLType(rawValue: rawType) else {
                throw CheckpointError(.unsupported, "\(fname): tensor \(name) has ggml type \(rawType), which this reader cannot dequantise (supported: \(GGMLType.allCases.map(\.name).joined(separator: ", ")))")
            }
            let offset = try r.count64("offset of \(name)")
            guard let n = Checked.product(dims) else { throw bad("tensor \(name) size overflows") }
            let (bv, bb) = type.block
            guard (dims.first ?? 1) % bv == 0 else { throw bad("tensor \(name) row length \(dims.first ?? 1) is not a multiple of the \(type.name) block size \(bv)") }
            guard let size = Checked.mul(n / bv, bb) else { throw bad("tensor \(name) size overflows") }
            guard offset % alignment == 0 else { throw bad("tensor \(name) offset \(offset) is not aligned to \(alignment)") }
            infos.append((name, dims, type, offset, size))
        }
        let dataStart = (r.position + alignment - 1) / alignment * alignment
        var list: [GGUFTensorInfo] = []
        for (name, dims, type, offset, size) in infos {
            guard let begin = Checked.add(dataStart, offset), let end = Checked.add(begin, size), end <= file.count else {
                throw bad("tensor \(name) data (offset \(offset), \(size) bytes) runs past the end of the \(file.count)-byte file (truncated?)")
            }
            list.append(GGUFTensorInfo(name: name, dims: dims, type: type, range: begin..<end))
        }
        let byStart = list.sorted { $0.range.lowerBound < $1.range.lowerBound }
        for (a, b) in zip(byStart, byStart.dropFirst()) where b.range.lowerBound < a.range.upperBound {
            throw bad("tensors \(a.name) and \(b.name) overlap")
        }
        tensors = list
    }

    public func tensor(_ name: String) -> GGUFTensorInfo? { tensors.first { $0.name == name } }

    /// The tensor dequantised to f32, in stored (ggml) element order.
    public func dequantize(_ t: GGUFTensorInfo) -> [Float] {
        defer { file.release(t.range) }
        return GGUFDequant.dequantize(file.bytes(t.range), type: t.type, count: t.dims.reduce(1, *))
    }

    /// A bounds-checked little-endian cursor over the mapped bytes.
    struct Reader {
        let bytes: UnsafeRawBufferPointer
        let bad: (String) -> CheckpointError
        var position = 0

        mutating func bytes(_ n: Int) throws -> UnsafeRawBufferPointer {
            guard n >= 0, let end = Checked.add(position, n), end <= bytes.count else {
                throw bad("header truncated at byte \(position) (needed \(n) more bytes)")
            }
            defer { position = end }
            return UnsafeRawBufferPointer(rebasing: bytes[position..<end])
        }
        mutating func load<T: FixedWidthInteger>(_: T.Type) throws -> T {
            T(littleEndian: try bytes(MemoryLayout<T>.size).loadUnaligned(as: T.self))
        }
        mutating func u32() throws -> UInt32 { try load(UInt32.self) }
        mutating func count64(_ what: String) throws -> Int {
            let v = try load(UInt64.self)
            guard v <= UInt64(Int32.max) * 64 else { throw bad("\(what) \(v) is implausibly large") }
            return Int(v)
        }
        mutating func string() throws -> String {
            let n = try count64("string length")
            let b = try bytes(n)
            guard let s = String(validating: b, as: UTF8.self) else { throw bad("string at byte \(position - n) is not UTF-8") }
            return s
        }
        mutating func value(type: UInt32, depth: Int) throws -> GGUFValue {
            switch type {
            case 0: return .uint(UInt64(try load(UInt8.self)))
            case 1: return .int(Int64(try load(Int8.self)))
            case 2: return .uint(UInt64(try load(UInt16.self)))
            case 3: return .int(Int64(try load(Int16.self)))
            case 4: return .uint(UInt64(try load(UInt32.self)))
            case 5: return .int(Int64(try load(Int32.self)))
            case 6: return .float(Double(Float(bitPattern: try load(UInt32.self))))
            case 7: return .bool(try load(UInt8.self) != 0)
            case 8: return .string(try string())
            case 9:
                guard depth == 0 else { throw bad("nested metadata arrays are not supported") }
                let et = try u32()
                let n = try count64("array length")
                var preview: [String] = []
                for i in 0..<n {
                    let v = try value(type: et, depth: depth + 1)
                    if i < 16 { preview.append(v.text) }
                }
                return .array(count: n, preview: n <= 16 ? preview : [])
            case 10: return .uint(try load(UInt64.self))
            case 11: return .int(try load(Int64.self))
            case 12: return .float(Double(bitPattern: try load(UInt64.self)))
            default: throw bad("unknown metadata value type \(type)")
            }
        }
    }
}

/// Block dequantisation, written after ggml's reference `dequantize_row_*`.
public enum GGUFDequant {
    @inline(__always) static func h(_ p: UnsafeRawBufferPointer, _ o: Int) -> Float {
        HalfConversion.f16ToF32(p.loadUnaligned(fromByteOffset: o, as: UInt16.self))
    }

    public static func dequantize(_ src: UnsafeRawBufferPointer, type: GGMLType, count: Int) -> [Float] {
        var y = [Float](repeating: 0, count: count)
        let (bv, bb) = type.block
        let blocks = count / bv
        y.withUnsafeMutableBufferPointer { y in
            for b in 0..<blocks {
                let p = UnsafeRawBufferPointer(rebasing: src[b * bb..<(b + 1) * bb])
                let o = b * bv
                switch type {
                case .F32: y[o] = Float(bitPattern: p.loadUnaligned(as: UInt32.self))
                case .F16: y[o] = h(p, 0)
                case .BF16: y[o] = HalfConversion.bf16ToF32(p.loadUnaligned(as: UInt16.self))
                case .Q4_0:
                    let d = h(p, 0)
                    for j in 0..<16 {
                        let q = p[2 + j]
                        y[o + j] = Float(Int(q & 0xF) - 8) * d
                        y[o + j + 16] = Float(Int(q >> 4) - 8) * d
                    }
                case .Q4_1:
                    let d = h(p, 0), m = h(p, 2)
                    for j in 0..<16 {
                        let q = p[4 + j]
                        y[o + j] = Float(q & 0xF) * d + m
                        y[o + j + 16] = Float(q >> 4) * d + m
                    }
                case .Q5_0:
                    let d = h(p, 0)
                    let qh = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt32.self))
                    for j in 0..<16 {
                        let q = p[6 + j]
                        let h0 = UInt8(((qh >> UInt32(j)) << 4) & 0x10), h1 = UInt8((qh >> UInt32(j + 12)) & 0x10)
                        y[o + j] = Float(Int((q & 0xF) | h0) - 16) * d
                        y[o + j + 16] = Float(Int((q >> 4) | h1) - 16) * d
                    }
                case .Q5_1:
                    let d = h(p, 0), m = h(p, 2)
                    let qh = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
                    for j in 0..<16 {
                        let q = p[8 + j]
                        let h0 = UInt8(((qh >> UInt32(j)) << 4) & 0x10), h1 = UInt8((qh >> UInt32(j + 12)) & 0x10)
                        y[o + j] = Float((q & 0xF) | h0) * d + m
                        y[o + j + 16] = Float((q >> 4) | h1) * d + m
                    }
                case .Q8_0:
                    let d = h(p, 0)
                    for j in 0..<32 { y[o + j] = Float(Int8(bitPattern: p[2 + j])) * d }
                case .Q4_K:
                    let d = h(p, 0), dmin = h(p, 2)
                    func scaleMin(_ j: Int) -> (Float, Float) {
                        let q = 4  // scales start at byte 4
                        if j < 4 { return (Float(p[q + j] & 63), Float(p[q + j + 4] & 63)) }
                        return (Float((p[q + j + 4] & 0xF) | ((p[q + j - 4] >> 6) << 4)),
                                Float((p[q + j + 4] >> 4) | ((p[q + j] >> 6) << 4)))
                    }
                    var qs = 16, out = o, s = 0
                    for _ in 0..<4 {
                        let (sc1, m1) = scaleMin(s), (sc2, m2) = scaleMin(s + 1)
                        let d1 = d * sc1, mm1 = dmin * m1, d2 = d * sc2, mm2 = dmin * m2
                        for l in 0..<32 { y[out + l] = d1 * Float(p[qs + l] & 0xF) - mm1 }
                        for l in 0..<32 { y[out + 32 + l] = d2 * Float(p[qs + l] >> 4) - mm2 }
                        qs += 32; out += 64; s += 2
                    }
                case .Q6_K:
                    let d = h(p, 208)
                    var ql = 0, qh = 128, sc = 192, out = o
                    for _ in 0..<2 {
                        for l in 0..<32 {
                            let isc = l / 16
                            let hb = p[qh + l]
                            let q1 = Int((p[ql + l] & 0xF) | ((hb & 3) << 4)) - 32
                            let q2 = Int((p[ql + l + 32] & 0xF) | (((hb >> 2) & 3) << 4)) - 32
                            let q3 = Int((p[ql + l] >> 4) | (((hb >> 4) & 3) << 4)) - 32
                            let q4 = Int((p[ql + l + 32] >> 4) | (((hb >> 6) & 3) << 4)) - 32
                            func s(_ i: Int) -> Float { Float(Int8(bitPattern: p[sc + i])) }
                            y[out + l] = d * s(isc) * Float(q1)
                            y[out + l + 32] = d * s(isc + 2) * Float(q2)
                            y[out + l + 64] = d * s(isc + 4) * Float(q3)
                            y[out + l + 96] = d * s(isc + 6) * Float(q4)
                        }
                        out += 128; ql += 64; qh += 32; sc += 8
                    }
                }
            }
        }
        return y
    }
}

/// A GGUF checkpoint seen through Hugging Face Llama names, Q/K rows un-permuted.
public final class GGUFCheckpoint: TensorSource, @unchecked Sendable {
    public let gguf: GGUFFile
    public let tensors: [TensorDescriptor]
    public let metadata: [String: String]
    public let directory: URL
    public var sourceDescription: String { "GGUF v\(gguf.version) (\((gguf.path as NSString).lastPathComponent))" }
    public let headCount: Int
    public let kvHeadCount: Int
    private let byHFName: [String: GGUFTensorInfo]

    public convenience init(path: String) throws { try self.init(file: MappedFile(path: path)) }

    init(file: MappedFile) throws {
        gguf = try GGUFFile(file: file)
        let fname = (file.path as NSString).lastPathComponent
        directory = URL(fileURLWithPath: file.path).deletingLastPathComponent()
        var meta: [String: String] = [:]
        for (k, v) in gguf.metadata { meta[k] = v.text }
        metadata = meta
        let arch = gguf.metadata["general.architecture"]?.text ?? "(none)"
        guard arch == "llama" else {
            throw CheckpointError(.unsupported, "\(fname): GGUF architecture \"\(arch)\" is not supported; only llama (Llama, SmolLM, Mistral-style files) is")
        }
        guard let nh = gguf.metadata["llama.attention.head_count"]?.intValue, nh > 0 else {
            throw CheckpointError.format(fname, "llama.attention.head_count is missing; it is needed to undo the Q/K row permutation")
        }
        headCount = nh
        kvHeadCount = gguf.metadata["llama.attention.head_count_kv"]?.intValue ?? nh
        var map: [String: GGUFTensorInfo] = [:]
        var list: [TensorDescriptor] = []
        for t in gguf.tensors {
            let hf = Self.huggingFaceName(t.name)
            guard map[hf] == nil else { throw CheckpointError.format(fname, "two tensors map to \(hf)") }
            map[hf] = t
            list.append(TensorDescriptor(name: hf, dtypeName: t.type.name, shape: t.shape))
        }
        byHFName = map
        tensors = list
    }

    /// llama.cpp tensor names to Hugging Face Llama names; unknown names are kept.
    public static func huggingFaceName(_ name: String) -> String {
        let fixed = ["token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"]
        if let f = fixed[name] { return f }
        let parts = name.split(separator: ".", maxSplits: 2).map(String.init)
        guard parts.count == 3, parts[0] == "blk", let layer = Int(parts[1]) else { return name }
        let rest = parts[2]
        let table = ["attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                     "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                     "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                     "ffn_down": "mlp.down_proj"]
        let pieces = rest.split(separator: ".", maxSplits: 1).map(String.init)
        guard let mapped = table[pieces[0]] else { return name }
        return "model.layers.\(layer).\(mapped)" + (pieces.count > 1 ? "." + pieces[1] : "")
    }

    public func descriptor(_ name: String) -> TensorDescriptor? {
        guard let t = byHFName[name] else { return nil }
        return TensorDescriptor(name: name, dtypeName: t.type.name, shape: t.shape)
    }

    public func floats(_ name: String) throws -> [Float] {
        guard let t = byHFName[name] else { throw CheckpointError(.usage, "no tensor named \(name) in \(sourceDescription)") }
        let values = gguf.dequantize(t)
        guard Self.isPermuted(name) else { return values }
        if name.hasSuffix("self_attn.q_proj.weight") { return try Self.unpermuteRows(values, shape: t.shape, heads: headCount, name: name) }
        if name.hasSuffix("self_attn.k_proj.weight") { return try Self.unpermuteRows(values, shape: t.shape, heads: kvHeadCount, name: name) }
        return values
    }

    public func passthrough(_ name: String) -> (StorageDType, UnsafeRawBufferPointer)? {
        // Q and K rows are stored permuted: they must go through `floats` to be put back.
        guard let t = byHFName[name], !Self.isPermuted(name) else { return nil }
        switch t.type {
        case .F32: return (.F32, gguf.file.bytes(t.range))
        case .F16: return (.F16, gguf.file.bytes(t.range))
        case .BF16: return (.BF16, gguf.file.bytes(t.range))
        default: return nil
        }
    }

    static func isPermuted(_ hfName: String) -> Bool {
        hfName.hasSuffix("self_attn.q_proj.weight") || hfName.hasSuffix("self_attn.k_proj.weight")
    }

    /// llama.cpp's converter stores row `h*d + 2j + i` what Hugging Face keeps at
    /// row `h*d + i*(d/2) + j` (i in 0..<2, j in 0..<d/2, d = rows per head): it
    /// interleaves the two rotary halves. This puts the rows back.
    public static func unpermuteRows(_ w: [Float], shape: [Int], heads: Int, name: String = "") throws -> [Float] {
        guard shape.count == 2, heads > 0, shape[0] % (2 * heads) == 0 else {
            throw CheckpointError(.format, "cannot undo the RoPE row permutation of \(name) \(shape) with \(heads) heads")
        }
        let cols = shape[1], d = shape[0] / heads, half = d / 2
        var out = [Float](repeating: 0, count: w.count)
        for hd in 0..<heads { for i in 0..<2 { for j in 0..<half {
            let dst = (hd * d + i * half + j) * cols, src = (hd * d + 2 * j + i) * cols
            for c in 0..<cols { out[dst + c] = w[src + c] }
        } } }
        return out
    }

    /// The inverse of `unpermuteRows` (what llama.cpp's converter does); used by tests.
    public static func permuteRows(_ w: [Float], shape: [Int], heads: Int) -> [Float] {
        let cols = shape[1], d = shape[0] / heads, half = d / 2
        var out = [Float](repeating: 0, count: w.count)
        for hd in 0..<heads { for i in 0..<2 { for j in 0..<half {
            let src = (hd * d + i * half + j) * cols, dst = (hd * d + 2 * j + i) * cols
            for c in 0..<cols { out[dst + c] = w[src + c] }
        } } }
        return out
    }

    public func releasePages(_ name: String) {
        if let t = byHFName[name] { gguf.file.release(t.range) }
    }

    public func intMetadata(_ key: String) -> Int? { gguf.metadata[key]?.intValue }
    public func doubleMetadata(_ key: String) -> Double? { gguf.metadata[key]?.doubleValue }
}
