import Foundation

/// GPT-2's byte-to-character table: the printable Latin-1 bytes stand for
/// themselves, the other 68 bytes for U+0100, U+0101, ... in byte order.
public enum GPT2ByteAlphabet {
    public static let byteToScalar: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            if (33...126).contains(b) || (161...172).contains(b) || (174...255).contains(b) { t[b] = UInt32(b) }
            else { t[b] = next; next += 1 }
        }
        return t
    }()
    public static let scalarToByte: [UInt32: UInt8] = {
        var d: [UInt32: UInt8] = [:]
        for (b, s) in byteToScalar.enumerated() { d[s] = UInt8(b) }
        return d
    }()
    /// A vocabulary string as bytes: each character of the alphabet becomes its
    /// byte; a character outside the alphabet keeps its UTF-8 bytes.
    public static func bytes(of token: String) -> [UInt8] {
        var out: [UInt8] = []
        for s in token.unicodeScalars {
            if let b = scalarToByte[s.value] { out.append(b) } else { out.append(contentsOf: Array(String(s).utf8)) }
        }
        return out
    }
    public static func string(of bytes: [UInt8]) -> String {
        var s = String.UnicodeScalarView()
        for b in bytes { s.append(Unicode.Scalar(byteToScalar[Int(b)])!) }
        return String(s)
    }
}

/// Byte-level BPE (GPT-2 style), as Hugging Face `tokenizers` runs it:
/// special tokens matched whole (leftmost, longest), the rest split by the GPT-2
/// regex (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
/// written out by hand below; optionally every digit its own piece first, as
/// the `Digits(individual_digits)` pre-tokenizer does), and each piece's bytes
/// merged by rank. Pieces are cached, so repeated words cost one lookup.
public final class ByteLevelBPETokenizer: Tokenizer, @unchecked Sendable {
    public let vocabularySize: Int
    public let bosID: Int32?
    public let eosID: Int32?
    public let padID: Int32?
    public let unknownID: Int32?
    /// Whether `encode` puts BOS first (Hugging Face's `add_special_tokens=True`).
    public let addBOS: Bool
    /// Every digit a piece of its own before the regex (`Digits(individual_digits: true)`).
    public let splitDigits: Bool
    /// A piece that is a whole vocabulary entry is taken as is (`ignore_merges`).
    public let ignoreMerges: Bool
    /// Bytes with no one-byte token: Hugging Face's BPE (no `unk_token` in the model, as
    /// transformers builds SmolLM2's from its GGUF) drops them, and so does `encode`; with
    /// `missingByteID` set (a tokenizer.json's `model.unk_token`) they become that id instead.
    /// SmolLM2 has 21 of them (control bytes 4, 6, 19, 20, 22, 29 and 192, 193, 241, 242, 245-255),
    /// so decode(encode(b)) == b holds exactly for byte strings without them.
    public let unrepresentableBytes: [UInt8]
    public let missingByteID: Int32?
    /// Tokens matched whole before splitting (control/user-defined, or `added_tokens`).
    public let specialTokens: [(text: String, id: Int32)]

    let tokenBytes: [[UInt8]]
    let byteID: [Int32]                       // byte -> id of its one-character token, -1 if none
    let merges: [UInt64: UInt64]              // (left id << 32 | right id) -> (rank << 32 | merged id)
    let specialsByFirstByte: [[([UInt8], Int32)]]
    let wholeTokens: [[UInt8]: Int32]         // only when ignoreMerges
    private let lock = NSLock()
    private var sharedCache = PieceCache()

