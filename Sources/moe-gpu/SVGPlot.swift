import Foundation

// Line charts as SVG, written by hand (no dependencies): one or more panels side
// by side, each with axes, ticks, tick labels and axis titles, one polyline per
// series (the mean where the series stands for several runs) with a translucent
// min..max band, and a legend underneath.
//
// Reading a figure back: every panel is a `<g class="panel">` whose data-x0,
// data-x1, data-y0, data-y1 (the axis ranges, in data units) and data-left,
// data-top, data-width, data-height (the plot area, in pixels) give the transform
//     px = left + (x - x0) / (x1 - x0) * width
//     py = top + height - (y - y0) / (y1 - y0) * height
// Every series' `<polyline class="series">` also carries its raw values (data-x,
// data-y, comma-separated) and its band `<polygon class="band">` data-low and
// data-high, so a test can check the drawn points against the numbers.

/// One line of a panel: x and (mean) y values, and for a group of runs the band.
struct PlotSeries {
    var label: String
    var color: String
    var x: [Double]
    var y: [Double]
    var low: [Double]? = nil
    var high: [Double]? = nil
    var runs: Int = 1
}

struct PlotPanel {
    var title: String
    var metric: String
    var yLabel: String
    var series: [PlotSeries]
}

struct SVGFigure {
    var title: String
    var xLabel: String
    /// Tick labels on the x axis with SI prefixes (k, M, G, T, P): for FLOPs.
    var siX = false
    var panels: [PlotPanel]
    /// Legend entries: label, colour and how many runs the line stands for (in panel order of first appearance).
    var legend: [(label: String, color: String, runs: Int)]

    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

    static let panelWidth = 520.0, panelHeight = 380.0
    static let margin = (left: 78.0, right: 20.0, top: 34.0, bottom: 56.0)
    static let titleHeight = 40.0, legendRow = 22.0

    func render() -> String {
        let w = Self.panelWidth * Double(max(panels.count, 1))
        let legendTop = Self.titleHeight + Self.panelHeight + 8
        let h = legendTop + Double(legend.count) * Self.legendRow + 14
        var s = """
        <?xml version="1.0" encoding="UTF-8"?>
        <svg xmlns="http://www.w3.org/2000/svg" width="\(f(w))" height="\(f(h))" viewBox="0 0 \(f(w)) \(f(h))" font-family="Helvetica, Arial, sans-serif" font-size="13">
        <desc>Written by moe-gpu plot. Each g.panel maps data to pixels as px = left + (x - x0) / (x1 - x0) * width, py = top + height - (y - y0) / (y1 - y0) * height (its data-* attributes); each polyline.series carries its raw values in data-x and data-y, each polygon.band its min and max over runs in data-low and data-high.</desc>
        <rect x="0" y="0" width="\(f(w))" height="\(f(h))" fill="white"/>
        <text x="\(f(w / 2))" y="26" text-anchor="middle" font-size="17" font-weight="bold">\(xml(title))</text>

        """
        for (i, panel) in panels.enumerated() { s += renderPanel(panel, originX: Double(i) * Self.panelWidth, originY: Self.titleHeight) }
        s += "<g class=\"legend\">\n"
        for (i, entry) in legend.enumerated() {
            let y = legendTop + Double(i) * Self.legendRow + 11
            let x = Self.margin.left
            if entry.runs > 1 {
                s += "<rect x=\"\(f(x))\" y=\"\(f(y - 7))\" width=\"30\" height=\"14\" fill=\"\(entry.color)\" fill-opacity=\"0.18\"/>\n"
            }
            s += "<line x1=\"\(f(x))\" y1=\"\(f(y))\" x2=\"\(f(x + 30))\" y2=\"\(f(y))\" stroke=\"\(entry.color)\" stroke-width=\"2.5\"/>\n"
            let note = entry.runs > 1 ? " (mean of \(entry.runs) runs, band: min to max)" : ""
            s += "<text class=\"legend-label\" x=\"\(f(x + 40))\" y=\"\(f(y + 4.5))\">\(xml(entry.label + note))</text>\n"
        }
        s += "</g>\n</svg>\n"
        return s
    }

