// bench-read: the daemon's read path (`Engine.read`, `Engine.statsTable`) on a real engine with
// real uprobe_multi links, idle and while a writer thread churns registrations through the
// same engine; against the read path it replaced (a registry snapshot copied out of a Mutex,
// as `SnapshotCell` did, then the same table built from it).
//
//   swift run -c release bench-read [--probes N] [--seconds S]
//
// Rows:
//   registry      one read that counts the registry (`read { $0.probes.count }`): the cost of
//                 reaching the published registry
//   stats table   a `stats` table of every probe (counters read as memory, rates, ids)
// Columns: median and p99 per read in microseconds, reads per second on one thread, each with
// the writer idle and with the writer busy (single-probe register/unregister of a second
// binary, back to back, as a churn of clients would).
// Needs root and a kernel with uprobe_multi (the links are real).

import Foundation
import Logging
import Synchronization
import UprobeCore
import UprobeELF
import UprobeKernel

func die(_ message: String) -> Never {
    FileHandle.standardError.write(Data("bench-read: \(message)\n".utf8))
    exit(1)
}

func parseOptions() -> (probes: Int, seconds: Double) {
    var probes = 10_000
    var seconds = 2.0
    var args = CommandLine.arguments.dropFirst().makeIterator()
    while let a = args.next() {
        switch a {
        case "--probes": probes = args.next().flatMap(Int.init) ?? probes
        case "--seconds": seconds = args.next().flatMap(Double.init) ?? seconds
        default: die("usage: bench-read [--probes N] [--seconds S]")
        }
    }
    return (probes, seconds)
}
let (probes, seconds) = parseOptions()

let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
let work = NSTemporaryDirectory() + "bench-read-\(getpid())"
try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(atPath: work) }

/// Builds Tests/Fixtures/kernel/many.c (10,000 functions) as `name`.
func buildMany(_ name: String) -> String {
    let binary = work + "/" + name
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/gcc")
    p.arguments = ["-O1", "-o", binary, repo.appendingPathComponent("Tests/Fixtures/kernel/many.c").path]
    do { try p.run() } catch { die("gcc: \(error)") }
    p.waitUntilExit()
    guard p.terminationStatus == 0 else { die("gcc failed") }
    return binary
}

func nowNanos() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

let resident = buildMany("many")
let churned = buildMany("churn")
let kernel: BPFKernelBackend
do { kernel = try BPFKernelBackend(capacity: 65_536) } catch { die("kernel: \(error.message)") }
let engine = Engine(config: EngineConfig(), kernel: kernel, logger: Logger(label: "bench-read"))
let resolver = Resolver()

func items(_ path: String, _ names: some Sequence<String>) -> [RegisterItem] {
    let specs = names.map { ProbeSpecInput(path: path, symbol: $0) }
    return zip(specs, resolver.resolveMany(specs)).map { spec, result in
        guard case .success(let targets) = result else { die("resolve \(spec.symbol ?? "")") }
        return RegisterItem(spec: spec, targets: targets)
    }
}

/// Runs an async engine call from this synchronous program.
func await_<T: Sendable>(_ body: @escaping @Sendable () async -> T) -> T {
    let box = Mutex<T?>(nil)
    let done = DispatchSemaphore(value: 0)
    Task { let v = await body(); box.withLock { $0 = v }; done.signal() }
    done.wait()
    guard let v = box.withLock({ $0 }) else { die("no result") }
    return v
}

let residentItems = items(resident, (0..<probes).map { String(format: "g%04d", $0 % 10_000) })
let registered = await_ { await engine.register(residentItems, consumer: "resident", peer: .daemon) }
guard case .success(let records) = registered, records.count == probes else { die("register: \(registered)") }
let churnItems = (0..<200).map { items(churned, [String(format: "g%04d", $0)]) }

/// The old read path, for comparison: the published registry copied out under a Mutex.
let snapshotCell = Mutex(engine.snapshot)

struct Cell { var median = 0.0, p99 = 0.0, perSecond = 0.0 }

/// Reads for `seconds` on this thread; latencies in microseconds.
func measure(_ read: () -> Int) -> Cell {
    var samples: [Double] = []
    samples.reserveCapacity(1 << 16)
    var sink = 0
    let end = nowNanos() + UInt64(seconds * 1e9)
    var t = nowNanos()
    while t < end {
        sink &+= read()
        let t2 = nowNanos()
        samples.append(Double(t2 - t) / 1000)
        t = t2
    }
    if sink == -1 { print("") }
    samples.sort()
    return Cell(median: samples[samples.count / 2], p99: samples[min(samples.count - 1, samples.count * 99 / 100)],
                perSecond: Double(samples.count) / seconds)
}

let churnRunning = Atomic<Bool>(false)
let churnOps = Atomic<Int>(0)
func startChurn() -> Thread {
    churnRunning.store(true, ordering: .relaxed)
    let t = Thread {
        var i = 0
        while churnRunning.load(ordering: .relaxed) {
            let item = churnItems[i % churnItems.count]
            i += 1
            let r = await_ { await engine.register(item, consumer: "churn", peer: .daemon) }
            guard case .success(let recs) = r else { continue }
            _ = await_ { await engine.unregister(ids: recs.map(\.id), consumer: nil, peer: .daemon) }
            churnOps.add(2, ordering: .relaxed)
        }
    }
    t.start()
    return t
}

let readers: [(String, () -> Int)] = [
    ("registry (tree)", { engine.read { snap, _ in snap.probes.count } }),
    ("registry (Mutex copy)", { snapshotCell.withLock { $0 }.probes.count }),
    ("stats table (tree)", { (try? engine.statsTable(ids: nil).get())?.count ?? 0 }),
    ("stats table (Mutex copy)", {
        let snap = snapshotCell.withLock { $0 }
        return (try? engine.statsTable(of: snap, ids: nil).get())?.count ?? 0
    }),
]

var idle: [Cell] = []
for (_, read) in readers { idle.append(measure(read)) }
var busy: [Cell] = []
let churnThread = startChurn()
for (_, read) in readers {
    // Keep the comparator's snapshot as fresh as the writer's: the old path published one per batch.
    let refresher = Thread {
        while churnRunning.load(ordering: .relaxed) { snapshotCell.withLock { $0 = engine.snapshot }; usleep(1000) }
    }
    refresher.start()
    busy.append(measure(read))
}
churnRunning.store(false, ordering: .relaxed)
while churnThread.isExecuting { usleep(1000) }

func fmt(_ v: Double, _ d: Int = 1) -> String { String(format: "%.\(d)f", v) }
print("bench-read: \(probes) probes on real uprobe_multi links; \(fmt(seconds)) s per cell, one reader thread")
print("writer busy: \(churnOps.load(ordering: .relaxed)) single-probe register/unregister requests during the busy cells")
print("")
print("| read | idle median µs | idle p99 µs | idle reads/s | busy median µs | busy p99 µs | busy reads/s |")
print("|---|---|---|---|---|---|---|")
for (i, (name, _)) in readers.enumerated() {
    let a = idle[i], b = busy[i]
    print("| \(name) | \(fmt(a.median, 2)) | \(fmt(a.p99, 2)) | \(fmt(a.perSecond, 0)) | \(fmt(b.median, 2)) | \(fmt(b.p99, 2)) | \(fmt(b.perSecond, 0)) |")
}
let ratio = busy[2].median / max(busy[3].median, 0.001)
print("")
print("stats table through the tree vs the Mutex copy, writer busy: \(fmt(ratio, 2))x the median")
engine.shutdown()
