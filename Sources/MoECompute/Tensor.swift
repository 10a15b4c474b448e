import Foundation

public enum DType: String, Sendable {
    case f32, i32
    public var byteSize: Int { 4 }
}

/// Host memory owned by a CPU tensor (64-byte aligned for vector loads), zeroed.
/// Large buffers are anonymous mappings: the kernel hands out zero pages as they
/// are first written, so a model whose weights are about to be loaded, or a buffer
/// a model never fills, costs no memory until used.
public final class HostBuffer: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let byteCount: Int
    private let mapped: Int
    static let mapThreshold = 1 << 20

    init(byteCount: Int) {
        self.byteCount = byteCount
        if byteCount >= Self.mapThreshold,
           let p = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED {
            pointer = p
            mapped = byteCount
        } else {
            pointer = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 4), alignment: 64)
            // memset, not initializeMemory: the generic byte loop costs seconds per GB in debug builds.
            memset(pointer, 0, max(byteCount, 4))
            mapped = 0
        }
    }
    deinit {
        if mapped > 0 { munmap(pointer, mapped) } else { pointer.deallocate() }
    }
}

public enum TensorStorage: @unchecked Sendable {
    case host(HostBuffer)
    case device(CLBuffer)
}

/// An n-dimensional array of f32 (or i32 indices) living on one backend.
/// Row-major; `offset` (in elements) lets a tensor be a view into a larger buffer.
public final class Tensor: @unchecked Sendable {
    public let shape: [Int]
    public let dtype: DType
    public let storage: TensorStorage
    public let offset: Int
    public let backend: Backend

    init(shape: [Int], dtype: DType, storage: TensorStorage, offset: Int = 0, backend: Backend) {
        self.shape = shape; self.dtype = dtype; self.storage = storage; self.offset = offset; self.backend = backend
    }

    public var count: Int { shape.reduce(1, *) }
    public var rank: Int { shape.count }

    /// A view of `shape` starting `elementOffset` elements into this tensor, sharing its storage.
    public func view(offset elementOffset: Int = 0, shape newShape: [Int]) throws -> Tensor {
        let n = newShape.reduce(1, *)
        guard elementOffset >= 0, elementOffset + n <= count, newShape.allSatisfy({ $0 >= 0 }) else {
            throw ShapeError("view of \(newShape) at offset \(elementOffset) does not fit in a tensor of shape \(shape)")
        }
        return Tensor(shape: newShape, dtype: dtype, storage: storage, offset: offset + elementOffset, backend: backend)
    }

    /// The same elements read as another 4-byte type (the bits unchanged): lets
    /// one buffer carry float and int results, e.g. a step's metrics and expert loads.
    public func bitcast(to newType: DType) -> Tensor {
        Tensor(shape: shape, dtype: newType, storage: storage, offset: offset, backend: backend)
    }

    public func reshaped(_ newShape: [Int]) throws -> Tensor {
        guard newShape.reduce(1, *) == count else { throw ShapeError("cannot reshape \(shape) to \(newShape)") }
        return Tensor(shape: newShape, dtype: dtype, storage: storage, offset: offset, backend: backend)
    }

    public func floats() throws -> [Float] {
        try require(dtype == .f32, "floats() on an \(dtype) tensor")
        var out = [Float](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try backend.read(self, into: $0) }
        return out
    }

    public func ints() throws -> [Int32] {
        try require(dtype == .i32, "ints() on an \(dtype) tensor")
        var out = [Int32](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try backend.read(self, into: $0) }
        return out
    }

    public func write(_ values: [Float]) throws {
        try require(dtype == .f32 && values.count == count, "writing \(values.count) floats into \(dtype) tensor \(shape)")
        try values.withUnsafeBytes { try backend.write($0, to: self) }
    }

    public func write(_ values: [Int32]) throws {
        try require(dtype == .i32 && values.count == count, "writing \(values.count) ints into \(dtype) tensor \(shape)")
        try values.withUnsafeBytes { try backend.write($0, to: self) }
    }
}

/// A tensor of the wrong shape or type was passed to an op.
public struct ShapeError: Error, CustomStringConvertible {
    public let description: String
    public init(_ message: String) { description = message }
}

@inline(__always)
func require(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw ShapeError(message()) }
}
