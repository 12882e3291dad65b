import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// A daemon's probes directory: set files written and removed by a test, and reloads that wait
/// until the daemon has reconciled the directory again.
struct ProbeDir {
    let path: String
    init(_ dir: String) throws {
        path = dir + "/probes.d"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func write(_ name: String, _ text: String) throws { try text.write(toFile: path + "/" + name, atomically: true, encoding: .utf8) }
    func remove(_ name: String) throws { try FileManager.default.removeItem(atPath: path + "/" + name) }

    /// `dir`'s probes directory and a private copy of the target fixture in `dir`.
    static func withTarget(in dir: String) throws -> (ProbeDir, String) {
        let target = dir + "/target"
        try FileManager.default.copyItem(atPath: try Fixtures.target, toPath: target)
        return (try ProbeDir(dir), target)
    }

    /// `probes:` followed by one entry per spelling.
    static func set(_ spellings: [String]) -> String {
        spellings.isEmpty ? "probes: []\n" : "probes:\n" + spellings.map { "  - \($0)\n" }.joined()
    }
}

extension DaemonClient {
    /// `status`'s `probe_sets`.
    func probeSets() throws -> JSONObject {
        try status()["probe_sets"]?.objectValue ?? [:]
    }

    /// The reconcile count of `status`.
    func reconciles() throws -> Int64 { try probeSets()["reconciles"]?.int64Value ?? -1 }

    /// SIGHUP to `pid`, then waits until the daemon has reconciled its probes directory again.
    func reload(pid: Int32) throws {
        let before = try reconciles()
        kill(pid, SIGHUP)
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            if try reconciles() > before { return }
            usleep(20_000)
        }
        throw TestFailure("no probe-set reconcile within 30 s of SIGHUP")
    }

    /// The ids of `set`'s probes, by "symbol" or "symbol (ret)".
    func setProbes(_ set: String) throws -> [String: String] {
        var out: [String: String] = [:]
        for (id, o) in try list() where o["set"]?.stringValue == set {
            let ret = o["spec"]?.objectValue?["retprobe"] == .bool(true)
            out[(o["symbol"]?.stringValue ?? "?") + (ret ? " (ret)" : "")] = id
        }
        return out
    }
}

