// bench-batch: what batching buys, measured in one run on this machine.
//
// Compares, for 10,000 probes on one binary:
//   - the kernel floor: one raw uprobe_multi link create / close (no daemon, no JSON);
//   - the per-probe perf_event way (what `perf probe` / classic BCC do): measured on a sample
//     and extrapolated linearly to 10,000 (closing 10,000 perf events one by one takes minutes);
//   - uprobed end to end through its socket: one 10,000-probe request, and 10,000 single-probe
//     requests from 16 concurrent clients; plus `stats` latency while that churn runs.
// Not a timed test: it prints a table; docs/BENCHMARKS.md records it.
// Environment: UPROBED_BIN (the daemon to run), BENCH_DAEMON_CONFIG (its config lines, ';'-separated),
// BENCH_PROBES, BENCH_PERF_SAMPLE, BENCH_ONLY=churn (only the churn, one line out).
import Foundation
import UprobeELF
import UprobeKernel
import UprobedClient
import UprobedProtocol

let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
let probes = Int(ProcessInfo.processInfo.environment["BENCH_PROBES"] ?? "") ?? 10_000
let perfSample = Int(ProcessInfo.processInfo.environment["BENCH_PERF_SAMPLE"] ?? "") ?? 200
let clients = 16
/// BENCH_ONLY=churn: only the 16-client churn and the stats poller (no floor, no perf_event, no
/// one-request cycles), for A/B runs of the churn a few seconds each; prints no table.
let churnOnly = ProcessInfo.processInfo.environment["BENCH_ONLY"] == "churn"
/// Cycles of the floor and of the one-request register/unregister (their medians are reported;
/// the daemon's cold first register runs before them and is reported apart).
let cycles = 5
/// The pause before each floor cycle and each one-request register, so both start with the
/// kernel done with the previous cycle's uprobes.
let settleMicros: UInt32 = 200_000

func now() -> Double { Date().timeIntervalSinceReferenceDate }
func ms(_ s: Double) -> String { String(format: "%.1f ms", s * 1000) }
func die(_ m: String) -> Never { FileHandle.standardError.write(Data("bench-batch: \(m)\n".utf8)); exit(1) }
func median(_ xs: [Double]) -> Double { let s = xs.sorted(); return s[s.count / 2] }
func percentile(_ xs: [Double], _ p: Double) -> Double {
    let s = xs.sorted(); return s[min(s.count - 1, Int(Double(s.count) * p))]
}

final class Latencies: @unchecked Sendable {
    // @unchecked: every field behind `lock`.
    let lock = NSLock(); var values: [Double] = []; var stop = false
    func add(_ v: Double) { lock.lock(); values.append(v); lock.unlock() }
    var stopped: Bool { lock.lock(); defer { lock.unlock() }; return stop }
    func halt() { lock.lock(); stop = true; lock.unlock() }
}
final class IDBag: @unchecked Sendable {
    // @unchecked: every field behind `lock`.
    let lock = NSLock(); var ids: [String] = []
    func add(_ id: String) { lock.lock(); ids.append(id); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return ids }
}

/// utime + stime of a process, from /proc/PID/stat.
func cpuSeconds(pid: Int32) -> Double {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = text.lastIndex(of: ")") else { return 0 }
    let fields = text[text.index(after: close)...].split(separator: " ")
    guard fields.count > 13, let u = Double(fields[11]), let s = Double(fields[12]) else { return 0 }
    return (u + s) / Double(sysconf(Int32(_SC_CLK_TCK)))
}

func ownCPUSeconds() -> Double { cpuSeconds(pid: getpid()) }

/// What uprobed is compared with: the kernel floor (one raw uprobe_multi link create/close of
/// all offsets, per cycle) and one perf_event per probe (sampled, extrapolated to `probes`).
struct Baselines {
    var floorCreate: [Double] = [], floorClose: [Double] = []
    var perfOpen = 0.0, perfClose = 0.0

