import Foundation

/// Float64 references for `NNOps` and `OptimOps`: the maths written out with
/// no attention to speed. Arrays are row-major; `rows x features`.
extension Reference {
    // MARK: Normalisation

    public static func layerNorm(_ x: [Double], gamma: [Double], beta: [Double], eps: Double)
        -> (y: [Double], mean: [Double], rstd: [Double]) {
        let f = gamma.count, rows = x.count / f
        var y = [Double](repeating: 0, count: x.count), mean = [Double](repeating: 0, count: rows), rstd = mean
        for r in 0..<rows {
            let row = x[(r * f)..<(r * f + f)]
            let mu = row.reduce(0, +) / Double(f)
            let variance = row.reduce(0) { $0 + ($1 - mu) * ($1 - mu) } / Double(f)
            let rs = 1 / (variance + eps).squareRoot()
            mean[r] = mu; rstd[r] = rs
            for j in 0..<f { y[r * f + j] = (x[r * f + j] - mu) * rs * gamma[j] + beta[j] }
        }
        return (y, mean, rstd)
    }

    public static func layerNormBackward(_ dy: [Double], x: [Double], gamma: [Double], eps: Double)
        -> (dx: [Double], dGamma: [Double], dBeta: [Double]) {
        let f = gamma.count, rows = x.count / f
        let (_, mean, rstd) = layerNorm(x, gamma: gamma, beta: [Double](repeating: 0, count: f), eps: eps)
        var dx = [Double](repeating: 0, count: x.count), dg = [Double](repeating: 0, count: f), db = dg
        for r in 0..<rows {
            var meanG = 0.0, meanGX = 0.0
            for j in 0..<f {
                let xhat = (x[r * f + j] - mean[r]) * rstd[r], g = dy[r * f + j] * gamma[j]
                meanG += g; meanGX += g * xhat
                dg[j] += dy[r * f + j] * xhat; db[j] += dy[r * f + j]
            }
            meanG /= Double(f); meanGX /= Double(f)
            for j in 0..<f {
                let xhat = (x[r * f + j] - mean[r]) * rstd[r]
                dx[r * f + j] = rstd[r] * (dy[r * f + j] * gamma[j] - meanG - xhat * meanGX)
            }
        }
        return (dx, dg, db)
    }

    public static func rmsNorm(_ x: [Double], gamma: [Double], eps: Double) -> (y: [Double], rstd: [Double]) {
        let f = gamma.count, rows = x.count / f
        var y = [Double](repeating: 0, count: x.count), rstd = [Double](repeating: 0, count: rows)
        for r in 0..<rows {
            let ms = x[(r * f)..<(r * f + f)].reduce(0) { $0 + $1 * $1 } / Double(f)
            rstd[r] = 1 / (ms + eps).squareRoot()
            for j in 0..<f { y[r * f + j] = x[r * f + j] * rstd[r] * gamma[j] }
        }
        return (y, rstd)
    }

    public static func rmsNormBackward(_ dy: [Double], x: [Double], gamma: [Double], eps: Double)
        -> (dx: [Double], dGamma: [Double]) {
        let f = gamma.count, rows = x.count / f
        let rstd = rmsNorm(x, gamma: gamma, eps: eps).rstd
        var dx = [Double](repeating: 0, count: x.count), dg = [Double](repeating: 0, count: f)
        for r in 0..<rows {
            var meanGX = 0.0
            for j in 0..<f {
                meanGX += dy[r * f + j] * gamma[j] * x[r * f + j]
                dg[j] += dy[r * f + j] * x[r * f + j] * rstd[r]
            }
            meanGX /= Double(f)
            let r3 = rstd[r] * rstd[r] * rstd[r]
            for j in 0..<f { dx[r * f + j] = rstd[r] * dy[r * f + j] * gamma[j] - x[r * f + j] * r3 * meanGX }
        }
        return (dx, dg)
    }

    // MARK: Broadcasts and reductions

    public static func addBroadcast(_ b: [Double], to y: [Double]) -> [Double] {
        y.indices.map { y[$0] + b[$0 % b.count] }
    }

    public static func sumRows(_ x: [Double], columns: Int) -> [Double] {
        var out = [Double](repeating: 0, count: columns)
        for i in x.indices { out[i % columns] += x[i] }
        return out
    }

