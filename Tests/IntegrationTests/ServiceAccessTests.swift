import Foundation
import Testing
import UprobedClient
import UprobedProtocol

/// Access control with two real uids (root and `uprobed-test`) and a third (`nobody`) that
/// may do nothing; metrics checked by promtool.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi (set UPROBED_REQUIRE_KERNEL=1 to require)"))
struct ServiceAccessTests {
    @Test("SO_PEERCRED policy: a register-role uid probes only readable binaries in its own processes, removes only its own probes, within its limit; a uid in no list is refused; denials are logged")
    func twoUsers() throws {
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let user = try TestUser.ensure()
        let nobody: UInt32 = 65534
        let target = try ServicePersistenceTests.target(in: dir)
        let secret = try ServicePersistenceTests.target(in: dir, name: "secret")
        chmod(secret, 0o700)  // root only
        let config = """
            socket_mode = 0666
            register_uids = \(TestUser.name)
            read_uids = \(TestUser.name)
            read_groups = 4242
            max_probes_per_uid = 2
            """
        let d = try ServiceDaemon(dir: dir, config: config)
        let rootIDs = try d.register([spec(target, symbol: "fn_never")], consumer: "svc-root")

        // A process the test user owns, waiting for a line before it runs fn_a 9 times.
        let own = Process()
        own.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        own.arguments = ["--reuid=\(user.uid)", "--regid=\(user.gid)", "--clear-groups", "--", target, "9", "0", "wait"]
        let ownIn = Pipe(), ownOut = Pipe()
        own.standardInput = ownIn
        own.standardOutput = ownOut
        try own.run()
        defer { if own.isRunning { kill(own.processIdentifier, SIGKILL) } }
        let pidLine = String(decoding: ownOut.fileHandleForReading.availableData, as: UTF8.self)
        guard let ownPid = Int32(pidLine.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            Issue.record("no pid from the user's process: '\(pidLine)'")
            return
        }

        func reg(_ s: JSONValue) -> JSONObject { ["op": "register", "probes": [s], "consumer": "svc-user"] }
        let replies = try callAsUser(uid: user.uid, gid: user.gid, socket: d.socket, [
            ["op": "status"],                                           // 0 read: allowed
            ["op": "list"],                                             // 1 read: allowed
            reg(spec(target, symbol: "fn_a")),                          // 2 system-wide: admins only
            reg(spec(target, symbol: "fn_a", pid: 1)),                  // 3 pid 1 is root's
            reg(spec(secret, symbol: "fn_a", pid: ownPid)),             // 4 unreadable binary
            reg(spec(target, symbol: "fn_a", pid: ownPid)),             // 5 allowed
            ["op": "unregister", "probes": [.string(rootIDs[0])]],      // 6 root's probe
            ["op": "resolve", "probes": [spec(secret, symbol: "fn_a")]], // 7 cannot read it
            reg(spec(target, symbol: "fn_*", pid: ownPid)),             // 8 1 held + 3 > limit 2
        ])
        #expect(replies.count == 9)
        guard replies.count == 9 else { return }
        #expect(replies[0]["ok"] == .bool(true))
        #expect(replies[1]["ok"] == .bool(true))
        #expect(errorCode(replies[2]) == "permission_denied")
        #expect(replies[2]["error"]?.objectValue?["message"]?.stringValue?.contains("system-wide") == true)
        #expect(errorCode(replies[3]) == "permission_denied")
        #expect(replies[3]["error"]?.objectValue?["message"]?.stringValue?.contains("process 1 is not owned") == true, "\(replies[3])")
        #expect(errorCode(replies[4]) == "permission_denied")
        #expect(replies[4]["error"]?.objectValue?["message"]?.stringValue?.contains("cannot read") == true, "\(replies[4])")
        #expect(replies[5]["ok"] == .bool(true), "\(replies[5])")
        #expect(errorCode(replies[6]) == "permission_denied", "\(replies[6])")
        #expect(errorCode(replies[7]) == "permission_denied", "\(replies[7])")
        #expect(errorCode(replies[8]) == "probe_limit_exceeded", "\(replies[8])")
        let userID = replies[5]["probes"]?.arrayValue?.first?.objectValue?["id"]?.stringValue ?? ""

        // The allowed probe counts exactly the user's process.
        ownIn.fileHandleForWriting.write(Data("go\n".utf8))
        own.waitUntilExit()
        try run([target, "5", "0"])  // root's process: not counted by the pid filter
        #expect(try d.hits()[userID] == 9)

        // The owner may remove its own probe; root's is still there.
        let rm = try callAsUser(uid: user.uid, gid: user.gid, socket: d.socket, [["op": "unregister", "probes": [.string(userID)]]])
        #expect(rm.first?["ok"] == .bool(true), "\(rm)")
        #expect(try d.list().keys.contains(rootIDs[0]))

        // A uid in no list may not even read.
        let none = try callAsUser(uid: nobody, gid: nobody, socket: d.socket, [["op": "status"], ["op": "stats"]])
        #expect(none.allSatisfy { errorCode($0) == "permission_denied" }, "\(none)")
        // The same uid with a supplementary group in read_groups (SO_PEERGROUPS) may read.
        let grouped = try callAsUser(uid: nobody, gid: nobody, groups: [7, 4242], socket: d.socket, [["op": "status"]])
        #expect(grouped.first?["ok"] == .bool(true), "\(grouped)")
        // Denials are logged with who and why.
        #expect(d.log.contains("access denied"))
        #expect(d.log.contains("peer_uid=\(user.uid)") && d.log.contains("peer_uid=\(nobody)"))
        let status = try d.call(["op": "status"])
        #expect((status["service"]?.objectValue?["access_denied"]?.int64Value ?? 0) >= 8)
        #expect(d.stop() == 0)
    }

