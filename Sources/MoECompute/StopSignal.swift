import CKernels

/// SIGINT / SIGTERM as a request to stop at the next step boundary (see CKernels/signals.c).
public enum StopSignal {
    /// Records SIGINT and SIGTERM instead of dying; a second one ends the process.
    public static func install() { ck_install_stop_handlers() }
    /// The signal received, or nil.
    public static var received: Int32? { let s = ck_stop_signal(); return s == 0 ? nil : s }
    public static func name(_ s: Int32) -> String { s == 2 ? "SIGINT" : s == 15 ? "SIGTERM" : "signal \(s)" }
}
