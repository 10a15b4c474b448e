import Foundation

/// Writes `data` to a temporary file beside `url`, then renames it into place,
/// so a crash or a full disk never leaves a half-written file at `url`.
public func atomicWrite(_ data: Data, to url: URL) throws {
    let dir = url.deletingLastPathComponent()
    let tmp = dir.appendingPathComponent(".\(url.lastPathComponent).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
    do {
        try data.write(to: tmp)
        if rename(tmp.path, url.path) != 0 {
            throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: url.path])
        }
    } catch {
        try? FileManager.default.removeItem(at: tmp)
        throw error
    }
}
