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
    /// Logits `[rows, classes]` for a batch of inputs, as the model's batch source fills them.
    func forward(_ inputs: Tensor, training: Bool, step: Int) throws -> Tensor
    /// Accumulates every parameter gradient from `dLogits`; `lossScale` weights the
    /// auxiliary losses' gradients as the cross-entropy's are (1/N for N accumulated micro-batches).
    func backward(dLogits: Tensor, inputs: Tensor, lossScale: Float) throws
    /// Layers with routing statistics, by name (e.g. `blocks.2`).
    var routedLayers: [(name: String, layer: RoutedLayer)] { get }
    /// Metadata every checkpoint of this model carries (config, format, router names).
    var checkpointMetadata: [String: String] { get throws }
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