    // MARK: Activations

    public static func activation(_ f: ActivationFunction, _ x: Double) -> Double {
        switch f {
        case .geluErf: return 0.5 * x * (1 + erf(x / 2.0.squareRoot()))
        case .geluTanh:
            let k = (2 / Double.pi).squareRoot()
            return 0.5 * x * (1 + tanh(k * (x + 0.044715 * x * x * x)))
        case .silu: return x / (1 + exp(-x))
        }
    }

    public static func activationDerivative(_ f: ActivationFunction, _ x: Double) -> Double {
        switch f {
        case .geluErf:
            return 0.5 * (1 + erf(x / 2.0.squareRoot())) + x * exp(-0.5 * x * x) / (2 * Double.pi).squareRoot()
        case .geluTanh:
            let k = (2 / Double.pi).squareRoot()
            let t = tanh(k * (x + 0.044715 * x * x * x))
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
        case .silu:
            let s = 1 / (1 + exp(-x))
            return s * (1 + x * (1 - s))
        }
    }

    public static func activation(_ f: ActivationFunction, _ x: [Double]) -> [Double] { x.map { activation(f, $0) } }

    public static func activationBackward(_ f: ActivationFunction, _ dy: [Double], x: [Double]) -> [Double] {
        x.indices.map { dy[$0] * activationDerivative(f, x[$0]) }
    }

    /// `x: [rows, 2I]` (gate half, value half) -> `[rows, I]`.
    public static func swiGLU(_ x: [Double], hidden: Int) -> [Double] {
        let rows = x.count / (2 * hidden)
        var y = [Double](repeating: 0, count: rows * hidden)
        for r in 0..<rows { for i in 0..<hidden {
            y[r * hidden + i] = activation(.silu, x[r * 2 * hidden + i]) * x[r * 2 * hidden + hidden + i]
        } }
        return y
    }

    public static func swiGLUBackward(_ dy: [Double], x: [Double], hidden: Int) -> [Double] {
        let rows = x.count / (2 * hidden)
        var dx = [Double](repeating: 0, count: x.count)
        for r in 0..<rows { for i in 0..<hidden {
            let a = x[r * 2 * hidden + i], b = x[r * 2 * hidden + hidden + i], g = dy[r * hidden + i]
            dx[r * 2 * hidden + i] = g * b * activationDerivative(.silu, a)
            dx[r * 2 * hidden + hidden + i] = g * activation(.silu, a)
        } }
        return dx
    }

    // MARK: Softmax and layout

    public static func softmax(_ x: [Double], features f: Int, scale: Double = 1, causal: Bool = false) -> [Double] {
        var y = [Double](repeating: 0, count: x.count)
        for r in 0..<(x.count / f) {
            let visible = causal ? (r % f) + 1 : f
            let z = (0..<visible).map { scale * x[r * f + $0] }
            let m = z.max()!
            let e = z.map { exp($0 - m) }
            let s = e.reduce(0, +)
            for j in 0..<visible { y[r * f + j] = e[j] / s }
        }
        return y
    }

    public static func softmaxBackward(_ dy: [Double], y: [Double], features f: Int, scale: Double = 1) -> [Double] {
        var dx = [Double](repeating: 0, count: y.count)
        for r in 0..<(y.count / f) {
            var dot = 0.0
            for j in 0..<f { dot += dy[r * f + j] * y[r * f + j] }
            for j in 0..<f { dx[r * f + j] = scale * y[r * f + j] * (dy[r * f + j] - dot) }
        }
        return dx
    }

    /// `out.shape[i] == shape[permutation[i]]`.
    public static func transposeAxes<T>(_ x: [T], shape: [Int], permutation: [Int]) -> [T] {
        let outShape = permutation.map { shape[$0] }
        var inStride = [Int](repeating: 1, count: shape.count)
        for i in stride(from: shape.count - 2, through: 0, by: -1) { inStride[i] = inStride[i + 1] * shape[i + 1] }
        return (0..<x.count).map { o in
            var rem = o, src = 0
            for a in stride(from: outShape.count - 1, through: 0, by: -1) {
                src += (rem % outShape[a]) * inStride[permutation[a]]
                rem /= outShape[a]
            }
            return x[src]
        }
    }

