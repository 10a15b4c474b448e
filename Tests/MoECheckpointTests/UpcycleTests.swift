import Foundation
import MoECompute
import XCTest
@testable import MoECheckpoint

final class UpcycleTests: XCTestCase {
    func upcycle(_ from: URL, _ to: URL, _ configure: (inout UpcycleOptions) -> Void) throws -> UpcycleResult {
        var o = UpcycleOptions()
        o.verify = true
        o.verifyTokens = 12
        configure(&o)
        return try Upcycler(options: o).run(from: from.path, to: to.path)
    }

    func assertExact(_ r: UpcycleResult, file: StaticString = #filePath, line: UInt = #line) {
        guard let v = r.verification else { return XCTFail("no verification", file: file, line: line) }
        XCTAssertTrue(v.expectExact, file: file, line: line)
        XCTAssertTrue(v.passed, file: file, line: line)
        XCTAssertLessThan(v.maxRelativeDifference, 1e-6, file: file, line: line)
        XCTAssertEqual(v.layers.map(\.layer), r.layers, file: file, line: line)
    }

    func testBertReplicateEqualsDenseAndKeepsOtherTensors() throws {
        let dir = try makeTempDir(self)
        let dense = dir.appendingPathComponent("bert.safetensors")
        try writeBertLike(to: dense)
        let out = dir.appendingPathComponent("moe.safetensors")
        let r = try upcycle(dense, out) { $0.experts = 4; $0.topK = 2 }
        assertExact(r)
        let moe = try SafetensorsCheckpoint(path: out.path)
        let src = try SafetensorsCheckpoint(path: dense.path)
        // Non-MLP tensors are copied bit for bit, including the I64 buffer.
        for name in ["embeddings.position_ids", "encoder.layer.1.attention.self.query.weight", "encoder.layer.0.output.LayerNorm.weight"] {
            XCTAssertEqual(Array(moe.passthrough(name)!.1), Array(src.passthrough(name)!.1), name)
        }
        XCTAssertNil(moe.descriptor("encoder.layer.0.intermediate.dense.weight"), "dense MLP of an MoE layer is replaced")
        XCTAssertEqual(try moe.floats("blocks.1.moe.experts.3.fc1.weight"), try src.floats("encoder.layer.1.intermediate.dense.weight"))
        XCTAssertEqual(try moe.floats("blocks.0.moe.experts.2.fc2.bias"), try src.floats("encoder.layer.0.output.dense.bias"))
        XCTAssertEqual(moe.descriptor("blocks.0.moe.router.weight")?.shape, [4, 12])
        let s = try XCTUnwrap(RoutingSettings(metadata: moe.metadata))
        XCTAssertEqual(s.router, .topkSoftmax)
        XCTAssertEqual(s.topK, 2)
        XCTAssertEqual(s.experts, 4)
        XCTAssertEqual(s.sourceArchitecture, "bert")
        XCTAssertEqual(moe.metadata["format"], "pt")
        let summary = try CheckpointSummary(path: out.path)
        XCTAssertEqual(summary.description.moeLayers.count, 2)
        XCTAssertEqual(summary.description.sourceArchitecture, .bert)
        XCTAssertTrue(summary.text.contains("topk-softmax, top-2, 4 experts"), summary.text)
    }

