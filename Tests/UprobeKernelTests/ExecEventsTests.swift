import Foundation
import Testing
@testable import UprobeKernel

/// The exec tracepoint program: an exec of a watched process is reported with its pid and a
/// CLOCK_MONOTONIC time; an exec of any other process is not.
@Suite(.serialized, .enabled(if: KernelEnv.enabled, "kernel lacks BPF (set UPROBED_REQUIRE_KERNEL to fail instead)"))
struct ExecEventsTests {
    /// `sh -c 'read x; exec /bin/true'`: waits for a line, then execs.
    func waitingShell() throws -> (Process, Pipe) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "read x; exec /bin/true"]
        let input = Pipe()
        p.standardInput = input
        try p.run()
        return (p, input)
    }

    func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    @Test func reportsExecsOfWatchedProcessesOnly() throws {
        let events = try ExecEvents()
        let (watched, wIn) = try waitingShell()
        let (other, oIn) = try waitingShell()
        #expect(events.watch([watched.processIdentifier]) == 0)
        let before = monotonicNanos()
        oIn.fileHandleForWriting.write(Data("go\n".utf8))
        other.waitUntilExit()
        wIn.fileHandleForWriting.write(Data("go\n".utf8))
        watched.waitUntilExit()
        var pfd = pollfd(fd: events.fd, events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 5000) == 1, "the ring buffer fd becomes readable")
        let seen = events.drain()
        #expect(seen.map(\.pid) == [watched.processIdentifier], "\(seen)")
        if let t = seen.first?.monotonicNanos { #expect(t >= before && t <= monotonicNanos()) }
        #expect(events.drain().isEmpty, "drained")
        pfd.revents = 0
        #expect(poll(&pfd, 1, 0) == 0, "not readable once drained")

        // Unwatched again: its next exec is not reported.
        let (again, aIn) = try waitingShell()
        #expect(events.watch([]) == 0)
        aIn.fileHandleForWriting.write(Data("go\n".utf8))
        again.waitUntilExit()
        #expect(events.drain().isEmpty)
    }
}
