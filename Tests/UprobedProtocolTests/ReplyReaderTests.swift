import Testing
import UprobedProtocol

/// The typed readers clients use for `list`, `stats` and `status` replies.
struct ReplyReaderTests {
    @Test("list entries: site, spec, consumer and state; unknown members are ignored")
    func listEntries() throws {
        let reply = try JSONParser.parse(#"""
            {"ok":true,"probes":[
             {"id":"p1","path":"/usr/bin/bash","offset":4096,"symbol":"readline","spec":{"path":"/usr/bin/bash","symbol":"readline","pid":42,"retprobe":true},
              "consumer":"c","owner_uid":0,"registered_at":1.5,"follow":true,"future_member":[1]},
             {"id":"p2","path":"/lib/x.so","offset":16,"sites":[{"path":"/lib/x.so","offset":16},{"path":"/lib/x.so","offset":32}],
              "state":"degraded","reason":"symbol gone","spec":{"path":"x","usdt":"a:b"}},
             {"no_id":true}]}
            """#).objectValue ?? [:]
        let probes = try ListedProbe.fromList(reply)
        #expect(probes.count == 2)
        #expect(probes[0].id == "p1" && probes[0].symbol == "readline" && probes[0].offset == 4096)
        #expect(probes[0].spec?.pid == 42 && probes[0].spec?.retprobe == true && probes[0].consumer == "c")
        #expect(probes[0].state == nil)
        #expect(probes[1].siteCount == 2 && probes[1].spec?.usdt == "a:b")
        #expect(probes[1].state == "degraded" && probes[1].reason == "symbol gone")
    }

    @Test("stats rows and a refused reply")
    func statsRows() throws {
        let ok = try JSONParser.parse(#"{"ok":true,"stats":[{"id":"p1","hits":12,"rate":3.25},{"id":"p2","hits":18446744073709551615,"rate":0,"state":"ended","reason":"gone"}]}"#)
        let rows = try ProbeCount.fromStats(ok.objectValue ?? [:])
        #expect(rows == [ProbeCount(id: "p1", hits: 12, rate: 3.25),
                         ProbeCount(id: "p2", hits: rows.last?.hits ?? 0, rate: 0, state: "ended", reason: "gone")])
        #expect((rows.last?.hits ?? 0) > UInt64(Int64.max))
        let refused = try JSONParser.parse(#"{"ok":false,"error":{"code":"probe_not_found","message":"no probe p9","probe":0}}"#)
        #expect(throws: ReplyError(code: "probe_not_found", message: "no probe p9", probe: 0)) {
            try ProbeCount.fromStats(refused.objectValue ?? [:])
        }
    }

    @Test("status summary")
    func status() throws {
        let reply = try JSONParser.parse(#"{"ok":true,"version":"0.1.0","uptime_s":12.5,"probes":3,"uprobes":4,"links":1,"degraded":1,"batching":{}}"#)
        let s = try DaemonStatus(reply: reply.objectValue ?? [:])
        #expect(s == DaemonStatus(version: "0.1.0", uptimeSeconds: 12.5, probes: 3, uprobes: 4, links: 1, degraded: 1))
    }
}
