import Foundation
import MoECheckpoint
import MoECompute

/// Saves and loads models as safetensors with the project's own tensor names
/// (timm-style ViT names; experts one tensor each, `...experts.e.fc1.weight`),
/// the model config in `__metadata__["moe-gpu.config"]`. Writes are atomic.
public enum ModelCheckpoint {
    static let configKey = "moe-gpu.config"

    public static func save(_ model: Model, to url: URL, metadata extra: [String: String] = [:]) throws {
        var tensors: [(name: String, dtype: StorageDType, shape: [Int], data: Data)] = []
        for t in model.checkpointTensors {
            tensors.append((t.name, .F32, t.shape, encodeFloats(try t.value().floats(), as: .F32)))
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
        for t in model.checkpointTensors {
            guard let entry = file.entry(t.name) else { missing.append(t.name); continue }
            guard entry.shape.reduce(1, *) == t.count else {
                throw ModelError.badInput("\(path): \(t.name) has shape \(entry.shape), the model needs \(t.shape)")
            }
            try t.value().write(try file.floats(t.name))
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
