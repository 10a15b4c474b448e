import Foundation

/// What a backend has done since it was created: the launch profile of a
/// training step. Tests assert on it (no allocation after the first step, one
/// host sync per step) and `moe-gpu bench --kernel train-step` reports it.
///
/// - `launches`: kernel enqueues on OpenCL; on the CPU backend, each op that
///   forks work over the cores or calls BLAS (the host's analogue of a launch).
/// - `hostSyncs`: blocking reads, blocking writes and finishes: every point where
///   the host waits for the device. The CPU backend counts its reads and writes
///   the same way, so both backends report the same profile for the same model.
/// - `allocations` / `allocatedBytes`: device buffers created (tensors and scratch).
public final class DeviceCounters: @unchecked Sendable {
    private let lock = NSLock()
    private var _launches = 0, _hostSyncs = 0, _allocations = 0, _allocatedBytes = 0

    public init() {}

    public struct Snapshot: Sendable, Equatable {
        public var launches: Int, hostSyncs: Int, allocations: Int, allocatedBytes: Int

        /// `self - earlier`, field by field.
        public func since(_ earlier: Snapshot) -> Snapshot {
            Snapshot(launches: launches - earlier.launches, hostSyncs: hostSyncs - earlier.hostSyncs,
                     allocations: allocations - earlier.allocations, allocatedBytes: allocatedBytes - earlier.allocatedBytes)
        }
    }

    public var snapshot: Snapshot {
        lock.lock(); defer { lock.unlock() }
        return Snapshot(launches: _launches, hostSyncs: _hostSyncs, allocations: _allocations, allocatedBytes: _allocatedBytes)
    }

    @inline(__always) func launch(_ n: Int = 1) { lock.lock(); _launches += n; lock.unlock() }

    /// OpenCL launches by kernel name: which of Kernels/*.cl a workload ran.
    public var kernelLaunches: [String: Int] { lock.lock(); defer { lock.unlock() }; return _kernelLaunches }
    private var _kernelLaunches: [String: Int] = [:]
    func launch(kernel: String) { lock.lock(); _launches += 1; _kernelLaunches[kernel, default: 0] += 1; lock.unlock() }
    @inline(__always) func hostSync() { lock.lock(); _hostSyncs += 1; lock.unlock() }
    @inline(__always) func allocation(bytes: Int) { lock.lock(); _allocations += 1; _allocatedBytes += bytes; lock.unlock() }
}