    @Test("metrics: GET /metrics on a Unix path and on loopback TCP, per-probe hits equal stats, promtool check metrics passes; metrics_probe_series per_consumer and top:N by SIGHUP")
    func metricsPromtool() throws {
        let promtool = "/usr/bin/promtool"
        let havePromtool = FileManager.default.isExecutableFile(atPath: promtool)
        if !havePromtool && !Kernel.required { return }  // CI installs it (make deps: prometheus)
        #expect(havePromtool, "promtool missing: apt-get install prometheus (make deps)")
        let dir = try ServiceDaemon.makeDir()
        defer { removeServiceDir(dir) }
        let target = try ServicePersistenceTests.target(in: dir)
        let metricsPath = dir + "/metrics.sock"
        let d = try ServiceDaemon(dir: dir, config: "metrics_listen = \(metricsPath)\n")
        let ids = try d.register([spec(target, symbol: "fn_a"), spec(target, symbol: "fn_b")], consumer: "svc \"quoted\" consumer")
        try run([target, "12", "34"])
        let (status, body) = try httpGet(unixPath: metricsPath, path: "/metrics")
        #expect(status.hasPrefix("HTTP/1.1 200"), "\(status)")
        #expect(body.contains("uprobed_probe_hits_total{id=\"\(ids[0])\""), "\(body)")
        let line = body.split(separator: "\n").first { $0.hasPrefix("uprobed_probe_hits_total{id=\"\(ids[1])\"") }
        #expect(line?.hasSuffix(" 34") == true, "\(String(describing: line))")
        #expect(body.contains("# TYPE uprobed_probes gauge"))
        #expect(body.contains("uprobed_probes 2"))
        #expect(body.contains("consumer=\"svc \\\"quoted\\\" consumer\""))
        if havePromtool {
            let check = try run([promtool, "check", "metrics"], stdin: body)
            #expect(check.status == 0, "promtool: \(check.out) \(check.err)")
        }
        #expect(try httpGet(unixPath: metricsPath, path: "/nope").status.hasPrefix("HTTP/1.1 404"))

        // Move the listener to loopback TCP by SIGHUP.
        let port = try freeLoopbackPort()
        try "metrics_listen = 127.0.0.1:\(port)\n".write(toFile: d.configPath, atomically: true, encoding: .utf8)
        kill(d.pid, SIGHUP)
        #expect(waitForLog(d, "address=[IPv4]127.0.0.1/127.0.0.1:\(port)"), "\(d.log)")
        let tcp = try httpGet(port: port, path: "/metrics")
        #expect(tcp.status.hasPrefix("HTTP/1.1 200"))
        #expect(tcp.body.contains("uprobed_config_reloads_total 1"))
        if havePromtool {
            let check = try run([promtool, "check", "metrics"], stdin: tcp.body)
            #expect(check.status == 0, "promtool: \(check.out) \(check.err)")
        }

        // metrics_probe_series by SIGHUP: per consumer, then the top 1 (fn_b, 34) plus other.
        func reloadSeries(_ mode: String, until expected: String) throws -> String {
            try "metrics_listen = 127.0.0.1:\(port)\nmetrics_probe_series = \(mode)\n".write(toFile: d.configPath, atomically: true, encoding: .utf8)
            kill(d.pid, SIGHUP)
            let deadline = Date().addingTimeInterval(10)
            var body = ""
            repeat {
                body = try httpGet(port: port, path: "/metrics").body
                if body.contains(expected) { break }
                usleep(50_000)
            } while Date() < deadline
            #expect(body.contains(expected), "\(mode): \(body)")
            if havePromtool {
                let check = try run([promtool, "check", "metrics"], stdin: body)
                #expect(check.status == 0, "promtool (\(mode)): \(check.out) \(check.err)")
            }
            return body
        }
        let perConsumer = try reloadSeries("per_consumer", until: "uprobed_consumer_hits_total{consumer=\"svc \\\"quoted\\\" consumer\"} 46")
        #expect(perConsumer.contains("uprobed_consumer_probes{consumer=\"svc \\\"quoted\\\" consumer\"} 2"), "\(perConsumer)")
        #expect(!perConsumer.contains("uprobed_probe_hits_total{"), "\(perConsumer)")
        let top = try reloadSeries("top:1", until: "uprobed_probe_hits_total{id=\"other\",path=\"\",symbol=\"\",consumer=\"\"} 12")
        #expect(top.contains("uprobed_probe_hits_total{id=\"\(ids[1])\""), "\(top)")
        #expect(!top.contains("uprobed_probe_hits_total{id=\"\(ids[0])\""), "\(top)")
        #expect(top.contains("uprobed_probes_other 1"), "\(top)")
        #expect(d.stop() == 0)
    }
}
