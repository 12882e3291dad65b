import Dispatch
import Logging
import Testing
@testable import UprobeCore
import UprobeKernel

/// Readers go through the uprobes tree: they answer while the writer is busy, and see batch
/// boundaries only.
struct ReadPathTests {
    @Test("with the writer held in the middle of a batch, stats and the registry still answer and show the state before it")
    func readersDuringABatch() async throws {
        let kernel = FakeKernel()
        let engine = Engine(config: EngineConfig(batchWindow: .zero, compactionDelay: .seconds(3600)), kernel: kernel,
                            logger: Logger(label: "test"))
        defer { engine.shutdown() }
        let first = try await engine.register([item("/a", inode: 1, offsets: [0x10])], consumer: "one", peer: .daemon).get()
        #expect(first.map(\.id) == ["p1"])

        let entered = DispatchSemaphore(value: 0), gate = DispatchSemaphore(value: 0)
        kernel.lock.withLock { kernel.attachEntered = entered; kernel.attachGate = gate }
        let second = Task { await engine.register([item("/b", inode: 2, offsets: [0x20, 0x30])], consumer: "two", peer: .daemon) }
        // The writer is inside the kernel attach of the second batch now (on its own thread).
        await Task.detached { entered.wait() }.value

        let table = try engine.statsTable(ids: nil).get()
        #expect((0..<table.count).map(table.id) == ["p1"])
        let seen = engine.read { snap, uprobes in (snap.probes.sorted.map(\.id), uprobes, snap.probes.consumerKey("two") == nil) }
        #expect(seen.0 == ["p1"] && seen.1 == 1 && seen.2, "\(seen)")

        kernel.lock.withLock { kernel.attachGate = nil }
        gate.signal()
        let added = try await second.value.get()
        #expect(added.map(\.id) == ["p2", "p3"])
        let after = engine.read { snap, uprobes in (snap.probes.count, uprobes) }
        #expect(after == (3, 3))
        #expect(try engine.statsTable(ids: nil).get().count == 3)
    }
}
