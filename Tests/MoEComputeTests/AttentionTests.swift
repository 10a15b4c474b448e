import MoECompute
import XCTest
import MoETestSupport

/// The fused attention op (`AttentionOps`) on both backends against the float64
/// reference, which is itself checked against finite differences. (The helpers
/// take `Backend & AttentionOps`, so this file builds whether or not `Backend`
/// lists `AttentionOps`.)
final class AttentionTests: XCTestCase {
    /// Bound on `||got - ref|| / ||ref||` for f32 forward and backward results.
    static let bound = 2e-5

    struct Case {
        var name: String
        var config: AttentionConfig
        /// Q, K, V views into one packed `[B, T, (Hq + 2 Hkv) d]` buffer and dQ, dK, dV into one packed gradient.
        var packed = false
    }

    /// Awkward sizes: ViT's 17 tokens, one token, Tq != Tk (decoding), GQA, causal,
    /// rows with gaps (ld > heads * d), KV-cache batch strides, a fully masked
    /// prefix (causal with Tk < Tq), several local tiles, d past the kernels' default.
    static let cases: [Case] = [
        Case(name: "ViT T=17 d=16", config: AttentionConfig(batch: 2, queryHeads: 4, queryLength: 17, headDim: 16)),
        Case(name: "T=17 d=16 causal", config: AttentionConfig(batch: 2, queryHeads: 2, queryLength: 17, headDim: 16, causal: true)),
        Case(name: "one token", config: AttentionConfig(batch: 3, queryHeads: 2, queryLength: 1, headDim: 8)),
        Case(name: "decode Tq=1 Tk=11 causal",
             config: AttentionConfig(batch: 2, queryHeads: 2, queryLength: 1, keyLength: 11, headDim: 16, causal: true)),
        Case(name: "Tq=3 Tk=11 causal GQA 6/2, gaps, KV cache strides",
             config: AttentionConfig(batch: 2, queryHeads: 6, kvHeads: 2, queryLength: 3, keyLength: 11, headDim: 8,
                                     causal: true, ldq: 6 * 8 + 3, ldk: 2 * 8 + 5, ldv: 2 * 8 + 1, ldo: 6 * 8 + 2,
                                     batchStrideK: 16 * 21, batchStrideV: 16 * 17)),
        Case(name: "GQA 6/2 T=9 causal", config: AttentionConfig(batch: 2, queryHeads: 6, kvHeads: 2, queryLength: 9, headDim: 8, causal: true)),
        Case(name: "GQA 6/1 T=9 d=12", config: AttentionConfig(batch: 1, queryHeads: 6, kvHeads: 1, queryLength: 9, headDim: 12)),
        Case(name: "non-causal Tq=4 Tk=7 scale 0.3",
             config: AttentionConfig(batch: 2, queryHeads: 3, queryLength: 4, keyLength: 7, headDim: 5, scale: 0.3)),
        Case(name: "packed QKV GQA 4/2 T=17 d=16 causal",
             config: .packedQKV(batch: 2, queryHeads: 4, kvHeads: 2, tokens: 17, headDim: 16, causal: true), packed: true),
        Case(name: "packed QKV T=5 d=5", config: .packedQKV(batch: 2, queryHeads: 3, tokens: 5, headDim: 5), packed: true),
        Case(name: "causal Tq=5 Tk=3 (masked rows)",
             config: AttentionConfig(batch: 2, queryHeads: 2, queryLength: 5, keyLength: 3, headDim: 4, causal: true)),
        Case(name: "T=70 d=32 causal GQA 2/1 (several tiles)",
             config: AttentionConfig(batch: 1, queryHeads: 2, kvHeads: 1, queryLength: 70, headDim: 32, causal: true)),
        Case(name: "d=130", config: AttentionConfig(batch: 1, queryHeads: 1, queryLength: 5, headDim: 130)),
    ]

    /// Element indices of a layout's head columns (what the op reads or writes).
    static func touched(_ c: AttentionConfig, rows: Int, ld: Int, batchStride: Int, heads: Int) -> [Int] {
        var out: [Int] = []
        for b in 0..<c.batch { for t in 0..<rows { for x in 0..<(heads * c.headDim) { out.append(b * batchStride + t * ld + x) } } }
        return out
    }

