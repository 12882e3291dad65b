import Foundation
import Testing
@testable import UprobedServer

struct ConfigTests {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    @Test("config/uprobed.conf documents exactly the built-in defaults")
    func shippedConfigEqualsDefaults() throws {
        let text = try String(contentsOf: Self.repo.appendingPathComponent("config/uprobed.conf"), encoding: .utf8)
        // Parse onto a base where every field differs from the default: every key must be present.
        var scrambled = DaemonConfig()
        scrambled.socketPath = "/x"; scrambled.socketMode = 0o600; scrambled.stateDir = "/y"
        scrambled.maxLineBytes = 2048; scrambled.maxProbesPerRequest = 1; scrambled.maxGlobMatches = 1; scrambled.sendBufferBytes = 5
        scrambled.maxConnections = 3; scrambled.maxConnectionsPerUID = 2; scrambled.adminReservedConnections = 1; scrambled.elfCacheBytes = 9
        scrambled.batchWindowMicros = 1; scrambled.maxBatchRequests = 1; scrambled.compactionDelayMs = 1; scrambled.maxLinksPerGroup = 1; scrambled.slotCapacity = 16
        scrambled.minWatchIntervalMs = 1; scrambled.logLevel = "error"
        scrambled.adminUsers = ["x"]; scrambled.adminGroups = ["x"]; scrambled.registerUsers = ["x"]
        scrambled.registerGroups = ["x"]; scrambled.readUsers = ["x"]; scrambled.readGroups = ["x"]
        scrambled.maxProbesPerUID = 7; scrambled.metricsListen = "/z"; scrambled.metricsProbeSeries = .top(3); scrambled.stateCheckpointSeconds = 1
        scrambled.followCheckMs = 11; scrambled.followSettleMs = 3; scrambled.ownerCheckMs = 12
        scrambled.otlpEndpoint = "http://x"; scrambled.otlpIntervalMs = 5; scrambled.otlpTimeoutMs = 5
        scrambled.otlpHeaders = [OTLPHeader(name: "a", value: "b")]
        let parsed = try DaemonConfig.parse(text, base: scrambled)
        #expect(parsed == DaemonConfig())
    }

    @Test("bad config lines are errors naming the line")
    func badConfig() {
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("slot_capacity = lots\n") }
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("no_such_key = 1\n") }
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("socket relative\n") }
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("admin_uids = root, bad/name\n") }
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("metrics_listen = 0.0.0.0:9464\n") }
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("metrics_listen = relative.sock\n") }
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("max_probes_per_uid = -1\n") }
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("owner_check_ms = 0\n") }
        do { _ = try DaemonConfig.parse("\n\nbatch_window_us = -5\n"); Issue.record("accepted") } catch {
            #expect(error.line == 3)
        }
    }

    @Test("access and metrics keys parse: name and id lists, * , loopback or Unix metrics endpoints")
    func accessAndMetricsKeys() throws {
        let c = try DaemonConfig.parse("""
            admin_uids = 0, 1000 alice
            register_groups = probers
            read_uids = *
            read_groups =
            max_probes_per_uid = 0
            metrics_listen = 127.0.0.1:9464
            """)
        #expect(c.adminUsers == ["0", "1000", "alice"])
        #expect(c.registerGroups == ["probers"])
        #expect(c.readUsers == ["*"] && c.readGroups.isEmpty)
        #expect(c.maxProbesPerUID == 0)
        #expect(try MetricsEndpoint.parse(c.metricsListen) == .tcp(host: "127.0.0.1", port: 9464))
        #expect(try MetricsEndpoint.parse("[::1]:9") == .tcp(host: "::1", port: 9))
        #expect(try MetricsEndpoint.parse("/run/uprobed/metrics.sock") == .unix(path: "/run/uprobed/metrics.sock"))
        #expect(try MetricsEndpoint.parse("") == nil)
    }

    @Test("systemd units pass systemd-analyze verify with no output")
    func unitsVerify() throws {
        let dir = NSTemporaryDirectory() + "uprobed-units-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // verify checks that ExecStart exists: point it at a binary that does.
        let service = try String(contentsOf: Self.repo.appendingPathComponent("systemd/uprobed.service"), encoding: .utf8)
            .replacingOccurrences(of: "/usr/local/bin/uprobed", with: "/bin/true")
        try service.write(toFile: dir + "/uprobed.service", atomically: true, encoding: .utf8)
        try FileManager.default.copyItem(atPath: Self.repo.appendingPathComponent("systemd/uprobed.socket").path, toPath: dir + "/uprobed.socket")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/systemd-analyze")
        p.arguments = ["verify", dir + "/uprobed.socket", dir + "/uprobed.service"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        #expect(text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "systemd-analyze verify said: \(text)")
        let service2 = try String(contentsOf: Self.repo.appendingPathComponent("systemd/uprobed.service"), encoding: .utf8)
        #expect(service2.contains("Type=notify"))
    }
}

