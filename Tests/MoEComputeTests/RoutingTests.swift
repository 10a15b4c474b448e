import MoECompute
import XCTest
import MoETestSupport

/// Helpers of the routing and permute tests (namespaced: other test files have their own).
enum RT {
    /// Central finite differences of a scalar function in float64.
    static func numericGradient(_ f: ([Double]) -> Double, at x: [Double], step h: Double = 1e-5) -> [Double] {
        var x = x
        return (0..<x.count).map { i in
            let v = x[i]
            x[i] = v + h; let fp = f(x)
            x[i] = v - h; let fm = f(x)
            x[i] = v
            return (fp - fm) / (2 * h)
        }
    }

    static func dot(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).reduce(0) { $0 + $1.0 * $1.1 } }

    static func doubles(_ x: [Float]) -> [Double] { x.map(Double.init) }

    static func assertClose(_ got: [Double], _ ref: [Double], below bound: Double, _ what: @autoclosure () -> String,
                     file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(got.count, ref.count, "\(what()): length", file: file, line: line)
        guard got.count == ref.count else { return }
        let err = Reference.relativeError(got, ref)
        XCTAssertLessThan(err, bound, "\(what()): relative error \(err)", file: file, line: line)
    }
}

final class RoutingTests: XCTestCase {
    struct GateCase { var t: Int, e: Int, config: GateConfig }

    static let gateCases: [GateCase] = [
        GateCase(t: 1, e: 1, config: GateConfig(k: 1)),
        GateCase(t: 37, e: 8, config: GateConfig(k: 2)),
        GateCase(t: 37, e: 8, config: GateConfig(k: 2, renormalize: true)),
        GateCase(t: 37, e: 8, config: GateConfig(k: 2, mode: .topKThenSoftmax)),
        GateCase(t: 1000, e: 8, config: GateConfig(k: 2, jitter: GateJitter(epsilon: 0.01, seed: 7))),
        GateCase(t: 257, e: 5, config: GateConfig(k: 5, mode: .topKThenSoftmax, jitter: GateJitter(epsilon: 0.1, seed: 3))),
        GateCase(t: 300, e: 64, config: GateConfig(k: 8, renormalize: true)),
        GateCase(t: 4099, e: 4, config: GateConfig(k: 1, mode: .topKThenSoftmax)),
    ]

    /// Logits with many exact ties (multiples of 0.25 in [-1, 1]) to check tie-breaking.
    func tiedLogits(_ n: Int, seed: UInt64) -> [Float] {
        randomFloats(n, seed: seed, in: -1...1).map { ($0 * 4).rounded() / 4 }
    }

    func testGateMatchesReferenceOnBothBackends() throws {
        let backends = try TestDevices.all()
        for (ci, c) in Self.gateCases.enumerated() {
            for tied in [false, true] {
                let n = c.t * c.e
                let values = tied ? tiedLogits(n, seed: UInt64(ci)) : randomFloats(n, seed: UInt64(ci), in: -3...3)
                let ref = Reference.gate(logits: RT.doubles(values), tokens: c.t, experts: c.e, config: c.config)
                var indices: [[Int32]] = []
                for b in backends {
                    let out = try b.gate(logits: try b.tensor(values, shape: [c.t, c.e]), config: c.config)
                    let what = "gate \(b.name) T=\(c.t) E=\(c.e) \(c.config) tied=\(tied)"
                    XCTAssertEqual(try out.expertIndex.ints(), ref.expertIndex, what)
                    assertRelativeError(try out.gateWeight.floats(), ref.gateWeight, below: 1e-5, what + " weights")
                    assertRelativeError(try out.probs.floats(), ref.probs, below: 1e-5, what + " probs")
                    indices.append(try out.expertIndex.ints())
                }
                XCTAssertEqual(indices.first, indices.last, "backends disagree on indices")
            }
        }
    }

    /// Known answer: softmax then top-2 on one token, with a tie between experts 1 and 3.
    func testGateKnownAnswer() throws {
        for b in try TestDevices.all() {
            let out = try b.gate(logits: try b.tensor([0, 2, 1, 2], shape: [1, 4]), config: GateConfig(k: 2))
            XCTAssertEqual(try out.expertIndex.ints(), [1, 3], b.name)
            let s = 1 + 2 * exp(2.0) + exp(1.0)
            assertRelativeError(try out.gateWeight.floats(), [exp(2) / s, exp(2) / s], below: 1e-6, b.name)
        }
    }

