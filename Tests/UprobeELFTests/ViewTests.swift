import Foundation
import Testing
@testable import UprobeELF

/// Debug files, the parse cache, and resolving inside another process's root.
@Suite("debug files, cache, process view")
struct ViewTests {
    @Test("a stripped binary resolves through its build-id debug file")
    func debugFile() throws {
        let fx = try Fixtures.get()
        let bid = try #require(try readelfBuildID(fx.bare))
        let root = fx.dir + "/debugroot"
        let dir = root + "/.build-id/" + bid.prefix(2)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let dbg = dir + "/" + bid.dropFirst(2) + ".debug"
        try? FileManager.default.removeItem(atPath: dbg)
        try run("objcopy", ["--only-keep-debug", fx.bareUnstripped, dbg])
        let plain = Resolver(limits: .init(), locator: .init(), debugDirectories: [])
        let withDebug = Resolver(limits: .init(), locator: .init(), debugDirectories: ["/nonexistent", root])
        expectCode("no_symbols") { () throws(ResolveError) in try plain.resolve(ProbeSpecInput(path: fx.bare, symbol: "fix_mul")) }
        let p = try #require(try withDebug.resolve(ProbeSpecInput(path: fx.bare, symbol: "fix_mul")).first)
        let twin = try #require(try plain.resolve(ProbeSpecInput(path: fx.bareUnstripped, symbol: "fix_mul")).first)
        #expect(p.fileOffset == twin.fileOffset)
        #expect(p.path == fx.bare)
        // A raw offset at a function start is now recognised without force.
        #expect(try withDebug.resolve(ProbeSpecInput(path: fx.bare, offset: twin.fileOffset)).first?.symbol == "fix_mul")
        let w = try #require(try withDebug.resolve(ProbeSpecInput(path: fx.bare, symbol: "fix_copy")).first?.warning)
        #expect(w.contains("__fix_copy_fast"))
        // A debug file whose build-id differs is ignored.
        let otherID = try #require(try readelfBuildID(fx.stripped))
        #expect(otherID != bid)
    }

    @Test("libc IFUNC lists implementations when libc's debug file is installed")
    func libcImplementations() throws {
        let r = Resolver()
        let p = try #require(try r.resolve(ProbeSpecInput(path: "libc", symbol: "memcpy")).first)
        let bid = try #require(p.buildID)
        let dbg = "/usr/lib/debug/.build-id/\(bid.prefix(2))/\(bid.dropFirst(2)).debug"
        guard FileManager.default.fileExists(atPath: dbg) else { return }   // libc6-dbg not installed
        let w = try #require(p.warning)
        #expect(w.contains("__memcpy_avx_unaligned_erms"))
        #expect(!w.contains("_chk"))
        let s = try #require(try r.resolve(ProbeSpecInput(path: "libc", symbol: "strlen")).first?.warning)
        #expect(s.contains("__strlen_avx2"))
    }

    @Test("the parse cache is reused and invalidated when the file changes")
    func cache() throws {
        let fx = try Fixtures.get()
        let copy = fx.dir + "/cache-copy"
        try? FileManager.default.removeItem(atPath: copy)
        try FileManager.default.copyItem(atPath: fx.pie, toPath: copy)
        let cache = ELFFileCache(capacity: 2)
        let r = Resolver(limits: .init(), locator: .init(), debugDirectories: [], cache: cache)
        for _ in 0..<50 { _ = try r.resolve(ProbeSpecInput(path: copy, symbol: "fix_add")) }
        #expect(cache.count == 1)
        // Replace the contents in place with a different build: new mtime/size -> new parse.
        let other = try Data(contentsOf: URL(fileURLWithPath: fx.nopie))
        try other.write(to: URL(fileURLWithPath: copy))
        let p = try #require(try r.resolve(ProbeSpecInput(path: copy, symbol: "fix_add")).first)
        let v = try #require(try readelfSymbol(fx.nopie, "fix_add"))
        #expect(p.fileOffset == (try expectedOffset(fx.nopie, vaddr: v)))
        #expect(cache.count == 1, "the new version at the path replaced the old one's parse")
        // Replaced by rename (an upgrade: a new inode), again and again: still one entry.
        for _ in 0..<5 {
            try? FileManager.default.removeItem(atPath: copy + ".new")
            try FileManager.default.copyItem(atPath: fx.pie, toPath: copy + ".new")
            guard rename(copy + ".new", copy) == 0 else { throw FixtureError(message: "rename failed") }
            _ = try r.resolve(ProbeSpecInput(path: copy, symbol: "fix_add"))
        }
        #expect(cache.count == 1)
        _ = try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc"))
        _ = try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_add"))
        #expect(cache.count == 2)
    }

