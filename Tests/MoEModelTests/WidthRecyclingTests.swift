import Foundation
import MoECheckpoint
import MoECompute
@testable import MoEModel
import XCTest

/// MoE Jetpack's recycling from a wider predecessor, granular upcycling and
/// replicate into an all-core SpheroMoE, on tiny ViTs.
final class WidthRecyclingTests: XCTestCase {
    func wide(_ c: ViTConfig, by factor: Int) -> ViTConfig {
        var w = c
        w.width *= factor; w.moeBlocks = []; w.moe = nil
        return w
    }

    /// A plan to the source's own width keeps every channel, every head dimension
    /// and every neuron in order: recycling from a same-width model is today's recycle.
    func testSameWidthReductionIsTheIdentity() throws {
        let b = CPUBackend()
        let dense = try ViT(config: tinyConfig(router: nil), backend: b, seed: 5)
        let source = try HostTensors(dense)
        let plan = try ViTWidthReduction.plan(source: source, width: dense.config.width, heads: dense.config.heads,
                                              keepWholeMLPs: [1], seed: 3)
        XCTAssertEqual(plan.channels, Array(0..<dense.config.width))
        XCTAssertEqual(plan.queryScale, 1)
        for t in source.tensors {
            let v = try source.floats(t.name)
            let n = try plan.narrow(t.name, shape: t.shape, values: v)
            XCTAssertEqual(n.shape, t.shape, t.name)
            XCTAssertEqual(n.values, v, t.name)
        }
        // And the online path gives the same model with or without going through it.
        let (patches, _) = try tinyBatch(b, dense.config, batch: 3, seed: 8)
        var c = tinyConfig(router: "sphero"); c.moe!.expertWidthRatio = 0.5
        let a = try ViT(config: c, backend: b, seed: 6), z = try ViT(config: c, backend: b, seed: 6)
        try OnlineUpcycle.apply(dense: dense, into: a, method: .recycle, calibration: patches, seed: 2)
        try OnlineUpcycle.apply(dense: dense, into: z, method: .recycle, calibration: patches, seed: 2)
        XCTAssertEqual(try a.forward(patches: patches, training: false, step: 0).floats(),
                       try z.forward(patches: patches, training: false, step: 0).floats())
    }

