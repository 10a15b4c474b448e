// swift-tools-version:6.0
import PackageDescription

// The CPU backend's own loops (GELU, norms, softmax, routing, attention, AdamW)
// are SIMD8/SIMD16 Swift code: built for the x86-64-v3 level (AVX2 + FMA + BMI2,
// every x86 server CPU since 2013-2015; LLVM's name for it is "haswell") instead
// of the SSE2 default, so an 8-lane op is one instruction. Set MOE_GPU_ISA=x86-64
// at build time for an older CPU, or skylake-avx512 (x86-64-v4) for AVX-512.
// OpenBLAS picks its own kernels at run time either way.
import Foundation
let isa = ProcessInfo.processInfo.environment["MOE_GPU_ISA"] ?? "haswell"
#if arch(x86_64)
let vectorISA: [SwiftSetting] = [.unsafeFlags(["-target-cpu", isa])]
#else
let vectorISA: [SwiftSetting] = []
#endif
// Checkpoint decoding (GGUF dequantisation, upcycling's weight shuffles) and the
// model's host-side loops run over hundreds of millions of values: optimised in
// debug builds too, or the tests on the real checkpoints take minutes.
let alwaysOptimized: [SwiftSetting] = [.unsafeFlags(["-O"])]

let package = Package(
    name: "moe-gpu",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "moe-gpu", targets: ["moe-gpu"]),
        .library(name: "MoECompute", targets: ["MoECompute"]),
        .library(name: "MoEModel", targets: ["MoEModel"]),
        .library(name: "MoECheckpoint", targets: ["MoECheckpoint"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1"),
    ],
    targets: [
        // C libraries from Debian: the OpenCL ICD loader and OpenBLAS.
        .systemLibrary(name: "COpenCL", path: "Sources/COpenCL",
                       providers: [.apt(["ocl-icd-opencl-dev", "opencl-headers"])]),
        .systemLibrary(name: "CBLAS", path: "Sources/CBLAS",
                       providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CZlib", path: "Sources/CZlib", providers: [.apt(["zlib1g-dev"])]),

        // Turns Kernels/*.cl into Swift string literals so the binary runs alone.
        .executableTarget(name: "embed-kernels", path: "Sources/embed-kernels"),
        .plugin(name: "EmbedKernelsPlugin", capability: .buildTool(),
                dependencies: ["embed-kernels"], path: "Sources/EmbedKernelsPlugin"),

        // FMA-chain probes of the CPU's fp32 peak (AVX-512, AVX2+FMA, portable), chosen at
        // run time; always -O2, so the chains stay in registers in debug builds too.
        .target(name: "CPeak", path: "Sources/CPeak", cSettings: [.unsafeFlags(["-O2"])]),

        // The CPU backend's vector loops in C (GELU, norms, softmax, attention tiles), each
        // built for AVX-512, AVX2+FMA and the baseline and chosen at load time.
        .target(name: "CKernels", path: "Sources/CKernels", cSettings: [.unsafeFlags(["-O3"])]),

        // Open MPI, loaded with dlopen under mpirun: the build needs no MPI.
        .target(name: "CMPI", path: "Sources/CMPI", linkerSettings: [.linkedLibrary("dl")]),

        .target(name: "MoECompute", dependencies: ["COpenCL", "CBLAS", "CPeak", "CKernels", "CMPI"],
                swiftSettings: vectorISA,
                plugins: ["EmbedKernelsPlugin"]),
        .target(name: "MoECheckpoint", dependencies: ["MoECompute"], swiftSettings: alwaysOptimized),
        .target(name: "MoEModel", dependencies: ["MoECompute", "MoECheckpoint", "MoETokenizer", "CZlib",
                                               .product(name: "Yams", package: "Yams")], swiftSettings: alwaysOptimized),
        // Tokenizers (byte-level BPE from GGUF or tokenizer.json, bytes): data handling.
        .target(name: "MoETokenizer", dependencies: ["MoECheckpoint"]),
        .executableTarget(name: "moe-gpu", dependencies: [
            "MoECompute", "MoEModel", "MoECheckpoint", "MoETokenizer",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        // What every test target shares: which backends run (the two passes of `make test`), inputs, error bounds.
        .target(name: "MoETestSupport", dependencies: ["MoECompute"], path: "Tests/MoETestSupport"),
        .testTarget(name: "MoEComputeTests", dependencies: ["MoECompute", "MoETestSupport"]),
        .testTarget(name: "MoECheckpointTests", dependencies: ["MoECheckpoint", "MoECompute", "moe-gpu", "MoETestSupport"]),
        .testTarget(name: "MoEModelTests", dependencies: ["MoEModel", "MoECompute", "MoECheckpoint", "MoETokenizer", "MoETestSupport"]),
        .testTarget(name: "MoETokenizerTests", dependencies: ["MoETokenizer", "MoECheckpoint", "MoETestSupport"], exclude: ["Fixtures"]),
        .testTarget(name: "CLITests", dependencies: ["moe-gpu", "MoETestSupport"]),
    ],
    swiftLanguageModes: [.v5]
)

// The reader fuzzers' libFuzzer target: only with MOE_GPU_FUZZ=1 (scripts/fuzz.sh builds it
// with --sanitize=fuzzer), since libFuzzer supplies its main.
if ProcessInfo.processInfo.environment["MOE_GPU_FUZZ"] != nil {
    // Coverage hooks and AddressSanitizer in the reader modules (compile only; the
    // build-tool executable stays a plain program), libFuzzer linked into the target.
    for t in package.targets where ["MoECheckpoint", "MoETokenizer", "MoEModel", "MoECompute"].contains(t.name) {
        t.swiftSettings = (t.swiftSettings ?? []) + [.unsafeFlags(["-sanitize=fuzzer,address"])]
    }
    package.targets.append(.executableTarget(name: "moe-gpu-fuzz", dependencies: ["MoEModel"], path: "Sources/moe-gpu-fuzz",
                                             swiftSettings: [.unsafeFlags(["-parse-as-library", "-sanitize=fuzzer,address"])],
                                             linkerSettings: [.unsafeFlags(["-sanitize=fuzzer,address"])]))
    package.products.append(.executable(name: "moe-gpu-fuzz", targets: ["moe-gpu-fuzz"]))
}
