import MoECompute
import XCTest
import MoETestSupport

final class PermuteTests: XCTestCase {
    /// Expert ids for T tokens with k distinct choices each, drawn from `allowed` experts.
    func expertIndices(tokens: Int, k: Int, allowed: [Int], seed: UInt64) -> [Int32] {
        var rng = SplitMix64(seed: seed)
        var out: [Int32] = []
        for _ in 0..<tokens {
            var pool = allowed
            for _ in 0..<k {
                let pick = Int(rng.next() % UInt64(pool.count))
                out.append(Int32(pool.remove(at: pick)))
            }
        }
        return out
    }

    struct PlanCase: CustomStringConvertible {
        var t: Int, e: Int, k: Int, allowed: [Int], config: DispatchConfig, tiedWeights: Bool = false
        var description: String { "T=\(t) E=\(e) k=\(k) experts used \(allowed.count) \(config.capacity) \(config.dropPolicy) tied=\(tiedWeights)" }
    }

    static let planCases: [PlanCase] = [
        PlanCase(t: 1, e: 1, k: 1, allowed: [0], config: DispatchConfig(experts: 1)),
        PlanCase(t: 1, e: 4, k: 4, allowed: [0, 1, 2, 3], config: DispatchConfig(experts: 4, capacity: .factor(1))),
        PlanCase(t: 37, e: 8, k: 2, allowed: Array(0..<8), config: DispatchConfig(experts: 8)),
        PlanCase(t: 1000, e: 8, k: 2, allowed: [0, 3, 5], config: DispatchConfig(experts: 8)),                      // empty experts
        PlanCase(t: 1000, e: 8, k: 2, allowed: Array(0..<8), config: DispatchConfig(experts: 8, capacity: .factor(1))),
        PlanCase(t: 1000, e: 8, k: 2, allowed: [1, 6], config: DispatchConfig(experts: 8, capacity: .factor(1.25))),  // drops
        PlanCase(t: 1000, e: 8, k: 2, allowed: [1, 2, 6], config: DispatchConfig(experts: 8, capacity: .factor(1), dropPolicy: .probs)),
        PlanCase(t: 777, e: 4, k: 2, allowed: [0, 1, 2, 3], config: DispatchConfig(experts: 4, capacity: .fixed(100), dropPolicy: .probs),
                 tiedWeights: true),
        PlanCase(t: 300, e: 5, k: 1, allowed: [2], config: DispatchConfig(experts: 5, capacity: .fixed(37))),          // all on one expert
        PlanCase(t: 300, e: 5, k: 1, allowed: [2], config: DispatchConfig(experts: 5, capacity: .fixed(37), dropPolicy: .probs)),
        PlanCase(t: 4099, e: 16, k: 4, allowed: Array(0..<16), config: DispatchConfig(experts: 16, capacity: .factor(1.0), dropPolicy: .probs)),
        PlanCase(t: 4099, e: 64, k: 8, allowed: Array(0..<64), config: DispatchConfig(experts: 64)),
        PlanCase(t: 37, e: 3, k: 3, allowed: [0, 1, 2], config: DispatchConfig(experts: 3, capacity: .fixed(0))),      // everything dropped
    ]

    func weights(_ n: Int, tied: Bool, seed: UInt64) -> [Float] {
        randomFloats(n, seed: seed, in: 0...1).map { tied ? ($0 * 4).rounded() / 4 : $0 }
    }

    func testDispatchPlanMatchesReferenceExactly() throws {
        let backends = try TestDevices.all()
        for (ci, c) in Self.planCases.enumerated() {
            let idx = expertIndices(tokens: c.t, k: c.k, allowed: c.allowed, seed: UInt64(ci))
            let w = weights(c.t * c.k, tied: c.tiedWeights, seed: UInt64(ci) + 50)
            let ref = Reference.dispatchPlan(expertIndex: idx, gateWeight: RT.doubles(w), tokens: c.t, k: c.k, config: c.config)
            XCTAssertEqual(ref.counts.reduce(0, +), ref.offsets.last!, "reference plan \(c)")
            for b in backends {
                let plan = try b.dispatchPlan(expertIndex: try b.tensor(ints: idx, shape: [c.t, c.k]),
                                              gateWeight: try b.tensor(w, shape: [c.t, c.k]), config: c.config)
                XCTAssertEqual(try plan.counts.ints(), ref.counts, "counts \(b.name) \(c)")
                XCTAssertEqual(try plan.offsets.ints(), ref.offsets, "offsets \(b.name) \(c)")
                XCTAssertEqual(try plan.destination.ints(), ref.destination, "destination \(b.name) \(c)")
                XCTAssertEqual(try plan.sourceOfRow.ints(), ref.sourceOfRow, "sourceOfRow \(b.name) \(c)")
            }
        }
    }

