/// Histogram, offsets, stable scatter indices, permute rows into expert-contiguous order, gather-form weighted combine, and their gradients.
/// Both backends implement every requirement; tests compare them with float64 references.
public protocol PermuteOps: AnyObject {
}
