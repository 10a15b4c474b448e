import Foundation
import MoECompute

/// Expert parallelism (`--expert-parallel P`): the ranks form groups of P
/// consecutive ranks, and rank g of a group runs experts [g E/P, (g+1) E/P)
/// of every MoE layer for the tokens of its whole group. After a rank's
/// dispatch plan its permuted rows are already grouped by expert, so the rows
/// for rank g's experts are one contiguous block: an all-to-all over the group
/// sends each block to its owner, the owner regroups what it got by expert
/// (rows of group rank 0, then 1, ... within each expert) and runs its experts
/// as one grouped GEMM, and a second all-to-all brings the outputs back to the
/// rows they came from. The backward sends dYp the same way and dXp back.
/// Each rank holds only its experts' weights, gradients and moments
/// (`ExpertBank.held`, `Parameter.expertRows`); their gradients are summed over
/// the ranks that hold the same experts in the other groups
/// (`Distributed.expertReplicas`), the dense ones over all ranks, so the run
/// equals one process. The exchange goes through
/// host memory: on OpenCL, reads and writes of the rows around each all-to-all.
final class ExpertExchange {
    let comm: Communicator
    let experts: Int, width: Int
    let perRank: Int
    private let ws: Workspace
    // The last forward's layout, for its backward.
    private var sendRows: [Int] = [], recvRows: [Int] = []
    /// [source rank][local expert] rows received.
    private var received: [[Int]] = []
    private var localRows = 0, sentRows = 0, capacity = 0
    private var offsetsAll: Tensor?

    init(comm: Communicator, experts: Int, width: Int, backend: Backend) throws {
        guard experts % comm.size == 0 else {
            throw ModelError.badConfig("--expert-parallel \(comm.size): \(experts) experts do not split over \(comm.size) ranks; use a number of ranks that divides \(experts)")
        }
        self.comm = comm; self.experts = experts; self.width = width
        perRank = experts / comm.size
        ws = Workspace(backend: backend)
    }

    private var mine: Range<Int> { (comm.rank * perRank)..<((comm.rank + 1) * perRank) }

    /// Bytes this process sent to other ranks in all-to-alls since the last
    /// `takeBytesSent()` (the step's `alltoall_bytes`).
    nonisolated(unsafe) private static var bytesSent = 0
    static func takeBytesSent() -> Int { defer { bytesSent = 0 }; return bytesSent }
    private func count(_ rowsTo: [Int]) {
        Self.bytesSent += 4 * width * rowsTo.enumerated().reduce(0) { $0 + ($1.offset == comm.rank ? 0 : $1.element) }
    }

    /// Sends this rank's rows to their experts' owners and lays out what arrives by expert.
    private func scatter(_ rows: Tensor, into grouped: Tensor) throws {
        let w = width
        let values = sentRows == 0 ? [] : try rows.view(offset: 0, shape: [sentRows * w]).floats()
        let got = try comm.allToAll(values, sendCounts: sendRows.map { $0 * w }, recvCounts: recvRows.map { $0 * w })
        count(sendRows)
        var out = [Float](repeating: 0, count: localRows * w)
        var sourceStart = [Int](repeating: 0, count: comm.size)
        for s in 1..<comm.size { sourceStart[s] = sourceStart[s - 1] + recvRows[s - 1] }
        var p = 0
        for j in 0..<perRank {
            for s in 0..<comm.size {
                let before = received[s][..<j].reduce(0, +), n = received[s][j]
                let from = (sourceStart[s] + before) * w
                out.replaceSubrange((p * w)..<((p + n) * w), with: got[from..<(from + n * w)])
                p += n
            }
        }
        if localRows > 0 { try grouped.view(offset: 0, shape: [localRows * w]).write(out) }
    }

    /// The inverse: rows laid out by expert go back to the ranks and rows they came from.
    private func gather(_ grouped: Tensor, into rows: Tensor) throws {
        let w = width
        let values = localRows == 0 ? [] : try grouped.view(offset: 0, shape: [localRows * w]).floats()
        var bySource = [[Float]](repeating: [], count: comm.size)
        var p = 0
        for j in 0..<perRank {
            for s in 0..<comm.size {
                let n = received[s][j]
                bySource[s] += values[(p * w)..<((p + n) * w)]
                p += n
            }
        }
        let back = try comm.allToAll(bySource.flatMap { $0 }, sendCounts: recvRows.map { $0 * w }, recvCounts: sendRows.map { $0 * w })
        count(recvRows)
        if sentRows > 0 { try rows.view(offset: 0, shape: [sentRows * w]).write(back) }
    }

    func forward(xp: Tensor, yp: Tensor, plan: DispatchPlan, bank: ExpertBank, training: Bool, seed: UInt64) throws {
        let off = try plan.offsets.ints().map(Int.init)
        let counts = (0..<experts).map { Int32(off[$0 + 1] - off[$0]) }
        let all = try comm.allgather(counts).map(Int.init)   // [rank][expert]
        sentRows = off[experts]
        sendRows = (0..<comm.size).map { g in off[(g + 1) * perRank] - off[g * perRank] }
        received = (0..<comm.size).map { s in mine.map { all[s * experts + $0] } }
        recvRows = received.map { $0.reduce(0, +) }
        localRows = recvRows.reduce(0, +)
        // A stable buffer size (every rank could send all its rows here).
        capacity = max(plan.maxRows * comm.size, localRows, 1)
        // The rows of each expert held here (the bank holds only these), over the group's ranks.
        var offsets = [Int32](repeating: 0, count: perRank + 1)
        for j in 0..<perRank { offsets[j + 1] = offsets[j] + Int32(received.reduce(0) { $0 + $1[j] }) }
        let offsetsTensor = try ws.get("offsets", [perRank + 1], dtype: .i32)
        try offsetsTensor.write(offsets)
        offsetsAll = offsetsTensor
        let xpAll = try ws.get("xp", [capacity, width]), ypAll = try ws.get("yp", [capacity, width])
        try scatter(xp, into: xpAll)
        try bank.forward(xpAll, offsets: offsetsTensor, rows: capacity, into: ypAll, training: training, seed: seed)
        try gather(ypAll, into: yp)
    }

    func backward(dYp: Tensor, dXp: Tensor, bank: ExpertBank) throws {
        guard let offsetsAll else { throw ShapeError("expert exchange backward called before forward") }
        let xpAll = try ws.get("xp", [capacity, width])
        let dYpAll = try ws.get("dYp", [capacity, width]), dXpAll = try ws.get("dXp", [capacity, width])
        try scatter(dYp, into: dYpAll)
        try bank.backward(dYp: dYpAll, xp: xpAll, offsets: offsetsAll, rows: capacity, dXp: dXpAll)
        try gather(dXpAll, into: dXp)
    }
}
