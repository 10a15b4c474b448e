import Foundation
import MoECheckpoint
import MoECompute

/// A model tensor with its gradient, named as in the checkpoints it is saved
/// to. After `ParameterStore.finalize()` its value and gradient are views into
/// the store's flat buffers; the AdamW moments live in the optimiser state.
public final class Parameter {
    public let name: String
    public let shape: [Int]
    /// False for norms, biases, temperatures, embeddings: AdamW's decay skips them.
    public let decays: Bool
    /// Frozen parameters get no gradient and no optimiser state.
    public let trainable: Bool
    /// The contiguous range the parameter lives in: `ParameterStore.denseRange`
    /// for everything replicated on every rank, or an MoE layer's name for its experts.
    public let range: String
    public internal(set) var value: Tensor
    /// nil for a frozen parameter or an inference-only store.
    public internal(set) var grad: Tensor?
    /// Offset of the value in the store's value buffer (after `finalize`).
    public internal(set) var offset = 0
    /// Expert parallelism: of a stacked expert parameter (`[experts, ...]`), the
    /// experts (global indices, dimension 0) this rank holds; nil for a
    /// parameter every rank holds whole.
    public let expertRows: Range<Int>?
    /// The stacked experts over all ranks (with `expertRows`).
    public let totalExperts: Int

    init(name: String, value: Tensor, grad: Tensor?, decays: Bool, trainable: Bool, range: String,
         expertRows: Range<Int>? = nil, totalExperts: Int = 0) {
        self.name = name; self.shape = value.shape; self.value = value; self.grad = grad
        self.decays = decays; self.trainable = trainable; self.range = range
        self.expertRows = expertRows; self.totalExperts = totalExperts
    }

    /// Elements held here.
    public var count: Int { value.count }
    /// Elements of the whole parameter, over every rank that holds a part.
    public var globalCount: Int { expertRows.map { count / max($0.count, 1) * totalExperts } ?? count }

    /// The gradient; an error for a frozen parameter or an inference-only model.
    public func gradient() throws -> Tensor {
        guard let grad else { throw ModelError.badInput("\(name) has no gradient (frozen, or an inference-only model)") }
        return grad
    }
}

/// One contiguous range of the flat buffers: the decayed parameters first
/// (`decayed` elements), then the rest, so one AdamW launch covers it.
public struct ParameterRange: Sendable, Equatable {
    public var name: String
    public var offset: Int
    public var count: Int
    public var decayed: Int
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
///
/// Layers create parameters one by one (`make`); the model then calls
/// `finalize()`, which moves them into a few flat buffers: one of values and
/// one of gradients, each laid out as contiguous ranges (the non-expert
/// parameters, then each MoE layer's experts, as the data- and expert-parallel
/// allreduces need), with frozen parameters after the trainable ones and no
/// gradient for them. Zeroing, the gradient norm, clipping and AdamW are then
/// one launch per range. AdamW's moments are allocated on the first optimiser
/// step (`OptimizerState`), so an inference-only model has none.
public final class ParameterStore {
    public let backend: Backend
    public let seed: UInt64
    /// False for inference-only models: no gradient buffer at all.
    public let training: Bool
    public private(set) var all: [Parameter] = []
    private var byName: [String: Parameter] = [:]
    /// The flat value buffer and its trainable ranges (after `finalize`).
    public private(set) var values: Tensor?
    public private(set) var gradients: Tensor?
    public private(set) var ranges: [ParameterRange] = []
    /// Elements of `values` held by trainable parameters (the frozen ones follow).
    public private(set) var trainableCount = 0

    /// The range of every parameter outside the MoE experts.
    public static let denseRange = "dense"

    /// Which parameters train (`--train experts,router`); nil: all.
    let trainablePredicate: ((String) -> Bool)?
    /// False when every value will be loaded from a checkpoint: parameters start
    /// at zero instead of drawing their initialisers (seconds for large models).
    let initialize: Bool
    /// True for models that call `finalize()`: gradients are made there only, in the flat buffer.
    let deferGradients: Bool

    public init(backend: Backend, seed: UInt64, training: Bool = true, trainable: ((String) -> Bool)? = nil,
                initialize: Bool = true, deferGradients: Bool = false) {
        self.backend = backend; self.seed = seed; self.training = training; trainablePredicate = trainable
        self.initialize = initialize; self.deferGradients = deferGradients
    }