    private func renderPanel(_ panel: PlotPanel, originX: Double, originY: Double) -> String {
        let m = Self.margin
        let left = originX + m.left, top = originY + m.top
        let width = Self.panelWidth - m.left - m.right, height = Self.panelHeight - m.top - m.bottom
        let xs = panel.series.flatMap(\.x)
        let ys = panel.series.flatMap { $0.y + ($0.low ?? []) + ($0.high ?? []) }
        let (x0, x1, xStep) = Self.axis(min(0, xs.min() ?? 0), xs.max() ?? 1, pad: false)
        let (y0, y1, yStep) = Self.axis(ys.min() ?? 0, ys.max() ?? 1, pad: true)
        func px(_ x: Double) -> Double { left + (x - x0) / (x1 - x0) * width }
        func py(_ y: Double) -> Double { top + height - (y - y0) / (y1 - y0) * height }

        var s = "<g class=\"panel\" data-metric=\"\(xml(panel.metric))\" data-x0=\"\(x0)\" data-x1=\"\(x1)\" data-y0=\"\(y0)\" data-y1=\"\(y1)\" data-left=\"\(left)\" data-top=\"\(top)\" data-width=\"\(width)\" data-height=\"\(height)\">\n"
        s += "<text x=\"\(f(left + width / 2))\" y=\"\(f(top - 12))\" text-anchor=\"middle\" font-size=\"15\">\(xml(panel.title))</text>\n"
        // Grid and ticks.
        s += "<g class=\"grid\" stroke=\"#e4e4e4\" stroke-width=\"1\">\n"
        let xTicks = Self.ticks(x0, x1, xStep), yTicks = Self.ticks(y0, y1, yStep)
        for t in xTicks { s += "<line x1=\"\(f(px(t)))\" y1=\"\(f(top))\" x2=\"\(f(px(t)))\" y2=\"\(f(top + height))\"/>\n" }
        for t in yTicks { s += "<line x1=\"\(f(left))\" y1=\"\(f(py(t)))\" x2=\"\(f(left + width))\" y2=\"\(f(py(t)))\"/>\n" }
        s += "</g>\n<g class=\"axes\" stroke=\"#333\" stroke-width=\"1\">\n"
        s += "<line x1=\"\(f(left))\" y1=\"\(f(top + height))\" x2=\"\(f(left + width))\" y2=\"\(f(top + height))\"/>\n"
        s += "<line x1=\"\(f(left))\" y1=\"\(f(top))\" x2=\"\(f(left))\" y2=\"\(f(top + height))\"/>\n"
        for t in xTicks { s += "<line x1=\"\(f(px(t)))\" y1=\"\(f(top + height))\" x2=\"\(f(px(t)))\" y2=\"\(f(top + height + 5))\"/>\n" }
        for t in yTicks { s += "<line x1=\"\(f(left - 5))\" y1=\"\(f(py(t)))\" x2=\"\(f(left))\" y2=\"\(f(py(t)))\"/>\n" }
        s += "</g>\n<g class=\"tick-labels\" fill=\"#333\" font-size=\"12\">\n"
        for t in xTicks {
            s += "<text x=\"\(f(px(t)))\" y=\"\(f(top + height + 19))\" text-anchor=\"middle\">\(xml(siX ? Self.si(t, step: xStep, top: x1) : Self.decimal(t, step: xStep)))</text>\n"
        }
        for t in yTicks {
            s += "<text x=\"\(f(left - 8))\" y=\"\(f(py(t) + 4))\" text-anchor=\"end\">\(xml(Self.decimal(t, step: yStep)))</text>\n"
        }
        s += "</g>\n"
        s += "<text class=\"x-label\" x=\"\(f(left + width / 2))\" y=\"\(f(top + height + 42))\" text-anchor=\"middle\">\(xml(xLabel))</text>\n"
        let yMid = top + height / 2
        s += "<text class=\"y-label\" x=\"\(f(originX + 18))\" y=\"\(f(yMid))\" text-anchor=\"middle\" transform=\"rotate(-90 \(f(originX + 18)) \(f(yMid)))\">\(xml(panel.yLabel))</text>\n"
        // Bands under the lines, then the lines, then point markers for sparse series.
        for series in panel.series {
            guard let low = series.low, let high = series.high, series.runs > 1 else { continue }
            let upper = zip(series.x, high).map { "\(f(px($0))),\(f(py($1)))" }
            let lower = zip(series.x, low).reversed().map { "\(f(px($0))),\(f(py($1)))" }
            s += "<polygon class=\"band\" data-label=\"\(xml(series.label))\" data-x=\"\(list(series.x))\" data-low=\"\(list(low))\" data-high=\"\(list(high))\" fill=\"\(series.color)\" fill-opacity=\"0.18\" stroke=\"none\" points=\"\((upper + lower).joined(separator: " "))\"/>\n"
        }
        for series in panel.series {
            let points = zip(series.x, series.y).map { "\(f(px($0))),\(f(py($1)))" }.joined(separator: " ")
            s += "<polyline class=\"series\" data-label=\"\(xml(series.label))\" data-runs=\"\(series.runs)\" data-x=\"\(list(series.x))\" data-y=\"\(list(series.y))\" fill=\"none\" stroke=\"\(series.color)\" stroke-width=\"2\" stroke-linejoin=\"round\" points=\"\(points)\"><title>\(xml(series.label))</title></polyline>\n"
            if series.x.count <= 12 {
                s += "<g class=\"markers\" fill=\"\(series.color)\">"
                for (x, y) in zip(series.x, series.y) { s += "<circle cx=\"\(f(px(x)))\" cy=\"\(f(py(y)))\" r=\"3\"/>" }
                s += "</g>\n"
            }
        }
        return s + "</g>\n"
    }

