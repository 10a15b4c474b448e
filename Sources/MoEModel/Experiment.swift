import Foundation
import MoECheckpoint
import MoECompute

/// An experiment recipe (`experiments/NAME.json`): the starting points, the arms,
/// budgets, seeds and tasks, and the claims to test. Plain JSON a person can read.
public struct ExperimentRecipe: Codable, Sendable {
    public var name: String
    public var description: String = ""
    /// Image data (IDX folder or CSV) for pretraining and fine-tuning; nil: Fashion-MNIST.
    public var data: String?
    public var seeds: [UInt64]
    /// The dense model at the target width (its MoE arms put experts in `moeBlocks`).
    public var width: Int
    public var moeBlocks: [Int]
    /// The wider dense predecessor MoE Jetpack recycles from.
    public var predecessorWidth: Int
    /// The predecessor's pretraining peak learning rate (nil: the dense recipe's 3e-3);
    /// a wider model wants a lower one (Adam's update scales with width).
    public var predecessorLearningRate: Float?
    /// Pretraining of both dense starting points (seed `pretrainSeed`, one checkpoint for all runs).
    public var pretrainSteps: Int
    public var pretrainSeed: UInt64 = 0
    /// Fine-tuning budgets as fractions of the pretraining steps; every arm gets the same steps.
    public var budgets: [Double]
    public var batchSize: Int = 64
    public var learningRate: Float = 1e-3
    public var warmupSteps: Int = 20
    /// Evaluations per fine-tuning run (on the whole test split unless `testExamples`).
    public var evalPoints: Int = 8
    public var testExamples: Int?
    public var trainExamples: Int?
    public var arms: [ExperimentArm]
    /// The arm whose final top-1 the others race to (the step they first reach it is their convergence).
    public var convergenceReference: String?
    public var transfer: TransferTask?
    public var claims: [ExperimentClaim]
    /// Plots the command draws: per budget (or for the transfer runs), the arms' curves over seeds.
    public var figures: [Figure]?
    /// Overrides for `--quick` (tiny budgets, for CI).
    public var quick: QuickSettings?

    public struct Figure: Codable, Sendable {
        public var name: String
        public var arms: [String]
        /// step or flops.
        public var x: String?
        /// main (one figure per budget) or transfer.
        public var task: String?
    }

    public struct QuickSettings: Codable, Sendable {
        public var pretrainSteps: Int
        public var budgets: [Double]?
        public var seeds: [UInt64]?
        public var testExamples: Int?
        public var trainExamples: Int?
        public var evalPoints: Int?
        public var transferSteps: Int?
    }

    /// A transfer task: each arm's fine-tuned model (at `budget`) gets a new head and trains on `data`.
    public struct TransferTask: Codable, Sendable {
        public var name: String
        /// An IDX folder; `fetch` names the script that makes it.
        public var data: String
        public var fetch: String?
        public var budget: Double
        public var steps: Int
        public var learningRate: Float = 1e-3
    }

    public static func load(_ path: String) throws -> ExperimentRecipe {
        guard let data = FileManager.default.contents(atPath: path) else { throw ModelError.badConfig("cannot read the experiment recipe \(path)") }
        let r: ExperimentRecipe
        do { r = try JSONDecoder().decode(ExperimentRecipe.self, from: data) } catch let DecodingError.keyNotFound(key, ctx) {
            throw ModelError.badConfig("\(path): missing key '\((ctx.codingPath + [key]).map(\.stringValue).joined(separator: "."))'")
        } catch {
            throw ModelError.badConfig("\(path) is not a valid experiment recipe (\(error))")
        }
        try r.validate(path)
        return r
    }

    func validate(_ path: String) throws {
        let names = arms.map(\.name)
        try check(Set(names).count == names.count, "\(path): arm names must be unique")
        try check(!seeds.isEmpty && !budgets.isEmpty && budgets.allSatisfy { $0 > 0 }, "\(path): seeds and budgets (> 0) must not be empty")
        try check(width <= predecessorWidth, "\(path): the predecessor (\(predecessorWidth)) must be at least as wide as the model (\(width))")
        for a in arms {
            try check(["dense", "predecessor", "scratch"].contains(a.start), "\(path): arm \(a.name): start must be dense, predecessor or scratch")
            try check(["dense", "topk", "expert-choice", "soft", "sphero"].contains(a.router), "\(path): arm \(a.name): unknown router \(a.router)")
            try check(a.upcycle.map { ["replicate", "granular", "recycle"].contains($0) } ?? true, "\(path): arm \(a.name): upcycle must be replicate, granular or recycle")
            try check(a.equalFlopsTo.map(names.contains) ?? true, "\(path): arm \(a.name): equalFlopsTo names no arm")
        }
        try check(convergenceReference.map(names.contains) ?? true, "\(path): convergenceReference names no arm")
        try check(transfer.map { t in budgets.contains(t.budget) } ?? true, "\(path): the transfer budget must be one of the budgets")
        for f in figures ?? [] { try check(f.arms.allSatisfy(names.contains), "\(path): figure \(f.name) names an unknown arm") }
        for c in claims {
            try check(names.contains(c.arm) && names.contains(c.baseline), "\(path): claim '\(c.id)' names an unknown arm")
            try check(["better", "grows", "speedup"].contains(c.kind), "\(path): claim '\(c.id)': kind must be better, grows or speedup")
            try check(c.task == nil || c.task == "main" || c.task == "transfer" && transfer != nil, "\(path): claim '\(c.id)': task must be main or transfer (with a transfer section)")
        }
    }

