import Foundation
import MoECompute

/// Soft MoE (dot-product routing) and MoE Jetpack's SpheroMoE (cosine routing
/// with learnable dispatch/combine temperatures, core + universal experts).
/// Per image: every slot is a softmax-over-tokens mix of all tokens, each
/// expert processes its slots, and every token is a softmax-over-slots mix of
/// the slot outputs. Dense GEMMs throughout; nothing is dropped.
final class SoftMoELayer: FeedForward {
    let spherical: Bool
    let queries: Parameter              // phi [S, D], one query per slot
    let tauDispatch: Parameter?, tauCombine: Parameter?
    let core: ExpertBank?, universal: ExpertBank?
    let slots: Int, slotsPerExpert: Int, coreExperts: Int, width: Int
    let noiseStd: Float
    let ws: Workspace
    let layerSeed: UInt64

    init(_ store: ParameterStore, _ name: String, width: Int, hidden: Int, tokens: Int, config c: MoEConfig) throws {
        spherical = c.router == "sphero"
        self.width = width
        slotsPerExpert = c.slotsPerExpert
        slots = c.experts * c.slotsPerExpert
        // SpheroMoE: a third core experts by default; Soft MoE: all experts alike.
        coreExperts = spherical ? (c.coreExperts > 0 ? c.coreExperts : max(1, c.experts / 3)) : c.experts
        queries = try store.make("\(name).router.weight", [slots, width], spherical ? .orthogonal : .normal(std: 1 / Float(width).squareRoot()),
                                 decays: false)
        if spherical {
            tauDispatch = try store.make("\(name).temperature_dispatch", [1], .constant(c.temperatureInit), decays: false)
            tauCombine = try store.make("\(name).temperature_combine", [1], .constant(c.temperatureInit), decays: false)
        } else {
            tauDispatch = nil; tauCombine = nil
        }
        let universalHidden = max(1, Int((Double(hidden) * c.universalWidthRatio).rounded()))
        core = coreExperts > 0 ? try ExpertBank(store, "\(name).core_experts", experts: coreExperts, width: width, hidden: hidden,
                                                style: .mlp(.geluErf), dropout: c.dropout, range: name) : nil
        let u = c.experts - coreExperts
        universal = u > 0 ? try ExpertBank(store, "\(name).universal_experts", experts: u, width: width, hidden: universalHidden,
                                           style: .mlp(.geluErf), dropout: c.dropout, range: name) : nil
        noiseStd = spherical ? (c.logitNoise ?? 1 / Float(slots)) : (c.logitNoise ?? 0)
        ws = Workspace(backend: store.backend)
        var h: UInt64 = 0
        for ch in name.utf8 { h = h &* 31 &+ UInt64(ch) }
        layerSeed = h
    }

    private var bankLayouts: [Int: [(ExpertBank, rowStart: Int, rows: Int, offsets: Tensor)]] = [:]

    /// Slot-major rows owned by each bank, and their offsets: constant per batch
    /// size, so uploaded once.
    private func banks(batch: Int) throws -> [(ExpertBank, rowStart: Int, rows: Int, offsets: Tensor)] {
        if let layout = bankLayouts[batch] { return layout }
        var out: [(ExpertBank, rowStart: Int, rows: Int, offsets: Tensor)] = []
        var start = 0
        for (i, bank) in [core, universal].enumerated() {
            guard let bank else { continue }
            let per = slotsPerExpert * batch
            // Per batch size: the training and the evaluation batch each keep their own.
            let offsets = try ws.get("offsets\(i)-batch\(batch)", [bank.experts + 1], dtype: .i32)
            try offsets.write((0...bank.experts).map { Int32($0 * per) })
            out.append((bank, start, bank.experts * per, offsets))
            start += bank.experts * per
        }
        bankLayouts[batch] = out
        return out
    }

    func forward(_ x: Tensor, batch: Int, tokens: Int, into out: Tensor, training: Bool, step: Int) throws {
        let b = x.backend, rows = batch * tokens, s = slots, d = width
        // Keys and queries: unit rows for cosine routing, raw for dot-product.
        let keys = try ws.get("keys", [rows, d]), q = try ws.get("q", [s, d])
        if spherical {
            try b.l2NormalizeRows(x, into: keys, epsilon: 1e-6)
            try b.l2NormalizeRows(queries.value, into: q, epsilon: 1e-6)
        } else {
            try b.copy(x, to: keys); try b.copy(queries.value, to: q)
        }
        let scores = try ws.get("scores", [rows, s])
        try b.gemm(Gemm(m: rows, n: s, k: d, transB: true), keys, q, scores)
        if training && noiseStd > 0 {
            // Drawn on the device from a counter hash of (layer, step): nothing uploaded.
            try b.addGaussianNoise(scores, std: noiseStd, seed: layerSeed ^ (UInt64(step) &* 0x9E37_79B9_7F4A_7C15))
        }
        let ld = try ws.get("logitsDispatch", [rows, s]), lc = try ws.get("logitsCombine", [rows, s])
        if let tauDispatch, let tauCombine {
            try b.scaleByTemperature(scores, temperature: tauDispatch.value, into: ld)
            try b.scaleByTemperature(scores, temperature: tauCombine.value, into: lc)
        } else {
            try b.copy(scores, to: ld); try b.copy(scores, to: lc)
        }
        // Dispatch: softmax over each image's tokens, i.e. rows of [B, S, T].
        let dispatch = try ws.get("dispatch", [batch, s, tokens])
        try b.transposeAxes(try ld.reshaped([batch, tokens, s]), permutation: [0, 2, 1], out: dispatch)
        try b.softmax(dispatch, out: dispatch)
        let combine = try ws.get("combine", [rows, s])
        try b.softmax(lc, out: combine)
        // Slots = D X per image, regrouped slot-major so each expert's rows are contiguous.
        let slotIn = try ws.get("slotIn", [batch, s, d])
        try b.gemm(Gemm(m: s, n: d, k: tokens, batch: batch), dispatch, x, slotIn)
        let xs = try ws.get("xs", [s, batch, d]), ys = try ws.get("ys", [s, batch, d])
        try b.transposeAxes(slotIn, permutation: [1, 0, 2], out: xs)
        for (i, (bank, start, n, offsets)) in try banks(batch: batch).enumerated() {
            try bank.forward(try xs.view(offset: start * d, shape: [n, d]), offsets: offsets, rows: n,
                             into: try ys.view(offset: start * d, shape: [n, d]), training: training,
                             seed: layerSeed &+ UInt64(step * 2 + i))
        }
        let slotOut = try ws.get("slotOut", [batch, s, d])
        try b.transposeAxes(ys, permutation: [1, 0, 2], out: slotOut)
        try b.gemm(Gemm(m: tokens, n: d, k: s, batch: batch), combine, slotOut, out)
    }