    /// - Parameters:
    ///   - tokens: vocabulary strings in the byte alphabet, index = id.
    ///   - merges: "left right" pairs in rank order.
    ///   - special: ids matched whole and decoded as their text.
    public init(source: String, tokens: [String], merges mergeList: [(String, String)], special: [Int32],
                bos: Int32?, eos: Int32?, pad: Int32?, unknown: Int32?, addBOS: Bool,
                splitDigits: Bool, ignoreMerges: Bool = false, missingByteID: Int32? = nil) throws {
        guard !tokens.isEmpty else { throw TokenizerError("\(source): the tokenizer has no vocabulary") }
        vocabularySize = tokens.count
        let specialSet = Set(special)
        var bytes: [[UInt8]] = []
        bytes.reserveCapacity(tokens.count)
        var idOf: [String: Int32] = [:]
        idOf.reserveCapacity(tokens.count)
        for (i, t) in tokens.enumerated() {
            bytes.append(specialSet.contains(Int32(i)) ? Array(t.utf8) : GPT2ByteAlphabet.bytes(of: t))
            if idOf[t] == nil { idOf[t] = Int32(i) }
        }
        tokenBytes = bytes
        var bid = [Int32](repeating: -1, count: 256)
        for b in 0..<256 {
            if let id = idOf[String(Unicode.Scalar(GPT2ByteAlphabet.byteToScalar[b])!)], !specialSet.contains(id) { bid[b] = id }
        }
        byteID = bid
        unrepresentableBytes = (0..<256).filter { bid[$0] < 0 }.map { UInt8($0) }
        var m: [UInt64: UInt64] = [:]
        m.reserveCapacity(mergeList.count)
        for (rank, (a, b)) in mergeList.enumerated() {
            guard let ia = idOf[a], let ib = idOf[b], let ic = idOf[a + b] else { continue }
            let key = UInt64(UInt32(ia)) << 32 | UInt64(UInt32(ib))
            if m[key] == nil { m[key] = UInt64(rank) << 32 | UInt64(UInt32(ic)) }
        }
        merges = m
        let check = { (id: Int32?) -> Int32? in id.flatMap { $0 >= 0 && Int($0) < tokens.count ? $0 : nil } }
        bosID = check(bos); eosID = check(eos); padID = check(pad); unknownID = check(unknown)
        self.missingByteID = check(missingByteID)
        self.addBOS = addBOS && bosID != nil
        self.splitDigits = splitDigits
        self.ignoreMerges = ignoreMerges
        var sp: [(String, Int32)] = []
        var buckets = [[([UInt8], Int32)]](repeating: [], count: 256)
        for id in special.sorted() where id >= 0 && Int(id) < tokens.count && !tokens[Int(id)].isEmpty {
            sp.append((tokens[Int(id)], id))
            let u = Array(tokens[Int(id)].utf8)
            buckets[Int(u[0])].append((u, id))
        }
        for i in 0..<256 { buckets[i].sort { $0.0.count > $1.0.count } }
        specialTokens = sp
        specialsByFirstByte = buckets
        var whole: [[UInt8]: Int32] = [:]
        if ignoreMerges {
            for (i, b) in bytes.enumerated() where !specialSet.contains(Int32(i)) && whole[b] == nil { whole[b] = Int32(i) }
        }
        wholeTokens = whole
    }

    public func decode(_ ids: [Int32]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(ids.count * 4)
        for id in ids {
            if id >= 0 && Int(id) < tokenBytes.count { out.append(contentsOf: tokenBytes[Int(id)]) }
            else { out.append(contentsOf: [0xEF, 0xBF, 0xBD]) }
        }
        return out
    }

    public func encode(bytes: [UInt8]) -> [Int32] {
        lock.lock()
        var state = EncodeState(cache: sharedCache)
        sharedCache = PieceCache()
        lock.unlock()
        var out: [Int32] = []
        out.reserveCapacity(bytes.count / 3 + 4)
        if addBOS, let b = bosID { out.append(b) }
        bytes.withUnsafeBufferPointer { p in
            var start = 0, i = 0
            let n = p.count
            while i < n {
                let bucket = specialsByFirstByte[Int(p[i])]
                var matched: ([UInt8], Int32)? = nil
                if !bucket.isEmpty {
                    for cand in bucket where cand.0.count <= n - i {
                        var ok = true
                        for k in 1..<cand.0.count where p[i + k] != cand.0[k] { ok = false; break }
                        if ok { matched = cand; break }
                    }
                }
                if let (text, id) = matched {
                    if start < i { encodeSegment(p, start..<i, &state, &out) }
                    out.append(id)
                    i += text.count
                    start = i
                } else {
                    i += 1
                }
            }
            if start < n { encodeSegment(p, start..<n, &state, &out) }
        }
        lock.lock()
        if state.cache.entries >= sharedCache.entries { sharedCache = state.cache }
        lock.unlock()
        return out
    }

