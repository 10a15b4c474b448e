import Foundation

/// The tables and claim verdicts of an experiment, from its finished runs.
public struct ExperimentSummary: Codable, Sendable {
    public struct ArmRow: Codable, Sendable {
        public var arm: String, label: String, group: String
        public var budget: Double
        public var steps: Int
        /// Final top-1 per seed (in recipe seed order), mean and sample standard deviation.
        public var accuracies: [Double]
        public var mean: Double, standardDeviation: Double
        /// Per seed: the first evaluated step reaching the convergence reference's final top-1 (nil: never).
        public var stepsToReference: [Int?]
        public var activeParameters: Double, parameters: Int
        public var flopsPerToken: Double, trainingFLOPs: Double
        public var wallSeconds: Double
        public var loadImbalance: Double?
    }

    public struct ClaimResult: Codable, Sendable {
        public var id: String, text: String, kind: String, task: String
        /// One test per budget (for `grows`: one, over the smallest and largest budget).
        public var tests: [ClaimTest]
        public var verdict: String
    }

    public struct ClaimTest: Codable, Sendable {
        public var budget: String
        public var test: PairedTest
        public var verdict: String
        /// speedup claims: the speed-up per seed.
        public var speedups: [Double]?
    }

    public var name: String
    public var quick: Bool
    public var seeds: [UInt64]
    public var pretrained: [ExperimentRunner.Pretrained]
    public var rows: [ArmRow]
    public var transferRows: [ArmRow]
    public var claims: [ClaimResult]
    public var convergenceReference: String?
    public var transferName: String?

    init(recipe r: ExperimentRecipe, runner: ExperimentRunner, pretrained: [ExperimentRunner.Pretrained],
         runs: [ExperimentRunResult], transfers: [ExperimentRunResult]) throws {
        name = r.name; seeds = r.seeds; self.pretrained = pretrained
        quick = runner.quick
        convergenceReference = r.convergenceReference
        transferName = r.transfer?.name
        func row(_ arm: ExperimentArm, _ budget: Double, _ pool: [ExperimentRunResult], reference: [ExperimentRunResult]?) -> ArmRow? {
            let mine = r.seeds.compactMap { s in pool.first { $0.arm == arm.name && $0.budget == budget && $0.seed == s } }
            guard !mine.isEmpty else { return nil }
            let acc = mine.map(\.accuracy), t = PairedTest(acc)
            let toRef: [Int?] = mine.map { run in
                guard let ref = reference?.first(where: { $0.seed == run.seed }) else { return nil }
                return run.firstStep(reaching: ref.accuracy)
            }
            let loads = mine.compactMap(\.loadImbalance)
            return ArmRow(arm: arm.name, label: arm.label, group: arm.group, budget: budget, steps: mine[0].steps, accuracies: acc,
                          mean: t.mean, standardDeviation: t.standardDeviation, stepsToReference: toRef,
                          activeParameters: mine[0].activeParameters, parameters: mine[0].parameters,
                          flopsPerToken: mine[0].flopsPerToken, trainingFLOPs: mine[0].trainingFLOPs,
                          wallSeconds: mine.map(\.wallSeconds).reduce(0, +) / Double(mine.count),
                          loadImbalance: loads.isEmpty ? nil : loads.reduce(0, +) / Double(loads.count))
        }
        rows = []
        for b in r.budgets {
            let ref = r.convergenceReference.map { name in runs.filter { $0.arm == name && $0.budget == b } }
            rows += r.arms.compactMap { row($0, b, runs, reference: ref) }
        }
        transferRows = r.transfer.map { t in
            let ref = r.convergenceReference.map { name in transfers.filter { $0.arm == name } }
            return r.arms.compactMap { row($0, t.budget, transfers, reference: ref) }
        } ?? []

        claims = r.claims.map { c in
            let pool = c.onTransfer ? transfers : runs
            let budgets = c.onTransfer ? [r.transfer!.budget] : r.budgets
            func final(_ arm: String, _ b: Double) -> [UInt64: ExperimentRunResult] {
                Dictionary(pool.filter { $0.arm == arm && $0.budget == b }.map { ($0.seed, $0) }, uniquingKeysWith: { a, _ in a })
            }
            func paired(_ b: Double) -> [Double] {
                let a = final(c.arm, b), base = final(c.baseline, b)
                return r.seeds.compactMap { s in a[s].flatMap { x in base[s].map { x.accuracy - $0.accuracy } } }
            }
            var tests: [ClaimTest] = []
            switch c.kind {
            case "grows":
                if let lo = budgets.min(), let hi = budgets.max(), lo != hi {
                    let small = paired(lo), large = paired(hi)
                    let t = PairedTest(zip(large, small).map { $0 - $1 })
                    tests.append(ClaimTest(budget: String(format: "%g%% vs %g%%", 100 * hi, 100 * lo), test: t, verdict: t.verdict))
                }
            case "speedup":
                for b in budgets {
                    let a = final(c.arm, b), base = final(c.baseline, b)
                    var speedups: [Double] = []
                    for s in r.seeds {
                        guard let x = a[s], let y = base[s] else { continue }
                        // The baseline's own steps to its final top-1, over the arm's steps to reach it.
                        let own = Double(y.firstStep(reaching: y.accuracy) ?? y.steps)
                        speedups.append(x.firstStep(reaching: y.accuracy).map { own / Double($0) } ?? 0)
                    }
                    let factor = c.factor ?? 2
                    let t = PairedTest(speedups.map { $0 - factor })
                    tests.append(ClaimTest(budget: String(format: "%g%%", 100 * b), test: t, verdict: t.verdict, speedups: speedups))
                }
            default:
                for b in budgets {
                    let t = PairedTest(paired(b))
                    tests.append(ClaimTest(budget: String(format: "%g%%", 100 * b), test: t, verdict: t.verdict))
                }
            }
            let verdict: String
            if tests.isEmpty || tests.contains(where: { $0.test.differences.count < 2 }) { verdict = "untestable (fewer than 2 seeds or budgets)" }
            else if tests.allSatisfy({ $0.test.reproduced }) { verdict = "reproduced" }
            else if tests.contains(where: { $0.test.reproduced }) {
                verdict = "reproduced at " + tests.filter { $0.test.reproduced }.map(\.budget).joined(separator: ", ") + " only"
            } else { verdict = "not reproduced" }
            return ClaimResult(id: c.id, text: c.text, kind: c.kind, task: c.task ?? "main", tests: tests, verdict: verdict)
        }
    }