    @Test("a parse unused for the cache's idle lifetime is dropped; one in use stays")
    func cacheIdleLifetime() throws {
        let fx = try Fixtures.get()
        let cache = ELFFileCache(capacity: 4, idleLifetime: .milliseconds(300))
        let r = Resolver(limits: .init(), locator: .init(), debugDirectories: [], cache: cache)
        _ = try r.resolve(ProbeSpecInput(path: fx.lib, symbol: "vfunc"))
        _ = try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_add"))
        #expect(cache.count == 2 && cache.bytes > 0)
        // fx.pie is used every 50 ms for 1.5 s: it stays; fx.lib, unused, goes.
        let until = ContinuousClock.now + .milliseconds(1500)
        while ContinuousClock.now < until {
            _ = try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "fix_add"))
            usleep(50_000)
        }
        #expect(cache.count == 1)
        // Then nothing is used: the cache empties (polled; the sweep runs on a utility queue).
        var waited = 0
        while cache.count > 0 && waited < 100 { usleep(50_000); waited += 1 }
        #expect(cache.count == 0 && cache.bytes == 0)
    }

    @Test("symlinks inside a process root resolve against that root, not the host's")
    func resolveInRoot() throws {
        let fx = try Fixtures.get()
        let root = fx.dir + "/fakeroot"
        try? FileManager.default.removeItem(atPath: root)
        try FileManager.default.createDirectory(atPath: root + "/usr/lib/x86_64-linux-gnu", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: fx.lib, toPath: root + "/usr/lib/x86_64-linux-gnu/libver.so")
        try FileManager.default.createSymbolicLink(atPath: root + "/lib", withDestinationPath: "/usr/lib")   // absolute!
        try FileManager.default.createSymbolicLink(atPath: root + "/usr/lib/x86_64-linux-gnu/libver.so.1",
                                                   withDestinationPath: "../../lib/x86_64-linux-gnu/libver.so")
        let r = Resolver()
        #expect(try r.resolveInRoot(root: root, path: "/lib/x86_64-linux-gnu/libver.so") == "/usr/lib/x86_64-linux-gnu/libver.so")
        #expect(try r.resolveInRoot(root: root, path: "/lib/x86_64-linux-gnu/libver.so.1") == "/usr/lib/x86_64-linux-gnu/libver.so")
        #expect(try r.resolveInRoot(root: root, path: "/../../lib/./x86_64-linux-gnu/libver.so") == "/usr/lib/x86_64-linux-gnu/libver.so")
        #expect(throws: ResolveError.self) { try r.resolveInRoot(root: root, path: "/lib/nothere.so") }
        try FileManager.default.createSymbolicLink(atPath: root + "/loop", withDestinationPath: "/loop")
        #expect(throws: ResolveError.self) { try r.resolveInRoot(root: root, path: "/loop/x") }
    }

    @Test("pid in a chroot: libraries come from that process's root")
    func chrootedProcess() throws {
        let fx = try Fixtures.get()
        let root = fx.dir + "/chroot"
        try? FileManager.default.removeItem(atPath: root)
        let fm = FileManager.default
        for d in ["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"] {
            try fm.createDirectory(atPath: root + d, withIntermediateDirectories: true)
        }
        try fm.createSymbolicLink(atPath: root + "/lib", withDestinationPath: "/usr/lib")
        try fm.createSymbolicLink(atPath: root + "/lib64", withDestinationPath: "/usr/lib64")
        // cp -L: the host's loader path is itself a symlink.
        try run("cp", ["-L", "/usr/bin/sleep", root + "/usr/bin/sleep"])
        try run("cp", ["-L", "/lib/x86_64-linux-gnu/libc.so.6", root + "/usr/lib/x86_64-linux-gnu/libc.so.6"])
        try run("cp", ["-L", "/lib64/ld-linux-x86-64.so.2", root + "/usr/lib64/ld-linux-x86-64.so.2"])
        let proc = Process()
        proc.executableURL = URL(fileURLWithPath: "/usr/sbin/chroot")
        proc.arguments = [root, "/usr/bin/sleep", "30"]
        try proc.run()
        defer { kill(proc.processIdentifier, SIGKILL); proc.waitUntilExit() }
        let pid = proc.processIdentifier
        // Wait until the process is the chrooted sleep (not `chroot` itself, a host binary that
        // maps the host's libc before it execs) and has mapped its libc.
        let sleepID = statOf(root + "/usr/bin/sleep")
        var mapped = false
        for _ in 0..<300 {
            if statOf("/proc/\(pid)/exe") == sleepID,
               let m = readWholeFile("/proc/\(pid)/maps"), String(decoding: m, as: UTF8.self).contains("libc.so.6") {
                mapped = true
                break
            }
            usleep(10_000)
        }
        try #require(mapped)
        let r = Resolver()
        let inside = try #require(try r.resolve(ProbeSpecInput(path: "libc", symbol: "malloc", pid: pid)).first)
        let host = try #require(try r.resolve(ProbeSpecInput(path: "libc", symbol: "malloc")).first)
        let (dev, ino) = statOf(root + "/usr/lib/x86_64-linux-gnu/libc.so.6")
        #expect(inside.inode == ino && inside.device == dev)
        #expect(inside.inode != host.inode)
        // maps prints the chroot's file by its host path; whatever path is reported must open that file.
        #expect(statOf(inside.path) == (dev, ino))
        #expect(inside.fileOffset == host.fileOffset)   // same bytes
        // An absolute path through the chroot's own absolute symlink /lib -> /usr/lib.
        let viaLink = try #require(try r.resolve(ProbeSpecInput(path: "/lib/x86_64-linux-gnu/libc.so.6", symbol: "getpid", pid: pid)).first)
        #expect(viaLink.inode == ino)
        expectCode("file_not_found") { () throws(ResolveError) in
            try r.resolve(ProbeSpecInput(path: fx.pie, symbol: "main", pid: pid))   // exists on the host only
        }
    }
}
