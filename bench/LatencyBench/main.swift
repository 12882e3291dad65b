// bench-latency: what a latency probe costs, measured in one run on this machine.
//
// 1. Per call of a probed function (the target times N calls of an empty function itself):
//    no probe; a plain counting probe (uprobe_multi entry); a bare entry-return program
//    (BPF_TRACE_UPROBE_SESSION, returns 0, counts nothing: the kernel floor of any such program); uprobed's latency program;
//    and bpftrace's uprobe + uretprobe pair with a tid-keyed map and hist() (the peer).
//    Conditions are interleaved round by round so the VM's drift hits them alike.
// 2. Registering 10,000 latency probes on one binary: the kernel floor (one bare entry-return link
//    of 10,000 offsets, created and closed), the latency program's own attach (rows assigned),
//    and uprobed end to end (one register request over its socket, unregister, detached).
// Not a timed test: it prints tables; docs/BENCHMARKS.md records them.
// Environment: UPROBED_BIN (the daemon), BENCH_CALLS (calls per run, default 20000),
// BENCH_ROUNDS (default 5), BENCH_PROBES (default 10000).
import Foundation
import UprobeELF
import UprobeKernel
import UprobedClient
import UprobedProtocol

let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
let env = ProcessInfo.processInfo.environment
let calls = Int(env["BENCH_CALLS"] ?? "") ?? 20_000
let rounds = Int(env["BENCH_ROUNDS"] ?? "") ?? 5
let probes = Int(env["BENCH_PROBES"] ?? "") ?? 10_000

func now() -> Double { Date().timeIntervalSinceReferenceDate }
func die(_ m: String) -> Never { FileHandle.standardError.write(Data("bench-latency: \(m)\n".utf8)); exit(1) }
func median(_ xs: [Double]) -> Double { let s = xs.sorted(); return s[s.count / 2] }
func f1(_ v: Double) -> String { String(format: "%.1f", v) }
func ms(_ s: Double) -> String { String(format: "%.1f ms", s * 1000) }

@discardableResult
func sh(_ exe: String, _ args: [String]) -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: exe)
    p.arguments = args
    let out = Pipe()
    p.standardOutput = out
    do { try p.run() } catch { die("\(exe): \(error)") }
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    guard p.terminationStatus == 0 else { die("\(exe) \(args.joined(separator: " ")) exited \(p.terminationStatus)") }
    return String(decoding: data, as: UTF8.self)
}

let work = NSTemporaryDirectory() + "bench-latency-\(getpid())"
try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(atPath: work) }

// MARK: - 1. per-call cost
let target = work + "/percall"
try? """
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
volatile long sink;
__attribute__((noinline)) long bench_fn(long x) { __asm__ volatile(""); sink += x; return x; }
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) bench_fn(i);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
""".write(toFile: target + ".c", atomically: true, encoding: .utf8)
sh("/usr/bin/gcc", ["-O1", "-o", target, target + ".c"])
guard let fnOffset = (try? Resolver().resolve(ProbeSpecInput(path: target, symbol: "bench_fn")))?.first?.fileOffset else { die("resolve bench_fn") }

let counter: CounterProgram, latency: LatencyProgram
do {
    counter = try CounterProgram(capacity: UInt32(max(65_536, probes * 2)))
    latency = try LatencyProgram(counter: counter, rowCapacity: UInt32(probes + 16))
} catch { die("\(error)") }

func runTarget() -> Double { Double(sh(target, [String(calls)]).trimmingCharacters(in: .whitespacesAndNewlines)) ?? .nan }

/// bpftrace's way (BCC funclatency's too): a map keyed by thread id between uprobe and uretprobe.
func withBpftrace(_ body: () -> Double) -> Double? {
    guard FileManager.default.isExecutableFile(atPath: "/usr/bin/bpftrace") else { return nil }
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/bpftrace")
    p.arguments = ["-e", "uprobe:\(target):bench_fn { @s[tid] = nsecs; } uretprobe:\(target):bench_fn /@s[tid]/ { @h = hist(nsecs - @s[tid]); delete(@s[tid]); }"]
    let out = Pipe()
    p.standardOutput = out
    p.standardError = FileHandle.nullDevice
    do { try p.run() } catch { return nil }
    // It prints "Attaching 2 probes..." once attached.
    var seen = Data()
    while !String(decoding: seen, as: UTF8.self).contains("Attaching") {
        let d = out.fileHandleForReading.availableData
        if d.isEmpty { return nil }
        seen.append(d)
    }
    usleep(200_000)
    let v = body()
    kill(p.processIdentifier, SIGINT)
    _ = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return v
}

let names = ["no probe", "counting probe (uprobe_multi entry)", "bare entry-return program (returns 0)", "uprobed latency probe", "bpftrace uprobe+uretprobe, tid map, hist()"]
var samples = [[Double]](repeating: [], count: names.count)
print("per-call cost: \(rounds) rounds × \(calls) calls per condition…")
for _ in 0..<rounds {
    samples[0].append(runTarget())
    do {
        let l = try counter.attach(path: target, offsets: [fnOffset], refCtrOffsets: nil, slots: [1], pid: nil, retprobe: false)
        samples[1].append(runTarget()); l.close()
        let b = try LatencyProgram.attachBareSession(counter: counter, path: target, offsets: [fnOffset])
        samples[2].append(runTarget()); b.close()
        let s = try latency.attach(path: target, offsets: [fnOffset], refCtrOffsets: nil, slots: [2], pid: nil)
        samples[3].append(runTarget()); s.close(drain: false)
    } catch { die("\(error)") }
    if let v = withBpftrace(runTarget) { samples[4].append(v) }
}
let bare = median(samples[2])
print("")
print("| per call of an empty function | median ns | min – max ns | × bare entry-return program |")
print("|---|---|---|---|")
for (i, name) in names.enumerated() where !samples[i].isEmpty {
    let m = median(samples[i])
    print("| \(name) | \(f1(m)) | \(f1(samples[i].min() ?? 0)) – \(f1(samples[i].max() ?? 0)) | \(String(format: "%.2f", m / bare)) |")
}
if let h = latency.read(slot: 2) { print("\n(latency probe check: \(h.calls) calls, \(h.returns) returns over \(rounds) runs)") }

