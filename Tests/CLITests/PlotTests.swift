import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import XCTest

/// `moe-gpu plot` on tiny run folders: the SVG is parsed back and every drawn series
/// is checked against the metrics.jsonl it came from.
final class PlotTests: XCTestCase {
    /// One parsed panel: its transform and its lines and bands, by label.
    struct Panel {
        var metric = "", x0 = 0.0, x1 = 0.0, y0 = 0.0, y1 = 0.0, left = 0.0, top = 0.0, width = 0.0, height = 0.0
        var lines: [String: [String: String]] = [:]
        var bands: [String: [String: String]] = [:]
        /// Pixels back to data units.
        func data(_ px: Double, _ py: Double) -> (Double, Double) {
            (x0 + (px - left) / width * (x1 - x0), y0 + (top + height - py) / height * (y1 - y0))
        }
    }

    final class Reader: NSObject, XMLParserDelegate {
        var panels: [Panel] = []
        var legend: [String] = []
        var title = ""
        private var inLegendText = false, inTitle = false, depth = 0
        func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes a: [String: String] = [:]) {
            if name == "g", a["class"] == "panel" {
                var p = Panel()
                p.metric = a["data-metric"] ?? ""
                p.x0 = Double(a["data-x0"]!)!; p.x1 = Double(a["data-x1"]!)!
                p.y0 = Double(a["data-y0"]!)!; p.y1 = Double(a["data-y1"]!)!
                p.left = Double(a["data-left"]!)!; p.top = Double(a["data-top"]!)!
                p.width = Double(a["data-width"]!)!; p.height = Double(a["data-height"]!)!
                panels.append(p)
            }
            if name == "polyline", a["class"] == "series" { panels[panels.count - 1].lines[a["data-label"]!] = a }
            if name == "polygon", a["class"] == "band" { panels[panels.count - 1].bands[a["data-label"]!] = a }
            if name == "text", a["class"] == "legend-label" { inLegendText = true; legend.append("") }
            if name == "text", a["font-weight"] == "bold" { inTitle = true }
        }
        func parser(_ parser: XMLParser, foundCharacters string: String) {
            if inLegendText { legend[legend.count - 1] += string }
            if inTitle { title += string }
        }
        func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
            if name == "text" { inLegendText = false; inTitle = false }
        }
    }

    static func parse(_ url: URL) throws -> Reader {
        let parser = try XCTUnwrap(XMLParser(contentsOf: url))
        let reader = Reader()
        parser.delegate = reader
        XCTAssertTrue(parser.parse(), "the SVG is well-formed XML: \(String(describing: parser.parserError))")
        return reader
    }

    static func numbers(_ s: String?) -> [Double] { (s ?? "").split(separator: ",").map { Double($0)! } }
    static func points(_ s: String?) -> [(Double, Double)] {
        (s ?? "").split(separator: " ").map { p in let xy = p.split(separator: ","); return (Double(xy[0])!, Double(xy[1])!) }
    }

    /// Writes a run folder: metrics.jsonl with `loss` at every step and `eval` (accuracy or eval_loss) at some.
    func writeRun(_ dir: URL, task: String, loss: [Int: Double], eval: [Int: Double], evalKey: String,
                  evalJSON: [String: Any]? = nil) throws {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        var lines = ""
        for step in loss.keys.sorted() {
            var o: [String: Any] = ["step": step, "loss": loss[step]!, "lr": 0.001, "grad_norm": 1.0, "tokens_per_s": 100.0, "elapsed_s": 0.1]
            if let e = eval[step] { o[evalKey] = e }
            lines += String(decoding: try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]), as: UTF8.self) + "\n"
        }
        try Data(lines.utf8).write(to: dir.appendingPathComponent("metrics.jsonl"))
        let config: [String: Any] = ["task": task, "batchSize": 4, "seqLen": 8, "gradientAccumulation": 1, "seed": 0]
        try JSONSerialization.data(withJSONObject: config).write(to: dir.appendingPathComponent("config.json"))
        if let evalJSON { try JSONSerialization.data(withJSONObject: evalJSON).write(to: dir.appendingPathComponent("eval.json")) }
    }

    /// Every drawn point of `label` in `panel` maps back (through the panel's transform) to
    /// the expected x and y, and the raw data-x / data-y are exactly those.
    func checkLine(_ panel: Panel, _ label: String, x: [Double], y: [Double], runs: Int, file: StaticString = #filePath, line: UInt = #line) {
        guard let a = panel.lines[label] else { return XCTFail("no line '\(label)' in panel \(panel.metric): \(panel.lines.keys)", file: file, line: line) }
        XCTAssertEqual(a["data-runs"], "\(runs)", file: file, line: line)
        XCTAssertEqual(Self.numbers(a["data-x"]), x, file: file, line: line)
        let rawY = Self.numbers(a["data-y"])
        XCTAssertEqual(rawY.count, y.count, file: file, line: line)
        for (r, e) in zip(rawY, y) { XCTAssertEqual(r, e, accuracy: 1e-12, file: file, line: line) }
        let drawn = Self.points(a["points"])
        XCTAssertEqual(drawn.count, x.count, file: file, line: line)
        // Points are written to 0.01 px: allow that much of the axis range.
        let tx = 0.01 / panel.width * (panel.x1 - panel.x0), ty = 0.01 / panel.height * (panel.y1 - panel.y0)
        for (i, p) in drawn.enumerated() where i < x.count {
            let (dx, dy) = panel.data(p.0, p.1)
            XCTAssertEqual(dx, x[i], accuracy: tx, "x of point \(i) of \(label)", file: file, line: line)
            XCTAssertEqual(dy, y[i], accuracy: ty, "y of point \(i) of \(label)", file: file, line: line)
        }
    }

    func testSeedsAreGroupedIntoMeanAndBandAndEverySeriesMatchesTheMetrics() throws {
        let dir = try CLI.temporaryDirectory(self)
        // Two seeds of "moe" (seedN folders), two of "dense-sN" (a suffix), one lone run.
        let moe0 = [10: 2.0, 20: 1.5, 30: 1.2], moe1 = [10: 2.4, 20: 1.3, 30: 1.0, 40: 0.9]   // seed 1 logged one more step
        try writeRun(dir.appendingPathComponent("exp/seed0"), task: "image", loss: moe0, eval: [20: 0.5, 30: 0.6], evalKey: "accuracy")
        try writeRun(dir.appendingPathComponent("exp/seed1"), task: "image", loss: moe1, eval: [20: 0.7, 30: 0.8], evalKey: "accuracy")
        try writeRun(dir.appendingPathComponent("exp/dense-s0"), task: "image", loss: [10: 3.0, 20: 2.0], eval: [20: 0.4], evalKey: "accuracy")
        try writeRun(dir.appendingPathComponent("exp/dense-s1"), task: "image", loss: [10: 2.0, 20: 1.0], eval: [20: 0.2], evalKey: "accuracy")
        try writeRun(dir.appendingPathComponent("exp/lone"), task: "image", loss: [5: 1.0, 15: 0.5], eval: [15: 0.9], evalKey: "accuracy")
        let out = dir.appendingPathComponent("figs/plot.svg")
        let r = try CLI.run(["plot", "exp/seed0", "exp/dense-s0", "exp/seed1/", "./exp/dense-s1", "exp/lone", "--out", out.path], directory: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("left out"), "the step only seed 1 logged is reported: \(r.stderr)")

        let svg = try Self.parse(out)
        XCTAssertEqual(svg.panels.map(\.metric), ["loss", "accuracy"])
        XCTAssertEqual(svg.legend.count, 3, "\(svg.legend)")
        XCTAssertTrue(svg.legend[0].hasPrefix("exp (mean of 2 runs"), svg.legend[0])   // groups in order of first appearance
        XCTAssertTrue(svg.legend[1].hasPrefix("dense (mean of 2 runs"), svg.legend[1])
        XCTAssertEqual(svg.legend[2], "lone")
        XCTAssertTrue(svg.title.contains("against step"), svg.title)

        let loss = svg.panels[0], accuracy = svg.panels[1]
        checkLine(loss, "exp", x: [10, 20, 30], y: [2.2, 1.4, 1.1], runs: 2)
        checkLine(loss, "dense", x: [10, 20], y: [2.5, 1.5], runs: 2)
        checkLine(loss, "lone", x: [5, 15], y: [1.0, 0.5], runs: 1)
        checkLine(accuracy, "exp", x: [20, 30], y: [0.6, 0.7], runs: 2)
        checkLine(accuracy, "dense", x: [20], y: [0.30000000000000004], runs: 2)
        checkLine(accuracy, "lone", x: [15], y: [0.9], runs: 1)
        // Bands: min and max over the seeds; none for a single run.
        let band = try XCTUnwrap(loss.bands["exp"])
        XCTAssertEqual(Self.numbers(band["data-low"]), [2.0, 1.3, 1.0])
        XCTAssertEqual(Self.numbers(band["data-high"]), [2.4, 1.5, 1.2])
        let outline = Self.points(band["points"]).map { loss.data($0.0, $0.1) }
        let expected: [(Double, Double)] = [(10, 2.4), (20, 1.5), (30, 1.2), (30, 1.0), (20, 1.3), (10, 2.0)]   // upper edge, then lower edge back
        XCTAssertEqual(outline.count, expected.count)
        for (p, e) in zip(outline, expected) {
            XCTAssertEqual(p.0, e.0, accuracy: 0.01); XCTAssertEqual(p.1, e.1, accuracy: 0.01)
        }
        XCTAssertEqual(Self.numbers(accuracy.bands["dense"]?["data-low"]), [0.2])
        XCTAssertNil(loss.bands["lone"])
        // Every value lies inside its panel's axes.
        for panel in svg.panels { for a in panel.lines.values { for p in Self.points(a["points"]) {
            XCTAssertTrue(p.0 >= panel.left - 0.01 && p.0 <= panel.left + panel.width + 0.01 && p.1 >= panel.top - 0.01 && p.1 <= panel.top + panel.height + 0.01)
        } } }
    }

    func testFLOPsAxisAndLanguageModelValidationLoss() throws {
        let dir = try CLI.temporaryDirectory(self)
        // An LM with eval.json's count (6 x 1000 x 32 = 192,000 FLOPs a step), one taking an override.
        try writeRun(dir.appendingPathComponent("lm/seed0"), task: "lm", loss: [10: 3.0, 20: 2.5], eval: [20: 2.8], evalKey: "eval_loss",
                     evalJSON: ["active_parameters": 1000, "tokens_per_step": 32])
        try writeRun(dir.appendingPathComponent("lm/seed1"), task: "lm", loss: [10: 3.2, 20: 2.7], eval: [20: 3.0], evalKey: "eval_loss",
                     evalJSON: ["active_parameters": 1000, "tokens_per_step": 32])
        try writeRun(dir.appendingPathComponent("other"), task: "lm", loss: [10: 3.0, 30: 2.0], eval: [30: 2.5], evalKey: "eval_loss")
        let out = dir.appendingPathComponent("flops.svg")
        let r = try CLI.run(["plot", "lm/seed0", "lm/seed1", "other", "--x", "flops", "--flops-per-step", "other=5e4",
                             "--label", "MoE", "--label", "dense", "--out", out.path], directory: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let svg = try Self.parse(out)
        XCTAssertEqual(svg.panels.map(\.metric), ["loss", "eval_loss"], "language models: validation loss, not accuracy")
        XCTAssertTrue(svg.title.contains("against training FLOPs"), svg.title)
        checkLine(svg.panels[0], "MoE", x: [10 * 192_000, 20 * 192_000], y: [3.1, 2.6], runs: 2)
        checkLine(svg.panels[0], "dense", x: [10 * 5e4, 30 * 5e4], y: [3.0, 2.0], runs: 1)
        checkLine(svg.panels[1], "MoE", x: [20 * 192_000], y: [2.9], runs: 2)
        checkLine(svg.panels[1], "dense", x: [30 * 5e4], y: [2.5], runs: 1)

        // Without the override, a run with no count anywhere says how to give one.
        let missing = try CLI.run(["plot", "other", "--x", "flops", "--out", out.path], directory: dir)
        XCTAssertNotEqual(missing.status, 0)
        XCTAssertTrue(missing.stderr.contains("--flops-per-step other="), missing.stderr)
    }

    /// A real run: eval.json's active_parameters x tokens_per_step (written by train) and the
    /// count from config.json + model.safetensors (a top-2 of 4 MoE) give the same FLOPs.
    func testFLOPsFromEvalJSONAndFromTheCheckpointAgree() throws {
        guard FileManager.default.fileExists(atPath: "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz") else {
            throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
        }
        let dir = try CLI.temporaryDirectory(self)
        _ = try CLI.smallTrainConfig(in: dir, replacing: ["\"testExamples\": 100": "\"testExamples\": 50", "\"steps\": 4": "\"steps\": 2",
                                                          "\"evalEvery\": 2": "\"evalEvery\": 1"])
        let train = try CLI.run(["train", "--config", "config.json", "--device", "cpu", "--out", "run"], directory: dir)
        XCTAssertEqual(train.status, 0, train.stderr)
        let eval = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: dir.appendingPathComponent("run/eval.json"))) as? [String: Any])
        let active = try XCTUnwrap(eval["active_parameters"] as? Double), tokens = try XCTUnwrap(eval["tokens_per_step"] as? Double)
        XCTAssertEqual(tokens, 16 * 16)
        XCTAssertLessThan(active, try XCTUnwrap(eval["parameters"] as? Double), "half of the expert bank is inactive per token")
        try FileManager.default.copyItem(at: dir.appendingPathComponent("run"), to: dir.appendingPathComponent("bare"))
        try FileManager.default.removeItem(at: dir.appendingPathComponent("bare/eval.json"))
        let out = dir.appendingPathComponent("p.svg")
        let r = try CLI.run(["plot", "run", "bare", "--x", "flops", "--out", out.path], directory: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let loss = try Self.parse(out).panels[0]
        XCTAssertEqual(Self.numbers(loss.lines["run"]?["data-x"]), [1, 2].map { $0 * 6 * active * tokens })
        XCTAssertEqual(Self.numbers(loss.lines["bare"]?["data-x"]), Self.numbers(loss.lines["run"]?["data-x"]))
    }

    func testAFolderWithoutMetricsIsAOneLineError() throws {
        let dir = try CLI.temporaryDirectory(self)
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("empty"), withIntermediateDirectories: true)
        let r = try CLI.run(["plot", "empty", "--out", "x.svg"], directory: dir)
        XCTAssertNotEqual(r.status, 0)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("empty has no metrics.jsonl"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("x.svg").path))
    }
}
