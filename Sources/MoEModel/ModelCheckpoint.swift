import Foundation
import MoECheckpoint
import MoECompute

/// Saves and loads models as safetensors with the project's own tensor names
/// (timm-style ViT names; experts one tensor each, `...experts.e.fc1.weight`),
/// the model config in `__metadata__["moe-gpu.config"]`. Writes are atomic.
public enum ModelCheckpoint {
    static let configKey = "moe-gpu.config"

    /// Writes the model (or, with `only`, the parameters it accepts: one rank's
    /// shard) one tensor at a time, so no second copy of the model is held.
    public static func save(_ model: Model, to url: URL, metadata extra: [String: String] = [:],
                            only: ((Parameter) -> Bool)? = nil) throws {
        let tensors = model.checkpointTensors.filter { only?($0.parameter) ?? true }
        var metadata = extra
        metadata["format"] = "pt"
        for (k, v) in try model.checkpointMetadata { metadata[k] = v }
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        let writer = try SafetensorsStreamWriter(url: url, tensors: tensors.map { PlannedTensor(name: $0.name, dtype: .F32, shape: $0.shape) },
                                                 metadata: metadata)
        for t in tensors { try writer.write(t.name, floats: try t.value().floats()) }
        try writer.finish()
    }

    /// Opens a model written by `save`: a `.safetensors` file, a
    /// `model.safetensors.index.json` (a multi-rank run's shards), or a folder
    /// holding either; a run folder's `model.safetensors` that is not there
    /// means its index when that is.
    public static func open(_ path: String) throws -> SafetensorsCheckpoint {
        let fm = FileManager.default
        var path = path
        if !fm.fileExists(atPath: path), (path as NSString).lastPathComponent == "model.safetensors" {
            let index = ((path as NSString).deletingLastPathComponent as NSString).appendingPathComponent("model.safetensors.index.json")
            if fm.fileExists(atPath: index) { path = index }
        }
        return try SafetensorsCheckpoint(path: path)
    }

    /// The config stored in a checkpoint written by `save`.
    public static func config(at path: String) throws -> ViTConfig {
        let file = try open(path)
        guard let text = file.metadata[configKey] else {
            throw ModelError.badInput("\(path) has no \(configKey) metadata: it was not written by moe-gpu train (use moe-gpu upcycle for other checkpoints)")
        }
        do { return try JSONDecoder().decode(ViTConfig.self, from: Data(text.utf8)) } catch {
            throw ModelError.badInput("\(path): the stored model config does not parse (\(error))")
        }
    }

    /// Loads every parameter of `model` whose name is in the checkpoint (stacked
    /// experts reassembled); returns the names that were not found.
    @discardableResult
    public static func load(_ path: String, into model: Model, requireAll: Bool = true) throws -> [String] {
        let file = try open(path)
        var missing: [String] = []
        for t in model.checkpointTensors {
            guard let entry = file.descriptor(t.name) else { missing.append(t.name); continue }
            guard entry.count == t.count else {
                throw ModelError.badInput("\(path): \(t.name) has shape \(entry.shape), the model needs \(t.shape)")
            }
            try t.value().write(try file.floats(t.name))
        }
        if requireAll && !missing.isEmpty {
            throw ModelError.badInput("\(path) lacks \(missing.count) tensors of this model, e.g. \(missing.prefix(3).joined(separator: ", "))")
        }
        return missing
    }

    /// The Hugging Face index of a sharded set: every tensor's file and the total size.
    static func writeIndex(to url: URL, weightMap: [(name: String, file: String)], totalSize: Int) throws {
        let map = weightMap.sorted { $0.name < $1.name }.map { ($0.name, JSONValue.string($0.file)) }
        let json = JSONValue.object([("metadata", .object([("total_size", .int(totalSize))])), ("weight_map", .object(map))])
        try atomicWrite(Data((json.serialized(pretty: true) + "\n").utf8), to: url)
    }
}

extension JSONEncoder {
    static var sorted: JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .prettyPrinted]
        return e
    }
}