// MARK: - 2. registering 10,000 latency probes
let many = work + "/many"
sh("/usr/bin/gcc", ["-O1", "-o", many, repo.appendingPathComponent("Tests/Fixtures/kernel/many.c").path])
let symbols = (0..<probes).map { String(format: "g%04d", $0) }
let resolver = Resolver()
let offsets: [UInt64] = symbols.map { n in
    guard let o = (try? resolver.resolve(ProbeSpecInput(path: many, symbol: n)))?.first?.fileOffset else { die("resolve \(n)") }
    return o
}
print("\nregistering \(probes) latency probes: kernel floor, program, uprobed…")
var floorCreate: [Double] = [], floorClose: [Double] = [], progCreate: [Double] = [], progClose: [Double] = []
let slots = (0..<UInt32(probes)).map { $0 + 16 }
for _ in 0..<rounds {
    usleep(200_000)
    var t0 = now()
    guard let link = try? LatencyProgram.attachBareSession(counter: counter, path: many, offsets: offsets) else { die("floor attach") }
    floorCreate.append(now() - t0)
    t0 = now(); link.close(); floorClose.append(now() - t0)
    usleep(200_000)
    t0 = now()
    guard let l = try? latency.attach(path: many, offsets: offsets, refCtrOffsets: nil, slots: slots, pid: nil) else { die("program attach") }
    progCreate.append(now() - t0)
    t0 = now(); l.close(drain: false); progClose.append(now() - t0)
    latency.release(slots: slots)
}

let daemonPath = env["UPROBED_BIN"] ?? repo.appendingPathComponent(".build/release/uprobed").path
guard FileManager.default.isExecutableFile(atPath: daemonPath) else { die("\(daemonPath) not built; run `swift build -c release`") }
let socket = work + "/uprobed.sock"
try? "latency_capacity = \(probes + 64)\nslot_capacity = \(max(65_536, probes * 2))\n".write(toFile: work + "/uprobed.conf", atomically: true, encoding: .utf8)
let daemon = Process()
daemon.executableURL = URL(fileURLWithPath: daemonPath)
daemon.arguments = ["--socket", socket, "--state-dir", work + "/state", "--pin-dir", "", "--config", work + "/uprobed.conf", "--log-level", "warning"]
daemon.standardError = FileHandle.nullDevice
do { try daemon.run() } catch { die("start uprobed: \(error)") }
var ready = false
for _ in 0..<500 { if (try? LineClient(socketPath: socket)) != nil { ready = true; break }; usleep(10_000) }
guard ready, let client = try? LineClient(socketPath: socket, timeoutSeconds: 120) else { die("uprobed did not start") }
func call(_ o: JSONObject) -> JSONObject {
    guard let r = try? client.call(o).objectValue, r["ok"] == .bool(true) else { die("request failed: \(o["op"].map(JSONSerializer.serialize) ?? "")") }
    return r
}
/// One request of `probes` specs, timed end to end; then unregistered and waited until detached.
func registerCycles(latency: Bool) -> (cold: Double, warm: [Double]) {
    let specs: [JSONValue] = symbols.map { ProbeSpec(path: many, symbol: $0, latency: latency).json }
    var warm: [Double] = [], cold = 0.0
    for cycle in 0...rounds {
        usleep(200_000)
        let t0 = now()
        let r = call(["op": "register", "probes": .array(specs)])
        let t = now() - t0
        if cycle == 0 { cold = t } else { warm.append(t) }
        let ids = (r["probes"]?.arrayValue ?? []).compactMap { $0.objectValue?["id"]?.stringValue }
        guard ids.count == probes else { die("registered \(ids.count)") }
        _ = call(["op": "unregister", "probes": .array(ids.map { .string($0) })])
        while true {
            let s = call(["op": "status"])
            if s["links"] == .int(0), s["batching"]?.objectValue?["pending_removals"] == .int(0) { break }
            usleep(2_000)
        }
    }
    return (cold, warm)
}
let counting = registerCycles(latency: false)
let (cold, register) = registerCycles(latency: true)
daemon.terminate()
daemon.waitUntilExit()

let floor = median(floorCreate)
print("")
print("| \(probes) latency probes | median | runs | × floor |")
print("|---|---|---|---|")
func row(_ name: String, _ xs: [Double]) {
    print("| \(name) | \(ms(median(xs))) | \(xs.map { String(format: "%.1f", $0 * 1000) }.joined(separator: ", ")) | \(String(format: "%.2f", median(xs) / floor)) |")
}
row("kernel floor: one bare entry-return link create", floorCreate)
row("kernel floor: its close", floorClose)
row("latency program attach (rows assigned, zeroed)", progCreate)
row("latency program close", progClose)
row("uprobed: one register request, end to end", register)
row("(same run) uprobed: \(probes) counting probes, one request", counting.warm)
print("\nuprobed's first (cold: ELF parsed, latency maps made) register: \(ms(cold)); target: ≤ 2 × floor + 20 ms = \(ms(2 * floor + 0.020))")
