import Foundation
import MoEModel

// The libFuzzer entry point (built only with MOE_GPU_FUZZ=1; see scripts/fuzz.sh).
// MOE_GPU_FUZZ_TARGET picks the reader.
let fuzzTarget = ProcessInfo.processInfo.environment["MOE_GPU_FUZZ_TARGET"] ?? "safetensors"
let fuzzScratch = URL(fileURLWithPath: FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory())
    .appendingPathComponent("moe-gpu-fuzz-\(getpid())")

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ bytes: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    ReaderFuzzing.check(fuzzTarget, Data(bytes: bytes, count: size), scratch: fuzzScratch)
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt) -> CInt

// SwiftPM links an executable's entry point under this name; libFuzzer's driver does the rest.
@_cdecl("moe_gpu_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var count = argc, args = argv
    return LLVMFuzzerRunDriver(&count, &args, fuzzOneInput)
}
