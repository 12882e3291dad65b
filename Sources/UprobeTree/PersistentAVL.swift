// Persistent (path-copying) AVL tree of manually allocated nodes: the second half of the unsafe
// core. Readers only ever see published nodes, which are immutable; the writer builds the next
// version by copying the nodes on the paths it changes.
//
// Why an AVL tree: O(log n) lookups with a worst-case height of ~1.44 log2(n) (25 for 100k keys),
// deterministic shape (no random priorities to reproduce in tests), and a path copy touches only
// ~log2(n) nodes of 52 + 20*consumers bytes. A B-tree would read fewer cache lines per lookup, but
// each path copy would copy whole wide nodes, and variable-size consumer lists do not fit fixed
// slots. One allocation per uprobe keeps bytes per registration low (see docs/BENCHMARKS.md).
//
// Node layout (one malloc block, never resized):
//   NodeHeader (52 bytes): key (24), left (8), right (8), gen and height (8), count (4)
//   Consumer[count] (20 bytes each, 4-byte aligned) immediately after the header's last field.
// Version layout (one 64-byte-aligned block): VersionHeader (32 bytes: root, counts, sequence,
// payload) immediately followed by a copy of the root node ("embedded root"). A reader's first two hops
// (version record, root node's key and links) therefore land on one cache line: after each
// publish a reader takes one cache miss less than with a separately allocated version record
// (by construction; on the shared 2-vCPU VM the benchmark's run-to-run noise is larger than that
// one miss, see docs/BENCHMARKS.md). The embedded root belongs to its version block: the next batch copies
// it like any published node but never retires it separately (the whole block is retired).
//
// Mutation rule: a node whose `gen` equals the sequence number of the batch being built was
// allocated by this batch and has never been published, so the writer may mutate it in place
// (this makes a batch of k edits cost far fewer than k full path copies when they share paths).
// Any other node belongs to a published version and is copied (`fresh`), the original being
// retired to the epoch domain after the batch is published. Fresh nodes discarded within the same
// batch are freed at once (no reader can have seen them).

import Glibc

typealias NodePtr = UnsafeMutablePointer<NodeHeader>

struct NodeHeader {
    var key: UprobeKey
    var left: NodePtr?
    var right: NodePtr?
    /// The sequence number of the batch that allocated this node (low 56 bits) and the node's
    /// AVL height (high 8 bits), in one word: the node has no room for two. 2^56 batches is
    /// more than any daemon publishes (2,000 years at a million batches per second), and an AVL
    /// tree of 2^64 nodes is less than 93 levels high.
    var genAndHeight: UInt64
    var count: Int32

    static let genBits = 56
    static let genMask: UInt64 = (1 << UInt64(genBits)) - 1
    /// The largest batch sequence number a node can record.
    static let maxGen = genMask

    init(key: UprobeKey, gen: UInt64, height: Int32, count: Int32) {
        self.key = key
        left = nil
        right = nil
        genAndHeight = 0
        self.count = count
        self.gen = gen
        self.height = height
    }

    /// Sequence number of the batch that allocated this node.
    var gen: UInt64 {
        @inline(__always) get { genAndHeight & Self.genMask }
        @inline(__always) set { genAndHeight = genAndHeight & ~Self.genMask | newValue & Self.genMask }
    }

    var height: Int32 {
        @inline(__always) get { Int32(truncatingIfNeeded: genAndHeight >> UInt64(Self.genBits)) }
        @inline(__always) set { genAndHeight = genAndHeight & Self.genMask | UInt64(UInt8(truncatingIfNeeded: newValue)) << UInt64(Self.genBits) }
    }

    /// The consumers follow the header's last field, not its stride: `Consumer` needs only
    /// 4-byte alignment, so a one-consumer node is 52 + 20 = 72 bytes (an 80-byte malloc chunk;
    /// with the stride, 76 bytes would take a 96-byte chunk).
    static let consumersOffset = (MemoryLayout<NodeHeader>.size + MemoryLayout<Consumer>.alignment - 1)
        & ~(MemoryLayout<Consumer>.alignment - 1)

    @inline(__always)
    static func size(count: Int) -> Int { consumersOffset + count * MemoryLayout<Consumer>.stride }
}

