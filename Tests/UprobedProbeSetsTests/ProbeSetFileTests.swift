import Foundation
import Testing
import UprobedProbeSets
import UprobedProtocol

struct ProbeSetFileTests {
    func parse(_ text: String, name: String = "s") throws -> ProbeSetFile { try ProbeSetFile.parse(text, name: name) }

    /// The refusal of `text`: its line and message.
    func refusal(_ text: String, name: String = "s") -> ProbeSetError? {
        do { _ = try ProbeSetFile.parse(text, name: name) } catch { return error }
        Issue.record("accepted: \(text)")
        return nil
    }

    @Test("spellings and mappings become the specs uprobectl add makes, each with its line")
    func entries() throws {
        let f = try parse("""
            # comment
            probes:
              - libc:malloc
              - uretprobe:/usr/bin/bash:readline
              - usdt:/usr/bin/python3.11:python:function__entry
              - /bin/true:0x1a2b
              - probe: "uprobe:/usr/sbin/nginx:ngx_*"
                follow: false
              - probe: /bin/true:0x10
                force: true
              - probe: libc:free
                latency: true
            """, name: "web")
        #expect(f.name == "web")
        #expect(f.specs == [
            ProbeSpec(path: "libc", symbol: "malloc"),
            ProbeSpec(path: "/usr/bin/bash", symbol: "readline", retprobe: true),
            ProbeSpec(path: "/usr/bin/python3.11", usdt: "python:function__entry"),
            ProbeSpec(path: "/bin/true", offset: 0x1a2b),
            ProbeSpec(path: "/usr/sbin/nginx", symbol: "ngx_*", follow: false),
            ProbeSpec(path: "/bin/true", offset: 0x10, force: true),
            ProbeSpec(path: "libc", symbol: "free", latency: true),
        ])
        #expect(f.entries.map(\.line) == [3, 4, 5, 6, 7, 9, 11])
        #expect(f.line(of: 4) == 7 && f.line(of: 6) == 11 && f.line(of: 7) == nil)
    }

    @Test("the spelling printed by diff reads back as the same spec")
    func spellingRoundTrip() throws {
        for text in ["uprobe:libc:malloc", "uretprobe:/usr/bin/bash:readline", "usdt:/usr/bin/python3.11:python:function__entry",
                     "uprobe:/bin/true:0x1a2b"] {
            let spec = try ProbeSpec(cliSpelling: text)
            #expect(spec.spelling == text)
            #expect(try ProbeSpec(cliSpelling: spec.spelling) == spec)
        }
        #expect(ProbeSpec(path: "/x", symbol: "f", follow: false).spelling == "uprobe:/x:f (follow: false)")
        #expect(ProbeSpec(path: "/x", symbol: "f", latency: true).spelling == "uprobe:/x:f (latency: true)")
    }

    @Test("an empty list, and 'probes:' with nothing after it, are an empty set")
    func emptySets() throws {
        #expect(try parse("probes: []").entries.isEmpty)
        #expect(try parse("probes:\n").entries.isEmpty)
    }

    @Test("a pid is refused with the reason, at its line, in either form")
    func pidRefused() {
        let e = refusal("probes:\n  - probe: libc:malloc\n    pid: 42\n")
        #expect(e?.line == 3)
        #expect(e?.message.contains("names binaries, not processes") == true)
        var spec = ProbeSpec(path: "libc", symbol: "malloc")
        spec.pid = 7
        #expect(spec.probeSetProblem?.contains("'pid' is not allowed") == true)
    }

    @Test("every bad input is refused with its line and a reason")
    func refusals() {
        let cases: [(String, Int?, String)] = [
            ("", nil, "the file is empty"),
            ("probes: [libc:malloc\n", 2, "not valid YAML"),
            ("- libc:malloc\n", 1, "must be a mapping with a 'probes:' list"),
            ("probe:\n  - libc:malloc\n", 1, "unknown key 'probe'"),
            ("name: x\nprobes: []\n", 1, "unknown key 'name'"),
            ("probes: libc:malloc\n", 1, "'probes' must be a list"),
            ("other: 1\n", 1, "unknown key 'other'"),
            ("probes:\n  - libc\n", 2, "cannot parse probe 'libc'"),
            ("probes:\n  - usdt:/x:onlyprovider\n", 2, "a USDT probe needs PATH:PROVIDER:NAME"),
            ("probes:\n  - /x:0xzz\n", 2, "is not a hex offset"),
            ("probes:\n  - bin/tool:main\n", 2, "is relative"),
            ("probes:\n  - libc:malloc\n  - uprobe:libc:malloc\n", 3, "the same probe as line 2"),
            ("probes:\n  - follow: false\n", 2, "needs 'probe: SPELLING'"),
            ("probes:\n  - probe: libc:malloc\n    follow: maybe\n", 3, "'follow' must be true or false"),
            ("probes:\n  - probe: libc:malloc\n    retprobe: true\n", 3, "unknown key 'retprobe' in a probe"),
            ("probes:\n  - probe: libc:malloc\n    latency: maybe\n", 3, "'latency' must be true or false"),
            ("probes:\n  - probe: uretprobe:libc:malloc\n    latency: true\n", 2, "'latency' on a uretprobe"),
            ("probes:\n  - probe: usdt:/x:p:n\n    latency: true\n", 2, "'latency' on a USDT probe"),
            ("probes:\n  - probe: [a, b]\n", 2, "'probe' must be a probe spelling"),
            ("probes:\n  - [libc:malloc]\n", 2, "not a list"),
            ("probes:\n  - libc: malloc\n", 2, "unknown key 'libc' in a probe"),
            ("probes: []\nprobes: []\n", 1, "duplicate key 'probes'"),
        ]
        for (text, line, words) in cases {
            guard let e = refusal(text) else { continue }
            #expect(e.line == line, "\(text.debugDescription): line \(String(describing: e.line)) (\(e.message))")
            #expect(e.message.contains(words), "\(text.debugDescription): \(e.message)")
        }
    }

    @Test("set names: the file's name without .yaml/.yml; hidden and other files are not sets; bad names are refused")
    func names() {
        #expect(ProbeSetFile.setName(fileName: "alloc.yaml") == "alloc")
        #expect(ProbeSetFile.setName(fileName: "web-1.yml") == "web-1")
        for other in ["..data", ".alloc.yaml", "alloc.yaml.swp", "README", "alloc.json", ".yaml", "alloc.yaml~"] {
            #expect(ProbeSetFile.setName(fileName: other) == nil, "\(other)")
        }
        #expect(ProbeSetFile.nameProblem("a.b_c-1") == nil)
        for bad in ["", "a b", "a/b", ".x", "ä", String(repeating: "x", count: 129)] {
            #expect(ProbeSetFile.nameProblem(bad) != nil, "\(bad)")
        }
        #expect(refusal("probes: []", name: "a b")?.message.contains("may only hold") == true)
    }

    @Test("the shipped example set parses: libc's malloc and free")
    func shippedExample() throws {
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = try String(contentsOf: repo.appendingPathComponent("config/probes.d/libc-alloc.yaml"), encoding: .utf8)
        let f = try ProbeSetFile.parse(text, name: "libc-alloc")
        #expect(f.specs == [ProbeSpec(path: "libc", symbol: "malloc"), ProbeSpec(path: "libc", symbol: "free")])
    }
}
