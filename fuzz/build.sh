#!/usr/bin/env bash
# Builds the libFuzzer harnesses into .build-fuzz/bin (json-fuzz, elf-fuzz) and generates the
# ELF seed files into .build-fuzz/seeds/elf. Needs only the Swift toolchain (its clang runtime
# has libFuzzer and ASan), python3, gcc and binutils. Usage: fuzz/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=.build-fuzz
SPM=$OUT/spm
mkdir -p "$OUT/bin" "$OUT/seeds/elf" "$OUT/logs"

# SwiftPM builds the module under test and its dependencies, as Package.swift declares them,
# with coverage and ASan, in a scratch folder of our own (never .build, which other builds use).
# -enable-testing lets the ELF harness reach internal entry points. Release: -O keeps Swift's
# overflow and bounds traps (only -Ounchecked drops them); assert() is off, as in the daemon.
SPM_FLAGS=(--scratch-path "$SPM" -c release --sanitize=fuzzer --sanitize=address -Xswiftc -enable-testing)
for target in UprobedProtocol UprobeELF; do
    echo "building $target (swift build --target, in $SPM)"
    if ! swift build "${SPM_FLAGS[@]}" --target "$target" >"$OUT/logs/build-$target.log" 2>&1; then
        tail -30 "$OUT/logs/build-$target.log" >&2
        exit 1
    fi
done
# SwiftPM's build manifest says how each module was compiled and from what (see link-info.py).
MANIFEST=$SPM/release.yaml

harness() {  # output, module under test, harness source
    local info flags
    info=$(python3 fuzz/link-info.py "$MANIFEST" "$2")  # fails the build if the manifest is unreadable
    mapfile -t flags <<<"$info"
    echo "building $1"
    swiftc -swift-version 6 -parse-as-library -sanitize=fuzzer,address -O -g -use-ld=lld \
        -module-name "$(basename "$3" .swift)" "${flags[@]}" "$3" -o "$OUT/bin/$1"
}
harness json-fuzz UprobedProtocol fuzz/JSONFuzz/JSONFuzz.swift
harness elf-fuzz UprobeELF fuzz/ELFFuzz/ELFFuzz.swift

# ELF seeds, made here rather than committed: an executable with USDT notes and a build-id, the
# same stripped, the same without section headers (notes then come from PT_NOTE), a shared
# library with symbol versions and an IFUNC, and a distribution binary.
S=$OUT/seeds/elf
gcc -O1 -o "$S/usdt" fuzz/seeds/elf/usdt.c
strip --strip-all -o "$S/usdt-stripped" "$S/usdt"
cp "$S/usdt-stripped" "$S/usdt-noshdr"
printf '\0\0\0\0\0\0\0\0' | dd of="$S/usdt-noshdr" bs=1 seek=40 conv=notrunc status=none  # e_shoff
printf '\0\0\0\0' | dd of="$S/usdt-noshdr" bs=1 seek=60 conv=notrunc status=none          # e_shnum, e_shstrndx
gcc -O1 -shared -fPIC -Wl,--version-script=fuzz/seeds/elf/libver.map -o "$S/libver.so" fuzz/seeds/elf/libver.c
[ ! -f /usr/bin/true ] || cp /usr/bin/true "$S/true"
echo "built $OUT/bin/json-fuzz $OUT/bin/elf-fuzz; ELF seeds in $S"