    func testBertGranularEveryOtherAndExpertChoice() throws {
        let dir = try makeTempDir(self)
        let dense = dir.appendingPathComponent("bert.safetensors")
        try writeBertLike(to: dense, layers: 4)
        let r = try upcycle(dense, dir.appendingPathComponent("g.safetensors")) {
            $0.method = .granular; $0.granularity = 3; $0.experts = 6; $0.topK = 3; $0.layers = .everyOther
        }
        XCTAssertEqual(r.layers, [1, 3])
        XCTAssertEqual(r.settings.expertWidth, 8)
        assertExact(r)
        let moe = try SafetensorsCheckpoint(path: r.checkpoint.path)
        XCTAssertNotNil(moe.descriptor("encoder.layer.0.intermediate.dense.weight"), "layer 0 stays dense")
        // Router rows are tied within each copy of the 3 shards.
        let router = try moe.floats("blocks.1.moe.router.weight")
        XCTAssertEqual(Array(router[0..<12]), Array(router[12..<24]))
        XCTAssertNotEqual(Array(router[0..<12]), Array(router[36..<48]))

        // Expert choice combines with the raw router probabilities (Zhou et al.; what
        // training computes), so identical experts give the dense MLP scaled by the
        // probabilities of the experts that took the token: reported, not exact.
        let ec = try upcycle(dense, dir.appendingPathComponent("ec.safetensors")) {
            $0.router = .expertChoice; $0.experts = 4; $0.capacityFactor = 2
        }
        let granularEC = try upcycle(dense, dir.appendingPathComponent("gec.safetensors")) {
            $0.router = .expertChoice; $0.method = .granular; $0.granularity = 2; $0.experts = 4; $0.topK = 1; $0.routerInit = .zero
        }
        for r in [ec, granularEC] {
            let v = try XCTUnwrap(r.verification)
            XCTAssertFalse(v.expectExact)
            XCTAssertTrue(v.passed)
            XCTAssertTrue(v.reason.contains("raw router probabilities"), v.reason)
        }
        // Random router: a kept token's output is the dense one times the sum of the
        // probabilities of the experts that took it. (With the zero init every
        // probability is 1/E and each kept token is taken by all E experts, so the
        // granular layer happens to give the dense MLP.)
        let v = try XCTUnwrap(ec.verification)
        XCTAssertGreaterThan(v.maxRelativeDifference, 1e-3)
        XCTAssertTrue(v.layers.allSatisfy { $0.normRatio > 0 && $0.normRatio < 1 }, "\(v.layers.map(\.normRatio))")
    }

    func testLlamaSafetensorsToMixtral() throws {
        let dir = try makeTempDir(self)
        let dense = try writeLlamaLike(in: dir.appendingPathComponent("llama"))
        let out = dir.appendingPathComponent("mixtral")
        let r = try upcycle(dense, out) { $0.experts = 8; $0.topK = 2 }
        assertExact(r)
        XCTAssertEqual(filesIn(out), ["config.json", "model.safetensors"])
        let moe = try SafetensorsCheckpoint(path: out.path)
        let names = Set(moe.tensors.map(\.name))
        XCTAssertTrue(names.contains("model.layers.1.block_sparse_moe.gate.weight"))
        XCTAssertTrue(names.contains("model.layers.0.block_sparse_moe.experts.7.w3.weight"))
        XCTAssertFalse(names.contains { $0.contains(".mlp.") }, "every layer is MoE in the Mixtral layout")
        let src = try SafetensorsCheckpoint(path: dense.path)
        XCTAssertEqual(try moe.floats("model.layers.0.block_sparse_moe.experts.5.w1.weight"), try src.floats("model.layers.0.mlp.gate_proj.weight"))
        XCTAssertEqual(try moe.floats("model.layers.0.block_sparse_moe.experts.5.w3.weight"), try src.floats("model.layers.0.mlp.up_proj.weight"))
        XCTAssertEqual(try moe.floats("model.layers.1.block_sparse_moe.experts.0.w2.weight"), try src.floats("model.layers.1.mlp.down_proj.weight"))
        let config = try JSONParser.parse(Array(Data(contentsOf: out.appendingPathComponent("config.json"))))
        XCTAssertEqual(config["architectures"], .array([.string("MixtralForCausalLM")]))
        XCTAssertEqual(config["num_local_experts"]?.intValue, 8)
        XCTAssertEqual(config["num_experts_per_tok"]?.intValue, 2)
        XCTAssertEqual(config["rope_theta"], .number("100000.0"))
        XCTAssertEqual(config["tie_word_embeddings"], .bool(true))
        XCTAssertEqual(config["head_dim"]?.intValue, 8)
        XCTAssertEqual(config["num_key_value_heads"]?.intValue, 1)
        XCTAssertEqual(config["intermediate_size"]?.intValue, 32)
        XCTAssertEqual(config["router_aux_loss_coef"]?.doubleValue, 0.001)
        let d = try ArchitectureAdapter.describe(moe)
        XCTAssertEqual(d.architecture, .mixtral)
        XCTAssertEqual(d.moeLayers[1]?.experts, 8)
    }

