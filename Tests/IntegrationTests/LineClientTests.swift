import Foundation
import Testing
import UprobedClient

/// The client's line reader against a plain Unix socket server (no daemon, no kernel).
struct LineClientTests {
    /// A listening socket at a fresh path, and a way to accept its one connection.
    final class Listener {
        let path: String
        let fd: Int32
        init() throws {
            path = NSTemporaryDirectory() + "uprobed-lineclient-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard rc == 0, listen(fd, 1) == 0 else { throw ClientError("bind/listen \(path): \(errno)") }
        }
        func acceptOne() -> Int32 { accept(fd, nil, nil) }
        deinit { close(fd); unlink(path) }
    }

    static func write(_ fd: Int32, _ bytes: [UInt8]) {
        var off = 0
        while off < bytes.count {
            // MSG_NOSIGNAL: if the test fails early and the client goes away, no SIGPIPE.
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { return }
            off += n
        }
    }

    @Test("lines split across many reads, several lines in one read, and a 1 MB line all come back whole and in order")
    func splitAndJoinedLines() throws {
        let listener = try Listener()
        let client = try LineClient(socketPath: listener.path, timeoutSeconds: 10)
        let server = listener.acceptOne()
        defer { close(server) }
        let long = (0..<1_000_000).map { UInt8(ascii: "a") + UInt8($0 % 26) }
        let writer = Thread {
            Self.write(server, Array("one\ntwo\nthr".utf8))
            usleep(20_000)
            Self.write(server, Array("ee\n".utf8))
            // The long line in pieces, with pauses so the client reads it in many recv calls.
            var off = 0
            while off < long.count {
                let end = min(long.count, off + 150_000)
                Self.write(server, Array(long[off..<end]))
                off = end
                usleep(5_000)
            }
            Self.write(server, Array("\nlast\n".utf8))
        }
        writer.start()
        #expect(try client.readLine().map { String(decoding: $0, as: UTF8.self) } == "one")
        #expect(try client.readLine().map { String(decoding: $0, as: UTF8.self) } == "two")
        #expect(try client.readLine().map { String(decoding: $0, as: UTF8.self) } == "three")
        let got = try client.readLine()
        #expect(got?.count == long.count && got == long)
        #expect(try client.readLine().map { String(decoding: $0, as: UTF8.self) } == "last")
    }
}
