import Foundation

/// What one tensor of a checkpoint looks like, before its data is read.
public struct TensorDescriptor: Sendable, Equatable {
    public let name: String
    /// Storage type as the file names it (`F32`, `BF16`, `I64`, `Q4_1`, ...).
    public let dtypeName: String
    /// Hugging Face order: `[out, in]` for weights.
    public let shape: [Int]
    public var count: Int { shape.reduce(1, *) }
    public init(name: String, dtypeName: String, shape: [Int]) {
        self.name = name; self.dtypeName = dtypeName; self.shape = shape
    }
}

/// A checkpoint whose tensors can be listed and read one at a time:
/// single or sharded safetensors, or GGUF (already renamed to Hugging Face names).
public protocol TensorSource: AnyObject {
    /// Human description of where the tensors come from.
    var sourceDescription: String { get }
    var tensors: [TensorDescriptor] { get }
    /// String metadata (safetensors `__metadata__`, GGUF key/values as text).
    var metadata: [String: String] { get }
    func descriptor(_ name: String) -> TensorDescriptor?
    /// The tensor converted to f32, row-major in `descriptor.shape`.
    func floats(_ name: String) throws -> [Float]
    /// The stored bytes and safetensors dtype when the tensor can be copied
    /// unchanged into a safetensors file; nil when it must be converted (GGUF quantised).
    func passthrough(_ name: String) -> (StorageDType, UnsafeRawBufferPointer)?
    /// The folder holding the checkpoint (for a `config.json` beside it).
    var directory: URL { get }
    /// Lets the operating system drop the mapped pages of a tensor already used.
    func releasePages(_ name: String)
}

extension TensorSource {
    public var names: Set<String> { Set(tensors.map(\.name)) }
    public func has(_ name: String) -> Bool { descriptor(name) != nil }
}

/// One or several safetensors files seen as one checkpoint.
public final class SafetensorsCheckpoint: TensorSource, @unchecked Sendable {
    public let files: [SafetensorsFile]
    public let tensors: [TensorDescriptor]
    public let metadata: [String: String]
    public let directory: URL
    public let sourceDescription: String
    private let location: [String: (file: Int, entry: SafetensorsEntry)]