    /// Known answer: 3 tokens, top-2 over 3 experts, capacity 1, both drop policies.
    func testDispatchPlanKnownAnswer() throws {
        let idx: [Int32] = [2, 0, 0, 2, 1, 2]   // t0 -> (2,0), t1 -> (0,2), t2 -> (1,2)
        let w: [Float] = [0.2, 0.8, 0.6, 0.4, 0.5, 0.5]
        for b in try TestDevices.all() {
            let i = try b.tensor(ints: idx, shape: [3, 2]), wt = try b.tensor(w, shape: [3, 2])
            let dropless = try b.dispatchPlan(expertIndex: i, gateWeight: wt, config: DispatchConfig(experts: 3))
            XCTAssertEqual(try dropless.offsets.ints(), [0, 2, 3, 6], b.name)
            XCTAssertEqual(try dropless.destination.ints(), [3, 0, 1, 4, 2, 5], b.name)
            XCTAssertEqual(try dropless.sourceOfRow.ints(), [1, 2, 4, 0, 3, 5], b.name)
            let pos = try b.dispatchPlan(expertIndex: i, gateWeight: wt, config: DispatchConfig(experts: 3, capacity: .fixed(1)))
            XCTAssertEqual(try pos.counts.ints(), [1, 1, 1], b.name)
            XCTAssertEqual(try pos.destination.ints(), [2, 0, -1, -1, 1, -1], b.name)
            XCTAssertEqual(try pos.sourceOfRow.ints(), [1, 4, 0, -1, -1, -1], b.name)
            let probs = try b.dispatchPlan(expertIndex: i, gateWeight: wt,
                                           config: DispatchConfig(experts: 3, capacity: .fixed(1), dropPolicy: .probs))
            // Expert 2: weights 0.2 (t0), 0.4 (t1), 0.5 (t2) -> t2 kept; expert 0: 0.8 (t0) beats 0.6 (t1).
            XCTAssertEqual(try probs.destination.ints(), [-1, 0, -1, -1, 1, 2], b.name)
        }
    }

    /// Plans from the top-k cases plus an expert-choice plan, for the row ops.
    func plans(on b: Backend) throws -> [(DispatchPlan, String)] {
        var out: [(DispatchPlan, String)] = []
        for ci in [0, 1, 3, 5, 7, 9, 12] {
            let c = Self.planCases[ci]
            let idx = expertIndices(tokens: c.t, k: c.k, allowed: c.allowed, seed: UInt64(ci))
            let w = weights(c.t * c.k, tied: c.tiedWeights, seed: UInt64(ci) + 50)
            out.append((try b.dispatchPlan(expertIndex: try b.tensor(ints: idx, shape: [c.t, c.k]),
                                           gateWeight: try b.tensor(w, shape: [c.t, c.k]), config: c.config), "\(c)"))
        }
        let probs = randomFloats(53 * 6, seed: 99, in: 0...1)
        out.append((try b.expertChoice(probs: try b.tensor(probs, shape: [53, 6]), capacity: 11).plan, "expert choice T=53 E=6 C=11"))
        return out
    }

    func referencePlan(_ p: DispatchPlan) throws -> Reference.Plan {
        Reference.Plan(counts: try p.counts.ints(), offsets: try p.offsets.ints(), destination: try p.destination.ints(),
                       sourceOfRow: try p.sourceOfRow.ints())
    }

