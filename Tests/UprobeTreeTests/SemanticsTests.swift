import Glibc
import Testing
import UprobeTree

@Suite struct SemanticsTests {
    let k1 = UprobeKey(dev: 1, inode: 10, offset: 0x100)
    let k2 = UprobeKey(dev: 1, inode: 10, offset: 0x200)
    let k3 = UprobeKey(dev: 1, inode: 11, offset: 0x080)

    @Test func keyOrderIsDevInodeOffset() {
        #expect(UprobeKey(dev: 1, inode: 2, offset: 9) < UprobeKey(dev: 1, inode: 3, offset: 0))
        #expect(UprobeKey(dev: 1, inode: 9, offset: 9) < UprobeKey(dev: 2, inode: 0, offset: 0))
        #expect(UprobeKey(dev: 1, inode: 2, offset: 3) < UprobeKey(dev: 1, inode: 2, offset: 4))
        #expect(MemoryLayout<Consumer>.stride == 20)
    }

    @Test func upsertRemoveAndBatchResult() {
        let t = UprobeTree()
        var r = t.apply([
            .insertConsumer(k1, Consumer(registration: 1, slot: 10)),
            .insertConsumer(k1, Consumer(registration: 2, slot: 11, pid: 42, flags: Consumer.retprobe)),
            .insertConsumer(k2, Consumer(registration: 3, slot: 12)),
        ])
        #expect(r.published && r.version == 1 && r.keysAdded == 2 && r.consumersAdded == 3)
        r = t.apply([.insertConsumer(k1, Consumer(registration: 1, slot: 99, pid: 5))])
        #expect(r.consumersReplaced == 1 && r.consumersAdded == 0 && r.version == 2)
        t.read { v in
            #expect(v.count == 2 && v.consumerCount == 3)
            let c = v.consumers(of: k1)
            #expect(c.map(\.registration) == [1, 2])
            #expect(c[0].slot == 99 && c[0].pid == 5)
            #expect(c[1].isRetprobe && c[1].pid == 42)
            // In-place access without copying the list out.
            var regs: [UInt64] = []
            if let list = v.lookup(k1) {
                for i in 0..<list.count { regs.append(list[i].registration) }
                let has2 = list.contains(registration: 2)
                #expect(has2)
            }
            #expect(regs == [1, 2])
        }
        // No-op batch: nothing published.
        r = t.apply([.removeKey(k3), .removeConsumer(k1, registration: 77)])
        #expect(!r.published && r.version == 2)
        // Removing the last consumer removes the uprobe.
        r = t.apply([.removeConsumer(k2, registration: 3), .removeConsumer(k1, registration: 1)])
        #expect(r.keysRemoved == 1 && r.consumersRemoved == 2 && r.version == 3)
        t.read { v in
            let has2 = v.contains(k2)
            let found2 = v.withConsumers(of: k2) { $0.count }
            #expect(!has2 && found2 == nil)
            #expect(v.consumers(of: k1).map(\.registration) == [2])
        }
        r = t.apply([.removeKey(k1)])
        #expect(r.keysRemoved == 1 && r.consumersRemoved == 1)
        t.read { v in #expect(v.isEmpty && v.count == 0 && v.consumerCount == 0 && v.first == nil) }
    }

    @Test func editsInOneBatchApplyInOrder() {
        let t = UprobeTree()
        t.apply([
            .insertConsumer(k1, Consumer(registration: 1, slot: 1)),
            .removeKey(k1),
            .insertConsumer(k1, Consumer(registration: 2, slot: 2)),
            .insertConsumer(k3, Consumer(registration: 3, slot: 3)),
            .removeConsumer(k3, registration: 3),
        ])
        t.read { v in
            #expect(v.count == 1)
            #expect(v.consumers(of: k1).map(\.registration) == [2])
            #expect(v.validate().isEmpty)
        }
    }

    @Test func rangeOverOneFile() {
        let t = UprobeTree()
        t.apply([k1, k2, k3, UprobeKey(dev: 0, inode: 10, offset: 5), UprobeKey(dev: 1, inode: 9, offset: .max)]
            .enumerated().map { .insertConsumer($1, Consumer(registration: UInt64($0), slot: 0)) })
        t.read { v in
            var keys: [UprobeKey] = []
            v.forEach(dev: 1, inode: 10) { k, _ in keys.append(k) }
            #expect(keys == [k1, k2])
            keys = []
            v.forEach(in: k2...k3) { k, _ in keys.append(k) }
            #expect(keys == [k2, k3])
        }
    }

    /// Same binary through a hard link and a symlink: same (dev, inode), same uprobe key; a copy
    /// of the file is a different uprobe.
    @Test func samePathsSameKey() throws {
        var template = Array("/tmp/uprobetree-XXXXXX".utf8CString)
        let dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
        defer { _ = system("rm -rf '\(dir)'") }
        let a = dir + "/bin", hard = dir + "/hard", soft = dir + "/soft", copy = dir + "/copy"
        for p in [a, copy] {
            let fd = open(p, O_CREAT | O_WRONLY, 0o755)
            #expect(fd >= 0)
            _ = write(fd, "x", 1)
            close(fd)
        }
        #expect(link(a, hard) == 0)
        #expect(symlink(a, soft) == 0)
        func key(_ path: String) -> UprobeKey {
            let fd = open(path, O_RDONLY)
            defer { close(fd) }
            var st = stat()
            precondition(fstat(fd, &st) == 0)
            return UprobeKey(st, offset: 0x1234)
        }
        #expect(key(a) == key(hard))
        #expect(key(a) == key(soft))
        #expect(key(a) != key(copy))
        let t = UprobeTree()
        t.apply([.insertConsumer(key(a), Consumer(registration: 1, slot: 1)),
                 .insertConsumer(key(soft), Consumer(registration: 2, slot: 2)),
                 .insertConsumer(key(hard), Consumer(registration: 1, slot: 3))])
        t.read { v in
            #expect(v.count == 1)
            #expect(v.consumers(of: key(a)).map(\.slot) == [3, 2])
        }
    }
}
