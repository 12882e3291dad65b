// bench-tree: read throughput and latency of the uprobes tree (epoch-based reclamation) against
// two baselines, with an idle writer and with a writer publishing batches as fast as it can; plus
// bytes per registration at 100,000 registrations.
//
//   swift run -c release bench-tree [--seconds S] [--keys N] [--readers R] [--repeats K] [--paced B]
//
// Writer modes: idle (no writer thread), idle-busy (a writer thread spinning without publishing:
// same CPU occupancy as the churning modes), paced (B batches/s, default 2,000: a busy engine),
// and max (a writer thread publishing as fast as it can). Every cell is measured K times (default 3),
// interleaved across structures and modes to spread machine noise, and the median is printed
// (with the min-max of p99 across repeats). --pace-spin makes the paced writer busy-wait between
// batches instead of sleeping (separates the structure's cost from idle/wake-up effects of a
// sleeping writer CPU on a VM).
//
// Baselines:
//   mutex     a sorted-array ordered map inside a Synchronization.Mutex; readers lock per read,
//             the writer edits in place under the lock.
//   arc-snap  an immutable snapshot (final class holding the sorted arrays) swapped under a Mutex;
//             readers lock only to retain the current snapshot (ARC on one shared object), the
//             writer copies the map, applies the batch, and swaps the pointer.
// Read = one lookup of a random key (half of them present) summing its consumers' slots,
// including entering/leaving the read side.

import Glibc
import Synchronization
import UprobeTree

// MARK: - options

struct Options: Sendable {
    var seconds = 1.0
    var keyCount = 10_000
    var readerThreads = 1
    var repeats = 3
    var pacedRate = 2_000
    var paceBySpinning = false

    static func parse() -> Options {
        var o = Options()
        var it = CommandLine.arguments.dropFirst().makeIterator()
        while let a = it.next() {
            switch a {
            case "--seconds": o.seconds = Double(it.next()!)!
            case "--keys": o.keyCount = Int(it.next()!)!
            case "--readers": o.readerThreads = Int(it.next()!)!
            case "--repeats": o.repeats = Int(it.next()!)!
            case "--paced": o.pacedRate = Int(it.next()!)!
            case "--pace-spin": o.paceBySpinning = true
            default:
                print("usage: bench-tree [--seconds S] [--keys N] [--readers R] [--repeats K] [--paced BATCHES_PER_S] [--pace-spin]")
                exit(2)
            }
        }
        return o
    }
}
let options = Options.parse()
let seconds = options.seconds
let keyCount = options.keyCount
let readerThreads = options.readerThreads
let keySpace = keyCount * 2
let batchEdits = 16

// MARK: - helpers

@inline(__always) func nanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

final class ThreadBody: Sendable {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

func spawn(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    var t = pthread_t()
    let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    let rc = pthread_create(&t, nil, { p in
        Unmanaged<ThreadBody>.fromOpaque(p!).takeRetainedValue().body()
        return nil
    }, box)
    precondition(rc == 0)
    return t
}

struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@inline(__always) func key(_ i: Int) -> UprobeKey {
    UprobeKey(dev: 0xFD01, inode: UInt64(1000 + i % 7), offset: UInt64(i) * 16)
}

/// Exact latency histogram: 1 ns buckets up to 100 µs, then an overflow list.
struct Histogram {
    var buckets = [UInt32](repeating: 0, count: 100_000)
    var overflow: [UInt64] = []
    var count = 0
    mutating func add(_ ns: UInt64) {
        count += 1
        if ns < 100_000 { buckets[Int(ns)] &+= 1 } else { overflow.append(ns) }
    }
    mutating func merge(_ o: Histogram) {
        for i in 0..<buckets.count { buckets[i] &+= o.buckets[i] }
        overflow += o.overflow
        count += o.count
    }
    func percentile(_ p: Double) -> UInt64 {
        let rank = Int((Double(count) * p).rounded(.up))
        var seen = 0
        for i in 0..<buckets.count {
            seen += Int(buckets[i])
            if seen >= rank { return UInt64(i) }
        }
        let sorted = overflow.sorted()
        return sorted[min(sorted.count - 1, rank - seen - 1)]
    }
}

// MARK: - the three maps

protocol BenchMap: Sendable {
    var name: String { get }
    func readSum(_ k: UprobeKey) -> UInt64
    func apply(_ edits: [TreeEdit])
}

final class EBRTree: BenchMap {
    let name = "ebr-tree (this)"
    let tree = UprobeTree()
    @inline(__always) func readSum(_ k: UprobeKey) -> UInt64 {
        tree.read { v in
            v.withConsumers(of: k) { list in
                var s: UInt64 = 0
                list.forEach { s &+= UInt64($0.slot) }
                return s
            } ?? 0
        }
    }
    func apply(_ edits: [TreeEdit]) { tree.apply(edits) }
}

/// Sorted-array ordered map (value type, copy-on-write).
struct SortedMap {
    var keys: [UprobeKey] = []
    var values: [[Consumer]] = []