    func testJitterIsSeededAndIdenticalOnBothBackends() throws {
        let j = GateJitter(epsilon: 0.5, seed: 42)
        let factors = (0..<64).map { j.factor(token: $0 / 8, expert: $0 % 8) }
        XCTAssertTrue(factors.allSatisfy { $0 >= 0.5 && $0 < 1.5 })
        XCTAssertGreaterThan(Set(factors).count, 60, "jitter factors should vary")
        XCTAssertNotEqual(factors, (0..<64).map { GateJitter(epsilon: 0.5, seed: 43).factor(token: $0 / 8, expert: $0 % 8) })
        // All-ones logits: the gate's probabilities are softmax(m) for both backends, bit-identical inputs to exp.
        var probs: [[Float]] = []
        for b in try TestDevices.all() {
            let out = try b.gate(logits: try b.tensor([Float](repeating: 1, count: 64), shape: [8, 8]),
                                 config: GateConfig(k: 3, jitter: j))
            let ref = Reference.gate(logits: [Double](repeating: 1, count: 64), tokens: 8, experts: 8, config: GateConfig(k: 3, jitter: j))
            XCTAssertEqual(try out.expertIndex.ints(), ref.expertIndex, b.name)
            assertRelativeError(try out.probs.floats(), ref.probs, below: 1e-6, b.name)
            probs.append(try out.probs.floats())
        }
        if probs.count == 2 { assertRelativeError(probs[0], RT.doubles(probs[1]), below: 1e-6, "jittered probabilities differ between backends") }
    }

    func testGateBackwardMatchesFiniteDifferencesAndBackends() throws {
        let backends = try TestDevices.all()
        let configs = [GateConfig(k: 2), GateConfig(k: 2, renormalize: true), GateConfig(k: 2, mode: .topKThenSoftmax),
                       GateConfig(k: 1, mode: .softmaxThenTopK, jitter: GateJitter(epsilon: 0.2, seed: 9)),
                       GateConfig(k: 3, mode: .topKThenSoftmax, jitter: GateJitter(epsilon: 0.2, seed: 1)),
                       GateConfig(k: 5, renormalize: true)]
        for (ci, c) in configs.enumerated() {
            let (T, E) = (3, 5)
            let logits = RT.doubles(randomFloats(T * E, seed: 100 + UInt64(ci), in: -2...2))
            let cw = RT.doubles(randomFloats(T * c.k, seed: 200 + UInt64(ci)))
            let cp = RT.doubles(randomFloats(T * E, seed: 300 + UInt64(ci)))
            let base = Reference.gate(logits: logits, tokens: T, experts: E, config: c)
            let f: ([Double]) -> Double = { l in
                let r = Reference.gate(logits: l, tokens: T, experts: E, config: c)
                XCTAssertEqual(r.expertIndex, base.expertIndex, "selection changed under the finite-difference step")
                return RT.dot(r.gateWeight, cw) + RT.dot(r.probs, cp)
            }
            let fd = RT.numericGradient(f, at: logits)
            let ref = Reference.gateBackward(config: c, tokens: T, experts: E, expertIndex: base.expertIndex,
                                             gateWeight: base.gateWeight, probs: base.probs, dGateWeight: cw, dProbs: cp)
            RT.assertClose(ref, fd, below: 1e-7, "reference gate backward vs finite differences \(c)")

            // Backends on a larger case against the reference backward.
            let (T2, E2) = (101, 7)
            let c2 = GateConfig(k: min(c.k, E2), mode: c.mode, renormalize: c.renormalize, jitter: c.jitter)
            let l2 = randomFloats(T2 * E2, seed: 400 + UInt64(ci), in: -2...2)
            let dw2 = randomFloats(T2 * c2.k, seed: 500 + UInt64(ci)), dp2 = randomFloats(T2 * E2, seed: 600 + UInt64(ci))
            let fwd = Reference.gate(logits: RT.doubles(l2), tokens: T2, experts: E2, config: c2)
            for withProbs in [false, true] {
                let ref2 = Reference.gateBackward(config: c2, tokens: T2, experts: E2, expertIndex: fwd.expertIndex,
                                                  gateWeight: fwd.gateWeight, probs: fwd.probs, dGateWeight: RT.doubles(dw2),
                                                  dProbs: withProbs ? RT.doubles(dp2) : nil)
                for b in backends {
                    let out = try b.gate(logits: try b.tensor(l2, shape: [T2, E2]), config: c2)
                    let d = try b.gateBackward(config: c2, gate: out, dGateWeight: try b.tensor(dw2, shape: [T2, c2.k]),
                                               dProbs: withProbs ? try b.tensor(dp2, shape: [T2, E2]) : nil)
                    assertRelativeError(try d.floats(), ref2, below: 1e-5, "gateBackward \(b.name) \(c2) dProbs=\(withProbs)")
                }
            }
        }
    }