    func testLlamaGGUFGranularToMixtral() throws {
        let dir = try makeTempDir(self)
        let gguf = dir.appendingPathComponent("m.gguf")
        let hf = try writeLlamaGGUF(to: gguf)
        let r = try upcycle(gguf, dir.appendingPathComponent("out")) {
            $0.method = .granular; $0.granularity = 4; $0.experts = 8; $0.topK = 4
        }
        assertExact(r)
        let moe = try SafetensorsCheckpoint(path: r.checkpoint.path)
        // Attention weights come out in Hugging Face order (Q/K un-permuted).
        let q = hf.first { $0.0 == "model.layers.1.self_attn.q_proj.weight" }!
        XCTAssertEqual(try moe.floats(q.0), q.2)
        XCTAssertEqual(moe.descriptor("model.layers.0.block_sparse_moe.experts.0.w1.weight")?.shape, [8, 16])
        let config = try JSONParser.parse(Array(Data(contentsOf: r.config!)))
        XCTAssertEqual(config["intermediate_size"]?.intValue, 8)
        XCTAssertEqual(config["num_experts_per_tok"]?.intValue, 4)
    }

    func testLlamaOwnFormatPartialWithSoftmaxTopkAndWeightScaling() throws {
        let dir = try makeTempDir(self)
        let dense = try writeLlamaLike(in: dir.appendingPathComponent("llama"))
        let r = try upcycle(dense, dir.appendingPathComponent("own.safetensors")) {
            $0.format = .own; $0.layers = .list([1]); $0.router = .softmaxTopk; $0.weightScaling = true; $0.experts = 8; $0.topK = 2
        }
        let v = try XCTUnwrap(r.verification)
        XCTAssertFalse(v.expectExact)
        XCTAssertTrue(v.passed)
        XCTAssertEqual(r.settings.weightScale, pow(4.0, 1.0 / 3.0), accuracy: 1e-12)
        let moe = try SafetensorsCheckpoint(path: r.checkpoint.path)
        let src = try SafetensorsCheckpoint(path: dense.path)
        let scaled = try moe.floats("blocks.1.moe.experts.0.gate.weight")
        let orig = try src.floats("model.layers.1.mlp.gate_proj.weight")
        XCTAssertEqual(Double(scaled[3] / orig[3]), pow(4.0, 1.0 / 3.0), accuracy: 1e-5)
        XCTAssertNotNil(moe.descriptor("model.layers.0.mlp.gate_proj.weight"), "layer 0 stays dense")
    }

    func testRecycleIsSeededAndSamplesWithoutReplacement() throws {
        let dir = try makeTempDir(self)
        let dense = dir.appendingPathComponent("bert.safetensors")
        try writeBertLike(to: dense, ffn: 40)
        func run(_ name: String, seed: UInt64) throws -> (UpcycleResult, SafetensorsCheckpoint) {
            let r = try upcycle(dense, dir.appendingPathComponent(name)) {
                $0.method = .recycle; $0.expertWidth = 10; $0.seed = seed; $0.experts = 4
            }
            return (r, try SafetensorsCheckpoint(path: r.checkpoint.path))
        }
        let (r1, a) = try run("a.safetensors", seed: 7)
        let (_, b) = try run("b.safetensors", seed: 7)
        let (_, c) = try run("c.safetensors", seed: 8)
        XCTAssertFalse(try XCTUnwrap(r1.verification).expectExact)
        XCTAssertEqual(a.descriptor("blocks.0.moe.experts.0.fc1.weight")?.shape, [10, 12])
        XCTAssertEqual(try a.floats("blocks.0.moe.experts.2.fc1.weight"), try b.floats("blocks.0.moe.experts.2.fc1.weight"), "same seed, same experts")
        XCTAssertNotEqual(try a.floats("blocks.0.moe.experts.2.fc1.weight"), try c.floats("blocks.0.moe.experts.2.fc1.weight"), "other seed, other experts")
        XCTAssertNotEqual(try a.floats("blocks.0.moe.experts.0.fc1.weight"), try a.floats("blocks.0.moe.experts.1.fc1.weight"), "experts differ")
        // Each expert's rows are distinct rows of the dense fc1 (no neuron twice).
        let denseFC1 = try SafetensorsCheckpoint(path: dense.path).floats("encoder.layer.0.intermediate.dense.weight")
        let rows = (0..<40).map { Array(denseFC1[$0 * 12..<($0 + 1) * 12]) }
        let e = try a.floats("blocks.0.moe.experts.3.fc1.weight")
        let picked = (0..<10).map { r in rows.firstIndex(of: Array(e[r * 12..<(r + 1) * 12]))! }
        XCTAssertEqual(Set(picked).count, 10)
        XCTAssertEqual(picked, picked.sorted())
    }

