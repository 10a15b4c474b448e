import Foundation
import MoECompute
@testable import MoEModel
import XCTest
import MoETestSupport

/// A tiny ViT for gradient and parity checks: 8x8 images, 4x4 patches.
func tinyConfig(router: String?) -> ViTConfig {
    var c = ViTConfig()
    c.imageSize = 8; c.patchSize = 4; c.width = 8; c.depth = 2; c.heads = 2; c.mlpRatio = 2; c.classes = 3
    if let router {
        var m = MoEConfig()
        m.router = router; m.experts = 3; m.topK = 2; m.slotsPerExpert = 2; m.coreExperts = 1
        m.universalWidthRatio = 0.5; m.auxLossCoefficient = 0.01; m.zLossCoefficient = 0.001
        m.capacityFactor = router == "expert-choice" ? 2 : nil
        c.moeBlocks = [1]; c.moe = m
    }
    return c
}

func tinyBatch(_ backend: Backend, _ c: ViTConfig, batch: Int, seed: UInt64) throws -> (Tensor, Tensor) {
    var rng = SplitMix64(seed: seed)
    // ViT token inputs: with a class token, row 0 of each image is the (zero) class-token slot.
    let patches = (0..<(batch * c.tokens * c.patchDim)).map { i -> Float in
        let v = rng.nextFloat(in: -1...1)
        return c.pool == "cls" && (i / c.patchDim) % c.tokens == 0 ? 0 : v
    }
    let labels = (0..<batch).map { _ in Int32(rng.next() % UInt64(c.classes)) }
    return (try backend.tensor(patches, shape: [batch, c.tokens, c.patchDim]), try backend.tensor(ints: labels, shape: [batch]))
}

/// Total loss (cross-entropy + weighted auxiliary losses) and, optionally, the gradients.
func lossAndGradients(_ model: ViT, _ patches: Tensor, _ labels: Tensor, backward: Bool) throws -> Float {
    let b = model.backend, batch = labels.count
    let logits = try model.forward(patches: patches, training: false, step: 1)
    let rowLoss = try b.zeros([batch]), mean = try b.zeros([1]), dLogits = try b.zeros(logits.shape)
    try b.crossEntropy(logits: logits, labels: labels, labelSmoothing: 0.1, rowLoss: rowLoss, meanLoss: mean,
                       dLogits: dLogits, gradientScale: 1)
    let aux = try model.routingStats().aux.values.reduce(0, +)
    if backward {
        try model.params.zeroGradients()
        try model.backward(dLogits: dLogits, patches: patches)
    }
    return try mean.floats()[0] + aux
}

final class GradientCheckTests: XCTestCase {
    /// Directional derivative along a random direction against central finite
    /// differences of the whole model's loss (f32 model, so a 2% bound).
    func checkGradients(router: String?, pool: String = "mean", backend: Backend = CPUBackend()) throws {
        var c = tinyConfig(router: router)
        c.pool = pool
        let model = try ViT(config: c, backend: backend, seed: 11)
        // Routing is piecewise: spread the router logits so that no token sits at
        // a near-tie that the finite-difference step could flip.
        for p in model.params.all where p.name.hasSuffix("moe.router.weight") && (router == "topk" || router == "expert-choice") {
            try backend.scale(p.value, by: 50)
        }
        let (patches, labels) = try tinyBatch(backend, c, batch: 5, seed: 3)
        _ = try lossAndGradients(model, patches, labels, backward: true)
        // Per parameter tensor: the directional derivative along a random direction
        // against central differences (Richardson-extrapolated from eps and eps/2).
        // The bound is relative with an absolute floor for f32 round-off in the loss.
        var rng = SplitMix64(seed: 99)
        var worst = 0.0, checked = 0
        for p in model.params.all {
            let g = try p.grad!.floats(), original = try p.value.floats()
            let v = (0..<p.count).map { _ in rng.nextFloat(in: -1...1) }
            let analytic = zip(g, v).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
            func loss(_ eps: Float) throws -> Double {
                try p.value.write(zip(original, v).map { $0 + eps * $1 })
                return Double(try lossAndGradients(model, patches, labels, backward: false))
            }
            // Small enough that no routing decision flips inside [-eps, eps].
            let eps: Float = 1e-3
            let coarse = (try loss(eps) - loss(-eps)) / Double(2 * eps)
            let fine = (try loss(eps / 2) - loss(-eps / 2)) / Double(eps)
            let numeric = (4 * fine - coarse) / 3
            try p.value.write(original)
            let excess = abs(numeric - analytic) / (2e-2 * abs(numeric) + 6e-4)
            worst = max(worst, excess)
            checked += 1
            XCTAssertLessThan(excess, 1, "\(router ?? "dense") \(pool) \(p.name): analytic \(analytic) vs finite difference \(numeric)")
        }
        XCTAssertEqual(checked, model.params.all.count)
    }