    // Character classes of the regex.
    static let other: UInt8 = 0, letter: UInt8 = 1, number: UInt8 = 2, space: UInt8 = 3
    static let asciiClass: [UInt8] = (0..<128).map { b -> UInt8 in
        let s = Unicode.Scalar(UInt8(b))
        if s.properties.isWhitespace { return space }
        switch s.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return letter
        case .decimalNumber, .letterNumber, .otherNumber: return number
        default: return other
        }
    }
    @inline(__always) static func scalarClass(_ v: UInt32) -> UInt8 {
        guard let s = Unicode.Scalar(v) else { return other }
        let p = s.properties
        if p.isWhitespace { return space }
        switch p.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return letter
        case .decimalNumber, .letterNumber, .otherNumber: return number
        default: return other
        }
    }

    /// Splits one segment (no special tokens inside) into characters, then pieces, then ids.
    private func encodeSegment(_ p: UnsafeBufferPointer<UInt8>, _ r: Range<Int>, _ st: inout EncodeState, _ out: inout [Int32]) {
        st.starts.removeAll(keepingCapacity: true)
        st.classes.removeAll(keepingCapacity: true)
        var i = r.lowerBound
        let end = r.upperBound
        @inline(__always) func cont(_ k: Int, _ lo: UInt8 = 0x80, _ hi: UInt8 = 0xBF) -> Bool { k < end && p[k] >= lo && p[k] <= hi }
        while i < end {
            let b0 = p[i]
            st.starts.append(i)
            if b0 < 0x80 { st.classes.append(Self.asciiClass[Int(b0)]); i += 1; continue }
            var len = 0
            var v: UInt32 = 0
            switch b0 {
            case 0xC2...0xDF: if cont(i + 1) { len = 2; v = UInt32(b0 & 0x1F) }
            case 0xE0: if cont(i + 1, 0xA0) && cont(i + 2) { len = 3 }
            case 0xE1...0xEC, 0xEE, 0xEF: if cont(i + 1) && cont(i + 2) { len = 3 }
            case 0xED: if cont(i + 1, 0x80, 0x9F) && cont(i + 2) { len = 3 }
            case 0xF0: if cont(i + 1, 0x90) && cont(i + 2) && cont(i + 3) { len = 4 }
            case 0xF1...0xF3: if cont(i + 1) && cont(i + 2) && cont(i + 3) { len = 4 }
            case 0xF4: if cont(i + 1, 0x80, 0x8F) && cont(i + 2) && cont(i + 3) { len = 4 }
            default: break
            }
            if len == 0 { st.classes.append(Self.other); i += 1; continue }   // invalid UTF-8: one byte, class "other"
            if len == 3 { v = UInt32(b0 & 0x0F) } else if len == 4 { v = UInt32(b0 & 0x07) }
            for k in 1..<len { v = v << 6 | UInt32(p[i + k] & 0x3F) }
            st.classes.append(Self.scalarClass(v))
            i += len
        }
        let nc = st.starts.count
        st.starts.append(end)
        if splitDigits {
            var lo = 0
            for c in 0..<nc where st.classes[c] == Self.number {
                if lo < c { splitRegex(p, lo, c, &st, &out) }
                bpe(p, st.starts[c]..<st.starts[c + 1], &st, &out)
                lo = c + 1
            }
            if lo < nc { splitRegex(p, lo, nc, &st, &out) }
        } else {
            splitRegex(p, 0, nc, &st, &out)
        }
    }

    /// The GPT-2 regex over characters lo..<hi of the segment (hi is the end of the text it sees).
    private func splitRegex(_ p: UnsafeBufferPointer<UInt8>, _ lo: Int, _ hi: Int, _ st: inout EncodeState, _ out: inout [Int32]) {
        var c = lo
        while c < hi {
            let cls = st.classes[c]
            let b = p[st.starts[c]]
            var e = c + 1
            if b == 0x27, c + 1 < hi {   // 's 't 're 've 'm 'll 'd
                let b1 = p[st.starts[c + 1]]
                if b1 == 0x73 || b1 == 0x74 || b1 == 0x6D || b1 == 0x64 { e = c + 2 }
                else if c + 2 < hi {
                    let b2 = p[st.starts[c + 2]]
                    if (b1 == 0x72 && b2 == 0x65) || (b1 == 0x76 && b2 == 0x65) || (b1 == 0x6C && b2 == 0x6C) { e = c + 3 }
                }
                if e > c + 1 { bpe(p, st.starts[c]..<st.starts[e], &st, &out); c = e; continue }
            }
            if b == 0x20, c + 1 < hi, st.classes[c + 1] != Self.space {
                let k = st.classes[c + 1]
                e = c + 2
                while e < hi && st.classes[e] == k { e += 1 }
            } else if cls != Self.space {
                while e < hi && st.classes[e] == cls { e += 1 }
            } else {
                while e < hi && st.classes[e] == Self.space { e += 1 }
                if e < hi && e - c >= 2 { e -= 1 }   // \s+(?!\S): leave the last one to join the next piece
            }
            bpe(p, st.starts[c]..<st.starts[e], &st, &out)
            c = e
        }
    }

    /// Ids of one piece: from the cache, or by merging its bytes lowest rank first (leftmost on ties).
    private func bpe(_ p: UnsafeBufferPointer<UInt8>, _ r: Range<Int>, _ st: inout EncodeState, _ out: inout [Int32]) {
        let piece = UnsafeBufferPointer(rebasing: p[r])
        if piece.count == 1, byteID[Int(piece[0])] >= 0 { out.append(byteID[Int(piece[0])]); return }
        var h: UInt64 = 0xcbf29ce484222325
        for x in piece { h = (h ^ UInt64(x)) &* 0x100000001b3 }
        if let hit = st.cache.lookup(h, piece) { out.append(contentsOf: hit); return }
        var sym = st.symbols
        sym.removeAll(keepingCapacity: true)
        if ignoreMerges, let whole = wholeTokens[Array(piece)] {
            sym.append(whole)
        } else {
            for x in piece {
                let id = byteID[Int(x)]
                if id >= 0 { sym.append(id) } else if let u = missingByteID { sym.append(u) }
            }
            if sym.count > 48 { mergeLong(&sym) } else {
            var rank = st.ranks
            rank.removeAll(keepingCapacity: true)
            @inline(__always) func pair(_ k: Int) -> UInt64 {
                merges[UInt64(UInt32(sym[k])) << 32 | UInt64(UInt32(sym[k + 1]))] ?? UInt64.max
            }
            if sym.count >= 2 { for k in 0..<(sym.count - 1) { rank.append(pair(k)) } }
            while !rank.isEmpty {
                var best = 0
                for k in 1..<rank.count where rank[k] >> 32 < rank[best] >> 32 { best = k }
                let m = rank[best]
                if m == UInt64.max { break }
                sym[best] = Int32(truncatingIfNeeded: UInt32(m & 0xFFFF_FFFF))
                sym.remove(at: best + 1)
                rank.remove(at: best)
                if best < rank.count { rank[best] = pair(best) }
                if best > 0 { rank[best - 1] = pair(best - 1) }
            }
            st.ranks = rank
            }
        }
        out.append(contentsOf: sym)
        st.cache.insert(h, piece, sym)
        st.symbols = sym
    }
}