    /// Creates (and registers) a parameter. `range` groups expert weights by MoE
    /// layer; everything else stays in `denseRange`. `expertRows`: expert
    /// parallelism, this rank holds only those rows of dimension 0 (its experts);
    /// they start as the same rows of the whole parameter would, so any layout
    /// starts identical.
    public func make(_ name: String, _ shape: [Int], _ initializer: Initializer, decays: Bool,
                     trainable: Bool = true, range: String = ParameterStore.denseRange,
                     expertRows: Range<Int>? = nil) throws -> Parameter {
        precondition(byName[name] == nil, "duplicate parameter \(name)")
        precondition(values == nil, "parameter \(name) created after finalize()")
        let trainable = trainable && (trainablePredicate?(name) ?? true)
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        let full = shape
        var shape = shape
        if let rows = expertRows { shape[0] = rows.count }
        let value: Tensor
        if initialize {
            var values = initializer.values(shape: full, seed: seed ^ h)
            if let rows = expertRows {
                let per = full.dropFirst().reduce(1, *)
                values = Array(values[(rows.lowerBound * per)..<(rows.upperBound * per)])
            }
            value = try backend.tensor(values, shape: shape)
        } else {
            value = try backend.zeros(shape)
        }
        // Until finalize() a parameter owns its tensors, so layers built alone (benchmarks) work too.
        let grad = training && trainable && !deferGradients ? try backend.zeros(shape) : nil
        let p = Parameter(name: name, value: value, grad: grad, decays: decays, trainable: trainable, range: range,
                          expertRows: expertRows, totalExperts: full.first ?? 0)
        all.append(p)
        byName[name] = p
        return p
    }

    /// Moves every parameter into the flat buffers (see the type's doc). Called
    /// once, by the model, after its layers are built.
    public func finalize() throws {
        precondition(values == nil, "finalize() called twice")
        var order: [String] = [Self.denseRange]
        for p in all where p.trainable && !order.contains(p.range) { order.append(p.range) }
        var offset = 0
        var placed: [Parameter] = []
        ranges = []
        for name in order {
            let members = all.filter { $0.trainable && $0.range == name }
            guard !members.isEmpty else { continue }
            let start = offset
            let decayed = members.filter(\.decays), rest = members.filter { !$0.decays }
            for p in decayed + rest { p.offset = offset; offset += p.count; placed.append(p) }
            ranges.append(ParameterRange(name: name, offset: start, count: offset - start, decayed: decayed.reduce(0) { $0 + $1.count }))
        }
        trainableCount = offset
        for p in all where !p.trainable { p.offset = offset; offset += p.count; placed.append(p) }
        let flat = try backend.zeros([offset])
        let grads = training && trainableCount > 0 ? try backend.zeros([trainableCount]) : nil
        for p in placed {
            let view = try flat.view(offset: p.offset, shape: p.shape)
            // Uninitialised values are zero on both sides; each source tensor is freed as its parameter moves.
            if initialize { try backend.copy(p.value, to: view) }
            p.value = view
            p.grad = p.trainable ? try grads?.view(offset: p.offset, shape: p.shape) : nil
        }
        values = flat
        gradients = grads
    }

    public subscript(name: String) -> Parameter? { byName[name] }

    /// Parameters of the whole model (a rank holding only its experts counts them all).
    public var parameterCount: Int { all.reduce(0) { $0 + $1.globalCount } }

    /// One view per range into `buffer` (the gradients, or a moment buffer of the same layout).
    public func rangeViews(of buffer: Tensor) throws -> [Tensor] {
        try ranges.map { try buffer.view(offset: $0.offset, shape: [$0.count]) }
    }

