import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Issue 5 end to end: specs people actually write, on binaries nobody here wrote, counted
/// exactly by a real daemon. Programs like python3 and sqlite3 make some calls of their own
/// (start-up, statement preparation); each test runs the workload with N and with 2N units of
/// work under a pid-filtered probe, so those fixed calls cancel and the difference must be
/// exactly N.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct ResolverCountingTests {
    /// Starts `argv` (which prints its pid and waits for a line), registers `probe` filtered to
    /// it, lets it run, and returns the hits.
    func hits(_ daemon: TestDaemon, _ argv: [String], _ probe: (Int32) -> JSONValue) throws -> UInt64 {
        let p = try WaitingProcess(argv)
        let ids = try daemon.register([probe(p.pid)])
        try p.release()
        let h = try daemon.hits(ids)[ids[0]] ?? 0
        _ = try daemon.call(["op": "unregister", "probes": .array(ids.map { .string($0) })])
        return h
    }

    func difference(_ n: Int, _ run: (Int) throws -> UInt64) throws -> (UInt64, UInt64) {
        (try run(n), try run(2 * n))
    }

    @Test("python3.11 USDT python:function__entry (semaphore-gated) counts each Python call exactly")
    func pythonUSDT() throws {
        let python = "/usr/bin/python3.11"
        try #require(FileManager.default.isExecutableFile(atPath: python))
        let daemon = try TestDaemon()
        // CPython 3.11 only fires function__entry while a tracer is set (use_tracing); with one,
        // every Python frame entry fires it. The probe sets the semaphore (ref_ctr_offset);
        // without it the interpreter would skip the probe site entirely.
        let script = "import os,sys\nprint(os.getpid(),flush=True)\nsys.stdin.readline()\nsys.settrace(lambda *a: None)\ndef f(x): return x\nfor i in range(int(sys.argv[1])): f(i)\n"
        let n = 1500
        let (a, b) = try difference(n) { k in
            try hits(daemon, [python, "-c", script, String(k)]) { pid in spec(python, usdt: "python:function__entry", pid: pid) }
        }
        #expect(a >= UInt64(n), "at least one entry per call: \(a)")
        #expect(b - a == UInt64(n), "N=\(n): \(a), 2N: \(b)")
    }

    @Test("sqlite3_step through the library name libsqlite3.so.0 counts one step per row")
    func sqliteStep() throws {
        let python = "/usr/bin/python3.11"
        try #require(FileManager.default.isExecutableFile(atPath: python))
        let daemon = try TestDaemon()
        // _sqlite3 is imported (so libsqlite3.so.0 is mapped) before the pid is printed; each
        // fetched row is one sqlite3_step, plus one final step that returns SQLITE_DONE.
        let script = """
            import os,sys,sqlite3
            con=sqlite3.connect(':memory:')
            con.execute('create table t(x)')
            con.execute('insert into t with recursive c(i) as (select 1 union all select i+1 from c where i<?) select i from c', (int(sys.argv[1]),))
            print(os.getpid(),flush=True)
            sys.stdin.readline()
            rows=con.execute('select x from t').fetchall()
            assert len(rows)==int(sys.argv[1])
            """
        let n = 2000
        let (a, b) = try difference(n) { k in
            try hits(daemon, [python, "-c", script, String(k)]) { pid in spec("libsqlite3.so.0", symbol: "sqlite3_step", pid: pid) }
        }
        #expect(a == UInt64(n) + 1, "N rows: N+1 steps, got \(a)")
        #expect(b - a == UInt64(n))
    }

    @Test("libc malloc, by plain and by versioned name, counts exactly; an IFUNC says what it probes")
    func libcSymbols() throws {
        let daemon = try TestDaemon()
        let source = """
            #include <stdio.h>
            #include <stdlib.h>
            #include <unistd.h>
            int main(int argc, char **argv) {
                long n = atol(argv[1]);
                /* stdin's buffer would be malloc'ed by the first fgets, racing with the
                   registration that follows the pid line: give it a static one instead. */
                static char inbuf[64];
                setvbuf(stdin, inbuf, _IOFBF, sizeof inbuf);
                printf("%d\\n", getpid()); fflush(stdout);
                char line[8]; if (!fgets(line, sizeof line, stdin)) return 2;
                for (long i = 0; i < n; i++) { void *volatile p = malloc(32); free(p); }
                return 0;
            }
            """
        let bin = try Fixtures.build("mallocs", source: source)
        for name in ["malloc", "malloc@@GLIBC_2.2.5"] {
            let n = 3000
            let (a, b) = try difference(n) { k in
                try hits(daemon, [bin, String(k)]) { pid in spec("libc", symbol: name, pid: pid) }
            }
            #expect(b - a == UInt64(n), "\(name): N=\(a) 2N=\(b)")
        }
        // Both spellings land on the same function.
        let r = try daemon.call(["op": "resolve", "probes": [spec("libc.so.6", symbol: "malloc"), spec("libc.so.6", symbol: "malloc@@GLIBC_2.2.5")]])
        let offsets = (r["probes"]?.arrayValue ?? []).compactMap { $0.objectValue?["offset"] }
        #expect(offsets.count == 2 && offsets[0] == offsets[1])
        // strlen is an IFUNC: the reply must say the resolver is what gets probed.
        let ifunc = try daemon.call(["op": "register", "probes": [spec("libc.so.6", symbol: "strlen")]])
        let warning = ifunc["probes"]?.arrayValue?.first?.objectValue?["warning"]?.stringValue ?? ""
        #expect(warning.contains("IFUNC"), "\(ifunc)")
    }

    @Test("resolve is a dry run: it reports path, build-id, offset and symbol and attaches nothing")
    func resolveDryRun() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let r = try daemon.call(["op": "resolve", "probes": [spec(target, symbol: "fn_*")]])
        let probes = r["probes"]?.arrayValue ?? []
        #expect(probes.count == 3)
        #expect(probes.allSatisfy { $0.objectValue?["build_id"]?.stringValue?.count == 40 })
        #expect(try daemon.status()["links"] == .int(0))
        // A glob registers one probe per function.
        let ids = try daemon.register([spec(target, symbol: "fn_*")])
        #expect(ids.count == 3)
        // Raw offsets: a function start is fine; inside a function needs force.
        let start = probes.first?.objectValue?["offset"]?.int64Value ?? 0
        let mid = try daemon.call(["op": "register", "probes": [spec(target, offset: UInt64(start) + 1)]])
        #expect(errorCode(mid) == "offset_not_function_start")
    }
}
