import Foundation
import MoECheckpoint

/// What every tokenizer of the project does: bytes in, ids out, and back.
public protocol Tokenizer: Sendable {
    /// Number of ids (the embedding table's row count).
    var vocabularySize: Int { get }
    var bosID: Int32? { get }
    var eosID: Int32? { get }
    var padID: Int32? { get }
    /// Ids of `bytes`; any byte string is accepted (invalid UTF-8 included).
    func encode(bytes: [UInt8]) -> [Int32]
    /// Bytes of any id sequence (ids out of range decode to U+FFFD).
    func decode(_ ids: [Int32]) -> [UInt8]
}

extension Tokenizer {
    public func encode(_ text: String) -> [Int32] { encode(bytes: Array(text.utf8)) }
    /// `decode` as text, invalid UTF-8 repaired with U+FFFD.
    public func decodeText(_ ids: [Int32]) -> String { String(decoding: decode(ids), as: UTF8.self) }
}

/// A tokenizer that cannot be built: one line naming the file and the way out.
public struct TokenizerError: Error, CustomStringConvertible, Equatable, Sendable {
    public let description: String
    /// One line whatever the file held (control characters escaped).
    public init(_ message: String) { description = message.escapingControlCharacters }
}

/// Bytes as ids 0-255, then BOS, EOS and PAD: for the project's own small models.
/// `decode` drops the three specials, so decode(encode(b)) == b for any bytes.
public struct ByteTokenizer: Tokenizer {
    public static let bos: Int32 = 256
    public static let eos: Int32 = 257
    public static let pad: Int32 = 258
    public init() {}
    public var vocabularySize: Int { 259 }
    public var bosID: Int32? { Self.bos }
    public var eosID: Int32? { Self.eos }
    public var padID: Int32? { Self.pad }
    public func encode(bytes: [UInt8]) -> [Int32] { bytes.map { Int32($0) } }
    public func decode(_ ids: [Int32]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(ids.count)
        for id in ids {
            if id >= 0 && id < 256 { out.append(UInt8(id)) }
            else if id >= 256 && id <= 258 { continue }
            else { out.append(contentsOf: [0xEF, 0xBF, 0xBD]) }
        }
        return out
    }
}
