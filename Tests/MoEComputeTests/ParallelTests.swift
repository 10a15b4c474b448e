import Foundation
@testable import MoECompute
import XCTest

/// The CPU backend's thread pool (CKernels/parallel.c): every part of every job
/// runs exactly once and the call returns only when all have finished, also
/// when jobs follow each other faster than the workers wake (a worker woken for
/// one job that runs late must not take a part of the next).
final class ParallelTests: XCTestCase {
    func testEveryPartRunsOnceAndBeforeTheCallReturns() {
        let jobs = 20_000, maxParts = 24
        let counts = UnsafeMutablePointer<Int32>.allocate(capacity: maxParts)
        defer { counts.deallocate() }
        var wrong = 0
        for j in 0..<jobs {
            let parts = 1 + (j * 7) % maxParts
            counts.initialize(repeating: 0, count: maxParts)
            CPUBackend.parallel(parts) { p in
                // A little uneven work so parts overlap with late workers.
                var x: Int32 = 0
                for i in 0..<((p * 13 + j) % 50) { x &+= Int32(i) }
                counts[p] &+= 1 &+ (x & 0)
            }
            // The counts are read after the call returned: all parts done, each once.
            for p in 0..<maxParts where counts[p] != (p < parts ? 1 : 0) { wrong += 1 }
        }
        XCTAssertEqual(wrong, 0, "parts run twice, not at all, or after the call returned")
    }
}