    /// Which of `parts` ranks owns each parameter that every rank holds whole:
    /// the trainable ones and, apart, the frozen ones are cut in flat-buffer
    /// order into runs of near equal size at parameter boundaries, so each has
    /// one owner (it writes it into a multi-rank checkpoint and, under ZeRO-1,
    /// keeps its AdamW moments) and the trainable work splits evenly however
    /// much is frozen. Expert-parallel parameters (`expertRows`) differ from rank
    /// to rank of a group; the `replicas` ranks that hold the same experts (one
    /// per group) share them out the same way.
    public func partition(_ parts: Int, replicas: Int = 1) -> Ownership {
        func cut(_ members: [Parameter], into parts: Int) -> [ObjectIdentifier: Int] {
            let sorted = members.sorted { $0.offset < $1.offset }, total = sorted.reduce(0) { $0 + $1.count }
            var owners: [ObjectIdentifier: Int] = [:], before = 0
            for p in sorted {
                owners[ObjectIdentifier(p)] = total == 0 ? 0 : min(parts - 1, before * parts / total)
                before += p.count
            }
            return owners
        }
        var owners: [ObjectIdentifier: Int] = [:], replicaOwners: [ObjectIdentifier: Int] = [:]
        for trainable in [true, false] {
            owners.merge(cut(all.filter { $0.trainable == trainable && $0.expertRows == nil }, into: max(parts, 1))) { a, _ in a }
            replicaOwners.merge(cut(all.filter { $0.trainable == trainable && $0.expertRows != nil }, into: max(replicas, 1))) { a, _ in a }
        }
        return Ownership(parts: max(parts, 1), owners: owners, replicaOwners: replicaOwners, store: self)
    }

    /// Where `parameters` lie in the flat buffers, as few ranges as possible (neighbours merged).
    public static func ranges(of parameters: [Parameter]) -> [Range<Int>] {
        var out: [Range<Int>] = []
        for p in parameters.sorted(by: { $0.offset < $1.offset }) where p.count > 0 {
            if let last = out.last, last.upperBound == p.offset { out[out.count - 1] = last.lowerBound..<(p.offset + p.count) }
            else { out.append(p.offset..<(p.offset + p.count)) }
        }
        return out
    }

    /// Sets every gradient to 0: one fill over the flat buffer.
    public func zeroGradients() throws {
        if let gradients { return try backend.fill(gradients, value: 0) }
        for p in all { if let g = p.grad { try backend.fill(g, value: 0) } }
    }

    /// Host copies of every value, by name.
    public func snapshot() throws -> [String: (shape: [Int], values: [Float])] {
        var out: [String: (shape: [Int], values: [Float])] = [:]
        for p in all { out[p.name] = (p.shape, try p.value.floats()) }
        return out
    }
}

/// Who owns what of a parameter store over the ranks (`ParameterStore.partition`).
public struct Ownership {
    public let parts: Int
    fileprivate let owners: [ObjectIdentifier: Int]
    fileprivate let replicaOwners: [ObjectIdentifier: Int]
    fileprivate unowned let store: ParameterStore

    /// The rank that owns `p`; nil for an expert-parallel parameter.
    public func owner(of p: Parameter) -> Int? { owners[ObjectIdentifier(p)] }
    /// Of the ranks holding the same experts (`Distributed.expertReplicas`), the
    /// one that owns this rank's expert-parallel `p`; nil for a whole parameter.
    public func replicaOwner(of p: Parameter) -> Int? { replicaOwners[ObjectIdentifier(p)] }

    /// The trainable whole parameters whose update `rank` makes and sends to
    /// the others under ZeRO-1, as merged ranges of the flat buffers.
    public func owned(by rank: Int) -> [Range<Int>] {
        ParameterStore.ranges(of: store.all.filter { $0.trainable && owner(of: $0) == rank })
    }

    /// The trainable experts whose update replica `replica` makes and sends to
    /// the other ranks holding the same experts under ZeRO-1.
    public func ownedExperts(byReplica replica: Int) -> [Range<Int>] {
        ParameterStore.ranges(of: store.all.filter { $0.trainable && replicaOwner(of: $0) == replica })
    }

    /// The moments `rank` (replica `replica` of its experts) keeps under ZeRO-1.
    public func optimizerShard(of rank: Int, replica: Int = 0) -> [Range<Int>] {
        ParameterStore.ranges(of: store.all.filter { $0.trainable && (owner(of: $0) == rank || replicaOwner(of: $0) == replica) })
    }
}

/// AdamW's first and second moments in two flat buffers with the layout of the
/// store's gradients, allocated when the first optimiser step needs them.
///
/// ZeRO stage 1: with a `shard`, this rank keeps the moments of those elements
/// of the trainable buffer only and updates only them; the trainer then
/// broadcasts each rank's updated shard to the others.
public final class OptimizerState {
    public let store: ParameterStore
    /// The ranges of the trainable buffer whose moments live here, in order
    /// (all of it unsharded); the moment buffers hold them back to back.
    public let shard: [Range<Int>]
    public private(set) var m: Tensor?
    public private(set) var v: Tensor?
    /// Elements of the moment buffers.
    public var count: Int { shard.reduce(0) { $0 + $1.count } }

