import Foundation
import MoECompute
import XCTest
import MoETestSupport

/// Token embedding (`embedding`, `embeddingBackward`) and cross-entropy's ignored
/// rows (negative labels) on every backend against the float64 references:
/// awkward sizes, repeated ids, out-of-range ids, untouched vocabulary rows,
/// empty inputs, and bit-identical repeats.
final class EmbeddingTests: XCTestCase {
    struct Case {
        var vocabulary: Int, dim: Int, ids: [Int32]
        var name: String { "V=\(vocabulary) D=\(dim) rows=\(ids.count)" }
    }

    /// Ids from a skewed draw: a few ids take most rows (like frequent tokens),
    /// so rows repeat ids often and many vocabulary rows stay unused.
    static func skewedIds(_ rows: Int, vocabulary v: Int, seed: UInt64) -> [Int32] {
        var rng = SplitMix64(seed: seed)
        return (0..<rows).map { _ in
            let u = rng.next()
            return Int32(u % 4 == 0 ? u / 4 % UInt64(v) : u / 4 % UInt64(min(v, 5)))
        }
    }

    static let cases: [Case] = [
        Case(vocabulary: 1, dim: 1, ids: [0]),
        Case(vocabulary: 13, dim: 1, ids: [12, 0, 5, 5, 12, 3, 5]),
        Case(vocabulary: 37, dim: 7, ids: [36]),
        Case(vocabulary: 37, dim: 7, ids: skewedIds(50, vocabulary: 37, seed: 1)),
        Case(vocabulary: 101, dim: 65, ids: skewedIds(131, vocabulary: 101, seed: 2)),
        // One id hit by most of 700 rows (more than one 256-wide tile of ids).
        Case(vocabulary: 29, dim: 65, ids: (0..<700).map { $0 % 9 == 4 ? Int32($0 % 29) : 3 }),
        Case(vocabulary: 1009, dim: 576, ids: skewedIds(300, vocabulary: 1009, seed: 3)),
    ]

    // MARK: Forward

    func testEmbeddingMatchesReference() throws {
        for backend in try TestDevices.all() {
            for (ci, c) in Self.cases.enumerated() {
                let table = randomFloats(c.vocabulary * c.dim, seed: UInt64(ci) + 10)
                let t = try backend.tensor(table, shape: [c.vocabulary, c.dim])
                let ids = try backend.tensor(ints: c.ids, shape: [c.ids.count])
                let out = try backend.tensor([Float](repeating: .nan, count: c.ids.count * c.dim), shape: [c.ids.count, c.dim])
                try backend.embedding(table: t, ids: ids, out: out)
                let ref = Reference.embedding(dbl(table), dim: c.dim, ids: c.ids)
                assertRelativeError(try out.floats(), ref, below: Bound.elementwise, "embedding \(backend.name) \(c.name)")
                // A lookup is a copy: exactly the table's values.
                XCTAssertEqual(try out.floats(), ref.map(Float.init), "embedding \(backend.name) \(c.name): not a copy")
            }
        }
    }

    /// Ids of any shape, tensors that are views at an offset, and ids outside
    /// `0..<V` (negative, V, Int32.max), which give rows of NaN.
    func testEmbeddingOutOfRangeIdsGiveNaNRowsAndViewsWork() throws {
        let (v, d) = (5, 3)
        let table = randomFloats(v * d, seed: 20)
        let ids: [Int32] = [4, -1, 0, 5, -100, Int32.max]
        for backend in try TestDevices.all() {
            // Table at offset 2 of a larger buffer, out at offset 1 of another.
            let tableBuffer = try backend.tensor([7, 7] + table, shape: [2 + v * d])
            let t = try tableBuffer.view(offset: 2, shape: [v, d])
            let idsT = try backend.tensor(ints: ids, shape: [2, 3])
            let outBuffer = try backend.tensor([Float](repeating: 42, count: 1 + ids.count * d + 1), shape: [1 + ids.count * d + 1])
            let out = try outBuffer.view(offset: 1, shape: [2, 3, d])
            try backend.embedding(table: t, ids: idsT, out: out)
            let got = try outBuffer.floats()
            XCTAssertEqual(got.first, 42, "\(backend.name): wrote before out")
            XCTAssertEqual(got.last, 42, "\(backend.name): wrote after out")
            for (r, id) in ids.enumerated() {
                let row = Array(got[(1 + r * d)..<(1 + r * d + d)])
                if (0..<Int32(v)).contains(id) {
                    XCTAssertEqual(row, Array(table[(Int(id) * d)..<(Int(id) * d + d)]), "\(backend.name) row \(r)")
                } else {
                    XCTAssertTrue(row.allSatisfy(\.isNaN), "\(backend.name) row \(r) (id \(id)) is \(row), not NaN")
                }
            }
        }
    }

