import Foundation
import Testing
import UprobedProtocol

/// `uprobectl` against a real daemon: add, ls, stats, rm, status, resolve, bad spellings.
@Suite(.enabled(if: Kernel.enabled, "needs root and a kernel with uprobe_multi"))
struct CLITests {
    @Test("add, ls, stats, rm, status through the CLI")
    func lifecycle() throws {
        let daemon = try TestDaemon()
        let target = try daemon.privateTarget()
        let add = try run([try Paths.product("uprobectl"), "add", "--socket", daemon.socket, "\(target):fn_a", "uretprobe:\(target):fn_b"])
        #expect(add.status == 0, "\(add.err)")
        let ids = add.out.split(separator: "\n").dropFirst().compactMap { $0.split(separator: " ").first.map(String.init) }
        #expect(ids.count == 2, "\(add.out)")
        try run([target, "12", "34"])
        // Socket from the environment this time.
        var env = ProcessInfo.processInfo.environment
        env["UPROBED_SOCKET"] = daemon.socket
        let stats = try run([try Paths.product("uprobectl"), "stats"], environment: env)
        #expect(stats.status == 0)
        let rows = Dictionary(uniqueKeysWithValues: stats.out.split(separator: "\n").dropFirst().compactMap { line -> (String, String)? in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            return f.count >= 2 ? (String(f[0]), String(f[1])) : nil
        })
        #expect(rows[ids[0]] == "12")
        #expect(rows[ids[1]] == "34")
        let ls = try run([try Paths.product("uprobectl"), "ls"], environment: env)
        #expect(ls.out.contains("uretprobe") && ls.out.contains("fn_a"), "\(ls.out)")
        let status = try run([try Paths.product("uprobectl"), "status"], environment: env)
        #expect(status.out.contains("probes: 2"), "\(status.out)")
        let rm = try run([try Paths.product("uprobectl"), "rm", ids[0], ids[1]], environment: env)
        #expect(rm.out.contains("removed 2"), "\(rm.out) \(rm.err)")
        let json = try run([try Paths.product("uprobectl"), "status", "--json"], environment: env)
        let parsed = try JSONParser.parse(json.out.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(parsed.objectValue?["probes"] == .int(0))
    }

    @Test("CLI errors are clear and exit non-zero")
    func errors() throws {
        let daemon = try TestDaemon()
        var env = ProcessInfo.processInfo.environment
        env["UPROBED_SOCKET"] = daemon.socket
        let ctl = try Paths.product("uprobectl")
        let bad = try run([ctl, "add", "no-colon-here"], environment: env)
        #expect(bad.status != 0)
        #expect(bad.err.contains("cannot parse probe"))
        let missing = try run([ctl, "add", "/nonexistent:main"], environment: env)
        #expect(missing.status != 0)
        #expect(missing.err.contains("file_not_found"), "\(missing.err)")
        env["UPROBED_SOCKET"] = daemon.dir + "/nobody-here.sock"
        let down = try run([ctl, "status"], environment: env)
        #expect(down.status != 0)
        #expect(down.err.contains("is uprobed running"), "\(down.err)")
    }
}
