import Foundation

/// Hidden states that feed the MLPs (the input of each MLP block, i.e. the
/// output of the norm before it), used for importance statistics, router
/// initialisation and `--verify`.
///
/// Accepted files:
/// - `.safetensors` with a 2-d F32/F16/BF16 tensor `hidden_states` `[T, H]`
///   used for every layer, and/or `layers.L` `[T, H]` for layer L;
/// - `.npy` (version 1-3, little-endian `<f4`, `<f2` or `<f8`, C order) of shape `[T, H]`, used for every layer.
public struct CalibrationData {
    public let shared: [Float]?
    public let perLayer: [Int: [Float]]
    public let hidden: Int

    public init(hidden: Int, shared: [Float]?, perLayer: [Int: [Float]] = [:]) {
        self.hidden = hidden; self.shared = shared; self.perLayer = perLayer
    }

    /// The `[T, H]` rows for `layer`, or nil when the file has none for it.
    public func states(layer: Int) -> [Float]? { perLayer[layer] ?? shared }

    public static func load(path: String, hidden: Int) throws -> CalibrationData {
        if path.hasSuffix(".npy") {
            let (shape, values) = try loadNPY(path: path)
            guard shape.count == 2, shape[1] == hidden, shape[0] > 0 else {
                throw CheckpointError(.usage, "calibration \(path) has shape \(shape); expected [tokens, \(hidden)]")
            }
            return CalibrationData(hidden: hidden, shared: values)
        }
        let st = try SafetensorsCheckpoint(path: path)
        var shared: [Float]?
        var per: [Int: [Float]] = [:]
        for t in st.tensors {
            let layer: Int?
            if t.name == "hidden_states" { layer = nil }
            else if t.name.hasPrefix("layers."), let l = Int(t.name.dropFirst(7)) { layer = l }
            else { continue }
            guard t.shape.count == 2, t.shape[1] == hidden, t.shape[0] > 0 else {
                throw CheckpointError(.usage, "calibration tensor \(t.name) has shape \(t.shape); expected [tokens, \(hidden)]")
            }
            let v = try st.floats(t.name)
            if let layer { per[layer] = v } else { shared = v }
        }
        guard shared != nil || !per.isEmpty else {
            throw CheckpointError(.usage, "calibration \(path) holds no tensor named hidden_states or layers.L ([tokens, \(hidden)])")
        }
        return CalibrationData(hidden: hidden, shared: shared, perLayer: per)
    }

    /// A minimal `.npy` reader for float arrays.
    static func loadNPY(path: String) throws -> ([Int], [Float]) {
        let f = try MappedFile(path: path)
        let all = f.all
        func bad(_ m: String) -> CheckpointError { CheckpointError(.format, "\(path): not a usable .npy file: \(m)") }
        guard f.count >= 10, Array(all[0..<6]) == [0x93] + Array("NUMPY".utf8) else { throw bad("bad magic") }
        let major = all[6]
        let (hlen, start): (Int, Int) = major == 1
            ? (Int(all.loadUnaligned(fromByteOffset: 8, as: UInt16.self).littleEndian), 10)
            : (Int(all.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian), 12)
        guard start + hlen <= f.count, let header = String(bytes: all[start..<start + hlen], encoding: .utf8) else { throw bad("truncated header") }
        let descr: StorageDType
        if header.contains("'<f4'") { descr = .F32 } else if header.contains("'<f2'") { descr = .F16 }
        else if header.contains("'<f8'") { descr = .F64 } else { throw bad("dtype must be <f4, <f2 or <f8") }
        guard header.contains("'fortran_order': False") else { throw bad("only C order is supported") }
        guard let open = header.range(of: "'shape': ("), let close = header[open.upperBound...].firstIndex(of: ")") else { throw bad("no shape") }
        let shape = header[open.upperBound..<close].split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard let n = Checked.product(shape), let bytes = descr.byteCount(elements: n), start + hlen + bytes <= f.count else {
            throw bad("data shorter than shape \(shape)")
        }
        let v = try convertToFloats(f.bytes(start + hlen..<start + hlen + bytes), dtype: descr, count: n, name: path)
        return (shape, v)
    }
}