@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct ProbeSetTests {
    @Test("probes_dir at start and on SIGHUP: new, changed and removed files; API probes of the same consumer untouched; exact counts; restarts keep ids and counts")
    func reconcileAtStartAndReload() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (probes, target) = try ProbeDir.withTarget(in: dir)
        try probes.write("a.yaml", ProbeDir.set(["\(target):fn_a", "\(target):fn_b"]))
        try probes.write("b.yml", ProbeDir.set(["uprobe:\(target):fn_never"]))
        try probes.write("README", "not a set")
        var d = try ServiceDaemon(dir: dir)
        let a = try d.setProbes("a")
        #expect(Set(a.keys) == ["fn_a", "fn_b"])
        let b = try d.setProbes("b")
        #expect(b.keys.sorted() == ["fn_never"])
        let listed = try d.list()
        #expect(listed[a["fn_a"] ?? ""]?["consumer"]?.stringValue == "a")
        #expect(listed[a["fn_a"] ?? ""]?["set_source"]?.stringValue == "file")
        // An API probe under the set's consumer name: the set never touches it.
        let api = try d.register([spec(target, symbol: "fn_a")], consumer: "a")[0]
        try run([target, "1000", "2500"])
        var hits = try d.hits()
        #expect(hits[a["fn_a"] ?? ""] == 1000 && hits[a["fn_b"] ?? ""] == 2500 && hits[api] == 1000)

        // Changed (fn_b out, fn_b's return in), removed (b), new (c); then a reload.
        try probes.write("a.yaml", ProbeDir.set(["\(target):fn_a", "uretprobe:\(target):fn_b"]))
        try probes.remove("b.yml")
        try probes.write("c.yaml", ProbeDir.set(["\(target):fn_b"]))
        try d.reload(pid: d.pid)
        let a2 = try d.setProbes("a")
        #expect(Set(a2.keys) == ["fn_a", "fn_b (ret)"])
        #expect(a2["fn_a"] == a["fn_a"], "an unchanged line keeps its registration")
        #expect(try d.setProbes("b").isEmpty)
        let c = try d.setProbes("c")
        #expect(Set(c.keys) == ["fn_b"])
        #expect(try d.list()[api] != nil)
        try run([target, "10", "20"])
        hits = try d.hits()
        #expect(hits[a2["fn_a"] ?? ""] == 1010 && hits[a2["fn_b (ret)"] ?? ""] == 20 && hits[c["fn_b"] ?? ""] == 20 && hits[api] == 1010)
        #expect(hits[a["fn_b"] ?? ""] == nil && hits[b["fn_never"] ?? ""] == nil, "removed lines and files lose their probes")

        // The API cannot remove a set's probe; removing the consumer removes only the API's.
        let rm = try d.call(["op": "unregister", "probes": [.string(a2["fn_a"] ?? "")]])
        #expect(errorCode(rm) == "probe_in_set")
        #expect(rm["error"]?.objectValue?["message"]?.stringValue?.contains("belongs to probe set 'a'") == true)
        let byConsumer = try d.call(["op": "unregister", "consumer": "a"])
        #expect(byConsumer["removed"] == .int(1))
        #expect(try d.setProbes("a") == a2)
        let sets = try d.probeSets()["sets"]?.arrayValue?.compactMap(\.objectValue) ?? []
        #expect(sets.map { $0["set"]?.stringValue ?? "" } == ["a", "c"])
        #expect(sets.allSatisfy { $0["state"] == "applied" && $0["source"] == "file" })

        // A restart: the same registrations come back (ids, counts), the reconcile changes nothing.
        #expect(d.stop() == 0)
        try probes.write("c.yaml", ProbeDir.set([]))  // emptied while down
        d = try ServiceDaemon(dir: dir)
        #expect(try d.setProbes("a") == a2)
        #expect(try d.setProbes("c").isEmpty)
        try run([target, "1", "2"])
        hits = try d.hits()
        #expect(hits[a2["fn_a"] ?? ""] == 1011 && hits[a2["fn_b (ret)"] ?? ""] == 22)
        #expect(d.log.contains("probe sets reconciled"))
        #expect(d.stop() == 0)
    }

    @Test("a set's line with 'latency: true' registers a latency probe: calls and returns exact, next to a plain line")
    func latencyLine() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (probes, target) = try ProbeDir.withTarget(in: dir)
        try probes.write("lat.yaml", "probes:\n  - probe: \(target):fn_a\n    latency: true\n  - \(target):fn_b\n")
        let d = try ServiceDaemon(dir: dir)
        let ids = try d.setProbes("lat")
        let a = try #require(ids["fn_a"]), b = try #require(ids["fn_b"])
        #expect(try d.list()[a]?["spec"]?.objectValue?["latency"] == .bool(true))
        try run([target, "300", "40"])
        let entries = try LatencyProbeTests.entries(d, [a, b])
        let l = entries[a]?["latency"]?.objectValue
        #expect(LatencyProbeTests.u(l, "calls") == 300 && LatencyProbeTests.u(l, "returns") == 300 && LatencyProbeTests.u(l, "in_flight") == 0)
        #expect(entries[b]?["hits"] == .int(40) && entries[b]?["latency"] == nil)
        #expect(d.stop() == 0)
    }

    @Test("a bad file is refused alone: one log line with file, line and reason; its set keeps its probes; the others go ahead")
    func badFileRefusedAlone() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (probes, target) = try ProbeDir.withTarget(in: dir)
        try probes.write("good.yaml", ProbeDir.set(["\(target):fn_a"]))
        try probes.write("keep.yaml", ProbeDir.set(["\(target):fn_b"]))
        let metricsPath = dir + "/metrics.sock"
        let d = try ServiceDaemon(dir: dir, config: "metrics_listen = \(metricsPath)\nmax_probes_per_request = 3\n")
        let kept = try d.setProbes("keep")
        #expect(kept.count == 1)

        try probes.write("good.yaml", ProbeDir.set(["\(target):fn_a", "\(target):fn_b"]))
        // Line 4: a symbol the binary lacks (the other new line, fn_a, must not be added either).
        try probes.write("keep.yaml", "# kept\n" + ProbeDir.set(["\(target):fn_b", "\(target):fn_a", "\(target):fn_nosuch"]))
        try probes.write("broken.yaml", "probes:\n  - \(target):fn_a\n  - [unclosed\n")
        try probes.write("pid.yaml", "probes:\n  - probe: \(target):fn_a\n    pid: 1\n")
        try probes.write("nobinary.yaml", ProbeDir.set(["/nonexistent/bin:main"]))
        try probes.write("big.yaml", ProbeDir.set(["\(target):fn_a", "\(target):fn_b", "\(target):fn_never", "uretprobe:\(target):fn_a"]))
        try d.reload(pid: d.pid)
        #expect(Set(try d.setProbes("good").keys) == ["fn_a", "fn_b"])
        #expect(try d.setProbes("keep") == kept)
        #expect(try d.setProbes("broken").isEmpty && d.setProbes("pid").isEmpty && d.setProbes("nobinary").isEmpty && d.setProbes("big").isEmpty)

        let refusals = d.log.split(separator: "\n").filter { $0.contains("probe set refused") }
        #expect(refusals.count == 5, "\(refusals)")
        func line(_ file: String) -> String { refusals.first { $0.contains(probes.path + "/" + file) }.map(String.init) ?? "" }
        #expect(line("keep.yaml").contains("line=5") && line("keep.yaml").contains("symbol_not_found")
                && line("keep.yaml").contains("fn_nosuch"), "\(line("keep.yaml"))")
        #expect(line("broken.yaml").contains("line=") && line("broken.yaml").contains("set_invalid"), "\(line("broken.yaml"))")
        #expect(line("pid.yaml").contains("line=3") && line("pid.yaml").contains("not processes"), "\(line("pid.yaml"))")
        #expect(line("nobinary.yaml").contains("line=2") && line("nobinary.yaml").contains("file_not_found"), "\(line("nobinary.yaml"))")
        #expect(line("big.yaml").contains("line=5") && line("big.yaml").contains("too_many_probes") && line("big.yaml").contains("at most 3"), "\(line("big.yaml"))")

        let status = try d.probeSets()
        #expect(status["refused"] == .int(5))
        let keep = status["sets"]?.arrayValue?.compactMap(\.objectValue).first { $0["set"] == "keep" }
        #expect(keep?["state"] == "refused" && keep?["probes"] == .int(1))
        #expect(keep?["error"]?.objectValue?["line"] == .int(5))
        let text = try ctl(["--socket", d.socket, "status"])
        #expect(text.out.contains("  keep: file \(probes.path)/keep.yaml, 1 probes, refused at line 5: symbol 'fn_nosuch' not found")
                && text.out.contains("[symbol_not_found]"), "\(text.out)")
        let (_, body) = try httpGet(unixPath: metricsPath, path: "/metrics")
        #expect(body.contains("uprobed_probe_sets{state=\"refused\"} 5") && body.contains("uprobed_probe_sets{state=\"applied\"} 1"), "\(body)")
        #expect(body.contains("uprobed_probe_set_reconciles_total 2"), "\(body)")

        // The set still counts exactly, and a fixed file is taken at the next reload.
        try run([target, "3", "300"])
        #expect(try d.hits()[kept["fn_b"] ?? ""] == 300)
        try probes.write("keep.yaml", ProbeDir.set(["\(target):fn_b", "\(target):fn_a"]))
        try d.reload(pid: d.pid)
        #expect(Set(try d.setProbes("keep").keys) == ["fn_a", "fn_b"])
        #expect(try d.setProbes("keep")["fn_b"] == kept["fn_b"])
        #expect(d.stop() == 0)
    }
}