    // MARK: Backward

    func testEmbeddingBackwardMatchesReference() throws {
        for backend in try TestDevices.all() {
            for (ci, c) in Self.cases.enumerated() {
                let rows = c.ids.count
                let dOut = randomFloats(rows * c.dim, seed: UInt64(ci) + 30)
                let start = randomFloats(c.vocabulary * c.dim, seed: UInt64(ci) + 40)
                let dTable = try backend.tensor(start, shape: [c.vocabulary, c.dim])
                try backend.embeddingBackward(dOut: try backend.tensor(dOut, shape: [rows, c.dim]),
                                              ids: try backend.tensor(ints: c.ids, shape: [rows]), dTable: dTable)
                let ref = Reference.embeddingBackward(dbl(dOut), ids: c.ids, dTable: dbl(start), dim: c.dim)
                let got = try dTable.floats()
                let what = "embeddingBackward \(backend.name) \(c.name)"
                assertRelativeError(got, ref, below: Bound.rows, what)
                // Rows no id names keep their exact bits (accumulate, never overwrite).
                let used = Set(c.ids.map(Int.init))
                for v in 0..<c.vocabulary where !used.contains(v) {
                    XCTAssertEqual(Array(got[(v * c.dim)..<(v * c.dim + c.dim)]), Array(start[(v * c.dim)..<(v * c.dim + c.dim)]),
                                   "\(what): unused row \(v) changed")
                }
            }
        }
    }

    /// Out-of-range ids are skipped; NaN guards around a dTable view stay NaN;
    /// zero rows change nothing.
    func testEmbeddingBackwardSkipsOutOfRangeIdsAndEmptyInputs() throws {
        let (v, d) = (4, 7)
        let ids: [Int32] = [2, -1, 4, 2, Int32.min, 0, 1000]
        let dOut = randomFloats(ids.count * d, seed: 50), start = randomFloats(v * d, seed: 51)
        for backend in try TestDevices.all() {
            let nan = [Float](repeating: .nan, count: 5)
            let buffer = try backend.tensor(nan + start + nan, shape: [5 + v * d + 5])
            let dTable = try buffer.view(offset: 5, shape: [v, d])
            try backend.embeddingBackward(dOut: try backend.tensor(dOut, shape: [ids.count, d]),
                                          ids: try backend.tensor(ints: ids, shape: [ids.count]), dTable: dTable)
            let got = try buffer.floats()
            XCTAssertTrue(got.prefix(5).allSatisfy(\.isNaN) && got.suffix(5).allSatisfy(\.isNaN), "\(backend.name): wrote outside dTable")
            let ref = Reference.embeddingBackward(dbl(dOut), ids: ids, dTable: dbl(start), dim: d)
            assertRelativeError(Array(got[5..<(5 + v * d)]), ref, below: Bound.rows, "\(backend.name) out-of-range ids")

            // rows = 0: nothing read, nothing written, no error.
            let empty = try backend.zeros([0], dtype: .i32)
            let table = try backend.tensor(start, shape: [v, d])
            let out = try backend.zeros([0, d])
            try backend.embedding(table: table, ids: empty, out: out)
            try backend.embeddingBackward(dOut: out, ids: empty, dTable: table)
            XCTAssertEqual(try table.floats(), start, "\(backend.name): zero rows changed dTable")
        }
    }