    public static func inversePermutation(_ p: [Int]) -> [Int] {
        var inv = [Int](repeating: 0, count: p.count)
        for (i, a) in p.enumerated() { inv[a] = i }
        return inv
    }

    /// Multi-head attention on a packed projection `qkv: [B, T, 3, heads, d]`:
    /// `softmax(Q K^T * scale (+ causal mask)) V` per batch and head, returned as
    /// `[B, T, heads, d]` (heads merged).
    public static func attention(_ qkv: [Double], batch: Int, tokens t: Int, heads h: Int, headDim d: Int,
                                 scale: Double, causal: Bool) -> [Double] {
        func at(_ b: Int, _ i: Int, _ which: Int, _ head: Int, _ k: Int) -> Double {
            qkv[(((b * t + i) * 3 + which) * h + head) * d + k]
        }
        var out = [Double](repeating: 0, count: batch * t * h * d)
        for b in 0..<batch { for head in 0..<h { for i in 0..<t {
            let visible = causal ? i + 1 : t
            var scores = (0..<visible).map { j in scale * (0..<d).reduce(0.0) { $0 + at(b, i, 0, head, $1) * at(b, j, 1, head, $1) } }
            let m = scores.max()!
            scores = scores.map { exp($0 - m) }
            let z = scores.reduce(0, +)
            for k in 0..<d {
                out[((b * t + i) * h + head) * d + k] = (0..<visible).reduce(0.0) { $0 + scores[$1] / z * at(b, $1, 2, head, k) }
            }
        } } }
        return out
    }

    // MARK: Loss and evaluation

    /// Row losses, their mean over the rows with a target and `d(mean loss)/d logits`.
    /// A negative label is an ignored row (loss 0, gradient 0, not in the mean; the
    /// mean is 0 without targets); a label `>= classes` gives NaN for its row.
    public static func crossEntropy(_ logits: [Double], labels: [Int32], classes c: Int, labelSmoothing s: Double)
        -> (rowLoss: [Double], mean: Double, dLogits: [Double]) {
        let rows = labels.count, targets = labels.filter { $0 >= 0 }.count
        var loss = [Double](repeating: 0, count: rows), d = [Double](repeating: 0, count: logits.count)
        for r in 0..<rows where labels[r] >= 0 {
            guard Int(labels[r]) < c else {
                loss[r] = .nan
                for j in 0..<c { d[r * c + j] = .nan }
                continue
            }
            let z = Array(logits[(r * c)..<(r * c + c)])
            let m = z.max()!
            let lse = m + log(z.reduce(0) { $0 + exp($1 - m) })
            for j in 0..<c {
                let q = (j == Int(labels[r]) ? 1 - s : 0) + s / Double(c)
                loss[r] -= q * (z[j] - lse)
                d[r * c + j] = (exp(z[j] - lse) - q) / Double(targets)
            }
        }
        return (loss, targets > 0 ? loss.reduce(0, +) / Double(targets) : 0, d)
    }

    // MARK: Embedding

    /// `out[r, :] = table[ids[r], :]` (`table: [V, d]`); NaN rows for ids outside `0..<V`.
    public static func embedding(_ table: [Double], dim d: Int, ids: [Int32]) -> [Double] {
        let v = table.count / d
        return ids.flatMap { id -> [Double] in
            (0..<v).contains(Int(id)) ? Array(table[(Int(id) * d)..<(Int(id) * d + d)]) : [Double](repeating: .nan, count: d)
        }
    }

    /// `dTable + sum over r with ids[r] == v of dOut[r, :]`; ids outside `0..<V` skipped.
    public static func embeddingBackward(_ dOut: [Double], ids: [Int32], dTable: [Double], dim d: Int) -> [Double] {
        let v = dTable.count / d
        var out = dTable
        for (r, id) in ids.enumerated() where (0..<v).contains(Int(id)) {
            for j in 0..<d { out[Int(id) * d + j] += dOut[r * d + j] }
        }
        return out
    }

    public static func argmaxRows(_ x: [Double], features f: Int) -> [Int32] {
        (0..<(x.count / f)).map { r in
            var best = 0
            for j in 1..<f where x[r * f + j] > x[r * f + best] { best = j }
            return Int32(best)
        }
    }