    public init(store: ParameterStore, shard: [Range<Int>]? = nil) {
        self.store = store
        self.shard = shard ?? [0..<store.trainableCount]
    }

    /// Where `p`'s moments start in the moment buffers, if they live here.
    private func momentOffset(_ p: Parameter) -> Int? {
        guard p.trainable else { return nil }
        var at = 0
        for r in shard {
            if p.offset >= r.lowerBound && p.offset + p.count <= r.upperBound { return at + p.offset - r.lowerBound }
            at += r.count
        }
        return nil
    }

    /// Whether this rank holds the moments of `p`.
    public func holds(_ p: Parameter) -> Bool { momentOffset(p) != nil }

    /// The moment buffers, created (zeroed) on first use.
    public func moments() throws -> (m: Tensor, v: Tensor) {
        if let m, let v { return (m, v) }
        precondition(store.values != nil, "the parameter store must be finalized before the optimiser runs")
        let m = try store.backend.zeros([count]), v = try store.backend.zeros([count])
        self.m = m; self.v = v
        return (m, v)
    }

    /// The moment views of one parameter (allocating the buffers if needed).
    public func moments(of p: Parameter) throws -> (m: Tensor, v: Tensor) {
        guard p.trainable else { throw ModelError.badInput("\(p.name) is frozen: it has no optimiser state") }
        guard let at = momentOffset(p) else { throw ModelError.badInput("\(p.name)'s optimiser state lives on another rank (ZeRO-1)") }
        let (m, v) = try moments()
        return (try m.view(offset: at, shape: p.shape), try v.view(offset: at, shape: p.shape))
    }

    /// One AdamW launch per range (its parts inside the shard); a non-finite
    /// `guardNorm` skips the update on the device.
    public func step(config: AdamWConfig, weightDecay: Float, step: Int, guardNorm: Tensor?) throws {
        guard let values = store.values, let grads = store.gradients else {
            throw ModelError.badInput("AdamW needs a finalized, trainable parameter store")
        }
        let (m, v) = try moments()
        var groups: [AdamWTensors] = []
        var at = 0
        for piece in shard {
            for r in store.ranges {
                let lo = max(r.offset, piece.lowerBound), hi = min(r.offset + r.count, piece.upperBound)
                guard lo < hi else { continue }
                let n = hi - lo, mo = at + lo - piece.lowerBound
                groups.append(AdamWTensors(param: try values.view(offset: lo, shape: [n]), grad: try grads.view(offset: lo, shape: [n]),
                                           m: try m.view(offset: mo, shape: [n]), v: try v.view(offset: mo, shape: [n]),
                                           weightDecay: weightDecay, decayedCount: min(max(r.offset + r.decayed - lo, 0), n)))
            }
            at += piece.count
        }
        guard !groups.isEmpty else { return }
        try store.backend.adamWStep(groups, config: config, step: step, guardNorm: guardNorm)
    }
}

/// Reusable activation buffers, so steady-state steps allocate nothing.
/// Buffers are keyed by name and shape: the training batch and the evaluation
/// batch each get their own set, allocated once.
/// A buffer keeps its contents between uses: ops that fill it must overwrite.
///
/// A model may also hand one workspace to all its layers as `scratch` for the
/// temporaries that die inside one layer's forward or backward (the gradients
/// flowing through a layer), so they exist once, not once per layer.
final class Workspace {
    let backend: Backend
    private struct Key: Hashable { var name: String; var shape: [Int]; var dtype: DType }
    private var buffers: [Key: Tensor] = [:]
    init(backend: Backend) { self.backend = backend }

    func get(_ name: String, _ shape: [Int], dtype: DType = .f32) throws -> Tensor {
        let key = Key(name: name, shape: shape, dtype: dtype)
        if let t = buffers[key] { return t }
        let t = try backend.zeros(shape, dtype: dtype)
        buffers[key] = t
        return t
    }
}