extension UnsafeMutablePointer where Pointee == NodeHeader {
    @inline(__always)
    var consumers: UnsafeMutablePointer<Consumer> {
        (UnsafeMutableRawPointer(self) + NodeHeader.consumersOffset)
            .assumingMemoryBound(to: Consumer.self)
    }
}

struct VersionHeader {
    var root: NodePtr?
    var keyCount: UInt32
    var consumerCount: UInt32
    var sequence: UInt64
    /// The object published with this version (see `UprobeTree.apply(_:publishing:)`), retained
    /// once by the version and released when the version is freed; nil if none.
    var payload: UnsafeMutableRawPointer?

    static let embeddedRootOffset = MemoryLayout<VersionHeader>.stride

    /// Bytes of a version block whose embedded root has `rootCount` consumers (nil: empty tree).
    static func blockSize(rootCount: Int?) -> Int {
        embeddedRootOffset + (rootCount.map { NodeHeader.size(count: $0) } ?? 0)
    }

    /// Allocates a version block for `root` (copying it in, if any); returns the block.
    static func make(root: NodePtr?, keyCount: Int, consumerCount: Int, sequence: UInt64,
                     payload: UnsafeMutableRawPointer? = nil) -> UnsafeMutablePointer<VersionHeader> {
        let rootCount = root.map { Int($0.pointee.count) }
        let block = RawMemory.allocate(blockSize(rootCount: rootCount), alignment: 64)
        let v = block.bindMemory(to: VersionHeader.self, capacity: 1)
        var embedded: NodePtr?
        if let root, let rootCount {
            let dst = block + embeddedRootOffset
            dst.copyMemory(from: root, byteCount: NodeHeader.size(count: rootCount))
            embedded = dst.assumingMemoryBound(to: NodeHeader.self)
        }
        precondition(keyCount <= Int(UInt32.max) && consumerCount <= Int(UInt32.max))
        v.initialize(to: VersionHeader(root: embedded, keyCount: UInt32(keyCount),
                                       consumerCount: UInt32(consumerCount), sequence: sequence, payload: payload))
        return v
    }

    /// The block as a retired block.
    static func retired(_ v: UnsafeMutablePointer<VersionHeader>) -> RetiredBlock {
        RetiredBlock(pointer: UnsafeMutableRawPointer(v),
                     size: blockSize(rootCount: v.pointee.root.map { Int($0.pointee.count) }),
                     payload: v.pointee.payload)
    }
}

@inline(__always)
func height(_ n: NodePtr?) -> Int32 { n?.pointee.height ?? 0 }

/// Lookup shared by readers and the writer (pure reads of immutable nodes).
@inline(__always)
func findNode(_ root: NodePtr?, _ key: UprobeKey) -> NodePtr? {
    var n = root
    while let c = n {
        let k = c.pointee.key
        if key == k { return c }
        n = key < k ? c.pointee.left : c.pointee.right
    }
    return nil
}

/// Builds one new version from a published one. Lives only inside `UprobeTree.apply`, under the
/// writer lock.
struct BatchBuilder {
    let gen: UInt64
    var root: NodePtr?
    /// The base version's embedded root (owned by its version block, see above).
    let embeddedRoot: NodePtr?
    var keyCount: Int
    var consumerCount: Int
    /// Published blocks unlinked by this batch, to retire after publication.
    var retired: [RetiredBlock] = []
    var result: BatchResult

    init(base: VersionHeader, gen: UInt64) {
        precondition(gen <= NodeHeader.maxGen, "uprobe tree: batch sequence \(gen) past what a node records")
        self.gen = gen
        root = base.root
        embeddedRoot = base.root
        keyCount = Int(base.keyCount)
        consumerCount = Int(base.consumerCount)
        result = BatchResult(version: base.sequence, keysAdded: 0, keysRemoved: 0,
                             consumersAdded: 0, consumersRemoved: 0, consumersReplaced: 0)
    }

    // MARK: allocation

    private func allocNode(key: UprobeKey, count: Int) -> NodePtr {
        let p = RawMemory.allocate(NodeHeader.size(count: count)).bindMemory(to: NodeHeader.self, capacity: 1)
        p.initialize(to: NodeHeader(key: key, gen: gen, height: 1, count: Int32(count)))
        return p
    }

