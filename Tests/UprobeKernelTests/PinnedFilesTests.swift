import Foundation
import Testing
@testable import UprobeKernel

/// Binaries pinned by descriptor for the kernel (no BPF needed: plain files).
struct PinnedFilesTests {
    /// A fresh directory for one test; `done` removes it.
    func directory() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("pinned-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir.path
    }

    func done(_ dir: String) { try? FileManager.default.removeItem(atPath: dir) }

    func write(_ path: String, _ text: String) throws {
        try text.write(toFile: path, atomically: false, encoding: .utf8)
    }

    func fileID(_ path: String) throws -> FileID {
        var st = stat()
        guard stat(path, &st) == 0 else { throw FixtureError("stat \(path): errno \(errno)") }
        return FileID(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// What /proc/self/fd/N names (nil once N is closed).
    func target(_ procPath: String) -> String? {
        try? FileManager.default.destinationOfSymbolicLink(atPath: procPath)
    }

    @Test("a pinned file is handed out as /proc/self/fd/N, which keeps naming it after the path is replaced")
    func pinsByDescriptor() throws {
        let dir = try directory()
        defer { done(dir) }
        let path = dir + "/bin"
        try write(path, "old")
        let id = try fileID(path)
        var pins = PinnedFiles()
        let kernelPath = try pins.kernelPath(for: id, at: path)
        #expect(kernelPath.hasPrefix("/proc/self/fd/"))
        #expect(target(kernelPath) == path)
        #expect(try fileID(kernelPath) == id)
        #expect(pins.isPinned(id) && pins.count == 1)
        // An upgrade by rename: the pin is the old file still, and asking again opens nothing.
        try write(dir + "/new", "new")
        #expect(rename(dir + "/new", path) == 0)
        #expect(try pins.kernelPath(for: id, at: path) == kernelPath)
        #expect(try fileID(kernelPath) == id, "the descriptor still holds the old inode")
        #expect(try fileID(path) != id)
    }

    @Test("a file replaced between resolution and pinning is refused, and nothing stays open")
    func refusesReplacedFile() throws {
        let dir = try directory()
        defer { done(dir) }
        let path = dir + "/bin"
        try write(path, "old")
        let resolved = try fileID(path)
        try write(dir + "/new", "new")
        #expect(rename(dir + "/new", path) == 0)
        var pins = PinnedFiles()
        do {
            _ = try pins.kernelPath(for: resolved, at: path)
            Issue.record("a replaced file was pinned")
        } catch {
            #expect(error.code == .fileChanged)
            #expect(error.message.contains(path) && error.message.contains("inode \(resolved.inode) ->"), "\(error.message)")
        }
        #expect(pins.count == 0)
    }

    @Test("a path that cannot be pinned (missing, a FIFO) is passed on as it is, without blocking")
    func unpinnablePathsPassThrough() throws {
        let dir = try directory()
        defer { done(dir) }
        var pins = PinnedFiles()
        let missing = dir + "/missing"
        #expect(try pins.kernelPath(for: FileID(device: 1, inode: 1), at: missing) == missing)
        let fifo = dir + "/fifo"
        #expect(mkfifo(fifo, 0o600) == 0)
        #expect(try pins.kernelPath(for: try fileID(fifo), at: fifo) == fifo, "not a regular file: not pinned")
        #expect(pins.count == 0)
    }

    @Test("the descriptor is closed when its file is unpinned, when all are, and when a pin is released")
    func closesWhenReleased() throws {
        let dir = try directory()
        defer { done(dir) }
        let (a, b) = (dir + "/a", dir + "/b")
        try write(a, "a")
        try write(b, "b")
        var pins = PinnedFiles()
        let pathA = try pins.kernelPath(for: try fileID(a), at: a)
        let pathB = try pins.kernelPath(for: try fileID(b), at: b)
        #expect(target(pathA) == a && target(pathB) == b)
        pins.unpin(try fileID(a))
        #expect(target(pathA) != a, "unpinned: its descriptor is closed")
        #expect(target(pathB) == b, "the other file stays pinned")
        pins.unpinAll()
        #expect(target(pathB) != b && pins.count == 0)

        var pin = try #require(try PinnedBinary.open(a, expecting: try fileID(a)))
        let path = pin.kernelPath
        #expect(target(path) == a)
        pin = try #require(try PinnedBinary.open(b, expecting: try fileID(b)))
        #expect(target(path) != a, "the released pin closed its descriptor")
        withExtendedLifetime(pin) {}
    }
}