    /// From a 2x-wide predecessor: shapes, the chosen channels in every tensor,
    /// heads kept with a halved head dimension, the query scale, determinism.
    func testRecycleFromATwiceWiderModel() throws {
        let b = CPUBackend()
        var c = tinyConfig(router: "sphero"); c.moe!.expertWidthRatio = 0.5
        let predecessor = try ViT(config: wide(c, by: 2), backend: b, seed: 5)
        let W = c.width, W2 = 2 * c.width, heads = c.heads
        let (patches, _) = try tinyBatch(b, c, batch: 4, seed: 8)

        // Without data: weight norms decide, and the plan can be recomputed here.
        let moe = try ViT(config: c, backend: b, seed: 6)
        let log = try OnlineUpcycle.apply(dense: predecessor, into: moe, method: .recycle, calibration: nil, seed: 2)
        XCTAssertTrue(log[0].hasPrefix("width \(W2) -> \(W)"), log[0])
        let source = try HostTensors(predecessor)
        let plan = try ViTWidthReduction.plan(source: source, width: W, heads: heads, keepWholeMLPs: Set(c.moeBlocks), seed: 2)
        XCTAssertEqual(plan.channels.count, W)
        XCTAssertEqual(Set(plan.channels).count, W)
        XCTAssertEqual(plan.channels, plan.channels.sorted())
        let pe = try source.floats("patch_embed.proj.weight"), P = c.patchDim
        let got = try moe.params["patch_embed.proj.weight"]!.value.floats()
        for (i, ch) in plan.channels.enumerated() { XCTAssertEqual(Array(got[i * P..<(i + 1) * P]), Array(pe[ch * P..<(ch + 1) * P])) }
        let head = try source.floats("head.weight"), gotHead = try moe.params["head.weight"]!.value.floats()
        for k in 0..<c.classes { for (i, ch) in plan.channels.enumerated() { XCTAssertEqual(gotHead[k * W + i], head[k * W2 + ch]) } }
        // Heads keep their count: each head's kept dimensions come from that head.
        for l in 0..<c.depth {
            let qk = try XCTUnwrap(plan.queryKeyDims[l]), v = try XCTUnwrap(plan.valueDims[l])
            XCTAssertEqual(qk.count, W); XCTAssertEqual(v.count, W)
            for h in 0..<heads {
                for d in qk[h * (W / heads)..<(h + 1) * (W / heads)] { XCTAssertEqual(d / (W2 / heads), h) }
                for d in v[h * (W / heads)..<(h + 1) * (W / heads)] { XCTAssertEqual(d / (W2 / heads), h) }
            }
        }
        XCTAssertEqual(plan.queryScale, Float(0.5).squareRoot(), accuracy: 1e-7)
        let qkv = try source.floats("blocks.0.attn.qkv.weight"), gotQKV = try moe.params["blocks.0.attn.qkv.weight"]!.value.floats()
        let q0 = plan.queryKeyDims[0]![0], k0 = plan.queryKeyDims[0]![0] + W2, v0 = plan.valueDims[0]![0] + 2 * W2
        XCTAssertEqual(gotQKV[0], qkv[q0 * W2 + plan.channels[0]] * plan.queryScale, accuracy: 1e-7)
        XCTAssertEqual(gotQKV[W * W], qkv[k0 * W2 + plan.channels[0]])
        XCTAssertEqual(gotQKV[2 * W * W], qkv[v0 * W2 + plan.channels[0]])
        // The dense block keeps the MLP ratio; the MoE block's experts sample the whole wide MLP.
        XCTAssertEqual(plan.mlpNeurons[0]?.count, c.hidden)
        XCTAssertNil(plan.mlpNeurons[1])
        let fc1 = try source.floats("blocks.1.mlp.fc1.weight")
        let bank = try XCTUnwrap((moe.blocks[1].ffn as? SoftMoELayer)?.core)
        let w1 = try bank.w1.value.floats()
        for r in 0..<bank.hidden {
            let row = Array(w1[r * W..<(r + 1) * W])
            XCTAssertTrue((0..<(2 * c.hidden)).contains { n in plan.channels.map { fc1[n * W2 + $0] } == row }, "expert row \(r) is a narrowed row of the wide MLP")
        }

        // With calibration data: the same seed gives the same model; another seed other channels.
        func recycled(seed: UInt64) throws -> (ViT, [Float]) {
            let m = try ViT(config: c, backend: b, seed: 6)
            try OnlineUpcycle.apply(dense: predecessor, into: m, method: .recycle, calibration: patches, seed: seed)
            return (m, try m.forward(patches: patches, training: false, step: 0).floats())
        }
        let (m1, o1) = try recycled(seed: 2), (_, o2) = try recycled(seed: 2)
        XCTAssertEqual(o1, o2)
        XCTAssertEqual(try m1.params["pos_embed"]!.value.shape, [c.tokens, W])
        XCTAssertTrue(o1.allSatisfy(\.isFinite))
        let others = try (3..<8).map { try recycled(seed: $0).0.params["patch_embed.proj.weight"]!.value.floats() }
        XCTAssertTrue(others.contains { $0 != (try? m1.params["patch_embed.proj.weight"]!.value.floats()) }, "the channels are sampled, not fixed")
    }

