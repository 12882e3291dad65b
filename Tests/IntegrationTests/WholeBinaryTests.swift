import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Issue 26 ("Whole binaries"): a glob over a whole binary registers every function x86
/// uprobes can probe and lists the others with the reason, instead of failing as a whole with
/// the kernel's bare ENOTSUPP (524); a function asked for by name that cannot be probed is
/// refused with `instruction_not_probeable`.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct WholeBinaryTests {
    /// The probe ids of a register reply by name (primary symbol and aliases).
    func ids(_ reply: JSONObject) -> [String: String] {
        var out: [String: String] = [:]
        for p in reply["probes"]?.arrayValue ?? [] {
            guard let o = p.objectValue, let id = o["id"]?.stringValue else { continue }
            let names = [o["symbol"]?.stringValue].compactMap { $0 } + (o["aliases"]?.arrayValue ?? []).compactMap(\.stringValue)
            for n in names { out[n] = id }
        }
        return out
    }

    /// `skipped` of a reply: symbol → reason.
    func skipped(_ reply: JSONObject) -> [String: String] {
        var out: [String: String] = [:]
        for s in reply["skipped"]?.arrayValue ?? [] {
            guard let o = s.objectValue, let reason = o["reason"]?.stringValue else { continue }
            out[o["symbol"]?.stringValue ?? "?"] = reason
        }
        return out
    }

    @Test("fixture: fx_* registers the probeable functions, counts them exactly and lists the vzeroupper, vmovd and lock ones; by name they are refused")
    func fixtureGlob() throws {
        let daemon = try TestDaemon()
        let bin = try Fixtures.build("insn", relative: "insn/insn.c")
        let n = 1000
        let p = try WaitingProcess([bin, String(n)])
        let reply = try daemon.call(["op": "register", "probes": [spec(bin, symbol: "fx_*", pid: p.pid)]])
        #expect(reply["ok"] == .bool(true), "\(JSONSerializer.serialize(.object(reply)))")
        let byName = ids(reply)
        #expect(Set(byName.keys) == ["fx_add", "fx_mul"])
        let skips = skipped(reply)
        #expect(reply["skipped_count"] == .int(3))
        #expect(Set(skips.keys) == ["fx_vzeroupper", "fx_vmovd", "fx_lock"])
        #expect(skips["fx_lock"]?.contains("lock prefix (f0)") == true)
        #expect(skips["fx_vmovd"]?.contains("VEX-encoded") == true)
        #expect(skips["fx_vzeroupper"]?.contains("VEX-encoded") == true)
        for s in reply["skipped"]?.arrayValue ?? [] {
            #expect(s.objectValue?["offset"]?.int64Value != nil && s.objectValue?["path"]?.stringValue == bin)
            #expect(s.objectValue?["probe"] == .int(0))
        }
        try p.release()
        let hits = try daemon.hits(Array(byName.values))
        #expect(hits[byName["fx_add"] ?? ""] == UInt64(n))
        #expect(hits[byName["fx_mul"] ?? ""] == UInt64(2 * n))

        // By name, each is refused, naming the function and its instruction.
        for name in ["fx_vzeroupper", "fx_vmovd", "fx_lock"] {
            let r = try daemon.call(["op": "register", "probes": [spec(bin, symbol: name)]])
            #expect(errorCode(r) == "instruction_not_probeable", "\(r)")
            let message = r["error"]?.objectValue?["message"]?.stringValue ?? ""
            #expect(message.contains("'\(name)'"), "\(message)")
        }
        let lock = try daemon.call(["op": "resolve", "probes": [spec(bin, symbol: "fx_lock")]])
        #expect(lock["error"]?.objectValue?["message"]?.stringValue?.contains("f0 48 83") == true)
        // force does not override it.
        let offset = try #require(reply["skipped"]?.arrayValue?.first { $0.objectValue?["symbol"] == .string("fx_lock") }?
            .objectValue?["offset"]?.int64Value)
        let forced = try daemon.call(["op": "register", "probes": [.object(["path": .string(bin), "offset": .int(offset), "force": .bool(true)])]])
        #expect(errorCode(forced) == "instruction_not_probeable", "\(forced)")
        // resolve reports the same skipped list without attaching.
        let dry = try daemon.call(["op": "resolve", "probes": [spec(bin, symbol: "fx_*")]])
        #expect(Set(skipped(dry).keys) == ["fx_vzeroupper", "fx_vmovd", "fx_lock"] && dry["skipped_count"] == .int(3))
    }

    @Test("libc:* registers every probeable function of libc (it failed with 524), lists the skipped ones with reasons, and counts labs, atoi and toupper exactly")
    func libcWhole() throws {
        let daemon = try TestDaemon()
        // Calls through volatile pointers: gcc would otherwise inline labs and toupper as builtins.
        let source = """
            #include <ctype.h>
            #include <stdio.h>
            #include <stdlib.h>
            #include <unistd.h>
            int main(int argc, char **argv) {
                long n = atol(argv[1]);
                long (*volatile labs_p)(long) = labs;
                int (*volatile atoi_p)(const char *) = atoi;
                int (*volatile toupper_p)(int) = toupper;
                static char inbuf[64];
                setvbuf(stdin, inbuf, _IOFBF, sizeof inbuf);
                printf("%d\\n", getpid()); fflush(stdout);
                char line[8]; if (!fgets(line, sizeof line, stdin)) return 2;
                long sum = 0;
                for (long i = 0; i < n; i++) sum += atoi_p("7");
                for (long i = 0; i < 2 * n; i++) sum += labs_p(-i);
                for (long i = 0; i < 3 * n; i++) sum += toupper_p('a');
                return sum > 0 ? 0 : 1;
            }
            """
        let bin = try Fixtures.build("libcwhole", source: source)
        let n = 500
        let p = try WaitingProcess([bin, String(n)])
        let reply = try daemon.call(["op": "register", "probes": [spec("libc", symbol: "*", pid: p.pid)]])
        #expect(reply["ok"] == .bool(true), "\(String(JSONSerializer.serialize(.object(reply)).prefix(2000)))")
        let byName = ids(reply)
        #expect(byName.count > 2000, "\(byName.count) names")
        let skips = skipped(reply)
        let count = reply["skipped_count"]?.int64Value ?? 0
        #expect(count > 0 && Int(count) == (reply["skipped"]?.arrayValue?.count ?? -1))
        // pthread_spin_lock (exported, so named even without debug symbols) begins with `lock`.
        #expect(skips["pthread_spin_lock"]?.contains("lock prefix (f0)") == true, "\(skips)")
        // With libc's debug symbols the AVX2 string functions are named; they begin with VEX code.
        let names = Array(byName.keys) + Array(skips.keys)
        if names.contains(where: { $0.contains("_avx2") }) {
            #expect(skips.contains { $0.key.contains("_avx2") && $0.value.contains("VEX-encoded") }, "\(skips)")
        }
        try p.release()
        let wanted = ["atoi": n, "labs": 2 * n, "toupper": 3 * n]
        let hits = try daemon.hits(wanted.keys.compactMap { byName[$0] })
        for (name, expected) in wanted {
            let id = try #require(byName[name], "\(name) was not registered")
            #expect(hits[id] == UInt64(expected), "\(name): \(hits[id] ?? 0), expected \(expected)")
        }
    }
}