extension ProbeSetTests {
    @Test("a reload whose config file is refused still reconciles the sets; a new probes_dir replaces the old one's sets")
    func reloadWithConfig() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (first, target) = try ProbeDir.withTarget(in: dir)
        try first.write("one.yaml", ProbeDir.set(["\(target):fn_a"]))
        let d = try ServiceDaemon(dir: dir, config: "probes_dir = \(first.path)\n")
        #expect(try d.setProbes("one").count == 1)
        try "no_such_key = 1\n".write(toFile: d.configPath, atomically: true, encoding: .utf8)
        try first.write("two.yaml", ProbeDir.set(["\(target):fn_b"]))
        try d.reload(pid: d.pid)
        #expect(try d.setProbes("two").count == 1)
        #expect(try d.status()["service"]?.objectValue?["config_reload_failures"] == .int(1))
        // Another directory: the sets of the first go, those of the second come.
        let otherPath = dir + "/other.d"
        try FileManager.default.createDirectory(atPath: otherPath, withIntermediateDirectories: false)
        try ProbeDir.set(["\(target):fn_never"]).write(toFile: otherPath + "/three.yaml", atomically: true, encoding: .utf8)
        try "probes_dir = \(otherPath)\n".write(toFile: d.configPath, atomically: true, encoding: .utf8)
        try d.reload(pid: d.pid)
        #expect(try d.setProbes("one").isEmpty && d.setProbes("two").isEmpty && d.setProbes("three").count == 1)
        #expect(try d.probeSets()["sets"]?.arrayValue?.compactMap { $0.objectValue?["set"]?.stringValue } == ["three"])
        #expect(d.stop() == 0)
    }

    @Test("a directory laid out like a mounted ConfigMap (files linked through ..data to a hidden dir, swapped atomically by kubelet) is read through its links")
    func configMapLayout() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let (probes, target) = try ProbeDir.withTarget(in: dir)
        let fm = FileManager.default
        func version(_ name: String, _ sets: [String: [String]]) throws {
            try fm.createDirectory(atPath: probes.path + "/" + name, withIntermediateDirectories: false)
            for (key, spellings) in sets { try ProbeDir.set(spellings).write(toFile: probes.path + "/\(name)/\(key)", atomically: true, encoding: .utf8) }
        }
        try version("..2026_12_06_09_00_00.1", ["shell.yaml": ["\(target):fn_a"]])
        try fm.createSymbolicLink(atPath: probes.path + "/..data", withDestinationPath: "..2026_12_06_09_00_00.1")
        try fm.createSymbolicLink(atPath: probes.path + "/shell.yaml", withDestinationPath: "..data/shell.yaml")
        let d = try ServiceDaemon(dir: dir)
        let first = try d.setProbes("shell")
        #expect(Set(first.keys) == ["fn_a"])
        #expect(try d.probeSets()["sets"]?.arrayValue?.count == 1, "only shell: ..data and the hidden dir are no sets")
        // kubelet's update: a new hidden dir, ..data renamed over to it.
        try version("..2026_12_06_09_01_00.2", ["shell.yaml": ["\(target):fn_a", "\(target):fn_b"]])
        try fm.createSymbolicLink(atPath: probes.path + "/..data_tmp", withDestinationPath: "..2026_12_06_09_01_00.2")
        #expect(rename(probes.path + "/..data_tmp", probes.path + "/..data") == 0)
        try d.reload(pid: d.pid)
        let second = try d.setProbes("shell")
        #expect(Set(second.keys) == ["fn_a", "fn_b"] && second["fn_a"] == first["fn_a"])
        try run([target, "11", "13"])
        let hits = try d.hits()
        #expect(hits[second["fn_a"] ?? ""] == 11 && hits[second["fn_b"] ?? ""] == 13)
        #expect(d.stop() == 0)
    }
}

