import Foundation
import Logging
import Synchronization
import Testing
@testable import UprobedServer

struct OTLPSettingsTests {
    @Test("otlp_endpoint: off when empty, /v1/metrics added to a bare collector URL, a path kept, anything else a config error")
    func endpoints() throws {
        #expect(try OTLPEndpoint.parse("") == nil)
        #if OTLP
        #expect(try OTLPEndpoint.parse("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/metrics")
        #expect(try OTLPEndpoint.parse("http://collector:4318/") == "http://collector:4318/v1/metrics")
        #expect(try OTLPEndpoint.parse("https://otel.example.com/otlp/v1/metrics") == "https://otel.example.com/otlp/v1/metrics")
        #expect(try OTLPEndpoint.parse("http://[::1]:4318") == "http://[::1]:4318/v1/metrics")
        let c = try DaemonConfig.parse("otlp_endpoint = http://c:4318\notlp_interval_ms = 5_000\notlp_timeout_ms = 9000\n")
        let s = try #require(OTLPSettings(c))
        #expect(s.url == "http://c:4318/v1/metrics" && s.interval == .seconds(5))
        #expect(s.timeout == .seconds(5), "a push never outlasts the interval")
        #else
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("otlp_endpoint = http://c:4318\n") }
        #endif
        #expect(OTLPSettings(DaemonConfig()) == nil)
        for bad in ["ftp://c:4318", "http://", "c:4318", "http://u:p@c:4318", "http://c:4318/?q=1",
                    "http://c:99999", "http://c :4318", "/v1/metrics"] {
            do {
                _ = try DaemonConfig.parse("\notlp_endpoint = \(bad)\n")
                Issue.record("accepted \(bad)")
            } catch {
                #expect(error.line == 2 && error.message.contains("otlp_endpoint must be empty or an http:// or https:// URL"), "\(bad): \(error)")
            }
        }
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("otlp_interval_ms = 10\n") }
        #expect(throws: ConfigError.self) { try DaemonConfig.parse("otlp_timeout_ms = 0\n") }
    }

    @Test("otlp_headers: name=value pairs, values percent-decoded; bad names and control characters refused")
    func headers() throws {
        let c = try DaemonConfig.parse("otlp_headers = authorization=Bearer%20t0k, x-scope-orgid = tenant-1\n")
        #expect(c.otlpHeaders == [OTLPHeader(name: "authorization", value: "Bearer t0k"), OTLPHeader(name: "x-scope-orgid", value: "tenant-1")])
        #expect(try DaemonConfig.parse("otlp_headers =\n").otlpHeaders.isEmpty)
        for bad in ["novalue", "bad name=x", "x=a%0d%0aInjected: 1", "x=%zz", "=v"] {
            #expect(throws: ConfigError.self, "\(bad)") { try DaemonConfig.parse("otlp_headers = \(bad)\n") }
        }
    }
}

#if OTLP
/// The monitor fed with the diagnostic lines swift-otel 1.6.0 writes (the strings its periodic
/// reader logs), as a collector goes down and comes back.
struct OTLPExportMonitorTests {
    final class Captured: LogHandler, @unchecked Sendable {
        // @unchecked: `lines` behind the mutex.
        let lines = Mutex<[(Logger.Level, String, Logger.Metadata)]>([])
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) { lines.withLock { $0.append((event.level, event.message.description, event.metadata ?? [:])) } }
    }

    struct Refused: Error {}

    static func event(_ level: Logger.Level, _ text: String, error: (any Error)? = nil) -> LogEvent {
        LogEvent(level: level, message: "\(text)", error: error, metadata: ["component": "x"], source: nil, file: "", function: "", line: 0)
    }

    @Test("each read refreshes; an outage is one warning, counted per push; recovery is one notice; a retired backend is silent")
    func outageLoggedOnce() {
        let captured = Captured()
        let counters = ServiceCounters()
        let monitor = OTLPExportMonitor(endpoint: "http://c/v1/metrics", counters: counters, logger: Logger(label: "t") { _ in captured })
        let reads = Atomic<Int>(0)
        monitor.onRead { reads.add(1, ordering: .relaxed) }
        func push(failing: Bool) {
            monitor.observe(Self.event(.trace, OTLPExportMonitor.readMessage))
            monitor.observe(Self.event(.debug, "Exporting metrics."))
            if failing { monitor.observe(Self.event(.warning, "Failed to export metrics.", error: Refused())) }
        }
        push(failing: false)
        push(failing: true)   // the first push is known good here
        for _ in 0..<5 { push(failing: true) }
        push(failing: false)  // the 6 failures end here
        push(failing: false)  // the recovery is known here
        #expect(reads.load(ordering: .relaxed) == 9)
        #expect(counters.otlpExportFailures.load(ordering: .relaxed) == 6)
        #expect(counters.otlpExports.load(ordering: .relaxed) == 2)
        let lines = captured.lines.withLock { $0 }
        #expect(lines.count == 2, "\(lines.map(\.1))")
        #expect(lines.first?.0 == .warning && lines.first?.1.hasPrefix("OTLP push failed") == true)
        #expect(lines.first?.2["error"] != nil && lines.first?.2["endpoint"] == "http://c/v1/metrics")
        #expect(lines.last?.0 == .notice && lines.last?.1 == "OTLP push succeeded again" && lines.last?.2["failed_pushes"] == "6")
        // A second outage is reported again.
        push(failing: true)
        #expect(captured.lines.withLock { $0.count } == 3)
        monitor.retire()
        push(failing: true)
        push(failing: false)
        #expect(captured.lines.withLock { $0.count } == 3)
        #expect(reads.load(ordering: .relaxed) == 10, "a retired backend does not read the counters")
    }
}
#endif
