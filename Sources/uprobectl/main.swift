// uprobectl: the command-line client of uprobed. The commands live in Commands/, one file
// each; UprobeCtl.swift is the root command; Exit.swift has the exit statuses and the entry.
Main.run(Array(CommandLine.arguments.dropFirst()))
