// CUprobeSys — the C side of uprobed's kernel attacher.
//
// Swift cannot call the variadic syscall(2), so bpf(2) and perf_event_open(2) are wrapped
// here. The distribution's <linux/bpf.h> (Debian 12: Linux 6.1 UAPI) predates the
// uprobe_multi link (Linux 6.6), so the pieces of the UAPI we need that it lacks are defined
// below under our own names and their layout is checked with _Static_assert against the
// kernel's (see shim.c).
//
// Every function returns what the syscall returns (an fd, 0, or -1 with errno set); none of
// them retries EINTR — the Swift side (BPFSyscall) does that and turns errno into errors.
#ifndef CUPROBESYS_H
#define CUPROBESYS_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
// malloc_trim(3): Glibc's Swift module does not export <malloc.h>.
#include <malloc.h>

#ifdef __cplusplus
extern "C" {
#endif

// MARK: - UAPI additions missing from the 6.1 header

/// enum bpf_attach_type value of the uprobe_multi link (Linux >= 6.6).
#define CUPROBESYS_BPF_TRACE_UPROBE_MULTI 48u
/// enum bpf_attach_type value of the uprobe session link (Linux >= 6.13): one program runs at
/// a function's entry and, unless that run returned non-zero, again at its return.
#define CUPROBESYS_BPF_TRACE_UPROBE_SESSION 57u
/// link_create.uprobe_multi.flags: attach to function returns instead of entries.
#define CUPROBESYS_BPF_F_UPROBE_MULTI_RETURN 1u
/// enum bpf_attach_type value of perf_event links (present in 6.1, restated for Swift).
#define CUPROBESYS_BPF_PERF_EVENT 41u

/// The BPF_LINK_CREATE part of union bpf_attr with the uprobe_multi member, laid out as in
/// the kernel UAPI: the four u32 heads (prog_fd, target_fd, attach_type, flags) followed by
/// the per-link-type union, in which uprobe_multi sits at the same offset as kprobe_multi.
struct CUprobeSys_link_create_uprobe_multi {
    __u32 prog_fd;
    __u32 target_fd;
    __u32 attach_type;
    __u32 flags;
    struct {
        __aligned_u64 path;
        __aligned_u64 offsets;
        __aligned_u64 ref_ctr_offsets;
        __aligned_u64 cookies;
        __u32 cnt;
        __u32 flags;
        __u32 pid;
    } uprobe_multi;
};

/// union bpf_attr widened with our link_create layout; passed whole to bpf(2).
union CUprobeSys_bpf_attr {
    union bpf_attr base;
    struct CUprobeSys_link_create_uprobe_multi link_create_uprobe_multi;
};

// MARK: - Raw syscalls

/// bpf(2): syscall(__NR_bpf, cmd, attr, size).
int CUprobeSys_bpf(int cmd, union bpf_attr *attr, unsigned int size);

/// perf_event_open(2): syscall(__NR_perf_event_open, attr, pid, cpu, group_fd, flags).
int CUprobeSys_perf_event_open(struct perf_event_attr *attr, pid_t pid, int cpu,
                               int group_fd, unsigned long flags);

// MARK: - bpf(2) commands with their attr filled in C

/// BPF_MAP_CREATE. `name` may be NULL; at most BPF_OBJ_NAME_LEN-1 bytes are used.
int CUprobeSys_map_create(uint32_t map_type, uint32_t key_size, uint32_t value_size,
                          uint32_t max_entries, uint32_t map_flags, const char *name);

/// BPF_PROG_LOAD with a verifier log buffer (log_level 1 when `log_buf` is non-NULL).
/// `insns` is an array of `insn_cnt` struct bpf_insn encoded as little-endian u64 words.
int CUprobeSys_prog_load(uint32_t prog_type, uint32_t expected_attach_type,
                         const uint64_t *insns, uint32_t insn_cnt, const char *license,
                         const char *name, char *log_buf, uint32_t log_size);

/// BPF_LINK_CREATE for a uprobe_multi link. `ref_ctr_offsets`/`cookies` may be NULL;
/// `pid` 0 means every process.
int CUprobeSys_link_create_uprobe_multi(int prog_fd, const char *path, const uint64_t *offsets,
                                        const uint64_t *ref_ctr_offsets, const uint64_t *cookies,
                                        uint32_t cnt, uint32_t flags, uint32_t pid);
/// The same link with another uprobe_multi attach type (BPF_TRACE_UPROBE_SESSION).
int CUprobeSys_link_create_uprobe_multi_as(int prog_fd, uint32_t attach_type, const char *path,
                                           const uint64_t *offsets, const uint64_t *ref_ctr_offsets,
                                           const uint64_t *cookies, uint32_t cnt, uint32_t flags, uint32_t pid);

/// BPF_LINK_CREATE for a BPF_PERF_EVENT link (program on a perf event, with bpf_cookie).
int CUprobeSys_link_create_perf_event(int prog_fd, int perf_fd, uint64_t cookie);

/// BPF_MAP_LOOKUP_ELEM / BPF_MAP_UPDATE_ELEM / BPF_MAP_DELETE_ELEM / BPF_MAP_GET_NEXT_KEY.
int CUprobeSys_map_lookup_elem(int map_fd, const void *key, void *value);
int CUprobeSys_map_update_elem(int map_fd, const void *key, const void *value, uint64_t flags);
int CUprobeSys_map_delete_elem(int map_fd, const void *key);
/// `key` NULL asks for the first key.
int CUprobeSys_map_get_next_key(int map_fd, const void *key, void *next_key);

/// BPF_MAP_UPDATE_BATCH: `*count` elements from parallel `keys`/`values` arrays; on return
/// `*count` is the number of elements updated (also on failure).
int CUprobeSys_map_update_batch(int map_fd, const void *keys, const void *values, uint32_t *count);

/// perf_event_open(2) of the "uprobe" PMU (`pmu_type` from
/// /sys/bus/event_source/devices/uprobe/type): config1 = path pointer, config2 = file offset,
/// `config` carries the retprobe bit. pid -1 = every process (then cpu 0 is used, as the
/// kernel requires a cpu for task-less events; BPF programs still run on every CPU).
int CUprobeSys_perf_uprobe_open(uint32_t pmu_type, uint64_t config, const char *path,
                                uint64_t offset, pid_t pid);

/// BPF_RAW_TRACEPOINT_OPEN: attaches a BPF_PROG_TYPE_RAW_TRACEPOINT program to the tracepoint
/// `name` (e.g. "sched_process_exec"); returns the attachment's fd (closing it detaches).
int CUprobeSys_raw_tracepoint_open(const char *name, int prog_fd);

/// One record of a BPF ring buffer as `CUprobeSys_ringbuf_drain` hands it out: its first 16
/// bytes (shorter records are zero-padded).
struct CUprobeSys_ringbuf_record {
    uint64_t words[2];
};

/// Consumes every committed record of a BPF ring buffer mapped by the caller: `consumer` is the
/// first page (read-write), `producer` the second (read-only) followed by the data area of
/// `data_size` bytes (a power of two), mapped twice in a row as the kernel lays it out. Copies
/// up to `max_out` records into `out` (the rest are consumed and counted but not copied) and
/// returns how many records there were. Stops at a record still being written. The position
/// words are read and written with acquire/release ordering, as the kernel's producer expects.
int CUprobeSys_ringbuf_drain(uint64_t *consumer, const uint64_t *producer, const uint8_t *data,
                             uint64_t data_size, struct CUprobeSys_ringbuf_record *out, int max_out);

/// mallopt(3) M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (Glibc's Swift module does not export
/// mallopt): blocks up to `mmap_threshold` bytes come from the heap instead of their own
/// mmap, and up to `trim_threshold` bytes of freed heap stay mapped. 0 on failure (errno is
/// not set by glibc).
/// The trim threshold set here is the one `CUprobeSys_heap_release_end` restores.
int CUprobeSys_keep_freed_memory(size_t mmap_threshold, size_t trim_threshold);

/// Opens a heap-release window: until the matching `CUprobeSys_heap_release_end`, the
/// M_TRIM_THRESHOLD is glibc's default (128 KiB), so a free that leaves an arena's top chunk
/// above it hands the top back to the kernel. malloc_trim(3) cannot do that for the arenas of
/// threads other than the main one: it returns the free pages *inside* their heaps, never
/// their top chunk, which only a free trims, and only above M_TRIM_THRESHOLD. Windows nest
/// (any number of callers, any threads); the last one to close restores the kept threshold.
void CUprobeSys_heap_release_begin(void);
void CUprobeSys_heap_release_end(void);
/// Heap-release windows open now (for tests).
int CUprobeSys_heap_release_windows(void);

/// prctl(2) PR_SET_NAME: names the calling thread as `top -H`, `ps -L` and `perf` show it
/// (truncated to 15 bytes). 0 on success, -1 with errno set.
int CUprobeSys_set_thread_name(const char *name);

/// memfd_create(2) with MFD_CLOEXEC (Glibc's Swift module does not export it): an anonymous
/// regular file. An fd, or -1 with errno set.
int CUprobeSys_memfd_create(const char *name);

// MARK: - Pinning (bpffs) and object info

/// BPF_OBJ_PIN: pins `fd` (map, program or link) at `path` in a bpf file system.
int CUprobeSys_obj_pin(int fd, const char *path);

/// BPF_OBJ_GET: a new fd (read-write) for the object pinned at `path`.
int CUprobeSys_obj_get(const char *path);

/// BPF_OBJ_GET_INFO_BY_FD of a map: the fields uprobed checks before it adopts a pinned map.
int CUprobeSys_map_info(int map_fd, uint32_t *type, uint32_t *id, uint32_t *key_size, uint32_t *value_size,
                        uint32_t *max_entries, uint32_t *map_flags);

/// BPF_OBJ_GET_INFO_BY_FD of a program: its id and its tag (the kernel's hash of the
/// instructions with map references left out, 8 bytes).
int CUprobeSys_prog_info(int prog_fd, uint32_t *id, uint8_t *tag);

/// statfs(2)'s f_type of `path` into `*type` (Glibc's Swift module lacks <sys/vfs.h>).
int CUprobeSys_fs_type(const char *path, int64_t *type);

/// mount(2) of a bpf file system at `target` with `options` (e.g. "mode=0700").
int CUprobeSys_mount_bpffs(const char *target, const char *options);

/// enum bpf_link_type value of uprobe_multi links (Linux >= 6.6).
#define CUPROBESYS_BPF_LINK_TYPE_UPROBE_MULTI 12u

/// struct bpf_link_info with its uprobe_multi member (Linux >= 6.8), which the 6.1 header
/// lacks: the three u32 heads, then the union at offset 16.
struct CUprobeSys_uprobe_multi_link_info {
    __u32 type;
    __u32 id;
    __u32 prog_id;
    __u32 pad;
    __aligned_u64 path;
    __aligned_u64 offsets;
    __aligned_u64 ref_ctr_offsets;
    __aligned_u64 cookies;
    __u32 path_size;
    __u32 count;
    __u32 flags;
    __u32 pid;
};

/// BPF_OBJ_GET_INFO_BY_FD of a link into `info` (the caller sets the buffers and their
/// sizes; with no buffers the kernel fills in `count` and `path_size`).
int CUprobeSys_link_info(int link_fd, struct CUprobeSys_uprobe_multi_link_info *info);

#ifdef __cplusplus
}
#endif
#endif