    func backward(dOut: Tensor, x: Tensor, batch: Int, tokens: Int, dX: Tensor, lossScale: Float) throws {
        let b = dOut.backend, rows = batch * tokens, s = slots, d = width
        let combine = try ws.get("combine", [rows, s]), dispatch = try ws.get("dispatch", [batch, s, tokens])
        let slotOut = try ws.get("slotOut", [batch, s, d])
        // out = C Y: dC = dOut Y^T, dY = C^T dOut.
        let dCombine = try ws.get("dCombine", [rows, s]), dSlotOut = try ws.get("dSlotOut", [batch, s, d])
        try b.gemm(Gemm(m: tokens, n: s, k: d, transB: true, batch: batch), dOut, slotOut, dCombine)
        try b.gemm(Gemm(m: s, n: d, k: tokens, transA: true, batch: batch), combine, dOut, dSlotOut)
        let dys = try ws.get("dys", [s, batch, d]), dxs = try ws.get("dxs", [s, batch, d])
        try b.transposeAxes(dSlotOut, permutation: [1, 0, 2], out: dys)
        let xs = try ws.get("xs", [s, batch, d])
        for (bank, start, n, offsets) in try banks(batch: batch) {
            try bank.backward(dYp: try dys.view(offset: start * d, shape: [n, d]), xp: try xs.view(offset: start * d, shape: [n, d]),
                              offsets: offsets, rows: n, dXp: try dxs.view(offset: start * d, shape: [n, d]))
        }
        let dSlotIn = try ws.get("dSlotIn", [batch, s, d])
        try b.transposeAxes(dxs, permutation: [1, 0, 2], out: dSlotIn)
        // slots = D X: dD = dSlots X^T, dX += D^T dSlots.
        let dDispatch = try ws.get("dDispatch", [batch, s, tokens])
        try b.gemm(Gemm(m: s, n: tokens, k: d, transB: true, batch: batch), dSlotIn, x, dDispatch)
        try b.gemm(Gemm(m: tokens, n: d, k: s, transA: true, batch: batch), dispatch, dSlotIn, dX)
        // Through the two softmaxes back to the shared scores.
        try b.softmaxBackward(dY: dDispatch, y: dispatch, dX: dDispatch, scale: 1, accumulate: false)
        let dLd = try ws.get("dLogitsDispatch", [rows, s]), dLc = try ws.get("dLogitsCombine", [rows, s])
        try b.transposeAxes(dDispatch, permutation: [0, 2, 1], out: dLd)
        try b.softmaxBackward(dY: dCombine, y: combine, dX: dLc, scale: 1, accumulate: false)
        let dScores = try ws.get("dScores", [rows, s])
        if let tauDispatch, let tauCombine {
            let part = try ws.get("dScoresPart", [rows, s]), dTau = try ws.get("dTau", [1])
            try b.scaleByTemperatureBackward(dLogits: dLd, logits: try ws.get("logitsDispatch", [rows, s]), temperature: tauDispatch.value,
                                             dScores: dScores, dTemperature: dTau)
            try b.axpy(1, dTau, try tauDispatch.gradient())
            try b.scaleByTemperatureBackward(dLogits: dLc, logits: try ws.get("logitsCombine", [rows, s]), temperature: tauCombine.value,
                                             dScores: part, dTemperature: dTau)
            try b.axpy(1, dTau, try tauCombine.gradient())
            try b.axpy(1, part, dScores)
        } else {
            try b.add(dLd, dLc, into: dScores)
        }
        // scores = K Q^T: dK = dScores Q, dQ = dScores^T K.
        let keys = try ws.get("keys", [rows, d]), q = try ws.get("q", [s, d])
        let dKeys = try ws.get("dKeys", [rows, d]), dQ = try ws.get("dQ", [s, d])
        try b.gemm(Gemm(m: rows, n: d, k: s), dScores, q, dKeys)
        try b.gemm(Gemm(m: s, n: d, k: rows, transA: true), dScores, keys, dQ)
        if spherical {
            let dxn = try ws.get("dXNorm", [rows, d]), dqn = try ws.get("dQNorm", [s, d])
            try b.l2NormalizeRowsBackward(x: x, dY: dKeys, dX: dxn, epsilon: 1e-6)
            try b.l2NormalizeRowsBackward(x: queries.value, dY: dQ, dX: dqn, epsilon: 1e-6)
            try b.axpy(1, dxn, dX)
            try b.axpy(1, dqn, try queries.gradient())
        } else {
            try b.axpy(1, dKeys, dX)
            try b.axpy(1, dQ, try queries.gradient())
        }
    }

    func auxiliaryLosses() throws -> [String: Float] { [:] }
}