extension WholeBinaryTests {
    @Test("an instruction only the kernel refuses: the attach finds the offset and names it instead of relaying ENOEXEC")
    func kernelOnlyRefusal() throws {
        let daemon = try TestDaemon()
        let bin = try Fixtures.build("insn", relative: "insn/insn.c")
        let dry = try daemon.call(["op": "resolve", "probes": [spec(bin, symbol: "gap_vex")]])
        let offset = try #require(dry["probes"]?.arrayValue?.first?.objectValue?["offset"]?.int64Value, "\(dry)")
        // The kernel looks at the instruction when it installs the probe in a process that maps
        // the file: one runs (filtered to it), beside a probeable function in the same request.
        let p = try WaitingProcess([bin, "1"])
        let start = ContinuousClock.now
        let r = try daemon.call(["op": "register", "probes": [spec(bin, symbol: "fx_add", pid: p.pid), spec(bin, symbol: "gap_vex", pid: p.pid)]])
        let took = ContinuousClock.now - start
        #expect(errorCode(r) == "instruction_not_probeable", "\(r)")
        let message = r["error"]?.objectValue?["message"]?.stringValue ?? ""
        #expect(message.contains("0x\(String(offset, radix: 16)) (c5 f8 0a c1"), "\(message)")
        #expect(message.contains("ENOEXEC"), "\(message)")
        #expect(!message.contains("0x\(String(offset + 0x10, radix: 16))"))
        #expect(took < .seconds(10), "\(took)")
        // Nothing was left attached, and the probeable function alone still registers.
        #expect(try daemon.status()["links"] == .int(0))
        let ids = try daemon.register([spec(bin, symbol: "fx_add", pid: p.pid)])
        try p.release()
        #expect(try daemon.hits(ids)[ids[0]] == 1)
    }
}
