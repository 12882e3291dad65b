// bench-whole: a whole binary at kernel speed (issue 26), measured in one run on this machine.
//
// Every function of the Swift toolchain's swift-frontend (next to `readlink -f $(command -v
// swift)`; ~241,000 function sites) is:
//   - the kernel floor: the resolver's offsets in one raw uprobe_multi link, created and closed
//     (no daemon, no JSON), a few cycles;
//   - uprobed through its socket: one glob request `{"path": FRONTEND, "symbol": "*"}`, reply
//     received; then one small `unregister` by path, until every link is gone (status);
//   - the daemon's RSS: idle, with every probe resident (200 ms after the reply, and settled:
//     BENCH_IDLE_SECONDS later, once the parse cache dropped the file), and after they are all removed;
//   - `stats` with `top: 100` while a workload (the copy's -version in a loop) hits them;
//   - `list` of them all, and `list` filtered by a symbol glob (each reads every name).
// The binary probed is a private copy of swift-frontend (see runBench: never the toolchain's own).
// Not a timed test: it prints a table; docs/BENCHMARKS.md records it.
// Environment: UPROBED_BIN (the daemon), BENCH_BINARY (another binary), BENCH_CYCLES (3), BENCH_IDLE_SECONDS (12),
// BENCH_DAEMON_CONFIG (config lines, ';'-separated), BENCH_STATS_CALLS (200), BENCH_LIST_CALLS (3).
import Foundation
import UprobeELF
import UprobeKernel
import UprobedClient
import UprobedProtocol

let env = ProcessInfo.processInfo.environment
let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
let cycles = Int(env["BENCH_CYCLES"] ?? "") ?? 3
let statsCalls = Int(env["BENCH_STATS_CALLS"] ?? "") ?? 200
let listCalls = Int(env["BENCH_LIST_CALLS"] ?? "") ?? 3
/// The pause before each floor cycle and each register, so both start with the kernel done
/// with the previous cycle's uprobes (see bench-batch).
let settleMicros: UInt32 = 300_000

func now() -> Double { Date().timeIntervalSinceReferenceDate }
func ms(_ s: Double) -> String { String(format: "%.1f ms", s * 1000) }
func mib(_ kib: Int) -> String { String(format: "%.1f MiB", Double(kib) / 1024) }
func die(_ m: String) -> Never { FileHandle.standardError.write(Data("bench-whole: \(m)\n".utf8)); exit(1) }
func median(_ xs: [Double]) -> Double { let s = xs.sorted(); return s[s.count / 2] }
func percentile(_ xs: [Double], _ p: Double) -> Double { let s = xs.sorted(); return s[min(s.count - 1, Int(Double(s.count) * p))] }
func each(_ xs: [Double]) -> String { xs.map { String(format: "%.0f", $0 * 1000) }.joined(separator: ", ") + " ms" }

/// VmRSS of a process in KiB.
func rssKiB(_ pid: Int32) -> Int {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return -1 }
    for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? -1
    }
    return -1
}

func openFDs(_ pid: Int32) -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1 }

