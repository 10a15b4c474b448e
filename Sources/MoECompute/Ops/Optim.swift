/// AdamW step, global gradient norm and clipping.
/// Both backends implement every requirement; tests compare them with float64 references.
public protocol OptimOps: AnyObject {
}
