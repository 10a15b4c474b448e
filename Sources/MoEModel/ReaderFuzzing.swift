import Foundation
import MoECheckpoint
import MoETokenizer

/// One input for each file reader the fuzzers drive (`scripts/fuzz.sh`, the
/// libFuzzer target `moe-gpu-fuzz`) and the regression test replays: the bytes
/// are written to a scratch file of the right extension and read the way the
/// commands read them. A rejection must be a thrown error of one line; a
/// crash, a hang or a huge allocation is a finding.
public enum ReaderFuzzing {
    public static let targets = ["safetensors", "gguf", "idx", "csv", "config", "tokenizer"]

    /// Reads `data` as `target`; rethrows the reader's rejection.
    public static func read(_ target: String, _ data: Data, scratch: URL) throws {
        func file(_ ext: String) throws -> String {
            let url = scratch.appendingPathExtension(ext)
            try data.write(to: url)
            return url.path
        }
        switch target {
        case "safetensors":
            let c = try SafetensorsCheckpoint(path: try file("safetensors"))
            for t in c.tensors.prefix(16) where t.count <= 1 << 16 { _ = try c.floats(t.name) }
            _ = try? ArchitectureAdapter.describe(c)
        case "gguf":
            let path = try file("gguf")
            let g = try GGUFCheckpoint(path: path)
            for t in g.tensors.prefix(16) where t.count <= 1 << 16 { _ = try g.floats(t.name) }
            if let tok = try? ByteLevelBPETokenizer(gguf: path) { _ = tok.decode(tok.encode(bytes: Array("the cat".utf8))) }
        case "idx":
            // The input is an image or a label file (by its magic); its partner is made to
            // match the count the input claims, so a well-formed input is accepted.
            let path = try file("idx"), b = [UInt8](data)
            func be32(_ o: Int) -> Int { b.count >= o + 4 ? Int(b[o]) << 24 | Int(b[o + 1]) << 16 | Int(b[o + 2]) << 8 | Int(b[o + 3]) : 0 }
            let n = min(be32(4), 1 << 16), partner = scratch.appendingPathExtension("idx2")
            func header(_ v: [Int]) -> [UInt8] { v.flatMap { x in (0..<4).map { UInt8((x >> (24 - 8 * $0)) & 0xff) } } }
            if be32(0) == 0x801 {
                try Data(header([0x803, n, 1, 1]) + [UInt8](repeating: 0, count: n)).write(to: partner)
                _ = try IDX.load(images: partner.path, labels: path)
            } else {
                try Data(header([0x801, n]) + [UInt8](repeating: 0, count: n)).write(to: partner)
                _ = try IDX.load(images: path, labels: partner.path)
            }
        case "csv":
            _ = try BuiltinData.load(try file("csv"))
        case "config":
            // The first byte picks the syntax: even JSON, odd YAML.
            let c = try TrainRun.loadConfig(try file((data.first ?? 0) % 2 == 0 ? "json" : "yaml"))
            try c.validate()
        case "tokenizer":
            let tok = try ByteLevelBPETokenizer(tokenizerJSON: try file("json"))
            _ = tok.decode(tok.encode(bytes: Array("the cat sat, 42 ü\n".utf8)))
        default:
            throw ModelError.badInput("unknown fuzz target \(target): use one of \(targets.joined(separator: ", "))")
        }
    }

    /// `read`, with the rule that a rejection is one line: returns the error
    /// text, or nil when the input was accepted; traps on a multi-line error.
    @discardableResult
    public static func check(_ target: String, _ data: Data, scratch: URL) -> String? {
        do { try read(target, data, scratch: scratch); return nil } catch {
            let text = "\(error)"
            precondition(!text.contains("\n"), "a multi-line error: \(text)")
            return text
        }
    }
}