    func testLoadBalancingLossAndGradientThroughTheGate() throws {
        let backends = try TestDevices.all()
        for (T, E, k) in [(1, 1, 1), (37, 8, 2), (1000, 8, 2), (300, 64, 8), (513, 3, 3)] {
            let logits = randomFloats(T * E, seed: UInt64(T * E + k), in: -2...2)
            let c = GateConfig(k: k)
            let fwd = Reference.gate(logits: RT.doubles(logits), tokens: T, experts: E, config: c)
            let ref = Reference.loadBalancingLoss(probs: fwd.probs, expertIndex: fwd.expertIndex, tokens: T, experts: E, k: k)
            for b in backends {
                let out = try b.gate(logits: try b.tensor(logits, shape: [T, E]), config: c)
                let loss = try b.zeros([1]), dProbs = try b.zeros([T, E])
                try b.loadBalancingLoss(probs: out.probs, expertIndex: out.expertIndex, coefficient: 0.01, loss: loss, dProbs: dProbs)
                assertRelativeError(try loss.floats(), [ref.loss], below: 1e-5, "lb loss \(b.name) T=\(T) E=\(E)")
                assertRelativeError(try dProbs.floats(), ref.dProbs.map { 0.01 * $0 }, below: 1e-5, "lb dProbs \(b.name)")
                // Deterministic: the same bits on a second run.
                let again = try b.zeros([1])
                try b.loadBalancingLoss(probs: out.probs, expertIndex: out.expertIndex, coefficient: 0.01, loss: again, dProbs: nil)
                XCTAssertEqual(try again.floats(), try loss.floats(), "lb loss not reproducible on \(b.name)")
            }
        }
        // Gradient w.r.t. the logits (f held constant) against finite differences.
        let (T, E, k) = (4, 5, 2)
        let logits = RT.doubles(randomFloats(T * E, seed: 77, in: -2...2))
        let c = GateConfig(k: k, jitter: GateJitter(epsilon: 0.1, seed: 5))
        let base = Reference.gate(logits: logits, tokens: T, experts: E, config: c)
        let fd = RT.numericGradient({ l in
            let r = Reference.gate(logits: l, tokens: T, experts: E, config: c)
            return Reference.loadBalancingLoss(probs: r.probs, expertIndex: base.expertIndex, tokens: T, experts: E, k: k).loss
        }, at: logits)
        let dProbs = Reference.loadBalancingLoss(probs: base.probs, expertIndex: base.expertIndex, tokens: T, experts: E, k: k).dProbs
        let ref = Reference.gateBackward(config: c, tokens: T, experts: E, expertIndex: base.expertIndex, gateWeight: base.gateWeight,
                                         probs: base.probs, dGateWeight: [Double](repeating: 0, count: T * k), dProbs: dProbs)
        RT.assertClose(ref, fd, below: 1e-7, "load-balancing gradient w.r.t. logits")
        // Perfectly balanced routing with uniform probabilities gives exactly 1.
        let uniform = Reference.loadBalancingLoss(probs: [Double](repeating: 0.25, count: 16), expertIndex: [0, 1, 2, 3],
                                                  tokens: 4, experts: 4, k: 1)
        XCTAssertEqual(uniform.loss, 1, accuracy: 1e-12)
    }

    func testZLossValueAndGradient() throws {
        let backends = try TestDevices.all()
        let (T0, E0) = (3, 4)
        let l0 = RT.doubles(randomFloats(T0 * E0, seed: 11, in: -3...3))
        let fd = RT.numericGradient({ Reference.zLoss(logits: $0, tokens: T0, experts: E0).loss }, at: l0)
        RT.assertClose(Reference.zLoss(logits: l0, tokens: T0, experts: E0).dLogits, fd, below: 1e-7, "z-loss gradient vs finite differences")
        for (T, E) in [(1, 1), (37, 8), (4099, 8), (1000, 64)] {
            let logits = randomFloats(T * E, seed: UInt64(T + E), in: -4...4)
            let ref = Reference.zLoss(logits: RT.doubles(logits), tokens: T, experts: E)
            let prior = randomFloats(T * E, seed: 5)
            for b in backends {
                let loss = try b.zeros([1]), d = try b.tensor(prior, shape: [T, E])
                try b.zLoss(logits: try b.tensor(logits, shape: [T, E]), coefficient: 0.001, loss: loss, dLogits: d, accumulate: true)
                assertRelativeError(try loss.floats(), [ref.loss], below: 1e-5, "z-loss \(b.name) T=\(T) E=\(E)")
                assertRelativeError(try d.floats(), zip(prior, ref.dLogits).map { Double($0) + 0.001 * $1 }, below: 1e-5,
                                    "z-loss gradient (accumulated) \(b.name)")
                try b.zLoss(logits: try b.tensor(logits, shape: [T, E]), coefficient: 2, loss: loss, dLogits: d, accumulate: false)
                assertRelativeError(try d.floats(), ref.dLogits.map { 2 * $0 }, below: 1e-5, "z-loss gradient \(b.name)")
            }
        }
    }

