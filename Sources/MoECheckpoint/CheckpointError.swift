import Foundation

/// Everything that can go wrong reading, writing or upcycling a checkpoint.
/// `description` is one line that names the problem and, where there is one,
/// the way out: the CLI prints it as is.
public struct CheckpointError: Error, CustomStringConvertible, Equatable {
    public enum Kind: String, Sendable {
        case io, format, unsupported, usage, verification
    }
    public let kind: Kind
    public let description: String
    /// Control characters (a hostile file's tensor or key names carry newlines) are
    /// escaped, so the message stays one line whatever the file holds.
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        description = message.escapingControlCharacters
    }

    static func format(_ file: String, _ message: String) -> CheckpointError {
        CheckpointError(.format, "\(file): \(message)")
    }
}

/// Overflow-checked arithmetic for sizes read from untrusted headers.
enum Checked {
    static func mul(_ a: Int, _ b: Int) -> Int? {
        let (r, o) = a.multipliedReportingOverflow(by: b); return o ? nil : r
    }
    static func add(_ a: Int, _ b: Int) -> Int? {
        let (r, o) = a.addingReportingOverflow(b); return o ? nil : r
    }
    static func product(_ xs: [Int]) -> Int? {
        var p = 1
        for x in xs { guard x >= 0, let q = mul(p, x) else { return nil }; p = q }
        return p
    }
}

extension String {
    /// The text with control characters (newlines, carriage returns, ...) escaped as
    /// `\n`, `\r`, `\u{..}`: what an error message quoting a hostile file's names uses.
    public var escapingControlCharacters: String {
        guard unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else { return self }
        return unicodeScalars.map { $0.properties.generalCategory == .control ? $0.escaped(asASCII: true) : String($0) }.joined()
    }
}