    func testPermuteUnpermuteAndCombineMatchReference() throws {
        for b in try TestDevices.all() {
            for (plan, what) in try plans(on: b) {
                let ref = try referencePlan(plan)
                let T = plan.tokens, S = plan.slotsPerToken
                for h in [1, 3, 4, 37, 64] {
                    let rows = plan.maxRows + 3   // a buffer with spare rows past offsets[E]
                    let xs = randomFloats(T * h, seed: UInt64(T + h)), gs = randomFloats(rows * h, seed: UInt64(T + h + 1))
                    let ws = randomFloats(T * S, seed: UInt64(h), in: 0...1)
                    let x = try b.tensor(xs, shape: [T, h])
                    let xp = try b.tensor([Float](repeating: .nan, count: rows * h), shape: [rows, h])
                    try b.permute(x, plan: plan, into: xp)
                    XCTAssertEqual(try xp.floats().map(Double.init),
                                   Reference.permute(x: RT.doubles(xs), hidden: h, plan: ref, slots: S, rows: rows), "permute \(b.name) H=\(h) \(what)")
                    let dx = try b.tensor([Float](repeating: .nan, count: T * h), shape: [T, h])
                    try b.unpermute(try b.tensor(gs, shape: [rows, h]), plan: plan, into: dx)
                    assertRelativeError(try dx.floats(), Reference.combine(yp: RT.doubles(gs), weights: nil, hidden: h, plan: ref, tokens: T, slots: S),
                                        below: 1e-6, "unpermute \(b.name) H=\(h) \(what)")
                    let out = try b.zeros([T, h])
                    try b.combine(try b.tensor(gs, shape: [rows, h]), weights: try b.tensor(ws, shape: [T, S]), plan: plan, into: out)
                    assertRelativeError(try out.floats(), Reference.combine(yp: RT.doubles(gs), weights: RT.doubles(ws), hidden: h, plan: ref, tokens: T, slots: S),
                                        below: 1e-5, "combine \(b.name) H=\(h) \(what)")
                }
            }
        }
    }

    func testCombineBackwardMatchesReference() throws {
        for b in try TestDevices.all() {
            for (plan, what) in try plans(on: b) {
                let ref = try referencePlan(plan)
                let T = plan.tokens, S = plan.slotsPerToken
                for h in [1, 5, 64] {
                    let rows = plan.maxRows + 2
                    let ys = randomFloats(rows * h, seed: UInt64(T * h)), gs = randomFloats(T * h, seed: UInt64(T * h + 1))
                    let ws = randomFloats(T * S, seed: UInt64(T + 7), in: 0...1)
                    let dyp = try b.tensor([Float](repeating: .nan, count: rows * h), shape: [rows, h])
                    let dw = try b.tensor([Float](repeating: .nan, count: T * S), shape: [T, S])
                    try b.combineBackward(dOut: try b.tensor(gs, shape: [T, h]), yp: try b.tensor(ys, shape: [rows, h]),
                                          weights: try b.tensor(ws, shape: [T, S]), plan: plan, dYp: dyp, dWeights: dw)
                    let r = Reference.combineBackward(dOut: RT.doubles(gs), yp: RT.doubles(ys), weights: RT.doubles(ws), hidden: h,
                                                      plan: ref, tokens: T, slots: S, rows: rows)
                    assertRelativeError(try dyp.floats(), r.dYp, below: 1e-6, "combine backward dYp \(b.name) H=\(h) \(what)")
                    assertRelativeError(try dw.floats(), r.dWeights, below: 1e-5, "combine backward dWeights \(b.name) H=\(h) \(what)")
                }
            }
        }
    }

