import Foundation
import Synchronization
import Testing
@testable import UprobeKernel

/// The closer threads' pool, with plain jobs (no kernel needed).
struct BlockingPoolTests {
    /// Jobs that sleep, recording how many run at once. An NSLock, not `Mutex`, guards `runs`:
    /// ThreadSanitizer does not see the Synchronization module's lock.
    final class Tally: Sendable {
        let running = Atomic<Int>(0), peak = Atomic<Int>(0)
        let runs = Locked<[Int: Int]>([:])
        /// `waitFor`: the job first waits (up to 10 s) until that many jobs run at once, so
        /// concurrency is shown without depending on how fast threads start.
        func job(_ id: Int, millis: UInt32, waitFor: Int = 0) -> @Sendable () -> Void {
            { [self] in
                let now = running.add(1, ordering: .sequentiallyConsistent).newValue
                _ = peak.max(now, ordering: .sequentiallyConsistent)
                let deadline = Date().addingTimeInterval(10)
                while peak.load(ordering: .sequentiallyConsistent) < waitFor && Date() < deadline { usleep(1000) }
                usleep(millis * 1000)
                running.subtract(1, ordering: .sequentiallyConsistent)
                runs.withLock { $0[id, default: 0] += 1 }
            }
        }
    }

    final class Locked<Value>: @unchecked Sendable {
        // @unchecked: `value` is only touched with `lock` held.
        private let lock = NSLock()
        private var value: Value
        init(_ value: Value) { self.value = value }
        func withLock<R>(_ body: (inout Value) -> R) -> R { lock.withLock { body(&value) } }
    }

    @Test("jobs run once each, at most maxThreads at a time, on threads kept for the next round")
    func reusesThreads() {
        let pool = BlockingPool(name: "test-pool", maxThreads: 4, idleSeconds: 3)
        let tally = Tally()
        // The first four meet: all four threads run at once; the fifth job never joins them.
        pool.runAll((0..<10).map { tally.job($0, millis: 10, waitFor: $0 < 4 ? 4 : 0) })
        #expect(tally.runs.withLock { $0 } == Dictionary(uniqueKeysWithValues: (0..<10).map { ($0, 1) }))
        #expect(tally.peak.load(ordering: .sequentiallyConsistent) == 4)
        #expect(pool.threadCounts.started == 4)
        // The next round finds the same four threads (idle, or just finishing the last round).
        pool.runAll((10..<18).map { tally.job($0, millis: 10) })
        #expect(tally.runs.withLock { $0.count } == 18)
        #expect(pool.threadCounts.started == 4)
        // Rounds from several callers at once each return when their own jobs are done. Plain
        // threads, not Dispatch: a caller started late by the test runner's busy pool could find
        // the pool's threads ended (idle too long) and would rightly start new ones.
        let group = DispatchGroup()
        for caller in 0..<3 {
            group.enter()
            Thread {
                pool.runAll((0..<5).map { tally.job(100 + caller * 10 + $0, millis: 5) })
                #expect((0..<5).allSatisfy { i in tally.runs.withLock { $0[100 + caller * 10 + i] } == 1 })
                group.leave()
            }.start()
        }
        group.wait()
        #expect(pool.threadCounts.started == 4)
        // Idle threads end after `idleSeconds`.
        let deadline = Date().addingTimeInterval(15)
        while pool.threadCounts.live > 0 && Date() < deadline { usleep(50_000) }
        #expect(pool.threadCounts.live == 0)
        // And start again on demand.
        pool.runAll([tally.job(1000, millis: 1), tally.job(1001, millis: 1)])
        #expect(tally.runs.withLock { $0[1000] == 1 && $0[1001] == 1 })
    }
}
