import Foundation

extension Reference {
    /// The inverse frequencies in float64: `theta^(-2i/d)`, with the Llama-3
    /// scaling of transformers' `_compute_llama3_parameters` applied.
    public static func rotaryFrequencies(_ c: RotaryConfig) -> [Double] {
        (0..<(c.headDim / 2)).map { i in
            let f = 1 / Foundation.pow(Double(c.theta), Double(2 * i) / Double(c.headDim))
            guard let s = c.scaling else { return f }
            let old = Double(s.originalMaxPositions), low = Double(s.lowFreqFactor), high = Double(s.highFreqFactor)
            let factor = Double(s.factor)
            let wavelen = 2 * Double.pi / f
            if wavelen > old / low { return f / factor }
            if wavelen < old / high { return f }
            let smooth = (old / wavelen - low) / (high - low)
            return (1 - smooth) * f / factor + smooth * f
        }
    }

    /// `PositionOps.rotary` in float64 on a host copy of `x` (`positions.count`
    /// rows of `ld`); returns the whole buffer with only the heads' elements changed.
    public static func rotary(_ x: [Double], heads: Int, ld: Int, column: Int, positions: [Int32],
                              config c: RotaryConfig, inverse: Bool) -> [Double] {
        var y = x
        let half = c.headDim / 2, freqs = rotaryFrequencies(c)
        for (t, p) in positions.enumerated() {
            for i in 0..<half {
                let angle = Double(p) * freqs[i] * (inverse ? -1 : 1)
                let cs = Foundation.cos(angle), sn = Foundation.sin(angle)
                for h in 0..<heads {
                    let lo = t * ld + column + h * c.headDim + i, hi = lo + half
                    let a = x[lo], b = x[hi]
                    y[lo] = a * cs - b * sn
                    y[hi] = b * cs + a * sn
                }
            }
        }
        return y
    }
}