    /// Drops a node that is no longer linked: freed now if this batch made it, else retired
    /// (except the embedded root, which goes with its version block).
    private mutating func dispose(_ n: NodePtr) {
        if n == embeddedRoot { return }
        let size = NodeHeader.size(count: Int(n.pointee.count))
        if n.pointee.gen == gen {
            RawMemory.free(n, size: size)
        } else {
            retired.append(RetiredBlock(pointer: UnsafeMutableRawPointer(n), size: size))
        }
    }

    /// Returns a node with `n`'s contents that this batch may mutate.
    @inline(__always)
    private mutating func fresh(_ n: NodePtr) -> NodePtr {
        if n.pointee.gen == gen { return n }
        let size = NodeHeader.size(count: Int(n.pointee.count))
        let c = RawMemory.allocate(size)
        c.copyMemory(from: n, byteCount: size)
        let p = c.assumingMemoryBound(to: NodeHeader.self)
        p.pointee.gen = gen
        if n != embeddedRoot {
            retired.append(RetiredBlock(pointer: UnsafeMutableRawPointer(n), size: size))
        }
        return p
    }

    // MARK: AVL rebalancing (all arguments are fresh)

    @inline(__always)
    private func update(_ n: NodePtr) {
        n.pointee.height = max(height(n.pointee.left), height(n.pointee.right)) + 1
    }

    private mutating func rotateRight(_ m: NodePtr) -> NodePtr {
        let l = fresh(m.pointee.left!)
        m.pointee.left = l.pointee.right
        l.pointee.right = m
        update(m); update(l)
        return l
    }

    private mutating func rotateLeft(_ m: NodePtr) -> NodePtr {
        let r = fresh(m.pointee.right!)
        m.pointee.right = r.pointee.left
        r.pointee.left = m
        update(m); update(r)
        return r
    }

    private mutating func balance(_ m: NodePtr) -> NodePtr {
        update(m)
        let bf = height(m.pointee.left) - height(m.pointee.right)
        if bf > 1 {
            let l = m.pointee.left!
            if height(l.pointee.left) < height(l.pointee.right) {
                m.pointee.left = rotateLeft(fresh(l))
            }
            return rotateRight(m)
        }
        if bf < -1 {
            let r = m.pointee.right!
            if height(r.pointee.right) < height(r.pointee.left) {
                m.pointee.right = rotateRight(fresh(r))
            }
            return rotateLeft(m)
        }
        return m
    }

    // MARK: edits

    /// After the last edit: the root to embed in the new version block. The node itself is freed
    /// (if this batch made it) or retired (if published), since the version block holds its copy.
    mutating func detachRootForPublishing() -> NodePtr? {
        guard let r = root else { return nil }
        if r.pointee.gen == gen {
            // Freed right after the caller copied it: keep it alive until then.
            pendingFreshRoot = r
        } else {
            dispose(r)
        }
        return r
    }

    /// A fresh root to free once it has been copied into the version block.
    var pendingFreshRoot: NodePtr?

    mutating func apply(_ edit: TreeEdit) {
        switch edit {
        case let .insertConsumer(key, consumer):
            root = insert(root, key, consumer)
        case let .removeConsumer(key, registration):
            guard let n = findNode(root, key) else { return }
            let cnt = Int(n.pointee.count)
            guard let idx = (0..<cnt).first(where: { n.consumers[$0].registration == registration }) else { return }
            if cnt == 1 {
                root = delete(root, key)
                keyCount -= 1
                result.keysRemoved += 1
            } else {
                root = replaceConsumers(root, key, removing: idx)
            }
            consumerCount -= 1
            result.consumersRemoved += 1
        case let .removeKey(key):
            guard let n = findNode(root, key) else { return }
            let cnt = Int(n.pointee.count)
            root = delete(root, key)
            keyCount -= 1
            consumerCount -= cnt
            result.keysRemoved += 1
            result.consumersRemoved += cnt
        }
    }