    /// Runs every case on `backend`; returns the largest forward and backward relative errors.
    func checkCases(_ backend: Backend & AttentionOps) throws -> (forward: Double, backward: Double) {
        var worst = (forward: 0.0, backward: 0.0)
        for (n, tc) in Self.cases.enumerated() {
            let c = tc.config
            let what = "\(backend.name) \(tc.name)"
            let seed = UInt64(1000 + 10 * n)
            let tq = Self.touched(c, rows: c.queryLength, ld: c.ldq, batchStride: c.batchStrideQ, heads: c.queryHeads)
            let tk = Self.touched(c, rows: c.keyLength, ld: c.ldk, batchStride: c.batchStrideK, heads: c.kvHeads)
            let tv = Self.touched(c, rows: c.keyLength, ld: c.ldv, batchStride: c.batchStrideV, heads: c.kvHeads)
            let to = Self.touched(c, rows: c.queryLength, ld: c.ldo, batchStride: c.batchStrideO, heads: c.queryHeads)

            // Inputs (random everywhere, gaps included) and their float64 copies in the layouts.
            let q: Tensor, k: Tensor, v: Tensor, dQ: Tensor, dK: Tensor, dV: Tensor
            var qs: [Float], ks: [Float], vs: [Float]
            let gradBuffer: Tensor?
            if tc.packed {
                let total = c.batch * c.batchStrideQ
                let all = randomFloats(total, seed: seed, in: -2...2)
                let qkv = try backend.tensor(all, shape: [c.batch, c.queryLength, c.ldq])
                (q, k, v) = try c.views(ofPacked: qkv)
                let qd = c.queryHeads * c.headDim, kd = c.kvHeads * c.headDim
                qs = Array(all[0..<c.extentQ]); ks = Array(all[qd..<(qd + c.extentK)]); vs = Array(all[(qd + kd)..<(qd + kd + c.extentV)])
                let grad = try backend.tensor([Float](repeating: .nan, count: total), shape: [c.batch, c.queryLength, c.ldq])
                (dQ, dK, dV) = try c.views(ofPacked: grad)
                gradBuffer = grad
            } else {
                qs = randomFloats(c.extentQ, seed: seed, in: -2...2)
                ks = randomFloats(c.extentK, seed: seed + 1, in: -2...2)
                vs = randomFloats(c.extentV, seed: seed + 2)
                q = try backend.tensor(qs, shape: [c.extentQ]); k = try backend.tensor(ks, shape: [c.extentK])
                v = try backend.tensor(vs, shape: [c.extentV])
                dQ = try backend.tensor([Float](repeating: .nan, count: c.extentQ), shape: [c.extentQ])
                dK = try backend.tensor([Float](repeating: .nan, count: c.extentK), shape: [c.extentK])
                dV = try backend.tensor([Float](repeating: .nan, count: c.extentV), shape: [c.extentV])
                gradBuffer = nil
            }
            let out = try backend.tensor([Float](repeating: .nan, count: c.extentO), shape: [c.extentO])
            let rows = c.batch * c.queryHeads * c.queryLength
            let lse = try backend.tensor([Float](repeating: .nan, count: rows), shape: [rows])
            let dOuts = randomFloats(c.extentO, seed: seed + 3)
            let dOut = try backend.tensor(dOuts, shape: [c.extentO])

            // Forward.
            try backend.attention(c, q: q, k: k, v: v, out: out, logSumExp: lse)
            let ref = Reference.attention(c, q: dbl(qs), k: dbl(ks), v: dbl(vs))
            let outs = try out.floats()
            let errO = Reference.relativeError(to.map { Double(outs[$0]) }, to.map { ref.out[$0] })
            XCTAssertLessThan(errO, Self.bound, "\(what) out")
            if c.ldo > c.queryHeads * c.headDim {
                let gaps = Set(0..<c.extentO).subtracting(to)
                XCTAssertTrue(gaps.allSatisfy { outs[$0].isNaN }, "\(what): out written outside its columns")
            }
            let lses = try lse.floats()
            let finite = ref.logSumExp.indices.filter { ref.logSumExp[$0].isFinite }
            let errL = Reference.relativeError(finite.map { Double(lses[$0]) }, finite.map { ref.logSumExp[$0] })
            XCTAssertLessThan(errL, Self.bound, "\(what) logSumExp")
            for i in ref.logSumExp.indices where !ref.logSumExp[i].isFinite {
                XCTAssertEqual(lses[i], -.infinity, "\(what): a query that sees no key has logSumExp -inf")
            }
            worst.forward = max(worst.forward, errO, errL)

            // Backward.
            try backend.attentionBackward(c, q: q, k: k, v: v, out: out, logSumExp: lse, dOut: dOut, dQ: dQ, dK: dK, dV: dV)
            let rb = Reference.attentionBackward(c, q: dbl(qs), k: dbl(ks), v: dbl(vs), dOut: dbl(dOuts))
            let (dqs, dks, dvs) = (try dQ.floats(), try dK.floats(), try dV.floats())
            for (name, got, refd, idx) in [("dQ", dqs, rb.dq, tq), ("dK", dks, rb.dk, tk), ("dV", dvs, rb.dv, tv)] {
                let err = Reference.relativeError(idx.map { Double(got[$0]) }, idx.map { refd[$0] })
                XCTAssertLessThan(err, Self.bound, "\(what) \(name)")
                worst.backward = max(worst.backward, err)
            }
            if let gradBuffer {
                // Packed: the three views' columns tile every row, so every element is written.
                XCTAssertFalse(try gradBuffer.floats().contains { $0.isNaN }, "\(what): packed gradient not fully written")
            } else {
                for (name, got, extent, idx) in [("dQ", dqs, c.extentQ, tq), ("dK", dks, c.extentK, tk), ("dV", dvs, c.extentV, tv)]
                    where idx.count < extent {
                    let gaps = Set(0..<extent).subtracting(idx)
                    XCTAssertTrue(gaps.allSatisfy { got[$0].isNaN }, "\(what): \(name) written outside its columns")
                }
            }
        }
        return worst
    }

