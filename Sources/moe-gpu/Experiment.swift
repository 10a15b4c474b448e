import ArgumentParser
import Foundation
import MoECompute
import MoEModel

/// `moe-gpu experiment NAME`: a recipe of seeds x budgets x arms run one after
/// another, then its tables, claim verdicts and plots.
struct Experiment: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run an experiment recipe (experiments/NAME.json): every arm, budget and seed, then tables, claim verdicts and plots.",
        discussion: """
        NAME is a recipe in experiments/ (e.g. `seeds`) or a path to one. Runs go one after another into \
        --out (default runs/experiments/NAME, or NAME-quick): OUT/budget-P/ARM/seedS and OUT/transfer-T/ARM/seedS, \
        each a `moe-gpu train` run folder (config.json, metrics.jsonl, checkpoints, eval.json). A run with an \
        eval.json is skipped and an interrupted one resumes from its last checkpoint, so the command can be \
        stopped and run again in parts. At the end: OUT/summary.json, OUT/results.md (also printed) and \
        OUT/figures/*.svg. --quick uses the recipe's tiny budgets (a check that everything runs, for CI).
        """)

    @Argument(help: "Recipe name (experiments/NAME.json) or path.")
    var name: String
    @Flag(name: .long, help: "The recipe's tiny budgets (a few minutes; not a result).")
    var quick = false
    @Option(name: .long, help: "Output folder (default runs/experiments/NAME[-quick]).")
    var out: String?
    @Option(name: .long, help: "Device: auto, cpu, opencl, opencl:P:D (or MOE_GPU_DEVICE).")
    var device: String?

    func run() throws {
        setvbuf(stdout, nil, _IOLBF, 0)
        let path = try Self.resolve(name)
        var recipe = try ExperimentRecipe.load(path)
        if quick { recipe = try recipe.quickened() }
        if let t = recipe.transfer {
            let folder = ExperimentRunnerPaths.expand(t.data)
            guard FileManager.default.fileExists(atPath: folder) else {
                throw CommandError("the transfer data \(folder) is missing: run \(t.fetch ?? "the script that makes it") first")
            }
        }
        let backend = try DeviceCatalog().makeBackend(try DeviceSelector.resolve(device))
        let outDir = URL(fileURLWithPath: out ?? "runs/experiments/\(recipe.name)\(quick ? "-quick" : "")")
        print("experiment \(recipe.name)\(quick ? " (quick)" : ""): \(recipe.arms.count) arms x \(recipe.budgets.count) budgets x \(recipe.seeds.count) seeds on \(backend.name) -> \(outDir.path)")
        let started = Date()
        let runner = try ExperimentRunner(recipe: recipe, out: outDir, backend: backend)
        runner.quick = quick
        StopSignal.install()
        let summary: ExperimentSummary
        do { summary = try runner.run() } catch let stop as TrainingStopped {
            print("\(stop.description)\nrun the same command again to resume: moe-gpu experiment \(name)\(quick ? " --quick" : "") --out \(outDir.path)")
            throw ExitCode(stop.exitCode)
        }
        try drawFigures(recipe, runner: runner, out: outDir)
        print(summary.markdown())
        print(String(format: "experiment %@ finished in %@; results in %@", recipe.name, formatDuration(Date().timeIntervalSince(started)),
                     outDir.appendingPathComponent("results.md").path))
    }

    /// experiments/NAME.json, or NAME itself when it is a file.
    static func resolve(_ name: String) throws -> String {
        if FileManager.default.fileExists(atPath: name), name.hasSuffix(".json") { return name }
        let candidate = "experiments/\(name).json"
        if FileManager.default.fileExists(atPath: candidate) { return candidate }
        let known = ((try? FileManager.default.contentsOfDirectory(atPath: "experiments")) ?? []).filter { $0.hasSuffix(".json") }
            .map { String($0.dropLast(5)) }.sorted()
        throw CommandError("no experiment recipe \(candidate)" + (known.isEmpty ? " (run from the repository root, or give a recipe path)" : "; known: \(known.joined(separator: ", "))"))
    }

    func drawFigures(_ recipe: ExperimentRecipe, runner: ExperimentRunner, out: URL) throws {
        let figures = out.appendingPathComponent("figures")
        for f in recipe.figures ?? [] {
            let labels = f.arms.map { a in recipe.arms.first { $0.name == a }!.label }
            let sets: [(file: String, title: String, dirs: (String, UInt64) -> URL)]
            if f.task == "transfer", let t = recipe.transfer {
                sets = [("\(f.name)-transfer.svg", "\(recipe.name): \(f.name), transfer to \(t.name)", { runner.transferDirectory($0, seed: $1) })]
            } else {
                sets = recipe.budgets.map { b in
                    (String(format: "%@-budget-%g.svg", f.name, 100 * b),
                     String(format: "%@: %@, budget %g%% of pretraining (%d steps)", recipe.name, f.name, 100 * b, runner.budgetSteps(b)),
                     { runner.runDirectory($0, budget: b, seed: $1) })
                }
            }
            for set in sets {
                var args = f.arms.flatMap { a in recipe.seeds.map { set.dirs(a, $0).path } }
                args += ["--out", figures.appendingPathComponent(set.file).path, "--title", set.title, "--x", f.x ?? "step"]
                for l in labels { args += ["--label", l] }
                let plot = try Plot.parse(args)
                try plot.run()
            }
        }
    }
}