    /// Copy of `old` (same key/links/height) with its consumer list edited: `consumer` appended
    /// (or replacing index `replace`), or index `removing` dropped.
    private mutating func rebuilt(_ old: NodePtr, adding consumer: Consumer? = nil,
                                  replace: Int? = nil, removing: Int? = nil) -> NodePtr {
        let oldCount = Int(old.pointee.count)
        if let r = replace, old.pointee.gen == gen {      // same size, fresh: in place
            old.consumers[r] = consumer!
            return old
        }
        let newCount = oldCount + (replace == nil && consumer != nil ? 1 : 0) - (removing != nil ? 1 : 0)
        let n = allocNode(key: old.pointee.key, count: newCount)
        n.pointee.left = old.pointee.left
        n.pointee.right = old.pointee.right
        n.pointee.height = old.pointee.height
        var j = 0
        for i in 0..<oldCount where i != removing {
            n.consumers.advanced(by: j).initialize(to: i == replace ? consumer! : old.consumers[i])
            j += 1
        }
        if replace == nil, let c = consumer { n.consumers.advanced(by: j).initialize(to: c) }
        dispose(old)
        return n
    }

    private mutating func insert(_ n: NodePtr?, _ key: UprobeKey, _ c: Consumer) -> NodePtr {
        guard let n else {
            let p = allocNode(key: key, count: 1)
            p.consumers.initialize(to: c)
            keyCount += 1
            consumerCount += 1
            result.keysAdded += 1
            result.consumersAdded += 1
            return p
        }
        let k = n.pointee.key
        if key == k {
            let cnt = Int(n.pointee.count)
            if let i = (0..<cnt).first(where: { n.consumers[$0].registration == c.registration }) {
                result.consumersReplaced += 1
                return rebuilt(n, adding: c, replace: i)
            }
            consumerCount += 1
            result.consumersAdded += 1
            return rebuilt(n, adding: c)
        }
        let m = fresh(n)
        if key < k {
            m.pointee.left = insert(m.pointee.left, key, c)
        } else {
            m.pointee.right = insert(m.pointee.right, key, c)
        }
        return balance(m)
    }

    /// Replaces the node `key` (which exists) by a copy without consumer `removing`.
    private mutating func replaceConsumers(_ n: NodePtr?, _ key: UprobeKey, removing: Int) -> NodePtr? {
        guard let n else { return nil }
        let k = n.pointee.key
        if key == k { return rebuilt(n, removing: removing) }
        let m = fresh(n)
        if key < k {
            m.pointee.left = replaceConsumers(m.pointee.left, key, removing: removing)
        } else {
            m.pointee.right = replaceConsumers(m.pointee.right, key, removing: removing)
        }
        return m      // shape unchanged: no rebalancing
    }

    /// Deletes `key` (which exists) from the subtree.
    private mutating func delete(_ n: NodePtr?, _ key: UprobeKey) -> NodePtr? {
        guard let n else { return nil }
        let k = n.pointee.key
        if key == k {
            let l = n.pointee.left, r = n.pointee.right
            guard let l else { dispose(n); return r }
            guard let r else { dispose(n); return l }
            let (rest, successor) = detachMin(r)
            successor.pointee.left = l
            successor.pointee.right = rest
            dispose(n)
            return balance(successor)
        }
        let m = fresh(n)
        if key < k {
            m.pointee.left = delete(m.pointee.left, key)
        } else {
            m.pointee.right = delete(m.pointee.right, key)
        }
        return balance(m)
    }

    /// Removes the minimum node of a subtree; returns the remaining subtree and a fresh copy of
    /// the minimum node (its links are the caller's to set).
    private mutating func detachMin(_ n: NodePtr) -> (NodePtr?, NodePtr) {
        guard n.pointee.left != nil else {
            let right = n.pointee.right
            return (right, fresh(n))
        }
        let m = fresh(n)
        let (rest, minNode) = detachMin(m.pointee.left!)
        m.pointee.left = rest
        return (balance(m), minNode)
    }
}

/// Frees every node of a version immediately, the version block last (owner's deinit only: no
/// readers exist).
func freeVersion(_ v: UnsafeMutablePointer<VersionHeader>) {
    func freeSubtree(_ n: NodePtr?) {
        guard let n else { return }
        freeSubtree(n.pointee.left)
        freeSubtree(n.pointee.right)
        RawMemory.free(n, size: NodeHeader.size(count: Int(n.pointee.count)))
    }
    if let r = v.pointee.root {
        freeSubtree(r.pointee.left)
        freeSubtree(r.pointee.right)
    }
    VersionHeader.retired(v).free()
}