    /// The same inputs give the same bits, run after run; and since both backends
    /// add the rows in ascending order with plain float adds, the same bits on both.
    func testEmbeddingBackwardIsDeterministic() throws {
        let (v, d, rows) = (211, 65, 2000)
        let ids = Self.skewedIds(rows, vocabulary: v, seed: 60)
        let dOut = randomFloats(rows * d, seed: 61), start = randomFloats(v * d, seed: 62)
        var results: [(String, [Float])] = []
        for backend in try TestDevices.all() {
            var runs: [[Float]] = []
            for _ in 0..<2 {
                let dTable = try backend.tensor(start, shape: [v, d])
                try backend.embeddingBackward(dOut: try backend.tensor(dOut, shape: [rows, d]),
                                              ids: try backend.tensor(ints: ids, shape: [rows]), dTable: dTable)
                runs.append(try dTable.floats())
            }
            XCTAssertEqual(runs[0].map(\.bitPattern), runs[1].map(\.bitPattern), "\(backend.name): two runs differ")
            assertRelativeError(runs[0], Reference.embeddingBackward(dbl(dOut), ids: ids, dTable: dbl(start), dim: d),
                                below: Bound.rows, "\(backend.name) determinism case")
            results.append((backend.name, runs[0]))
        }
        if results.count == 2 {
            XCTAssertEqual(results[0].1.map(\.bitPattern), results[1].1.map(\.bitPattern),
                           "\(results[0].0) and \(results[1].0) sum in a different order")
        }
    }

    func testEmbeddingShapeMistakesThrow() throws {
        for backend in try TestDevices.all() {
            let table = try backend.zeros([5, 3]), ids = try backend.zeros([4], dtype: .i32)
            XCTAssertThrowsError(try backend.embedding(table: table, ids: ids, out: try backend.zeros([4, 2])), "out size")
            XCTAssertThrowsError(try backend.embedding(table: table, ids: try backend.zeros([4]), out: try backend.zeros([4, 3])),
                                 "f32 ids")
            XCTAssertThrowsError(try backend.embedding(table: try backend.zeros([15]), ids: ids, out: try backend.zeros([4, 3])),
                                 "rank-1 table")
            XCTAssertThrowsError(try backend.embeddingBackward(dOut: try backend.zeros([3, 3]), ids: ids, dTable: table), "dOut size")
            XCTAssertThrowsError(try backend.embeddingBackward(dOut: try backend.zeros([4, 3]), ids: ids,
                                                               dTable: try backend.zeros([5, 3], dtype: .i32)), "i32 dTable")
            // Both backends reject with the same message.
            do {
                try backend.embedding(table: table, ids: ids, out: try backend.zeros([4, 2]))
            } catch {
                XCTAssertEqual("\(error)", "embedding: out (4 ids of 3 features) must hold 12 elements, got [4, 2]", backend.name)
            }
        }
    }

    // MARK: Cross-entropy with ignored rows

