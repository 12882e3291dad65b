extension ResolvedProbe {
    /// The same sites, those of one file sharing one `ResolvedFile` and their names one
    /// `SymbolNames` buffer (handed to `compactor` when large, as a resolution's are). Equal to
    /// `sites` element by element (`==` ignores where a name is stored).
    ///
    /// A restore resolves each function of a saved glob apart, by its name, so without this
    /// every restored site would keep a file object and a names buffer of its own for as long
    /// as it stays registered: for a whole binary, about 150 bytes per site more than the same
    /// glob holds after its register.
    public static func sharingFiles(_ sites: [ResolvedProbe], compactor: NameCompactor?) -> [ResolvedProbe] {
        // `ResolvedFile` equality and hashing ignore the names: one group per file.
        var groupOf: [ResolvedFile: Int] = [:]
        var groups: [(file: ResolvedFile, members: [Int])] = []
        for (i, site) in sites.enumerated() {
            if let g = groupOf[site.file] {
                groups[g].members.append(i)
            } else {
                groupOf[site.file] = groups.count
                groups.append((site.file, [i]))
            }
        }
        var out = sites
        for (file, members) in groups {
            let packed = SymbolNames.pack(members.map { sites[$0].symbol }, compactor: compactor)
            let unnamed = ResolvedFile(path: file.path, device: file.device, inode: file.inode, buildID: file.buildID)
            // One file object per names buffer (a buffer holds up to 4 GiB of names).
            var fileFor: [ObjectIdentifier: ResolvedFile] = [:]
            for (i, name) in zip(members, packed) {
                let site = sites[i]
                var shared = unnamed
                if let name {
                    let key = ObjectIdentifier(name.names)
                    if let f = fileFor[key] { shared = f } else {
                        shared = unnamed.with(names: name.names)
                        fileFor[key] = shared
                    }
                }
                out[i] = ResolvedProbe(file: shared, fileOffset: site.fileOffset, nameAt: name?.at, aliases: site.aliases,
                                       refCtrOffset: site.refCtrOffset, warning: site.warning)
            }
        }
        return out
    }
}