    func testExpertChoiceMatchesReference() throws {
        let backends = try TestDevices.all()
        // (T, E, capacity, quantised probabilities for ties)
        for (T, E, C, tied) in [(1, 1, 1, false), (1, 4, 3, false), (37, 8, 10, false), (37, 8, 10, true), (1000, 8, 250, true),
                                (4099, 3, 2733, false), (300, 64, 9, true), (5, 2, 9, false)] {
            var rng = SplitMix64(seed: UInt64(T * 31 + E))
            let probs: [Float] = (0..<T * E).map { _ in
                let u = rng.nextFloat(in: 0...1)
                return tied ? (u * 8).rounded() / 8 : u
            }
            let ref = Reference.expertChoice(probs: RT.doubles(probs), tokens: T, experts: E, capacity: C)
            for b in backends {
                let (plan, w) = try b.expertChoice(probs: try b.tensor(probs, shape: [T, E]), capacity: C)
                let what = "expert choice \(b.name) T=\(T) E=\(E) C=\(C) tied=\(tied)"
                XCTAssertEqual(try plan.destination.ints(), ref.plan.destination, what)
                XCTAssertEqual(try plan.sourceOfRow.ints(), ref.plan.sourceOfRow, what)
                XCTAssertEqual(try plan.offsets.ints(), ref.plan.offsets, what)
                XCTAssertEqual(try plan.counts.ints(), ref.plan.counts, what)
                XCTAssertEqual(try w.floats().map(Double.init), ref.combineWeight, what)
            }
        }
    }

    func testExpertChoiceBackward() throws {
        let (T, E, C) = (6, 3, 2)
        let logits = RT.doubles(randomFloats(T * E, seed: 3, in: -2...2))
        let g = RT.doubles(randomFloats(T * E, seed: 4))
        let probs = Reference.rowSoftmax(logits, rows: T, cols: E)
        let plan = Reference.expertChoice(probs: probs, tokens: T, experts: E, capacity: C).plan
        let fd = RT.numericGradient({ l in
            let p = Reference.rowSoftmax(l, rows: T, cols: E)
            return (0..<T * E).reduce(0.0) { $0 + (plan.destination[$1] >= 0 ? p[$1] * g[$1] : 0) }
        }, at: logits)
        let ref = Reference.expertChoiceBackward(probs: probs, destination: plan.destination, dCombineWeight: g, tokens: T, experts: E)
        RT.assertClose(ref, fd, below: 1e-7, "expert choice backward vs finite differences")

        for (T2, E2, C2) in [(1, 1, 1), (257, 8, 40)] {
            let l2 = randomFloats(T2 * E2, seed: 8, in: -2...2), g2 = randomFloats(T2 * E2, seed: 9)
            for b in try TestDevices.all() {
                let p = try b.zeros([T2, E2])
                try b.routerProbs(logits: try b.tensor(l2, shape: [T2, E2]), probs: p)
                assertRelativeError(try p.floats(), Reference.rowSoftmax(RT.doubles(l2), rows: T2, cols: E2), below: 1e-6, "routerProbs \(b.name)")
                let (plan2, _) = try b.expertChoice(probs: p, capacity: C2)
                let d = try b.zeros([T2, E2])
                try b.expertChoiceBackward(probs: p, destination: plan2.destination, dCombineWeight: try b.tensor(g2, shape: [T2, E2]), dLogits: d)
                let r = Reference.expertChoiceBackward(probs: RT.doubles(try p.floats()), destination: try plan2.destination.ints(),
                                                       dCombineWeight: RT.doubles(g2), tokens: T2, experts: E2)
                assertRelativeError(try d.floats(), r, below: 1e-5, "expertChoiceBackward \(b.name)")
            }
        }
    }