    func testCrossEntropyIgnoresNegativeLabels() throws {
        for backend in try TestDevices.all() {
            for (rows, c, smoothing) in [(1, 1, 0.0), (6, 7, 0.1), (130, 37, 0.0), (3, 1000, 0.1), (9, 257, 0.3)] as [(Int, Int, Float)] {
                let zs = randomFloats(rows * c, seed: UInt64(rows * c) + 70, in: -10...10)
                var rng = SplitMix64(seed: UInt64(rows) + 71)
                let drawn = (0..<rows).map { _ in Int32(rng.next() % UInt64(c)) }
                let patterns: [(String, [Int32])] = [
                    ("none ignored", drawn),
                    ("some ignored", drawn.enumerated().map { r, l in r % 3 == 1 ? (r % 2 == 0 ? -1 : -100) : l }),
                    ("all ignored", [Int32](repeating: -100, count: rows)),
                ]
                for (pattern, labels) in patterns {
                    let what = "crossEntropy \(backend.name) \(rows)x\(c) s=\(smoothing) \(pattern)"
                    let z = try backend.tensor(zs, shape: [rows, c]), l = try backend.tensor(ints: labels, shape: [rows])
                    let rowLoss = try backend.tensor([Float](repeating: .nan, count: rows), shape: [rows])
                    let mean = try backend.tensor([.nan], shape: [1])
                    let dz = try backend.tensor([Float](repeating: .nan, count: rows * c), shape: [rows, c])
                    try backend.crossEntropy(logits: z, labels: l, labelSmoothing: smoothing, rowLoss: rowLoss, meanLoss: mean,
                                             dLogits: dz, gradientScale: 2)
                    let ref = Reference.crossEntropy(dbl(zs), labels: labels, classes: c, labelSmoothing: Double(smoothing))
                    let losses = try rowLoss.floats(), grads = try dz.floats(), meanValue = try mean.floats()[0]
                    if labels.allSatisfy({ $0 < 0 }) {
                        XCTAssertEqual(meanValue, 0, what + " mean")
                    } else {
                        assertRelativeError([meanValue], [ref.mean], below: Bound.rows, what + " mean")
                    }
                    assertRelativeError(losses, ref.rowLoss, below: Bound.rows, what + " rows")
                    assertRelativeError(grads, ref.dLogits.map { 2 * $0 }, below: Bound.rows, what + " dLogits")
                    for r in 0..<rows where labels[r] < 0 {
                        XCTAssertEqual(losses[r], 0, what + ": ignored row \(r) loss")
                        XCTAssertTrue(grads[(r * c)..<(r * c + c)].allSatisfy { $0 == 0 }, what + ": ignored row \(r) gradient")
                    }
                    // Without a gradient: the same losses and mean.
                    try backend.crossEntropy(logits: z, labels: l, labelSmoothing: smoothing, rowLoss: rowLoss, meanLoss: mean,
                                             dLogits: nil, gradientScale: 1)
                    XCTAssertEqual(try mean.floats()[0].bitPattern, meanValue.bitPattern, what + " mean, no grad")
                    XCTAssertEqual(try rowLoss.floats().map(\.bitPattern), losses.map(\.bitPattern), what + " rows, no grad")
                }
            }
            // No rows at all: a mean of 0 over no targets (it used to be NaN).
            let mean = try backend.tensor([.nan], shape: [1])
            try backend.crossEntropy(logits: try backend.zeros([0]), labels: try backend.zeros([0], dtype: .i32), labelSmoothing: 0,
                                     rowLoss: try backend.zeros([0]), meanLoss: mean, dLogits: try backend.zeros([0]), gradientScale: 1)
            XCTAssertEqual(try mean.floats(), [0], "\(backend.name) no rows")
            // A label >= classes still poisons its row and the mean; an ignored row does not.
            let rowLoss = try backend.zeros([3])
            try backend.crossEntropy(logits: try backend.tensor([1, 2, 3, 4, 5, 6], shape: [3, 2]),
                                     labels: try backend.tensor(ints: [1, -100, 2], shape: [3]), labelSmoothing: 0,
                                     rowLoss: rowLoss, meanLoss: mean, dLogits: nil, gradientScale: 1)
            let losses = try rowLoss.floats(), meanValue = try mean.floats()[0]
            XCTAssertTrue(!losses[0].isNaN && losses[1] == 0 && losses[2].isNaN && meanValue.isNaN,
                          "\(backend.name): \(losses), mean \(meanValue)")
        }
    }

    /// The ignored rows' gradient is the gradient of the mean over the other rows.
    func testCrossEntropyWithIgnoredRowsReferenceGradientMatchesFiniteDifferences() {
        let (rows, c) = (5, 4)
        let z = dbl(randomFloats(rows * c, seed: 80, in: -3...3))
        let labels: [Int32] = [0, -100, 3, -1, 2]
        let ref = Reference.crossEntropy(z, labels: labels, classes: c, labelSmoothing: 0.1)
        assertClose(ref.dLogits, numericGradient(at: z) {
            Reference.crossEntropy($0, labels: labels, classes: c, labelSmoothing: 0.1).mean
        }, "crossEntropy with ignored rows")
        // And the mean over the targets alone: the same as dropping the ignored rows.
        let kept = [0, 2, 4]
        let dropped = Reference.crossEntropy(kept.flatMap { z[($0 * c)..<($0 * c + c)] }, labels: kept.map { labels[$0] },
                                             classes: c, labelSmoothing: 0.1)
        XCTAssertEqual(ref.mean, dropped.mean, accuracy: 1e-12)
    }

    // MARK: GPU launch shapes

    /// The work-group kernels (embedding_backward's tiles of 64 and 256 ids with
    /// a prefix sum, cross-entropy's tree reductions) on the CI's CPU OpenCL
    /// device, which otherwise runs the one-item-per-row kernels.
    func testOpenCLEmbeddingWorkGroupShapesMatchReference() throws {
        _ = try TestDevices.openCLOrSkip()
        for g in [64, 256] {
            OpenCLBackend.workGroupOverride = g
            defer { OpenCLBackend.workGroupOverride = nil }
            try testEmbeddingMatchesReference()
            try testEmbeddingBackwardMatchesReference()
            try testEmbeddingBackwardSkipsOutOfRangeIdsAndEmptyInputs()
            try testEmbeddingBackwardIsDeterministic()
            try testCrossEntropyIgnoresNegativeLabels()
        }
    }
}