    func testImportanceSamplingDistribution() {
        var r = SplitMix64(seed: 1)
        let s = ImportanceSampling.sample(weights: [1, 0, 3, 2, 5, 0.5], count: 4, rng: &r)
        XCTAssertEqual(Set(s).count, 4, "without replacement")
        XCTAssertFalse(s.contains(1), "zero importance is never sampled while others remain")
        var r2 = SplitMix64(seed: 1)
        XCTAssertEqual(ImportanceSampling.sample(weights: [1, 0, 3, 2, 5, 0.5], count: 4, rng: &r2), s, "seeded")
        // First draw is proportional to importance.
        let w: [Double] = [1, 2, 3, 4]
        var counts = [0, 0, 0, 0]
        var g = SplitMix64(seed: 42)
        for _ in 0..<20000 { counts[ImportanceSampling.sample(weights: w, count: 1, rng: &g)[0]] += 1 }
        for i in 0..<4 { XCTAssertEqual(Double(counts[i]) / 20000, w[i] / 10, accuracy: 0.015) }
        // Second draw, given the first was index 3 (weight 4): probabilities 1/6, 2/6, 3/6 among the rest.
        var second = [0, 0, 0, 0], firsts = 0
        for _ in 0..<30000 {
            let p = ImportanceSampling.sample(weights: w, count: 2, rng: &g)
            if p[0] == 3 { second[p[1]] += 1; firsts += 1 }
        }
        for i in 0..<3 { XCTAssertEqual(Double(second[i]) / Double(firsts), Double(i + 1) / 6, accuracy: 0.02) }
    }

    func testCalibrationDrivesHiddenRouterAndImportance() throws {
        let dir = try makeTempDir(self)
        let dense = dir.appendingPathComponent("bert.safetensors")
        try writeBertLike(to: dense)
        // Two clear clusters of hidden states along +e0 and +e5.
        var states: [Float] = []
        var r = SplitMix64(seed: 5)
        for t in 0..<40 {
            var x = (0..<12).map { _ in r.nextFloat(in: -0.05...0.05) }
            x[t % 2 == 0 ? 0 : 5] += 3
            states += x
        }
        let cal = dir.appendingPathComponent("cal.safetensors")
        try writeSafetensors(to: cal, tensors: [("hidden_states", .F32, [40, 12], f32Data(states))])
        let res = try upcycle(dense, dir.appendingPathComponent("h.safetensors")) {
            $0.experts = 2; $0.topK = 1; $0.routerInit = .hidden; $0.calibrationPath = cal.path
        }
        assertExact(res)
        XCTAssertEqual(try XCTUnwrap(res.verification).layers[0].tokens, 12 + 32, "random plus calibration tokens")
        let router = try SafetensorsCheckpoint(path: res.checkpoint.path).floats("blocks.0.moe.router.weight")
        let rowDirections = [0, 1].map { e in router[e * 12 + 0] > 0.9 ? 0 : router[e * 12 + 5] > 0.9 ? 5 : -1 }
        XCTAssertEqual(Set(rowDirections), [0, 5], "one unit-length router row per cluster: \(router)")
        // .npy calibration works as well, for recycling.
        let npy = dir.appendingPathComponent("cal.npy")
        var header = "{'descr': '<f4', 'fortran_order': False, 'shape': (40, 12), }"
        while (10 + header.count + 1) % 64 != 0 { header += " " }
        header += "\n"
        var d = Data([0x93] + Array("NUMPY".utf8) + [1, 0])
        d += GGUFBuilder.le(UInt16(header.count)) + Data(header.utf8) + f32Data(states)
        try d.write(to: npy)
        let rec = try upcycle(dense, dir.appendingPathComponent("r.safetensors")) {
            $0.method = .recycle; $0.calibrationPath = npy.path; $0.experts = 2; $0.topK = 1
        }
        XCTAssertEqual(rec.settings.expertWidth, 12)
    }