    func testL2NormalizeForwardAndBackward() throws {
        let eps: Float = 1e-3
        // Finite differences, with one all-zero (clamped) row.
        let (R0, D0) = (3, 4)
        var x0 = RT.doubles(randomFloats(R0 * D0, seed: 21))
        for c in 0..<D0 { x0[D0 + c] = 0 }
        let g0 = RT.doubles(randomFloats(R0 * D0, seed: 22))
        let fd = RT.numericGradient({ RT.dot(Reference.l2NormalizeRows($0, rows: R0, cols: D0, epsilon: Double(eps)), g0) }, at: x0, step: 1e-7)
        RT.assertClose(Reference.l2NormalizeRowsBackward(x: x0, dY: g0, rows: R0, cols: D0, epsilon: Double(eps)), fd, below: 1e-6,
                    "l2 normalise backward vs finite differences")
        for (R, D) in [(1, 1), (37, 5), (1000, 64), (3, 768)] {
            var xs = randomFloats(R * D, seed: UInt64(R * D))
            for c in 0..<D { xs[c] = 0 }   // a zero row takes the clamped branch
            let gs = randomFloats(R * D, seed: UInt64(R * D + 1))
            let refY = Reference.l2NormalizeRows(RT.doubles(xs), rows: R, cols: D, epsilon: Double(eps))
            let refD = Reference.l2NormalizeRowsBackward(x: RT.doubles(xs), dY: RT.doubles(gs), rows: R, cols: D, epsilon: Double(eps))
            for b in try TestDevices.all() {
                let x = try b.tensor(xs, shape: [R, D]), y = try b.zeros([R, D]), dx = try b.zeros([R, D])
                try b.l2NormalizeRows(x, into: y, epsilon: eps)
                try b.l2NormalizeRowsBackward(x: x, dY: try b.tensor(gs, shape: [R, D]), dX: dx, epsilon: eps)
                assertRelativeError(try y.floats(), refY, below: 1e-5, "l2 normalise \(b.name) \(R)x\(D)")
                assertRelativeError(try dx.floats(), refD, below: 1e-5, "l2 normalise backward \(b.name) \(R)x\(D)")
            }
        }
    }

    func testTemperatureScaleAndGradient() throws {
        // d/dtau of sum(g * s / tau) by finite differences, and d/ds.
        let s = RT.doubles(randomFloats(12, seed: 31)), g = RT.doubles(randomFloats(12, seed: 32))
        let tau = 0.5
        let fd = RT.numericGradient({ t in RT.dot(s.map { $0 / t[0] }, g) }, at: [tau])[0]
        let logits = s.map { $0 / tau }
        XCTAssertEqual(-RT.dot(g, logits) / tau, fd, accuracy: 1e-7 * abs(fd))
        for (R, C) in [(1, 1), (37, 9), (1000, 98), (4099, 3)] {
            let ss = randomFloats(R * C, seed: UInt64(R + C)), gs = randomFloats(R * C, seed: UInt64(R + C + 1))
            let t: Float = 0.37
            let refL = ss.map { Double($0) / Double(t) }
            var tauValues: [Double] = []
            for b in try TestDevices.all() {
                let temp = try b.tensor([t], shape: [1])
                let l = try b.zeros([R, C]), dS = try b.zeros([R, C]), dT = try b.zeros([1])
                try b.scaleByTemperature(try b.tensor(ss, shape: [R, C]), temperature: temp, into: l)
                assertRelativeError(try l.floats(), refL, below: 1e-6, "temperature scale \(b.name)")
                try b.scaleByTemperatureBackward(dLogits: try b.tensor(gs, shape: [R, C]), logits: l, temperature: temp, dScores: dS, dTemperature: dT)
                assertRelativeError(try dS.floats(), gs.map { Double($0) / Double(t) }, below: 1e-6, "dScores \(b.name)")
                let refT = -RT.dot(RT.doubles(gs), RT.doubles(try l.floats())) / Double(t)
                assertRelativeError(try dT.floats(), [refT], below: 1e-5, "dTemperature \(b.name) \(R)x\(C)")
                // Deterministic reduction: bit-identical when repeated.
                let dT2 = try b.zeros([1])
                try b.scaleByTemperatureBackward(dLogits: try b.tensor(gs, shape: [R, C]), logits: l, temperature: temp, dScores: dS, dTemperature: dT2)
                XCTAssertEqual(try dT2.floats(), try dT.floats(), "dTemperature not reproducible on \(b.name)")
                tauValues.append(Double(try dT.floats()[0]))
            }
            if tauValues.count == 2 { RT.assertClose([tauValues[0]], [tauValues[1]], below: 1e-5, "dTemperature differs between backends") }
        }
    }