    @inline(__always) func index(_ k: UprobeKey) -> (Int, Bool) {
        var lo = 0, hi = keys.count
        while lo < hi {
            let mid = (lo + hi) >> 1
            if keys[mid] < k { lo = mid + 1 } else { hi = mid }
        }
        return (lo, lo < keys.count && keys[lo] == k)
    }

    @inline(__always) func sum(_ k: UprobeKey) -> UInt64 {
        let (i, found) = index(k)
        guard found else { return 0 }
        var s: UInt64 = 0
        for c in values[i] { s &+= UInt64(c.slot) }
        return s
    }

    mutating func apply(_ e: TreeEdit) {
        switch e {
        case let .insertConsumer(k, c):
            let (i, found) = index(k)
            if found {
                if let j = values[i].firstIndex(where: { $0.registration == c.registration }) { values[i][j] = c }
                else { values[i].append(c) }
            } else {
                keys.insert(k, at: i)
                values.insert([c], at: i)
            }
        case let .removeConsumer(k, r):
            let (i, found) = index(k)
            guard found else { return }
            values[i].removeAll { $0.registration == r }
            if values[i].isEmpty { keys.remove(at: i); values.remove(at: i) }
        case let .removeKey(k):
            let (i, found) = index(k)
            guard found else { return }
            keys.remove(at: i)
            values.remove(at: i)
        }
    }
}

final class MutexMap: BenchMap {
    let name = "Mutex<sorted map>"
    let m = Mutex(SortedMap())
    @inline(__always) func readSum(_ k: UprobeKey) -> UInt64 { m.withLock { $0.sum(k) } }
    func apply(_ edits: [TreeEdit]) { m.withLock { map in for e in edits { map.apply(e) } } }
}

final class Snapshot: Sendable {
    let map: SortedMap
    init(_ map: SortedMap) { self.map = map }
}

final class ARCSnapshotMap: BenchMap {
    let name = "ARC snapshot"
    let current = Mutex(Snapshot(SortedMap()))
    @inline(__always) func readSum(_ k: UprobeKey) -> UInt64 {
        let s = current.withLock { $0 }      // retain the shared snapshot
        return s.map.sum(k)                   // released at the end of scope
    }
    func apply(_ edits: [TreeEdit]) {
        var map = current.withLock { $0 }.map   // copy (CoW on first mutation)
        for e in edits { map.apply(e) }
        let s = Snapshot(map)
        current.withLock { $0 = s }
    }
}

// MARK: - workload

/// Pre-built batches: remove 8 present keys, insert 8 absent ones (size stays at keyCount).
func makeBatches(_ n: Int, seed: UInt64) -> (initial: [TreeEdit], batches: [[TreeEdit]]) {
    var rng = SplitMix64(state: seed)
    var present = Array(stride(from: 0, to: keySpace, by: 2))
    var absent = Array(stride(from: 1, to: keySpace, by: 2))
    let initial = present.map { TreeEdit.insertConsumer(key($0), Consumer(registration: UInt64($0) + 1, slot: UInt32($0))) }
    var batches: [[TreeEdit]] = []
    for _ in 0..<n {
        var b: [TreeEdit] = []
        for _ in 0..<(batchEdits / 2) {
            let i = Int.random(in: 0..<present.count, using: &rng)
            let j = Int.random(in: 0..<absent.count, using: &rng)
            b.append(.removeKey(key(present[i])))
            b.append(.insertConsumer(key(absent[j]), Consumer(registration: UInt64(absent[j]) + 1, slot: UInt32(absent[j]))))
            swap(&present[i], &absent[j])
        }
        batches.append(b)
    }
    return (initial, batches)
}

let workload = makeBatches(4096, seed: 1)
let lookupKeys: [UprobeKey] = {
    var rng = SplitMix64(state: 99)
    return (0..<(1 << 16)).map { _ in key(Int.random(in: 0..<keySpace, using: &rng)) }
}()

struct Result {
    var readsPerSec: Double
    var p50: UInt64
    var p99: UInt64
    var p999: UInt64
    var batchesPerSec: Double
}

final class Flag: Sendable {
    let stop = Atomic<Bool>(false)
    let batches = Atomic<Int>(0)
}

enum WriterMode: CaseIterable {
    /// No writer thread at all.
    case idle
    /// A writer thread that is busy (spinning on registers, no shared memory) but never publishes:
    /// same CPU occupancy as the churning modes, so on a 2-vCPU VM the difference to `paced`/`max`
    /// is the writer's publishing alone, not the second vCPU being busy.
    case idleBusy
    case paced
    case max
    var label: String {
        switch self {
        case .idle: "idle (no writer thread)"
        case .idleBusy: "idle (writer thread busy, not publishing)"
        case .paced: "paced \(options.pacedRate)/s"
        case .max: "max rate"
        }
    }
}

func measure(_ map: some BenchMap, mode: WriterMode) -> Result {
    let flag = Flag()
    var writer: pthread_t?
    let wStart = nanos()
    if mode == .idleBusy {
        writer = spawn {
            var x: UInt64 = 1
            while !flag.stop.load(ordering: .relaxed) {
                for _ in 0..<1000 { x = x &* 6364136223846793005 &+ 1442695040888963407 }
            }
            if x == 42 { print("") }
        }
    } else if mode != .idle {
        let interval: UInt64 = mode == .paced ? 1_000_000_000 / UInt64(options.pacedRate) : 0
        writer = spawn {
            var n = 0
            let bs = workload.batches
            var deadline = nanos()
            while !flag.stop.load(ordering: .relaxed) {
                map.apply(bs[n % bs.count])
                n += 1
                if interval > 0 {
                    deadline += interval
                    let now = nanos()
                    if options.paceBySpinning {
                        while nanos() < deadline {}
                    } else if deadline > now {
                        usleep(useconds_t((deadline - now) / 1000))
                    }
                }
            }
            flag.batches.store(n, ordering: .relaxed)
        }
        usleep(50_000)
    }
    // Throughput phase, then latency phase (timing each read), in every reader thread.
    let results = Mutex<[(Int, UInt64, Histogram)]>([])
    var readers: [pthread_t] = []
    for r in 0..<readerThreads {
        readers.append(spawn {
            let keys = lookupKeys
            let mask = keys.count - 1
            var i = r * 7919
            var sink: UInt64 = 0
            var reads = 0
            let t0 = nanos()
            let tEnd = t0 + UInt64(seconds * 0.5e9)
            var now = t0
            while now < tEnd {
                for _ in 0..<1024 {
                    sink &+= map.readSum(keys[i & mask])
                    i &+= 1
                }
                reads += 1024
                now = nanos()
            }
            let elapsed = now - t0
            var h = Histogram()
            let lEnd = now + UInt64(seconds * 0.5e9)
            var a = now
            while a < lEnd {
                sink &+= map.readSum(keys[i & mask])
                i &+= 1
                let b = nanos()
                h.add(b - a)
                a = b
            }
            if sink == 42 { print("") }   // keep the reads alive
            results.withLock { $0.append((reads, elapsed, h)) }
        })
    }
    for t in readers { pthread_join(t, nil) }
    flag.stop.store(true, ordering: .relaxed)
    if let w = writer { pthread_join(w, nil) }
    let wElapsed = Double(nanos() - wStart) / 1e9
    let rs = results.withLock { $0 }
    var h = Histogram()
    var rate = 0.0
    for (reads, ns, hist) in rs {
        rate += Double(reads) / (Double(ns) / 1e9)
        h.merge(hist)
    }
    return Result(readsPerSec: rate, p50: h.percentile(0.50), p99: h.percentile(0.99), p999: h.percentile(0.999),
                  batchesPerSec: mode == .paced || mode == .max ? Double(flag.batches.load(ordering: .relaxed)) / wElapsed : 0)
}

/// Fixed-point formatting without Foundation.
func fmt(_ x: Double, _ decimals: Int) -> String {
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let v = Int((x * scale).rounded())
    if decimals == 0 { return String(v) }
    let whole = v / Int(scale), frac = abs(v % Int(scale))
    var f = String(frac)
    while f.count < decimals { f = "0" + f }
    return "\(whole).\(f)"
}

func fmtRate(_ r: Double) -> String {
    r >= 1e6 ? fmt(r / 1e6, 2) + " M/s" : fmt(r / 1e3, 0) + " k/s"
}

// MARK: - run

func machine() -> String {
    var u = utsname()
    uname(&u)
    let release = withUnsafeBytes(of: &u.release) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
    let ncpu = sysconf(Int32(_SC_NPROCESSORS_ONLN))
    var la = [Double](repeating: 0, count: 3)
    getloadavg(&la, 3)
    return "Linux \(release), \(ncpu) CPUs online, load average at start \(fmt(la[0], 2))"
}

print("bench-tree: \(machine())")
print("tree: \(keyCount) uprobes x 1 consumer; read = lookup of a random key (50% hits); writer batches: \(batchEdits) edits (8 removeKey + 8 insertConsumer); \(readerThreads) reader thread(s); \(seconds)s per cell (half throughput, half per-read latency)")
print("")
print("| structure | writer | reads/s (per thread) | p50 ns | p99 ns (min-max) | p99.9 ns | batches/s published |")
print("|---|---|---:|---:|---:|---:|---:|")
let maps: [any BenchMap] = [EBRTree(), MutexMap(), ARCSnapshotMap()]
for m in maps { m.apply(workload.initial) }
var cells: [[[Result]]] = Array(repeating: Array(repeating: [], count: WriterMode.allCases.count), count: maps.count)
func run(_ map: some BenchMap, _ mode: WriterMode) -> Result { measure(map, mode: mode) }
for _ in 0..<options.repeats {
    for (mi, m) in maps.enumerated() {
        for (wi, mode) in WriterMode.allCases.enumerated() {
            cells[mi][wi].append(run(m, mode))
        }
    }
}
func median<T: Comparable>(_ xs: [T]) -> T { xs.sorted()[xs.count / 2] }
for (mi, m) in maps.enumerated() {
    for (wi, mode) in WriterMode.allCases.enumerated() {
        let rs = cells[mi][wi]
        let rate = median(rs.map(\.readsPerSec)) / Double(readerThreads)
        let p99s = rs.map(\.p99)
        let batches = mode == .idle || mode == .idleBusy ? "-" : fmt(median(rs.map(\.batchesPerSec)), 0)
        print("| \(m.name) | \(mode.label) | \(fmtRate(rate)) | \(median(rs.map(\.p50))) | \(median(p99s)) (\(p99s.min()!)-\(p99s.max()!)) | \(median(rs.map(\.p999))) | \(batches) |")
    }
}

// Bytes per registration at 100,000 registrations.
print("")
print("| layout | registrations | uprobes (nodes) | requested bytes / registration | malloc-chunk bytes / registration |")
print("|---|---:|---:|---:|---:|")
for perKey in [1, 4] {
    let tree = UprobeTree()
    let total = 100_000
    var edits: [TreeEdit] = []
    edits.reserveCapacity(1000)
    for r in 0..<total {
        let k = key(r / perKey)
        edits.append(.insertConsumer(k, Consumer(registration: UInt64(r) + 1, slot: UInt32(r))))
        if edits.count == 1000 { tree.apply(edits); edits.removeAll(keepingCapacity: true) }
    }
    tree.apply(edits)
    tree.synchronize()
    let f = tree.read { $0.footprint() }
    precondition(tree.read { $0.consumerCount } == total)
    let requested = fmt(Double(f.requestedBytes) / Double(total), 1)
    let chunks = fmt(Double(f.mallocChunkBytes) / Double(total), 1)
    print("| \(perKey) consumer(s) per uprobe | \(total) | \(f.nodes) | \(requested) | \(chunks) |")
}
