/// Gating (softmax/top-k, jitter, capacity), expert choice, load-balancing and z-loss, hyperspherical routing (L2 normalise, cosine logits with temperature, soft dispatch/combine).
/// Both backends implement every requirement; tests compare them with float64 references.
public protocol RoutingOps: AnyObject {
}