    /// Opens `path`: a `.safetensors` file, a `model.safetensors.index.json`,
    /// or a folder holding either.
    public init(path: String) throws {
        var url = URL(fileURLWithPath: path)
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir) else {
            throw CheckpointError(.io, "\(path) does not exist")
        }
        if isDir.boolValue {
            let index = url.appendingPathComponent("model.safetensors.index.json")
            let single = url.appendingPathComponent("model.safetensors")
            if FileManager.default.fileExists(atPath: index.path) { url = index }
            else if FileManager.default.fileExists(atPath: single.path) { url = single }
            else { throw CheckpointError(.io, "\(path) holds neither model.safetensors nor model.safetensors.index.json") }
        }
        directory = url.deletingLastPathComponent()
        var shardNames: [String] = []
        var weightMap: [String: String] = [:]
        if url.lastPathComponent.hasSuffix(".index.json") {
            let data = try Self.readSmall(url)
            let json: JSONValue
            do { json = try JSONParser.parse(Array(data)) } catch let e as JSONParser.Failure {
                throw CheckpointError.format(url.lastPathComponent, "invalid JSON (\(e.message))")
            }
            guard case .object(let map)? = json["weight_map"] else {
                throw CheckpointError.format(url.lastPathComponent, "no \"weight_map\" object")
            }
            for (tensor, file) in map {
                guard let f = file.stringValue, !f.contains("/"), !f.contains("\\") else {
                    throw CheckpointError.format(url.lastPathComponent, "weight_map entry for \(tensor) is not a plain file name")
                }
                guard weightMap.updateValue(f, forKey: tensor) == nil else {
                    throw CheckpointError.format(url.lastPathComponent, "duplicate tensor name \"\(tensor)\" in weight_map")
                }
                if !shardNames.contains(f) { shardNames.append(f) }
            }
            shardNames.sort()
            sourceDescription = "safetensors, \(shardNames.count) shards (\(url.lastPathComponent))"
        } else {
            shardNames = [url.lastPathComponent]
            sourceDescription = "safetensors (\(url.lastPathComponent))"
        }
        var files: [SafetensorsFile] = []
        var loc: [String: (Int, SafetensorsEntry)] = [:]
        var list: [TensorDescriptor] = []
        var meta: [String: String] = [:]
        for (fi, shard) in shardNames.enumerated() {
            let f = try SafetensorsFile(path: directory.appendingPathComponent(shard).path)
            files.append(f)
            meta.merge(f.metadata) { a, _ in a }
            for e in f.entries {
                if !weightMap.isEmpty, weightMap[e.name] != shard {
                    throw CheckpointError.format(shard, "tensor \(e.name) is not listed for this shard in the index")
                }
                guard loc[e.name] == nil else {
                    throw CheckpointError.format(shard, "tensor \(e.name) appears in more than one shard")
                }
                loc[e.name] = (fi, e)
                list.append(TensorDescriptor(name: e.name, dtypeName: e.dtype.rawValue, shape: e.shape))
            }
        }
        // A run folder's latest model is linked shard by shard: a set caught
        // half-way (its writer killed) holds shards of two steps.
        let steps = Set(files.compactMap { $0.metadata["step"] })
        if steps.count > 1 {
            throw CheckpointError.format(url.lastPathComponent, "its shards are from different training steps (\(steps.sorted().joined(separator: ", "))): the run was stopped while linking its latest model; read the run's checkpoints/step-N folder instead")
        }
        for name in weightMap.keys where loc[name] == nil {
            throw CheckpointError.format(url.lastPathComponent, "tensor \(name) is listed in the index but missing from \(weightMap[name]!)")
        }
        self.files = files
        location = loc
        tensors = list
        metadata = meta
    }

    static func readSmall(_ url: URL) throws -> Data {
        do { return try Data(contentsOf: url) } catch {
            throw CheckpointError(.io, "cannot read \(url.path): \(error.localizedDescription)")
        }
    }

    public func descriptor(_ name: String) -> TensorDescriptor? {
        guard let l = location[name] else { return nil }
        return TensorDescriptor(name: name, dtypeName: l.entry.dtype.rawValue, shape: l.entry.shape)
    }

    public func floats(_ name: String) throws -> [Float] {
        guard let l = location[name] else { throw CheckpointError(.usage, "no tensor named \(name) in \(sourceDescription)") }
        defer { releasePages(name) }
        return try convertToFloats(files[l.file].rawBytes(l.entry), dtype: l.entry.dtype, count: l.entry.shape.reduce(1, *), name: name)
    }

    public func releasePages(_ name: String) {
        guard let l = location[name] else { return }
        let f = files[l.file]
        f.file.release(f.dataStart + l.entry.begin..<f.dataStart + l.entry.end)
    }

    public func passthrough(_ name: String) -> (StorageDType, UnsafeRawBufferPointer)? {
        guard let l = location[name] else { return nil }
        return (l.entry.dtype, files[l.file].rawBytes(l.entry))
    }
}

/// Opens a checkpoint by looking at its first bytes: GGUF or safetensors.
public func openCheckpoint(path: String) throws -> TensorSource {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
        throw CheckpointError(.io, "\(path) does not exist")
    }
    if !isDir.boolValue, !path.hasSuffix(".json") {
        let f = try MappedFile(path: path)
        if f.count >= 4, Array(f.bytes(0..<4)) == Array("GGUF".utf8) { return try GGUFCheckpoint(file: f) }
        if path.hasSuffix(".gguf") { _ = try GGUFFile(file: f) }  // reports the bad magic
        return try SafetensorsCheckpoint(path: path)
    }
    return try SafetensorsCheckpoint(path: path)
}
