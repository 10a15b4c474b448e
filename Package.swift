// swift-tools-version:6.0
import PackageDescription

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

        .target(name: "MoECompute", dependencies: ["COpenCL", "CBLAS"],
                plugins: ["EmbedKernelsPlugin"]),
        .target(name: "MoECheckpoint", dependencies: ["MoECompute"]),
        .target(name: "MoEModel", dependencies: ["MoECompute", "MoECheckpoint", "CZlib",
                                               .product(name: "Yams", package: "Yams")]),
        .executableTarget(name: "moe-gpu", dependencies: [
            "MoECompute", "MoEModel", "MoECheckpoint",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .testTarget(name: "MoEComputeTests", dependencies: ["MoECompute"]),
        .testTarget(name: "MoECheckpointTests", dependencies: ["MoECheckpoint", "MoECompute", "moe-gpu"]),
        .testTarget(name: "MoEModelTests", dependencies: ["MoEModel", "MoECompute", "MoECheckpoint"]),
        .testTarget(name: "CLITests", dependencies: ["moe-gpu"]),
    ],
    swiftLanguageModes: [.v5]
)
