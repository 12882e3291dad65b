import Foundation
import Testing
import UprobedProtocol

/// `uprobectl` as a daily tool (issue 28): global options anywhere, readable and sortable
/// `stats`, `rm --all`/`--match`, `add -f`, exit statuses, completion scripts.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct CLIDailyTests {
    @Test("--socket and --json work before and after the command; exit statuses 0, 1, 2, 3")
    func globalOptionsAndExitStatuses() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let add = try ctl(["--socket", daemon.socket, "add", "\(target):fn_a"])
        #expect(add.status == 0, "\(add.err)")
        #expect(add.out.contains("fn_a"), "\(add.out)")
        let before = try ctl(["--json", "--socket", daemon.socket, "status"])
        #expect(before.status == 0, "\(before.err)")
        #expect(try JSONParser.parse(before.out.trimmingCharacters(in: .whitespacesAndNewlines)).objectValue?["probes"] == .int(1))
        let after = try ctl(["status", "--socket=\(daemon.socket)", "--json"])
        #expect(try JSONParser.parse(after.out.trimmingCharacters(in: .whitespacesAndNewlines)).objectValue?["probes"] == .int(1))
        let mixed = try ctl(["--socket", daemon.socket, "stats", "--json", "--interval", "0"])
        #expect(mixed.status == 0 && mixed.out.contains("\"symbol\":\"fn_a\""), "\(mixed.out) \(mixed.err)")

        // 1: refused by the daemon, with its code.
        let refused = try ctl(["--socket", daemon.socket, "rm", "p999"])
        #expect(refused.status == 1, "\(refused)")
        #expect(refused.err.contains("[probe_not_found]"), "\(refused.err)")
        // 2: bad usage, from ArgumentParser and from a bad probe spelling.
        #expect(try ctl(["--socket", daemon.socket, "stats", "--sort", "bogus"]).status == 2)
        #expect(try ctl(["--socket", daemon.socket, "add", "no-colon"]).status == 2)
        #expect(try ctl(["--socket", daemon.socket, "watch", "--interval", "5"]).err.contains("2s or 2000"))
        // 3: unreachable, saying which socket was tried and how to start the daemon.
        let down = try ctl(["--socket", daemon.dir + "/nobody.sock", "status"])
        #expect(down.status == 3, "\(down)")
        #expect(down.err.contains(daemon.dir + "/nobody.sock (from --socket)") && down.err.contains("systemctl start uprobed"), "\(down.err)")
        // The statuses are in --help.
        #expect(try ctl(["--help"]).out.contains("3  the daemon is unreachable"))
    }

    @Test("permission denied on the socket names the group to join, or the directory in the way")
    func permissionAdvice() throws {
        let daemon = try TestDaemon()
        let asNobody = ["/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", try Paths.product("uprobectl"),
                        "--socket", daemon.socket, "status"]
        // The test daemon's directory is 0700 (mkdtemp): the directory is what blocks.
        let dir = try run(asNobody)
        #expect(dir.status == 3, "\(dir)")
        #expect(dir.err.contains("the directory \(daemon.dir) is not searchable"), "\(dir.err)")
        // With the directory open, the socket's group (0660, group users) is what blocks.
        #expect(chmod(daemon.dir, 0o755) == 0)
        #expect(chown(daemon.socket, 0, 100) == 0)
        let sock = try run(asNobody)
        #expect(sock.status == 3, "\(sock)")
        #expect(sock.err.contains("mode 0660, group users") && sock.err.contains("usermod -aG users nobody"), "\(sock.err)")
    }

    @Test("stats: symbol and path per probe, sorted by hits by default, --sort, --top, --match, --path, human numbers and --raw")
    func statsSortAndFilter() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        // fn_b first, so id order (fn_b, fn_a) differs from hits order (fn_a, fn_b).
        #expect(try ctl(["--socket", daemon.socket, "add", "\(target):fn_b", "\(target):fn_a", "\(target):fn_never"]).status == 0)
        try run([target, "1500", "7"])
        let s = ["--socket", daemon.socket, "stats", "--interval", "100ms"]
        let byHits = try ctl(s)
        #expect(byHits.status == 0, "\(byHits.err)")
        #expect(byHits.out.hasPrefix("ID"), "\(byHits.out)")
        let rows = tableRows(byHits.out)
        #expect(rows.map { $0[5] } == ["fn_a", "fn_b", "fn_never"], "\(byHits.out)")
        #expect(rows.first?[1] == "1.5k", "\(byHits.out)")
        #expect(rows.first?.last == target, "\(byHits.out)")
        #expect(rows.first?[2] == "0/s", "nothing ran during the interval: \(byHits.out)")
        #expect(tableRows(try ctl(s + ["--raw"]).out).first?[1] == "1500")
        #expect(tableRows(try ctl(s + ["--sort", "id"]).out).map { $0[5] } == ["fn_b", "fn_a", "fn_never"])
        #expect(tableRows(try ctl(s + ["--sort", "name"]).out).map { $0[5] } == ["fn_a", "fn_b", "fn_never"])
        #expect(tableRows(try ctl(s + ["--top", "1"]).out).map { $0[5] } == ["fn_a"])
        #expect(tableRows(try ctl(s + ["--match", "fn_[bn]*"]).out).map { $0[5] } == ["fn_b", "fn_never"])
        #expect(tableRows(try ctl(s + ["--path", "target", "--top", "2"]).out).count == 2)
        #expect(tableRows(try ctl(s + ["--path", "/elsewhere/target"]).out).isEmpty)
        // The rate is over the interval: a workload running meanwhile shows up in it.
        let workload = try Workload(target: target, a: 0, b: 2000)
        defer { workload.stop() }
        let busy = tableRows(try ctl(s + ["--sort", "rate", "--interval", "500ms", "--raw"]).out)
        #expect(busy.first?[5] == "fn_b", "\(busy)")
        #expect((busy.first.flatMap { Double($0[2]) } ?? 0) > 0, "\(busy)")
        // --interval 0 answers at once with the mean since registration, labelled as such.
        let mean = try ctl(s + ["--interval", "0"]).out
        #expect(mean.split(separator: "\n").first?.split(separator: " ").prefix(4) == ["ID", "HITS", "MEAN", "RATE"], "\(mean)")
    }

    @Test("stats demangles C++, Rust and Swift names and keeps the raw name in --json")
    func statsDemangles() throws {
        // C functions named with mangled names: what C++, Rust and Swift binaries hold, without
        // their compilers. The Swift one is called through a pointer: `call $s…` does not assemble.
        let bin = try Fixtures.build("mangled", source: """
            #define PROBED __attribute__((noinline, used))
            long cxx(long x) __asm__("_ZN5cache6lookupEl");
            PROBED long cxx(long x) { return x + 1; }
            long rust(long x) __asm__("_RNvCs1234_7mycrate6handle");
            PROBED long rust(long x) { return x * 2; }
            long rustold(long x) __asm__("_ZN4core3fmt5write17h0123456789abcdefE");
            PROBED long rustold(long x) { return x * 3; }
            long swift(long x) __asm__("$s4main5CacheV6lookupyyF");
            PROBED long swift(long x) { return x * 4; }
            long (*volatile swiftp)(long) = swift;
            int main(int argc, char **argv) { (void)argv; return (int)(cxx(argc) + rust(argc) + rustold(argc) + swiftp(argc)) & 1; }
            """)
        let daemon = try TestDaemon()
        let copy = daemon.dir + "/mangled"
        try FileManager.default.copyItem(atPath: bin, toPath: copy)
        let add = try ctl(["--socket", daemon.socket, "add", "\(copy):_ZN5cache6lookupEl", "\(copy):_RNvCs1234_7mycrate6handle",
                           "\(copy):_ZN4core3fmt5write17h0123456789abcdefE", "\(copy):$s4main5CacheV6lookupyyF"])
        #expect(add.status == 0, "\(add.err)")
        try run([copy])
        let table = try ctl(["--socket", daemon.socket, "stats", "--interval", "0", "--sort", "name"])
        #expect(table.out.contains("cache::lookup(long)"), "\(table.out)")
        #expect(table.out.contains("mycrate"), "\(table.out)")
        #expect(table.out.contains("core::fmt::write "), "Rust's legacy hash is dropped: \(table.out)")
        #expect(table.out.contains("main.Cache.lookup() -> ()"), "\(table.out)")
        #expect(!table.out.contains("_ZN5cache") && !table.out.contains("$s4main"), "\(table.out)")
        let json = try ctl(["--socket", daemon.socket, "stats", "--interval", "0", "--json", "--match", "cache::*"])
        let stats = try JSONParser.parse(json.out.trimmingCharacters(in: .whitespacesAndNewlines)).objectValue?["stats"]?.arrayValue
        #expect(stats?.count == 1, "\(json.out)")
        let row = stats?.first?.objectValue
        #expect(row?["symbol"] == "_ZN5cache6lookupEl")
        #expect(row?["demangled"] == "cache::lookup(long)")
        #expect(row?["hits"] == .int(1))
    }

    @Test("rm --match, --dry-run, --all and -f -, with counts")
    func removeBySelection() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let add = try ctl(["--socket", daemon.socket, "add", "--consumer", "c1", "\(target):fn_*"])
        #expect(tableRows(add.out).count == 3, "\(add.out)")
        let other = try ctl(["--socket", daemon.socket, "add", "uretprobe:\(target):fn_a"])
        let otherID = tableRows(other.out).first?.first ?? "?"
        let s = ["--socket", daemon.socket]
        #expect(try ctl(s + ["rm", "--match", "nothing*"]).out == "removed 0 (no probe matched)\n")
        #expect(try ctl(s + ["rm", "--match", "fn_never"]).out == "removed 1\n")
        #expect(try ctl(s + ["rm", "--all", "--dry-run"]).out == "would remove 3\n")
        #expect(try ctl(s + ["rm", "--consumer", "c1", "--match", "fn_b"]).out == "removed 1\n")
        #expect(try ctl(s + ["rm", "-f", "-"], stdin: "# ids, one per line\n\(otherID)\n").out == "removed 1\n")
        let all = try ctl(s + ["rm", "--all", "--json"])
        #expect(try JSONParser.parse(all.out.trimmingCharacters(in: .whitespacesAndNewlines)).objectValue?["removed"] == .int(1), "\(all)")
        #expect(try daemon.status()["probes"] == .int(0))
        // One way to select, not two.
        #expect(try ctl(s + ["rm", "--all", "p1"]).status == 2)
        #expect(try ctl(s + ["rm"]).status == 2)
    }

    @Test("add -f - reads spellings from stdin; add -f FILE from a file")
    func addFromFile() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let piped = try ctl(["--socket", daemon.socket, "add", "-f", "-"],
                            stdin: "# probes\n\n\(target):fn_a\n  uretprobe:\(target):fn_b  \n")
        #expect(piped.status == 0, "\(piped.err)")
        #expect(tableRows(piped.out).map { $0[3] } == ["fn_a", "fn_b"], "\(piped.out)")
        let file = daemon.dir + "/probes.txt"
        try "\(target):fn_never\n".write(toFile: file, atomically: true, encoding: .utf8)
        #expect(try ctl(["--socket", daemon.socket, "add", "-f", file, "\(target):fn_a"]).status == 0)
        #expect(try daemon.status()["probes"] == .int(4))
        #expect(try ctl(["--socket", daemon.socket, "add", "-f", daemon.dir + "/missing"]).status == 2)
    }

    @Test("10,001 probes: add -f splits into requests of 10,000, rm --all is one request; stats stays quick")
    func largeSets() throws {
        let many = try Fixtures.build("many", relative: "kernel/many.c")
        let daemon = try TestDaemon()
        let copy = daemon.dir + "/many"
        try FileManager.default.copyItem(atPath: many, toPath: copy)
        let target = try daemon.privateTarget()
        var lines = (0..<10_000).map { n in "\(copy):g" + String(repeating: "0", count: 4 - String(n).count) + String(n) }
        lines.append("\(target):fn_a")
        let add = try ctl(["--socket", daemon.socket, "add", "-f", "-"], stdin: lines.joined(separator: "\n"))
        #expect(add.status == 0, "\(add.err)")
        #expect(tableRows(add.out).count == 10_001)
        let started = Date()
        let stats = try ctl(["--socket", daemon.socket, "stats", "--interval", "0", "--top", "3"])
        let took = Date().timeIntervalSince(started)
        #expect(stats.status == 0 && tableRows(stats.out).count == 3, "\(stats)")
        print("stats --interval 0 over 10,001 probes: \(Int(took * 1000)) ms")
        #expect(took < 10, "stats over 10,001 probes took \(took) s")
        let rm = try ctl(["--socket", daemon.socket, "rm", "--all", "--json"])
        let reply = try JSONParser.parse(rm.out.trimmingCharacters(in: .whitespacesAndNewlines)).objectValue
        #expect(reply?["removed"] == .int(10_001), "\(rm)")
        #expect(reply?["requests"] == .int(1), "the daemon selects them all: \(rm)")
        #expect(try daemon.status()["probes"] == .int(0))
    }

    @Test("completion scripts: bash completes a subcommand and an option value; zsh and fish scripts are generated")
    func completionScripts() throws {
        let dir = NSTemporaryDirectory() + "uprobectl-completion-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let bash = try ctl(["--generate-completion-script", "bash"])
        #expect(bash.status == 0)
        try bash.out.write(toFile: dir + "/uprobectl.bash", atomically: true, encoding: .utf8)
        func complete(_ words: [String]) throws -> [String] {
            let quoted = words.map { "'\($0)'" }.joined(separator: " ")
            let script = """
                source '\(dir)/uprobectl.bash'
                COMP_WORDS=(\(quoted)); COMP_CWORD=\(words.count - 1)
                COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}
                _uprobectl uprobectl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
                printf '%s\\n' "${COMPREPLY[@]}"
                """
            let r = try run(["/bin/bash", "--norc", "--noprofile", "-c", script])
            #expect(r.status == 0, "\(r.err)")
            return r.out.split(separator: "\n").map(String.init)
        }
        #expect(try complete(["uprobectl", "st"]) == ["stats", "status"])
        #expect(try complete(["uprobectl", "--socket", "/s", "to"]) == ["top"])
        #expect(try complete(["uprobectl", "stats", "--sort", ""]) == ["hits", "rate", "name", "id", "calls", "p50", "p99", "max"])
        #expect(try complete(["uprobectl", "rm", "--d"]) == ["--dry-run"])
        let zsh = try ctl(["--generate-completion-script", "zsh"])
        #expect(zsh.status == 0 && zsh.out.hasPrefix("#compdef uprobectl"), "\(zsh.out.prefix(200))")
        let fish = try ctl(["--generate-completion-script", "fish"])
        #expect(fish.status == 0 && fish.out.contains("complete -c 'uprobectl'"), "\(fish.out.prefix(200))")
    }
}