    func testCPUMatchesReference() throws {
        let worst = try checkCases(TestDevices.cpu)
        print("attention cpu: max relative error forward \(worst.forward), backward \(worst.backward)")
    }

    func testOpenCLMatchesReference() throws {
        let worst = try checkCases(try TestDevices.openCLOrSkip())
        print("attention opencl: max relative error forward \(worst.forward), backward \(worst.backward)")
    }

    /// The reference backward against central differences of the reference forward,
    /// with GQA, causal Tq != Tk, row gaps, and a fully masked query (Tk < Tq).
    func testReferenceGradientsMatchFiniteDifferences() {
        let configs = [
            AttentionConfig(batch: 2, queryHeads: 4, kvHeads: 2, queryLength: 3, keyLength: 5, headDim: 3, causal: true,
                            ldq: 14, ldk: 7, ldv: 6, ldo: 13),
            AttentionConfig(batch: 1, queryHeads: 2, kvHeads: 1, queryLength: 4, keyLength: 2, headDim: 4, causal: true, scale: 0.8),
            AttentionConfig(batch: 1, queryHeads: 3, queryLength: 4, keyLength: 6, headDim: 2),
        ]
        for (n, c) in configs.enumerated() {
            let seed = UInt64(500 + 10 * n)
            let q = dbl(randomFloats(c.extentQ, seed: seed, in: -2...2)), k = dbl(randomFloats(c.extentK, seed: seed + 1, in: -2...2))
            let v = dbl(randomFloats(c.extentV, seed: seed + 2)), w = dbl(randomFloats(c.extentO, seed: seed + 3))
            let rb = Reference.attentionBackward(c, q: q, k: k, v: v, dOut: w)
            assertClose(rb.dq, numericGradient(at: q) { dot(w, Reference.attention(c, q: $0, k: k, v: v).out) }, "config \(n) dQ")
            assertClose(rb.dk, numericGradient(at: k) { dot(w, Reference.attention(c, q: q, k: $0, v: v).out) }, "config \(n) dK")
            assertClose(rb.dv, numericGradient(at: v) { dot(w, Reference.attention(c, q: q, k: k, v: $0).out) }, "config \(n) dV")
        }
    }