    // MARK: Regularisation and pooling

    /// The counter-based hash behind dropout (the kernels compute the same bits):
    /// two rounds of the murmur3 finaliser over the element index and the seed.
    public static func dropoutHash(seed: UInt64, index: UInt32) -> UInt32 {
        func fmix(_ v: UInt32) -> UInt32 {
            var h = v
            h ^= h >> 16; h = h &* 0x85EB_CA6B
            h ^= h >> 13; h = h &* 0xC2B2_AE35
            h ^= h >> 16
            return h
        }
        var h = fmix((index &* 0x9E37_79B9) ^ UInt32(truncatingIfNeeded: seed))
        h = fmix(h ^ UInt32(truncatingIfNeeded: seed >> 32) ^ 0x7F4A_7C15)
        return h
    }

    /// Whether dropout with probability `p` keeps element `index`.
    /// The standard normal value `addGaussianNoise` adds (times its std) at `index`.
    public static func gaussianNoise(seed: UInt64, index: Int) -> Double {
        let a = dropoutHash(seed: seed, index: UInt32(truncatingIfNeeded: 2 * index))
        let b = dropoutHash(seed: seed, index: UInt32(truncatingIfNeeded: 2 * index + 1))
        let u1 = (Double(a >> 8) + 1) / 16_777_216, u2 = Double(b >> 8) / 16_777_216
        return (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * Double.pi * u2)
    }

    public static func dropoutKeep(seed: UInt64, index: Int, p: Float) -> Bool {
        p < 1 && dropoutHash(seed: seed, index: UInt32(truncatingIfNeeded: index)) >= NNCheck.dropoutThreshold(p)
    }

    public static func dropout(_ x: [Double], p: Float, seed: UInt64) -> [Double] {
        x.indices.map { dropoutKeep(seed: seed, index: $0, p: p) ? x[$0] / (1 - Double(p)) : 0 }
    }

    public static func scaleRows(_ x: [Double], by m: [Double]) -> [Double] {
        let f = x.count / m.count
        return x.indices.map { x[$0] * m[$0 / f] }
    }

    /// `x: [B, T, H]` -> `[B, H]`, mean over `tokens`.
    public static func meanPool(_ x: [Double], batch: Int, tokens t: Int, hidden h: Int, range: Range<Int>) -> [Double] {
        var y = [Double](repeating: 0, count: batch * h)
        for b in 0..<batch { for k in range { for j in 0..<h { y[b * h + j] += x[(b * t + k) * h + j] } } }
        return y.map { $0 / Double(range.count) }
    }

    public static func meanPoolBackward(_ dy: [Double], batch: Int, tokens t: Int, hidden h: Int, range: Range<Int>) -> [Double] {
        var dx = [Double](repeating: 0, count: batch * t * h)
        for b in 0..<batch { for k in range { for j in 0..<h { dx[(b * t + k) * h + j] = dy[b * h + j] / Double(range.count) } } }
        return dx
    }

    // MARK: Optimiser

    /// One AdamW step on one tensor; returns the new (param, m, v).
    public static func adamW(param: [Double], grad: [Double], m: [Double], v: [Double], config: AdamWConfig,
                             weightDecay: Double, step: Int) -> (param: [Double], m: [Double], v: [Double]) {
        let lr = Double(config.learningRate), b1 = Double(config.beta1), b2 = Double(config.beta2), eps = Double(config.eps)
        let c1 = 1 - pow(b1, Double(step)), c2 = 1 - pow(b2, Double(step))
        var p = param, m2 = m, v2 = v
        for i in p.indices {
            p[i] -= lr * weightDecay * p[i]
            m2[i] = b1 * m[i] + (1 - b1) * grad[i]
            v2[i] = b2 * v[i] + (1 - b2) * grad[i] * grad[i]
            p[i] -= lr * (m2[i] / c1) / ((v2[i] / c2).squareRoot() + eps)
        }
        return (p, m2, v2)
    }

    public static func globalNorm(_ tensors: [[Double]]) -> Double {
        tensors.reduce(0) { $0 + $1.reduce(0) { $0 + $1 * $1 } }.squareRoot()
    }
}
