import CMPI
import Foundation

/// The processes of one run and their collectives: the trainer averages
/// gradients and metrics through it. `SingleProcess` when moe-gpu runs alone,
/// `MPICommunicator` under `mpirun -np N` or `srun` (Open MPI, loaded at run
/// time: see `Sources/CMPI`).
public protocol Communicator: AnyObject, Sendable {
    var rank: Int { get }
    var size: Int { get }
    /// This process's index among the ranks on its host (picks its GPU).
    var localRank: Int { get }
    func allreduceSum(_ values: UnsafeMutableBufferPointer<Float>) throws
    func allreduceSum(_ values: UnsafeMutableBufferPointer<Double>) throws
    func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws
    /// Every rank's `values` (the same count on each), in rank order, on every rank.
    func allgather(_ values: [Int32]) throws -> [Int32]
    /// Sends `sendCounts[r]` floats of `send` (in rank order) to rank r and
    /// returns what each rank sent here, in rank order (`recvCounts[r]` from r).
    func allToAll(_ send: [Float], sendCounts: [Int], recvCounts: [Int]) throws -> [Float]
    func barrier() throws
    /// The ranks with the same `color`, ordered by their rank here (a collective: every rank calls it).
    func split(color: Int) throws -> Communicator
}

extension Communicator {
    /// Sums `tensor` over every rank, in place, with no second copy of it: a
    /// host tensor (CPU backend) is handed to MPI where it lies; a device
    /// tensor goes through one reused host bucket of `stagingElements` at a
    /// time (a read and a write per bucket: two host syncs each).
    public func allreduceSum(_ tensor: Tensor) throws {
        guard size > 1 else { return }
        try staged(tensor, read: true, write: true) { try allreduceSum($0) }
    }

    /// Rank `root`'s `tensor` on every rank, in place (staged as `allreduceSum(_:)`).
    public func broadcast(_ tensor: Tensor, root: Int) throws {
        guard size > 1 else { return }
        try staged(tensor, read: rank == root, write: rank != root) { try broadcast(UnsafeMutableRawBufferPointer($0), root: root) }
    }

    /// `body` over the tensor's floats in place: directly on host memory, or
    /// bucket by bucket through a host buffer (reading the device first if
    /// `read`, writing the result back if `write`).
    private func staged(_ tensor: Tensor, read: Bool, write: Bool, _ body: (UnsafeMutableBufferPointer<Float>) throws -> Void) throws {
        guard tensor.dtype == .f32 else { throw CommunicationError(description: "collective on an \(tensor.dtype) tensor") }
        if case .host(let buffer) = tensor.storage {
            try tensor.backend.synchronize()
            let start = buffer.pointer.assumingMemoryBound(to: Float.self) + tensor.offset
            return try body(UnsafeMutableBufferPointer(start: start, count: tensor.count))
        }
        var bucket = [Float](repeating: 0, count: min(tensor.count, stagingElements))
        var done = 0
        while done < tensor.count {
            let n = min(stagingElements, tensor.count - done)
            let piece = try tensor.view(offset: done, shape: [n])
            try bucket.withUnsafeMutableBufferPointer { all in
                let b = UnsafeMutableBufferPointer(rebasing: all[0..<n])
                if read { try tensor.backend.read(piece, into: UnsafeMutableRawBufferPointer(b)) }
                try body(b)
                if write { try tensor.backend.write(UnsafeRawBufferPointer(b), to: piece) }
            }
            done += n
        }
    }

    /// Floats of a device tensor staged through host memory at once (64 MiB).
    public var stagingElements: Int { 1 << 24 }

    /// Whether `flag` is set on any rank (the same answer on every rank).
    public func anyRank(_ flag: Bool) throws -> Bool {
        guard size > 1 else { return flag }
        var v = [flag ? 1.0 : 0.0]
        try v.withUnsafeMutableBufferPointer { try allreduceSum($0) }
        return v[0] > 0
    }

