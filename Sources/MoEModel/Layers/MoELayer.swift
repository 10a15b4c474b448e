import Foundation
import MoECompute

/// Sparse MoE layer with a linear router: top-k token choice (Switch, Mixtral,
/// Sparse Upcycling's decoder) or expert choice (Sparse Upcycling's vision and
/// encoder models). Router -> gate -> dispatch plan -> permute -> grouped-GEMM
/// experts -> gather-form combine, with the load-balancing and z-losses.
final class MoELayer: FeedForward, RoutedLayer {
    enum Routing {
        case topK(gate: GateConfig, dispatch: DispatchConfig)
        /// Each expert takes `ceil(capacityFactor * T / E)` of the batch's tokens.
        case expertChoice(capacityFactor: Double)
    }

    let router: Linear
    let experts: ExpertBank
    let routing: Routing
    let auxCoefficient: Float, zCoefficient: Float
    let ws: Workspace
    /// Backward temporaries (shared by the model's layers when it passes one).
    let scratch: Workspace
    let layerSeed: UInt64
    /// The unweighted losses the last backward computed, for the step's metrics.
    private let auxLoss: Tensor, zLoss: Tensor
    /// Dispatch plans by token count (training and evaluation batches), built once.
    private var plans: [Int: DispatchPlan] = [:]
    /// Expert parallelism: where the rows meet their experts' ranks (nil: all experts here).
    let exchange: ExpertExchange?

    init(_ store: ParameterStore, _ name: String, width: Int, hidden: Int, experts e: Int, routing: Routing,
         auxCoefficient: Float, zCoefficient: Float, experts style: ExpertStyle, dropout: Float,
         routerInit: Initializer = .normal(std: 0.02), routerName: String = "router", expertsName: String = "experts",
         scratch: Workspace? = nil) throws {
        router = try Linear(store, "\(name).\(routerName)", in: width, out: e, bias: false)
        if case .zeros = routerInit { try store.backend.fill(router.weight.value, value: 0) }
        // Expert parallelism: this rank holds and runs only its share of the experts.
        let group = Distributed.expertGroup, share = e / max(group.size, 1)
        let held = Distributed.expertParallel > 1 && e % group.size == 0 ? (group.rank * share)..<((group.rank + 1) * share) : nil
        experts = try ExpertBank(store, "\(name).\(expertsName)", experts: e, width: width, hidden: hidden,
                                 style: style, dropout: dropout, range: name, scratch: scratch, held: held)
        self.routing = routing
        self.auxCoefficient = auxCoefficient; self.zCoefficient = zCoefficient
        ws = Workspace(backend: store.backend)
        self.scratch = scratch ?? ws
        exchange = Distributed.expertParallel > 1
            ? try ExpertExchange(comm: Distributed.expertGroup, experts: e, width: width, backend: store.backend) : nil
        auxLoss = try store.backend.zeros([1])
        zLoss = try store.backend.zeros([1])
        var h: UInt64 = 0
        for c in name.utf8 { h = h &* 31 &+ UInt64(c) }
        layerSeed = h
    }

    // State of the last forward, read by backward and by the metrics.
    private var plan: DispatchPlan?
    private var rowsCapacity = 0
    private var gate: (expertIndex: Tensor, gateWeight: Tensor)?
    private var combineWeight: Tensor?
    private var probs: Tensor?
    private var gateConfig: GateConfig?

    func forward(_ x: Tensor, batch: Int, tokens: Int, into out: Tensor, training: Bool, step: Int) throws {
        let b = x.backend, t = batch * tokens, e = experts.totalExperts
        let logits = try ws.get("logits", [t, e])
        try router.forward(x, rows: t, into: logits)
        let weights: Tensor
        switch routing {
        case .topK(var config, let dispatch):
            // Jitter only while training, with a new draw every step and layer.
            if var j = config.jitter {
                if training { j.seed = UInt32(truncatingIfNeeded: layerSeed &+ UInt64(step) &* 0x9E37_79B9); config.jitter = j }
                else { config.jitter = nil }
            }
            gateConfig = config
            let idx = try ws.get("idx", [t, config.k], dtype: .i32), w = try ws.get("w", [t, config.k])
            let pr = try ws.get("probs", [t, e])
            try b.gate(logits: logits, config: config, expertIndex: idx, gateWeight: w, probs: pr)
            let p = try plans[t] ?? DispatchPlan.topK(on: b, tokens: t, k: config.k, config: dispatch)
            plans[t] = p
            try b.dispatchPlan(expertIndex: idx, gateWeight: w, config: dispatch, into: p)
            gate = (idx, w); plan = p; probs = pr
            weights = w
        case .expertChoice(let factor):
            let pr = try ws.get("probs", [t, e])
            try b.routerProbs(logits: logits, probs: pr)
            let c = ExpertChoice.capacity(tokens: t, experts: e, factor: factor)
            let p = try plans[t] ?? DispatchPlan.expertChoice(on: b, tokens: t, experts: e, capacity: c)
            plans[t] = p
            let w = try ws.get("ecw", [t, e])
            try b.expertChoice(probs: pr, plan: p, combineWeight: w)
            plan = p; probs = pr; combineWeight = w
            weights = w
        }
        guard let plan else { return }
        rowsCapacity = max(plan.maxRows, 1)
        let xp = try ws.get("xp", [rowsCapacity, experts.width]), yp = try ws.get("yp", [rowsCapacity, experts.width])
        try b.permute(x, plan: plan, into: xp)
        let seed = layerSeed ^ (UInt64(step) &* 0x2545_F491_4F6C_DD1D)
        if let exchange {
            try exchange.forward(xp: xp, yp: yp, plan: plan, bank: experts, training: training, seed: seed)
        } else {
            try experts.forward(xp, offsets: plan.offsets, rows: rowsCapacity, into: yp, training: training, seed: seed)
        }
        try b.combine(yp, weights: weights, plan: plan, into: out)
    }