    // MARK: markdown

    static func pct(_ x: Double) -> String { String(format: "%.2f", 100 * x) }
    static func flops(_ x: Double) -> String {
        for (div, unit) in [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] where x >= div {
            return String(format: "%.3g %@", x / div, unit)
        }
        return String(format: "%.3g", x)
    }

    public func markdown() -> String {
        var s = "# Experiment `\(name)`\(quick ? " (--quick: tiny budgets, a check that everything runs, not a result)" : "")\n\nSeeds \(seeds.map(String.init).joined(separator: ", ")). Top-1 in percent: mean ± standard deviation over seeds, then per seed.\n\n"
        s += "## Starting points (pretrained once, seed 0; their cost is not in the fine-tuning columns)\n\n"
        s += "| model | width | parameters | pretraining steps | pretraining FLOPs | wall | test top-1 |\n|---|--:|--:|--:|--:|--:|--:|\n"
        for p in pretrained {
            s += "| \(p.name) | \(p.width) | \(p.parameters) | \(p.steps) | \(Self.flops(p.trainingFLOPs)) | \(p.wallSeconds.map { String(format: "%.0f s", $0) } ?? "?") | \(Self.pct(p.accuracy)) |\n"
        }
        let budgets = Array(Set(rows.map(\.budget))).sorted()
        for b in budgets {
            let these = rows.filter { $0.budget == b }
            s += "\n## Fine-tuning, budget \(String(format: "%g", 100 * b))% of pretraining\n\n"
            s += table(these, referenceColumn: true)
        }
        if !transferRows.isEmpty {
            s += "\n## Transfer to \(transferName ?? "the transfer task") (new head; from each arm's model at \(String(format: "%g", 100 * transferRows[0].budget))%)\n\n"
            s += table(transferRows, referenceColumn: true)
        }
        s += "\n## Claims (paired difference over seeds: reproduced when positive for every seed and its mean > 2 standard errors)\n\n"
        s += "| claim | task | budget | per seed | mean ± s.e. | verdict |\n|---|---|---|---|---|---|\n"
        for c in claims {
            for t in c.tests {
                let per: String, mean: String
                if let sp = t.speedups {
                    per = sp.map { String(format: "%.2fx", $0) }.joined(separator: ", ")
                    mean = String(format: "%.2fx ± %.2f", sp.reduce(0, +) / Double(max(sp.count, 1)), t.test.standardError)
                } else {
                    per = t.test.differences.map { String(format: "%+.2f", 100 * $0) }.joined(separator: ", ")
                    mean = String(format: "%+.2f ± %.2f", 100 * t.test.mean, 100 * t.test.standardError)
                }
                s += "| \(c.text) | \(c.task) | \(t.budget) | \(per) | \(mean) | \(t.verdict) |\n"
            }
            s += "| **\(c.id)** | | | | | **\(c.verdict)** |\n"
        }
        return s
    }

    func table(_ rows: [ArmRow], referenceColumn: Bool) -> String {
        let ref = convergenceReference ?? "reference"
        var s = "| arm | | steps | top-1 | per seed | first step at \(ref)'s final | active params | train FLOPs/token | FLOPs | wall / run | load max/mean |\n"
        s += "|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|\n"
        for r in rows {
            let sd = r.standardDeviation.isNaN ? "" : " ± " + Self.pct(r.standardDeviation)
            let reach = r.stepsToReference.map { $0.map(String.init) ?? "–" }.joined(separator: ", ")
            s += "| \(r.label) | \(r.group) | \(r.steps) | \(Self.pct(r.mean))\(sd) | \(r.accuracies.map(Self.pct).joined(separator: ", ")) | \(reach) | "
            s += "\(Int(r.activeParameters.rounded())) | \(Self.flops(r.flopsPerToken)) | \(Self.flops(r.trainingFLOPs)) | \(String(format: "%.0f s", r.wallSeconds)) | \(r.loadImbalance.map { String(format: "%.2f", $0) } ?? "–") |\n"
        }
        return s
    }
}