    func testSoftDispatchAndCombineSoftmaxes() throws {
        let (T0, S0) = (4, 3)
        let l0 = RT.doubles(randomFloats(T0 * S0, seed: 41, in: -2...2)), g0 = RT.doubles(randomFloats(T0 * S0, seed: 42))
        let fdCols = RT.numericGradient({ RT.dot(Reference.columnSoftmax($0, rows: T0, cols: S0), g0) }, at: l0)
        RT.assertClose(Reference.columnSoftmaxBackward(y: Reference.columnSoftmax(l0, rows: T0, cols: S0), dy: g0, rows: T0, cols: S0),
                    fdCols, below: 1e-7, "dispatch softmax backward vs finite differences")
        let fdRows = RT.numericGradient({ RT.dot(Reference.rowSoftmax($0, rows: T0, cols: S0), g0) }, at: l0)
        RT.assertClose(Reference.rowSoftmaxBackward(y: Reference.rowSoftmax(l0, rows: T0, cols: S0), dy: g0, rows: T0, cols: S0),
                    fdRows, below: 1e-7, "combine softmax backward vs finite differences")
        for (T, S) in [(1, 1), (37, 5), (1000, 16), (197, 294)] {
            let ls = randomFloats(T * S, seed: UInt64(T * S), in: -3...3), gs = randomFloats(T * S, seed: UInt64(T * S + 1))
            for b in try TestDevices.all() {
                let l = try b.tensor(ls, shape: [T, S]), g = try b.tensor(gs, shape: [T, S])
                let d = try b.zeros([T, S]), c = try b.zeros([T, S]), dd = try b.zeros([T, S]), dc = try b.zeros([T, S])
                try b.softmaxOverTokens(l, into: d)
                try b.softmaxOverSlots(l, into: c)
                let refD = Reference.columnSoftmax(RT.doubles(ls), rows: T, cols: S), refC = Reference.rowSoftmax(RT.doubles(ls), rows: T, cols: S)
                assertRelativeError(try d.floats(), refD, below: 1e-5, "dispatch softmax \(b.name) \(T)x\(S)")
                assertRelativeError(try c.floats(), refC, below: 1e-5, "combine softmax \(b.name) \(T)x\(S)")
                try b.softmaxOverTokensBackward(weights: d, dWeights: g, dLogits: dd)
                try b.softmaxOverSlotsBackward(weights: c, dWeights: g, dLogits: dc)
                assertRelativeError(try dd.floats(), Reference.columnSoftmaxBackward(y: refD, dy: RT.doubles(gs), rows: T, cols: S), below: 1e-5,
                                    "dispatch softmax backward \(b.name) \(T)x\(S)")
                assertRelativeError(try dc.floats(), Reference.rowSoftmaxBackward(y: refC, dy: RT.doubles(gs), rows: T, cols: S), below: 1e-5,
                                    "combine softmax backward \(b.name) \(T)x\(S)")
            }
        }
    }