    /// Zero batch or zero lengths: no-ops, except that the backward still overwrites
    /// dK/dV with zeros when there are keys but no queries, and O is 0 without keys.
    func checkEmpty(_ backend: Backend & AttentionOps) throws {
        let zero = try backend.zeros([0])
        let none = AttentionConfig(batch: 0, queryHeads: 2, queryLength: 5, headDim: 4)
        try backend.attention(none, q: zero, k: zero, v: zero, out: zero, logSumExp: zero)
        try backend.attentionBackward(none, q: zero, k: zero, v: zero, out: zero, logSumExp: zero, dOut: zero,
                                      dQ: try backend.zeros([0]), dK: try backend.zeros([0]), dV: try backend.zeros([0]))
        // Tq = 0, Tk = 3: dK, dV become zeros.
        let noQueries = AttentionConfig(batch: 2, queryHeads: 2, queryLength: 0, keyLength: 3, headDim: 4)
        let k = try backend.tensor(randomFloats(noQueries.extentK, seed: 9), shape: [noQueries.extentK])
        let dK = try backend.tensor([Float](repeating: .nan, count: noQueries.extentK), shape: [noQueries.extentK])
        let dV = try backend.tensor([Float](repeating: .nan, count: noQueries.extentV), shape: [noQueries.extentV])
        try backend.attention(noQueries, q: zero, k: k, v: k, out: try backend.zeros([0]), logSumExp: try backend.zeros([0]))
        try backend.attentionBackward(noQueries, q: zero, k: k, v: k, out: zero, logSumExp: zero, dOut: zero,
                                      dQ: try backend.zeros([0]), dK: dK, dV: dV)
        XCTAssertEqual(try dK.floats(), [Float](repeating: 0, count: noQueries.extentK), "\(backend.name) dK with no queries")
        XCTAssertEqual(try dV.floats(), [Float](repeating: 0, count: noQueries.extentV), "\(backend.name) dV with no queries")
        // Tk = 0: every query sees nothing.
        let noKeys = AttentionConfig(batch: 1, queryHeads: 1, queryLength: 2, keyLength: 0, headDim: 3)
        let q = try backend.tensor(randomFloats(6, seed: 10), shape: [6])
        let out = try backend.tensor([Float](repeating: .nan, count: 6), shape: [6])
        let lse = try backend.zeros([2])
        try backend.attention(noKeys, q: q, k: zero, v: zero, out: out, logSumExp: lse)
        XCTAssertEqual(try out.floats(), [Float](repeating: 0, count: 6), "\(backend.name) out with no keys")
        XCTAssertEqual(try lse.floats(), [-.infinity, -.infinity], "\(backend.name) logSumExp with no keys")
    }

