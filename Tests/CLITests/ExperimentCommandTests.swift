import Foundation
import XCTest
import MoETestSupport

/// `moe-gpu experiment seeds --quick`: every arm, budget and seed runs, the
/// summary and the claim verdicts come from the runs' files, a second run skips
/// what is finished, an interrupted run resumes, a changed recipe is refused.
final class ExperimentCommandTests: XCTestCase {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    func testQuickSeedsExperimentRunsSkipsAndResumes() throws {
        let recipe = Self.repository.appendingPathComponent("experiments/seeds.json")
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("seeds")
        let first = try CLI.run(["experiment", recipe.path, "--quick", "--out", out.path], directory: dir)
        XCTAssertEqual(first.status, 0, "\(first.stdout.suffix(2000))\n\(first.stderr)")

        let recipeJSON = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: recipe)) as? [String: Any])
        let arms = try XCTUnwrap(recipeJSON["arms"] as? [[String: Any]])
        let claims = try XCTUnwrap(recipeJSON["claims"] as? [[String: Any]])
        let summary = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: out.appendingPathComponent("summary.json"))) as? [String: Any])
        let rows = try XCTUnwrap(summary["rows"] as? [[String: Any]])
        XCTAssertEqual(rows.count, arms.count * 2, "every arm at both quick budgets")
        XCTAssertEqual((summary["transferRows"] as? [[String: Any]])?.count, arms.count)
        XCTAssertEqual((summary["claims"] as? [[String: Any]])?.count, claims.count)

        // Each row's accuracies are the runs' eval.json values, and each run logged its metrics.
        for row in rows {
            let arm = try XCTUnwrap(row["arm"] as? String), budget = try XCTUnwrap(row["budget"] as? Double)
            let accuracies = try XCTUnwrap(row["accuracies"] as? [Double])
            XCTAssertEqual(accuracies.count, 2, "two quick seeds")
            for (seed, acc) in accuracies.enumerated() {
                let run = out.appendingPathComponent(String(format: "budget-%g", 100 * budget)).appendingPathComponent(arm).appendingPathComponent("seed\(seed)")
                let eval = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: run.appendingPathComponent("eval.json"))) as? [String: Any])
                XCTAssertEqual(eval["accuracy"] as? Double, acc, "\(run.path)")
                XCTAssertTrue(FileManager.default.fileExists(atPath: run.appendingPathComponent("metrics.jsonl").path))
            }
        }
        // The equal-FLOPs dense arm trains more steps than the dense arm, as its own run.
        let dense = try XCTUnwrap(rows.first { $0["arm"] as? String == "dense" }), flops = try XCTUnwrap(rows.first { $0["arm"] as? String == "dense-equal-flops" })
        XCTAssertGreaterThan(try XCTUnwrap(flops["steps"] as? Int), try XCTUnwrap(dense["steps"] as? Int))
        let results = try String(contentsOf: out.appendingPathComponent("results.md"), encoding: .utf8)
        for arm in arms { XCTAssertTrue(results.contains(try XCTUnwrap(arm["label"] as? String)), "results.md lists \(arm["label"]!)") }
        for claim in claims { XCTAssertTrue(results.contains("**\(try XCTUnwrap(claim["id"] as? String))**")) }
        // The figures parse, one line per plotted arm.
        let svg = try PlotTests.parse(out.appendingPathComponent("figures/main-budget-50.svg"))
        XCTAssertEqual(svg.panels.map(\.metric), ["loss", "accuracy"])
        XCTAssertEqual(svg.panels[1].lines.count, 5)

        // Again: everything is skipped.
        let again = try CLI.run(["experiment", recipe.path, "--quick", "--out", out.path], directory: dir)
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertEqual(again.stdout.components(separatedBy: "skipped").count - 1, arms.count * 2 * 2 + arms.count * 2, again.stdout.suffix(3000).description)
        XCTAssertEqual(try String(contentsOf: out.appendingPathComponent("results.md"), encoding: .utf8), results, "same runs, same tables")

        // An interrupted run (no eval.json, metrics past its last checkpoint) resumes.
        let run = out.appendingPathComponent("budget-50/jetpack/seed1")
        try FileManager.default.removeItem(at: run.appendingPathComponent("eval.json"))
        let resumed = try CLI.run(["experiment", recipe.path, "--quick", "--out", out.path], directory: dir)
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertTrue(resumed.stdout.contains("jetpack budget 50% seed 1: resuming at step"), resumed.stdout.suffix(3000).description)
        XCTAssertTrue(FileManager.default.fileExists(atPath: run.appendingPathComponent("eval.json").path))

        // A run folder from another recipe is refused, not overwritten.
        let config = run.appendingPathComponent("config.json")
        var changed = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: config)) as? [String: Any])
        changed["learningRate"] = 0.5
        try JSONSerialization.data(withJSONObject: changed).write(to: config)
        let refused = try CLI.run(["experiment", recipe.path, "--quick", "--out", out.path], directory: dir)
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.stderr.contains("holds a run with another config"), refused.stderr)

        // An unknown recipe names the known ones.
        let unknown = try CLI.run(["experiment", "nope"], directory: Self.repository)
        XCTAssertNotEqual(unknown.status, 0)
        XCTAssertTrue(unknown.stderr.contains("known: seeds"), unknown.stderr)
    }
}