@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct ProbeSetApplyTests {
    @Test("uprobectl diff shows + and - lines and exits 4 until apply makes the set match; apply changes only what changed; exact counts")
    func applyAndDiff() throws {
        let d = try TestDaemon()
        let target = try d.privateTarget()
        let file = d.dir + "/web.yaml"
        func setFile(_ spellings: [String]) throws { try ProbeDir.set(spellings).write(toFile: file, atomically: true, encoding: .utf8) }
        try setFile(["\(target):fn_a", "uretprobe:\(target):fn_b"])
        var r = try ctl(["--socket", d.socket, "diff", "-f", file])
        #expect(r.status == 4, "\(r)")
        #expect(r.out.contains("+  uprobe:\(target):fn_a") && r.out.contains("+  uretprobe:\(target):fn_b"), "\(r.out)")
        #expect(r.out.contains("set web: would add 2 probes (2 lines), would remove 0 probes (0 lines), 0 lines unchanged"), "\(r.out)")
        #expect(try d.list().isEmpty, "diff changes nothing")

        r = try ctl(["--socket", d.socket, "apply", "-f", file])
        #expect(r.status == 0, "\(r)")
        let first = try d.setProbes("web")
        #expect(Set(first.keys) == ["fn_a", "fn_b (ret)"])
        #expect(try d.list()[first["fn_a"] ?? ""]?["set_source"] == "api")
        r = try ctl(["--socket", d.socket, "diff", "-f", file])
        #expect(r.status == 0 && r.out.contains("would add 0 probes (0 lines), would remove 0 probes (0 lines), 2 lines unchanged"), "\(r)")
        try run([target, "100", "200"])

        // fn_b's return out, fn_never in: diff names exactly those, apply does exactly that.
        try setFile(["\(target):fn_a", "\(target):fn_never"])
        r = try ctl(["--socket", d.socket, "diff", "-f", file])
        #expect(r.status == 4)
        #expect(r.out.contains("+  uprobe:\(target):fn_never") && r.out.contains("-  uretprobe:\(target):fn_b"), "\(r.out)")
        #expect(r.out.contains(first["fn_b (ret)"] ?? "?"), "the removed line names its ids: \(r.out)")
        r = try ctl(["--socket", d.socket, "--json", "apply", "-f", file])
        #expect(r.status == 0)
        let reply = try #require(try JSONParser.parse(r.out).objectValue)
        #expect(reply["unchanged"] == .int(1) && reply["added"]?.arrayValue?.count == 1 && reply["removed"]?.arrayValue?.count == 1)
        let second = try d.setProbes("web")
        #expect(second["fn_a"] == first["fn_a"] && second["fn_b (ret)"] == nil && second["fn_never"] != nil)
        try run([target, "5", "7"])
        let hits = try d.hits()
        #expect(hits[second["fn_a"] ?? ""] == 105 && hits[second["fn_never"] ?? ""] == 0)

        // A refused apply changes nothing and names the line; an empty set removes the set.
        try setFile(["\(target):fn_a", "\(target):fn_b", "\(target):fn_nosuch"])
        r = try ctl(["--socket", d.socket, "apply", "-f", file])
        #expect(r.status == 1 && r.err.contains("web.yaml:4: symbol 'fn_nosuch' not found") && r.err.contains("[symbol_not_found]"), "\(r)")
        #expect(try d.setProbes("web") == second)
        try setFile([])
        r = try ctl(["--socket", d.socket, "apply", "-f", file])
        #expect(r.status == 0 && r.out.contains("removed 2 probes (2 lines)"), "\(r)")
        #expect(try d.list().isEmpty)
    }

    @Test("uprobectl apply/diff refuse bad files and names before asking the daemon (exit 2, file:line), and relay the daemon's refusals (exit 1)")
    func cliRefusals() throws {
        let d = try TestDaemon()
        let target = try d.privateTarget()
        func write(_ name: String, _ text: String) throws -> String {
            let p = d.dir + "/" + name
            try text.write(toFile: p, atomically: true, encoding: .utf8)
            return p
        }
        let cases: [(file: String, text: String, args: [String], words: String)] = [
            ("broken.yaml", "probes:\n  - [x\n", [], "broken.yaml:3: not valid YAML"),
            ("pid.yaml", "probes:\n  - probe: \(target):fn_a\n    pid: 4\n", [], "pid.yaml:3: a probe set names binaries, not processes"),
            ("rel.yaml", "probes:\n  - bin/x:main\n", [], "rel.yaml:2: path 'bin/x' is relative"),
            ("twice.yaml", "probes:\n  - \(target):fn_a\n  - uprobe:\(target):fn_a\n", [], "twice.yaml:3: the same probe as line 2"),
            ("set.txt", "probes: []\n", [], "is not NAME.yaml or NAME.yml: name the set with --name NAME"),
            ("ok.yaml", "probes: []\n", ["--name", "a b"], "may only hold letters, digits"),
        ]
        for c in cases {
            let path = try write(c.file, c.text)
            for cmd in ["apply", "diff"] {
                let r = try ctl(["--socket", d.socket, cmd, "-f", path] + c.args)
                #expect(r.status == 2 && r.err.contains(c.words), "\(cmd) \(c.file): \(r)")
            }
        }
        var r = try ctl(["--socket", d.socket, "apply", "-f", "-"], stdin: "probes: []\n")
        #expect(r.status == 2 && r.err.contains("a set read from stdin needs --name NAME"), "\(r)")
        r = try ctl(["--socket", d.socket, "apply", "-f", d.dir + "/missing.yaml"])
        #expect(r.status == 2 && r.err.contains("missing.yaml"), "\(r)")
        r = try ctl(["--socket", d.socket, "apply", "--name", "fromstdin", "-f", "-"], stdin: ProbeDir.set(["\(target):fn_a"]))
        #expect(try r.status == 0 && d.setProbes("fromstdin").count == 1, "\(r)")
        // The daemon's refusal, at the line to blame.
        let bad = try write("nobin.yaml", ProbeDir.set(["\(target):fn_a", "/nonexistent/x:main"]))
        r = try ctl(["--socket", d.socket, "diff", "-f", bad])
        #expect(r.status == 1 && r.err.contains("nobin.yaml:3:") && r.err.contains("[file_not_found]"), "\(r)")
        // A set's probe is not removed by id; rm --all leaves it and says so.
        let id = try #require(try d.setProbes("fromstdin").values.first)
        r = try ctl(["--socket", d.socket, "rm", id])
        #expect(r.status == 1 && r.err.contains("belongs to probe set 'fromstdin'") && r.err.contains("[probe_in_set]"), "\(r)")
        let mine = try d.register([spec(target, symbol: "fn_b")])
        r = try ctl(["--socket", d.socket, "rm", "--all"])
        #expect(r.status == 0 && r.out.contains("removed 1") && r.err.contains("leaving 1 probe(s) of probe sets alone (fromstdin)"), "\(r)")
        #expect(try d.list().keys.sorted() == [id], "\(mine) removed, the set's kept")
    }

    @Test("the apply op refuses every bad request with a clear error and changes nothing")
    func applyOpRefusals() throws {
        let d = try TestDaemon()
        let target = try d.privateTarget()
        let ok = spec(target, symbol: "fn_a")
        var withPid = ProbeSpec(path: target, symbol: "fn_a")
        withPid.pid = 1
        let cases: [(JSONObject, String, String)] = [
            (["op": "apply", "probes": [ok]], "invalid_request", "needs 'set'"),
            (["op": "apply", "set": "s"], "invalid_request", "needs 'probes'"),
            (["op": "apply", "set": "s", "probes": "x"], "invalid_request", "needs 'probes'"),
            (["op": "apply", "set": 3, "probes": [ok]], "invalid_request", "needs 'set'"),
            (["op": "apply", "set": "a/b", "probes": [ok]], "invalid_request", "may only hold letters"),
            (["op": "apply", "set": ".hidden", "probes": [ok]], "invalid_request", "does not start with '.'"),
            (["op": "apply", "set": "s", "probes": [ok], "dry_run": "yes"], "invalid_request", "'dry_run' must be a boolean"),
            (["op": "apply", "set": "s", "probes": [ok], "consumer": "c"], "invalid_request", "has no field 'consumer'"),
            (["op": "apply", "set": "s", "probes": [ok, withPid.json]], "invalid_request", "probes[1]: a probe set names binaries, not processes"),
            (["op": "apply", "set": "s", "probes": [ok, spec("rel/x", symbol: "f")]], "invalid_request", "probes[1]: path 'rel/x' is relative"),
            (["op": "apply", "set": "s", "probes": [ok, ok]], "invalid_request", "probes[1] is the same probe as probes[0]"),
            (["op": "apply", "set": "s", "probes": [ok, spec(target, symbol: "nope")]], "symbol_not_found", "probes[1]"),
            (["op": "apply", "set": "s", "probes": [ok, spec("/nonexistent/bin", symbol: "main")]], "file_not_found", "probes[1]"),
            // A lock-prefixed first instruction: refused by the resolver, nothing is attached.
            (["op": "apply", "set": "s", "probes": [ok, spec("libc", symbol: "pthread_spin_lock")]], "instruction_not_probeable", "probes[1]"),
            (["op": "apply", "set": "", "probes": [ok]], "invalid_request", "needs 'set'"),
        ]
        for (req, code, words) in cases {
            let r = try d.call(req)
            #expect(errorCode(r) == code, "\(req): \(r)")
            #expect(r["error"]?.objectValue?["message"]?.stringValue?.contains(words) == true, "\(req): \(r)")
        }
        let small = try TestDaemon(config: "max_probes_per_request = 2\n")
        let many = try small.call(["op": "apply", "set": "s", "probes": [ok, spec(target, symbol: "fn_b"), spec(target, symbol: "fn_never")]])
        #expect(errorCode(many) == "too_many_probes" && many["error"]?.objectValue?["message"]?.stringValue?.contains("the limit is 2") == true, "\(many)")
        let blamed = try d.call(["op": "apply", "set": "s", "probes": [ok, spec(target, symbol: "nope")]])
        #expect(blamed["error"]?.objectValue?["probe"] == .int(1))
        #expect(try d.list().isEmpty)

        // A set name held by a file of probes_dir belongs to the file.
        let probes = try ProbeDir(d.dir)
        try probes.write("owned.yaml", ProbeDir.set([]))
        try d.reload(pid: d.process.processIdentifier)
        let conflict = try d.call(Request.apply(set: "owned", probes: [ProbeSpec(path: target, symbol: "fn_a")], dryRun: false).json())
        #expect(errorCode(conflict) == "set_conflict", "\(conflict)")
        // A dry run of that name compares with the file's set: what a reload would change.
        let dry = try d.call(Request.apply(set: "owned", probes: [ProbeSpec(path: target, symbol: "fn_a")], dryRun: true).json())
        #expect(dry["ok"] == .bool(true) && dry["added"]?.arrayValue?.count == 1 && dry["unchanged"] == .int(0), "\(dry)")
        // And a file named like an applied set is refused in the log.
        #expect(try d.call(Request.apply(set: "applied", probes: [ProbeSpec(path: target, symbol: "fn_b")], dryRun: false).json())["ok"] == .bool(true))
        try probes.write("applied.yaml", ProbeDir.set(["\(target):fn_a"]))
        try d.reload(pid: d.process.processIdentifier)
        #expect(Set(try d.setProbes("applied").keys) == ["fn_b"])
        #expect(d.log.split(separator: "\n").contains { $0.contains("probe set refused") && $0.contains("set_conflict") && $0.contains("applied.yaml") })
    }

    @Test("an apply cut short between its steps is completed at the next start from probe-sets.json; a corrupt one is made again from the registrations")
    func interruptedApplyCompleted() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        let lists = dir + "/state/probe-sets.json"
        let fnA = ProbeSpec(path: target, symbol: "fn_a"), fnB = ProbeSpec(path: target, symbol: "fn_b")
        func writeLists(_ sets: [String: [ProbeSpec]]) throws {
            var all = JSONObject()
            for (name, specs) in sets { all[name] = .array(specs.map(\.json)) }
            let o: JSONObject = ["format": "uprobed-probe-sets", "version": 1, "sets": .object(all)]
            try JSONSerializer.serialize(.object(o)).write(toFile: lists, atomically: true, encoding: .utf8)
        }
        var d = try ServiceDaemon(dir: dir)
        #expect(try d.call(Request.apply(set: "s", probes: [fnA, fnB], dryRun: false).json())["ok"] == .bool(true))
        let s = try d.setProbes("s")
        let saved = try String(contentsOfFile: lists, encoding: .utf8)
        #expect(saved.contains("\"s\":[") && saved.contains("fn_b"), "\(saved)")
        #expect(d.stop() == 0)

        // As if stopped after saving the new list [fn_a] and before removing fn_b.
        try writeLists(["s": [fnA]])
        d = try ServiceDaemon(dir: dir)
        #expect(try d.setProbes("s") == ["fn_a": s["fn_a"] ?? "?"])
        #expect(d.log.contains("applied probe set completed") && d.log.contains("removed=1"), "\(d.log)")
        #expect(try d.call(Request.apply(set: "t", probes: [fnB], dryRun: false).json())["ok"] == .bool(true))
        #expect(d.stop() == 0)

        // A corrupt list: nothing is removed, the lists are made again from the registrations.
        try "{not json".write(toFile: lists, atomically: true, encoding: .utf8)
        d = try ServiceDaemon(dir: dir)
        #expect(try d.setProbes("s").count == 1 && d.setProbes("t").count == 1)
        #expect(d.log.contains("cannot be read; made again from their registrations"))
        #expect(try AppliedSetsFile.sets(lists) == ["s": ["fn_a"], "t": ["fn_b"]])
        #expect(d.stop() == 0)

        // As if stopped after registering a new set "t" before its list was saved: it was never answered.
        try writeLists(["s": [fnA]])
        d = try ServiceDaemon(dir: dir)
        #expect(try d.setProbes("t").isEmpty && d.setProbes("s").count == 1)
        #expect(d.stop() == 0)
    }

    @Test("apply's access: a non-admin diffs readable binaries, cannot add system-wide probes, cannot change another uid's set; a uid with no role may not diff")
    func applyAccess() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let user = try TestUser.ensure()
        let target = try ServicePersistenceTests.target(in: dir)
        let secret = try ServicePersistenceTests.target(in: dir, name: "secret")
        chmod(secret, 0o700)
        let d = try ServiceDaemon(dir: dir, config: "socket_mode = 0666\nregister_uids = \(TestUser.name)\nread_uids = \(TestUser.name)\n")
        let fnA = ProbeSpec(path: target, symbol: "fn_a")
        #expect(try d.call(Request.apply(set: "roots", probes: [fnA], dryRun: false).json())["ok"] == .bool(true))
        let replies = try callAsUser(uid: user.uid, gid: user.gid, socket: d.socket, [
            Request.apply(set: "mine", probes: [fnA], dryRun: true).json(),                                    // 0 diff: allowed
            Request.apply(set: "mine", probes: [fnA], dryRun: false).json(),                                   // 1 system-wide
            Request.apply(set: "mine", probes: [ProbeSpec(path: secret, symbol: "fn_a")], dryRun: true).json(), // 2 unreadable
            Request.apply(set: "roots", probes: [], dryRun: false).json(),                                     // 3 root's set
            Request.apply(set: "mine", probes: [], dryRun: false).json(),                                      // 4 empty: nothing to do
        ])
        #expect(replies.count == 5)
        guard replies.count == 5 else { return }
        #expect(replies[0]["ok"] == .bool(true) && replies[0]["added"]?.arrayValue?.first?.objectValue?["count"] == .int(1), "\(replies[0])")
        #expect(errorCode(replies[1]) == "permission_denied", "\(replies[1])")
        #expect(replies[1]["error"]?.objectValue?["message"]?.stringValue?.contains("a probe set has no pid filters") == true, "\(replies[1])")
        #expect(errorCode(replies[2]) == "permission_denied" && replies[2]["error"]?.objectValue?["message"]?.stringValue?.contains("cannot") == true, "\(replies[2])")
        #expect(errorCode(replies[3]) == "permission_denied", "\(replies[3])")
        #expect(replies[3]["error"]?.objectValue?["message"]?.stringValue?.contains("was applied by uid 0") == true, "\(replies[3])")
        #expect(replies[4]["ok"] == .bool(true), "\(replies[4])")
        let nobody = try callAsUser(uid: 65534, gid: 65534, socket: d.socket, [Request.apply(set: "x", probes: [fnA], dryRun: true).json()])
        #expect(errorCode(nobody[0]) == "permission_denied")
        #expect(try d.setProbes("roots").count == 1 && d.setProbes("mine").isEmpty)
        #expect(d.stop() == 0)
    }
}

/// Reads probe-sets.json: each set's symbols.
enum AppliedSetsFile {
    static func sets(_ path: String) throws -> [String: [String]] {
        let o = try #require(try JSONParser.parse(String(contentsOfFile: path, encoding: .utf8)).objectValue)
        var out: [String: [String]] = [:]
        for m in o["sets"]?.objectValue?.pairs ?? [] {
            out[m.key] = (m.value.arrayValue ?? []).compactMap { $0.objectValue?["symbol"]?.stringValue }
        }
        return out
    }
}
