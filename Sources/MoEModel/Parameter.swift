import Foundation
import MoECheckpoint
import MoECompute

/// A trainable tensor with its gradient and AdamW moments, named as in the
/// checkpoints it is saved to.
public final class Parameter {
    public let name: String
    public let value: Tensor
    public let grad: Tensor
    public let m: Tensor
    public let v: Tensor
    /// False for norms, biases, temperatures, embeddings: AdamW's decay skips them.
    public let decays: Bool

    init(name: String, value: Tensor, decays: Bool) throws {
        self.name = name; self.value = value; self.decays = decays
        grad = try value.backend.zeros(value.shape)
        m = try value.backend.zeros(value.shape)
        v = try value.backend.zeros(value.shape)
    }

    public var shape: [Int] { value.shape }
    public var count: Int { value.count }
}

/// How a parameter starts. Values are drawn on the host from a generator
/// seeded by (model seed, parameter name), so every backend starts identical.
public enum Initializer {
    case zeros
    case ones
    case constant(Float)
    /// Normal(0, std), truncated at 2 std as ViT does.
    case normal(std: Float)
    /// Rows orthonormal (for SpheroMoE queries); unit rows when there are more rows than columns.
    case orthogonal

    func values(shape: [Int], seed: UInt64) -> [Float] {
        let n = shape.reduce(1, *)
        var rng = SplitMix64(seed: seed)
        switch self {
        case .zeros: return [Float](repeating: 0, count: n)
        case .ones: return [Float](repeating: 1, count: n)
        case .constant(let c): return [Float](repeating: c, count: n)
        case .normal(let std):
            return (0..<n).map { _ in
                var z = rng.nextGaussian()
                while abs(z) > 2 { z = rng.nextGaussian() }
                return z * std
            }
        case .orthogonal:
            let rows = shape.first ?? 1, cols = n / max(rows, 1)
            return orthonormalRows((0..<n).map { _ in rng.nextGaussian() }, rows: rows, cols: cols)
        }
    }
}

/// Every parameter of a model, in creation order, plus the seed they derive from.
public final class ParameterStore {
    public let backend: Backend
    public let seed: UInt64
    public private(set) var all: [Parameter] = []
    private var byName: [String: Parameter] = [:]

    public init(backend: Backend, seed: UInt64) { self.backend = backend; self.seed = seed }

    /// Creates (and registers) a parameter.
    public func make(_ name: String, _ shape: [Int], _ initializer: Initializer, decays: Bool) throws -> Parameter {
        precondition(byName[name] == nil, "duplicate parameter \(name)")
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        let value = try backend.tensor(initializer.values(shape: shape, seed: seed ^ h), shape: shape)
        let p = try Parameter(name: name, value: value, decays: decays)
        all.append(p)
        byName[name] = p
        return p
    }

    public subscript(name: String) -> Parameter? { byName[name] }

    public var parameterCount: Int { all.reduce(0) { $0 + $1.count } }

    public func zeroGradients() throws { for p in all { try backend.fill(p.grad, value: 0) } }

    /// Host copies of every value, by name.
    public func snapshot() throws -> [String: (shape: [Int], values: [Float])] {
        var out: [String: (shape: [Int], values: [Float])] = [:]
        for p in all { out[p.name] = (p.shape, try p.value.floats()) }
        return out
    }
}

/// Reusable activation buffers, so steady-state steps allocate nothing.
/// A buffer keeps its contents between uses: ops that fill it must overwrite.
final class Workspace {
    let backend: Backend
    private var buffers: [String: Tensor] = [:]
    init(backend: Backend) { self.backend = backend }

    func get(_ key: String, _ shape: [Int], dtype: DType = .f32) throws -> Tensor {
        if let t = buffers[key], t.shape == shape, t.dtype == dtype { return t }
        let t = try backend.zeros(shape, dtype: dtype)
        buffers[key] = t
        return t
    }
}
