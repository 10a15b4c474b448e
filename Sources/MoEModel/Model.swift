import Foundation
import MoECompute

/// What the trainer needs of a model: the ViT now, the decoder LM next. One
/// loop (`Trainer`), one checkpoint format (`ModelCheckpoint`) and one run
/// folder (`TrainRun`) serve every model.
public protocol Model: AnyObject {
    var backend: Backend { get }
    /// Every parameter, in flat buffers (`ParameterStore.finalize`).
    var params: ParameterStore { get }
    /// Tokens one example contributes to tokens/s (ViT: patches plus the class token).
    var tokensPerExample: Int { get }
    /// Parameters one token uses (experts by the share of tokens they see): 6 x this
    /// x tokens is a training step's model FLOPs (MFU, `plot --x flops`).
    var activeParameterCount: Double { get }
    /// Logits `[rows, classes]` for a batch of inputs, as the model's batch source fills them.
    func forward(_ inputs: Tensor, training: Bool, step: Int) throws -> Tensor
    /// Accumulates every parameter gradient from `dLogits`; `lossScale` weights the
    /// auxiliary losses' gradients as the cross-entropy's are (1/N for N accumulated micro-batches).
    func backward(dLogits: Tensor, inputs: Tensor, lossScale: Float) throws
    /// Layers with routing statistics, by name (e.g. `blocks.2`).
    var routedLayers: [(name: String, layer: RoutedLayer)] { get }
    /// Metadata every checkpoint of this model carries (config, format, router names).
    var checkpointMetadata: [String: String] { get throws }
    /// The tensors of this model's checkpoint files, each a slice of a parameter
    /// (stacked experts and fused projections are split into the names other tools use).
    var checkpointTensors: [CheckpointTensor] { get }
}

/// One tensor of a checkpoint file: `shape.product` values of `parameter` from element `offset`.
public struct CheckpointTensor {
    public let name: String
    public let shape: [Int]
    public let parameter: Parameter
    public let offset: Int
    public var count: Int { shape.reduce(1, *) }
    /// The parameter's values this tensor covers.
    public func value() throws -> Tensor { try parameter.value.view(offset: offset, shape: shape) }

    /// The parameter itself, or its stacked experts as one tensor each
    /// (`blocks.3.moe.experts.fc1.weight [E, ...]` -> `blocks.3.moe.experts.e.fc1.weight`).
    public static func split(_ p: Parameter) -> [CheckpointTensor] {
        for leaf in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] where p.name.hasSuffix("experts." + leaf) {
            // Experts by global index: under expert parallelism a rank holds experts base..<base+n.
            let prefix = String(p.name.dropLast(leaf.count + 1)), experts = p.shape[0], per = p.count / max(experts, 1)
            let base = p.expertRows?.lowerBound ?? 0
            return (0..<experts).map { CheckpointTensor(name: "\(prefix).\(base + $0).\(leaf)", shape: Array(p.shape.dropFirst()), parameter: p, offset: $0 * per) }
        }
        return [CheckpointTensor(name: p.name, shape: p.shape, parameter: p, offset: 0)]
    }
}

extension Model {
    public var checkpointTensors: [CheckpointTensor] { params.all.flatMap(CheckpointTensor.split) }
}

/// What an MoE layer leaves on the device after each forward and backward,
/// for the step's metrics, without a host read of its own.
public protocol RoutedLayer: AnyObject {
    /// The unweighted auxiliary losses of the last forward/backward (`[1]` tensors)
    /// and the coefficients they enter the loss with.
    var auxiliaryLossTensors: [(name: String, value: Tensor, coefficient: Float)] { get }
    /// Rows each expert processed in the last forward (i32 `[loadCount]`); nil
    /// before the first forward.
    var expertCounts: Tensor? { get }
    /// Experts with a load to report (0 without a discrete assignment: Soft MoE, SpheroMoE).
    var loadCount: Int { get }
}

/// Where a model's examples come from: it writes the inputs and labels of
/// chosen examples into host buffers the trainer uploads.
public protocol BatchSource: AnyObject {
    var count: Int { get }
    var inputType: DType { get }
    /// The input tensor's shape for `batch` examples.
    func inputShape(batch: Int) -> [Int]
    /// Labels for `batch` examples (one per example for classification, one per token for a language model).
    func labelCount(batch: Int) -> Int
    /// Writes examples `indices` (augmented from `augmentSeed` when given).
    func fill(indices: [Int], augmentSeed: UInt64?, inputs: UnsafeMutableRawBufferPointer, labels: UnsafeMutableBufferPointer<Int32>)
}