func frontend() -> String {
    if let b = env["BENCH_BINARY"] { return b }
    for dir in (env["PATH"] ?? "").split(separator: ":") {
        let swift = "\(dir)/swift"
        guard FileManager.default.isExecutableFile(atPath: swift), let real = realpath(swift, nil) else { continue }
        defer { free(real) }
        let candidate = URL(fileURLWithPath: String(cString: real)).deletingLastPathComponent().appendingPathComponent("swift-frontend").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    die("no swift-frontend next to `swift` on PATH; set BENCH_BINARY")
}

func runBench() {
    // A private copy (its own inode): every process that maps the probed file takes each
    // probe's breakpoint, and the kernel installs all 241,000 in every such process at attach.
    // Probing the toolchain's own swift-frontend would trap every compiler running on the
    // machine (a first run here did: attach took 30-50 s instead of ~0.1 s, and slowed every
    // build meanwhile). The copy is mapped only by this bench's workload.
    let original = frontend()
    let work = NSTemporaryDirectory() + "bench-whole-\(getpid())"
    try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: work) }
    let binary = work + "/" + URL(fileURLWithPath: original).lastPathComponent
    do { try FileManager.default.copyItem(atPath: original, toPath: binary) } catch { die("copy \(original): \(error)") }
    // MARK: - the offsets, as the daemon's resolver finds them
    let t0 = now()
    let resolution: Resolution
    do {
        guard let r = try Resolver(limits: ResolverLimits(maxMatchesPerSpec: 1 << 20))
            .resolutions([ProbeSpecInput(path: binary, symbol: "*")]).first?.get() else { die("resolve") }
        resolution = r
    } catch { die("resolve \(binary): \(error)") }
    let resolveTime = now() - t0
    let offsets = resolution.probes.map(\.fileOffset)
    let n = offsets.count
    print("\(binary): \(n) function sites (\(resolution.skipped.count) skipped: first instruction not probeable), resolved in \(ms(resolveTime))")

    // MARK: - kernel floor
    var floorCreate: [Double] = [], floorClose: [Double] = []
    do {
        let program = try CounterProgram(capacity: UInt32(1 << 20))
        let slots = (0..<UInt32(n)).map { $0 }
        for _ in 0..<cycles {
            usleep(settleMicros)
            let a = now()
            let link = try program.attach(path: binary, offsets: offsets, refCtrOffsets: nil, slots: slots, pid: nil, retprobe: false)
            let b = now()
            link.close()
            let c = now()
            floorCreate.append(b - a); floorClose.append(c - b)
        }
    } catch { die("kernel floor: \(error)") }

    // MARK: - the daemon
    let daemonPath = env["UPROBED_BIN"] ?? repo.appendingPathComponent(".build/release/uprobed").path
    guard FileManager.default.isExecutableFile(atPath: daemonPath) else { die("\(daemonPath) not built; run `swift build -c release`") }
    let socket = work + "/uprobed.sock"
    let daemonConfig = env["BENCH_DAEMON_CONFIG"] ?? ""
    try? daemonConfig.replacingOccurrences(of: ";", with: "\n").write(toFile: work + "/bench.conf", atomically: true, encoding: .utf8)
    let daemon = Process()
    daemon.executableURL = URL(fileURLWithPath: daemonPath)
    daemon.arguments = ["--socket", socket, "--state-dir", work + "/state", "--pin-dir", "", "--config", work + "/bench.conf", "--log-level", "warning"]
    daemon.standardError = FileHandle.nullDevice
    do { try daemon.run() } catch { die("start uprobed: \(error)") }
    defer { daemon.terminate(); daemon.waitUntilExit() }
    let pid = daemon.processIdentifier
    var ready = false
    for _ in 0..<500 { if (try? LineClient(socketPath: socket)) != nil { ready = true; break }; usleep(10_000) }
    guard ready else { die("uprobed did not start") }
    guard let client = try? LineClient(socketPath: socket, timeoutSeconds: 300) else { die("connect") }
    func call(_ o: JSONObject) -> (JSONObject, Int) {
        do {
            try client.send(.object(o))
            guard let line = try client.readLine() else { die("connection closed") }
            guard let r = try JSONParser.parse(line).objectValue, r["ok"] == .bool(true) else {
                die("\(o["op"].map(JSONSerializer.serialize) ?? "") failed: \(String(decoding: line.prefix(400), as: UTF8.self))")
            }
            return (r, line.count)
        } catch { die("\(error)") }
    }
    func status() -> JSONObject { call(["op": "status"]).0 }
    func detached() -> Bool {
        let s = status()
        return s["links"] == .int(0) && s["probes"] == .int(0) && s["slots_in_use"] == .int(0)
            && s["batching"]?.objectValue?["pending_removals"] == .int(0)
    }
    usleep(500_000)
    let idleRSS = rssKiB(pid), idleFDs = openFDs(pid)

    var register: [Double] = [], unregisterAck: [Double] = [], unregisterGone: [Double] = []
    var replyBytes = 0, residentRSS: [Int] = [], afterRSS: [Int] = [], registered = 0, settledResidentRSS = 0
    let idleSeconds = Int(env["BENCH_IDLE_SECONDS"] ?? "") ?? 12
    var statsTop: [Double] = [], workloadRuns = 0, hitsSeen: UInt64 = 0
    var listAll: [Double] = [], listGlob: [Double] = [], listAllBytes = 0, listGlobCount = 0
    let request: JSONObject = ["op": "register", "consumer": "whole", "probes": [.object(["path": .string(binary), "symbol": "*"])]]
    // One cycle first, not counted: the daemon parses the 246,000-symbol file then.
    for cycle in 0...cycles {
        usleep(settleMicros)
        let a = now()
        let (reply, bytes) = call(request)
        let b = now()
        registered = Int(reply["count"]?.int64Value ?? Int64(reply["probes"]?.arrayValue?.count ?? 0))
        guard registered == n else { die("registered \(registered) of \(n)") }
        replyBytes = bytes
        usleep(200_000)
        residentRSS.append(rssKiB(pid))
        if cycle == cycles {
            // What the probes themselves hold: once the parse cache has dropped the file and
            // the trimmer has returned what the register's transient buffers left.
            sleep(UInt32(max(0, idleSeconds)))
            settledResidentRSS = rssKiB(pid)
            // `stats` top 100 while a workload hits the probes.
            let stop = Latencies()
            let worker = Thread {
                while !stop.stopped {
                    let p = Process()
                    p.executableURL = URL(fileURLWithPath: binary)
                    p.arguments = ["-version"]
                    // The copy finds the toolchain's libraries through its RUNPATH ($ORIGIN/../lib/…) no more.
                    let lib = URL(fileURLWithPath: original).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("lib/swift").path
                    p.environment = ["LD_LIBRARY_PATH": "\(lib)/linux:\(lib)/host/compiler"]
                    p.standardOutput = FileHandle.nullDevice
                    p.standardError = FileHandle.nullDevice
                    do { try p.run(); p.waitUntilExit() } catch { return }
                    stop.count()
                }
            }
            worker.start()
            let statsRequest: JSONObject = ["op": "stats", "top": 100]
            for _ in 0..<statsCalls {
                let s = now()
                let (r, _) = call(statsRequest)
                statsTop.append(now() - s)
                hitsSeen = max(hitsSeen, UInt64(r["stats"]?.arrayValue?.first?.objectValue?["hits"]?.int64Value ?? 0))
                usleep(10_000)
            }
            stop.halt()
            while !worker.isFinished { usleep(10_000) }
            workloadRuns = stop.runs
            // Reads of every probe's name: `list` of all, and a `list` filtered by a symbol glob
            // (every name matched against it).
            for _ in 0..<listCalls {
                let s = now()
                let (_, bytes) = call(["op": "list"])
                listAll.append(now() - s)
                listAllBytes = bytes
                let g = now()
                let (r, _) = call(["op": "list", "symbol": "*Lowering*"])
                listGlob.append(now() - g)
                listGlobCount = r["probes"]?.arrayValue?.count ?? 0
            }
        }
        let c = now()
        _ = call(["op": "unregister", "path": .string(binary)])
        let d = now()
        while !detached() { usleep(1_000) }
        let e = now()
        usleep(500_000)
        afterRSS.append(rssKiB(pid))
        if cycle == 0 { continue }
        register.append(b - a); unregisterAck.append(d - c); unregisterGone.append(e - c)
    }
    let afterFDs = openFDs(pid)
    // Once idle: the parse cache drops a file unused for 5-10 s, the trimmer's follow-ups return
    // what the last frees left; the RSS a daemon settles at, not the one right after the work.
    sleep(UInt32(max(0, idleSeconds)))
    let settledRSS = rssKiB(pid)

    // MARK: - report
    let machine = (try? String(contentsOfFile: "/proc/sys/kernel/osrelease", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
    print("")
    print("bench-whole — \(n) function sites of \(binary); \(ProcessInfo.processInfo.activeProcessorCount) CPUs, Linux \(machine), \(Date()); daemon config: \(daemonConfig.isEmpty ? "defaults" : daemonConfig)")
    print("")
    func row(_ cells: [String]) { print("| " + cells.joined(separator: " | ") + " |") }
    let fa = median(floorCreate), fd = median(floorClose)
    let reg = median(register), gone = median(unregisterGone)
    row(["operation", "uprobed (median)", "kernel floor (median)", "uprobed / floor", "target", "met"])
    row(["---", "---", "---", "---", "---", "---"])
    row(["register every function, one glob request, reply received", ms(reg), ms(fa), String(format: "%.2fx", reg / fa),
         "≤ 2x floor + 100 ms = \(ms(2 * fa + 0.1))", reg <= 2 * fa + 0.1 ? "yes" : "NO"])
    row(["unregister them by path (one small request): reply", ms(median(unregisterAck)), "—", "—", "—", "—"])
    row(["… all links gone", ms(gone), ms(fd), String(format: "%.2fx", gone / fd),
         "≤ 2x detach floor + 100 ms = \(ms(2 * fd + 0.1))", gone <= 2 * fd + 0.1 ? "yes" : "NO"])
    let resident = residentRSS.dropFirst().max() ?? 0, after = afterRSS.max() ?? 0
    func perProbe(_ rss: Int) -> Double { Double(rss - idleRSS) * 1024 / Double(n) }
    row(["daemon RSS: idle → \(n) resident, 200 ms after the reply", "\(mib(idleRSS)) → \(mib(resident))", "—", "—",
         "—", String(format: "%.0f B per probe", perProbe(resident))])
    let settled = perProbe(settledResidentRSS)
    row(["daemon RSS: idle → \(n) resident, \(idleSeconds) s after the reply", "\(mib(idleRSS)) → \(mib(settledResidentRSS))", "—", "—",
         "≤ 300 B per probe above idle", String(format: "%.0f B per probe: %@", settled, settled <= 300 ? "yes" : "NO")])
    row(["daemon RSS after removing them all", mib(after), "—", "—", "≤ idle + 20% = \(mib(idleRSS * 12 / 10))",
         after <= idleRSS * 12 / 10 ? "yes" : "NO"])
    row(["daemon RSS \(idleSeconds) s after the last removal", mib(settledRSS), "—", "—", "≤ idle + 20% = \(mib(idleRSS * 12 / 10))",
         settledRSS <= idleRSS * 12 / 10 ? "yes" : "NO"])
    if !statsTop.isEmpty {
        let p99 = percentile(statsTop, 0.99)
        row(["stats top 100 of \(n), workload running (\(statsTop.count) calls)",
             "p50 \(ms(percentile(statsTop, 0.5))), p99 \(ms(p99))", "—", "—", "p99 < 20 ms", p99 < 0.020 ? "yes" : "NO"])
    }
    if !listAll.isEmpty {
        row(["list of all \(n) (\(listAllBytes / 1_000_000) MB reply, \(listAll.count) calls)", "median \(ms(median(listAll))), max \(ms(listAll.max() ?? 0))",
             "—", "—", "—", "—"])
        row(["list by symbol glob `*Lowering*` (\(listGlobCount) of \(n), \(listGlob.count) calls)",
             "median \(ms(median(listGlob))), max \(ms(listGlob.max() ?? 0))", "—", "—", "—", "—"])
    }
    print("")
    print("register reply: \(replyBytes) bytes (compact form). Each cycle after a \(settleMicros / 1000) ms pause: floor create \(each(floorCreate)), close \(each(floorClose)); uprobed register \(each(register)), unregister reply \(each(unregisterAck)), links gone \(each(unregisterGone)).")
    print("RSS (KiB): idle \(idleRSS); resident per cycle (first one cold) \(residentRSS.map(String.init).joined(separator: ", ")); after removal per cycle \(afterRSS.map(String.init).joined(separator: ", ")). Open fds: idle \(idleFDs), after \(afterFDs).")
    print("workload: \(workloadRuns) runs of swift-frontend -version during the stats calls; busiest probe seen at \(hitsSeen) hits.")
}

/// A stop flag and a run counter shared with the workload thread.
final class Latencies: @unchecked Sendable {
    // @unchecked: every field behind `lock`.
    private let lock = NSLock()
    private var stop = false
    private var done = 0
    var stopped: Bool { lock.lock(); defer { lock.unlock() }; return stop }
    var runs: Int { lock.lock(); defer { lock.unlock() }; return done }
    func halt() { lock.lock(); stop = true; lock.unlock() }
    func count() { lock.lock(); done += 1; lock.unlock() }
}

runBench()