    func backward(dOut: Tensor, x: Tensor, batch: Int, tokens: Int, dX: Tensor, lossScale: Float) throws {
        guard let plan, let probs else { throw ShapeError("MoE backward called before forward") }
        let b = dOut.backend, t = batch * tokens, e = experts.totalExperts, r = rowsCapacity
        let xp = try ws.get("xp", [r, experts.width]), yp = try ws.get("yp", [r, experts.width])
        let dYp = try scratch.get("moe.dYp", [r, experts.width]), dXp = try scratch.get("moe.dXp", [r, experts.width])
        let logits = try ws.get("logits", [t, e]), dLogits = try scratch.get("moe.dLogits", [t, e])
        switch routing {
        case .topK:
            guard let gate, let config = gateConfig else { return }
            let dW = try scratch.get("moe.dW", [t, config.k])
            try b.combineBackward(dOut: dOut, yp: yp, weights: gate.gateWeight, plan: plan, dYp: dYp, dWeights: dW)
            var dProbs: Tensor?
            if auxCoefficient > 0 {
                let d = try scratch.get("moe.dProbsAux", [t, e])
                try b.loadBalancingLoss(probs: probs, expertIndex: gate.expertIndex, coefficient: auxCoefficient * lossScale,
                                        loss: auxLoss, dProbs: d)
                dProbs = d
            }
            try b.gateBackward(config: config, expertIndex: gate.expertIndex, gateWeight: gate.gateWeight, probs: probs,
                               dGateWeight: dW, dProbs: dProbs, dLogits: dLogits)
        case .expertChoice:
            guard let w = combineWeight else { return }
            let dW = try scratch.get("moe.dW", [t, e])
            try b.combineBackward(dOut: dOut, yp: yp, weights: w, plan: plan, dYp: dYp, dWeights: dW)
            try b.expertChoiceBackward(probs: probs, destination: plan.destination, dCombineWeight: dW, dLogits: dLogits)
        }
        if zCoefficient > 0 {
            try b.zLoss(logits: logits, coefficient: zCoefficient * lossScale, loss: zLoss, dLogits: dLogits, accumulate: true)
        }
        if let exchange {
            try exchange.backward(dYp: dYp, dXp: dXp, bank: experts)
        } else {
            try experts.backward(dYp: dYp, xp: xp, offsets: plan.offsets, rows: r, dXp: dXp)
        }
        try b.unpermute(dXp, plan: plan, into: dX)
        try router.backward(dY: dLogits, x: x, rows: t, dX: dX, accumulateDX: true)
    }

    func auxiliaryLosses() throws -> [String: Float] {
        guard let probs, let plan else { return [:] }
        let b = probs.backend
        var out: [String: Float] = [:]
        if case .topK = routing, let gate, auxCoefficient > 0 {
            let loss = try ws.get("auxLossValue", [1])
            try b.loadBalancingLoss(probs: probs, expertIndex: gate.expertIndex, coefficient: auxCoefficient, loss: loss, dProbs: nil)
            out["aux_loss"] = auxCoefficient * (try loss.floats()[0])
        }
        if zCoefficient > 0 {
            let loss = try ws.get("zLossValue", [1])
            try b.zLoss(logits: try ws.get("logits", [plan.tokens, experts.totalExperts]), coefficient: zCoefficient, loss: loss,
                        dLogits: nil, accumulate: false)
            out["z_loss"] = zCoefficient * (try loss.floats()[0])
        }
        return out
    }


    var auxiliaryLossTensors: [(name: String, value: Tensor, coefficient: Float)] {
        var out: [(name: String, value: Tensor, coefficient: Float)] = []
        if case .topK = routing, auxCoefficient > 0 { out.append(("aux_loss", auxLoss, auxCoefficient)) }
        if zCoefficient > 0 { out.append(("z_loss", zLoss, zCoefficient)) }
        return out
    }

    var expertCounts: Tensor? { plan?.counts }
    var loadCount: Int { experts.totalExperts }
}