    /// Rank `root`'s string on every rank.
    public func broadcast(_ text: String, root: Int = 0) throws -> String {
        guard size > 1 else { return text }
        var length = [Double(text.utf8.count)]
        try length.withUnsafeMutableBytes { try broadcast($0, root: root) }
        var bytes = rank == root ? Array(text.utf8) : [UInt8](repeating: 0, count: Int(length[0]))
        try bytes.withUnsafeMutableBytes { try broadcast($0, root: root) }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// `body` run on rank 0 only (it may touch files), its result or its error
    /// on every rank: a failure there fails every rank at once, none waits.
    public func fromRoot(_ body: () throws -> String) throws -> String {
        guard size > 1 else { return try body() }
        var message = ""
        if rank == 0 {
            do { message = "ok\u{1}" + (try body()) } catch { message = "error\u{1}\(error)" }
        }
        let parts = try broadcast(message).split(separator: "\u{1}", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0] == "ok" else { throw CommunicationError(description: parts.count == 2 ? String(parts[1]) : "rank 0 failed") }
        return String(parts[1])
    }

    /// "rank 1 of 2 on HOST" (or "single process").
    public var summary: String {
        size == 1 ? "single process" : "rank \(rank) of \(size) on \(ProcessInfo.processInfo.hostName) (local rank \(localRank))"
    }
}

public final class SingleProcess: Communicator {
    public init() {}
    public var rank: Int { 0 }
    public var size: Int { 1 }
    public var localRank: Int { 0 }
    public func allreduceSum(_ values: UnsafeMutableBufferPointer<Float>) throws {}
    public func allreduceSum(_ values: UnsafeMutableBufferPointer<Double>) throws {}
    public func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws {}
    public func allgather(_ values: [Int32]) throws -> [Int32] { values }
    public func allToAll(_ send: [Float], sendCounts: [Int], recvCounts: [Int]) throws -> [Float] { send }
    public func barrier() throws {}
    public func split(color: Int) throws -> Communicator { self }
}

public struct CommunicationError: Error, CustomStringConvertible {
    public let description: String
}

public final class MPICommunicator: Communicator, @unchecked Sendable {
    public let rank: Int, size: Int, localRank: Int
    /// nil: every rank (MPI_COMM_WORLD); else a group from `split`.
    private let comm: UnsafeMutableRawPointer?

    private init(rank: Int, size: Int, localRank: Int, comm: UnsafeMutableRawPointer) {
        self.rank = rank; self.size = size; self.localRank = localRank; self.comm = comm
    }

    public func split(color: Int) throws -> Communicator {
        var r: Int32 = 0, n: Int32 = 0
        guard let group = cmpi_split(comm, Int32(color), Int32(rank), &r, &n) else {
            throw CommunicationError(description: "rank \(rank) of \(size): MPI_Comm_split failed")
        }
        return MPICommunicator(rank: Int(r), size: Int(n), localRank: localRank, comm: group)
    }

    /// Loads Open MPI and joins the job; `timeout` seconds is the watchdog's
    /// limit for one collective (0: none).
    init(timeout: Double) throws {
        var err = [CChar](repeating: 0, count: 512)
        if cmpi_init(&err, err.count) != 0 {
            throw CommunicationError(description: "started by an MPI launcher, but MPI could not start: \(String(cString: err)): "
                + "install Open MPI (apt-get install openmpi-bin), point MOE_GPU_MPI_LIBRARY at its libmpi.so, or run moe-gpu without mpirun")
        }
        rank = Int(cmpi_rank()); size = Int(cmpi_size()); localRank = Int(cmpi_local_rank())
        comm = nil
        cmpi_set_timeout(timeout)
    }

    private func check(_ code: Int32, _ what: String) throws {
        guard code != 0 else { return }
        var text = [CChar](repeating: 0, count: 512)
        cmpi_error(code, &text, text.count)
        throw CommunicationError(description: "rank \(rank) of \(size): \(what) failed: \(String(cString: text)) (a rank died or the network failed)")
    }

