import ArgumentParser
import Foundation
import MoECheckpoint
import MoEModel

/// `moe-gpu plot`: training curves of run folders as one SVG figure.
struct Plot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Plot runs' training loss and test accuracy (validation loss for language models) against step or training FLOPs, as an SVG.",
        discussion: """
        Each RUN is a folder written by `moe-gpu train` (it holds metrics.jsonl). Runs whose \
        paths differ only by a seed marker (a path component seedN, or a name ending in -sN, \
        _sN, -seedN or _seedN) are one group, drawn as the mean over its runs with a band from \
        the lowest to the highest run, at the steps every run of the group logged. Panels: the \
        training loss; test accuracy for image runs; validation loss for language-model runs \
        (config.json's task).

        --x flops puts training FLOPs on the x axis: step x 6 x active parameters x tokens per \
        step: --flops-per-step where given, else from the run's eval.json (active_parameters, \
        tokens_per_step), else from its config.json and model.safetensors (dense, or top-k MoE).

        Example: moe-gpu plot runs/exp/seed0 runs/exp/seed1 runs/exp/seed0/dense runs/exp/seed1/dense --out exp.svg
        """)

    @Argument(help: "Run folders (each holding a metrics.jsonl).")
    var runs: [String]

    @Option(name: .long, help: "The SVG file to write.")
    var out: String

    @Option(name: .customLong("x"), help: "The x axis: step or flops.")
    var xAxis = "step"

    @Option(name: .long, parsing: .singleValue,
            help: ArgumentHelp("RUN=F: training FLOPs per step of a run folder (or of every run of a group, by its label); overrides what the run's files say.", valueName: "run=flops"))
    var flopsPerStep: [String] = []

    @Option(name: .long, parsing: .singleValue,
            help: ArgumentHelp("Legend label of a group, once per group in the order the groups first appear in RUN... (default: the group's path without what all groups share).", valueName: "text"))
    var label: [String] = []

    @Option(name: .long, help: "The figure's title.")
    var title: String?

    func run() throws {
        guard xAxis == "step" || xAxis == "flops" else { throw PlotError("unknown --x '\(xAxis)': use step or flops") }
        let loaded = try runs.map(PlotRun.load)
        var groups = PlotRun.group(loaded)
        guard label.count <= groups.count else {
            throw PlotError("\(label.count) --label values for \(groups.count) group(s): \(groups.map(\.label).joined(separator: ", "))")
        }
        for (i, text) in label.enumerated() { groups[i].label = text }

        var overrides: [String: Double] = [:]
        for item in flopsPerStep {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, let value = Double(parts[1]), value > 0 else {
                throw PlotError("--flops-per-step '\(item)' is not RUN=F with F a positive number, e.g. runs/exp/seed0=1.7e10")
            }
            overrides[PlotRun.normalized(parts[0])] = value
        }
        if xAxis == "flops" {
            for g in groups.indices {
                for r in groups[g].runs.indices {
                    let run = groups[g].runs[r]
                    groups[g].runs[r].flopsPerStep = try overrides[PlotRun.normalized(run.path)] ?? overrides[groups[g].label]
                        ?? overrides[groups[g].key] ?? run.flopsPerStepFromFiles()
                }
            }
        }

        let figure = PlotRun.figure(groups, xAxis: xAxis, title: title)
        let url = URL(fileURLWithPath: out)
        try? FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        do { try Data(figure.render().utf8).write(to: url, options: .atomic) } catch {
            throw PlotError("cannot write \(out): \(error.localizedDescription)")
        }
        print("wrote \(out): \(figure.panels.map(\.title).joined(separator: ", ")) against \(xAxis == "flops" ? "training FLOPs" : "step")")
        for g in groups {
            let flops = xAxis == "flops" ? String(format: ", %.3g FLOPs per step", g.runs[0].flopsPerStep ?? 0) : ""
            print("  \(g.label): \(g.runs.count) run(s)\(flops) [\(g.runs.map(\.path).joined(separator: " "))]")
        }
    }
}

struct PlotError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}

/// A run folder as `plot` reads it: its logged series and what it was.
struct PlotRun {
    var path: String
    var task: String
    /// metric -> (step, value), in log order; metrics "loss", "accuracy", "eval_loss".
    var series: [String: [(step: Int, value: Double)]]
    var flopsPerStep: Double?

    static let metrics = ["loss", "accuracy", "eval_loss"]

    /// A path without "./", doubled or trailing slashes.
    static func normalized(_ path: String) -> String {
        let parts = path.split(separator: "/").filter { $0 != "." }.joined(separator: "/")
        return path.hasPrefix("/") ? "/" + parts : parts
    }