    /// Every routing and permute kernel once on tiny shapes, as one pipeline
    /// (gate -> plan -> permute -> combine and back), against the references.
    /// Small enough to run under oclgrind: `--filter RoutingTests.testTinyPipeline`.
    func testTinyPipelineOnEveryKernel() throws {
        let (T, E, k, h) = (5, 3, 2, 6)
        let logits = randomFloats(T * E, seed: 1, in: -2...2), x = randomFloats(T * h, seed: 2), g = randomFloats(T * h, seed: 3)
        let c = GateConfig(k: k, renormalize: true, jitter: GateJitter(epsilon: 0.05, seed: 4))
        let ref = Reference.gate(logits: RT.doubles(logits), tokens: T, experts: E, config: c)
        for policy in DropPolicy.allCases {
            let config = DispatchConfig(experts: E, capacity: .fixed(3), dropPolicy: policy)
            for b in try TestDevices.all() {
                let out = try b.gate(logits: try b.tensor(logits, shape: [T, E]), config: c)
                XCTAssertEqual(try out.expertIndex.ints(), ref.expertIndex, b.name)
                let plan = try b.dispatchPlan(expertIndex: out.expertIndex, gateWeight: out.gateWeight, config: config)
                let refPlan = Reference.dispatchPlan(expertIndex: ref.expertIndex, gateWeight: ref.gateWeight, tokens: T, k: k, config: config)
                XCTAssertEqual(try plan.destination.ints(), refPlan.destination, "\(b.name) \(policy)")
                XCTAssertEqual(try plan.sourceOfRow.ints(), refPlan.sourceOfRow, "\(b.name) \(policy)")
                XCTAssertEqual(try plan.offsets.ints(), refPlan.offsets, "\(b.name) \(policy)")
                let xp = try b.zeros([plan.maxRows, h]), y = try b.zeros([T, h])
                try b.permute(try b.tensor(x, shape: [T, h]), plan: plan, into: xp)
                try b.combine(xp, weights: out.gateWeight, plan: plan, into: y)
                let xpRef = Reference.permute(x: RT.doubles(x), hidden: h, plan: refPlan, slots: k, rows: plan.maxRows)
                assertRelativeError(try y.floats(), Reference.combine(yp: xpRef, weights: ref.gateWeight, hidden: h, plan: refPlan, tokens: T, slots: k),
                                    below: 1e-5, "pipeline output \(b.name) \(policy)")
                let dyp = try b.zeros([plan.maxRows, h]), dw = try b.zeros([T, k]), dx = try b.zeros([T, h])
                try b.combineBackward(dOut: try b.tensor(g, shape: [T, h]), yp: xp, weights: out.gateWeight, plan: plan, dYp: dyp, dWeights: dw)
                try b.unpermute(dyp, plan: plan, into: dx)
                let back = Reference.combineBackward(dOut: RT.doubles(g), yp: xpRef, weights: ref.gateWeight, hidden: h, plan: refPlan,
                                                     tokens: T, slots: k, rows: plan.maxRows)
                assertRelativeError(try dx.floats(), Reference.combine(yp: back.dYp, weights: nil, hidden: h, plan: refPlan, tokens: T, slots: k),
                                    below: 1e-5, "pipeline dX \(b.name) \(policy)")
                assertRelativeError(try dw.floats(), back.dWeights, below: 1e-5, "pipeline dWeights \(b.name)")
                let loss = try b.zeros([1]), dProbs = try b.zeros([T, E])
                try b.loadBalancingLoss(probs: out.probs, expertIndex: out.expertIndex, coefficient: 1, loss: loss, dProbs: dProbs)
                let dLogits = try b.gateBackward(config: c, gate: out, dGateWeight: dw, dProbs: dProbs)
                try b.zLoss(logits: try b.tensor(logits, shape: [T, E]), coefficient: 1, loss: loss, dLogits: dLogits, accumulate: true)
                let lb = Reference.loadBalancingLoss(probs: ref.probs, expertIndex: ref.expertIndex, tokens: T, experts: E, k: k)
                let z = Reference.zLoss(logits: RT.doubles(logits), tokens: T, experts: E)
                let refDL = Reference.gateBackward(config: c, tokens: T, experts: E, expertIndex: ref.expertIndex, gateWeight: ref.gateWeight,
                                                   probs: ref.probs, dGateWeight: back.dWeights, dProbs: lb.dProbs)
                assertRelativeError(try dLogits.floats(), zip(refDL, z.dLogits).map { $0 + $1 }, below: 1e-5, "pipeline dLogits \(b.name)")
                assertRelativeError(try loss.floats(), [z.loss], below: 1e-5, "pipeline z-loss \(b.name)")
                // Expert choice and the Soft-MoE pieces on the same tiny shapes.
                let (ecPlan, cw) = try b.expertChoice(probs: out.probs, capacity: 2)
                let ecRef = Reference.expertChoice(probs: RT.doubles(try out.probs.floats()), tokens: T, experts: E, capacity: 2)
                XCTAssertEqual(try ecPlan.destination.ints(), ecRef.plan.destination, b.name)
                XCTAssertEqual(try cw.floats().map(Double.init), ecRef.combineWeight, b.name)
                let dl2 = try b.zeros([T, E])
                try b.expertChoiceBackward(probs: out.probs, destination: ecPlan.destination, dCombineWeight: try b.tensor(randomFloats(T * E, seed: 5), shape: [T, E]), dLogits: dl2)
                let xn = try b.zeros([T, h]), dxn = try b.zeros([T, h])
                try b.l2NormalizeRows(try b.tensor(x, shape: [T, h]), into: xn, epsilon: 1e-6)
                try b.l2NormalizeRowsBackward(x: try b.tensor(x, shape: [T, h]), dY: try b.tensor(g, shape: [T, h]), dX: dxn, epsilon: 1e-6)
                assertRelativeError(try xn.floats(), Reference.l2NormalizeRows(RT.doubles(x), rows: T, cols: h, epsilon: 1e-6), below: 1e-5, b.name)
                let tau = try b.tensor([0.5], shape: [1]), lt = try b.zeros([T, h]), ds = try b.zeros([T, h]), dt = try b.zeros([1])
                try b.scaleByTemperature(xn, temperature: tau, into: lt)
                try b.scaleByTemperatureBackward(dLogits: try b.tensor(g, shape: [T, h]), logits: lt, temperature: tau, dScores: ds, dTemperature: dt)
                let sw = try b.zeros([T, h]), dsw = try b.zeros([T, h])
                try b.softmaxOverTokens(lt, into: sw)
                try b.softmaxOverTokensBackward(weights: sw, dWeights: try b.tensor(g, shape: [T, h]), dLogits: dsw)
                try b.softmaxOverSlots(lt, into: sw)
                try b.softmaxOverSlotsBackward(weights: sw, dWeights: try b.tensor(g, shape: [T, h]), dLogits: dsw)
                let ltRef = Reference.l2NormalizeRows(RT.doubles(x), rows: T, cols: h, epsilon: 1e-6).map { $0 / 0.5 }
                assertRelativeError(try dt.floats(), [-RT.dot(RT.doubles(g), ltRef) / 0.5], below: 1e-5, "pipeline dTemperature \(b.name)")
                assertRelativeError(try dsw.floats(), Reference.rowSoftmaxBackward(y: Reference.rowSoftmax(ltRef, rows: T, cols: h), dy: RT.doubles(g), rows: T, cols: h),
                                    below: 1e-5, "pipeline combine softmax backward \(b.name)")
            }
        }
    }