    /// The references' backward passes against finite differences (and the
    /// permute/unpermute adjoint identity), on a plan with drops.
    func testReferenceBackwardsAgainstFiniteDifferences() throws {
        let (T, k, E, h) = (5, 2, 3, 3)
        let idx = expertIndices(tokens: T, k: k, allowed: [0, 1, 2], seed: 4)
        let plan = Reference.dispatchPlan(expertIndex: idx, gateWeight: nil, tokens: T, k: k,
                                          config: DispatchConfig(experts: E, capacity: .fixed(3)))
        XCTAssertTrue(plan.destination.contains(-1), "the case should drop something")
        let rows = T * k
        let x = RT.doubles(randomFloats(T * h, seed: 1)), g = RT.doubles(randomFloats(rows * h, seed: 2))
        let yp = RT.doubles(randomFloats(rows * h, seed: 3)), w = RT.doubles(randomFloats(T * k, seed: 4))
        let dOut = RT.doubles(randomFloats(T * h, seed: 5))
        // <permute(x), g> = <x, unpermute(g)>
        let lhs = RT.dot(Reference.permute(x: x, hidden: h, plan: plan, slots: k, rows: rows), g)
        let rhs = RT.dot(x, Reference.combine(yp: g, weights: nil, hidden: h, plan: plan, tokens: T, slots: k))
        XCTAssertEqual(lhs, rhs, accuracy: 1e-12)
        let fdX = RT.numericGradient({ RT.dot(Reference.permute(x: $0, hidden: h, plan: plan, slots: k, rows: rows), g) }, at: x)
        RT.assertClose(Reference.combine(yp: g, weights: nil, hidden: h, plan: plan, tokens: T, slots: k), fdX, below: 1e-8, "unpermute vs finite differences")
        let back = Reference.combineBackward(dOut: dOut, yp: yp, weights: w, hidden: h, plan: plan, tokens: T, slots: k, rows: rows)
        let fdY = RT.numericGradient({ RT.dot(Reference.combine(yp: $0, weights: w, hidden: h, plan: plan, tokens: T, slots: k), dOut) }, at: yp)
        RT.assertClose(back.dYp, fdY, below: 1e-8, "combine dYp vs finite differences")
        let fdW = RT.numericGradient({ RT.dot(Reference.combine(yp: yp, weights: $0, hidden: h, plan: plan, tokens: T, slots: k), dOut) }, at: w)
        RT.assertClose(back.dWeights, fdW, below: 1e-8, "combine dWeights vs finite differences")
    }

    /// Same plan, rows and weights from both backends, bit for bit where the
    /// arithmetic is the same (permute is a copy; plans are integers).
    func testBackendsAgreeBitwiseOnPlansAndPermute() throws {
        let backends = try TestDevices.all()
        let (T, k, E, h) = (1029, 2, 8, 768)
        let idx = expertIndices(tokens: T, k: k, allowed: [0, 1, 2, 3, 4, 4, 4, 4, 7], seed: 12)   // expert 4 heavy, 5 and 6 empty
        let w = weights(T * k, tied: false, seed: 13)
        let xs = randomFloats(T * h, seed: 14)
        var results: [([Int32], [Int32], [Float])] = []
        for b in backends {
            let plan = try b.dispatchPlan(expertIndex: try b.tensor(ints: idx, shape: [T, k]), gateWeight: try b.tensor(w, shape: [T, k]),
                                          config: DispatchConfig(experts: E, capacity: .factor(1.0), dropPolicy: .probs))
            let xp = try b.zeros([plan.maxRows, h])
            try b.permute(try b.tensor(xs, shape: [T, h]), plan: plan, into: xp)
            results.append((try plan.destination.ints(), try plan.sourceOfRow.ints(), try xp.floats()))
        }
        guard results.count == 2 else { return }
        XCTAssertEqual(results[0].0, results[1].0)
        XCTAssertEqual(results[0].1, results[1].1)
        XCTAssertTrue(results[0].2 == results[1].2, "permuted rows differ between backends")
    }

    /// The GPU launch shapes (64 work-items across a row) and other group sizes
    /// for the plan chunks and scans, on the CI's CPU OpenCL device.
    func testOpenCLWorkGroupShapesMatchReference() throws {
        _ = try TestDevices.openCLOrSkip()
        for g in [1, 64] {
            OpenCLBackend.workGroupOverride = g
            defer { OpenCLBackend.workGroupOverride = nil }
            try testDispatchPlanMatchesReferenceExactly()
            try testDispatchPlanKnownAnswer()
            try testPermuteUnpermuteAndCombineMatchReference()
            try testCombineBackwardMatchesReference()
            try testBackendsAgreeBitwiseOnPlansAndPermute()
        }
    }

    func testShapeErrorsThrow() throws {
        for b in try TestDevices.all() {
            let idx = try b.tensor(ints: [0, 1], shape: [2, 1])
            XCTAssertThrowsError(try b.dispatchPlan(expertIndex: idx, gateWeight: nil,
                                                    config: DispatchConfig(experts: 2, capacity: .fixed(1), dropPolicy: .probs)), b.name)
            let plan = try b.dispatchPlan(expertIndex: idx, config: DispatchConfig(experts: 2))
            XCTAssertThrowsError(try b.permute(try b.zeros([2, 4]), plan: plan, into: try b.zeros([1, 4])), "too few rows on \(b.name)")
            XCTAssertThrowsError(try b.combine(try b.zeros([2, 4]), weights: try b.zeros([2, 2]), plan: plan, into: try b.zeros([2, 4])), b.name)
        }
    }

}
