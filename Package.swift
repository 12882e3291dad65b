// swift-tools-version:6.1
// uprobed — a daemon that owns every user-space probe on a host.
//
// Module layout follows the data flow (see ../shared/DESIGN.md and README.md):
//   CUprobeSys, CSystemd      C shims: bpf(2)/perf_event_open(2), UAPI structs; libsystemd
//   CZlib                     zlib (compressed symbol names)
//   CTerminal                 signalfd(2) for uprobectl top
//   UprobeErrors              the error codes every layer reports (wire and journal)
//   UprobeSystem              POSIX calls that capture errno into one error type
//   UprobeELF                 spec -> (file, offset): symbols, versions, USDT, libraries
//   UprobeKernel              BPF counting program, maps, uprobe_multi links, counter reads
//   UprobeTree                the uprobes tree and its epoch-based reclamation domain
//   UprobeCore                slots, batcher and engine (the single writer)
//   UprobedProtocol           JSON-lines wire types shared by daemon and CLI
//   UprobedProbeSets          probe-set files (YAML, through Yams), read by daemon and CLI
//   UprobedServer             socket, peer auth, systemd, config, persistence
//   uprobed, uprobectl        the two executables, thin
import PackageDescription

let strict: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]

let package = Package(
    name: "uprobed",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "uprobed", targets: ["uprobed"]),
        .executable(name: "uprobectl", targets: ["uprobectl"]),
    ],
    // OTLP: the OpenTelemetry metrics exporter (config `otlp_endpoint`). On by default; swift-otel
    // brings swift-protobuf and async-http-client, several minutes of a first build, so the
    // sanitizer builds (`make sanitize`), which do not test it, turn it off with
    // --disable-default-traits. A build without it refuses a config that sets `otlp_endpoint`.
    traits: [
        .trait(name: "OTLP", description: "The OTLP/HTTP metrics exporter (swift-otel)"),
        .default(enabledTraits: ["OTLP"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        // OTLP/HTTP only: the gRPC exporter (grpc-swift and its HTTP/2 transport) is not built.
        .package(url: "https://github.com/swift-otel/swift-otel.git", .upToNextMinor(from: "1.6.0"), traits: ["OTLPHTTP"]),
    ],
    targets: [
        .target(name: "CUprobeSys"),
        .target(name: "UprobeErrors", swiftSettings: strict),
        .target(name: "UprobeSystem",
                dependencies: [.product(name: "SystemPackage", package: "swift-system")],
                swiftSettings: strict),
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd",
                       providers: [.apt(["libsystemd-dev"])]),
        // zlib, for the compressed symbol names of large resolutions.
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .target(name: "UprobeELF",
                dependencies: ["CUprobeSys", "CZlib", "UprobeErrors", "UprobeSystem", .product(name: "SystemPackage", package: "swift-system")],
                swiftSettings: strict),
        .target(name: "UprobeKernel",
                dependencies: ["CUprobeSys", "UprobeErrors", "UprobeSystem", .product(name: "SystemPackage", package: "swift-system")],
                swiftSettings: strict),
        .target(name: "UprobeTree", swiftSettings: strict),
        .target(name: "UprobeCore",
                dependencies: ["UprobeTree", "UprobeELF", "UprobeKernel", "UprobeErrors", "UprobeSystem", "CUprobeSys",
                               .product(name: "Logging", package: "swift-log")],
                swiftSettings: strict),
        .target(name: "UprobedProtocol", dependencies: ["UprobeErrors"], swiftSettings: strict),
        .target(name: "UprobedProbeSets",
                dependencies: ["UprobedProtocol", .product(name: "Yams", package: "Yams")],
                swiftSettings: strict),
        .target(name: "CTerminal"),
        .target(name: "UprobedClient",
                dependencies: ["UprobedProtocol", "UprobeSystem", .product(name: "SystemPackage", package: "swift-system")],
                swiftSettings: strict),
        .target(name: "UprobedServer",
                dependencies: ["UprobeCore", "UprobeELF", "UprobeKernel", "UprobeErrors", "UprobeSystem", "UprobeTree", "UprobedProtocol", "UprobedProbeSets", "CSystemd", "CUprobeSys",
                               .product(name: "NIOCore", package: "swift-nio"),
                               .product(name: "NIOPosix", package: "swift-nio"),
                               .product(name: "Logging", package: "swift-log"),
                               .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                               .product(name: "SystemPackage", package: "swift-system"),
                               .product(name: "Prometheus", package: "swift-prometheus"),
                               .product(name: "NIOHTTP1", package: "swift-nio"),
                               .product(name: "OTel", package: "swift-otel", condition: .when(traits: ["OTLP"])),
                               .product(name: "Metrics", package: "swift-metrics", condition: .when(traits: ["OTLP"]))],
                swiftSettings: strict),
        .executableTarget(name: "uprobed",
                          dependencies: ["UprobedServer", "UprobedProtocol",
                                         .product(name: "Logging", package: "swift-log"),
                                         .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                                         .product(name: "ArgumentParser", package: "swift-argument-parser")],
                          swiftSettings: strict),
        .executableTarget(name: "uprobectl",
                          dependencies: ["UprobedProtocol", "UprobedProbeSets", "UprobedClient", "CTerminal", "UprobeSystem",
                                         .product(name: "ArgumentParser", package: "swift-argument-parser")],
                          swiftSettings: strict),
        .executableTarget(name: "bench-tree", dependencies: ["UprobeTree"], path: "bench/TreeBench",
                          swiftSettings: strict),
        .executableTarget(name: "bench-read",
                          dependencies: ["UprobeCore", "UprobeELF", "UprobeKernel",
                                         .product(name: "Logging", package: "swift-log")],
                          path: "bench/ReadBench", swiftSettings: strict),
        .executableTarget(name: "bench-whole",
                          dependencies: ["UprobeKernel", "UprobeELF", "UprobedProtocol", "UprobedClient"],
                          path: "bench/WholeBench", swiftSettings: strict),
        .executableTarget(name: "bench-batch",
                          dependencies: ["UprobeKernel", "UprobeELF", "UprobedProtocol", "UprobedClient"],
                          path: "bench/BatchBench", swiftSettings: strict),
        .executableTarget(name: "bench-latency",
                          dependencies: ["UprobeKernel", "UprobeELF", "UprobedProtocol", "UprobedClient"],
                          path: "bench/LatencyBench", swiftSettings: strict),
        .testTarget(name: "UprobeELFTests", dependencies: ["UprobeELF"]),
        .testTarget(name: "UprobeTreeTests", dependencies: ["UprobeTree"]),
        // Golden/ holds recorded program bytes the tests read by path, not a resource.
        .testTarget(name: "UprobeKernelTests", dependencies: ["UprobeKernel"], exclude: ["Golden"]),
        .testTarget(name: "UprobeCoreTests",
                    dependencies: ["UprobeCore", "UprobeELF", "UprobeKernel", "UprobeTree",
                                   .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "UprobedProtocolTests", dependencies: ["UprobedProtocol"]),
        .testTarget(name: "UprobedProbeSetsTests", dependencies: ["UprobedProbeSets", "UprobedProtocol"]),
        .testTarget(name: "UprobedServerTests",
                    dependencies: ["UprobedServer", "UprobeCore", "UprobeKernel", "UprobeELF", "UprobedProtocol",
                                   .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "IntegrationTests", dependencies: ["UprobedProtocol", "UprobedClient"]),
    ]
)