    static func load(_ path: String) throws -> PlotRun {
        let path = normalized(path)
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { throw PlotError("\(path) does not exist: give run folders written by moe-gpu train") }
        guard isDir.boolValue else { throw PlotError("\(path) is a file: give run folders (each holding a metrics.jsonl)") }
        let file = (path as NSString).appendingPathComponent("metrics.jsonl")
        guard let data = FileManager.default.contents(atPath: file) else {
            throw PlotError("\(path) has no metrics.jsonl: give run folders written by moe-gpu train")
        }
        var series: [String: [(step: Int, value: Double)]] = [:]
        for (n, line) in String(decoding: data, as: UTF8.self).split(separator: "\n").enumerated() {
            let text = line.trimmingCharacters(in: .whitespaces)
            if text.isEmpty { continue }
            guard let object = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any],
                  let step = (object["step"] as? NSNumber)?.intValue else {
                throw PlotError("\(file) line \(n + 1) is not a JSON object with a step")
            }
            for key in metrics {
                if let v = (object[key] as? NSNumber)?.doubleValue, v.isFinite { series[key, default: []].append((step, v)) }
            }
        }
        guard !(series["loss"] ?? []).isEmpty else { throw PlotError("\(file) has no logged training loss yet") }
        var task = "image"
        if let config = json((path as NSString).appendingPathComponent("config.json")), let t = config["task"] as? String { task = t }
        return PlotRun(path: path, task: task, series: series)
    }

    static func json(_ file: String) -> [String: Any]? {
        FileManager.default.contents(atPath: file).flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] }
    }

    /// 6 x active parameters x tokens per step: from eval.json, else config.json and model.safetensors.
    func flopsPerStepFromFiles() throws -> Double {
        let eval = Self.json((path as NSString).appendingPathComponent("eval.json"))
        if let active = (eval?["active_parameters"] as? NSNumber)?.doubleValue, let tokens = (eval?["tokens_per_step"] as? NSNumber)?.doubleValue {
            return 6 * active * tokens
        }
        let way = "pass --flops-per-step \(path)=F"
        guard let config = Self.json((path as NSString).appendingPathComponent("config.json")) else {
            throw PlotError("\(path): no eval.json with active_parameters and no config.json to count FLOPs from: \(way)")
        }
        let batch = (config["batchSize"] as? NSNumber)?.doubleValue ?? 0, accumulation = (config["gradientAccumulation"] as? NSNumber)?.doubleValue ?? 1
        var perExample: Double
        if task == "lm" {
            perExample = (config["seqLen"] as? NSNumber)?.doubleValue ?? 0
        } else {
            let model = config["model"] as? [String: Any] ?? [:]
            let image = (model["imageSize"] as? NSNumber)?.intValue ?? 0, patch = max((model["patchSize"] as? NSNumber)?.intValue ?? 1, 1)
            perExample = Double((image / patch) * (image / patch) + (model["pool"] as? String == "cls" ? 1 : 0))
        }
        let tokens = batch * accumulation * perExample
        guard tokens > 0 else { throw PlotError("\(path)/config.json does not say the tokens per step: \(way)") }
        guard let weights = try? ModelCheckpoint.open((path as NSString).appendingPathComponent("model.safetensors")) else { throw PlotError("\(path): no eval.json with active_parameters and no readable model.safetensors: \(way)") }
        let total = weights.tensors.reduce(0.0) { $0 + Double($1.shape.reduce(1, *)) }
        let experts = weights.tensors.filter { $0.name.contains(".experts.") || $0.name.contains("_experts.") }.reduce(0.0) { $0 + Double($1.shape.reduce(1, *)) }
        var active = total
        if experts > 0 || weights.metadata["moe-gpu.num_experts"] != nil || weights.metadata["moe-gpu.format"] == "moe" {
            let router = weights.metadata["moe-gpu.router"] ?? ""
            guard router.hasPrefix("topk"), let k = Double(weights.metadata["moe-gpu.top_k"] ?? ""), let e = Double(weights.metadata["moe-gpu.num_experts"] ?? ""), e > 0 else {
                throw PlotError("\(path): cannot count the active parameters of router '\(router)' from model.safetensors, and eval.json has none: \(way)")
            }
            active -= experts * (1 - k / e)
        }
        return 6 * active * tokens
    }

    // MARK: - Groups

    struct Group {
        var key: String
        var label: String
        var runs: [PlotRun]
    }

    /// The path with its seed markers removed: components seedN, suffixes -sN, _sN, -seedN, _seedN.
    static func groupKey(_ path: String) -> String {
        let whole = try! NSRegularExpression(pattern: "^seed[-_]?[0-9]+$", options: .caseInsensitive)
        let suffix = try! NSRegularExpression(pattern: "[-_](s|seed)[0-9]+$", options: .caseInsensitive)
        let parts = normalized(path).split(separator: "/").map(String.init).compactMap { part -> String? in
            let range = NSRange(part.startIndex..., in: part)
            if whole.firstMatch(in: part, range: range) != nil { return nil }
            let stripped = suffix.stringByReplacingMatches(in: part, range: range, withTemplate: "")
            return stripped.isEmpty ? nil : stripped
        }
        return (path.hasPrefix("/") ? "/" : "") + parts.joined(separator: "/")
    }

    /// Runs grouped by `groupKey`, groups in order of first appearance, labelled by their
    /// keys less the leading folders every key shares.
    static func group(_ runs: [PlotRun]) -> [Group] {
        var groups: [Group] = []
        for run in runs {
            let key = groupKey(run.path)
            if let i = groups.firstIndex(where: { $0.key == key }) { groups[i].runs.append(run) } else { groups.append(Group(key: key, label: key, runs: [run])) }
        }
        let split = groups.map { $0.key.split(separator: "/").map(String.init) }
        var shared = split.first ?? []
        for parts in split.dropFirst() {
            shared = Array(zip(shared, parts).prefix { $0 == $1 }.map(\.0))
        }
        if groups.count > 1 {
            for i in groups.indices {
                let rest = split[i].dropFirst(shared.count)
                groups[i].label = rest.isEmpty ? (shared.last ?? groups[i].key) : rest.joined(separator: "/")
            }
        }
        return groups
    }

    // MARK: - Figure

    static func figure(_ groups: [Group], xAxis: String, title: String?) -> SVGFigure {
        let all = groups.flatMap(\.runs)
        var panels: [(metric: String, title: String)] = [("loss", "training loss")]
        if all.contains(where: { $0.task != "lm" && !($0.series["accuracy"] ?? []).isEmpty }) { panels.append(("accuracy", "test accuracy")) }
        if all.contains(where: { $0.task == "lm" && !($0.series["eval_loss"] ?? []).isEmpty }) { panels.append(("eval_loss", "validation loss")) }

        var legend: [(label: String, color: String, runs: Int)] = []
        let built = panels.map { panel -> PlotPanel in
            var lines: [PlotSeries] = []
            for (i, g) in groups.enumerated() {
                let color = SVGFigure.palette[i % SVGFigure.palette.count]
                // accuracy only for image runs, validation loss only for language models
                let members = g.runs.filter { panel.metric == "loss" || (panel.metric == "accuracy") == ($0.task != "lm") }
                guard let line = series(members, metric: panel.metric, xAxis: xAxis) else { continue }
                var s = line
                s.label = g.label; s.color = color
                lines.append(s)
                if !legend.contains(where: { $0.label == g.label }) { legend.append((g.label, color, s.runs)) }
            }
            return PlotPanel(title: panel.title, metric: panel.metric, yLabel: panel.title, series: lines)
        }
        let xLabel = xAxis == "flops" ? "training FLOPs (6 x active parameters x tokens)" : "training step"
        let defaultTitle = built.map(\.title).joined(separator: " and ").prefix(1).uppercased()
            + built.map(\.title).joined(separator: " and ").dropFirst() + (xAxis == "flops" ? " against training FLOPs" : " against step")
        return SVGFigure(title: title ?? defaultTitle, xLabel: xLabel, siX: xAxis == "flops", panels: built, legend: legend)
    }

    /// Mean, min and max of `metric` over the runs, at the steps every run logged it.
    static func series(_ runs: [PlotRun], metric: String, xAxis: String) -> PlotSeries? {
        let per = runs.map { Dictionary(($0.series[metric] ?? []).map { ($0.step, $0.value) }, uniquingKeysWith: { _, last in last }) }
        guard let first = per.first, !first.isEmpty else { return nil }
        let steps = first.keys.filter { s in per.allSatisfy { $0[s] != nil } }.sorted()
        guard !steps.isEmpty else { return nil }
        let dropped = Set(per.flatMap(\.keys)).count - steps.count
        if dropped > 0 {
            FileHandle.standardError.write(Data("note: \(metric) of \(runs.map(\.path).joined(separator: ", ")): \(dropped) step(s) not logged by every run are left out\n".utf8))
        }
        let flops = runs.compactMap(\.flopsPerStep).reduce(0, +) / Double(max(runs.count, 1))
        let x = steps.map { xAxis == "flops" ? Double($0) * flops : Double($0) }
        let values = steps.map { s in per.map { $0[s]! } }
        var line = PlotSeries(label: "", color: "", x: x, y: values.map { $0.reduce(0, +) / Double($0.count) }, runs: runs.count)
        if runs.count > 1 {
            line.low = values.map { $0.min()! }
            line.high = values.map { $0.max()! }
        }
        return line
    }
}
