/// LayerNorm, RMSNorm, GELU, SiLU/SwiGLU, softmax, cross-entropy, attention helpers, with gradients.
/// Both backends implement every requirement; tests compare them with float64 references.
public protocol NNOps: AnyObject {
}