    // MARK: - Axes

    /// A range that starts and ends on ticks, and its tick step: 1, 2, 2.5 or 5 x 10^k, about 5 ticks.
    static func axis(_ lo: Double, _ hi: Double, pad: Bool) -> (Double, Double, Double) {
        var lo = lo, hi = hi
        if !(hi > lo) { let d = lo == 0 ? 1 : abs(lo) * 0.05; lo -= d; hi += d }
        if pad { let d = (hi - lo) * 0.04; lo -= d; hi += d }
        let step = niceStep((hi - lo) / 5)
        return ((lo / step).rounded(.down) * step, (hi / step).rounded(.up) * step, step)
    }

    static func niceStep(_ raw: Double) -> Double {
        let p = pow(10, (log10(raw)).rounded(.down)), m = raw / p
        return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 2.5 ? 2.5 : m <= 5 ? 5 : 10) * p
    }

    static func ticks(_ lo: Double, _ hi: Double, _ step: Double) -> [Double] {
        let n = Int(((hi - lo) / step).rounded())
        return (0...max(n, 0)).map { lo + Double($0) * step }
    }

    /// Decimals enough to tell ticks `step` apart.
    static func decimal(_ v: Double, step: Double) -> String {
        var digits = max(0, Int((-log10(step)).rounded(.up)))
        if (step * pow(10, Double(digits))).truncatingRemainder(dividingBy: 1) > 1e-6 { digits += 1 }
        let text = String(format: "%.\(digits)f", v)
        return text.hasPrefix("-") && Double(text) == 0 ? String(text.dropFirst()) : text
    }

    /// `v` with the SI prefix of the axis' largest value: 2.5T, 500G...
    static func si(_ v: Double, step: Double, top: Double) -> String {
        if v == 0 { return "0" }
        let prefixes: [(Double, String)] = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        guard let (scale, name) = prefixes.first(where: { top >= $0.0 }) else { return decimal(v, step: step) }
        return decimal(v / scale, step: step / scale) + name
    }

    // MARK: - Text

    private func f(_ v: Double) -> String { String(format: "%.2f", v) }
    private func list(_ v: [Double]) -> String { v.map { "\($0)" }.joined(separator: ",") }
    private func xml(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }
}