extension ByteLevelBPETokenizer {
    /// The same merges for a long piece (a CJK sentence, a run of spaces) in O(n log n): symbols in
    /// a linked list, candidate pairs in a min-heap keyed by (rank, position of the left symbol),
    /// stale entries skipped when popped. Lowest rank first, leftmost on ties, as the short path.
    func mergeLong(_ sym: inout [Int32]) {
        let n = sym.count
        var next = Array(1...n)          // n = none
        var prev = Array(-1..<(n - 1))
        var heap: [UInt64] = []          // rank << 32 | position
        heap.reserveCapacity(n)
        func rankAt(_ i: Int) -> UInt64? {
            let j = next[i]
            guard j < n else { return nil }
            return merges[UInt64(UInt32(sym[i])) << 32 | UInt64(UInt32(sym[j]))]
        }
        func push(_ v: UInt64) {
            heap.append(v)
            var c = heap.count - 1
            while c > 0 { let p = (c - 1) / 2; if heap[p] <= heap[c] { break }; heap.swapAt(p, c); c = p }
        }
        func pop() -> UInt64 {
            let top = heap[0]
            let last = heap.removeLast()
            if !heap.isEmpty {
                heap[0] = last
                var p = 0
                while true {
                    let l = 2 * p + 1, r = l + 1
                    var m = p
                    if l < heap.count && heap[l] < heap[m] { m = l }
                    if r < heap.count && heap[r] < heap[m] { m = r }
                    if m == p { break }
                    heap.swapAt(p, m); p = m
                }
            }
            return top
        }
        for i in 0..<(n - 1) { if let m = rankAt(i) { push((m >> 32) << 32 | UInt64(i)) } }
        var alive = [Bool](repeating: true, count: n)
        while !heap.isEmpty {
            let e = pop()
            let i = Int(e & 0xFFFF_FFFF)
            guard alive[i], let m = rankAt(i), m >> 32 == e >> 32 else { continue }
            let j = next[i]
            sym[i] = Int32(truncatingIfNeeded: UInt32(m & 0xFFFF_FFFF))
            alive[j] = false
            next[i] = next[j]
            if next[j] < n { prev[next[j]] = i }
            if let r = rankAt(i) { push((r >> 32) << 32 | UInt64(i)) }
            let p = prev[i]
            if p >= 0, let r = rankAt(p) { push((r >> 32) << 32 | UInt64(p)) }
        }
        var out: [Int32] = []
        var i = 0
        while i < n { out.append(sym[i]); i = next[i] }
        sym = out
    }
}