    func testSpheroRouterIsOrthonormalAndReported() throws {
        let dir = try makeTempDir(self)
        let dense = dir.appendingPathComponent("bert.safetensors")
        try writeBertLike(to: dense)
        let r = try upcycle(dense, dir.appendingPathComponent("s.safetensors")) { $0.router = .sphero; $0.experts = 4 }
        let v = try XCTUnwrap(r.verification)
        XCTAssertFalse(v.expectExact)
        // The upcycled layer has no temperature tensors: the host SpheroMoE uses moe-gpu.sphero_tau.
        let soft = try upcycle(dense, dir.appendingPathComponent("soft.safetensors")) { $0.router = .soft; $0.experts = 4 }
        XCTAssertEqual(RoutingSettings(metadata: try SafetensorsCheckpoint(path: soft.checkpoint.path).metadata)?.router, .soft)
        XCTAssertTrue(try XCTUnwrap(soft.verification).maxRelativeDifference.isFinite)
        XCTAssertTrue(try XCTUnwrap(soft.verification).reason.contains("Soft MoE"))
        XCTAssertTrue(v.maxRelativeDifference.isFinite)
        let phi = try SafetensorsCheckpoint(path: r.checkpoint.path).floats("blocks.0.moe.router.weight")
        for a in 0..<4 { for b in 0..<4 {
            let dot = (0..<12).reduce(Float(0)) { $0 + phi[a * 12 + $1] * phi[b * 12 + $1] }
            XCTAssertEqual(dot, a == b ? 1 : 0, accuracy: 1e-5)
        } }
    }

    func testOptionErrorsWriteNothing() throws {
        let dir = try makeTempDir(self)
        let dense = dir.appendingPathComponent("bert.safetensors")
        try writeBertLike(to: dense)
        func expectError(_ fragment: String, _ configure: (inout UpcycleOptions) -> Void) {
            let out = dir.appendingPathComponent("out")
            XCTAssertThrowsError(try upcycle(dense, out, configure)) { XCTAssertTrue("\($0)".contains(fragment), "\($0)") }
            XCTAssertEqual(filesIn(dir), ["bert.safetensors"], fragment)
        }
        expectError("--top-k 5 must be between 1 and --experts 4") { $0.experts = 4; $0.topK = 5 }
        expectError("--granularity 5 does not divide the FFN width 24") { $0.method = .granular; $0.granularity = 5; $0.experts = 5; $0.topK = 5 }
        expectError("--top-k 1 must be a multiple of --granularity 2") { $0.method = .granular; $0.granularity = 2; $0.experts = 4; $0.topK = 1 }
        expectError("--router-init hidden needs --calibration") { $0.routerInit = .hidden }
        expectError("--format mixtral needs a Llama-family input") { $0.format = .mixtral }
        expectError("--layers names layer 9") { $0.layers = .list([9]) }
        XCTAssertThrowsError(try Upcycler(options: UpcycleOptions()).run(from: dense.path, to: dense.path)) {
            XCTAssertTrue("\($0)".contains("would overwrite the input"), "\($0)")
        }
        XCTAssertThrowsError(try LayerSelection(parsing: "1,x"))
        XCTAssertEqual(try LayerSelection(parsing: "0,2-4"), .list([0, 2, 3, 4]))
    }

