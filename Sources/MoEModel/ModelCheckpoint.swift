import Foundation
import MoECheckpoint
import MoECompute

/// Saves and loads models as safetensors with the project's own tensor names
/// (timm-style ViT names; experts one tensor each, `...experts.e.fc1.weight`),
/// the model config in `__metadata__["moe-gpu.config"]`. Writes are atomic.
public enum ModelCheckpoint {
    static let configKey = "moe-gpu.config"

    /// `blocks.3.moe.experts.fc1.weight` -> (`blocks.3.moe.experts`, `fc1.weight`) for stacked expert tensors.
    static func expertStack(_ name: String) -> (prefix: String, leaf: String)? {
        for leaf in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] {
            let suffix = "experts." + leaf
            if name.hasSuffix(suffix) { return (String(name.dropLast(leaf.count + 1)), leaf) }
        }
        return nil
    }

    public static func save(_ model: Model, to url: URL, metadata extra: [String: String] = [:]) throws {
        var tensors: [(name: String, dtype: StorageDType, shape: [Int], data: Data)] = []
        for p in model.params.all {
            let values = try p.value.floats()
            if let (prefix, leaf) = expertStack(p.name) {
                let experts = p.shape[0], per = p.count / max(experts, 1)
                for e in 0..<experts {
                    tensors.append(("\(prefix).\(e).\(leaf)", .F32, Array(p.shape.dropFirst()),
                                    encodeFloats(Array(values[(e * per)..<((e + 1) * per)]), as: .F32)))
                }
            } else {
                tensors.append((p.name, .F32, p.shape, encodeFloats(values, as: .F32)))
            }
        }
        var metadata = extra
        metadata["format"] = "pt"
        for (k, v) in try model.checkpointMetadata { metadata[k] = v }
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try writeSafetensors(to: url, tensors: tensors, metadata: metadata)
    }

    /// The config stored in a checkpoint written by `save`.
    public static func config(at path: String) throws -> ViTConfig {
        let file = try SafetensorsFile(path: path)
        guard let text = file.metadata[configKey] else {
            throw ModelError.badInput("\(path) has no \(configKey) metadata: it was not written by moe-gpu train (use moe-gpu upcycle for other checkpoints)")
        }
        do { return try JSONDecoder().decode(ViTConfig.self, from: Data(text.utf8)) } catch {
            throw ModelError.badInput("\(path): the stored model config does not parse (\(error))")
        }
    }

    /// Loads every parameter of `model` whose name is in the file (stacked experts
    /// reassembled); returns the names that were not found.
    @discardableResult
    public static func load(_ path: String, into model: Model, requireAll: Bool = true) throws -> [String] {
        let file = try SafetensorsFile(path: path)
        var missing: [String] = []
        for p in model.params.all {
            var values: [Float] = []
            if let (prefix, leaf) = expertStack(p.name) {
                for e in 0..<p.shape[0] {
                    let name = "\(prefix).\(e).\(leaf)"
                    guard file.entry(name) != nil else { missing.append(name); values = []; break }
                    values += try file.floats(name)
                }
            } else if file.entry(p.name) != nil {
                values = try file.floats(p.name)
            } else {
                missing.append(p.name)
            }
            guard !values.isEmpty || p.count == 0 else { continue }
            guard values.count == p.count else {
                throw ModelError.badInput("\(path): \(p.name) holds \(values.count) values, the model needs \(p.shape)")
            }
            try p.value.write(values)
        }
        if requireAll && !missing.isEmpty {
            throw ModelError.badInput("\(path) lacks \(missing.count) tensors of this model, e.g. \(missing.prefix(3).joined(separator: ", "))")
        }
        return missing
    }
}

extension JSONEncoder {
    static var sorted: JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .prettyPrinted]
        return e
    }
}