    /// The composed cosine-logit op and its backward (x, queries, temperature)
    /// against finite differences of the float64 composition.
    func testCosineLogitsAndGradients() throws {
        let (T, S, D) = (7, 3, 5)
        let xs = randomFloats(T * D, seed: 61), qs = randomFloats(S * D, seed: 62), gs = randomFloats(T * S, seed: 63)
        let tau = 0.7
        func logits(_ x: [Double], _ q: [Double], _ t: Double) -> [Double] {
            let xn = Reference.l2NormalizeRows(x, rows: T, cols: D, epsilon: 1e-6)
            let qn = Reference.l2NormalizeRows(q, rows: S, cols: D, epsilon: 1e-6)
            return (0..<T * S).map { i in (0..<D).reduce(0.0) { $0 + xn[(i / S) * D + $1] * qn[(i % S) * D + $1] } / t }
        }
        let (x, q, g) = (RT.doubles(xs), RT.doubles(qs), RT.doubles(gs))
        let fdX = RT.numericGradient({ RT.dot(logits($0, q, tau), g) }, at: x)
        let fdQ = RT.numericGradient({ RT.dot(logits(x, $0, tau), g) }, at: q)
        let fdT = RT.numericGradient({ RT.dot(logits(x, q, $0[0]), g) }, at: [tau])
        for b in try TestDevices.all() {
            let tx = try b.tensor(xs, shape: [T, D]), tq = try b.tensor(qs, shape: [S, D]), tt = try b.tensor([Float(tau)], shape: [1])
            let f = try b.cosineLogits(x: tx, queries: tq, temperature: tt)
            assertRelativeError(try f.logits.floats(), logits(x, q, Double(Float(tau))), below: 1e-5, "cosine logits \(b.name)")
            let d = try b.cosineLogitsBackward(x: tx, queries: tq, temperature: tt, forward: f, dLogits: try b.tensor(gs, shape: [T, S]))
            assertRelativeError(try d.dX.floats(), fdX, below: 1e-4, "cosine dX \(b.name)")
            assertRelativeError(try d.dQueries.floats(), fdQ, below: 1e-4, "cosine dQueries \(b.name)")
            assertRelativeError(try d.dTemperature.floats(), fdT, below: 1e-4, "cosine dTemperature \(b.name)")
        }
    }

    /// Other work-group sizes for the selection scans and the reductions, and the
    /// GPU row shape in the pipeline, on the CI's CPU OpenCL device.
    func testOpenCLWorkGroupShapesMatchReference() throws {
        _ = try TestDevices.openCLOrSkip()
        for g in [1, 64] {
            OpenCLBackend.workGroupOverride = g
            defer { OpenCLBackend.workGroupOverride = nil }
            try testExpertChoiceMatchesReference()
            try testZLossValueAndGradient()
            try testLoadBalancingLossAndGradientThroughTheGate()
            try testTemperatureScaleAndGradient()
            try testTinyPipelineOnEveryKernel()
        }
    }

    func testShapeErrorsThrow() throws {
        for b in try TestDevices.all() {
            let l = try b.zeros([4, 3])
            XCTAssertThrowsError(try b.gate(logits: l, config: GateConfig(k: 4)), "k > E on \(b.name)")
            XCTAssertThrowsError(try b.gate(logits: l, config: GateConfig(k: 1), expertIndex: try b.zeros([4, 1]),
                                            gateWeight: try b.zeros([4, 1]), probs: try b.zeros([4, 3])), "f32 indices on \(b.name)")
            XCTAssertThrowsError(try b.scaleByTemperature(l, temperature: try b.zeros([2]), into: l), b.name)
        }
    }
}