    func testUnknownLayoutListsArchitectures() throws {
        let dir = try makeTempDir(self)
        let url = dir.appendingPathComponent("x.safetensors")
        try writeSafetensors(to: url, tensors: [tensor("conv.weight", [2, 2], seed: 1), tensor("fc.bias", [2], seed: 2)])
        XCTAssertThrowsError(try ArchitectureAdapter.describe(SafetensorsCheckpoint(path: url.path))) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("BERT, ViT (Hugging Face and timm names), GPT-2, Llama"), text)
            XCTAssertTrue(text.contains("conv.weight, fc.bias"), text)
        }
    }

    func testGPT2AndViTAdapters() throws {
        let dir = try makeTempDir(self)
        // GPT-2: Conv1D weights stored [in, out].
        let gpt2 = dir.appendingPathComponent("gpt2.safetensors")
        try writeSafetensors(to: gpt2, tensors: [tensor("wte.weight", [10, 8], seed: 1), tensor("h.0.mlp.c_fc.weight", [8, 32], seed: 2),
                                                 tensor("h.0.mlp.c_fc.bias", [32], seed: 3), tensor("h.0.mlp.c_proj.weight", [32, 8], seed: 4),
                                                 tensor("h.0.mlp.c_proj.bias", [8], seed: 5)])
        let g = try ArchitectureAdapter.describe(SafetensorsCheckpoint(path: gpt2.path))
        XCTAssertEqual(g.architecture, .gpt2)
        XCTAssertEqual(g.hidden, 8)
        XCTAssertEqual(g.ffn, 32)
        XCTAssertEqual(g.activation, .geluTanh)
        let r = try upcycle(gpt2, dir.appendingPathComponent("g.safetensors")) { $0.experts = 2; $0.topK = 1 }
        assertExact(r)
        let moe = try SafetensorsCheckpoint(path: r.checkpoint.path)
        XCTAssertEqual(moe.descriptor("blocks.0.moe.experts.1.fc1.weight")?.shape, [32, 8], "own naming stores [out, in]")
        XCTAssertEqual(try moe.floats("blocks.0.moe.experts.1.fc1.weight"),
                       transpose(try SafetensorsCheckpoint(path: gpt2.path).floats("h.0.mlp.c_fc.weight"), rows: 8, cols: 32))
        // ViT with Hugging Face names and with timm names.
        let vit = dir.appendingPathComponent("vit.safetensors")
        try writeSafetensors(to: vit, tensors: [tensor("vit.embeddings.patch_embeddings.projection.weight", [8, 3], seed: 1),
                                                tensor("vit.encoder.layer.0.layernorm_before.weight", [8], seed: 2),
                                                tensor("vit.encoder.layer.0.intermediate.dense.weight", [16, 8], seed: 3),
                                                tensor("vit.encoder.layer.0.output.dense.weight", [8, 16], seed: 4)])
        XCTAssertEqual(try ArchitectureAdapter.describe(SafetensorsCheckpoint(path: vit.path)).architecture, .vit)
        let timm = dir.appendingPathComponent("timm.safetensors")
        try writeSafetensors(to: timm, tensors: [tensor("cls_token", [1, 1, 8], seed: 1), tensor("patch_embed.proj.weight", [8, 3], seed: 2),
                                                 tensor("blocks.0.mlp.fc1.weight", [16, 8], seed: 3), tensor("blocks.0.mlp.fc1.bias", [16], seed: 4),
                                                 tensor("blocks.0.mlp.fc2.weight", [8, 16], seed: 5), tensor("blocks.0.mlp.fc2.bias", [8], seed: 6),
                                                 tensor("blocks.1.mlp.fc1.weight", [16, 8], seed: 7), tensor("blocks.1.mlp.fc2.weight", [8, 16], seed: 8)])
        let t = try ArchitectureAdapter.describe(SafetensorsCheckpoint(path: timm.path))
        XCTAssertEqual(t.architecture, .vitTimm)
        XCTAssertEqual(t.layerCount, 2)
        let rt = try upcycle(timm, dir.appendingPathComponent("t.safetensors")) { $0.experts = 4; $0.layers = .everyOther }
        assertExact(rt)
        let tm = try ArchitectureAdapter.describe(SafetensorsCheckpoint(path: rt.checkpoint.path))
        XCTAssertEqual(tm.moeLayers.keys.sorted(), [1])
        XCTAssertEqual(tm.denseMLPs.keys.sorted(), [0])
        XCTAssertEqual(tm.sourceArchitecture, .vitTimm)
    }
}