struct EncodeState {
    var cache: PieceCache
    var starts: [Int] = []
    var classes: [UInt8] = []
    var symbols: [Int32] = []
    var ranks: [UInt64] = []
}

/// Piece bytes -> ids, keyed by a 64-bit hash and checked byte for byte.
struct PieceCache {
    var index: [UInt64: Int32] = [:]
    var keyStart: [Int] = [0]
    var keyBytes: [UInt8] = []
    var idStart: [Int] = [0]
    var ids: [Int32] = []
    var entries: Int { keyStart.count - 1 }

    func lookup(_ h: UInt64, _ piece: UnsafeBufferPointer<UInt8>) -> ArraySlice<Int32>? {
        guard let e = index[h].map(Int.init) else { return nil }
        let a = keyStart[e], b = keyStart[e + 1]
        guard b - a == piece.count else { return nil }
        for k in 0..<piece.count where keyBytes[a + k] != piece[k] { return nil }
        return ids[idStart[e]..<idStart[e + 1]]
    }
    mutating func insert(_ h: UInt64, _ piece: UnsafeBufferPointer<UInt8>, _ value: [Int32]) {
        if index[h] != nil { return }   // a hash collision: that piece is just not cached
        if keyBytes.count > 32 << 20 { self = PieceCache() }
        index[h] = Int32(entries)
        keyBytes.append(contentsOf: piece)
        keyStart.append(keyBytes.count)
        ids.append(contentsOf: value)
        idStart.append(ids.count)
    }
}