struct ConnectionLimitsTests {
    @Test("connection admission: the total, the admins' reserve (at most half) and the per-uid limit, in that order")
    func admission() {
        let l = ConnectionLimits(maxConnections: 8, maxPerUID: 4, adminReserved: 2)
        #expect(l.refusal(open: 0, heldByUID: 0, uid: 1000, isAdmin: false) == nil)
        #expect(l.refusal(open: 3, heldByUID: 4, uid: 1000, isAdmin: false)?.contains("max_connections_per_uid") == true)
        #expect(l.refusal(open: 6, heldByUID: 0, uid: 1000, isAdmin: false)?.contains("admin_reserved_connections") == true)
        #expect(l.refusal(open: 6, heldByUID: 6, uid: 0, isAdmin: true) == nil)
        #expect(l.refusal(open: 8, heldByUID: 8, uid: 0, isAdmin: true)?.contains("max_connections") == true)
        #expect(ConnectionLimits(maxConnections: 8, maxPerUID: 0, adminReserved: 0).refusal(open: 7, heldByUID: 7, uid: 5, isAdmin: false) == nil)
        // A reserve larger than half of a small max_connections keeps only half.
        let small = ConnectionLimits(maxConnections: 2, maxPerUID: 0, adminReserved: 16)
        #expect(small.refusal(open: 0, heldByUID: 0, uid: 5, isAdmin: false) == nil)
        #expect(small.refusal(open: 1, heldByUID: 1, uid: 5, isAdmin: false) != nil)
    }
}

struct ConfigKeyTableTests {
    @Test("config/uprobed.conf sets exactly the keys of the table, each once")
    func shippedConfigNamesEveryKey() throws {
        let text = try String(contentsOf: ConfigTests.repo.appendingPathComponent("config/uprobed.conf"), encoding: .utf8)
        let keys = text.split(separator: "\n").compactMap { line -> String? in
            let code = line.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            guard let eq = code.firstIndex(of: "=") else { return nil }
            return code[..<eq].trimmingCharacters(in: .whitespaces)
        }
        #expect(keys.sorted() == ConfigKey.all.map(\.name).sorted())
        #expect(Set(keys).count == keys.count)
    }

    @Test("a reload applies the reloadable keys and names the others as needing a restart")
    func reloadSplitsKeys() throws {
        let running = DaemonConfig()
        let next = try DaemonConfig.parse("log_level = debug\nread_uids = 5\nslot_capacity = 32\nmax_connections = 7\n")
        #expect(ConfigKey.restartOnlyChanges(running, next) == ["max_connections", "slot_capacity"])
        let applied = ConfigKey.reloaded(running, from: next)
        #expect(applied.logLevel == "debug" && applied.readUsers == ["5"])
        #expect(applied.slotCapacity == running.slotCapacity && applied.maxConnections == running.maxConnections)
    }
}