    func checkRejects(_ backend: Backend & AttentionOps) throws {
        let c = AttentionConfig(batch: 2, queryHeads: 4, kvHeads: 2, queryLength: 3, headDim: 4)
        func t(_ n: Int) throws -> Tensor { try backend.zeros([n]) }
        let (q, k, v, o, l) = (try t(c.extentQ), try t(c.extentK), try t(c.extentV), try t(c.extentO), try t(24))
        XCTAssertNoThrow(try backend.attention(c, q: q, k: k, v: v, out: o, logSumExp: l))
        func rejects(_ what: String, _ body: () throws -> Void) {
            XCTAssertThrowsError(try body(), "\(backend.name): \(what)") { error in
                XCTAssertTrue(error is ShapeError, "\(backend.name): \(what): \(error)")
                XCTAssertFalse("\(error)".contains("\n"), "\(backend.name): \(what): one-line message")
            }
        }
        var bad = c; bad.kvHeads = 3
        rejects("kvHeads not dividing queryHeads") { try backend.attention(bad, q: q, k: k, v: v, out: o, logSumExp: l) }
        bad = c; bad.queryLength = -1
        rejects("negative length") { try backend.attention(bad, q: q, k: k, v: v, out: o, logSumExp: l) }
        bad = c; bad.ldq = 15
        rejects("ldq < heads * d") { try backend.attention(bad, q: q, k: k, v: v, out: o, logSumExp: l) }
        rejects("out too small") { try backend.attention(c, q: q, k: k, v: v, out: try t(c.extentO - 1), logSumExp: l) }
        rejects("logSumExp too small") { try backend.attention(c, q: q, k: k, v: v, out: o, logSumExp: try t(23)) }
        rejects("i32 q") {
            try backend.attention(c, q: try backend.makeTensor(shape: [c.extentQ], dtype: .i32), k: k, v: v, out: o, logSumExp: l)
        }
        rejects("out aliasing q") { try backend.attention(c, q: q, k: k, v: v, out: q, logSumExp: l) }
        let dO = try t(c.extentO)
        rejects("dQ aliasing q") {
            try backend.attentionBackward(c, q: q, k: k, v: v, out: o, logSumExp: l, dOut: dO, dQ: q, dK: try t(c.extentK), dV: try t(c.extentV))
        }
        rejects("dV aliasing dOut") {
            let dOutWide = try t(c.extentO + c.extentV)
            try backend.attentionBackward(c, q: q, k: k, v: v, out: o, logSumExp: l, dOut: try dOutWide.view(shape: [c.extentO]),
                                          dQ: try t(c.extentQ), dK: try t(c.extentK), dV: try dOutWide.view(offset: 4, shape: [c.extentV]))
        }
        rejects("dK too small") {
            try backend.attentionBackward(c, q: q, k: k, v: v, out: o, logSumExp: l, dOut: dO, dQ: try t(c.extentQ),
                                          dK: try t(c.extentK - 1), dV: try t(c.extentV))
        }
    }

    func testCPUEdgeCasesAndRejects() throws {
        try checkEmpty(TestDevices.cpu)
        try checkRejects(TestDevices.cpu)
    }

    func testOpenCLEdgeCasesAndRejects() throws {
        let backend = try TestDevices.openCLOrSkip()
        try checkEmpty(backend)
        try checkRejects(backend)
    }

    /// The same inputs give bit-identical gradients (fixed summation order, no atomics).
    func checkDeterministic(_ backend: Backend & AttentionOps) throws {
        let c = AttentionConfig(batch: 2, queryHeads: 6, kvHeads: 2, queryLength: 19, headDim: 16, causal: true)
        let q = try backend.tensor(randomFloats(c.extentQ, seed: 71), shape: [c.extentQ])
        let k = try backend.tensor(randomFloats(c.extentK, seed: 72), shape: [c.extentK])
        let v = try backend.tensor(randomFloats(c.extentV, seed: 73), shape: [c.extentV])
        let dO = try backend.tensor(randomFloats(c.extentO, seed: 74), shape: [c.extentO])
        let o = try backend.zeros([c.extentO]), l = try backend.zeros([c.batch * c.queryHeads * c.queryLength])
        try backend.attention(c, q: q, k: k, v: v, out: o, logSumExp: l)
        var runs: [[Float]] = []
        for _ in 0..<2 {
            let dQ = try backend.zeros([c.extentQ]), dK = try backend.zeros([c.extentK]), dV = try backend.zeros([c.extentV])
            try backend.attentionBackward(c, q: q, k: k, v: v, out: o, logSumExp: l, dOut: dO, dQ: dQ, dK: dK, dV: dV)
            runs.append(try dQ.floats() + dK.floats() + dV.floats())
        }
        XCTAssertEqual(runs[0], runs[1], "\(backend.name): backward not deterministic")
    }

    func testCPUDeterministic() throws { try checkDeterministic(TestDevices.cpu) }
    func testOpenCLDeterministic() throws { try checkDeterministic(try TestDevices.openCLOrSkip()) }
}