    public func allreduceSum(_ values: UnsafeMutableBufferPointer<Float>) throws {
        try check(cmpi_allreduce_sum_f32(comm, values.baseAddress, values.count), "an allreduce")
    }
    public func allreduceSum(_ values: UnsafeMutableBufferPointer<Double>) throws {
        try check(cmpi_allreduce_sum_f64(comm, values.baseAddress, values.count), "an allreduce")
    }
    public func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws {
        try check(cmpi_broadcast(comm, bytes.baseAddress, bytes.count, Int32(root)), "a broadcast")
    }
    public func barrier() throws { try check(cmpi_barrier(comm), "a barrier") }

    public func allgather(_ values: [Int32]) throws -> [Int32] {
        var out = [Int32](repeating: 0, count: values.count * size)
        let bytes = values.count * 4
        try values.withUnsafeBytes { v in
            try out.withUnsafeMutableBytes { o in try check(cmpi_allgather(comm, v.baseAddress, o.baseAddress, bytes), "an allgather") }
        }
        return out
    }

    public func allToAll(_ send: [Float], sendCounts: [Int], recvCounts: [Int]) throws -> [Float] {
        func displacements(_ counts: [Int]) -> [Int32] { counts.indices.map { Int32(4 * counts[..<$0].reduce(0, +)) } }
        let sc = sendCounts.map { Int32(4 * $0) }, rc = recvCounts.map { Int32(4 * $0) }
        let sd = displacements(sendCounts), rd = displacements(recvCounts)
        // Int32 byte counts: one exchange moves under 2 GiB per peer (checked).
        guard sendCounts.allSatisfy({ $0 < Int(Int32.max) / 4 }), recvCounts.allSatisfy({ $0 < Int(Int32.max) / 4 }),
              sendCounts.reduce(0, +) < Int(Int32.max) / 4, recvCounts.reduce(0, +) < Int(Int32.max) / 4 else {
            throw CommunicationError(description: "an all-to-all of over 2 GiB: use a smaller batch")
        }
        var out = [Float](repeating: 0, count: max(recvCounts.reduce(0, +), 1))
        try send.withUnsafeBytes { s in
            try out.withUnsafeMutableBytes { o in
                try check(cmpi_alltoallv(comm, s.baseAddress, sc, sd, o.baseAddress, rc, rd), "an all-to-all")
            }
        }
        return Array(out.prefix(recvCounts.reduce(0, +)))
    }
}

/// The run's communicator, chosen once at start-up.
public enum Distributed {
    nonisolated(unsafe) public private(set) static var world: Communicator = SingleProcess()
    nonisolated(unsafe) private static var started = false

    /// Under an MPI launcher, joins the MPI job (or throws why it cannot);
    /// alone, stays a single process.
    @discardableResult
    public static func start(timeout: Double) throws -> Communicator {
        if !started, cmpi_launched() != 0 {
            world = try MPICommunicator(timeout: timeout)
        }
        started = true
        return world
    }

    /// Expert parallelism: the MoE layers' experts split over groups of this
    /// many consecutive ranks (1: every rank runs every expert). Set before
    /// the model is built, through `startExpertParallel`.
    nonisolated(unsafe) public private(set) static var expertParallel = 1
    /// This rank's expert-parallel group (ranks g P ..< (g+1) P).
    nonisolated(unsafe) public private(set) static var expertGroup: Communicator = SingleProcess()
    /// The ranks holding the same experts as this one (the same place in every
    /// group): expert gradients are summed over them.
    nonisolated(unsafe) public private(set) static var expertReplicas: Communicator = SingleProcess()

    /// Splits the ranks into groups of `size` for expert parallelism (a collective).
    public static func startExpertParallel(_ size: Int) throws {
        guard size >= 1, world.size % size == 0 else {
            throw CommunicationError(description: "--expert-parallel \(size) does not divide the \(world.size) ranks: use a divisor of \(world.size)")
        }
        expertParallel = size
        expertGroup = size > 1 ? try world.split(color: world.rank / size) : SingleProcess()
        // The same place in every group (alone when there is one group); everyone without expert parallelism.
        expertReplicas = size > 1 ? try world.split(color: world.rank % size) : world
    }

    /// Leaves the MPI job (at exit, after the last collective).
    public static func finish() {
        if world is MPICommunicator { _ = cmpi_finalize() }
    }
}