    /// `moe-gpu upcycle --width`: the offline path narrows the same way as the online one.
    func testOfflineWidthRecyclingMatchesOnline() throws {
        let b = CPUBackend()
        var c = tinyConfig(router: "topk"); c.moe!.expertWidthRatio = 0.5; c.moe!.experts = 4
        let predecessor = try ViT(config: wide(c, by: 2), backend: b, seed: 5)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("width-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let densePath = dir.appendingPathComponent("wide.safetensors")
        try ModelCheckpoint.save(predecessor, to: densePath)
        var o = UpcycleOptions()
        o.method = .recycle; o.width = c.width; o.experts = 4; o.layers = .list([1]); o.seed = 2; o.format = .own
        let result = try Upcycler(options: o).run(from: densePath.path, to: dir.appendingPathComponent("moe.safetensors").path)
        let out = try SafetensorsFile(path: result.checkpoint.path)
        XCTAssertEqual(out.entry("patch_embed.proj.weight")?.shape, [c.width, c.patchDim])
        XCTAssertEqual(out.entry("blocks.0.attn.qkv.weight")?.shape, [3 * c.width, c.width])
        XCTAssertEqual(out.entry("blocks.0.mlp.fc1.weight")?.shape, [c.hidden, c.width])
        XCTAssertEqual(out.entry("blocks.1.moe.experts.3.fc1.weight")?.shape, [c.hidden / 2, c.width], "half the target MLP width, sampled from the wide MLP")
        let online = try ViT(config: c, backend: b, seed: 6)
        try OnlineUpcycle.apply(dense: predecessor, into: online, method: .recycle, calibration: nil, seed: 2)
        for name in ["patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.0.mlp.fc2.weight", "head.weight"] {
            XCTAssertEqual(try out.floats(name), try online.params[name]!.value.floats(), name)
        }
        // A checkpoint that is not a moe-gpu ViT (here: timm names without moe-gpu's config) is refused with the reason.
        let timm = dir.appendingPathComponent("timm.safetensors")
        try writeSafetensors(to: timm, tensors: try predecessor.checkpointTensors.map {
            ($0.name, .F32, $0.shape, encodeFloats(try $0.value().floats(), as: .F32))
        }, metadata: [:])
        XCTAssertThrowsError(try Upcycler(options: o).run(from: timm.path, to: dir.appendingPathComponent("x.safetensors").path)) {
            XCTAssertTrue("\($0)".contains("not supported yet"), "\($0)")
        }
    }

    /// Granular upcycling: 2 copies x 2 shards, top-2 with tied router rows, is the dense model at the start.
    func testGranularTopKEqualsTheDenseModel() throws {
        let b = CPUBackend()
        let dense = try ViT(config: tinyConfig(router: nil), backend: b, seed: 5)
        var c = tinyConfig(router: "topk")
        c.moe!.experts = 4
        Recipe.shapeExperts(&c.moe!, for: "granular", granularity: 2, topK: nil)
        XCTAssertEqual(c.moe!.topK, 2)
        let moe = try ViT(config: c, backend: b, seed: 6)
        let log = try OnlineUpcycle.apply(dense: dense, into: moe, method: .granular, calibration: nil, seed: 1)
        XCTAssertTrue(log[0].contains("4 experts of width \(c.hidden / 2)"), log[0])
        let (patches, _) = try tinyBatch(b, c, batch: 4, seed: 8)
        let d = try dense.forward(patches: patches, training: false, step: 0).floats()
        let m = try moe.forward(patches: patches, training: false, step: 0).floats()
        XCTAssertLessThan(Reference.relativeError(m.map(Double.init), d.map(Double.init)), 1e-5)
        // A Soft MoE layer has no router rows to tie: a clear error.
        var s = tinyConfig(router: "soft"); s.moe!.expertWidthRatio = 0.5
        XCTAssertThrowsError(try OnlineUpcycle.apply(dense: dense, into: try ViT(config: s, backend: b, seed: 6), method: .granular, calibration: nil, seed: 1)) {
            XCTAssertTrue("\($0)".contains("top-k or expert-choice"), "\($0)")
        }
    }

    /// Replicate into SpheroMoE: every expert a full-width core expert, each a copy of the dense MLP.
    func testReplicateFeedsAnAllCoreSpheroMoE() throws {
        let b = CPUBackend()
        let dense = try ViT(config: tinyConfig(router: nil), backend: b, seed: 5)
        var c = tinyConfig(router: "sphero")
        Recipe.shapeExperts(&c.moe!, for: "replicate", granularity: nil, topK: nil)
        let moe = try ViT(config: c, backend: b, seed: 6)
        try OnlineUpcycle.apply(dense: dense, into: moe, method: .replicate, calibration: nil, seed: 1)
        let layer = try XCTUnwrap(moe.blocks[1].ffn as? SoftMoELayer)
        XCTAssertNil(layer.universal)
        let core = try XCTUnwrap(layer.core)
        XCTAssertEqual(core.experts, c.moe!.experts)
        let fc1 = try (dense.blocks[1].ffn as! DenseMLP).fc1.weight.value.floats(), w1 = try core.w1.value.floats()
        for e in 0..<core.experts { XCTAssertEqual(Array(w1[e * fc1.count..<(e + 1) * fc1.count]), fc1) }
    }
}