    /// The recipe with its `quick` overrides applied.
    public func quickened() throws -> ExperimentRecipe {
        guard let q = quick else { throw ModelError.badConfig("the recipe \(name) has no quick section") }
        var r = self
        r.pretrainSteps = q.pretrainSteps
        if let b = q.budgets { r.budgets = b }
        if let s = q.seeds { r.seeds = s }
        r.testExamples = q.testExamples ?? r.testExamples
        r.trainExamples = q.trainExamples ?? r.trainExamples
        if let e = q.evalPoints { r.evalPoints = e }
        if let t = q.transferSteps { r.transfer?.steps = t }
        if let t = r.transfer, !r.budgets.contains(t.budget) { r.transfer!.budget = r.budgets.max()! }
        return r
    }
}

/// One way of starting and training a model.
public struct ExperimentArm: Codable, Sendable {
    public var name: String
    public var label: String
    /// (a) dense continued, (b) MoE from scratch, (c) Sparse Upcycling, (d) MoE Jetpack, (e) ablation.
    public var group: String
    /// dense (the target-width model), predecessor (the wider one) or scratch.
    public var start: String
    /// dense (no MoE), topk, expert-choice, soft or sphero.
    public var router: String
    public var upcycle: String?
    public var granularity: Int?
    public var experts: Int?
    public var topK: Int?
    /// A dense arm given the steps that match this arm's training FLOPs (its own run and schedule).
    public var equalFlopsTo: String?
}

/// A claim of the papers, tested as a paired difference over seeds.
public struct ExperimentClaim: Codable, Sendable {
    public var id: String
    public var text: String
    /// better: arm's final top-1 above baseline's at every budget;
    /// grows: (arm - baseline) larger at the largest budget than at the smallest;
    /// speedup: steps for baseline to reach its final top-1 over the arm's steps to reach it, at least `factor`.
    public var kind: String
    public var arm: String
    public var baseline: String
    /// main (the fine-tuning task, the default) or transfer.
    public var task: String?
    public var onTransfer: Bool { task == "transfer" }
    public var factor: Double?
}

/// Mean, spread and the paired-difference test of the issue: reproduced when the
/// difference is positive for every seed and its mean exceeds twice its standard error.
public struct PairedTest: Codable, Sendable {
    public let differences: [Double]
    public var mean: Double { differences.reduce(0, +) / Double(max(differences.count, 1)) }
    public var standardDeviation: Double {
        guard differences.count > 1 else { return .nan }
        let m = mean
        return (differences.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(differences.count - 1)).squareRoot()
    }
    public var standardError: Double { standardDeviation / Double(differences.count).squareRoot() }
    public var reproduced: Bool {
        differences.count > 1 && differences.allSatisfy { $0 > 0 } && mean > 2 * standardError
    }
    public init(_ d: [Double]) { differences = d }
    public var verdict: String {
        if differences.count < 2 { return "untestable (one seed)" }
        if reproduced { return "reproduced" }
        if differences.allSatisfy({ $0 < 0 }) && -mean > 2 * standardError { return "not reproduced (reversed)" }
        return "not reproduced"
    }
}

/// What one finished run gave.
public struct ExperimentRunResult: Codable, Sendable {
    public var arm: String
    public var budget: Double
    public var seed: UInt64
    public var steps: Int
    public var accuracy: Double
    /// (step, top-1) of every evaluation.
    public var curve: [[Double]]
    public var activeParameters: Double
    public var parameters: Int
    public var tokensPerStep: Double
    public var wallSeconds: Double
    /// Mean over logged steps and MoE layers of max expert load / mean load (nil: no token routing).
    public var loadImbalance: Double?
    public var trainingFLOPs: Double { 6 * activeParameters * tokensPerStep * Double(steps) }
    public var flopsPerToken: Double { 6 * activeParameters }

    /// The first evaluated step whose top-1 reaches `target`.
    public func firstStep(reaching target: Double) -> Int? {
        curve.first { $0[1] >= target - 1e-12 }.map { Int($0[0]) }
    }
}