    static func measure(binary: String, offsets: [UInt64]) -> Baselines {
        var b = Baselines()
        print("measuring kernel floor (raw uprobe_multi link, \(probes) offsets)…")
        let program: CounterProgram
        do { program = try CounterProgram(capacity: UInt32(max(65_536, probes * 2))) } catch { die("\(error)") }
        // Each cycle starts from a quiet kernel, as each daemon register below does. Back to back,
        // a create that follows a close within ~20 ms takes 4.5 ms instead of ~11.5 ms (and its
        // close 60 ms instead of 24): the kernel is still tearing down the previous link's uprobes.
        // A median of three back-to-back cycles landed in either mode from run to run.
        for _ in 0..<cycles {
            usleep(settleMicros)
            let t0 = now()
            let link: UprobeMultiLink
            do {
                link = try program.attach(path: binary, offsets: offsets, refCtrOffsets: nil, slots: (0..<UInt32(probes)).map { $0 },
                                          pid: nil, retprobe: false)
            } catch { die("\(error)") }
            let t1 = now()
            link.close()
            let t2 = now()
            b.floorCreate.append(t1 - t0); b.floorClose.append(t2 - t1)
        }

        print("measuring one perf_event per probe (\(perfSample) probes, extrapolated to \(probes))…")
        do {
            var events: [PerfEventUprobe] = []
            let t0 = now()
            for i in 0..<perfSample {
                events.append(try PerfEventUprobe(program: program, path: binary, offset: offsets[i], slot: UInt32(i), pid: nil, retprobe: false))
            }
            let t1 = now()
            for e in events { e.close() }  // one by one, as per-probe tools do
            let t2 = now()
            b.perfOpen = (t1 - t0) / Double(perfSample) * Double(probes)
            b.perfClose = (t2 - t1) / Double(perfSample) * Double(probes)
        } catch { die("perf_event: \(error)") }
        return b
    }
}