    func testDenseGradients() throws { try checkGradients(router: nil) }
    func testDenseClassTokenGradients() throws { try checkGradients(router: nil, pool: "cls") }
    func testTopKGradients() throws { try checkGradients(router: "topk") }
    func testExpertChoiceGradients() throws { try checkGradients(router: "expert-choice") }
    func testSoftMoEGradients() throws { try checkGradients(router: "soft") }
    func testSpheroMoEGradients() throws { try checkGradients(router: "sphero") }
    func testSpheroMoEGradientsOnOpenCL() throws { try checkGradients(router: "sphero", backend: try TestBackends.openCLOrSkip()) }
    func testTopKGradientsOnOpenCL() throws { try checkGradients(router: "topk", backend: try TestBackends.openCLOrSkip()) }
}

final class UpcyclingTests: XCTestCase {
    /// Sparse Upcycling's invariant: identical experts with combine weights that sum
    /// to 1 and no drops compute the dense MLP, so the whole model's logits match.
    func testReplicateTopKEqualsTheDenseModel() throws {
        let b = CPUBackend()
        let dense = try ViT(config: tinyConfig(router: nil), backend: b, seed: 5)
        var c = tinyConfig(router: "topk")
        c.moe!.renormalize = true
        let moe = try ViT(config: c, backend: b, seed: 6)
        try OnlineUpcycle.apply(dense: dense, into: moe, method: .replicate, calibration: nil, seed: 1)
        let (patches, _) = try tinyBatch(b, c, batch: 4, seed: 8)
        let d = try dense.forward(patches: patches, training: false, step: 0).floats()
        let m = try moe.forward(patches: patches, training: false, step: 0).floats()
        XCTAssertLessThan(Reference.relativeError(m.map(Double.init), d.map(Double.init)), 1e-5)
    }

    func testRecycleSamplesDistinctNeuronsDeterministically() throws {
        let b = CPUBackend()
        let dense = try ViT(config: tinyConfig(router: nil), backend: b, seed: 5)
        var c = tinyConfig(router: "sphero")
        c.moe!.expertWidthRatio = 0.75
        let (patches, _) = try tinyBatch(b, c, batch: 4, seed: 8)
        var outputs: [[Float]] = []
        for _ in 0..<2 {
            let moe = try ViT(config: c, backend: b, seed: 6)
            let log = try OnlineUpcycle.apply(dense: dense, into: moe, method: .recycle, calibration: patches, seed: 1)
            XCTAssertEqual(log.count, 1)
            let layer = try XCTUnwrap(moe.blocks[1].ffn as? SoftMoELayer)
            // Each expert's fc1 rows are distinct rows of the dense fc1 (sampling without replacement).
            let bank = try XCTUnwrap(layer.core)
            let w = try bank.w1.value.floats(), dw = try (dense.blocks[1].ffn as! DenseMLP).fc1.weight.value.floats()
            let width = c.width, rows = (0..<bank.hidden).map { Array(w[($0 * width)..<(($0 + 1) * width)]) }
            XCTAssertEqual(Set(rows.map { $0.description }).count, bank.hidden)
            for r in rows { XCTAssertTrue((0..<(dw.count / width)).contains { Array(dw[($0 * width)..<(($0 + 1) * width)]) == r }) }
            outputs.append(try moe.forward(patches: patches, training: false, step: 0).floats())
        }
        XCTAssertEqual(outputs[0], outputs[1], "same seed, same experts")
    }
}