func runBench() {
    // MARK: - the target binary: 10,000 distinct functions
    let work = NSTemporaryDirectory() + "bench-batch-\(getpid())"
    try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: work) }
    let binary = work + "/many"
    do {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/gcc")
        p.arguments = ["-O1", "-o", binary, repo.appendingPathComponent("Tests/Fixtures/kernel/many.c").path]
        try p.run(); p.waitUntilExit()
        guard p.terminationStatus == 0 else { die("gcc failed") }
    } catch { die("gcc: \(error)") }
    let names = (0..<probes).map { String(format: "g%04d", $0) }
    let resolver = Resolver()
    var offsets: [UInt64] = []
    let resolveStart = now()
    for n in names {
        guard let r = try? resolver.resolve(ProbeSpecInput(path: binary, symbol: n)), let o = r.first?.fileOffset else { die("resolve \(n)") }
        offsets.append(o)
    }
    let resolveTime = now() - resolveStart

    // The yardsticks, skipped in churn-only mode (`Baselines()` is empty then).
    let baselines = churnOnly ? Baselines() : Baselines.measure(binary: binary, offsets: offsets)
    let floorCreate = baselines.floorCreate, floorClose = baselines.floorClose
    let perfOpen = baselines.perfOpen, perfClose = baselines.perfClose
    let floorAttach = churnOnly ? 0 : median(floorCreate), floorDetach = churnOnly ? 0 : median(floorClose)

    // MARK: - the daemon
    let daemonPath = ProcessInfo.processInfo.environment["UPROBED_BIN"] ?? repo.appendingPathComponent(".build/release/uprobed").path
    guard FileManager.default.isExecutableFile(atPath: daemonPath) else { die("\(daemonPath) not built; run `swift build -c release`") }
    let socket = work + "/uprobed.sock"
    // BENCH_DAEMON_CONFIG: config lines for the daemon (e.g. "batch_window_us = 0"), to sweep settings.
    let daemonConfig = ProcessInfo.processInfo.environment["BENCH_DAEMON_CONFIG"] ?? ""
    try? daemonConfig.replacingOccurrences(of: ";", with: "\n").write(toFile: work + "/empty.conf", atomically: true, encoding: .utf8)
    let daemon = Process()
    daemon.executableURL = URL(fileURLWithPath: daemonPath)
    // No pins: the daemon's probes go with it (pinning costs one BPF_OBJ_PIN per link).
    daemon.arguments = ["--socket", socket, "--state-dir", work + "/state", "--pin-dir", "", "--config", work + "/empty.conf", "--log-level", "warning"]
    daemon.standardError = FileHandle.nullDevice
    do { try daemon.run() } catch { die("start uprobed: \(error)") }
    defer { daemon.terminate(); daemon.waitUntilExit() }
    var ready = false
    for _ in 0..<500 { if (try? LineClient(socketPath: socket)) != nil { ready = true; break }; usleep(10_000) }
    guard ready else { die("uprobed did not start") }

    @Sendable func call(_ c: LineClient, _ o: JSONObject) -> JSONObject {
        do {
            guard let r = try c.call(o).objectValue, r["ok"] == .bool(true) else { die("request failed: \(o["op"].map(JSONSerializer.serialize) ?? "")") }
            return r
        } catch { die("\(error)") }
    }
    @Sendable func status() -> JSONObject {
        guard let c = try? LineClient(socketPath: socket) else { die("connect") }
        return call(c, ["op": "status"])
    }
    func batching(_ key: String) -> Int64 { status()["batching"]?.objectValue?[key]?.int64Value ?? -1 }
    func service(_ key: String) -> Int64 { status()["service"]?.objectValue?[key]?.int64Value ?? -1 }
    func waitDetached() {
        while true {
            let s = status()
            if s["links"] == .int(0), s["batching"]?.objectValue?["pending_removals"] == .int(0) { return }
            usleep(2_000)
        }
    }
    let specs: [JSONValue] = names.map { ProbeSpec(path: binary, symbol: $0).json }
    let requestLine = JSONSerializer.serializeLine(.object(["op": "register", "consumer": "bulk", "probes": .array(specs)]))
    var parseTimes: [Double] = []
    for _ in 0..<3 {
        let t0 = now()
        _ = RequestDecoder.decode(requestLine.dropLast())
        parseTimes.append(now() - t0)
    }

    if !churnOnly { print("measuring uprobed: one \(probes)-probe request…") }
    var oneRegister: [Double] = [], oneUnregisterAck: [Double] = [], oneDetached: [Double] = []
    // The end-to-end time split three ways: this client writing the request line, the line
    // sent until the whole reply line is back (the daemon's part), this client parsing it.
    var clientEncode: [Double] = [], roundTrip: [Double] = [], clientParse: [Double] = []
    var replyBytes = 0
    // One cycle first, not counted: the daemon's first register of the binary also parses its
    // ELF file (the floor's offsets were resolved before it was timed, too). Reported apart.
    var coldRegister = 0.0
    do {
        guard let c = try? LineClient(socketPath: socket, timeoutSeconds: 120) else { die("connect") }
        for cycle in 0...cycles where !churnOnly {
            usleep(settleMicros)
            let t0 = now()
            let line = JSONSerializer.serializeLine(.object(["op": "register", "consumer": "bulk", "probes": .array(specs)]))
            let tSent: Double, tReceived: Double
            do {
                let tEncoded = now()
                try c.sendRaw(line)
                guard let reply = try c.readLine() else { die("register: connection closed") }
                tReceived = now()
                guard let parsed = try? JSONParser.parse(reply).objectValue, parsed["ok"] == .bool(true) else { die("register failed") }
                replyBytes = reply.count
                tSent = tEncoded
            } catch { die("register: \(error)") }
            let t1 = now()
            _ = call(c, ["op": "unregister", "consumer": "bulk"])
            let t2 = now()
            waitDetached()
            let t3 = now()
            if cycle == 0 { coldRegister = t1 - t0; continue }
            clientEncode.append(tSent - t0); roundTrip.append(tReceived - tSent); clientParse.append(t1 - tReceived)
            oneRegister.append(t1 - t0); oneUnregisterAck.append(t2 - t1); oneDetached.append(t3 - t1)
        }
    }

    print("measuring uprobed: \(probes) single-probe requests from \(clients) clients, stats latency meanwhile…")
    // Keep 10,000 probes registered for the stats reader.
    do {
        guard let c = try? LineClient(socketPath: socket, timeoutSeconds: 120) else { die("connect") }
        _ = call(c, ["op": "register", "consumer": "resident", "probes": .array(specs)])
    }
    let graceBefore = batching("grace_periods"), batchesBefore = batching("batches"), requestsBefore = batching("requests")
    let busyBefore = batching("writer_busy_us"), persistBefore = batching("state_write_us"), syncsBefore = service("state_syncs")
    // The stats poller alternates: the 10,000 resident probes (`"consumer": "resident"`, the
    // issue's measure) and every probe (10,000 resident + those churning). Latency is taken
    // twice: when the whole reply line has arrived (the daemon's part), and once this client
    // has parsed it into a JSON tree (our parser; other clients parse at their own speed).
    let statsLatency = Latencies(), statsParsed = Latencies(), statsAll = Latencies()
    let residentRequest = JSONSerializer.serializeLine(.object(["op": "stats", "consumer": "resident"]))
    let allRequest = JSONSerializer.serializeLine(.object(["op": "stats"]))
    let statsThread = Thread {
        guard let c = try? LineClient(socketPath: socket) else { return }
        var resident = true
        while !statsLatency.stopped {
            let t0 = now()
            do {
                try c.sendRaw(resident ? residentRequest : allRequest)
                guard let line = try c.readLine() else { die("stats: connection closed") }
                let t1 = now()
                guard let reply = try? JSONParser.parse(line).objectValue, reply["ok"] == .bool(true),
                      let entries = reply["stats"]?.arrayValue else { die("stats failed") }
                let t2 = now()
                if resident {
                    guard entries.count == probes else { die("stats of the resident consumer: \(entries.count) entries") }
                    statsLatency.add(t1 - t0)
                    statsParsed.add(t2 - t0)
                } else {
                    statsAll.add(t1 - t0)
                }
            } catch { die("stats: \(error)") }
            resident.toggle()
            usleep(20_000)  // a monitoring client polls; a tight loop would steal a core from the churn
        }
    }
    statsThread.start()
    let perClient = probes / clients
    let daemonCPUBefore = cpuSeconds(pid: daemon.processIdentifier)
    let benchCPUBefore = ownCPUSeconds()
    let churnStart = now()
    var registerPhase = 0.0
    do {
        let ids = IDBag()
        let g = ThreadGroup()
        for client in 0..<clients {
            g.spawn {
                guard let c = try? LineClient(socketPath: socket) else { die("connect") }
                for i in 0..<perClient {
                    let r = call(c, ["op": "register", "probes": [specs[client * perClient + i]]])
                    if let id = r["probes"]?.arrayValue?.first?.objectValue?["id"]?.stringValue {
                        ids.add(id)
                    }
                }
            }
        }
        g.wait()
        registerPhase = now() - churnStart
        let all = ids.all
        for client in 0..<clients {
            g.spawn {
                guard let c = try? LineClient(socketPath: socket) else { die("connect") }
                for i in stride(from: client, to: all.count, by: clients) {
                    _ = call(c, ["op": "unregister", "probes": [.string(all[i])]])
                }
            }
        }
        g.wait()
    }
    let churnAck = now() - churnStart
    let daemonCPU = cpuSeconds(pid: daemon.processIdentifier) - daemonCPUBefore
    let benchCPU = ownCPUSeconds() - benchCPUBefore
    statsLatency.halt()
    let graceAfter = batching("grace_periods"), batchesAfter = batching("batches"), requestsAfter = batching("requests")
    let writerBusy = Double(batching("writer_busy_us") - busyBefore) / 1e6, persistBusy = Double(batching("state_write_us") - persistBefore) / 1e6
    let churnRequests = Int(requestsAfter - requestsBefore)  // only register/unregister count as requests
    let churnSyncs = service("state_syncs") - syncsBefore
    let stats = statsLatency.values

    // MARK: - report
    if churnOnly {
        print(String(format: "churn only: registers %.0f ms, total %.0f ms; CPU uprobed %.2f s, bench %.2f s; writer busy %.2f s; %d batches (mean %.1f); stats of 10000 p50 %.1f ms, p99 %.1f ms (%d calls)",
                     registerPhase * 1000, churnAck * 1000, daemonCPU, benchCPU, writerBusy, Int(batchesAfter - batchesBefore),
                     Double(churnRequests) / Double(max(1, batchesAfter - batchesBefore)),
                     stats.isEmpty ? 0 : percentile(stats, 0.5) * 1000, stats.isEmpty ? 0 : percentile(stats, 0.99) * 1000, stats.count))
        return
    }
    let machine = (try? String(contentsOfFile: "/proc/sys/kernel/osrelease", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
    print("")
    print("bench-batch — daemon config: \(daemonConfig.isEmpty ? "defaults" : daemonConfig)")
    print("bench-batch — \(probes) probes on one binary; \(ProcessInfo.processInfo.activeProcessorCount) CPUs, Linux \(machine), \(Date())")
    print("")
    func row(_ cells: [String]) { print("| " + cells.joined(separator: " | ") + " |") }
    row(["operation", "uprobed", "kernel floor", "uprobed / floor", "perf_event per probe", "perf_event / uprobed"])
    row(["---", "---", "---", "---", "---", "---"])
    let reg = median(oneRegister), unregAck = median(oneUnregisterAck), det = median(oneDetached)
    row(["register \(probes) in one request", ms(reg), ms(floorAttach), String(format: "%.2fx", reg / floorAttach),
         ms(perfOpen) + " (extrapolated)", String(format: "%.0fx", perfOpen / reg)])
    row(["unregister them: reply", ms(unregAck), "—", "—", "—", "—"])
    row(["unregister them: detached from the kernel", ms(det), ms(floorDetach), String(format: "%.2fx", det / floorDetach),
         ms(perfClose) + " (extrapolated)", String(format: "%.0fx", perfClose / det)])
    row(["\(probes) single-probe registers, \(clients) clients", ms(registerPhase), "—", "—", "—", "—"])
    row(["then \(probes) single-probe unregisters (total, replies)", ms(churnAck), "—", "—", "—", "—"])
    print("")
    print("components of one \(probes)-probe register (medians): this client writes the \(requestLine.count / 1024) KiB request line in \(ms(median(clientEncode))), sent → \(replyBytes / 1024) KiB reply line received \(ms(median(roundTrip))) (the daemon's part), this client parses it in \(ms(median(clientParse))); the request line alone decodes in \(ms(median(parseTimes))); \(probes) symbols resolved one spec at a time (the ELF parsed once, then cached) in \(ms(resolveTime))")
    func each(_ xs: [Double]) -> String { xs.map { String(format: "%.1f", $0 * 1000) }.joined(separator: ", ") + " ms" }
    print("each of the \(cycles) cycles, in order, each after a \(settleMicros / 1000) ms pause: kernel floor create \(each(floorCreate)), close \(each(floorClose)); uprobed register \(each(oneRegister)), detached \(each(oneDetached)); before them, not counted, the daemon's first register of the binary (cold: its ELF file is parsed then, among other first-time work) \(ms(coldRegister))")
    print(String(format: "CPU during churn: uprobed %.2f s, this bench's 16 clients + stats poller %.2f s (2 cores x %.2f s wall = %.2f s available)",
                 daemonCPU, benchCPU, churnAck, 2 * churnAck))
    print(String(format: "writer thread during churn: busy %.2f s (%.0f%% of the wall time), of which writing the state file %.2f s", writerBusy, 100 * writerBusy / churnAck, persistBusy))
    print("churn: \(churnRequests) requests in \(batchesAfter - batchesBefore) batches (mean \(String(format: "%.1f", Double(churnRequests) / Double(max(1, batchesAfter - batchesBefore)))) per batch, \(churnSyncs) state-log syncs), \(graceAfter - graceBefore) grace-period rounds → \(String(format: "%.0f", Double(churnRequests) / Double(max(1, graceAfter - graceBefore))))x fewer grace periods than requests")
    if !stats.isEmpty {
        let parsed = statsParsed.values, all = statsAll.values
        print("stats of the 10000 resident probes (polled every 40 ms during the churn): \(stats.count) calls; reply received p50 \(ms(percentile(stats, 0.5))), p99 \(ms(percentile(stats, 0.99))), max \(ms(stats.max() ?? 0)); received and parsed by this client p50 \(ms(percentile(parsed, 0.5))), p99 \(ms(percentile(parsed, 0.99)))")
        if !all.isEmpty {
            print("stats of every probe (resident + churning, interleaved with the above): \(all.count) calls; reply received p50 \(ms(percentile(all, 0.5))), p99 \(ms(percentile(all, 0.99)))")
        }
    }
    print("targets: register/unregister within 2x floor + 20 ms: register \(reg <= 2 * floorAttach + 0.020 ? "met" : "MISSED"), detach \(det <= 2 * floorDetach + 0.020 ? "met" : "MISSED"); churn under 2 s: \(churnAck < 2 ? "met" : "MISSED"); ≥50x fewer grace periods: \(Double(churnRequests) / Double(max(1, graceAfter - graceBefore)) >= 50 ? "met" : "MISSED"); stats p99 under 5 ms: \(stats.isEmpty ? "n/a" : (percentile(stats, 0.99) < 0.005 ? "met" : "MISSED"))")

}

runBench()
